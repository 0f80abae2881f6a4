"""weightspace saturation FILE.csv --upstream COL --downstream COL [--out DIR]"""
from __future__ import annotations

import click

from .common import echo, note, print_json, report_options
from .options import force_option, report_folder
from .probe import write_report

__all__ = ["SAT_FILES", "saturation"]

SAT_FILES = ("results.json", "saturation.csv", "saturation.png")


@click.command("saturation")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(dir_okay=False))
@click.option("--upstream", required=True, metavar="COL", help="Column of upstream accuracies.")
@click.option("--downstream", required=True, metavar="COL", help="Column of downstream accuracies.")
@click.option("--label", default=None, metavar="COL", help="Column naming each point (e.g. checkpoint).")
@click.option("--errors", is_flag=True, help="The columns hold errors (1 − accuracy), not accuracies.")
@click.option("--points", type=click.Choice(["hull", "all"]), default="hull", show_default=True,
              help="Fit the upper convex hull of the points (the paper's choice) or every point.")
@report_folder("Folder for results.json, saturation.csv and saturation.png.")
@force_option()
@report_options
def saturation(csv_file: str, upstream: str, downstream: str, label: str | None, errors: bool, points: str,
               out_dir: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Fit e_DS = k·e_US^α + e_∞ (e = 1 − accuracy) to two columns of FILE.csv (e.g. a leaderboard).

    Reports k, α, e_∞ and the downstream accuracy predicted as upstream accuracy → 1 (1 − e_∞), and whether the
    points show diminishing returns at all (``saturates``: true, false, or null when undetermined; the curve against a
    straight line by leave-one-out error, and the slopes of the upper and lower halves). Percentages are
    detected and converted. --out writes results.json, saturation.csv (every point, fitted or not) and
    saturation.png (points, hull, curve).
    """
    from weightspace.analysis.saturation import saturation_from_csv
    from weightspace.report import check_outputs, markdown_table
    if out_dir:
        check_outputs(out_dir, SAT_FILES, force)
    fit = saturation_from_csv(csv_file, upstream, downstream, label=label, errors=errors, points=points)
    if fit.config.get("percent"):
        note("the columns hold percentages: divided by 100", quiet)
    if fit.config.get("skipped_rows"):
        note(f"skipped {fit.config['skipped_rows']} row(s) with an empty cell", quiet)
    payload = write_report(out_dir, "saturation", fit, force=force, quiet=quiet)
    if as_json:
        print_json(payload)
        return
    echo(markdown_table(["k", "alpha", "e_inf", "predicted downstream at upstream 1", "points fitted", "rmse",
                               "saturates"],
                              [[fit.k, fit.alpha, fit.e_inf, fit.predicted_downstream_at_saturation,
                                f"{len(fit.used)} of {len(fit.upstream)}", fit.rmse, fit.test.get("saturates")]]))

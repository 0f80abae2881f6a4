"""weightspace leaderboard CKPT... --model M --data DATA [--data DATA2 ...] [--out DIR]"""
from __future__ import annotations

import click

from .common import print_json, report_options
from .evalargs import build_evaluator, model_options, require


@click.command("leaderboard")
@click.argument("checkpoints", nargs=-1, required=True)
@model_options
@click.option("--data", "data_specs", multiple=True, metavar="DATA",
              help="Evaluation data, one column each (repeat); checkpoints are ranked on the first.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for results.json, leaderboard.csv and leaderboard.png.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--ema", is_flag=True, help="Use EMA weights where files hold both.")
@report_options
def leaderboard(checkpoints: tuple[str, ...], model_spec: str | None, num_classes: int | None, in_chans: int | None,
                batch_size: int, device: str, data_specs: tuple[str, ...], out_dir: str | None, force: bool,
                ema: bool, as_json: bool, quiet: bool) -> None:
    """Evaluate each of CHECKPOINTS on --data and rank them (accuracy on the first --data, ties in input order).

    One model instance is built; each checkpoint's weights are copied into it in place, and the data is
    decoded once and held on the device. E.g. which pre-training checkpoint transfers best.
    """
    from weightspace import load
    from weightspace.report import check_outputs, markdown_table
    from weightspace.search.greedy import LEADERBOARD_FILES, write_leaderboard
    from weightspace.search.greedy import leaderboard as rank_checkpoints
    require(model_spec, "--model", "to evaluate checkpoints")
    require(data_specs, "--data", "to evaluate checkpoints")
    if out_dir:
        check_outputs(out_dir, LEADERBOARD_FILES, force)
    ev = build_evaluator(model_spec, list(data_specs), num_classes=num_classes, in_chans=in_chans,
                         batch_size=batch_size, device=device)
    lb = rank_checkpoints([load(c, ema=ema) for c in checkpoints], ev, progress=not quiet)
    results = {"command": "leaderboard", "model": model_spec, "data": list(data_specs)}
    paths = write_leaderboard(lb, out_dir, results, force=force) if out_dir else {}
    if as_json:
        print_json({**results, "leaderboard": lb.to_dict(), "files": paths})
        return
    headers, rows = lb.table("accuracy")
    click.echo(markdown_table(["rank", *headers, f"{lb.columns[0]} loss"],
                              [[r["rank"], *row, r["metrics"][lb.columns[0]].get("loss")]
                               for r, row in zip(lb.rows, rows)]))
    for group in lb.extra["ties"]:
        click.echo(f"tie (kept in input order): {', '.join(group)}")
    for p in paths.values():
        click.echo(f"wrote {p}")

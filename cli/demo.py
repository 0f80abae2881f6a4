"""weightspace demo --out runs/demo"""
from __future__ import annotations

import click

from .common import note, print_json, report_options
from .options import force_option, report_folder


@click.command("demo")
@report_folder("Folder for checkpoints and results.", default="runs/demo")
@click.option("--small", is_flag=True, help="Reduced size (fewer epochs, 3 ingredients, 5-point curves): seconds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every model and data order.")
@force_option("Overwrite the results of an earlier run in --out.")
@report_options
def demo(out_dir: str, small: bool, seed: int, force: bool, as_json: bool, quiet: bool) -> None:
    """The embedded default run, offline on real data (scikit-learn's handwritten digits).

    Pre-trains a small CNN on digits 0–4, fine-tunes ≥ 6 ingredients for all 10 digits over a grid of learning
    rate × weight decay × augmentation, trains 2 models from random init, then prints the soup leaderboard
    (val, test, shifted test) and barrier curves of a fine-tuned pair against the random-init pair.
    """
    import time

    from weightspace.experiments.demo import run_demo
    from weightspace.analysis.curve import barrier_table
    from weightspace.report import jsonable, markdown_table
    t0 = time.perf_counter()
    r = run_demo(out_dir, small=small, seed=seed, force=force, progress=not quiet, log=lambda m: note(m, quiet))
    if as_json:
        print_json(jsonable({k: v for k, v in r.items() if k not in ("leaderboard", "curves")}
                            | {"leaderboard": r["leaderboard"].to_dict()}))
        return
    lb = r["leaderboard"]
    click.echo(f"## {lb.title}\n")
    click.echo(markdown_table(*lb.table("accuracy")))
    g = r["greedy"]
    click.echo(f"\ngreedy soup kept {len(g['kept'])}/{len(g['ranking'])} ingredients: "
               + ", ".join(k.rsplit("/", 1)[-1] for k in g["kept"]))
    click.echo("\n## barrier heights (digits:test)\n")
    click.echo(markdown_table(*barrier_table(r["curves"])))
    click.echo("")
    for key in ("results", "png", "curve_png", "curve_json"):
        click.echo(f"{key.replace('_', ' ')}: {r['files'][key]}")
    note(f"demo finished in {time.perf_counter() - t0:.1f} s ("
         + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items()) + ")", quiet)

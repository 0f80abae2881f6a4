"""weightspace leaderboard CKPT... --model M --data DATA [--data DATA2 ...] [--out DIR]"""
from __future__ import annotations

import click

from .common import echo, batch_note, print_json, report_options, require
from .options import DataOptions, ModelOptions, OpOptions, force_option, report_folder, use

__all__ = ["leaderboard"]


@click.command("leaderboard")
@click.argument("checkpoints", nargs=-1, required=True)
@use(ModelOptions, "model")
@use(DataOptions, "data", only=("data", "transform"),
     help={"data": "Evaluation data, one column each (repeat); checkpoints are ranked on the first."})
@report_folder("Folder for results.json, leaderboard.csv and leaderboard.png.")
@force_option()
@use(OpOptions, "ops", only=("ema", "strip_prefix"))
@report_options
def leaderboard(checkpoints: tuple[str, ...], model: ModelOptions, data: DataOptions, out_dir: str | None,
                force: bool, ops: OpOptions, as_json: bool, quiet: bool) -> None:
    """Evaluate each of CHECKPOINTS on --data and rank them (accuracy on the first --data, ties in input order).

    One model instance is built; each checkpoint's weights are copied into it in place, and the data is
    decoded once and held on the device. E.g. which pre-training checkpoint transfers best.
    """
    from weightspace import load
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.report import check_outputs, markdown_table
    from weightspace.search.soups import Leaderboard
    from weightspace.search.soups import leaderboard as rank_checkpoints
    require(model.model, "--model", "to evaluate checkpoints")
    require(data.data, "--data", "to evaluate checkpoints")
    if out_dir:
        check_outputs(out_dir, Leaderboard.FILES, force)
    ev = build_evaluator(model, list(data.data), transform=data_transform(data), checkpoint=checkpoints[0])
    batch_note(ev, quiet)
    lb = rank_checkpoints([load(c, ema=ops.ema) for c in checkpoints], ev, progress=not quiet)
    results = {"command": "leaderboard", "model": model.model, "data": list(data.data)}
    paths = {k: str(v) for k, v in lb.write(out_dir, force=force, extra=results).items()} if out_dir else {}
    if as_json:
        print_json({**results, "leaderboard": lb.to_dict(), "files": paths})
        return
    headers, rows = lb.table("accuracy")
    echo(markdown_table(["rank", *headers, f"{lb.columns[0]} loss"],
                              [[r["rank"], *row, r["metrics"][lb.columns[0]].get("loss")]
                               for r, row in zip(lb.rows, rows)]))
    for group in lb.extra["ties"]:
        echo(f"tie (kept in input order): {', '.join(group)}")
    for p in paths.values():
        echo(f"wrote {p}")

"""weightspace distance A B"""
from __future__ import annotations

import click

from .common import echo, markdown_table, print_json, report_options
from .options import OpOptions, use

__all__ = ["distance"]


@click.command("distance")
@click.argument("a")
@click.argument("b")
@click.option("--per-module", is_flag=True, help="Also report each module (see --depth / --regex).")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Group parameters by their first N name parts.")
@click.option("--regex", default=None, help="Group parameters by what this regex captures (group 1, else the match).")
@click.option("--include-buffers", is_flag=True,
              help="Count running statistics (BatchNorm) in the distances; by default they are reported apart.")
@use(OpOptions, "ops", only=("ema", "strip_prefix", "allow_nonfinite"),
     help={"allow_nonfinite": "Do not refuse tensors holding NaN/Inf."})
@report_options
def distance(a: str, b: str, per_module: bool, depth: int | None, regex: str | None, include_buffers: bool,
             ops: OpOptions, as_json: bool, quiet: bool) -> None:
    """L2 distance ‖A−B‖, relative distance ‖A−B‖/‖A‖ and cosine over floating parameters (running statistics
    reported apart unless --include-buffers); module rows in natural order."""
    import re

    import weightspace as ws
    if regex:
        try:
            re.compile(regex)
        except re.error as e:
            raise click.BadParameter(str(e), param_hint="--regex") from None
    r = ws.distance(a, b, per_module=per_module, depth=depth, regex=regex, ema=ops.ema,
                    allow_nonfinite=ops.allow_nonfinite, progress=not quiet, include_buffers=include_buffers)
    if as_json:
        print_json(r)
        return
    t = r["total"]
    rows = [["(total)", t["l2"], t["relative"], t["cosine"], t["numel"]]]
    rows += [[m["module"], m["l2"], m["relative"], m["cosine"], m["numel"]] for m in r.get("modules", [])]
    echo(markdown_table(["module", "l2", "relative", "cosine", "numel"], rows))
    if "buffers" in r and not include_buffers:
        s = r["buffers"]
        echo(f"\nrunning statistics (not in the distances above; --include-buffers counts them): l2 "
                   f"{s['l2']:.6g}, relative {s['relative']:.6g} over {s['numel']} values")

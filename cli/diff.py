"""weightspace diff A B"""
from __future__ import annotations

import sys
from typing import Any

import click

from .common import echo, markdown_table, print_json, report_options
from .options import OpOptions, use

__all__ = ["diff"]


@click.command("diff")
@click.argument("a")
@click.argument("b")
@use(OpOptions, "ops", only=("ema", "strip_prefix"))
@report_options
def diff(a: str, b: str, ops: OpOptions, as_json: bool, quiet: bool) -> None:
    """Keys only in A or only in B, and keys whose shape or dtype differ. Exit 1 when they differ."""
    import weightspace as ws
    ca, cb = ws.load(a, ema=ops.ema), ws.load(b, ema=ops.ema)
    ka, kb = set(ca), set(cb)
    mismatches = []
    for k in sorted(ka & kb):
        (da, sa), (db, sb) = ca.info(k), cb.info(k)
        if sa != sb or da != db:
            mismatches.append({"key": k, "a": {"dtype": str(da).replace("torch.", ""), "shape": list(sa)},
                               "b": {"dtype": str(db).replace("torch.", ""), "shape": list(sb)}})
    out: dict[str, Any] = {"a": ca.source, "b": cb.source, "only_in_a": sorted(ka - kb), "only_in_b": sorted(kb - ka),
           "mismatched": mismatches, "common": len(ka & kb)}
    same = not (out["only_in_a"] or out["only_in_b"] or mismatches)
    if as_json:
        print_json({**out, "identical_structure": same})
    else:
        echo(f"{len(ka & kb)} keys in common; {len(out['only_in_a'])} only in {ca.source}; "
                   f"{len(out['only_in_b'])} only in {cb.source}; {len(mismatches)} shape/dtype mismatches")
        rows = [[k, "only in A", ""] for k in out["only_in_a"]] + [[k, "only in B", ""] for k in out["only_in_b"]]
        rows += [[m["key"], f"{m['a']['dtype']} {m['a']['shape']}", f"{m['b']['dtype']} {m['b']['shape']}"] for m in mismatches]
        if rows:
            echo(markdown_table(["key", "A", "B"], rows))
    sys.exit(0 if same else 1)

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
    from weightspace.io.describe import structure  # plain safetensors files: their headers alone, no torch
    (name_a, sa), (name_b, sb) = (structure(s, ema=ops.ema, strip_prefix=ops.strip_prefix) for s in (a, b))
    ka, kb = set(sa), set(sb)
    mismatches: list[dict[str, Any]] = [{"key": k, "a": {"dtype": sa[k][0], "shape": sa[k][1]}, "b": {"dtype": sb[k][0], "shape": sb[k][1]}}
                  for k in sorted(ka & kb) if sa[k] != sb[k]]
    out: dict[str, Any] = {"a": name_a, "b": name_b, "only_in_a": sorted(ka - kb), "only_in_b": sorted(kb - ka),
                           "mismatched": mismatches, "common": len(ka & kb)}
    same = not (out["only_in_a"] or out["only_in_b"] or mismatches)
    if as_json:
        print_json({**out, "identical_structure": same})
    else:
        echo(f"{len(ka & kb)} keys in common; {len(out['only_in_a'])} only in {name_a}; "
                   f"{len(out['only_in_b'])} only in {name_b}; {len(mismatches)} shape/dtype mismatches")
        rows = [[k, "only in A", ""] for k in out["only_in_a"]] + [[k, "only in B", ""] for k in out["only_in_b"]]
        rows += [[m["key"], f"{m['a']['dtype']} {m['a']['shape']}", f"{m['b']['dtype']} {m['b']['shape']}"] for m in mismatches]
        if rows:
            echo(markdown_table(["key", "A", "B"], rows))
    sys.exit(0 if same else 1)


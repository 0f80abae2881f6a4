"""weightspace diff A B"""
from __future__ import annotations

import sys
from typing import Any

import click

from .common import markdown_table, print_json, report_options
from .options import OpOptions, use

__all__ = ["diff"]


@click.command("diff")
@click.argument("a")
@click.argument("b")
@use(OpOptions, "ops", only=("ema", "strip_prefix"))
@report_options
def diff(a: str, b: str, ops: OpOptions, as_json: bool, quiet: bool) -> None:
    """Keys only in A or only in B, and keys whose shape or dtype differ. Exit 1 when they differ."""
    (name_a, sa), (name_b, sb) = _structure(a, ops), _structure(b, ops)
    ka, kb = set(sa), set(sb)
    mismatches: list[dict[str, Any]] = [{"key": k, "a": {"dtype": sa[k][0], "shape": sa[k][1]}, "b": {"dtype": sb[k][0], "shape": sb[k][1]}}
                  for k in sorted(ka & kb) if sa[k] != sb[k]]
    out: dict[str, Any] = {"a": name_a, "b": name_b, "only_in_a": sorted(ka - kb), "only_in_b": sorted(kb - ka),
                           "mismatched": mismatches, "common": len(ka & kb)}
    same = not (out["only_in_a"] or out["only_in_b"] or mismatches)
    if as_json:
        print_json({**out, "identical_structure": same})
    else:
        click.echo(f"{len(ka & kb)} keys in common; {len(out['only_in_a'])} only in {name_a}; "
                   f"{len(out['only_in_b'])} only in {name_b}; {len(mismatches)} shape/dtype mismatches")
        rows = [[k, "only in A", ""] for k in out["only_in_a"]] + [[k, "only in B", ""] for k in out["only_in_b"]]
        rows += [[m["key"], f"{m['a']['dtype']} {m['a']['shape']}", f"{m['b']['dtype']} {m['b']['shape']}"] for m in mismatches]
        if rows:
            click.echo(markdown_table(["key", "A", "B"], rows))
    sys.exit(0 if same else 1)


def _structure(source: str, ops: OpOptions) -> tuple[str, dict[str, tuple[str, list[int]]]]:
    """The source's name and key → (dtype, shape); a plain safetensors file is read from its header alone, without
    importing torch."""
    from weightspace.io.header import header_only_view
    view = header_only_view(source) if ops.ema == "off" and not ops.strip_prefix else None
    if view is not None:
        return source, {k: (d, list(shape)) for k, (d, shape, _) in view.tensors.items()}
    import weightspace as ws
    ck = ws.load(source, ema=ops.ema)
    structure = {}
    for k in ck:
        dtype, shape = ck.info(k)
        structure[k] = (str(dtype).replace("torch.", ""), list(shape))
    return ck.source, structure

"""weightspace inspect CKPT"""
from __future__ import annotations

from typing import Any

import click

from .common import echo, human_bytes, markdown_table, print_json, report_options
from .options import OpOptions, use

__all__ = ["inspect_cmd"]


@click.command("inspect")
@click.argument("source")
@use(OpOptions, "ops", only=("ema", "strip_prefix"))
@click.option("--limit", type=int, default=0, help="Show at most this many keys in the table (0: all).")
@report_options
def inspect_cmd(source: str, ops: OpOptions, limit: int, as_json: bool, quiet: bool) -> None:
    """Keys, shapes, dtypes, #params, bytes and provenance metadata of SOURCE."""
    from weightspace.io.describe import describe  # a plain safetensors file: its header alone, no torch
    info, note = describe(source, ema=ops.ema, strip_prefix=ops.strip_prefix)
    if as_json:
        print_json(info)
        return
    _render(info, note, limit)


def _render(info: dict[str, Any], note: str, limit: int) -> None:
    tensors = info["tensors"]
    echo(f"source:   {info['source']}" + (f"  ({note})" if note else ""))
    if info["variant"]:
        echo(f"variant:  {info['variant']}")
    echo(f"tensors:  {info['num_tensors']}")
    echo(f"params:   {info['num_params']:,}")
    echo(f"bytes:    {info['bytes']:,} ({human_bytes(info['bytes'])})")
    for alias, canon in info["tied"].items():
        echo(f"tied:     {alias} = {canon}")
    if info["provenance"]:
        p = info["provenance"]
        echo(f"provenance: op={p.get('op')} weightspace={p.get('weightspace_version')}")
        for ing, c in zip(p.get("ingredients", []), p.get("coefficients", [None] * len(p.get("ingredients", [])))):
            coef = f"{c:.4g} × " if isinstance(c, (int, float)) else ""
            echo(f"  {coef}{ing.get('source')}  sha256={str(ing.get('sha256', ''))[:12]}")
    rows = [[t["key"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar"] for t in tensors]
    if limit:
        rows = rows[:limit]
    echo("")
    echo(markdown_table(["key", "dtype", "shape"], rows))

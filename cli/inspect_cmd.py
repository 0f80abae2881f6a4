"""weightspace inspect CKPT"""
from __future__ import annotations

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
    import weightspace as ws
    ck = ws.load(source, ema=ops.ema)
    tensors = []
    for k in ck:
        dtype, shape = ck.info(k)
        tensors.append({"key": k, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                        **({"tied_to": ck.aliases[k]} if k in ck.aliases else {})})
    info = {
        "source": ck.source,
        "files": [str(f) for f in ck.files],
        "variant": ck.variant or None,
        "num_tensors": len(ck),
        "num_params": ck.num_params,
        "bytes": ck.nbytes,
        "tied": ck.aliases,
        "provenance": ck.provenance,
        "metadata": {k: v for k, v in ck.metadata.items() if k != "weightspace"},
        "tensors": tensors,
    }
    if as_json:
        print_json(info)
        return
    echo(f"source:   {ck.source}" + (f"  ({ck.note})" if ck.note else ""))
    if ck.variant:
        echo(f"variant:  {ck.variant}")
    echo(f"tensors:  {len(ck)}")
    echo(f"params:   {ck.num_params:,}")
    echo(f"bytes:    {ck.nbytes:,} ({human_bytes(ck.nbytes)})")
    for alias, canon in ck.aliases.items():
        echo(f"tied:     {alias} = {canon}")
    if ck.provenance:
        p = ck.provenance
        echo(f"provenance: op={p.get('op')} weightspace={p.get('weightspace_version')}")
        for ing, c in zip(p.get("ingredients", []), p.get("coefficients", [None] * len(p.get("ingredients", [])))):
            coef = f"{c:.4g} × " if isinstance(c, (int, float)) else ""
            echo(f"  {coef}{ing.get('source')}  sha256={str(ing.get('sha256', ''))[:12]}")
    rows = [[t["key"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar"] for t in tensors]
    if limit:
        rows = rows[:limit]
    echo("")
    echo(markdown_table(["key", "dtype", "shape"], rows))

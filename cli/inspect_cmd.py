"""weightspace inspect CKPT"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from .common import human_bytes, markdown_table, print_json, report_options
from .options import OpOptions, use

__all__ = ["inspect_cmd"]


@click.command("inspect")
@click.argument("source")
@use(OpOptions, "ops", only=("ema", "strip_prefix"))
@click.option("--limit", type=int, default=0, help="Show at most this many keys in the table (0: all).")
@report_options
def inspect_cmd(source: str, ops: OpOptions, limit: int, as_json: bool, quiet: bool) -> None:
    """Keys, shapes, dtypes, #params, bytes and provenance metadata of SOURCE."""
    info, note = _describe(source, ops)
    if as_json:
        print_json(info)
        return
    _render(info, note, limit)


def _describe(source: str, ops: OpOptions) -> tuple[dict[str, Any], str]:
    """What inspect shows, and the source's note; a plain safetensors file is described from its header alone,
    without importing torch."""
    from weightspace.io.header import header_only_view
    view = header_only_view(source) if ops.ema == "off" and not ops.strip_prefix else None
    if view is not None:
        from weightspace.io.keys import provenance_of
        tensors = [{"key": k, "dtype": d, "shape": list(shape)} for k, (d, shape, _) in view.tensors.items()]
        numel = sum(math.prod(shape) for _, shape, _ in view.tensors.values())
        return {"source": source, "files": [str(Path(source))], "variant": None, "num_tensors": len(tensors),
                "num_params": numel, "bytes": sum(n for _, _, n in view.tensors.values()), "tied": {},
                "provenance": provenance_of(view.metadata),
                "metadata": {k: v for k, v in view.metadata.items() if k != "weightspace"}, "tensors": tensors}, ""
    import weightspace as ws
    ck = ws.load(source, ema=ops.ema)
    tensors = []
    for k in ck:
        dtype, shape = ck.info(k)
        tensors.append({"key": k, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                        **({"tied_to": ck.aliases[k]} if k in ck.aliases else {})})
    return {"source": ck.source, "files": [str(f) for f in ck.files], "variant": ck.variant or None,
            "num_tensors": len(ck), "num_params": ck.num_params, "bytes": ck.nbytes, "tied": ck.aliases,
            "provenance": ck.provenance, "metadata": {k: v for k, v in ck.metadata.items() if k != "weightspace"},
            "tensors": tensors}, ck.note


def _render(info: dict[str, Any], note: str, limit: int) -> None:
    tensors = info["tensors"]
    click.echo(f"source:   {info['source']}" + (f"  ({note})" if note else ""))
    if info["variant"]:
        click.echo(f"variant:  {info['variant']}")
    click.echo(f"tensors:  {info['num_tensors']}")
    click.echo(f"params:   {info['num_params']:,}")
    click.echo(f"bytes:    {info['bytes']:,} ({human_bytes(info['bytes'])})")
    for alias, canon in info["tied"].items():
        click.echo(f"tied:     {alias} = {canon}")
    if info["provenance"]:
        p = info["provenance"]
        click.echo(f"provenance: op={p.get('op')} weightspace={p.get('weightspace_version')}")
        for ing, c in zip(p.get("ingredients", []), p.get("coefficients", [None] * len(p.get("ingredients", [])))):
            coef = f"{c:.4g} × " if isinstance(c, (int, float)) else ""
            click.echo(f"  {coef}{ing.get('source')}  sha256={str(ing.get('sha256', ''))[:12]}")
    rows = [[t["key"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar"] for t in tensors]
    if limit:
        rows = rows[:limit]
    click.echo("")
    click.echo(markdown_table(["key", "dtype", "shape"], rows))

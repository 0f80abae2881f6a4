"""weightspace interpolate A B --alpha X -o OUT"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, print_json, report_options


@click.command("interpolate")
@click.argument("a")
@click.argument("b")
@click.option("--alpha", type=float, required=True, help="Mixing coefficient: (1−α)·A + α·B.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output checkpoint path.")
@output_options
@load_options
@report_options
def interpolate(a: str, b: str, alpha: float, output: str, force: bool, fmt: str | None, ema: bool, precision: str,
                allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Write the checkpoint (1−α)·A + α·B."""
    from weightspace import ops, save
    stream = ops.lerp_stream(a, b, alpha, precision=precision, allow_nonfinite=allow_nonfinite,
                             progress=not quiet, ema=ema)
    path = save(stream, output, force=force, fmt=fmt)
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; interpolated once, written as a copy", quiet)
    if as_json:
        print_json({"output": str(path), "alpha": alpha, "a": a, "b": b})
    else:
        click.echo(f"wrote {path} ((1−{alpha})·A + {alpha}·B)")

"""weightspace soup CKPT... -o OUT"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options


@click.command("soup")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--uniform", "method", flag_value="uniform", default=True, help="Plain mean of all checkpoints (default).")
@click.option("--weights", default=None, help="Comma-separated mixing weights, one per checkpoint (normalised to sum 1).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output checkpoint path.")
@output_options
@load_options
@report_options
def soup(checkpoints: tuple[str, ...], method: str, weights: str | None, output: str, force: bool, fmt: str | None,
         ema: bool, precision: str, allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Average CHECKPOINTS (uniform, or with --weights) into one checkpoint, streamed tensor by tensor."""
    from weightspace import ops, save
    kw = dict(precision=precision, allow_nonfinite=allow_nonfinite, progress=not quiet, ema=ema)
    if weights is not None:
        w = parse_floats(weights, "--weights")
        if len(w) != len(checkpoints):
            raise click.BadParameter(f"{len(w)} weights for {len(checkpoints)} checkpoints", param_hint="--weights")
        stream = ops.weighted_average_stream(list(checkpoints), w, **kw)
    else:
        stream = ops.uniform_soup_stream(list(checkpoints), **kw)
    path = save(stream, output, force=force, fmt=fmt)
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; averaged once, written as a copy", quiet)
    for ing in stream.ingredients:
        if ing.variant:
            note(f"{ing.source}: using {ing.variant}", quiet)
    result = {"output": str(path), "op": stream.provenance["op"], "coefficients": stream.provenance["coefficients"],
              "ingredients": [c.source for c in stream.ingredients]}
    if as_json:
        print_json(result)
    else:
        click.echo(f"wrote {path} ({result['op']} of {len(checkpoints)} checkpoints)")

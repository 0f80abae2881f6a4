"""weightspace merge --method task-arithmetic|ties --base PRE FT... --scale λ -o OUT"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, print_json, report_options


def refuse_existing(output: str, force: bool) -> None:
    """Fail before any work when the output exists and --force was not given (the write checks again)."""
    from pathlib import Path

    from weightspace.errors import OutputExists
    if Path(output).exists() and not force:
        raise OutputExists(f"{output}: already exists (use --force to overwrite)")


@click.command("merge")
@click.argument("models", nargs=-1)
@click.option("--method", type=click.Choice(["task-arithmetic", "ties"]), required=True,
              help="task-arithmetic: θ_pre + λ·Σ τ_t.  ties: trim, elect sign, disjoint mean, θ_pre + λ·τ.")
@click.option("--base", required=True, help="The pre-trained checkpoint the models were fine-tuned from.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ, the scale of the merged task vector.")
@click.option("--keep", type=float, default=0.2, show_default=True,
              help="ties: fraction of each task vector kept (largest magnitudes over the whole model).")
@click.option("--negate", multiple=True, metavar="CKPT",
              help="A fine-tuned model whose task vector is subtracted (forgetting); repeatable.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output checkpoint path.")
@output_options
@load_options
@report_options
def merge(models: tuple[str, ...], method: str, base: str, scale: float, keep: float, negate: tuple[str, ...],
          output: str, force: bool, fmt: str | None, ema: bool, precision: str, allow_nonfinite: bool,
          as_json: bool, quiet: bool) -> None:
    """Merge fine-tuned MODELS that share the pre-trained --base, streamed tensor by tensor."""
    from weightspace import merge as merging
    from weightspace import save
    sources = list(models) + list(negate)
    if not sources:
        raise click.UsageError("give at least one fine-tuned model (positionally or with --negate)")
    refuse_existing(output, force)
    options = {"keep": keep} if method == "ties" else {}
    if method != "ties" and keep != 0.2:
        note("--keep only applies to --method ties; ignored", quiet)
    stream = merging.merge(method, base, sources, scale=scale, negate=[False] * len(models) + [True] * len(negate),
                           precision=precision, allow_nonfinite=allow_nonfinite, progress=not quiet, ema=ema,
                           **options)
    path = save(stream, output, force=force, fmt=fmt)
    prov = stream.provenance
    result = {"output": str(path), "method": method, "scale": scale, "base": stream.ingredients[0].source,
              "models": [{"source": c.source, "sign": i["sign"]}
                         for c, i in zip(stream.ingredients[1:], prov["ingredients"][1:])]}
    if method == "ties":
        result.update(keep=prov["keep"], kept_per_task=prov["kept_per_task"], thresholds=prov["thresholds"])
    if as_json:
        print_json(result)
    else:
        click.echo(f"wrote {path} ({method} of {len(sources)} models on {base}, λ = {scale})")

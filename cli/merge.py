"""weightspace merge --method task-arithmetic|ties --base PRE FT... --scale λ -o OUT  |  ... --model M --val DATA"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options
from .evalargs import DEFAULT_SCALES, build_evaluator, model_options, require


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
@model_options
@click.option("--val", "val_spec", default=None, metavar="DATA",
              help="Pick λ from --scales by accuracy on DATA (needs --model); --scale is then ignored.")
@click.option("--scales", default=DEFAULT_SCALES, show_default=True, help="With --val: the grid of λ tried.")
@output_options
@load_options
@report_options
def merge(models: tuple[str, ...], method: str, base: str, scale: float, keep: float, negate: tuple[str, ...],
          output: str, force: bool, fmt: str | None, ema: bool, precision: str, allow_nonfinite: bool,
          as_json: bool, quiet: bool, model_spec: str | None = None, num_classes: int | None = None,
          in_chans: int | None = None, batch_size: int = 256, device: str = "auto", val_spec: str | None = None,
          scales: str = DEFAULT_SCALES) -> None:
    """Merge fine-tuned MODELS that share the pre-trained --base, streamed tensor by tensor."""
    from weightspace.ops import merge as merging
    from weightspace import save
    sources = list(models) + list(negate)
    if not sources:
        raise click.UsageError("give at least one fine-tuned model (positionally or with --negate)")
    refuse_existing(output, force)
    options = {"keep": keep} if method == "ties" else {}
    if method != "ties" and keep != 0.2:
        note("--keep only applies to --method ties; ignored", quiet)
    if model_spec or val_spec:
        require(model_spec, "--model", "to pick λ on --val")
        require(val_spec, "--val", "to pick λ (with --model)")
        return _search(method, base, models, negate, options, output, force, fmt, ema, precision, allow_nonfinite,
                       as_json, quiet, model_spec, num_classes, in_chans, batch_size, device, val_spec,
                       parse_floats(scales, "--scales"))
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


def _search(method, base, models, negate, options, output, force, fmt, ema, precision, allow_nonfinite, as_json,
            quiet, model_spec, num_classes, in_chans, batch_size, device, val_spec, grid) -> None:
    """λ picked from the grid by --val accuracy (merge.search_scale over one Evaluator), then saved."""
    from weightspace import load, save
    from weightspace.ops.merge import search_scale

    from .common import markdown_table
    ev = build_evaluator(model_spec, [val_spec], num_classes=num_classes, in_chans=in_chans, batch_size=batch_size,
                         device=device)
    sources = [load(m, ema=ema) for m in list(models) + list(negate)]
    res = search_scale(method, load(base, ema=ema), sources, evaluate=lambda sd: float(ev(sd)), grid=grid,
                       negate=[False] * len(models) + [True] * len(negate), precision=precision,
                       allow_nonfinite=allow_nonfinite, progress=not quiet, **options)
    path = save(res.state_dict, output, force=force, fmt=fmt, provenance={"val": val_spec})
    result = {"output": str(path), "method": method, "scale": res.scale, "val": val_spec,
              "scores": [{"scale": lam, "val_accuracy": acc} for lam, acc in res.scores],
              "base": base, "models": [c.source for c in sources]}
    if as_json:
        print_json(result)
        return
    if not quiet:
        click.echo(markdown_table(["λ", f"{val_spec} accuracy"], [[lam, acc] for lam, acc in res.scores]))
    click.echo(f"wrote {path} ({method} of {len(sources)} models on {base}, λ = {res.scale:g} picked on {val_spec})")

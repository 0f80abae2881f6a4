"""weightspace merge --method task-arithmetic|ties --base PRE FT... --scale λ -o OUT  |  ... --model M --val DATA
|  --config merge.yaml -o OUT (a mergekit file)"""
from __future__ import annotations

from typing import Any

import click

from .common import echo, batch_note, dtype_note, note, parse_floats, print_json, refuse_existing, report_options, require
from .options import (DataOptions, MergeOptions, ModelOptions, OpOptions, OutputOptions, RegistryChoice, force_option,
                      merge_method_names, op_options, use)

__all__ = ["merge"]


@click.command("merge")
@click.argument("models", nargs=-1)
@click.option("--config", "config", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="A mergekit YAML file (linear, task_arithmetic, ties) instead of --method/--base/MODELS.")
@click.option("--method", type=RegistryChoice(merge_method_names), default=None,
              help="task-arithmetic: θ_pre + λ·Σ τ_t.  ties: trim, elect sign, disjoint mean, θ_pre + λ·τ "
                   "(formulas, papers and defaults: `weightspace methods`).")
@use(MergeOptions, "merge_opts", help={"scales": "With --val: the grid of λ tried (--scale is then ignored)."})
@click.option("--density", type=float, default=None,
              help="ties: fraction kept of every tensor separately, as mergekit's density (instead of --keep).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ, the scale of the merged task vector.")
@click.option("--negate", multiple=True, metavar="CKPT",
              help="A fine-tuned model whose task vector is subtracted (forgetting); repeatable.")
@use(OutputOptions, "out", required=("output",))
@use(ModelOptions, "model")
@use(DataOptions, "data", only=("val", "transform"),
     help={"val": "Selection data: pick λ from --scales by accuracy on DATA (needs --model); --scale is then ignored."})
@force_option("Overwrite an existing output file.")
@op_options
@report_options
def merge(models: tuple[str, ...], config: str | None, method: str | None, merge_opts: MergeOptions,
          density: float | None, scale: float, negate: tuple[str, ...],
          out: OutputOptions, model: ModelOptions, data: DataOptions, force: bool, ops: OpOptions,
          as_json: bool, quiet: bool) -> None:
    """Merge fine-tuned MODELS that share the pre-trained --base, streamed tensor by tensor."""
    base, keep, scales = merge_opts.base, merge_opts.keep, merge_opts.scales
    if ops.buffers == "recalibrate":
        raise click.UsageError("--buffers recalibrate: merge has no data to re-estimate statistics on; write the "
                               "merge with --buffers mean (or first) and give it to soup or interpolate with "
                               "--recalibrate-bn DATA")
    from weightspace.ops import merge as merging
    from weightspace import save
    if config:
        given = [o for o, v in (("MODELS", models), ("--method", method), ("--base", base), ("--negate", negate),
                                ("--keep", keep), ("--density", density), ("--val", data.val)) if v]
        if given:
            raise click.UsageError(f"--config describes the whole merge; drop {given[0]}")
        refuse_existing(out.output, force)
        return _from_config(config, out, force, ops, as_json, quiet)
    method = require(method, "--method", "(or --config FILE)")
    base = require(base, "--base", "(the pre-trained checkpoint the models were fine-tuned from)")
    sources = list(models) + list(negate)
    if not sources:
        raise click.UsageError("give at least one fine-tuned model (positionally or with --negate)")
    refuse_existing(out.output, force)
    if keep is not None and density is not None:
        raise click.UsageError("--keep (global top-k) and --density (per tensor) are two TIES trims: give one")
    options: dict[str, Any] = {}
    if method == "ties":
        options = {"density": density} if density is not None else ({"keep": keep} if keep is not None else {})
    elif keep is not None or density is not None:
        note("--keep/--density only apply to --method ties; ignored", quiet)
    if model.model or data.val:
        require(model.model, "--model", "to pick λ on --val")
        require(data.val, "--val", "to pick λ (with --model)")
        return _search(method, base, models, negate, options, out, force, ops, as_json, quiet, model, data,
                       parse_floats(scales, "--scales"))
    stream = merging.merge(method, base, sources, scale=scale, negate=[False] * len(models) + [True] * len(negate),
                           progress=not quiet, device=model.device, **ops.kwargs(), **options)
    path = save(stream, out.target(), force=force, **out.save_kwargs())
    dtype_note(stream, out.dtype, quiet)
    prov = stream.provenance
    result = {"output": str(path), "method": method, "scale": scale, "base": stream.ingredients[0].source,
              "models": [{"source": c.source, "sign": i["sign"]}
                         for c, i in zip(stream.ingredients[1:], prov["ingredients"][1:])]}
    if method == "ties":
        result["trim"] = prov["trim"]
        result.update({k: prov[k] for k in ("keep", "kept_per_task", "thresholds", "density") if k in prov})
    if as_json:
        print_json(result)
    else:
        trim = f", {_trim(prov)}" if method == "ties" else ""
        echo(f"wrote {path} ({method} of {len(sources)} models on {base}, λ = {scale}{trim})")


def _trim(prov: dict) -> str:
    """Which TIES trim a run used, in words."""
    if prov.get("trim") == "per-tensor":
        return "trimmed per tensor to density " + ", ".join(f"{d:g}" for d in sorted(set(prov["density"])))
    return f"trimmed to the top {prov['keep']:g} of each task vector over the whole model"


def _from_config(config, out: OutputOptions, force, ops: OpOptions, as_json, quiet) -> None:
    """A mergekit YAML merge, streamed and saved (its out_dtype unless --dtype says otherwise)."""
    from weightspace import save
    from weightspace.ops.mergekit import merge_from_config, read_mergekit_config
    cfg = read_mergekit_config(config)
    for line in cfg.notes:
        note(f"{config}: {line}", quiet)
    stream = merge_from_config(cfg, progress=not quiet, allow_nonfinite=ops.allow_nonfinite, buffers=ops.buffer_policy())
    kwargs = out.save_kwargs()
    kwargs["dtype"] = kwargs["dtype"] or cfg.out_dtype
    path = save(stream, out.target(), force=force, **kwargs)
    dtype_note(stream, kwargs["dtype"], quiet)
    prov = stream.provenance
    result = {"output": str(path), "config": config, "merge_method": cfg.method, "base": cfg.base,
              "models": cfg.models, "weights": cfg.weights, "normalize": cfg.normalize, "scale": cfg.scale,
              "precision": cfg.precision, "dtype": kwargs["dtype"]}
    if cfg.method == "ties":
        result.update(trim=prov["trim"], density=prov["density"])
    if as_json:
        print_json(result)
    else:
        what = f", {_trim(prov)}" if cfg.method == "ties" else ""
        echo(f"wrote {path} ({cfg.method} of {len(cfg.models)} models from {config}{what})")


def _search(method, base, models, negate, options, out: OutputOptions, force, ops: OpOptions, as_json, quiet,
            model: ModelOptions, data: DataOptions, grid) -> None:
    from weightspace import load, save
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.search.scale import search_scale

    from .common import markdown_table
    val_spec = require(data.val, "--val", "to pick λ (with --model)")
    ev = build_evaluator(model, [val_spec], transform=data_transform(data), checkpoint=base)
    batch_note(ev, quiet)
    sources = [load(m, ema=ops.ema) for m in list(models) + list(negate)]
    res = search_scale(method, load(base, ema=ops.ema), sources, evaluate=lambda sd: float(ev(sd)), grid=grid,
                       negate=[False] * len(models) + [True] * len(negate), precision=ops.precision,
                       allow_nonfinite=ops.allow_nonfinite, progress=not quiet, buffers=ops.buffer_policy(),
                       **options)
    path = save(res.weights, out.target(), force=force, **out.save_kwargs(), provenance={"val": val_spec})
    rec = res.record
    result = {"output": str(path), "method": method, "scale": rec.scale, "val": val_spec,
              "scores": [{"scale": lam, "val_accuracy": acc} for lam, acc in rec.scores],
              "base": base, "models": [c.source for c in sources]}
    if as_json:
        print_json(result)
        return
    if not quiet:
        echo(markdown_table(["λ", f"{val_spec} accuracy"], [[lam, acc] for lam, acc in rec.scores]))
    echo(f"wrote {path} ({method} of {len(sources)} models on {base}, λ = {rec.scale:g} picked on {val_spec})")

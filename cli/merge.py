"""weightspace merge --method NAME --base PRE FT... [--param KEY=VALUE ...] --scale λ -o OUT  |  ... --model M --val
DATA [--grid V,...] [--out DIR]  |  --config merge.yaml -o OUT (a mergekit file)"""
from __future__ import annotations

from typing import Any

import click

from .common import batch_note, dtype_note, echo, note, parse_floats, print_json, refuse_existing, report_options, require
from .options import (DataOptions, MergeOptions, ModelOptions, OpOptions, OutputOptions, RegistryChoice, force_option,
                      merge_method_names, op_options, report_folder, use)

__all__ = ["merge"]


@click.command("merge")
@click.argument("models", nargs=-1)
@click.option("--config", "config", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="A mergekit YAML file (merge_method: any method below, mergekit's parameter names) instead of "
                   "--method/--base/MODELS.")
@click.option("--method", type=RegistryChoice(merge_method_names), default=None,
              help="A registered merge method (formulas, papers and defaults: `weightspace methods --family merge`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A method option, e.g. t=0.3, density=0.5, gamma=0.01, seed=1, normalize=true (repeatable; "
                   "values read as YAML).")
@click.option("--grid", default=None, metavar="V1,V2,...",
              help="With --val: the values of the method's tuned hyperparameter tried (density, select_topk or t; "
                   "λ's grid is --scales). Default: the method's grid (docs/merge.md).")
@use(MergeOptions, "merge_opts", help={"scales": "With --val: the grid of λ tried (--scale is then ignored)."})
@click.option("--density", type=float, default=None,
              help="Fraction kept of every tensor separately, as mergekit's density (ties instead of --keep; "
                   "breadcrumbs, dare-*, della*: as --param density=D).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ, the scale of the merged task vector.")
@click.option("--negate", multiple=True, metavar="CKPT",
              help="A fine-tuned model whose task vector is subtracted (forgetting); repeatable.")
@use(OutputOptions, "out", required=("output",))
@use(ModelOptions, "model")
@use(DataOptions, "data", only=("val", "data", "train", "transform"),
     help={"val": "Selection data: tune the method's main hyperparameter (λ from --scales, or --grid) by accuracy on "
                  "DATA (needs --model); --scale is then ignored.",
           "train": "fisher, regmean: the data their Fisher or Gram matrices are computed on (needs --model).",
           "data": "With --val: evaluation data, one column each for the chosen merge (repeat)."})
@report_folder("With --val: folder for results.json, curve.csv and curve.png (score against the tuned "
               "hyperparameter).")
@force_option("Overwrite an existing output file.")
@op_options
@report_options
def merge(models: tuple[str, ...], config: str | None, method: str | None, params: tuple[str, ...],
          grid: str | None, merge_opts: MergeOptions, density: float | None, scale: float, negate: tuple[str, ...],
          out: OutputOptions, model: ModelOptions, data: DataOptions, out_dir: str | None, force: bool,
          ops: OpOptions, as_json: bool, quiet: bool) -> None:
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
                                ("--keep", keep), ("--density", density), ("--val", data.val), ("--param", params),
                                ("--grid", grid)) if v]
        if given:
            raise click.UsageError(f"--config describes the whole merge; drop {given[0]}")
        refuse_existing(out.output, force)
        return _from_config(config, out, force, ops, as_json, quiet)
    method = require(method, "--method", "(or --config FILE)")
    if method in ("fisher", "regmean"):
        return _data_merge(method, models, base, negate, parse_params(params), out, model, data, force, as_json, quiet)
    if data.train:
        raise click.UsageError("--train applies to --method fisher and regmean")
    if data.data and not data.val:
        raise click.UsageError("--data adds evaluation columns to a merge tuned on --val: it needs --model and --val")
    base = require(base, "--base", "(the pre-trained checkpoint the models were fine-tuned from)")
    sources = list(models) + list(negate)
    if not sources:
        raise click.UsageError("give at least one fine-tuned model (positionally or with --negate)")
    refuse_existing(out.output, force)
    if keep is not None and density is not None:
        raise click.UsageError("--keep (global top-k) and --density (per tensor) are two TIES trims: give one")
    options: dict[str, Any] = parse_params(params)
    if keep is not None:
        if method != "ties":
            raise click.UsageError("--keep applies to --method ties (a global top-k); others take --param density=D")
        options["keep"] = keep
    if density is not None:
        options["density"] = density
    if out_dir and not data.val:
        raise click.UsageError("--out DIR holds the tuning curve: it needs --model and --val")
    if model.model or data.val:
        require(model.model, "--model", "to tune the merge on --val")
        require(data.val, "--val", "to tune the merge (with --model)")
        return _search(method, base, models, negate, options, out, force, ops, as_json, quiet, model, data,
                       scales, grid, out_dir)
    stream = merging.merge(method, base, sources, scale=scale, negate=[False] * len(models) + [True] * len(negate),
                           progress=not quiet, device=model.device, **ops.kwargs(), **options)
    path = save(stream, out.target(), force=force, **out.save_kwargs())
    dtype_note(stream, out.dtype, quiet)
    prov = stream.provenance
    result = {"output": str(path), "method": prov["method"], "scale": scale, "base": stream.ingredients[0].source,
              "models": [{"source": c.source, "sign": i["sign"]}
                         for c, i in zip(stream.ingredients[1:], prov["ingredients"][1:])], "options": options}
    if prov["method"] == "ties":
        result["trim"] = prov["trim"]
        result.update({k: prov[k] for k in ("keep", "kept_per_task", "thresholds", "density") if k in prov})
    if as_json:
        print_json(result)
    else:
        trim = f", {_trim(prov)}" if prov["method"] == "ties" else "".join(f", {k}={v}" for k, v in options.items())
        echo(f"wrote {path} ({method} of {len(sources)} model{'s' if len(sources) != 1 else ''} on {base}, λ = {scale}{trim})")


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


def _data_merge(method, models, base, negate, options, out: OutputOptions, model: ModelOptions, data: DataOptions,
                force, as_json, quiet) -> None:
    """Fisher merging or RegMean of MODELS with --model on --train data (--val when no --train is given)."""
    from weightspace import save
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.search.tune import data_merge
    if base or negate:
        raise click.UsageError(f"{method} merges MODELS themselves: drop --base/--negate")
    if len(models) < 1:
        raise click.UsageError("give at least one model")
    require(model.model, "--model", f"for {method} (the architecture its data runs through)")
    spec = require(data.train or data.val, "--train", f"for {method} (the data of its statistics)")
    ev = build_evaluator(model, [spec], transform=data_transform(data))
    sd = data_merge(method, models, ev.model, ev.datasets[spec], **options)
    path = save(sd, out.target(), force=force, **out.save_kwargs())
    result = {"output": str(path), "method": method, "models": list(models), "data": spec, "options": options}
    if as_json:
        print_json(result)
    else:
        echo(f"wrote {path} ({method} of {len(models)} models, statistics on {spec})")


def parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    """--param KEY=VALUE pairs as a dict, each value read as YAML (numbers, true/false, lists)."""
    import yaml
    out: dict[str, Any] = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{p!r}: expected KEY=VALUE", param_hint="--param")
        try:
            v = yaml.safe_load(value)
        except yaml.YAMLError:
            raise click.BadParameter(f"{p!r}: the value is not readable", param_hint="--param") from None
        if isinstance(v, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                v = float(v)
            except ValueError:
                pass
        out[key.strip().replace("-", "_")] = v
    return out


def _search(method, base, models, negate, options, out: OutputOptions, force, ops: OpOptions, as_json, quiet,
            model: ModelOptions, data: DataOptions, scales: str, grid: str | None, out_dir: str | None) -> None:
    """Tune the method's main hyperparameter on --val, save the best merge, report the curve."""
    from weightspace import load, save
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.eval.contract import as_table
    from weightspace.report import check_outputs
    from weightspace.search.tune import MergeTuning, tune_merge, tuned_parameter

    from .common import markdown_table
    val_spec = require(data.val, "--val", "to tune the merge (with --model)")
    param = tuned_parameter(method)
    values = parse_floats(scales, "--scales") if param == "scale" else (
        parse_floats(grid, "--grid") if grid is not None else None)
    if out_dir:
        check_outputs(out_dir, MergeTuning.FILES, force)
    ev = build_evaluator(model, [val_spec, *data.data], transform=data_transform(data), checkpoint=base)
    batch_note(ev, quiet)
    val_ev = ev.derive(datasets=[val_spec], keep_logits=False) if data.data else ev
    sources = [load(m, ema=ops.ema) for m in list(models) + list(negate)]
    weights, rec = tune_merge(method, load(base, ema=ops.ema), sources, evaluate=lambda sd: float(val_ev(sd)),
                              grid=values, negate=[False] * len(models) + [True] * len(negate),
                              precision=ops.precision, allow_nonfinite=ops.allow_nonfinite, progress=not quiet,
                              buffers=ops.buffer_policy(), **options)
    path = save(weights, out.target(), force=force, **out.save_kwargs(), provenance={"val": val_spec})
    result = {"output": str(path), "method": method, "parameter": param, param: rec.value, "val": val_spec,
              "scores": [{param: v, "val_accuracy": acc} for v, acc in rec.scores], "options": rec.options,
              "base": base, "models": [c.source for c in sources]}
    if data.data:
        result["metrics"] = as_table(ev(weights))
    files = {k: str(v) for k, v in rec.write(out_dir, force=force, extra={"output": str(path), "val": val_spec}).items()} \
        if out_dir else {}
    if as_json:
        print_json({**result, "files": files})
        return
    if not quiet:
        label = "λ" if param == "scale" else param
        echo(markdown_table([label, f"{val_spec} accuracy"], [[v, acc] for v, acc in rec.scores]))
    label = "λ" if param == "scale" else param
    echo(f"wrote {path} ({method} of {len(sources)} model{'s' if len(sources) != 1 else ''} on {base}, "
               f"{label} = {rec.value:g} picked on {val_spec})")
    for f in files.values():
        echo(f"wrote {f}")

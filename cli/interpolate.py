"""weightspace interpolate A B --alpha X -o OUT  |  A B --model M --data DATA [--steps K | --alphas ...] --out DIR"""
from __future__ import annotations

import click

from .common import echo, batch_note, dtype_note, note, parse_floats, print_json, report_options, require
from .options import (DataOptions, FixOptions, ModelOptions, OpOptions, OutputOptions, force_option, op_options,
                      output_options, report_folder, use)

__all__ = ["interpolate"]


@click.command("interpolate")
@click.argument("checkpoints", nargs=-1, metavar="[A B]")
@click.option("--alpha", type=float, default=None, help="Write one point: the checkpoint (1−α)·A + α·B (needs -o).")
@use(ModelOptions, "model")
@use(DataOptions, "data", only=("data", "transform"),
     help={"data": "Evaluation data (repeat for several): digits:test, mnist1d:test, x.pt/.npz, an image folder."})
@click.option("--steps", type=click.IntRange(min=2), default=11, show_default=True, help="Evenly spaced α in [0, 1].")
@click.option("--alphas", default=None, help="Comma-separated α values instead of --steps (0 and 1 are always added).")
@click.option("--pair", "pairs", nargs=2, multiple=True, metavar="A B", help="Another pair to overlay (repeatable).")
@use(FixOptions, "fix",
     help={"recalibrate_bn": "Re-estimate BatchNorm statistics on DATA at every α before evaluating.",
           "repair": "REPAIR at every α: rescale each channel so its activation mean/std on DATA is the ends' "
                     "interpolation (docs/repair.md)."})
@click.option("--align", "align_b", is_flag=True,
              help="Also draw A–P(B), B permuted to match A (Git Re-Basin): the barrier before and after alignment.")
@click.option("--align-method", type=click.Choice(["weights", "activations"]), default=None,
              help="With --align: weight or activation matching (default: activations when --align-data is given).")
@click.option("--align-data", "align_spec", default=None, metavar="DATA",
              help="With --align: inputs for activation matching (default: the --recalibrate-bn, else --repair data).")
@output_options
@report_folder("Folder for curve.json, curve.csv, barriers.csv and curve.png (a point's weights go to -o).")
@force_option()
@op_options
@report_options
def interpolate(checkpoints: tuple[str, ...], alpha: float | None, model: ModelOptions, data: DataOptions,
                steps: int, alphas: str | None, pairs: tuple[tuple[str, str], ...], fix: FixOptions, align_b: bool, align_method: str | None, align_spec: str | None,
                out: OutputOptions, out_dir: str | None, force: bool, ops: OpOptions, as_json: bool,
                quiet: bool) -> None:
    """Interpolate A and B: write one point (--alpha X -o OUT), or measure a barrier curve on data.

    Curve mode evaluates (1−α)·A + α·B at each α with one model instance (weights copied in place, data held
    on the device), reports accuracy and loss per dataset, and barrier heights for error and loss (chord, and
    peak over the ends' mean). --pair C D overlays more pairs on the same plot. --align adds, for every pair,
    the curve from A to B permuted to match A; results.json in --out then compares both barriers.
    """
    ops.check_buffers(fix.recalibrate_bn, "interpolate")
    if len(checkpoints) not in (0, 2):
        raise click.UsageError(f"expected two checkpoints A B, got {len(checkpoints)}")
    if alpha is not None:
        if len(checkpoints) != 2 or pairs or model.model or data.data:
            raise click.UsageError("--alpha writes one checkpoint from exactly A B; drop --model/--data/--pair")
        require(out.output, "-o/--output", "with --alpha")
        return _point(checkpoints[0], checkpoints[1], alpha, out, force, ops, as_json, quiet, device=model.device)
    if out.output:
        raise click.UsageError("-o/--output writes one point: give --alpha (curve mode writes to --out)")
    require(model.model, "--model", "for a barrier curve (or give --alpha X -o OUT for one point)")
    require(data.data, "--data", "for a barrier curve")
    all_pairs = ([tuple(checkpoints)] if checkpoints else []) + [tuple(p) for p in pairs]
    if not all_pairs:
        raise click.UsageError("give A B or at least one --pair A B")
    if (align_method or align_spec) and not align_b:
        raise click.UsageError("--align-method/--align-data apply to --align")
    if align_b:
        align_method = align_method or ("activations" if align_spec else "weights")
        if align_method == "activations":
            align_spec = align_spec or fix.recalibrate_bn or fix.repair
        if align_method == "activations" and not align_spec:
            raise click.UsageError("--align-method activations needs --align-data (or --recalibrate-bn/--repair data)")
    _curves(all_pairs, model, data, steps, alphas, fix.recalibrate_bn, fix.repair, align_method if align_b else None,
            align_spec if align_b else None, out_dir, force, ops, as_json, quiet)


def _point(a, b, alpha, out: OutputOptions, force, ops: OpOptions, as_json, quiet, device="auto") -> None:
    from weightspace import save
    from weightspace.ops.stream import lerp_stream
    stream = lerp_stream(a, b, alpha, progress=not quiet, device=device, **ops.kwargs())
    path = save(stream, out.target(), force=force, **out.save_kwargs())
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; interpolated once, written as a copy", quiet)
    dtype_note(stream, out.dtype, quiet)
    if as_json:
        print_json({"output": str(path), "alpha": alpha, "a": a, "b": b})
    else:
        echo(f"wrote {path} ((1−{alpha})·A + {alpha}·B)")


def _curves(pairs, model: ModelOptions, data: DataOptions, steps, alphas, recal_spec, repair_spec, align_method,
            align_spec, out_dir, force, ops: OpOptions, as_json, quiet) -> None:
    from pathlib import Path

    from weightspace.analysis.curve import barrier_table
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.eval.data import load_data
    from weightspace.analysis.barriers import barrier_curves
    from weightspace.analysis.curve import CurveSet
    from weightspace.report import check_outputs, jsonable, markdown_table, write_json
    if out_dir:
        check_outputs(out_dir, CurveSet.FILES + (("results.json",) if align_method else ()), force)
    grid = parse_floats(alphas, "--alphas") if alphas else None
    transform = data_transform(data)
    ev = build_evaluator(model, list(data.data), transform=transform, checkpoint=pairs[0][0])
    batch_note(ev, quiet)
    fix = {k: load_data(s, model=ev.model, transform=transform) if s else None
           for k, s in (("recalibrate_bn", recal_spec), ("repair", repair_spec), ("align_data", align_spec))}
    cmp = barrier_curves(pairs, ev, steps=steps, alphas=grid, align_method=align_method, ops=ops,
                         progress=not quiet, log=lambda m: note(m, quiet), **fix)
    curves = cmp.curves
    alignment = [{**{k: e[k] for k in ("a", "b", "method")}, "align_data": align_spec, **e} for e in cmp.alignment]
    results = {"command": "interpolate", "model": model.model, "data": list(data.data), "recalibrate_bn": recal_spec}
    if repair_spec:
        results["repair"] = repair_spec
    if align_method:
        results["alignment"] = alignment
    paths = ({k: str(v) for k, v in CurveSet(curves).write(out_dir, force=force, extra=results).items()}
             if out_dir else {})
    if out_dir and align_method:
        paths["results"] = str(write_json(Path(out_dir) / "results.json", jsonable(results), force=force))
    if as_json:
        print_json(jsonable({**results, "curves": [c.to_dict() for c in curves], "files": paths}))
        return
    for c in curves:
        headers = ["alpha"] + [f"{ds} {m}" for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
        rows = [[alpha] + [c.metrics[i][ds][m] for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
                for i, alpha in enumerate(c.alphas)]
        echo(f"## {c.label}\n\n" + markdown_table(headers, rows) + "\n")
    echo("## barrier heights\n\n" + markdown_table(*barrier_table(curves)))
    for entry in alignment:
        ds = next(iter(entry["before"]))
        before, after = entry["before"][ds]["error"]["chord"], entry["after"][ds]["error"]["chord"]
        echo(f"\nalignment ({entry['method']} matching): error barrier on {ds} {before:.4f} → {after:.4f} "
                   f"(‖A−B‖ {entry['l2_before']:.4g} → ‖A−P(B)‖ {entry['l2_after']:.4g})")
    for p in paths.values():
        echo(f"wrote {p}")

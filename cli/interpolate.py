"""weightspace interpolate A B --alpha X -o OUT  |  A B --model M --data DATA [--steps K | --alphas ...] --out DIR"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options
from .evalargs import build_evaluator, load_eval_data, model_options, require


@click.command("interpolate")
@click.argument("checkpoints", nargs=-1, metavar="[A B]")
@click.option("--alpha", type=float, default=None, help="Write one point: the checkpoint (1−α)·A + α·B (needs -o).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Output checkpoint path (--alpha).")
@model_options
@click.option("--data", "data_specs", multiple=True, metavar="DATA",
              help="Evaluation data (repeat for several): digits:test, mnist1d:test, x.pt/.npz, an image folder.")
@click.option("--steps", type=click.IntRange(min=2), default=11, show_default=True, help="Evenly spaced α in [0, 1].")
@click.option("--alphas", default=None, help="Comma-separated α values instead of --steps (0 and 1 are always added).")
@click.option("--pair", "pairs", nargs=2, multiple=True, metavar="A B", help="Another pair to overlay (repeatable).")
@click.option("--recalibrate-bn", "recal_spec", default=None, metavar="DATA",
              help="Re-estimate BatchNorm statistics on DATA at every α before evaluating.")
@click.option("--repair", "repair_spec", default=None, metavar="DATA",
              help="REPAIR at every α: rescale each channel so its activation mean/std on DATA is the ends' "
                   "interpolation (docs/repair.md).")
@click.option("--align", "align_b", is_flag=True,
              help="Also draw A–P(B), B permuted to match A (Git Re-Basin): the barrier before and after alignment.")
@click.option("--align-method", type=click.Choice(["weights", "activations"]), default=None,
              help="With --align: weight or activation matching (default: activations when --align-data is given).")
@click.option("--align-data", "align_spec", default=None, metavar="DATA",
              help="With --align: inputs for activation matching (default: the --recalibrate-bn, else --repair data).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for curve.json, curve.csv, barriers.csv and curve.png.")
@output_options
@load_options
@report_options
def interpolate(checkpoints: tuple[str, ...], alpha: float | None, output: str | None, model_spec: str | None,
                num_classes: int | None, in_chans: int | None, batch_size: int, device: str,
                data_specs: tuple[str, ...], steps: int, alphas: str | None, pairs: tuple[tuple[str, str], ...],
                recal_spec: str | None, repair_spec: str | None, align_b: bool, align_method: str | None,
                align_spec: str | None, out_dir: str | None, force: bool, fmt: str | None, ema: bool, precision: str,
                allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Interpolate A and B: write one point (--alpha X -o OUT), or measure a barrier curve on data.

    Curve mode evaluates (1−α)·A + α·B at each α with one model instance (weights copied in place, data held
    on the device), reports accuracy and loss per dataset, and barrier heights for error and loss (chord and
    midpoint-mean conventions). --pair C D overlays more pairs on the same plot. --align adds, for every pair,
    the curve from A to B permuted to match A; results.json in --out then compares both barriers.
    """
    if len(checkpoints) not in (0, 2):
        raise click.UsageError(f"expected two checkpoints A B, got {len(checkpoints)}")
    if alpha is not None:
        if len(checkpoints) != 2 or pairs or model_spec or data_specs:
            raise click.UsageError("--alpha writes one checkpoint from exactly A B; drop --model/--data/--pair")
        require(output, "-o/--output", "with --alpha")
        return _point(checkpoints[0], checkpoints[1], alpha, output, force, fmt, ema, precision, allow_nonfinite,
                      as_json, quiet)
    if output:
        raise click.UsageError("-o/--output writes one point: give --alpha (curve mode writes to --out)")
    require(model_spec, "--model", "for a barrier curve (or give --alpha X -o OUT for one point)")
    require(data_specs, "--data", "for a barrier curve")
    all_pairs = ([tuple(checkpoints)] if checkpoints else []) + [tuple(p) for p in pairs]
    if not all_pairs:
        raise click.UsageError("give A B or at least one --pair A B")
    if (align_method or align_spec) and not align_b:
        raise click.UsageError("--align-method/--align-data apply to --align")
    fixes = {"repair_spec": repair_spec}
    if align_b:
        align_method = align_method or ("activations" if align_spec else "weights")
        if align_method == "activations":
            align_spec = align_spec or recal_spec or repair_spec
        if align_method == "activations" and not align_spec:
            raise click.UsageError("--align-method activations needs --align-data (or --recalibrate-bn/--repair data)")
        fixes.update(align_method=align_method, align_spec=align_spec)
    _curves(all_pairs, model_spec, num_classes, in_chans, batch_size, device, data_specs, steps, alphas, recal_spec,
            out_dir, force, ema, precision, as_json, quiet, **fixes)


def _point(a, b, alpha, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet) -> None:
    from weightspace import save
    from weightspace.ops import stream as ops
    stream = ops.lerp_stream(a, b, alpha, precision=precision, allow_nonfinite=allow_nonfinite,
                             progress=not quiet, ema=ema)
    path = save(stream, output, force=force, fmt=fmt)
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; interpolated once, written as a copy", quiet)
    if as_json:
        print_json({"output": str(path), "alpha": alpha, "a": a, "b": b})
    else:
        click.echo(f"wrote {path} ((1−{alpha})·A + {alpha}·B)")


def _curves(pairs, model_spec, num_classes, in_chans, batch_size, device, data_specs, steps, alphas, recal_spec,
            out_dir, force, ema, precision, as_json, quiet, repair_spec=None, align_method=None, align_spec=None) -> None:
    from weightspace import load
    from weightspace.analysis.curve import barrier_table, interpolation_curve
    from weightspace.io.sources import short_name
    from weightspace.analysis.curve import CURVE_FILES, write_curves
    from weightspace.report import check_outputs, jsonable, markdown_table
    if out_dir:
        check_outputs(out_dir, CURVE_FILES + (("results.json",) if align_method else ()), force)
    grid = parse_floats(alphas, "--alphas") if alphas else None
    ev = build_evaluator(model_spec, list(data_specs), num_classes=num_classes, in_chans=in_chans,
                         batch_size=batch_size, device=device)
    recal = load_eval_data(recal_spec, ev.model) if recal_spec else None
    repair = load_eval_data(repair_spec, ev.model) if repair_spec else None
    curves, alignment = [], []
    for a, b in pairs:
        ca, cb = load(a, ema=ema), load(b, ema=ema)
        todo = [(cb, None)]
        if align_method:
            pb, info = _aligned(ca, cb, ev.model, align_method, align_spec, quiet)
            todo.append((pb, f"{short_name(ca.source)}–P({short_name(cb.source)})"))
        for b_, label in todo:
            curves.append(interpolation_curve(ca, b_, ev, steps=steps, alphas=grid, recalibrate_bn=recal,
                                              repair=repair, label=label, progress=not quiet, precision=precision))
            note(f"{curves[-1].label}: {len(curves[-1].alphas)} points in {curves[-1].seconds:.2f} s", quiet)
        if align_method:
            alignment.append({"a": ca.source, "b": cb.source, "method": align_method, "align_data": align_spec,
                              "l2_before": info["l2_before"], "l2_after": info["l2_after"],
                              "before": curves[-2].barriers, "after": curves[-1].barriers,
                              "labels": [curves[-2].label, curves[-1].label]})
    results = {"command": "interpolate", "model": model_spec, "data": list(data_specs), "recalibrate_bn": recal_spec}
    if repair_spec:
        results["repair"] = repair_spec
    if align_method:
        results["alignment"] = alignment
    paths = write_curves(curves, out_dir, results, force=force) if out_dir else {}
    if out_dir and align_method:
        from pathlib import Path

        from weightspace.report import write_json
        paths["results"] = str(write_json(Path(out_dir) / "results.json", jsonable(results), force=force))
    if as_json:
        print_json(jsonable({**results, "curves": [c.to_dict() for c in curves], "files": paths}))
        return
    for c in curves:
        headers = ["alpha"] + [f"{ds} {m}" for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
        rows = [[alpha] + [c.metrics[i][ds][m] for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
                for i, alpha in enumerate(c.alphas)]
        click.echo(f"## {c.label}\n\n" + markdown_table(headers, rows) + "\n")
    click.echo("## barrier heights\n\n" + markdown_table(*barrier_table(curves)))
    for entry in alignment:
        ds = next(iter(entry["before"]))
        before, after = entry["before"][ds]["error"]["chord"], entry["after"][ds]["error"]["chord"]
        click.echo(f"\nalignment ({entry['method']} matching): error barrier on {ds} {before:.4f} → {after:.4f} "
                   f"(‖A−B‖ {entry['l2_before']:.4g} → ‖A−P(B)‖ {entry['l2_after']:.4g})")
    for p in paths.values():
        click.echo(f"wrote {p}")


def _aligned(ca, cb, model, method, align_spec, quiet):
    """B permuted to match A (on a CPU copy of the evaluation model), and align's info."""
    import copy

    from weightspace.search.align import align
    data = load_eval_data(align_spec, model) if align_spec else None
    net = copy.deepcopy(model).cpu()
    pb, info = align(ca, cb, net, method=method, data=data, progress=not quiet)
    note(f"aligned {cb.source} to {ca.source} ({method} matching): ‖A−B‖ {info['l2_before']:.4g} → "
         f"‖A−P(B)‖ {info['l2_after']:.4g}", quiet)
    return pb, info

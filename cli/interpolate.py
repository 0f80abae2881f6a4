"""weightspace interpolate A B --alpha X -o OUT  |  A B --model M --data DATA [--steps K | --alphas ...] --out DIR"""
from __future__ import annotations

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options
from .evalargs import build_evaluator, model_options, require


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
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for curve.json, curve.csv, barriers.csv and curve.png.")
@output_options
@load_options
@report_options
def interpolate(checkpoints: tuple[str, ...], alpha: float | None, output: str | None, model_spec: str | None,
                num_classes: int | None, in_chans: int | None, batch_size: int, device: str,
                data_specs: tuple[str, ...], steps: int, alphas: str | None, pairs: tuple[tuple[str, str], ...],
                recal_spec: str | None, out_dir: str | None, force: bool, fmt: str | None, ema: bool, precision: str,
                allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Interpolate A and B: write one point (--alpha X -o OUT), or measure a barrier curve on data.

    Curve mode evaluates (1−α)·A + α·B at each α with one model instance (weights copied in place, data held
    on the device), reports accuracy and loss per dataset, and barrier heights for error and loss (chord and
    midpoint-mean conventions). --pair C D overlays more pairs on the same plot.
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
    _curves(all_pairs, model_spec, num_classes, in_chans, batch_size, device, data_specs, steps, alphas, recal_spec,
            out_dir, force, ema, precision, as_json, quiet)


def _point(a, b, alpha, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet) -> None:
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


def _curves(pairs, model_spec, num_classes, in_chans, batch_size, device, data_specs, steps, alphas, recal_spec,
            out_dir, force, ema, precision, as_json, quiet) -> None:
    from weightspace import load
    from weightspace.data import load_data
    from weightspace.interpolate import barrier_table, interpolation_curve
    from weightspace.report import CURVE_FILES, check_outputs, jsonable, markdown_table, write_curves
    if out_dir:
        check_outputs(out_dir, CURVE_FILES, force)
    grid = parse_floats(alphas, "--alphas") if alphas else None
    ev = build_evaluator(model_spec, list(data_specs), num_classes=num_classes, in_chans=in_chans,
                         batch_size=batch_size, device=device)
    recal = load_data(recal_spec, model=ev.model) if recal_spec else None
    curves = []
    for a, b in pairs:
        curves.append(interpolation_curve(load(a, ema=ema), load(b, ema=ema), ev, steps=steps, alphas=grid,
                                          recalibrate_bn=recal, progress=not quiet, precision=precision))
        note(f"{curves[-1].label}: {len(curves[-1].alphas)} points in {curves[-1].seconds:.2f} s", quiet)
    results = {"command": "interpolate", "model": model_spec, "data": list(data_specs), "recalibrate_bn": recal_spec}
    paths = write_curves(curves, out_dir, results, force=force) if out_dir else {}
    if as_json:
        print_json(jsonable({**results, "curves": [c.to_dict() for c in curves], "files": paths}))
        return
    for c in curves:
        headers = ["alpha"] + [f"{ds} {m}" for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
        rows = [[alpha] + [c.metrics[i][ds][m] for ds in c.datasets for m in ("accuracy", "loss") if c.has(ds, m)]
                for i, alpha in enumerate(c.alphas)]
        click.echo(f"## {c.label}\n\n" + markdown_table(headers, rows) + "\n")
    click.echo("## barrier heights\n\n" + markdown_table(*barrier_table(curves)))
    for p in paths.values():
        click.echo(f"wrote {p}")

"""weightspace criticality FINAL --init INIT --model M --data TRAIN_DATA [--epsilon 0.1]"""
from __future__ import annotations

import click

from .common import report_options
from .evalargs import model_options, out_options


@click.command("criticality")
@click.argument("final")
@click.option("--init", "init", required=True, metavar="CKPT", help="The checkpoint FINAL was trained from (θ⁰).")
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="TRAINING data: the definition bounds the training error.")
@click.option("--modules", "grouping", default=None, metavar="SPEC",
              help="tree:layer (default), tree:block, tree:stage, depth:N or regex:PATTERN.")
@click.option("--epsilon", type=float, default=0.1, show_default=True,
              help="Bound on the mean error (or loss) under noise.")
@click.option("--relative-epsilon", is_flag=True, help="Bound FINAL's own value + ε instead of ε.")
@click.option("--metric", type=click.Choice(["error", "loss"]), default="error", show_default=True)
@click.option("--alphas", default="11", show_default=True, help="α grid: a count in [0, 1], or comma-separated values.")
@click.option("--sigmas", default="8", show_default=True,
              help="σ grid: a count (log-spaced over --sigma-range) or comma-separated scales; σ = scale · RMS(θ_i^F).")
@click.option("--sigma-range", default="0.001,1", show_default=True, help="Low,high σ scale for a counted grid.")
@click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Monte-Carlo noise draws per (α, σ).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
@model_options
@out_options
@report_options
def criticality(final: str, init: str, data_spec: str, grouping: str | None, epsilon: float, relative_epsilon: bool,
                metric: str, alphas: str, sigmas: str, sigma_range: str, samples: int, seed: int,
                model_spec: str | None, num_classes: int | None, in_chans: int | None, batch_size: int, device: str,
                out_dir: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Module criticality μ_i (Chatterji et al. 2020) per module and the network's Σμ_i.

    --out writes results.json, criticality.csv, criticality_grid.csv (every grid point), criticality.png and
    valley_<module>.png (mean error over α × σ with the ε contour).
    """
    from weightspace.analysis.criticality import module_criticality

    from ._analysis import emit, evaluator, load_datasets, model_factory, parse_grid, precheck
    from .common import parse_floats
    precheck(out_dir, force)
    rng = parse_floats(sigma_range, "--sigma-range")
    if len(rng) != 2:
        raise click.BadParameter("expected LOW,HIGH", param_hint="--sigma-range")
    data = load_datasets([data_spec], device)
    factory = model_factory(model_spec, final, data, num_classes, in_chans)
    ev = evaluator(factory, data, batch_size, device)
    r = module_criticality(final, init, ev, modules=grouping, epsilon=epsilon, relative_epsilon=relative_epsilon,
                           metric=metric, alphas=parse_grid(alphas, "--alphas"), sigmas=parse_grid(sigmas, "--sigmas"),
                           sigma_range=(rng[0], rng[1]), samples=samples, seed=seed, progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet,
         notes=r.notes)

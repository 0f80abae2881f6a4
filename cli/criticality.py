"""weightspace criticality FINAL --init INIT --model M --data TRAIN_DATA [--epsilon 0.1]"""
from __future__ import annotations

import click

from .options import DataOptions, ModelOptions, OpOptions, analysis_outputs, trained_from_options

__all__ = ["criticality"]


@click.command("criticality")
@trained_from_options(init_help="The checkpoint FINAL was trained from (θ⁰).", init_required=True,
                      data_help="TRAINING data, evaluated: the definition bounds the training error (one dataset).")
@click.option("--epsilon", type=float, default=0.1, show_default=True,
              help="Bound on the mean error (or loss) under noise.")
@click.option("--relative-epsilon", is_flag=True, help="Bound FINAL's own value + ε instead of ε.")
@click.option("--metric", type=click.Choice(["error", "loss"]), default="error", show_default=True,
              help="What ε bounds: the mean top-1 error or the mean cross-entropy loss under noise.")
@click.option("--alphas", default="11", show_default=True, help="α grid: a number of evenly spaced α in [0, 1], or comma-separated α values.")
@click.option("--sigma-range", default="0.001,1", show_default=True,
              help="Low,high σ scale searched by bisection at each α; σ = scale · RMS(θ_i^F).")
@click.option("--bisect-steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Halvings of the log-σ bracket at each α (precision (high/low)^(1/2^steps)).")
@click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Noise draws, drawn once per module and scaled by σ (common random numbers).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
@click.option("--recalibrate-bn", "recalibrate_bn", default=None, metavar="DATA",
              help="Re-estimate every BatchNorm's statistics on this data before each evaluation.")
@analysis_outputs("Folder for results.json, criticality.csv, criticality_search.csv and the PNGs.")
def criticality(final: str, init: str, data: DataOptions, grouping: str | None, epsilon: float,
                relative_epsilon: bool, metric: str, alphas: str, sigma_range: str, bisect_steps: int, samples: int,
                seed: int, recalibrate_bn: str | None, model: ModelOptions, out_dir: str | None, force: bool, as_json: bool, quiet: bool,
                sources: OpOptions | None = None) -> None:
    """Module criticality μ_i (Chatterji et al. 2020) per module and the network's Σμ_i.

    At each α the largest σ with mean error ≤ ε is found by bisection on fixed noise draws. --out writes
    results.json, criticality.csv, criticality_search.csv (every evaluation), criticality.png and
    valley_<module>.png (the evaluated points and the frontier σ_max(α)).
    """
    from weightspace.analysis.criticality import module_criticality

    from weightspace.eval.build import data_transform, load_datasets, model_factory
    from weightspace.eval.evaluator import Evaluator

    from .common import batch_note, emit, parse_floats, parse_grid, precheck
    precheck(out_dir, force)
    rng = parse_floats(sigma_range, "--sigma-range")
    if len(rng) != 2:
        raise click.BadParameter("expected LOW,HIGH", param_hint="--sigma-range")
    datasets = load_datasets([data.one("criticality")], device=model.device, transform=data_transform(data))
    factory = model_factory(model, final, datasets)
    ev = Evaluator(factory(), datasets, batch_size=model.batch_size, device=model.device)
    batch_note(ev, quiet)
    recal = (load_datasets([recalibrate_bn], device=model.device, transform=data_transform(data))[0]
             if recalibrate_bn else None)
    r = module_criticality(final, init, ev, modules=grouping, epsilon=epsilon, relative_epsilon=relative_epsilon,
                           metric=metric, alphas=parse_grid(alphas, "--alphas"), sigma_range=(rng[0], rng[1]),
                           bisect_steps=bisect_steps, samples=samples, seed=seed, recalibrate_bn=recal,
                           progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet,
         notes=r.notes)

"""weightspace rewind FINAL --init INIT --model M --data DATA [--to init|random|CKPT ...]"""
from __future__ import annotations

import click

from .options import DataOptions, FixOptions, ModelOptions, OpOptions, analysis_outputs, trained_from_options, use

__all__ = ["rewind"]


@click.command("rewind")
@trained_from_options(init_help="The checkpoint FINAL was trained from (--to init).", init_required=False,
                      data_help="Evaluation data (repeatable; the heat map shows the first).")
@click.option("--to", "targets", multiple=True, metavar="TARGET",
              help="Rewind target, repeatable: init (default), random (a fresh draw from the model's own "
                   "initialiser), or a checkpoint of the trajectory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --to random draw.")
@click.option("--bn-stats", type=click.Choice(["final", "target"]), default="final", show_default=True,
              help="BatchNorm running statistics of a rewound module: FINAL's, or the target's.")
@use(FixOptions, "fix", only=("recalibrate_bn",),
     help={"recalibrate_bn": "Re-estimate every BatchNorm's statistics on DATA before each evaluation."})
@analysis_outputs("Folder for results.json, rewind.csv and rewind.png.")
def rewind(final: str, init: str | None, data: DataOptions, grouping: str | None, targets: tuple[str, ...],
           seed: int, bn_stats: str, fix: FixOptions, model: ModelOptions, out_dir: str | None,
           force: bool, as_json: bool, quiet: bool, sources: OpOptions | None = None) -> None:
    """Rewind one module at a time to INIT / a checkpoint / a random draw, keep the others at FINAL, evaluate.

    Prints module × target error and loss beside FINAL's baseline; --out writes results.json, rewind.csv and
    rewind.png (a heat map of modules × rewind targets).
    """
    from weightspace.analysis.criticality import rewind as do_rewind
    from weightspace.errors import ConfigError
    from weightspace.eval.build import data_transform, load_datasets, model_factory
    from weightspace.eval.evaluator import Evaluator

    from .common import batch_note, emit, precheck
    precheck(out_dir, force)
    targets = targets or ("init",)
    if "init" in targets and not init:
        raise click.UsageError("--init is required to rewind to init (or pick --to random / --to CKPT)")
    transform = data_transform(data)
    datasets = load_datasets(data.data, device=model.device, transform=transform)
    factory = model_factory(model, final, datasets)
    ev = Evaluator(factory(), datasets, batch_size=model.batch_size, device=model.device)
    batch_note(ev, quiet)
    recal = load_datasets([fix.recalibrate_bn], device=model.device, transform=transform)[0] if fix.recalibrate_bn else None
    if recal is not None and bn_stats != "final":
        raise ConfigError("--bn-stats and --recalibrate-bn exclude each other (recalibration re-estimates all)")
    r = do_rewind(final, init, ev, modules=grouping, to=list(targets), model=factory, recalibrate_bn=recal,
                  bn_stats=bn_stats, seed=seed, progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet)

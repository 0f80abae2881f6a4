"""weightspace rewind FINAL --init INIT --model M --data DATA [--to init|random|CKPT ...]"""
from __future__ import annotations

import click

from .common import report_options
from .evalargs import model_options, out_options


@click.command("rewind")
@click.argument("final")
@click.option("--init", "init", default=None, metavar="CKPT", help="The checkpoint FINAL was trained from (--to init).")
@click.option("--data", "data_specs", multiple=True, required=True, metavar="SPEC",
              help="Evaluation data (repeatable; the heat map shows the first).")
@click.option("--modules", "grouping", default=None, metavar="SPEC",
              help="tree:layer (default), tree:block, tree:stage, depth:N or regex:PATTERN.")
@click.option("--to", "targets", multiple=True, metavar="TARGET",
              help="Rewind target, repeatable: init (default), random (a fresh draw from the model's own "
                   "initialiser), or a checkpoint of the trajectory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --to random draw.")
@click.option("--bn-stats", type=click.Choice(["final", "target"]), default="final", show_default=True,
              help="BatchNorm running statistics of a rewound module: FINAL's, or the target's.")
@click.option("--recalibrate-bn", "recal_spec", default=None, metavar="SPEC",
              help="Re-estimate every BatchNorm's statistics on this data before each evaluation.")
@model_options
@out_options
@report_options
def rewind(final: str, init: str | None, data_specs: tuple[str, ...], grouping: str | None, targets: tuple[str, ...],
           seed: int, bn_stats: str, recal_spec: str | None, model_spec: str | None,
           num_classes: int | None, in_chans: int | None, batch_size: int, device: str, out_dir: str | None,
           force: bool, as_json: bool, quiet: bool) -> None:
    """Rewind one module at a time to INIT / a checkpoint / a random draw, keep the others at FINAL, evaluate.

    Prints module × target error and loss beside FINAL's baseline; --out writes results.json, rewind.csv and
    rewind.png (a heat map of modules × rewind targets).
    """
    from weightspace.analysis.criticality import rewind as do_rewind
    from weightspace.errors import ConfigError

    from ._analysis import emit, evaluator, load_datasets, model_factory, precheck
    precheck(out_dir, force)
    targets = targets or ("init",)
    if "init" in targets and not init:
        raise click.UsageError("--init is required to rewind to init (or pick --to random / --to CKPT)")
    data = load_datasets(data_specs, device)
    factory = model_factory(model_spec, final, data, num_classes, in_chans)
    ev = evaluator(factory, data, batch_size, device)
    recal = load_datasets([recal_spec], device)[0] if recal_spec else None
    if recal is not None and bn_stats != "final":
        raise ConfigError("--bn-stats and --recalibrate-bn exclude each other (recalibration re-estimates all)")
    r = do_rewind(final, init, ev, modules=grouping, to=list(targets), model=factory, recalibrate_bn=recal,
                  bn_stats=bn_stats, seed=seed, progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet)

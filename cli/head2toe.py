"""weightspace head2toe CKPT --model M --train DATA --data DATA [--keep 0.01,0.1,0.2] [--out DIR]"""
from __future__ import annotations

import click

from .common import echo, parse_floats, print_json, report_options
from .options import DataOptions, ModelOptions, OpOptions, use
from .probe import linear_head_options, probe_options, write_report

__all__ = ["H2T_FILES", "head2toe"]

H2T_FILES = ("results.json", "head2toe.csv", "head2toe_layers.csv", "head2toe.png")


@click.command("head2toe")
@click.argument("checkpoint")
@probe_options
@click.option("--keep", default="0.01,0.1,0.2", show_default=True,
              help="Candidate fractions of features to keep; the one used is chosen by cross-validation on --train.")
@click.option("--target", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Pool each layer to about this many features (T).")
@click.option("--coef", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Group-lasso coefficient of the feature-scoring head.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Cross-validation folds on the training set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@linear_head_options
@click.option("--lasso-iters", type=click.IntRange(min=1), default=200, show_default=True,
              help="Proximal-gradient iterations of the group-lasso head.")
@report_options
@use(OpOptions, "sources", only=("ema", "strip_prefix"))  # read by every checkpoint the verb opens
def head2toe(checkpoint: str, model: ModelOptions, data: DataOptions, layers: str, cache_dir: str | None,
             out_dir: str | None, force: bool, keep: str, target: int, coef: float, folds: int, seed: int, l2: float,
             max_iter: int, lasso_iters: int, as_json: bool, quiet: bool, sources: OpOptions | None = None) -> None:
    """Head2Toe (Evci et al. 2022): a linear head on features selected from every layer of CHECKPOINT.

    Each layer is pooled to about --target features and L2-normalised per example; a group-lasso head scores the
    concatenated features, the top fraction (chosen from --keep by k-fold cross-validation on --train) is kept
    and a plain linear head is retrained on it. Reported against the last-layer linear probe. --out writes
    results.json, head2toe.csv, head2toe_layers.csv and head2toe.png.
    """
    from weightspace.analysis.head2toe import head2toe as run_h2t
    from weightspace.report import check_outputs, markdown_table
    fractions = parse_floats(keep, "--keep")
    if out_dir:
        check_outputs(out_dir, H2T_FILES, force)
    assert model.model and data.train  # click requires both
    res = run_h2t(checkpoint, model.model, data.train, data.one("head2toe"), layers=layers, keep=fractions,
                  target=target, coef=coef, folds=folds, seed=seed, l2=l2, max_iter=max_iter, lasso_iters=lasso_iters,
                  device=model.device, batch_size=model.batch_size or 256, cache_dir=cache_dir,
                  num_classes=model.num_classes, in_chans=model.in_chans, progress=not quiet)
    payload = write_report(out_dir, "head2toe", res, force=force, quiet=quiet)
    headers, rows = res.table()
    if as_json:
        print_json(payload)
        return
    echo(markdown_table(headers, rows))
    b = res.baseline
    echo(f"Head2Toe (keep {res.chosen:g}, chosen by {folds}-fold CV): test accuracy {res.accuracy:.4f}; "
               f"last-layer probe ({b['layer']}, {b['features']} features): {b['test_accuracy']:.4f}")

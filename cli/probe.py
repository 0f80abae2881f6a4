"""weightspace probe CKPT [CKPT ...] --model M --train DATA --data DATA [--layers all] [--out DIR]"""
from __future__ import annotations

from typing import Any, Callable

import click

from .common import echo, note, print_json, report_options
from .options import DataOptions, ModelOptions, OpOptions, force_option, report_folder, use

__all__ = ["PROBE_FILES", "probe_options", "linear_head_options", "write_report", "probe"]

PROBE_FILES = ("results.json", "probe.csv", "probe.png")


def probe_options(f: Callable) -> Callable:
    """--model, --train, --data (alias --test), --layers, --num-classes, --in-chans, --device, --batch-size,
    --cache, --out, --force."""
    f = force_option()(f)
    f = report_folder("Folder for the report: results.json, a CSV and a PNG of the accuracies.")(f)
    f = click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
                     help="Folder caching pooled features on disk (keyed by checkpoint sha256, data, layers).")(f)
    f = click.option("--layers", default="all", show_default=True,
                     help="all, depth:N, regex:P, or comma-separated module names (NAME:in taps a module's input).")(f)
    f = use(DataOptions, "data", only=("train", "data"), required=("train", "data"), aliases={"data": ("--test",)},
            help={"train": "Fitting data: what the linear heads are trained on.",
                  "data": "Evaluation data the heads are scored on (one dataset; --test is an alias)."})(f)
    f = use(ModelOptions, "model", only=("model", "num_classes", "in_chans", "batch_size", "device"),
            required=("model",),
            help={"num_classes": "Upstream classifier outputs (default: from the checkpoint).",
                  "in_chans": "Input channels of the model (default: from the checkpoint).",
                  "batch_size": "Batch size of the backbone's forward passes."})(f)
    return f


def linear_head_options(f: Callable) -> Callable:
    """--l2 and --max-iter of the plain linear heads (probes, and Head2Toe's retrained head)."""
    f = click.option("--max-iter", type=click.IntRange(min=1), default=50, show_default=True,
                     help="L-BFGS iterations per head.")(f)
    return click.option("--l2", type=click.FloatRange(min=0), default=1e-3, show_default=True,
                        help="Weight decay of the linear heads (on the mean cross-entropy, standardised features).")(f)


def write_report(out_dir: str | None, command: str, result: Any, *, force: bool, quiet: bool) -> dict:
    """The JSON payload ({"command", **result.to_dict()}); with --out DIR, the result's files written there too
    (results.json holds the same payload) and listed under "files"."""
    payload = {"command": command, **result.to_dict()}
    if not out_dir:
        return payload
    files = list(result.write(out_dir, force=force, extra={"command": command}).values())
    note(f"wrote {', '.join(map(str, files))}", quiet)
    return {**payload, "files": [str(f) for f in files]}


@click.command("probe")
@click.argument("checkpoints", nargs=-1, required=True)
@probe_options
@click.option("--dim", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Pool each layer to about this many features (Head2Toe's pooling rule).")
@linear_head_options
@report_options
@use(OpOptions, "sources", only=("ema", "strip_prefix"))  # read by every checkpoint the verb opens
def probe(checkpoints: tuple[str, ...], model: ModelOptions, data: DataOptions, layers: str, cache_dir: str | None,
          out_dir: str | None, force: bool, dim: int, l2: float, max_iter: int, as_json: bool, quiet: bool, sources: OpOptions | None = None) -> None:
    """Linear probe accuracy at every tapped layer of each of CHECKPOINTS.

    Features are pooled per layer, computed once per dataset and checkpoint (one model instance, weights copied in
    place); a linear head (L-BFGS, standardised features) is trained on --train and scored on --data. --out writes
    results.json, probe.csv and probe.png (accuracy vs depth, one line per checkpoint).
    """
    from weightspace.analysis.probe import probe as run_probe
    from weightspace.report import check_outputs, markdown_table
    if out_dir:
        check_outputs(out_dir, PROBE_FILES, force)
    assert model.model and data.train  # click requires both
    res = run_probe(list(checkpoints), model.model, data.train, data.one("probe"), layers=layers, dim=dim, l2=l2,
                    max_iter=max_iter, device=model.device, batch_size=model.batch_size or 256, cache_dir=cache_dir,
                    num_classes=model.num_classes, in_chans=model.in_chans, progress=not quiet)
    payload = write_report(out_dir, "probe", res, force=force, quiet=quiet)
    headers, rows = res.table()
    if as_json:
        print_json(payload)
    else:
        echo(markdown_table(headers, rows))
        for ck, r in res.best().items():
            echo(f"{ck}: best layer {r['layer']} (test accuracy {r['test_accuracy']:.4f})")

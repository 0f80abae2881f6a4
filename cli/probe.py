"""weightspace probe CKPT [CKPT ...] --model M --train DATA --test DATA [--layers all] [--out DIR]"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from .common import note, print_json, report_options

PROBE_FILES = ("results.json", "probe.csv", "probe.png")


def probe_options(f: Callable) -> Callable:
    """--model, --train, --test, --layers, --num-classes, --in-chans, --device, --batch-size, --cache, --out."""
    from .evalargs import device_options, out_options
    f = out_options(f)
    f = click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
                     help="Folder caching pooled features on disk (keyed by checkpoint sha256, data, layers).")(f)
    f = device_options(f, "Batch size of the backbone's forward passes.")
    f = click.option("--in-chans", type=click.IntRange(min=1), default=None,
                     help="Input channels of the model (default: from the checkpoint).")(f)
    f = click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Upstream classifier outputs (default: from the checkpoint).")(f)
    f = click.option("--layers", default="all", show_default=True,
                     help="all, depth:N, regex:P, or comma-separated module names (NAME:in taps a module's input).")(f)
    f = click.option("--test", "test_spec", required=True, metavar="DATA", help="Data the probes are scored on.")(f)
    f = click.option("--train", "train_spec", required=True, metavar="DATA", help="Data the probes are trained on.")(f)
    f = click.option("--model", "model_spec", required=True, metavar="SPEC",
                     help="timm:NAME, open_clip:ARCH or pkg.module:factory (e.g. weightspace.eval.zoo:small_cnn).")(f)
    return f


def linear_head_options(f: Callable) -> Callable:
    """--l2 and --max-iter of the plain linear heads (probes, and Head2Toe's retrained head)."""
    f = click.option("--max-iter", type=click.IntRange(min=1), default=50, show_default=True,
                     help="L-BFGS iterations per head.")(f)
    return click.option("--l2", type=click.FloatRange(min=0), default=1e-3, show_default=True,
                        help="Weight decay of the linear heads (on the mean cross-entropy, standardised features).")(f)


def write_report(out_dir: str | None, payload: dict, tables: dict[str, tuple[list, list]], png: str,
                 plot: Callable[..., Any], *, force: bool, quiet: bool) -> dict:
    """--out DIR: results.json, one CSV per table and the PNG; returns the payload with the files it wrote."""
    if not out_dir:
        return payload
    from weightspace.report import write_csv, write_json
    d = Path(out_dir)
    files = [write_json(d / "results.json", payload, force=force)]
    files += [write_csv(d / name, headers, rows, force=force) for name, (headers, rows) in tables.items()]
    files.append(plot(d / png, force=force))
    note(f"wrote {', '.join(map(str, files))}", quiet)
    return {**payload, "files": [str(f) for f in files]}


@click.command("probe")
@click.argument("checkpoints", nargs=-1, required=True)
@probe_options
@click.option("--dim", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Pool each layer to about this many features (Head2Toe's pooling rule).")
@linear_head_options
@report_options
def probe(checkpoints: tuple[str, ...], model_spec: str, train_spec: str, test_spec: str, layers: str,
          num_classes: int | None, in_chans: int | None, batch_size: int, device: str, cache_dir: str | None,
          out_dir: str | None, force: bool, dim: int, l2: float, max_iter: int, as_json: bool, quiet: bool) -> None:
    """Linear probe accuracy at every tapped layer of each of CHECKPOINTS.

    Features are pooled per layer, computed once per dataset and checkpoint (one model instance, weights copied in
    place); a linear head (L-BFGS, standardised features) is trained on --train and scored on --test. --out writes
    results.json, probe.csv and probe.png (accuracy vs depth, one line per checkpoint).
    """
    from weightspace.analysis.probe import probe as run_probe
    from weightspace.report import check_outputs, markdown_table
    if out_dir:
        check_outputs(out_dir, PROBE_FILES, force)
    res = run_probe(list(checkpoints), model_spec, train_spec, test_spec, layers=layers, dim=dim, l2=l2,
                    max_iter=max_iter, device=device, batch_size=batch_size, cache_dir=cache_dir,
                    num_classes=num_classes, in_chans=in_chans, progress=not quiet)
    payload = {"command": "probe", **res.to_json()}
    headers, rows = res.table()
    payload = write_report(out_dir, payload, {"probe.csv": (headers, rows)}, "probe.png", res.plot, force=force,
                           quiet=quiet)
    if as_json:
        print_json(payload)
    else:
        click.echo(markdown_table(headers, rows))
        for ck, r in res.best().items():
            click.echo(f"{ck}: best layer {r['layer']} (test accuracy {r['test_accuracy']:.4f})")

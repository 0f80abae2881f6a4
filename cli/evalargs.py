"""Options shared by the verbs that evaluate checkpoints (soup, interpolate, leaderboard): model, data, device."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import click


def _set_parallel(ctx: click.Context, param: click.Parameter, value: str) -> None:
    from weightspace.eval.distributed import set_parallel
    set_parallel(value)  # process-wide (reset on every invocation): the Evaluator and the sweeps read it


def _set_transform(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    from .common import _parse_transform
    ctx.meta["weightspace.transform"] = _parse_transform(ctx, param, value)


def current_transform() -> Callable | None:
    """The --transform of the running command (applied to every dataset it loads), or None."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("weightspace.transform") if ctx is not None else None


def load_eval_data(spec: str, model: Any = None) -> Any:
    """load_data with the command's --transform applied (evaluation, BN recalibration and REPAIR data alike)."""
    from weightspace.eval.data import load_data
    return load_data(spec, model=model, transform=current_transform())


def data_transform_option(f: Callable) -> Callable:
    """--transform SPEC, applied to every dataset the command loads (read back with current_transform())."""
    return click.option("--transform", default=None, metavar="SPEC", expose_value=False, callback=_set_transform,
                        help="Transform every dataset once, after its normalisation: block-shuffle:B[:SEED] "
                             "(B×B blocks, one fixed seeded permutation); chain with '+'.")(f)


def device_options(f: Callable, batch_help: str = "Evaluation batch size.") -> Callable:
    """--device and --batch-size."""
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")(f)
    return click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help=batch_help)(f)


def model_options(f: Callable) -> Callable:
    """--model, --num-classes, --in-chans, --batch-size, --device, --parallel, --transform."""
    f = data_transform_option(f)
    f = click.option("--parallel", type=click.Choice(["data", "points"]), default="data", show_default=True,
                     expose_value=False, callback=_set_parallel,
                     help="Under torchrun: shard the data of every evaluation across the ranks (data), or deal "
                          "whole sweep points (α points, checkpoints) out to the ranks (points).")(f)
    f = device_options(f)
    f = click.option("--in-chans", type=click.IntRange(min=1), default=None,
                     help="Input channels of the model (timm; e.g. 1 for grey digits).")(f)
    f = click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Classifier outputs (default: the first dataset's number of classes).")(f)
    f = click.option("--model", "model_spec", default=None, metavar="SPEC",
                     help="timm:NAME, open_clip:ARCH or pkg.module:factory (e.g. weightspace.eval.zoo:small_cnn).")(f)
    return f


def out_options(f: Callable) -> Callable:
    """--out DIR and --force."""
    f = click.option("--force", is_flag=True, help="Overwrite existing output files.")(f)
    f = click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
                     help="Folder for results.json, CSV and PNG.")(f)
    return f


def build_evaluator(model_spec: str, data_specs: Sequence[str], *, num_classes: int | None, in_chans: int | None,
                    batch_size: int, device: str, keep_logits: bool = False) -> Any:
    """One model instance and every dataset decoded once and placed on the device."""
    from weightspace.errors import ConfigError
    from weightspace.eval.evaluator import Evaluator, resolve_device
    from weightspace.eval.models import build_model
    dup = sorted({s for s in data_specs if list(data_specs).count(s) > 1})
    if dup:
        raise ConfigError(f"--data {dup[0]}: given more than once")
    dev = resolve_device(device)
    first = None
    folder = Path(data_specs[0].split("?", 1)[0]).expanduser()
    if num_classes is None:
        if folder.is_dir():  # an image folder: one class per sub-folder (decoding waits for the model's transform)
            num_classes = sum(1 for p in folder.iterdir() if p.is_dir())
        else:
            first = load_eval_data(data_specs[0])
            num_classes = first.num_classes
    model = build_model(model_spec, num_classes=num_classes, in_chans=in_chans)
    data = {s: first if (i == 0 and first is not None) else load_eval_data(s, model) for i, s in enumerate(data_specs)}
    return Evaluator(model, data, batch_size=batch_size, device=dev, keep_logits=keep_logits)


def require(value: Any, option: str, why: str) -> None:
    """A usage error naming the missing option."""
    if not value:
        raise click.UsageError(f"{option} is required {why}")


DEFAULT_SCALES = "0.2,0.4,0.6,0.8,1.0,1.2,1.5"  # the λ grid merges are searched over on --val (merge, soup --merge)

"""Set-up shared by the analysis verbs (modules, rewind, criticality, similarity): model, data and output."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import click

from .common import markdown_table, print_json


def parse_grid(text: str, what: str) -> int | list[float]:
    """'11' → 11 evenly spaced points; '0,0.5,1' → those values."""
    from .common import parse_floats
    if "," not in text:
        try:
            return int(text)
        except ValueError:
            pass
    return parse_floats(text, what)


def load_datasets(specs: Sequence[str], device: str) -> list:
    """Each --data spec decoded once, transformed (after normalisation) and placed on the device."""
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import resolve_device
    dev = resolve_device(device)
    from .evalargs import current_transform
    transform = current_transform()  # the command's --transform (model_options), for every dataset alike
    return [load_data(s, transform=transform, device=dev) for s in specs]


def model_factory(model_spec: str | None, checkpoint: Any, data: Sequence, num_classes: int | None,
                  in_chans: int | None) -> Callable[[], Any]:
    """A function that builds the model fitting ``checkpoint`` (num_classes/in_chans from it, else the data)."""
    from weightspace.eval.modules import build_model_for
    if not model_spec:
        raise click.UsageError("--model is required (timm:NAME, open_clip:ARCH or pkg.module:factory)")
    if num_classes is None and checkpoint is None and data:
        num_classes = data[0].num_classes  # with a checkpoint, its classifier's shape decides
    return lambda: build_model_for(model_spec, checkpoint, num_classes=num_classes, in_chans=in_chans)


def evaluator(factory: Callable[[], Any], data: Sequence, batch_size: int, device: str):
    """An Evaluator holding one model and the datasets."""
    from weightspace.eval.evaluator import Evaluator
    return Evaluator(factory(), list(data), batch_size=batch_size, device=device)


def precheck(out_dir: str | None, force: bool) -> None:
    """Refuse an existing --out run before any work (every analysis writes results.json there)."""
    from pathlib import Path

    from weightspace.errors import OutputExists
    if out_dir and not force and (Path(out_dir) / "results.json").exists():
        raise OutputExists(f"{Path(out_dir) / 'results.json'}: already exists (use --force to overwrite)")


def emit(payload: dict, headers: list[str], rows: list[list], *, out_dir: str | None, write: Callable | None,
         force: bool, as_json: bool, quiet: bool, notes: Sequence[str] = ()) -> None:
    """Write --out files, then print JSON (--json) or a Markdown table (default) on stdout."""
    from .common import note
    if out_dir and write is not None:
        files = write(out_dir, force=force)
        payload = {**payload, "files": [str(f) for f in files]}
        note(f"wrote {len(files)} files to {out_dir}", quiet)
    for n in notes:
        note(n, quiet)
    if as_json:
        print_json(payload)
    else:
        click.echo(markdown_table(headers, rows))

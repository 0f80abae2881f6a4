"""weightspace align A B --model M -o B_aligned.safetensors [--data DATA]"""
from __future__ import annotations

from pathlib import Path

import click

from .common import markdown_table, note, output_options, print_json, report_options
from .evalargs import data_transform_option, load_eval_data
from .merge import refuse_existing


@click.command("align")
@click.argument("a")
@click.argument("b")
@click.option("--model", "model_spec", required=True, metavar="SPEC",
              help="The architecture: timm:NAME, open_clip:ARCH or pkg.module:factory (e.g. weightspace.eval.zoo:mlp).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier outputs of the model (default: the data's number of classes, else the model's).")
@click.option("--in-chans", type=click.IntRange(min=1), default=None, help="Input channels of the model (timm).")
@click.option("--data", "data_spec", default=None, metavar="DATA",
              help="Inputs for activation matching (digits, mnist1d, a .pt/.npz file, an image folder); "
                   "also used to check that the aligned model computes B's function.")
@click.option("--method", type=click.Choice(["weights", "activations"]), default=None,
              help="Weight matching, or activation matching on --data (default: activations when --data is given).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the group order in weight matching.")
@click.option("--max-rounds", type=click.IntRange(min=1), default=100, show_default=True,
              help="Weight matching stops after this many rounds over all groups (or when none improves).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where B, permuted, is written.")
@data_transform_option
@output_options
@report_options
def align(a: str, b: str, model_spec: str, num_classes: int | None, in_chans: int | None, data_spec: str | None,
          method: str | None, seed: int, max_rounds: int, output: str, force: bool, fmt: str | None, as_json: bool,
          quiet: bool) -> None:
    """Permute B's hidden units to match A (Git Re-Basin); B's function is unchanged. Writes B aligned."""
    from weightspace import save
    from weightspace.search.align import align as align_fn
    from weightspace.errors import IncompatibleCheckpoints
    from weightspace.eval.models import build_model
    method = method or ("activations" if data_spec else "weights")
    if method == "activations" and not data_spec:
        raise click.UsageError("--method activations needs --data")
    refuse_existing(output, force)
    data = None
    if data_spec and num_classes is None:
        folder = Path(data_spec.split("?", 1)[0]).expanduser()
        if folder.is_dir():  # an image folder: one class per sub-folder; decoding waits for the model's transform
            num_classes = sum(1 for p in folder.iterdir() if p.is_dir())
        else:
            data = load_eval_data(data_spec)
            num_classes = data.num_classes
    model = build_model(model_spec, num_classes=num_classes, in_chans=in_chans)
    if data_spec and data is None:
        data = load_eval_data(data_spec, model)
    try:
        out, info = align_fn(a, b, model, method=method, data=data, seed=seed, max_rounds=max_rounds,
                             progress=not quiet)
    except IncompatibleCheckpoints as e:
        if num_classes is None and "has shape" in str(e):
            raise IncompatibleCheckpoints(f"{e} (does --num-classes need setting?)") from None
        raise
    if not info["groups"]:
        note(f"{model_spec}: no permutation symmetry found in the graph; B is written unchanged", quiet)
    path = save(out, output, force=force, fmt=fmt)
    summary = {k: info[k] for k in ("method", "seed", "rounds", "converged", "batches", "l2_before", "l2_after",
                                    "max_abs_output_change", "identity", "groups", "fixed") if k in info}
    if as_json:
        print_json({"output": str(path), "a": a, "b": b, "model": model_spec, **summary})
        return
    if not quiet:
        click.echo(markdown_table(["group", "units", "tensors", "moved"],
                                  [[g["name"], g["size"], g["tensors"], g["moved"]] for g in info["groups"]]))
    rounds = f", {info['rounds']} rounds" if "rounds" in info else ""
    kind = "weight" if method == "weights" else "activation"
    click.echo(f"wrote {path} ({kind} matching{rounds}: ‖A−B‖ {info['l2_before']:.4g} → ‖A−P(B)‖ "
               f"{info['l2_after']:.4g})")

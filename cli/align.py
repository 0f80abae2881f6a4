"""weightspace align A B --model M -o B_aligned.safetensors [--data DATA]"""
from __future__ import annotations

import click

from .common import echo, markdown_table, note, print_json, refuse_existing, report_options
from .options import DataOptions, ModelOptions, OpOptions, OutputOptions, force_option, use

__all__ = ["align"]


@click.command("align")
@click.argument("a")
@click.argument("b")
@use(ModelOptions, "model", only=("model", "num_classes", "in_chans"), required=("model",),
     help={"num_classes": "Classifier outputs of the model (default: the data's number of classes, else the model's)."})
@use(DataOptions, "data", only=("data", "transform"),
     help={"data": "Inputs for activation matching (digits, mnist1d, a .pt/.npz file, an image folder); "
                   "also used to check that the aligned model computes B's function (one dataset)."})
@click.option("--method", type=click.Choice(["weights", "activations"]), default=None,
              help="Weight matching, or activation matching on --data (default: activations when --data is given).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the group order in weight matching.")
@click.option("--max-rounds", type=click.IntRange(min=1), default=100, show_default=True,
              help="Weight matching stops after this many rounds over all groups (or when none improves).")
@use(OutputOptions, "out", required=("output",), help={"output": "Where B, permuted, is written."})
@force_option("Overwrite an existing output file.")
@report_options
@use(OpOptions, "sources", only=("ema", "strip_prefix"))  # read by every checkpoint the verb opens
def align(a: str, b: str, model: ModelOptions, data: DataOptions, method: str | None, seed: int, max_rounds: int,
          out: OutputOptions, force: bool, as_json: bool, quiet: bool, sources: OpOptions | None = None) -> None:
    """Permute B's hidden units to match A (Git Re-Basin); B's function is unchanged. Writes B aligned."""
    from weightspace import save
    from weightspace.search.align import align as align_fn
    from weightspace.errors import IncompatibleCheckpoints
    from weightspace.eval.build import classes_in_folder, data_transform
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    data_spec = data.one("align") if data.data else None
    method = method or ("activations" if data_spec else "weights")
    if method == "activations" and not data_spec:
        raise click.UsageError("--method activations needs --data")
    refuse_existing(out.output, force)
    model_spec, num_classes, transform = model.model, model.num_classes, data_transform(data)
    inputs = None
    if data_spec and num_classes is None:
        num_classes = classes_in_folder(data_spec)
        if num_classes is None:
            inputs = load_data(data_spec, transform=transform)
            num_classes = inputs.num_classes
    assert model_spec  # click requires --model
    net = build_model(model_spec, num_classes=num_classes, in_chans=model.in_chans)
    if data_spec and inputs is None:
        inputs = load_data(data_spec, model=net, transform=transform)
    try:
        permuted, info = align_fn(a, b, net, method=method, data=inputs, seed=seed, max_rounds=max_rounds,
                                  progress=not quiet)
    except IncompatibleCheckpoints as e:
        if num_classes is None and "has shape" in str(e):
            raise IncompatibleCheckpoints(f"{e} (does --num-classes need setting?)", path=e.path, key=e.key) from None
        raise
    if not info["groups"]:
        note(f"{model_spec}: no permutation symmetry found in the graph; B is written unchanged", quiet)
    path = save(permuted, out.target(), force=force, **out.save_kwargs())
    summary = {k: info[k] for k in ("method", "seed", "rounds", "converged", "batches", "l2_before", "l2_after",
                                    "max_abs_output_change", "identity", "groups", "fixed") if k in info}
    if as_json:
        print_json({"output": str(path), "a": a, "b": b, "model": model_spec, **summary})
        return
    if not quiet:
        echo(markdown_table(["group", "units", "tensors", "moved"],
                                  [[g["name"], g["size"], g["tensors"], g["moved"]] for g in info["groups"]]))
    rounds = f", {info['rounds']} rounds" if "rounds" in info else ""
    kind = "weight" if method == "weights" else "activation"
    echo(f"wrote {path} ({kind} matching{rounds}: ‖A−B‖ {info['l2_before']:.4g} → ‖A−P(B)‖ "
               f"{info['l2_after']:.4g})")

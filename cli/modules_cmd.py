"""weightspace modules [CKPT] --model M [--modules tree:layer|tree:block|tree:stage|depth:N|regex:P]"""
from __future__ import annotations

import click

from .common import grouping_option, report_options
from .options import ModelOptions, force_option, report_folder, use

__all__ = ["modules_cmd"]


@click.command("modules")
@click.argument("checkpoint", required=False)
@grouping_option
@use(ModelOptions, "model", only=("model", "num_classes", "in_chans"),
     help={"num_classes": "Classifier outputs (default: from CHECKPOINT, else the model's own).",
           "in_chans": "Input channels of the model (default: from CHECKPOINT, else the model's own)."})
@report_folder("Folder for results.json, modules.csv and modules.png.")
@force_option()
@report_options
def modules_cmd(checkpoint: str | None, grouping: str, model: ModelOptions, out_dir: str | None, force: bool,
                as_json: bool, quiet: bool) -> None:
    """List the modules that rewind, criticality and similarity analyse: tensors and parameters per module.

    With CHECKPOINT, shapes come from the checkpoint (num_classes / in_chans are read from it) and its keys
    are checked against the model.
    """
    from weightspace.eval.build import model_factory
    from weightspace.eval.modules import list_modules

    from .common import emit, precheck
    precheck(out_dir, force)
    listing = list_modules(model_factory(model, checkpoint)(), grouping, checkpoint, model_name=model.model or "")
    headers, rows = listing.table()
    emit(listing.to_dict(), headers, rows, out_dir=out_dir, write=listing.write, force=force, as_json=as_json,
         quiet=quiet, notes=listing.notes)

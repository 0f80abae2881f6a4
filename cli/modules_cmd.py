"""weightspace modules [CKPT] --model M [--modules tree:layer|tree:block|tree:stage|depth:N|regex:P]"""
from __future__ import annotations

import click

from .common import grouping_option, report_options
from .options import ModelOptions, force_option, report_folder, use


@click.command("modules")
@click.argument("checkpoint", required=False)
@grouping_option
@use(ModelOptions, "model", only=("model", "num_classes", "in_chans"))
@report_folder("Folder for results.json, modules.csv and modules.png.")
@force_option()
@report_options
def modules_cmd(checkpoint: str | None, grouping: str, model: ModelOptions, out_dir: str | None, force: bool,
                as_json: bool, quiet: bool) -> None:
    """List the modules that rewind, criticality and similarity analyse: tensors and parameters per module.

    With CHECKPOINT, shapes come from the checkpoint (num_classes / in_chans are read from it) and its keys
    are checked against the model.
    """
    from pathlib import Path

    from weightspace import report
    from weightspace.io.sources import load
    from weightspace.eval.build import model_factory
    from weightspace.eval.modules import model_units

    from .common import emit, precheck
    precheck(out_dir, force)
    model_spec = model.model
    net = model_factory(model, checkpoint)()
    units = model_units(net, grouping)
    sd = net.state_dict()
    params = {k for k, _ in net.named_parameters()}
    ck = load(checkpoint) if checkpoint else None

    def numel(key: str) -> int:
        shape = ck.info(key)[1] if ck is not None and key in ck else tuple(sd[key].shape)
        n = 1
        for s in shape:
            n *= int(s)
        return n

    rows, listing = [], []
    for u in units:
        n_params = sum(numel(k) for k in u.keys if k in params)
        rows.append([u.name, len(u.keys), n_params, u.output or "", ", ".join(u.keys[:4]) + (" …" if len(u.keys) > 4 else "")])
        listing.append({**u.as_dict(), "tensors": len(u.keys), "parameters": n_params})
    assigned = {k for u in units for k in u.keys}
    notes = []
    payload = {"model": model_spec, "grouping": grouping, "checkpoint": ck.source if ck else None, "modules": listing,
               "total_parameters": sum(m["parameters"] for m in listing)}
    if ck is not None:
        only_ck = sorted(set(ck) - set(sd))
        only_model = sorted(set(sd) - set(ck))
        payload["keys_not_in_model"], payload["keys_not_in_checkpoint"] = only_ck, only_model
        if only_ck or only_model:
            notes.append(f"{ck.source}: {len(only_ck)} keys the model lacks, {len(only_model)} model keys missing")
    unassigned = sorted(set(sd) - assigned)
    if unassigned:
        payload["unassigned"] = unassigned
        notes.append(f"{len(unassigned)} tensors belong to no module under {grouping} (e.g. {unassigned[0]})")

    def write(folder: str, force: bool = False) -> list[Path]:
        folder_p = report.check_outputs(folder, ["results.json", "modules.csv", "modules.png"], force)
        fig = report.bar_chart([m["name"] for m in listing], {"parameters": [float(m["parameters"]) for m in listing]},
                               xlabel="parameters", title=f"{model_spec} by {grouping}")
        return [report.write_json(folder_p / "results.json", payload, force=force),
                report.write_csv(folder_p / "modules.csv", ["module", "tensors", "parameters", "output", "keys"],
                                 [[m["name"], m["tensors"], m["parameters"], m["output"], " ".join(m["keys"])]
                                  for m in listing], force=force),
                report.save_figure(fig, folder_p / "modules.png", force=force)]

    emit(payload, ["module", "tensors", "parameters", "output (hooked)", "keys"], rows, out_dir=out_dir,
         write=write, force=force, as_json=as_json, quiet=quiet, notes=notes)

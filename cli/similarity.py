"""weightspace similarity A B --model M --data DATA"""
from __future__ import annotations

import click

from .common import echo, grouping_option
from .options import DataOptions, ModelOptions, OpOptions, analysis_outputs, use

__all__ = ["similarity"]


@click.command("similarity")
@click.argument("a")
@click.argument("b")
@use(DataOptions, "data", only=("data", "transform"), required=("data",),
     help={"data": "Examples to compare the models on (one dataset)."})
@grouping_option
@click.option("--full-limit", type=click.IntRange(min=4), default=4096, show_default=True,
              help="Full-batch linear/RBF/debiased CKA up to this many examples; beyond, minibatch CKA only.")
@click.option("--rbf-threshold", type=float, default=0.5, show_default=True,
              help="RBF bandwidth σ = threshold · median pairwise distance.")
@click.option("--cross/--no-cross", default=True, show_default=True,
              help="Minibatch CKA for every pair of modules (A's × B's heat map) or only matching modules.")
@click.option("--include-buffers", is_flag=True, help="Count buffers (BatchNorm statistics) in the L2 distances.")
@click.option("--max-indices", type=click.IntRange(min=0), default=None,
              help="Print at most this many example indices per off-diagonal cell (all are in results.json).")
@analysis_outputs("Folder for results.json, similarity.csv, agreement.csv, cka.png and cka_matrix.png.")
def similarity(a: str, b: str, data: DataOptions, grouping: str | None, full_limit: int, rbf_threshold: float,
               cross: bool, include_buffers: bool, max_indices: int | None, model: ModelOptions, out_dir: str | None,
               force: bool, as_json: bool, quiet: bool, sources: OpOptions | None = None) -> None:
    """CKA (linear, RBF, debiased, minibatch) of the two models' activations at every module output, L2 per
    module, and the prediction agreement table with the indices of the examples only one model gets right.

    --out writes results.json, similarity.csv, agreement.csv, cka.png and cka_matrix.png.
    """
    from weightspace.analysis.similarity import model_similarity as compare
    from weightspace.eval.build import data_transform, load_datasets, model_factory

    from .common import emit, markdown_table, note, precheck
    precheck(out_dir, force)
    datasets = load_datasets([data.one("similarity")], device=model.device, transform=data_transform(data))
    net = model_factory(model, a, datasets)()
    r = compare(a, b, net, datasets[0], modules=grouping, batch_size=model.batch_size or 256, device=model.device,
                full_limit=full_limit, rbf_threshold=rbf_threshold, cross=cross, include_buffers=include_buffers,
                progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet,
         notes=r.notes)
    if not as_json:
        ag = r.agreement
        echo("")
        echo(markdown_table(*r.agreement_table()))
        for cell in ("a_right_b_wrong", "a_wrong_b_right"):
            idx = ag[cell] if max_indices is None else ag[cell][:max_indices]
            more = len(ag[cell]) - len(idx)
            echo(f"{cell}: {', '.join(map(str, idx))}{f' … (+{more})' if more else ''}")
        note(f"total parameter L2 {r.total['l2']:.4f} (relative {r.total['relative']:.4f}); same prediction on "
             f"{100 * ag['same_prediction']:.1f}% of {ag['n']} examples", quiet)

"""weightspace similarity A B --model M --data DATA"""
from __future__ import annotations

import click

from .common import report_options
from .evalargs import model_options, out_options


@click.command("similarity")
@click.argument("a")
@click.argument("b")
@click.option("--data", "data_spec", required=True, metavar="SPEC", help="Examples to compare the models on.")
@click.option("--modules", "grouping", default=None, metavar="SPEC",
              help="tree:layer (default), tree:block, tree:stage, depth:N or regex:PATTERN.")
@click.option("--full-limit", type=click.IntRange(min=4), default=4096, show_default=True,
              help="Full-batch linear/RBF/debiased CKA up to this many examples; beyond, minibatch CKA only.")
@click.option("--rbf-threshold", type=float, default=0.5, show_default=True,
              help="RBF bandwidth σ = threshold · median pairwise distance.")
@click.option("--cross/--no-cross", default=True, show_default=True,
              help="Minibatch CKA for every pair of modules (A's × B's heat map) or only matching modules.")
@click.option("--include-buffers", is_flag=True, help="Count buffers (BatchNorm statistics) in the L2 distances.")
@click.option("--max-indices", type=click.IntRange(min=0), default=None,
              help="Print at most this many example indices per off-diagonal cell (all are in results.json).")
@model_options
@out_options
@report_options
def similarity(a: str, b: str, data_spec: str, grouping: str | None, full_limit: int, rbf_threshold: float,
               cross: bool, include_buffers: bool, max_indices: int | None, model_spec: str | None,
               num_classes: int | None, in_chans: int | None, batch_size: int, device: str, out_dir: str | None,
               force: bool, as_json: bool, quiet: bool) -> None:
    """CKA (linear, RBF, debiased, minibatch) of the two models' activations at every module output, L2 per
    module, and the prediction agreement table with the indices of the examples only one model gets right.

    --out writes results.json, similarity.csv, agreement.csv, cka.png and cka_matrix.png.
    """
    from ._analysis import emit, load_datasets, model_factory, precheck
    from .common import markdown_table, note
    from weightspace.analysis.similarity import model_similarity as compare
    precheck(out_dir, force)
    data = load_datasets([data_spec], device)
    model = model_factory(model_spec, a, data, num_classes, in_chans)()
    r = compare(a, b, model, data[0], modules=grouping, batch_size=batch_size, device=device, full_limit=full_limit,
                rbf_threshold=rbf_threshold, cross=cross, include_buffers=include_buffers, progress=not quiet)
    headers, rows = r.table()
    emit(r.to_dict(), headers, rows, out_dir=out_dir, write=r.write, force=force, as_json=as_json, quiet=quiet,
         notes=r.notes)
    if not as_json:
        ag = r.agreement
        click.echo("")
        click.echo(markdown_table(*r.agreement_table()))
        for cell in ("a_right_b_wrong", "a_wrong_b_right"):
            idx = ag[cell] if max_indices is None else ag[cell][:max_indices]
            more = len(ag[cell]) - len(idx)
            click.echo(f"{cell}: {', '.join(map(str, idx))}{f' … (+{more})' if more else ''}")
        note(f"total parameter L2 {r.total['l2']:.4f} (relative {r.total['relative']:.4f}); same prediction on "
             f"{100 * ag['same_prediction']:.1f}% of {ag['n']} examples", quiet)

"""weightspace soup CKPT... -o OUT  |  --method greedy|learned (or --greedy|--learned) --model M --val DATA [--data DATA ...] [--out DIR] [-o OUT]
[--recalibrate-bn DATA] [--repair DATA] [--merge ties --base PRE]"""
from __future__ import annotations

import click

from .common import echo, batch_note, dtype_note, note, parse_floats, print_json, report_options, require
from .options import (DataOptions, FixOptions, MergeOptions, ModelOptions, OpOptions, OutputOptions, RegistryChoice,
                      force_option, merge_method_names, op_options, output_options, report_folder, soup_method_names,
                      use)

__all__ = ["soup"]


@click.command("soup")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--method", type=RegistryChoice(soup_method_names), default=None,
              help="The soup made (and saved with -o): uniform (the default), weighted (--weights), greedy or learned "
                   "(both chosen on --val); formulas and papers: `weightspace methods`.")
@click.option("--uniform", is_flag=True, help="--method uniform: the plain mean of all checkpoints.")
@click.option("--greedy", is_flag=True,
              help="--method greedy (Wortsman et al. 2022): best first on --val, keep an ingredient if val accuracy "
                   "≥ without.")
@click.option("--learned", is_flag=True,
              help="--method learned: softmax mixing coefficients optimised on --val by gradient descent (holds every "
                   "ingredient in memory).")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="A weighted soup: comma-separated mixing weights, one per checkpoint (normalised to sum 1); "
                   "scored like the other soups when --model and --val are given.")
@click.option("--by-layer", is_flag=True, help="--learned: one coefficient per ingredient and tensor.")
@click.option("--learn-steps", type=click.IntRange(min=0), default=100, show_default=True,
              help="--learned: Adam steps.")
@click.option("--learn-lr", type=float, default=0.05, show_default=True, help="--learned: Adam learning rate.")
@click.option("--learn-batch-size", type=click.IntRange(min=1), default=None,
              help="--learned: validation examples per step (default: all of --val at every step).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="--learned: seed of the validation batches' shuffle (with --learn-batch-size).")
@use(FixOptions, "fix",
     help={"recalibrate_bn": "Re-estimate BatchNorm statistics on DATA for every evaluated model (soups, merges, "
                             "ingredients); -o saves the recalibrated statistics.",
           "repair": "REPAIR every evaluated model toward its ingredients' mean activation statistics on DATA; "
                     "-o saves the repaired weights."})
@click.option("--merge", "merges", multiple=True, type=RegistryChoice(merge_method_names),
              help="Add a merge of the checkpoints onto --base as a leaderboard row, its main hyperparameter (λ, "
                   "density or t) picked on --val (repeatable; any method of `weightspace methods --family merge`).")
@use(MergeOptions, "merge", help={"base": "--merge: the pre-trained checkpoint the checkpoints were fine-tuned from.",
                                  "scales": "--merge: the grid of λ tried on --val.",
                                  "keep": "--merge ties: fraction of each task vector kept (default: the method's, "
                                          "see `weightspace methods`)."})
@click.option("--strict", is_flag=True, help="Greedy: keep only if val accuracy is > without (the reference code's rule).")
@output_options
@use(ModelOptions, "model")
@use(DataOptions, "data", only=("val", "data", "transform"), aliases={"data": ("--test",)},
     help={"data": "Evaluation data, one leaderboard column each (repeat; --test is an alias)."})
@report_folder("Folder for results.json, leaderboard.csv and leaderboard.png (weights go to -o).")
@force_option()
@op_options
@report_options
def soup(checkpoints: tuple[str, ...], method: str | None, uniform: bool, greedy: bool, learned: bool, weights: str | None,
         by_layer: bool, learn_steps: int, learn_lr: float, learn_batch_size: int | None, seed: int,
         fix: FixOptions, merges: tuple[str, ...], merge: MergeOptions, strict: bool, out: OutputOptions, model: ModelOptions, data: DataOptions,
         out_dir: str | None, force: bool, ops: OpOptions, as_json: bool, quiet: bool) -> None:
    """Average CHECKPOINTS into one checkpoint (--method uniform, weighted, greedy or learned on validation data).

    With --model and --val, every checkpoint, the uniform and greedy soups and the output/greedy ensembles are
    evaluated on --val and each --data set, and a leaderboard is printed (and written to --out). -o writes the
    chosen soup; without -o an evaluated soup is reported, not saved (said on stderr).
    """
    method = _soup_method(method, uniform, greedy, learned, weights)
    evaluating = bool(model.model or data.val or fix.recalibrate_bn or fix.repair or merges)
    if method in ("greedy", "learned") or evaluating:
        require(model.model, "--model", "to evaluate checkpoints (--greedy, --learned, --val, --merge, --repair)")
        require(data.val, "--val", "to rank ingredients (--greedy, --learned, --model, --merge, --repair)")
    if merges:
        require(merge.base, "--base", "for --merge")
    elif merge.base or merge.keep is not None:
        raise click.UsageError("--base and --keep apply to --merge")
    if (by_layer or seed != 0) and method != "learned":
        raise click.UsageError("--by-layer and --seed apply to --learned")
    if data.data and not evaluating:
        raise click.UsageError("--data/--test needs --model and --val")
    if strict and method != "greedy" and not evaluating:
        raise click.UsageError("--strict applies to --greedy")
    ops.check_buffers(fix.recalibrate_bn, "soup")
    if evaluating and ops.buffers == "first":
        raise click.UsageError("--buffers first applies to a written average (no --model/--val): evaluated soups "
                               "are convex means, and so are their statistics")
    w = parse_floats(weights, "--weights") if weights is not None else None
    if w is not None and len(w) != len(checkpoints):
        raise click.BadParameter(f"{len(w)} weights for {len(checkpoints)} checkpoints", param_hint="--weights")
    if not evaluating:
        require(out.output, "-o/--output", "when nothing is evaluated")
        return _average(checkpoints, w, out, force, ops, as_json, quiet, device=model.device)
    if ops.allow_nonfinite:
        raise click.UsageError("--allow-nonfinite applies to plain averaging, not to evaluated soups")
    _evaluate(checkpoints, method, strict, w, out, model, data, out_dir, force, ops, as_json, quiet,
              learn=dict(by_layer=by_layer, steps=learn_steps, lr=learn_lr, batch_size=learn_batch_size, seed=seed),
              fix=fix, merges=merges, base=merge.base,
              scales=parse_floats(merge.scales, "--scales") if merges else None, keep=merge.keep)


def _soup_method(method: str | None, uniform: bool, greedy: bool, learned: bool, weights: str | None) -> str:
    """The one soup asked for: --method, or its aliases --uniform/--greedy/--learned, or --weights (weighted)."""
    asked = [(f"--method {method}", method)] if method else []
    asked += [(f"--{m}", m) for m, on in (("uniform", uniform), ("greedy", greedy), ("learned", learned)) if on]
    if len({m for _, m in asked}) > 1:
        raise click.UsageError(f"{' and '.join(flag for flag, _ in asked)} exclude each other: pick one soup")
    chosen = asked[0][1] if asked else None
    if weights is not None:
        if chosen not in (None, "weighted"):
            raise click.UsageError(f"--weights makes a weighted soup; drop {asked[0][0]}")
        return "weighted"
    if chosen == "weighted":
        raise click.UsageError("--method weighted needs --weights W1,W2,...")
    return chosen or "uniform"


def _average(checkpoints, weights, out: OutputOptions, force, ops: OpOptions, as_json, quiet, device="auto") -> None:
    from weightspace import save
    from weightspace.ops import stream as streams
    kw = dict(progress=not quiet, device=device, **ops.kwargs())  # auto: the CPU (ops.parallel.ops_device)
    if weights is not None:
        stream = streams.weighted_average_stream(list(checkpoints), weights, **kw)
    else:
        stream = streams.uniform_soup_stream(list(checkpoints), **kw)
    path = save(stream, out.target(), force=force, **out.save_kwargs())
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; averaged once, written as a copy", quiet)
    dtype_note(stream, out.dtype, quiet)
    for ing in stream.ingredients:
        if ing.variant:
            note(f"{ing.source}: using {ing.variant}", quiet)
    result = {"output": str(path), "op": stream.provenance["op"], "coefficients": stream.provenance["coefficients"],
              "ingredients": [c.source for c in stream.ingredients]}
    if as_json:
        print_json(result)
    else:
        echo(f"wrote {path} ({result['op']} of {len(checkpoints)} checkpoints)")


def _evaluate(checkpoints, method, strict, weights, out: OutputOptions, model: ModelOptions, data: DataOptions,
              out_dir, force, ops: OpOptions, as_json, quiet, *, learn, fix: FixOptions, merges, base,
              scales, keep) -> None:
    from weightspace import save
    from weightspace.eval.build import build_evaluator, data_transform
    from weightspace.eval.data import load_data
    from weightspace.report import check_outputs, markdown_table
    from weightspace.search.soups import Leaderboard
    from weightspace.search.soups import LearnOptions, evaluate_soups

    from .common import refuse_existing
    # Refuse existing outputs before minutes of evaluation, not after.
    if out.output:
        refuse_existing(out.output, force)
    if out_dir:
        check_outputs(out_dir, Leaderboard.FILES, force)
    assert data.val  # only a soup chosen on --val evaluates
    transform = data_transform(data)
    ev = build_evaluator(model, [data.val, *data.data], transform=transform, keep_logits=True,
                         checkpoint=checkpoints[0])
    batch_note(ev, quiet)
    fix_data = {k: load_data(s, model=ev.model, transform=transform) if s else None
                for k, s in (("recalibrate_bn", fix.recalibrate_bn), ("repair", fix.repair))}
    rep = evaluate_soups(checkpoints, ev, val=data.val, method=method, strict=strict, weights=weights,
                         learn=LearnOptions(**learn), merges=merges, base=base, scales=scales, keep=keep, ops=ops,
                         progress=not quiet, **fix_data)
    saved = None
    if out.output:
        extra = {"val_score": rep.val_score} if method != "greedy" else {}
        saved = str(save(rep.chosen, out.output, force=force, **out.save_kwargs(),
                         provenance={**extra, "val": data.val}))
    else:
        note(f"no checkpoint written: the {method} soup was scored, not saved (add -o FILE to save it)", quiet)
    lb = rep.leaderboard
    results = {"command": "soup", "model": model.model, "val": data.val, "tests": list(data.data), **rep.to_dict(),
               "output": saved}
    if rep.fixed:
        results.update(recalibrate_bn=fix.recalibrate_bn, repair=fix.repair)
    paths = {k: str(v) for k, v in lb.write(out_dir, force=force, extra=results).items()} if out_dir else {}
    if as_json:
        print_json({**results, "leaderboard": lb.to_dict(), "files": paths})
        return
    echo(markdown_table(*lb.table("accuracy")))
    res = rep.greedy
    echo(f"\ngreedy soup ({'>' if strict else '≥'} rule) kept {len(res.kept)}/{len(checkpoints)}: "
               + ", ".join(lb.rows[i]["method"] for i in res.kept))
    for group in lb.extra["ties"]:
        echo(f"validation tie (broken by input order): {', '.join(group)}")
    if saved:
        echo(f"wrote {saved} ({method} soup)")
    for p in paths.values():
        echo(f"wrote {p}")

"""weightspace soup CKPT... -o OUT  |  --greedy|--learned --model M --val DATA [--test DATA ...] [--out DIR] [-o OUT]
[--recalibrate-bn DATA] [--repair DATA] [--merge ties --base PRE]"""
from __future__ import annotations

from pathlib import Path

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options
from .evalargs import DEFAULT_SCALES, build_evaluator, load_eval_data, model_options, require


@click.command("soup")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--uniform", "method", flag_value="uniform", default=True, help="Plain mean of all checkpoints (default).")
@click.option("--greedy", "method", flag_value="greedy",
              help="Greedy soup on --val (Wortsman et al. 2022): best first, keep an ingredient if val accuracy ≥ without.")
@click.option("--learned", "method", flag_value="learned",
              help="Learned soup: softmax mixing coefficients optimised on --val by gradient descent (holds every "
                   "ingredient in memory).")
@click.option("--by-layer", is_flag=True, help="--learned: one coefficient per ingredient and tensor.")
@click.option("--learn-steps", type=click.IntRange(min=0), default=100, show_default=True,
              help="--learned: Adam steps.")
@click.option("--learn-lr", type=float, default=0.05, show_default=True, help="--learned: Adam learning rate.")
@click.option("--learn-batch-size", type=click.IntRange(min=1), default=None,
              help="--learned: validation examples per step (default: all of --val at every step).")
@click.option("--recalibrate-bn", "recal_spec", default=None, metavar="DATA",
              help="Re-estimate BatchNorm statistics on DATA for every evaluated model (soups, merges, ingredients); "
                   "-o saves the recalibrated statistics.")
@click.option("--repair", "repair_spec", default=None, metavar="DATA",
              help="REPAIR every evaluated model toward its ingredients' mean activation statistics on DATA; "
                   "-o saves the repaired weights.")
@click.option("--merge", "merges", multiple=True, type=click.Choice(["task-arithmetic", "ties"]),
              help="Add a merge of the checkpoints onto --base as a leaderboard row, λ picked on --val (repeatable).")
@click.option("--base", default=None, help="--merge: the pre-trained checkpoint the checkpoints were fine-tuned from.")
@click.option("--scales", default=DEFAULT_SCALES, show_default=True,
              help="--merge: the grid of λ tried on --val.")
@click.option("--keep", type=float, default=0.2, show_default=True, help="--merge ties: fraction of each task vector kept.")
@click.option("--strict", is_flag=True, help="Greedy: keep only if val accuracy is > without (the reference code's rule).")
@click.option("--weights", default=None, help="Comma-separated mixing weights, one per checkpoint (normalised to sum 1).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Output checkpoint path (the greedy soup with --greedy, the learned soup with --learned, else the "
                   "uniform/weighted soup; as evaluated, with --recalibrate-bn/--repair).")
@model_options
@click.option("--val", "val_spec", default=None, metavar="DATA",
              help="Held-out validation data: ranks ingredients and drives the greedy soup.")
@click.option("--test", "test_specs", multiple=True, metavar="DATA", help="Test set column (repeat for several).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for results.json, leaderboard.csv and leaderboard.png.")
@output_options
@load_options
@report_options
def soup(checkpoints: tuple[str, ...], method: str, strict: bool, weights: str | None, output: str | None,
         model_spec: str | None, num_classes: int | None, in_chans: int | None, batch_size: int, device: str,
         val_spec: str | None, test_specs: tuple[str, ...], out_dir: str | None, force: bool, fmt: str | None,
         ema: bool, precision: str, allow_nonfinite: bool, as_json: bool, quiet: bool, by_layer: bool = False,
         learn_steps: int = 100, learn_lr: float = 0.05, learn_batch_size: int | None = None,
         recal_spec: str | None = None, repair_spec: str | None = None, merges: tuple[str, ...] = (),
         base: str | None = None, scales: str = "", keep: float = 0.2) -> None:
    """Average CHECKPOINTS into one checkpoint (uniform, --weights, --greedy or --learned on validation data).

    With --model and --val, every checkpoint, the uniform and greedy soups and the output/greedy ensembles are
    evaluated on --val and each --test set, and a leaderboard is printed (and written to --out).
    """
    evaluating = bool(model_spec or val_spec or recal_spec or repair_spec or merges)
    if method in ("greedy", "learned") or evaluating:
        require(model_spec, "--model", "to evaluate checkpoints (--greedy, --learned, --val, --merge, --repair)")
        require(val_spec, "--val", "to rank ingredients (--greedy, --learned, --model, --merge, --repair)")
    if merges:
        require(base, "--base", "for --merge")
    elif base:
        raise click.UsageError("--base applies to --merge")
    if by_layer and method != "learned":
        raise click.UsageError("--by-layer applies to --learned")
    if weights is not None and (method in ("greedy", "learned") or evaluating):
        raise click.UsageError("--weights cannot be combined with --greedy, --learned or --val")
    if test_specs and not evaluating:
        raise click.UsageError("--test needs --model and --val")
    if strict and method != "greedy" and not evaluating:
        raise click.UsageError("--strict applies to --greedy")
    if not evaluating:
        require(output, "-o/--output", "when nothing is evaluated")
        return _average(checkpoints, weights, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet)
    if allow_nonfinite:
        raise click.UsageError("--allow-nonfinite applies to plain averaging, not to evaluated soups")
    extras = {"learn": {"by_layer": by_layer, "steps": learn_steps, "lr": learn_lr, "batch_size": learn_batch_size},
              "recal_spec": recal_spec, "repair_spec": repair_spec, "merges": merges, "base": base,
              "scales": parse_floats(scales, "--scales") if merges else None, "keep": keep}
    _evaluate(checkpoints, method, strict, output, model_spec, num_classes, in_chans, batch_size, device, val_spec,
              test_specs, out_dir, force, fmt, ema, precision, as_json, quiet, **extras)


def _average(checkpoints, weights, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet) -> None:
    from weightspace import save
    from weightspace.ops import stream as ops
    kw = dict(precision=precision, allow_nonfinite=allow_nonfinite, progress=not quiet, ema=ema)
    if weights is not None:
        w = parse_floats(weights, "--weights")
        if len(w) != len(checkpoints):
            raise click.BadParameter(f"{len(w)} weights for {len(checkpoints)} checkpoints", param_hint="--weights")
        stream = ops.weighted_average_stream(list(checkpoints), w, **kw)
    else:
        stream = ops.uniform_soup_stream(list(checkpoints), **kw)
    path = save(stream, output, force=force, fmt=fmt)
    for alias, canon in stream.tied.items():
        note(f"tied tensors: {alias} shares {canon}; averaged once, written as a copy", quiet)
    for ing in stream.ingredients:
        if ing.variant:
            note(f"{ing.source}: using {ing.variant}", quiet)
    result = {"output": str(path), "op": stream.provenance["op"], "coefficients": stream.provenance["coefficients"],
              "ingredients": [c.source for c in stream.ingredients]}
    if as_json:
        print_json(result)
    else:
        click.echo(f"wrote {path} ({result['op']} of {len(checkpoints)} checkpoints)")


def _evaluate(checkpoints, method, strict, output, model_spec, num_classes, in_chans, batch_size, device, val_spec,
              test_specs, out_dir, force, fmt, ema, precision, as_json, quiet, learn=None, recal_spec=None,
              repair_spec=None, merges=(), base=None, scales=None, keep=0.2) -> None:
    from weightspace import load, save
    from weightspace.errors import OutputExists
    from weightspace.report import check_outputs, markdown_table
    from weightspace.search.greedy import LEADERBOARD_FILES, write_leaderboard
    from weightspace.search.greedy import soup_leaderboard
    # Refuse existing outputs before minutes of evaluation, not after.
    if output and Path(output).exists() and not force:
        raise OutputExists(f"{output}: already exists (use --force to overwrite)")
    if out_dir:
        check_outputs(out_dir, LEADERBOARD_FILES, force)
    ev = build_evaluator(model_spec, [val_spec, *test_specs], num_classes=num_classes, in_chans=in_chans,
                         batch_size=batch_size, device=device, keep_logits=True)
    ingredients = [load(c, ema=ema) for c in checkpoints]
    fixed = recal_spec or repair_spec
    if fixed:
        from weightspace.eval.fixes import fix_evaluator
        ev = fix_evaluator(ev, ingredients, progress=not quiet,
                           recalibrate_bn=load_eval_data(recal_spec, ev.model) if recal_spec else None,
                           repair=load_eval_data(repair_spec, ev.model) if repair_spec else None)
    lb, soups, res = soup_leaderboard(ingredients, ev, strict=strict, progress=not quiet,
                                      precision=precision)
    members = {"uniform": (None, None), "greedy": (res.kept, None)}
    learned_info = None
    if method == "learned":
        from weightspace.search.learned import learned_soup
        from weightspace.eval.contract import as_table
        from weightspace.search.greedy import tell_members
        soups["learned"], lres = learned_soup(ingredients, ev.model, ev.datasets[val_spec], by_layer=learn["by_layer"],
                                              steps=learn["steps"], lr=learn["lr"], batch_size=learn["batch_size"],
                                              eval_batch_size=batch_size, progress=not quiet)
        learned_info = lres.to_dict()
        members["learned"] = (list(range(len(ingredients))), lres.coefficients)
        tell_members(ev, *members["learned"])
        lb.rows.append({"method": "learned soup", "kind": "soup", "metrics": as_table(ev(soups["learned"])),
                        "detail": ", ".join(f"{c:.3f}" for c in lres.coefficients)
                                  + (" (mean over tensors)" if learn["by_layer"] else "")})
    if merges:
        from weightspace.search.greedy import merge_rows
        rows, _ = merge_rows(base, ingredients, ev, list(merges), grid=scales, keep=keep, precision=precision)
        lb.rows.extend(rows)
    saved = None
    if output:
        chosen = soups[method]
        extra = {"val_score": lb.row(f"{method} soup")["metrics"][val_spec]["accuracy"]} if method != "greedy" else {}
        if fixed:  # save what was scored: the recalibrated statistics / repaired weights
            chosen = ev.fixed_weights(chosen, *members[method])
        saved = str(save(chosen, output, force=force, fmt=fmt, provenance={**extra, "val": val_spec}))
    results = {"command": "soup", "model": model_spec, "val": val_spec, "tests": list(test_specs),
               "method": method, "output": saved, "greedy": res.to_dict()}
    if fixed:
        results.update(recalibrate_bn=recal_spec, repair=repair_spec)
    if learned_info is not None:
        results["learned"] = learned_info
    if merges:
        results["merges"] = {"base": base, "grid": scales, "keep": keep}
    paths = write_leaderboard(lb, out_dir, results, force=force) if out_dir else {}
    if as_json:
        print_json({**results, "leaderboard": lb.to_dict(), "files": paths})
        return
    click.echo(markdown_table(*lb.table("accuracy")))
    click.echo(f"\ngreedy soup ({'>' if strict else '≥'} rule) kept {len(res.kept)}/{len(checkpoints)}: "
               + ", ".join(lb.rows[i]["method"] for i in res.kept))
    for group in lb.extra["ties"]:
        click.echo(f"validation tie (broken by input order): {', '.join(group)}")
    if saved:
        click.echo(f"wrote {saved} ({method} soup)")
    for p in paths.values():
        click.echo(f"wrote {p}")

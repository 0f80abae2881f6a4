"""weightspace soup CKPT... -o OUT  |  --greedy --model M --val DATA [--test DATA ...] [--out DIR] [-o OUT]"""
from __future__ import annotations

from pathlib import Path

import click

from .common import load_options, note, output_options, parse_floats, print_json, report_options
from .evalargs import build_evaluator, model_options, require


@click.command("soup")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--uniform", "method", flag_value="uniform", default=True, help="Plain mean of all checkpoints (default).")
@click.option("--greedy", "method", flag_value="greedy",
              help="Greedy soup on --val (Wortsman et al. 2022): best first, keep an ingredient if val accuracy ≥ without.")
@click.option("--strict", is_flag=True, help="Greedy: keep only if val accuracy is > without (the reference code's rule).")
@click.option("--weights", default=None, help="Comma-separated mixing weights, one per checkpoint (normalised to sum 1).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Output checkpoint path (the greedy soup with --greedy, else the uniform/weighted soup).")
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
         ema: bool, precision: str, allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Average CHECKPOINTS into one checkpoint (uniform, --weights, or --greedy on validation data).

    With --model and --val, every checkpoint, the uniform and greedy soups and the output/greedy ensembles are
    evaluated on --val and each --test set, and a leaderboard is printed (and written to --out).
    """
    evaluating = bool(model_spec or val_spec)
    if method == "greedy" or evaluating:
        require(model_spec, "--model", "to evaluate checkpoints (--greedy, --val)")
        require(val_spec, "--val", "to rank ingredients (--greedy, --model)")
    if weights is not None and (method == "greedy" or evaluating):
        raise click.UsageError("--weights cannot be combined with --greedy or --val")
    if test_specs and not evaluating:
        raise click.UsageError("--test needs --model and --val")
    if strict and method != "greedy" and not evaluating:
        raise click.UsageError("--strict applies to --greedy")
    if not evaluating:
        require(output, "-o/--output", "when nothing is evaluated")
        return _average(checkpoints, weights, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet)
    if allow_nonfinite:
        raise click.UsageError("--allow-nonfinite applies to plain averaging, not to evaluated soups")
    _evaluate(checkpoints, method, strict, output, model_spec, num_classes, in_chans, batch_size, device, val_spec,
              test_specs, out_dir, force, fmt, ema, precision, as_json, quiet)


def _average(checkpoints, weights, output, force, fmt, ema, precision, allow_nonfinite, as_json, quiet) -> None:
    from weightspace import ops, save
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
              test_specs, out_dir, force, fmt, ema, precision, as_json, quiet) -> None:
    from weightspace import load, save
    from weightspace.errors import OutputExists
    from weightspace.report import LEADERBOARD_FILES, check_outputs, markdown_table, write_leaderboard
    from weightspace.soup import soup_leaderboard
    # Refuse existing outputs before minutes of evaluation, not after.
    if output and Path(output).exists() and not force:
        raise OutputExists(f"{output}: already exists (use --force to overwrite)")
    if out_dir:
        check_outputs(out_dir, LEADERBOARD_FILES, force)
    ev = build_evaluator(model_spec, [val_spec, *test_specs], num_classes=num_classes, in_chans=in_chans,
                         batch_size=batch_size, device=device, keep_logits=True)
    ingredients = [load(c, ema=ema) for c in checkpoints]
    lb, soups, res = soup_leaderboard(ingredients, ev, strict=strict, progress=not quiet,
                                      precision=precision)
    saved = None
    if output:
        chosen = soups["greedy" if method == "greedy" else "uniform"]
        extra = {} if method == "greedy" else {"val_score": lb.row("uniform soup")["metrics"][val_spec]["accuracy"]}
        saved = str(save(chosen, output, force=force, fmt=fmt, provenance={**extra, "val": val_spec}))
    results = {"command": "soup", "model": model_spec, "val": val_spec, "tests": list(test_specs),
               "method": method, "output": saved, "greedy": res.to_dict()}
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

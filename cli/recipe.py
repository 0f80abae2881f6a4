"""weightspace recipe run RECIPE.yaml --out DIR [--small] [--set KEY=VALUE ...]; weightspace recipe summary RUN..."""
from __future__ import annotations

import click

from .common import echo, report_options
from .options import ModelOptions, force_option, report_folder, use

__all__ = ["recipe", "run", "summary"]


@click.group("recipe")
def recipe() -> None:
    """Run experiment recipes (small YAML files: data, model, training schedule, analyses)."""


@recipe.command("run", short_help="Train a recipe's models, run its analyses, write REPORT.md.")
@click.argument("recipe_file", metavar="RECIPE.yaml")
@report_folder("Folder for checkpoints/, data/, results.json, CSVs, PNGs and REPORT.md.", required=True)
@click.option("--small", is_flag=True, help="Apply the recipe's 'small:' overrides (a quick reduced-size run).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.finetune.epochs=5 (repeatable; the value is YAML).")
@force_option("Overwrite an existing run in --out.")
@click.option("--trust-model-code", "trust_model_code", is_flag=True,
              help="Let the recipe's model specs import and call any pkg.module:factory (by default a recipe may name "
                   "only the built-in zoo, timm:, open_clip: and torchvision.models: models).")
@use(ModelOptions, "model", only=("batch_size", "device"),
     help={"device": "auto, cpu or cuda[:N]: where the recipe trains and evaluates.",
           "batch_size": "Evaluation batch size of the analyses (training batch sizes are in the recipe)."})
@report_options
def run(recipe_file: str, out_dir: str, small: bool, overrides: tuple[str, ...], force: bool, trust_model_code: bool,
        model: ModelOptions, as_json: bool, quiet: bool) -> None:
    """Train the recipe's models, run its analyses and write REPORT.md with a verdict per finding."""
    from weightspace.eval.evaluator import resolve_device
    from weightspace.experiments.runner import run_recipe

    from .common import markdown_table, print_json
    r = run_recipe(recipe_file, out_dir, small=small, overrides=overrides, force=force, progress=not quiet,
                   device=str(resolve_device(model.device)), batch_size=model.batch_size or 256,
                   trust_model_code=trust_model_code)
    if as_json:
        print_json(r)
        return
    echo(markdown_table(["finding", "verdict", "numbers"],
                              [[f["id"], f["verdict"], f["numbers"]] for f in r["findings"]]))
    echo(f"\nwrote {out_dir}/REPORT.md ({r['timings']['total']:.1f} s)")


@recipe.command("summary", short_help="One Markdown page of the findings of several runs.")
@click.argument("runs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("-o", "--output", "output", default=None, metavar="FILE",
              help="Write the page (Markdown) to FILE instead of stdout.")
@click.option("--title", default="Recipe results", show_default=True, help="The page's heading.")
@force_option("Overwrite FILE.")
def summary(runs: tuple[str, ...], output: str | None, title: str, force: bool) -> None:
    """One Markdown page of every finding (verdict and numbers) of recipe runs, read from their results.json."""
    from pathlib import Path

    from weightspace.experiments.summary import summarise
    from weightspace.files import check_targets
    if output is not None:  # before reading: an existing page, or one of the runs' results.json, is refused
        check_targets([output], force, inputs=[Path(r) / "results.json" for r in runs])
    page = summarise(runs, title=title)
    if output is None:
        echo(page)
        return
    from weightspace.report import write_text
    write_text(output, page + "\n", force=force)
    echo(f"wrote {output}")

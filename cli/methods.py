"""weightspace methods [--family op|merge|recipe]"""
from __future__ import annotations

import click

from .common import echo, markdown_table, print_json, report_options

__all__ = ["methods"]


def _defaults(d: dict) -> str:
    # Nested recipe defaults would flood a table cell: name the sections, show the scalars.
    return ", ".join(f"{k}={v}" if not isinstance(v, (dict, list)) else f"{k}: …" for k, v in d.items())


@click.command("methods")
@click.option("--family", type=click.Choice(["op", "merge", "recipe"]), default=None,
              help="Only ops (what writes a checkpoint), merge methods (merge --method) or recipe kinds.")
@report_options
def methods(family: str | None, as_json: bool, quiet: bool) -> None:
    """The registry: every op, merge method and recipe kind with its formula, paper and defaults.

    docs/methods.md is this command's output.
    """
    from weightspace.registry import static_entries  # the registry's fields, read without torch
    entries = static_entries(family)
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    echo(markdown_table(
        ["family", "name", "title", "formula", "paper", "defaults"],
        [[e.family, f"`{e.name}`", e.title, e.formula,
          f"[{e.paper.short}]({e.paper.url})" if e.paper else "", _defaults(dict(e.defaults))] for e in entries]))

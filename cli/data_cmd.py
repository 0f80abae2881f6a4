"""weightspace data ls | rm NAME...: the decoded-data cache."""
from __future__ import annotations

import click

from .common import echo, human_bytes, markdown_table, print_json

__all__ = ["data", "ls", "rm"]


@click.group("data")
def data() -> None:
    """The decoded-data cache ($WEIGHTSPACE_DATA_CACHE, else ~/.cache/weightspace/data).

    Image data is decoded once per source, model transform and decoder, stored as uint8 and memory-mapped by
    later commands; a changed file (path, size or mtime) makes a new entry, and WEIGHTSPACE_DATA_VERIFY=content
    compares the files' bytes instead. Each entry's array and labels are checked against their digest on load.
    """


@data.command("ls", short_help="List the cached entries.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
def ls(as_json: bool) -> None:
    """List the cached entries: name, source, examples, size, decoder and transform."""
    from weightspace.eval.data.cache import cache_dir, list_entries
    rows = [e.summary() for e in list_entries()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        folder = cache_dir()
        echo(f"no cached data in {folder}" if folder else "the data cache is off (WEIGHTSPACE_DATA_CACHE=off)")
        return
    echo(markdown_table(["name", "source", "examples", "size", "decoder", "transform"],
                              [[r["name"], r["source"], r["examples"], human_bytes(r["bytes"]), r["decoder"],
                                r["transform"]] for r in rows]))


@data.command("rm", short_help="Delete cached entries by name or source.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm(names: tuple[str, ...]) -> None:
    """Delete cache entries by NAME (as `data ls` shows it), or every entry of a source name."""
    from weightspace.eval.data.cache import remove_entries
    for e in remove_entries(list(names)):
        echo(f"removed {e.name} ({human_bytes(e.meta.get('file_bytes', 0))})")

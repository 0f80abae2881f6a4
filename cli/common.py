"""Options and output helpers shared by the verbs."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence, TypeVar

import click

__all__ = ["echo", "grouping_option", "report_options", "print_json", "note", "dtype_note", "markdown_table", "parse_floats", "human_bytes",
           "require", "refuse_existing", "parse_grid", "precheck", "emit"]


def echo(message: Any = "", err: bool = False, nl: bool = True) -> None:
    """click.echo for every line the CLI prints: control characters from files (ANSI/OSC sequences, CR, forged
    newlines inside a value) are escaped by weightspace.report.terminal.printable; the newlines of the layout stay."""
    from weightspace.report.terminal import printable
    click.echo(printable(message, newlines=True), err=err, nl=nl)


def grouping_option(f: Callable) -> Callable:
    """--modules SPEC: how tensors are grouped into the modules an analysis works on."""
    return click.option("--modules", "grouping", default="tree:layer", show_default=True, metavar="SPEC",
                        help="tree:layer (a weight layer with its norm), tree:block (residual blocks), tree:stage, "
                             "depth:N (first N name parts) or regex:PATTERN (what group 1 captures).")(f)


def report_options(f: Callable) -> Callable:
    """--json and --quiet."""
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)
    return f


def print_json(obj: Any) -> None:
    """Print strict JSON (NaN becomes null, ±inf "inf"/"-inf": weightspace.report.jsonable) on stdout."""
    from weightspace.report import jsonable
    echo(json.dumps(jsonable(obj), indent=2, sort_keys=False))


def note(msg: str, quiet: bool = False) -> None:
    """A human note on stderr (never on stdout, which may carry JSON)."""
    if not quiet:
        echo(msg, err=True)


def batch_note(ev: Any, quiet: bool = False) -> None:
    """Note the evaluation batch size when the Evaluator chose it (CPU, no --batch-size)."""
    if getattr(ev, "batch_note", None):
        note(ev.batch_note, quiet)


def dtype_note(stream: Any, dtype: str | None, quiet: bool = False) -> None:
    """Note the tensors an op wrote in a wider dtype than some input's (unless --dtype chose the output dtype)."""
    from weightspace.ops.engine import dtype_note as _dtype_note
    msg = None if dtype else _dtype_note(stream.provenance)
    if msg:
        note(msg, quiet)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 4 decimals (weightspace.report's formatting, imported when used)."""
    from weightspace.report import markdown_table as _markdown_table
    return _markdown_table(headers, rows)


def parse_floats(text: str, what: str) -> list[float]:
    """Parse '0.2,0.3,0.5' into floats, with a clear error."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what) from None


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return str(size)


T = TypeVar("T")


def require(value: T | None, option: str, why: str) -> T:
    """Return ``value``; a usage error naming the missing option when it is empty."""
    if not value:
        raise click.UsageError(f"{option} is required {why}")
    return value


def refuse_existing(output: str | None, force: bool) -> None:
    """Fail before any work when the output exists and --force was not given (the write checks again); no
    output, nothing to refuse."""
    import os

    from weightspace.files import check_targets
    if output is not None and not output.endswith(("/", os.sep)) and not os.path.isdir(output):
        check_targets([output], force)  # a folder output is checked by save, which knows the names it writes


def parse_grid(text: str, what: str) -> int | list[float]:
    """'11' → 11 evenly spaced points; '0,0.5,1' → those values."""
    if "," not in text:
        try:
            return int(text)
        except ValueError:
            pass
    return parse_floats(text, what)


def precheck(out_dir: str | None, force: bool) -> None:
    """Refuse an existing --out run before any work (every analysis writes results.json there)."""
    from pathlib import Path

    from weightspace.files import check_targets
    if out_dir:
        check_targets([Path(out_dir) / "results.json"], force, root=out_dir)


def emit(payload: dict, headers: list[str], rows: list[list], *, out_dir: str | None, write: Callable | None,
         force: bool, as_json: bool, quiet: bool, notes: Sequence[str] = ()) -> None:
    """Write --out files, then print JSON (--json) or a Markdown table (default) on stdout."""
    if out_dir and write is not None:
        files = list(write(out_dir, force=force).values())
        payload = {**payload, "files": [str(f) for f in files]}
        note(f"wrote {len(files)} files to {out_dir}", quiet)
    for n in notes:
        note(n, quiet)
    if as_json:
        print_json(payload)
    else:
        echo(markdown_table(headers, rows))

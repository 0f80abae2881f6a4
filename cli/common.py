"""Options and output helpers shared by the verbs."""
from __future__ import annotations

import json
import math
from typing import Any, Callable

import click


def output_options(f: Callable) -> Callable:
    """-o/--output, --force and --format for verbs that write a checkpoint."""
    f = click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default=None,
                     help="Output format (default: from the extension; safetensors unless .pt/.pth/.bin).")(f)
    f = click.option("--force", is_flag=True, help="Overwrite an existing output file.")(f)
    return f


def load_options(f: Callable) -> Callable:
    """--ema, --precision and --allow-nonfinite for verbs that read and combine checkpoints."""
    f = click.option("--allow-nonfinite", is_flag=True, help="Combine tensors holding NaN/Inf instead of refusing.")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
                     help="Accumulation precision for floating tensors (results are cast back to the stored dtype).")(f)
    f = click.option("--ema", is_flag=True, help="Pick EMA weights where a file holds both EMA and regular weights.")(f)
    return f


def report_options(f: Callable) -> Callable:
    """--json and --quiet."""
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)
    return f


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """Print strict JSON (NaN becomes null) on stdout."""
    click.echo(json.dumps(_clean(obj), indent=2, sort_keys=False))


def note(msg: str, quiet: bool = False) -> None:
    """A human note on stderr (never on stdout, which may carry JSON)."""
    if not quiet:
        click.echo(msg, err=True)


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
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _parse_transform(ctx: click.Context, param: click.Parameter, value: str | None):
    if not value:
        return None
    from weightspace.errors import ConfigError
    from weightspace.eval.transforms import parse_transform
    try:
        return parse_transform(value)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--transform") from None

"""Reports: tables (Markdown, CSV, JSON) and PNG plots (matplotlib, Agg backend), all written atomically.

The plotting helpers are generic (line panels, grouped bars, heat maps) so every verb draws with the same look.
Report renders what it is given — plain rows, series and numbers — and imports no domain module: the results
(Curve, Leaderboard, ...) turn themselves into those and call it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Protocol, Sequence

from ..files import atomic_output, check_targets, make_folder, writes_discarded
from .terminal import printable

__all__ = ["Row", "jsonable", "fmt_cell", "markdown_table", "csv_text", "write_text", "write_json", "write_csv",
           "check_outputs", "Result", "write_files", "write_result", "COLORS", "LINESTYLES", "new_figure", "save_figure",
           "line_panels", "bar_chart", "heatmap"]

Row = Sequence[Any]


def jsonable(obj: Any) -> Any:
    """Strict-JSON form: NaN → null, ±inf → "inf"/"-inf", tuples → lists, numbers/tensors → Python numbers."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # 0-d tensors and numpy scalars
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def fmt_cell(v: Any, digits: int = 4) -> str:
    """A table cell: floats get ``digits`` decimals, None becomes an empty cell, '|', newlines and every other
    control character escaped (``terminal.printable``): a cell never breaks the table or reaches a terminal raw."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return printable(v).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Row], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt_cell(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Sequence[Row]) -> str:
    """CSV with full float precision (repr), empty cells for None."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(headers))
    for r in rows:
        w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def write_text(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    """Write a text file atomically (refuses to overwrite without force)."""
    path = Path(path)
    with atomic_output(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> Path:
    """Write strict JSON (sorted as given, indented) atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=2) + "\n", force=force)


def write_csv(path: str | os.PathLike, headers: Sequence[str], rows: Sequence[Row], *, force: bool = False) -> Path:
    """Write a CSV table atomically."""
    return write_text(path, csv_text(headers, rows), force=force)


def check_outputs(folder: str | os.PathLike, names: Sequence[str], force: bool) -> Path:
    """Create ``folder`` and make sure none of ``names`` exists in it unless ``force`` (fail before any work), by
    the one writer rule (``files.check_targets``).

    While writes are discarded (``files.discard_writes``, another process writes the same files) it checks and
    creates nothing: that process may already have written them."""
    from ..errors import OutputExists
    folder = Path(folder)
    if writes_discarded():
        return folder
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputExists(f"{folder}: exists and is not a folder", path=folder)
    check_targets([folder / n for n in names], force, root=folder)
    return make_folder(folder)


class Result(Protocol):
    """What every result type offers (Curve, Leaderboard, GreedyResult, RewindResult, ...): report renders it
    without knowing which one it is."""

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows: the result as one table."""

    def to_dict(self) -> dict:
        """JSON-ready form."""

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Draw the result's main figure as a PNG at ``path``."""

    def write(self, folder: str | os.PathLike, *, force: bool = False) -> dict[str, Path]:
        """Write the result's files (JSON, CSV, PNG) into ``folder``; role → path."""


def write_result(folder: str | os.PathLike, result: Result, files: Mapping[str, tuple[str, Any]], *,
                 extra: dict | None = None, force: bool = False) -> dict[str, Path]:
    """A result folder led by results.json (``extra``, then ``result.to_dict()``), then ``files`` as
    :func:`write_files` takes them; role → path ("results" first).

    Raises:
        OutputExists, OutputError: as :func:`write_files`.
    """
    return write_files(folder, {"results": ("results.json", {**(extra or {}), **result.to_dict()}), **files},
                       force=force)


def write_files(folder: str | os.PathLike, files: Mapping[str, tuple[str, Any]], *, force: bool = False) -> dict[str, Path]:
    """Write a result folder: ``files`` maps a role to (file name, content), written in order, and the same roles
    map to the paths written. Content: a dict → JSON, a (headers, rows) pair → CSV, a function ``f(path, force=)``
    → whatever it writes (a plot).

    Raises:
        OutputExists: one of the files exists and ``force`` is false (checked before anything is written), or
            ``folder`` is a file.
        OutputError: a file cannot be written (full disk, read-only filesystem); the files this call wrote
            before it are removed, and the folder too when this call made it.
    """
    made = not Path(folder).exists()
    root = check_outputs(folder, [name for name, _ in files.values()], force)
    out: dict[str, Path] = {}
    try:
        for role, (name, content) in files.items():
            path = root / name
            if isinstance(content, Mapping):
                out[role] = write_json(path, content, force=force)
            elif callable(content):
                out[role] = Path(content(path, force=force))
            else:
                headers, rows = content
                out[role] = write_csv(path, headers, rows, force=force)
    except BaseException:
        # all or nothing: a results.json without its table and plot (say the disk filled up before the plot)
        # would read as a whole result
        if not writes_discarded():
            for p in out.values():
                with contextlib.suppress(OSError):
                    os.unlink(p)
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(root)
        raise
    return out


# ---------------------------------------------------------------------------------------------------- plotting
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
LINESTYLES = ["-", "--", ":", "-."]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """A figure with a grid of axes (always a flat list)."""
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig, path: str | os.PathLike, *, force: bool = False, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically; no timestamp or version in the file, so same data → same bytes."""
    plt = _pyplot()
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_output(path, force) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def line_panels(panels: Sequence[dict], *, title: str | None = None):
    """Side-by-side line plots. Each panel: {"xlabel", "ylabel", "title"?, "series": [{"x", "y", "label"?,
    "color"?, "linestyle"?, "marker"?}], "annotations"?: [{"x", "y", "text", "color"?}]}. Returns the figure."""
    fig, axes = new_figure(ncols=len(panels))
    for ax, p in zip(axes, panels):
        for i, s in enumerate(p["series"]):
            ax.plot(s["x"], s["y"], label=s.get("label"), color=s.get("color", COLORS[i % len(COLORS)]),
                    linestyle=s.get("linestyle", "-"), marker=s.get("marker", "o"), markersize=3, linewidth=1.5)
        for a in p.get("annotations", []):
            if not a.get("text"):  # a marker only: circle the point
                ax.plot([a["x"]], [a["y"]], marker="o", markersize=9, markerfacecolor="none",
                        markeredgecolor=a.get("color", "black"), linestyle="none")
                continue
            ax.annotate(a["text"], xy=(a["x"], a["y"]), xytext=(0, 8), textcoords="offset points", ha="center",
                        fontsize=7, color=a.get("color", "black"),
                        arrowprops=dict(arrowstyle="-", color=a.get("color", "black"), lw=0.6))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        if p.get("title"):
            ax.set_title(p["title"], fontsize=10)
        ax.grid(True, alpha=0.3)
        if any(s.get("label") for s in p["series"]):
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def bar_chart(categories: Sequence[str], groups: dict[str, Sequence[float]], *, xlabel: str = "",
              title: str | None = None, highlight: Sequence[str] = ()):
    """Horizontal grouped bars: one row per category, one bar per group (e.g. dataset). Returns the figure."""
    import numpy as np
    n, g = len(categories), max(1, len(groups))
    fig, (ax,) = new_figure(size=(7.0, 0.45 * n * max(1, g * 0.6) + 1.2))
    height = 0.8 / g
    ys = np.arange(n)
    for j, (name, values) in enumerate(groups.items()):
        vals = [float("nan") if v is None else v for v in values]
        ax.barh(ys + (j - (g - 1) / 2) * height, vals, height=height, label=name, color=COLORS[j % len(COLORS)])
        for y, v in zip(ys, vals):
            if math.isfinite(v):
                ax.text(v, y + (j - (g - 1) / 2) * height, f" {v:.4f}", va="center", fontsize=6)
    ax.set_yticks(ys)
    ax.set_yticklabels(categories, fontsize=8)
    for lbl in ax.get_yticklabels():
        if lbl.get_text() in highlight:
            lbl.set_fontweight("bold")
    ax.invert_yaxis()
    finite = [v for vs in groups.values() for v in vs if v is not None and math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        span = max(hi - lo, 1e-3)
        ax.set_xlim(max(0.0, lo - 0.5 * span) if lo >= 0 else lo - 0.5 * span, hi + 0.35 * span)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], *,
            title: str | None = None, cbar_label: str = "", fmt: str = "{:.2f}", cmap: str = "viridis"):
    """A labelled heat map with the value printed in each cell (rows × columns). Returns the figure."""
    import numpy as np
    data = np.array([[float("nan") if v is None else v for v in r] for r in values], dtype=float)
    fig, (ax,) = new_figure(size=(0.6 * len(col_labels) + 2.5, 0.4 * len(row_labels) + 1.5))
    im = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7)
    if data.size and data.size <= 400:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if math.isfinite(data[i, j]):
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=6, color="white")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if title:
        ax.set_title(title, fontsize=10)
    return fig



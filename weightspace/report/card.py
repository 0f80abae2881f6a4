"""The model card (README.md of a Hub repo), rendered from plain data: no file is read and no domain module is
imported here; ``weightspace.hub`` gathers what the card says."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import markdown_table

__all__ = ["CardData", "render_card", "format_number"]

# ops whose result is an average of fine-tunes (tagged model-soup on the Hub)
SOUP_OPS = ("uniform_soup", "weighted_average", "greedy_soup", "learned_soup")


@dataclass
class CardData:
    """Everything a card shows, already resolved by the caller (names, not paths; strings, not objects).

    ``provenance`` is None for weights not made by weightspace: the card then claims no method, no ingredients.
    ``leaderboard`` is a header row and body rows as read from leaderboard.csv (strings are fine: numbers are
    rounded here). ``ingredients`` rows are {column: value}; ``greedy`` is (kept, total, best name) for a greedy soup.
    """

    repo_id: str
    library: str
    weights_name: str
    version: str
    provenance: dict | None = None
    title: str = ""
    summary: str = ""
    citation: str = ""
    details: dict = field(default_factory=dict)
    ingredients: list[dict] = field(default_factory=list)
    candidates: list[list] = field(default_factory=list)
    greedy: tuple[int, int, str] | None = None
    leaderboard: list[list] | None = None
    run: dict = field(default_factory=dict)
    curve: bool = False
    base_models: list[str] = field(default_factory=list)
    merge_relation: bool = False
    license: str | None = None
    config_source: str = ""


def format_number(value: Any, digits: int = 4) -> Any:
    """A CSV cell as a reader wants it: integers without '.0', other numbers rounded to ``digits`` decimals,
    anything else unchanged."""
    if isinstance(value, bool):
        return value
    x = value
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return value
    if isinstance(x, (int, float)):
        if isinstance(x, int) or (math.isfinite(x) and x == int(x) and abs(x) < 1e15):
            return str(int(x))
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return value


def _front_matter(d: CardData) -> str:
    import yaml
    meta: dict[str, Any] = {"library_name": d.library}
    if d.license:
        meta["license"] = d.license
    tags: list[str] = []
    op = str((d.provenance or {}).get("op", ""))
    if d.provenance is not None:
        tags.append("weightspace")
        if op in SOUP_OPS:
            tags.append("model-soup")
        elif d.merge_relation:
            tags.append("merge")
    if d.library == "timm":
        tags += ["timm", "image-classification"]
        meta["pipeline_tag"] = "image-classification"
    elif d.library == "open_clip":
        tags += ["open_clip", "clip"]
        meta["pipeline_tag"] = "zero-shot-image-classification"
    if tags:
        meta["tags"] = tags
    if d.base_models:
        meta["base_model"] = d.base_models[0] if len(d.base_models) == 1 else d.base_models
        if d.merge_relation:
            meta["base_model_relation"] = "merge"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _opening(d: CardData) -> list[str]:
    prov = d.provenance
    if prov is None:
        return ["These weights were uploaded with weightspace; they carry no weightspace provenance, so this card "
                "states no method and no ingredients."]
    n = len(prov.get("ingredients", []) or [])
    if d.greedy is not None:
        kept, total, best = d.greedy
        if kept == 1:
            return [f"Greedy soup of {total} checkpoints that kept only the best one on validation data: it equals "
                    f"the best single model, `{best}`. Made with weightspace {d.version}."]
        return [f"Greedy soup: {kept} of {total} checkpoints kept on validation data, made with weightspace "
                f"{d.version}."]
    made = f"{d.title} of {n} checkpoint{'s' if n != 1 else ''}" if n else (d.title or "Checkpoint")
    return [f"{made}, made with weightspace {d.version}."]


def render_card(d: CardData) -> str:
    """README.md: front matter (library, license, tags, base models), what the weights are, method and paper,
    ingredients, leaderboard, run settings, curve, usage, and the raw provenance."""
    out = [_front_matter(d), f"# {d.repo_id.split('/')[-1]}", "", *_opening(d)]
    if d.provenance is not None and (d.summary or d.citation or d.details):
        out += ["", "## Method", ""]
        if d.summary:
            out.append(f"**{d.title}**: {d.summary}.")
        if d.citation:
            out.append(f"Paper: {d.citation}.")
        if d.details:
            out += ["", ", ".join(f"{k}: `{format_number(v)}`" for k, v in d.details.items())]
    if d.ingredients:
        cols: list[str] = []
        for row in d.ingredients:
            cols += [c for c in row if c not in cols]
        rows = [[format_number(r.get(c, "")) if c not in ("source", "sha256") else r.get(c, "") for c in cols]
                for r in d.ingredients]
        out += ["", "## Ingredients", "", markdown_table(cols, rows)]
    if d.candidates:
        out += ["", "Greedy decisions, best validation score first:", "",
                markdown_table(["candidate", "val score", "kept"],
                               [[c[0], format_number(c[1]), c[2]] for c in d.candidates])]
    if d.leaderboard:
        head, body = d.leaderboard[0], d.leaderboard[1:]
        out += ["", "## Leaderboard", "", markdown_table(head, [[format_number(v) for v in r] for r in body])]
    if d.run:
        out += ["", "## Run", "", markdown_table(["setting", "value"],
                                                 [[k, format_number(v)] for k, v in d.run.items()])]
    if d.curve:
        out += ["", "## Barrier curve", "", "![barrier curve: accuracy and loss along the interpolation](curve.png)"]
    out += ["", "## Usage", ""]
    if d.library == "timm":
        out += ["```python", "import timm", f'model = timm.create_model("hf-hub:{d.repo_id}", pretrained=True)', "```"]
    elif d.library == "open_clip":
        out += ["```python", "import open_clip",
                f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{d.repo_id}")', "```"]
    else:
        out += ["```python", "from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file",
                f'state_dict = load_file(hf_hub_download("{d.repo_id}", "{d.weights_name}"))', "```"]
    out += ["", "or with weightspace: `weightspace inspect hf://" + d.repo_id + "`"]
    if d.config_source:
        out += ["", f"The {d.library} config was derived from the {d.config_source}."]
    if d.provenance is not None:
        out += ["", "<details><summary>Provenance (the <code>weightspace</code> metadata of the weights file, local "
                "paths shown by file name)</summary>", "", "```json", json.dumps(d.provenance, indent=1, sort_keys=True, default=str), "```",
                "", "</details>"]
    out.append("")
    return "\n".join(out)


"""Push a checkpoint to the Hugging Face Hub with a model card and the config that lets timm or open_clip load it.

Everything goes through huggingface_hub (``HfApi.create_repo`` + one ``create_commit``); no HTTP is written here.
The folder that is pushed is built first (``build_folder``), so ``dry_run_dir`` shows exactly what would be uploaded:

    model.safetensors            the weights (open_clip_model.safetensors for open_clip, the name open_clip looks for)
    config.json                  timm: architecture, num_classes, num_features, pretrained_cfg
    open_clip_config.json        open_clip: model_cfg, preprocess_cfg
    README.md                    model card: YAML front matter, method and paper, ingredients, scores, leaderboard
    curve.png                    the barrier curve of the run folder, when there is one
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .._version import __version__
from ..io.checkpoint import Checkpoint
from ..io.pickles import load_pickle
from ..io.source_options import split_query
from ..io.sources import load
from ..errors import HubError, OutputExists, WeightspaceError, hub_push_error
from ..report.card import CardData, render_card
from ..registry import REGISTRY, Entry
from .configs import base_models, infer_model_config, open_clip_config, timm_config
# Each op registers its title, formula and paper beside its code: importing these modules fills the registry.
from ..ops import merge as _merge_methods, stream as _stream  # noqa: F401
from ..search import align as _align, greedy as _greedy, learned as _learned  # noqa: F401

__all__ = ["HubError", "WEIGHTS_NAME", "method_entry", "PushResult", "infer_model_config", "timm_config", "open_clip_config",
           "base_models", "RunFolder", "read_run_folder", "model_card", "build_folder", "push_to_hub"]


WEIGHTS_NAME = {"timm": "model.safetensors", "pytorch": "model.safetensors",
                "open_clip": "open_clip_model.safetensors"}

def method_entry(op: str) -> Entry | None:
    """The registry entry of a provenance ``op`` (ops and merge methods), or None for an op it does not know."""
    return REGISTRY.find(op, ("op", "merge")) if op else None


_SCORE_SKIP = {"source", "sha256", "variant", "role", "n", "rank", "error"}  # counts, ranks and 1 − accuracy add columns, not information
_RESULT_KEYS = ("source", "path", "checkpoint", "file")


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) pushed."""

    repo_id: str
    revision: str
    library: str
    files: list[str]
    dry_run: bool
    folder: str | None = None           # the dry-run folder
    url: str | None = None              # the repo's URL after a push
    commit: str | None = None           # the commit id after a push
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


# --- weights and provenance ---------------------------------------------------------------------------------------

def _pickle_provenance(ck: Checkpoint) -> dict | None:
    """weightspace writes .pt files as {"state_dict": ..., "weightspace": json}; safetensors keep it in metadata."""
    if len(ck.files) != 1 or ck.files[0].suffix not in (".pt", ".pth", ".bin"):
        return None
    with contextlib.suppress(WeightspaceError, AttributeError, ValueError, TypeError):
        raw = load_pickle(ck.files[0])
        if isinstance(raw, Mapping) and isinstance(raw.get("weightspace"), str):
            return json.loads(raw["weightspace"])
    return None


def _write_weights(source: Any, dest: Path) -> Checkpoint:
    """Write the weights as safetensors at dest: a plain safetensors file is copied byte for byte, the rest via save."""
    from ..io.outputs import TensorStream
    from ..io.save import save
    from ..io.formats import SafetensorsReader
    if isinstance(source, (TensorStream, Mapping)) and not isinstance(source, Checkpoint):
        save(source, dest)
        return load(dest)
    if hasattr(source, "state_dict") and not isinstance(source, Checkpoint):  # an nn.Module
        save(source, dest)
        return load(dest)
    ck = load(source)
    if len(ck.files) == 1 and ck.files[0].suffix == ".safetensors" and not ck.variant:
        reader = SafetensorsReader(ck.files[0])
        same_keys = set(reader.tensors) == set(ck)
        reader.close()
        if same_keys:  # keys need no normalising: upload the user's file itself, so its sha256 stays the same
            shutil.copyfile(ck.files[0], dest)
            return load(dest)
    save(ck, dest, provenance=_pickle_provenance(ck))
    return load(dest)


# --- run folder and model card ------------------------------------------------------------------------------------

@dataclass
class RunFolder:
    """What an evaluation run folder (``--out DIR``) holds; every part is optional."""

    path: Path | None = None
    results: dict | None = None
    leaderboard: list[list[str]] | None = None
    curve: Path | None = None
    notes: list[str] = field(default_factory=list)


def read_run_folder(path: str | os.PathLike | None) -> RunFolder:
    """Read results.json, leaderboard.csv and curve.png from a run folder, tolerating any of them being absent."""
    if path is None:
        return RunFolder()
    p = Path(path)
    if not p.is_dir():
        raise HubError(f"card_from={p}: must be a run folder (written by --out DIR)", path=p, param="card_from")
    run = RunFolder(p)
    if (p / "results.json").is_file():
        try:
            run.results = json.loads((p / "results.json").read_text())
        except ValueError as e:
            run.notes.append(f"{p / 'results.json'}: not valid JSON ({e}); left out of the card")
    if (p / "leaderboard.csv").is_file():
        with open(p / "leaderboard.csv", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        run.leaderboard = rows or None
    if (p / "curve.png").is_file():
        run.curve = p / "curve.png"
    if run.results is None and run.leaderboard is None and run.curve is None:
        run.notes.append(f"{p}: holds none of results.json, leaderboard.csv, curve.png; the card has no scores")
    return run


def _display(source: str) -> str:
    """How a source appears on the card: local paths shortened to the file name (a reader cannot open them)."""
    name, q = split_query(source)
    if "file" in q:
        return f"{name} (weights {Path(q['file']).name})"
    if ":" in source.split("/")[0] and not Path(source).exists():
        return source
    return Path(source).name or source


def _flat_scores(d: Mapping, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if k in _SCORE_SKIP or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, Mapping):
            out.update(_flat_scores(v, f"{prefix}{k} "))
    return out


def _scores_from_results(results: Any, source: str) -> dict[str, float]:
    """Numeric fields of the results.json entries that describe this ingredient (matched by source or file name)."""
    found: dict[str, float] = {}
    if isinstance(results, Mapping):
        for key in _RESULT_KEYS:
            v = results.get(key)
            if isinstance(v, str) and (v == source or Path(v).name == Path(source).name):
                found.update(_flat_scores(results))
                break
        for v in results.values():
            found.update({k: s for k, s in _scores_from_results(v, source).items() if k not in found})
    elif isinstance(results, list):
        for v in results:
            found.update({k: s for k, s in _scores_from_results(v, source).items() if k not in found})
    return found


def _ingredient_rows(prov: Mapping, run: RunFolder) -> list[dict]:
    """One {column: value} row per ingredient: display name, sha256, coefficient, role/variant, scores."""
    ings = [i for i in prov.get("ingredients", []) if isinstance(i, Mapping)]
    coeffs = prov.get("coefficients") or []
    rows = []
    for i, ing in enumerate(ings):
        source = str(ing.get("source", "?"))
        scores = _flat_scores(ing)
        if run.results is not None:
            scores.update({k: v for k, v in _scores_from_results(run.results, source).items() if k not in scores})
        row: dict[str, Any] = {"#": i + 1, "source": f"`{_display(source)}`", "sha256": f"`{ing.get('sha256', '')}`"}
        if coeffs:
            row["coefficient"] = float(coeffs[i]) if i < len(coeffs) else ""
        row.update({c: ing[c] for c in ("role", "variant", "commit") if c in ing})
        row.update(scores)
        rows.append(row)
    return rows


def _run_settings(results: Mapping) -> dict:
    """The run's scalar settings, local paths shown by file name (a reader cannot open them)."""
    out = {}
    for k, v in results.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            continue
        out[k] = _display(v) if isinstance(v, str) and _looks_local(v) else v
        if len(out) == 20:
            break
    return out


def _looks_local(value: str) -> bool:
    name, _ = split_query(value)
    if ":" in name.split("/")[0]:  # a scheme (hf://, timm:, digits:val)
        return False
    return "/" in value or os.sep in value or Path(value).suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _public(obj: Any) -> Any:
    """The provenance as the card shows it: every local path shortened to its file name (readers cannot open the
    uploader's paths, and they say where someone keeps their files); the weights file itself keeps it whole."""
    if isinstance(obj, Mapping):
        return {k: _public(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    if isinstance(obj, str) and _looks_local(obj):
        return _display(obj)
    return obj


def _license_of(prov: Mapping) -> str | None:
    """The license of timm pretrained ingredients (timm's pretrained config names it), when they all agree."""
    found = set()
    for ing in prov.get("ingredients", []) or []:
        source = str(ing.get("source", "")) if isinstance(ing, Mapping) else ""
        if not source.startswith("timm:") or "file" in split_query(source[5:])[1]:
            return None
        try:
            import timm
            cfg = timm.models.get_pretrained_cfg(split_query(source[5:])[0])
        except Exception:  # noqa: BLE001 — an unknown name has no license to report
            return None
        found.add(getattr(cfg, "license", None))
    return found.pop() if len(found) == 1 and None not in found else None


def model_card(repo_id: str, prov: Mapping | None, library: str, run: RunFolder, base: list[str],
               config_source: str, weights_name: str, license: str | None = None) -> str:
    """README.md: front matter, method and paper, ingredients, scores, leaderboard, curve, usage, raw provenance
    (gathered here, rendered by weightspace.report.card). ``prov`` None: weights not made by weightspace."""
    op = str((prov or {}).get("op", ""))
    entry = method_entry(op)
    data = CardData(repo_id, library, weights_name, str((prov or {}).get("weightspace_version", __version__)),
                    provenance=_public(dict(prov)) if prov else None, license=license, base_models=list(base),
                    leaderboard=[[(_display(c) if isinstance(c, str) and _looks_local(c) else c) for c in r]
                                 for r in run.leaderboard] if run.leaderboard else None,
                    run=_run_settings(run.results) if isinstance(run.results, Mapping) else {},
                    curve=run.curve is not None, config_source=config_source)
    if prov:
        data.title = entry.title if entry else (op.replace("_", " ").capitalize() or "Checkpoint")
        data.summary = entry.summary if entry else ""
        data.citation = entry.paper.cite() if entry and entry.paper else ""
        data.details = {k: prov[k] for k in ("alpha", "rule", "keep", "density", "trim", "lambda", "scale",
                                             "precision", "dtype", "soup_val_score") if k in prov}
        data.merge_relation = bool(base) and entry is not None and entry.name != "align"
        data.ingredients = _ingredient_rows(prov, run)
        cands = [c for c in prov.get("candidates", []) if isinstance(c, Mapping)]
        data.candidates = [[f"`{_display(str(c.get('source')))}`", c.get("val_score", ""),
                            "yes" if c.get("kept") else "no"] for c in cands]
        if op == "greedy_soup":
            kept = len(prov.get("ingredients", []) or [])
            first = (prov.get("ingredients") or [{}])[0]
            data.greedy = (kept, len(cands) or kept, _display(str(first.get("source", "?"))))
    return render_card(data)


# --- folder and push ----------------------------------------------------------------------------------------------

def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not isinstance(repo_id, str) or repo_id.count("/") > 1:
        raise HubError(f"{repo_id}: invalid repository name (expected NAME or ORG/NAME)", repo_id=repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id}: invalid repository name ({str(e).splitlines()[0]})", repo_id=repo_id) from None


def _folder_config(source: Any) -> dict | None:
    """The timm config.json (or open_clip_config.json) of a Hugging Face folder being pushed, if it has one."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    for name, kind in (("open_clip_config.json", "open_clip"), ("config.json", "timm")):
        p = Path(source) / name
        if p.is_file():
            with contextlib.suppress(OSError, ValueError):
                cfg = json.loads(p.read_text())
                if isinstance(cfg, dict) and (kind == "open_clip" or "architecture" in cfg):
                    return {**cfg, "library": kind}
    return None


def build_folder(checkpoint_or_path: Any, repo_id: str, folder: str | os.PathLike, *,
                 card_from: str | os.PathLike | None = None, model_config: Mapping | None = None,
                 license: str | None = None) -> PushResult:
    """Write what would be pushed into an existing empty ``folder``: weights, config, README.md, curve.png.

    A Hugging Face folder's own config.json (timm) or open_clip_config.json decides the library unless
    ``model_config`` is given. ``license`` (an SPDX-like id such as apache-2.0) goes into the card's front matter;
    without it, timm ingredients' common license is used. Raises HubError when the config does not fit."""
    folder = Path(folder)
    run = read_run_folder(card_from)
    notes = list(run.notes)
    tmp_weights = folder / "weights.safetensors"
    own = _folder_config(checkpoint_or_path)
    ck = _write_weights(checkpoint_or_path, tmp_weights)
    prov = ck.provenance or {}
    if not prov:
        notes.append("the checkpoint carries no weightspace provenance: the card lists no method or ingredients")
    license = license or _license_of(prov)
    if not license:
        notes.append("no license in the card: give one with --license (e.g. apache-2.0, mit, cc-by-4.0)")
    explicit = dict(model_config) if model_config else None
    from_folder = explicit is None and own is not None
    if from_folder:
        explicit = dict(own)
    source_of = "folder's own config" if from_folder else "given model config"
    cfg, config_source = (explicit, source_of) if explicit else infer_model_config(prov, run.results)
    library = "pytorch"
    configs: dict[str, dict] = {}
    base_tag = None
    base = base_models(prov)
    if cfg is not None:
        kind = cfg.get("library") or ("open_clip" if ("model_cfg" in cfg or "open_clip_arch" in cfg) else "timm")
        try:
            if kind == "timm":
                if "architecture" not in cfg:
                    raise HubError("a timm model config needs 'architecture'")
                srcs = [str(i.get("source", "")) for i in prov.get("ingredients", []) if isinstance(i, Mapping)]
                if srcs and all(s.startswith("timm:") and "file" not in split_query(s[5:])[1] for s in srcs):
                    from timm.models import split_model_name_tag
                    base_tag = split_model_name_tag(split_query(srcs[0][5:])[0])[1] or None
                configs["config.json"] = timm_config(cfg, ck, base_tag)
                if from_folder:  # checked against the weights above; the folder's own file is pushed as it is
                    configs["config.json"] = {k: v for k, v in own.items() if k != "library"}
            elif kind == "open_clip":
                configs["open_clip_config.json"] = open_clip_config(cfg, ck)
            else:
                raise HubError(f"model config library '{kind}': expected timm or open_clip")
            library = kind
        except HubError as e:
            if explicit:
                raise HubError(f"{repo_id}: {e}", repo_id=repo_id, path=e.path) from None
            # An inferred config that does not fit (e.g. an image tower + head) is only a missed convenience.
            notes.append(f"no {kind} config written ({config_source}): {e}")
    ck.close()
    weights_name = WEIGHTS_NAME[library]
    os.replace(tmp_weights, folder / weights_name)
    for name, data in configs.items():
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    if run.curve is not None:
        shutil.copyfile(run.curve, folder / "curve.png")
    card = model_card(repo_id, prov or None, library, run, base, config_source if library != "pytorch" else "",
                      weights_name, license=license)
    (folder / "README.md").write_text(card, encoding="utf-8")
    files = sorted(p.name for p in folder.iterdir())
    return PushResult(repo_id, "main", library, files, dry_run=True, notes=notes)


def _source_files(source: Any) -> list[Path]:
    """The files a source given as a path reads (a folder's files), never to be replaced by the dry run."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    p = Path(os.path.expanduser(str(source)))
    with contextlib.suppress(OSError):
        return sorted(p.iterdir()) if p.is_dir() else [p]
    return []


def _dry_run(source: Any, repo_id: str, target: Path, force: bool, **build: Any) -> PushResult:
    """Build the folder that would be pushed in a staging folder beside ``target``, then move its files into
    ``target`` by the one writer rule: an existing file is refused (before any work) without ``force``; with it
    only the files written now and those an earlier dry run's manifest lists are replaced or removed."""
    from ..files import atomic_output, check_targets, make_folder, prune_manifest, read_manifest, write_manifest
    if os.path.lexists(target) and not target.is_dir():
        raise OutputExists(f"{target}: exists and is not a folder", path=target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise HubError(f"{target}: folder {parent} does not exist", path=target)
    every = [*WEIGHTS_NAME.values(), "config.json", "open_clip_config.json", "curve.png", "README.md"]
    check_targets([target / n for n in dict.fromkeys(every)], force, root=target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        result = build_folder(source, repo_id, staging, **build)
        previous = read_manifest(target) if target.is_dir() else {}
        names = sorted(p.name for p in staging.iterdir())
        check_targets([target / n for n in names], force, inputs=_source_files(source), root=target)
        make_folder(target)
        for n in names:
            with atomic_output(target / n, force) as tmp:
                shutil.copyfile(staging / n, tmp)
        write_manifest(target, [target / n for n in names])
        prune_manifest(target, previous, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def push_to_hub(checkpoint_or_path: Any, repo_id: str, *, private: bool = False, revision: str = "main",
                card_from: str | os.PathLike | None = None, token: str | None = None,
                dry_run_dir: str | os.PathLike | None = None, model_config: Mapping | None = None,
                commit_message: str | None = None, force: bool = False, license: str | None = None) -> PushResult:
    """Push a checkpoint with its model card (and timm/open_clip config) to ``repo_id``; or write it to dry_run_dir.

    ``model_config`` overrides what is inferred from the provenance and the run folder: for timm
    ``{"architecture": "resnet18", "num_classes": 10[, "pretrained_cfg": {...}]}``, for open_clip
    ``{"open_clip_arch": "ViT-B-32"}`` or ``{"model_cfg": {...}[, "preprocess_cfg": {...}]}``.
    The token comes from ``token``, else from huggingface_hub's usual places (HF_TOKEN, stored login).

    Raises:
        HubError: a bad repository name or revision, offline mode, no token, a config that does not fit the
            weights, or the Hub's refusal (401, 403, 400, ...) or silence, mapped by ``errors.hub_push_error``.
        OutputExists: a file the dry run writes exists in ``dry_run_dir`` and ``force`` is False (with it, only
            those files and an earlier dry run's are replaced; nothing else in the folder is touched).
        CheckpointError, SourceError: the checkpoint cannot be read.
    """
    _validate_repo_id(repo_id)
    if not revision or not isinstance(revision, str):
        raise HubError(f"revision={revision!r}: must be a branch name (pushing to {repo_id})", repo_id=repo_id,
                       param="revision")
    if dry_run_dir is not None:
        target = Path(dry_run_dir)
        result = _dry_run(checkpoint_or_path, repo_id, target, force, card_from=card_from,
                          model_config=model_config, license=license)
        result.revision, result.folder = revision, str(target)
        return result

    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed (unset it, or use dry_run='DIR')",
                       repo_id=repo_id)
    token = token or get_token()
    if not token:
        raise HubError(f"{repo_id}: no Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                       f"(or use dry_run='DIR' to see what would be pushed)", repo_id=repo_id)
    with tempfile.TemporaryDirectory(prefix="ws-push-") as d:
        result = build_folder(checkpoint_or_path, repo_id, d, card_from=card_from, model_config=model_config,
                              license=license)
        api = HfApi(token=token)
        message = commit_message or f"Upload {result.library} checkpoint with weightspace {__version__}"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            full_id = url.repo_id or repo_id  # a bare NAME lands in the token owner's namespace
            if revision != "main":
                api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(d) / name)) for name in result.files]
            info = api.create_commit(full_id, ops, commit_message=message, revision=revision, repo_type="model")
        except Exception as e:
            # huggingface_hub's HTTP client (httpx) raises its own transport errors, not OSError.
            transport = type(e).__module__.split(".")[0] in ("httpx", "httpx2")
            # ValueError: the client's own checks (e.g. README metadata the Hub calls invalid).
            if isinstance(e, (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError)) or transport:
                raise hub_push_error(repo_id, e, token=token) from None
            raise
    result.repo_id, result.revision, result.dry_run = full_id, revision, False
    result.url, result.commit = str(url), info.oid
    return result

"""Save state dicts and streamed op results: safetensors by default, atomically, with provenance metadata.

Three shapes of output, each what other tools load directly:
- ``x.safetensors``: one file; provenance in its ``weightspace`` metadata key.
- ``x.pt|.pth|.bin``: a plain state dict (``model.load_state_dict(torch.load(x, weights_only=True))`` works); provenance beside it in
  ``x.pt.weightspace.json``.
- ``DIR/`` (or ``folder=True``): a Hugging Face folder as ``save_pretrained`` writes it: ``model.safetensors``, or
  shards ``model-00001-of-0000N.safetensors`` past ``max_shard_size`` with ``model.safetensors.index.json`` written
  last; the non-weight files of the first ingredient's folder or Hub repo copied, sub-folders included (io.companions).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Union

import torch

from .._version import __version__
from .checkpoint import PROVENANCE_SUFFIX, Checkpoint, find_aliases
from ..errors import CheckpointError, ConfigError, OutputExists
from .outputs import TensorStream, finish_provenance
from .sizes import parse_size
from ..files import (atomic_output, check_targets, exists_error, make_folder, prune_manifest, read_manifest,
                     write_manifest, writes_discarded)
from .formats import header_for, write_safetensors
from .local import WEIGHT_SUFFIXES
from .companions import copy_companions, companion_files

__all__ = ["save", "OUTPUT_DTYPES", "DEFAULT_MAX_SHARD_SIZE", "PROVENANCE_SUFFIX", "INDEX_NAME"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
PLACEHOLDER = "0" * 64
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
Savable = Union[TensorStream, Mapping, torch.nn.Module]


def _format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("safetensors", "pt"):
            raise ConfigError(f"fmt={fmt}: expected safetensors or pt", param="fmt")
        return fmt
    return "pt" if path.suffix in PICKLE_SUFFIXES else "safetensors"


def _portable_source(source: str, out: Path) -> str:
    """A local ingredient path as seen from the output's folder, so that the same inputs give the same bytes
    wherever the run lives (the sha256 beside it still identifies the file); other sources unchanged."""
    if "://" in source or source.startswith(("<", "hf-hub:", "timm:", "open_clip:")) or not os.path.exists(source):
        return source
    return os.path.relpath(os.path.abspath(source), os.path.abspath(out.parent if str(out.parent) else "."))


def _portable(prov: dict, out: Path) -> dict:
    """Provenance with local ingredient paths relative to the output's folder (every output form)."""
    for field in ("ingredients", "candidates"):  # a greedy soup records the candidates it tried beside the kept
        listed = prov.get(field)
        if isinstance(listed, list):
            prov = dict(prov, **{field: [dict(i, source=_portable_source(i["source"], out))
                                         if isinstance(i, dict) and isinstance(i.get("source"), str) else i
                                         for i in listed]})
    return prov


def _dump(prov: dict, out: Path) -> str:
    return json.dumps(_portable(prov, out), sort_keys=True, separators=(",", ":"), allow_nan=True)


def _meta(prov: dict, out: Path) -> dict[str, str]:
    # "format": "pt" is what save_pretrained writes and what transformers and huggingface_hub require to load
    return {"format": "pt", "weightspace": _dump(prov, out)}


def _human(n: int) -> str:
    for unit, f in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def _nbytes(entry: tuple[str, torch.dtype, tuple[int, ...]]) -> int:
    return entry[1].itemsize * math.prod(entry[2])


def _as_stream(obj: Savable, where: Path) -> TensorStream:
    """A state dict as a TensorStream (keys sorted), so that every output shape is written by one writer."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, TensorStream):
        return obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"cannot save a {type(obj).__name__}")
    sd = {k: obj[k] for k in obj}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            raise ConfigError(f"{where}: value of key '{k}' is a {type(v).__name__}, not a tensor")
    prov = dict(getattr(obj, "provenance", None) or (obj.provenance or {} if isinstance(obj, Checkpoint) else {}))
    prov.setdefault("weightspace_version", __version__)
    tied = find_aliases(sd)
    if tied:
        prov["tied"] = dict(sorted(tied.items()))
    keys = sorted(sd)
    return TensorStream([(k, sd[k].dtype, tuple(sd[k].shape)) for k in keys],
                        lambda: ((k, sd[k].detach()) for k in keys), prov, [], tied)


def _cast(stream: TensorStream, dtype: str) -> TensorStream:
    """Floating tensors cast to ``dtype`` as they stream (integer and bool buffers as they are)."""
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype={dtype}: expected one of {', '.join(OUTPUT_DTYPES)}", param="dtype")
    to = OUTPUT_DTYPES[dtype]

    def cast(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for k, t in items:
            yield k, (t.to(to) if t.dtype.is_floating_point else t)

    entries = [(k, to if d.is_floating_point else d, s) for k, d, s in stream.entries]
    pieces = stream.pieces
    return replace(stream, entries=entries, produce=lambda: cast(stream.produce()),
                   pieces=(lambda: cast(pieces())) if pieces is not None else None,
                   provenance={**stream.provenance, "dtype": dtype})


class _Pushback:
    """An iterator of (key, piece) that a shard writer can stop at the first key of the next shard."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]):
        self._it, self._held = it, None

    def take(self, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pieces while their key is in ``keys``; the first other piece is kept for the next call."""
        while True:
            if self._held is None:
                self._held = next(self._it, None)
                if self._held is None:
                    return
            if self._held[0] not in keys:
                return
            item, self._held = self._held, None
            yield item


def _finished(stream: TensorStream, hashes: list[str]) -> dict:
    # weights in memory carry their provenance complete already (ingredients hashed when it was made)
    if not stream.ingredients:
        return dict(stream.provenance)
    return finish_provenance(stream.provenance, stream.ingredients, hashes)


def _write_safetensors_files(stream: TensorStream, files: list[tuple[Path, list]], extra: dict, force: bool) -> None:
    """Stream the tensors into one or more safetensors files (consecutive runs of the stream's entries), each
    written to a temp file beside it and renamed into place only when all are complete.

    Every header holds the provenance with the ingredients' sha256: they are hashed in a thread while tensors
    stream, and the placeholders are patched in place at the end (same length, so no data moves)."""
    # One hashing thread per core (hashlib releases the GIL): cold, hashing is the slowest part of a soup.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(stream.ingredients), cores))
    with ThreadPoolExecutor(max_workers=workers) as pool, contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_output(path, force)) for path, _ in files]
        futures = [pool.submit(c.sha256) for c in stream.ingredients]
        try:
            placeholder = _finished(stream, [PLACEHOLDER] * len(futures))
            placeholder.update(extra)
            data = _Pushback(stream.pieces() if stream.pieces is not None else iter(stream))
            for tmp, (_, entries) in zip(temps, files):
                write_safetensors(tmp, entries, data.take({e[0] for e in entries}),
                                  _meta(placeholder, files[0][0]))
            final = _finished(stream, [f.result() for f in futures])
        except BaseException:
            for f in futures:  # bad input: report it now, not after hashing every remaining ingredient
                f.cancel()
            raise
        final.update(extra)
        for tmp, (path, entries) in zip(temps, files):
            head_old, _ = header_for(entries, _meta(placeholder, files[0][0]))
            head_new, _ = header_for(entries, _meta(final, files[0][0]))
            if len(head_old) != len(head_new):
                raise CheckpointError(f"{path}: internal error: provenance changed size while patching", path=path)
            if str(tmp) != os.devnull:
                with open(tmp, "r+b") as f:
                    f.write(head_new)


def _write_pickle(stream: TensorStream, path: Path, extra: dict, force: bool) -> None:
    """A plain state dict (what load_state_dict takes), provenance in PATH.weightspace.json beside it."""
    sidecar = path.with_name(path.name + PROVENANCE_SUFFIX)
    sd = dict(stream.produce())
    prov = {**_finished(stream, [c.sha256() for c in stream.ingredients]), **extra}
    with atomic_output(path, force) as tmp, atomic_output(sidecar, True) as tmp_side:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, tmp)
        Path(tmp_side).write_text(json.dumps(_portable(prov, path), indent=1, sort_keys=True, allow_nan=True) + "\n")


def _first_source(stream: TensorStream) -> str | None:
    if stream.ingredients:
        return stream.ingredients[0].source
    ings = stream.provenance.get("ingredients") or []
    first = ings[0] if ings and isinstance(ings[0], Mapping) else {}
    return first.get("source") if isinstance(first.get("source"), str) else None


def _inputs(stream: TensorStream, companions: list[Path] = ()) -> list[Path]:
    """The files this save reads or was made from: the ingredients' weight files (and their folders' index), the
    local files its provenance names as ingredients (weights computed in memory: align, searches), the companions."""
    out = [f for c in stream.ingredients for f in c.files] + list(companions)
    for ing in stream.provenance.get("ingredients") or []:
        src = ing.get("source") if isinstance(ing, Mapping) else None
        if isinstance(src, str) and "://" not in src:
            p = Path(os.path.expanduser(src.split("?", 1)[0]))
            with contextlib.suppress(OSError, ValueError):
                out += sorted(p.iterdir()) if p.is_dir() else [p] if p.is_file() else []
    return out + [f.parent / INDEX_NAME for f in out]


def _foreign_weights(folder: Path, names: list[str], previous: Mapping[str, dict]) -> list[Path]:
    """Weight files in ``folder`` that this save does not write and weightspace did not write (its manifest does
    not list them): beside the new weights they would make the folder ambiguous, so the save is refused."""
    found = [folder / SINGLE_NAME, folder / INDEX_NAME]
    with contextlib.suppress(OSError):
        found += sorted(folder.glob("model-*-of-*.safetensors"))
    return [p for p in found if os.path.lexists(p) and p.name not in names and p.name not in previous]


def _shards(entries: list, limit: int) -> list[list]:
    """Consecutive runs of entries of at most ``limit`` bytes each (a larger tensor alone in its shard)."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = _nbytes(e)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _save_folder(stream: TensorStream, folder: Path, kind: str, extra: dict, force: bool, limit: int) -> Path:
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputExists(f"{folder}: exists and is not a folder", path=folder)
    if kind == "pt":
        raise ConfigError(f"{folder}: an output folder holds safetensors weights (drop --format pt, or name a file)")
    shards = _shards(stream.entries, limit)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    companions = companion_files(_first_source(stream), skip=folder)
    writes = names + [rel for rel, _ in companions] + ([INDEX_NAME] if n > 1 else [])
    previous = read_manifest(folder) if folder.is_dir() else {}
    check_targets([folder / w for w in writes], force, inputs=_inputs(stream, [p for _, p in companions]),
                  root=folder)
    foreign = _foreign_weights(folder, writes, previous) if folder.is_dir() else []
    if foreign and not force:
        raise exists_error(foreign[0])
    if foreign:
        raise OutputExists(f"{foreign[0]}: weights that weightspace did not write; not replaced, even with force=True "
                           f"(remove them or write elsewhere)", path=foreign[0])
    created = not folder.exists()
    make_folder(folder)
    copied: list[Path] = []
    written: list[Path] = []
    try:
        copied = copy_companions(companions, folder, force=force)
        written += [p for p in copied if not p.is_dir()]
        _write_safetensors_files(stream, [(folder / name, s) for name, s in zip(names, shards)], extra, force)
        written += [folder / name for name in names]
        if n > 1:  # the index last: a reader that finds it finds every shard complete
            index = {"metadata": {"total_size": sum(_nbytes(e) for e in stream.entries)},
                     "weight_map": {e[0]: name for name, s in zip(names, shards) for e in s}}
            with atomic_output(folder / INDEX_NAME, force) as tmp:
                Path(tmp).write_text(json.dumps(index, indent=2) + "\n")
            written.append(folder / INDEX_NAME)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                for p in copied:  # files first, then the sub-folders made for them
                    if p.is_dir():
                        p.rmdir()
                    else:
                        p.unlink(missing_ok=True)
                folder.rmdir()
        raise
    if not writes_discarded():
        write_manifest(folder, written)
        prune_manifest(folder, previous, {p.name for p in written})  # what the previous save wrote, and only that
    return folder


def save(obj: Savable, path: str | os.PathLike, *, provenance: dict | None = None, force: bool = False,
         fmt: str | None = None, dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
         folder: bool | None = None) -> Path:
    """Write a state dict, module or streamed op result atomically, with provenance; returns the path written.

    Args:
        obj: the weights (a streamed op result is written tensor by tensor, never held whole).
        path: ``x.safetensors`` (default format), ``x.pt|.pth|.bin`` (a plain pickled state dict, provenance in
            ``x.pt.weightspace.json``), or a folder (a path ending in '/' or an existing folder, or ``folder=True``):
            a Hugging Face folder, sharded past ``max_shard_size``. A missing parent folder is created.
        provenance: extra provenance entries. force: replace the files this save writes (in a folder, also the
            files the previous save's manifest lists and that are still as it wrote them; nothing else). An input
            being read is never replaced. fmt: "safetensors" or "pt" instead of the extension's.
        dtype: "bf16", "fp16" or "fp32": floating tensors are cast to it (integer buffers are kept).
        max_shard_size: bytes or '5GB'; a single file past it is refused (write a folder).

    Raises:
        OutputExists: the output exists and ``force`` is false; it is an input; a folder holds weights that
        weightspace did not write. ConfigError: bad options, a non-tensor value,
        or a single file past ``max_shard_size``.
    """
    # An existing folder is written into only when its name is not a weights file's: '-o x.safetensors' naming a
    # folder is a mistake to report, not a folder output. os.path.isdir is False (not an error) for a name too long.
    is_folder = folder if folder is not None else (
        str(path).endswith(("/", os.sep)) or (os.path.isdir(path) and Path(path).suffix not in WEIGHT_SUFFIXES))
    path = Path(path)
    kind = _format(path, fmt)
    stream = _as_stream(obj, path)
    if dtype:
        stream = _cast(stream, dtype)
    extra = dict(provenance or {})
    limit = parse_size(max_shard_size, "--max-shard-size")
    if is_folder:
        return _save_folder(stream, path, kind, extra, force, limit)
    total = sum(_nbytes(e) for e in stream.entries)
    if total > limit:
        raise ConfigError(f"{path}: {_human(total)} of weights exceeds the maximum shard size of {_human(limit)}; "
                          f"write a folder of shards with -o {path.with_suffix('')}/ (or raise --max-shard-size)")
    targets = [path, path.with_name(path.name + PROVENANCE_SUFFIX)] if kind == "pt" else [path]
    check_targets(targets, force, inputs=_inputs(stream))
    created = not path.parent.exists()
    make_folder(path.parent)
    try:
        if kind == "pt":
            _write_pickle(stream, path, extra, force)
        else:
            _write_safetensors_files(stream, [(path, stream.entries)], extra, force)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        raise
    return path

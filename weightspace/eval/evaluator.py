"""Evaluator: one model instance, weights copied in place, datasets resident on the device, metrics in one sync.

Images arrive as uint8 (a quarter of float32's bytes) and are normalised per batch on the device. A dataset too
big for the device stays in host memory (usually the data cache's memory map) and is streamed in pinned chunks,
the copy of the next chunk overlapping the forward passes on the current one. On CUDA, 4-D inputs and the model
are channels-last and forward passes run under bf16 autocast.

Under torch.distributed (launched by torchrun, WORLD_SIZE > 1) each rank evaluates a contiguous shard of every
dataset and the per-example results are gathered, so every rank computes exactly the single-process metrics.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import Source
from ..io.sources import load
from .data import TensorData
from .data.labels import apply_label_map
from .distributed import parallel_mode, world
from ..errors import ConfigError, IncompatibleCheckpoints, misfit

__all__ = ["resolve_device", "Metrics", "macro_auc", "recalibrate_bn", "as_datasets", "Evaluator", "stream_batches"]


_said: set[tuple[str, str]] = set()  # (source, prefix) pairs already reported on stderr


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → cuda when available (this rank's GPU under torchrun), else cpu.

    Raises:
        ConfigError: a device other than auto, cpu or cuda[:N], or cuda where CUDA is not available.
        TypeError: ``device`` is neither a string nor a torch.device.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda[:N]' or a torch.device, not {type(device).__name__}")
    if device == "auto":
        if torch.cuda.is_available():
            import os
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device}: expected auto, cpu or cuda[:N]", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine", param="device")
    return dev


class Metrics(dict):
    """dataset name → {"accuracy", "error", "loss"(, "auc")}; float(metrics) is the first dataset's accuracy."""

    def __init__(self, *args: Any, logits: dict[str, torch.Tensor] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.logits = logits or {}

    def __float__(self) -> float:
        return float(next(iter(self.values()))["accuracy"]) if self else float("nan")

    @property
    def score(self) -> float:
        """Accuracy on the first dataset (what greedy soups maximise)."""
        return float(self)


def macro_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro-averaged ROC AUC over labels with both classes present (rank statistic, ties averaged)."""
    aucs = []
    for c in range(targets.shape[1]):
        t = targets[:, c] > 0.5
        pos, neg = int(t.sum()), int((~t).sum())
        if pos == 0 or neg == 0:
            continue
        s = scores[:, c].double()
        order = torch.argsort(s)
        ranks = torch.empty_like(s)
        ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
        # average ranks of tied scores
        uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
        if len(uniq) < len(s):
            sums = torch.zeros(len(uniq), dtype=torch.float64, device=s.device).index_add_(0, inv, ranks)
            ranks = (sums / counts)[inv]
        aucs.append(float((ranks[t].sum() - pos * (pos + 1) / 2) / (pos * neg)))
    return sum(aucs) / len(aucs) if aucs else float("nan")


def recalibrate_bn(model: nn.Module, data: TensorData, batch_size: int = 256, device: torch.device | None = None) -> None:
    """Re-estimate BatchNorm running statistics with one pass in train mode (cumulative average, no gradients)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {}
    for m in bns:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative moving average, as torch.optim.swa_utils.update_bn does
    was_training = model.training
    model.train()
    dev = device or next(model.parameters()).device
    with torch.no_grad():
        for xb, _ in data.batches(batch_size, dev):
            model(xb)
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)


def as_datasets(data: TensorData | Sequence[TensorData] | Mapping[str, TensorData]) -> dict[str, TensorData]:
    """Normalise one dataset, a list or a dict into a dict keyed by name.

    An empty list or dict gives an empty dict: such an evaluator loads weights into its model (probes and
    similarity use it so) but refuses to evaluate.

    Raises:
        ConfigError: two datasets share a name.
        TypeError: ``data`` is not a TensorData, a list or a dict of them.
    """
    if isinstance(data, TensorData):
        return {data.name: data}
    if isinstance(data, Mapping):
        out = dict(data)
        items = list(out.values())
    elif isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data: expected a TensorData, a list or a dict of them (load_data(spec) makes one), not "
                        f"{type(data).__name__}")
    else:
        items = list(data)
    bad = [d for d in items if not isinstance(d, TensorData)]
    if bad:
        raise TypeError(f"data: expected TensorData items (load_data(spec) makes one), not {type(bad[0]).__name__}")
    if isinstance(data, Mapping):
        return out
    out = {}
    for d in items:
        if d.name in out:
            raise ConfigError(f"dataset {d.name} given twice")
        out[d.name] = d
    return out


class Evaluator:
    """Evaluate weights on datasets with one model instance: ``evaluator(weights) -> Metrics``."""

    def __init__(self, model: nn.Module, data: TensorData | Sequence[TensorData] | Mapping[str, TensorData], *,
                 batch_size: int | None = None, device: str | torch.device = "auto", amp: bool = True,
                 keep_logits: bool = False, parallel: str | None = None, stream: bool | None = None,
                 chunk_bytes: int = 256 << 20) -> None:
        """Evaluate ``model`` on ``data`` (one dataset, a list or a dict by name) on ``device``, in batches of
        ``batch_size``; under torchrun ``parallel`` says whether the data or the sweep points are shared out.
        Without ``batch_size``, on the CPU the largest batch whose activations fit a memory budget (one probe
        pass; ``batch_note`` says how it was chosen, see eval.batching), on a GPU 256.

        Raises:
            ConfigError: an unknown or unavailable device, an unknown ``parallel`` mode, a batch size below 1, or
                two datasets with one name.
            TypeError: ``model`` is not an nn.Module, or ``data`` is not TensorData (a list or dict of them).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Evaluator: model must be a torch.nn.Module (build_model(spec) makes one), not "
                            f"{type(model).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigError(f"Evaluator: batch_size must be a positive integer, not {batch_size!r}")
        self.device = resolve_device(device)
        # What derive() builds a variant from: the same options, this device, the model and data as placed here.
        self.options: dict[str, Any] = dict(batch_size=batch_size, device=self.device, amp=amp,
                                            keep_logits=keep_logits, parallel=parallel, stream=stream,
                                            chunk_bytes=chunk_bytes)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size or 0)  # 0: chosen below, once the data is placed
        self.batch_note: str | None = None
        self.amp = amp and self.device.type == "cuda"
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # None: stream only what does not fit on the device; True: always (tests the streaming path on CPU)
        self.stream = stream
        self.chunk_bytes = int(chunk_bytes)
        self.keep_logits = keep_logits
        # "data" (default under torchrun): shard every dataset across the ranks. "points": every rank holds all
        # the data and evaluates whole sweep points alone (distributed.sweep deals them out).
        self.parallel = parallel_mode(parallel)
        self.rank, self.world_size = world() if self.parallel == "data" else (0, 1)
        given = as_datasets(data)
        if not self.batch_size:  # before placing: shards are cut in whole batches
            from .batching import auto_batch_size
            self.batch_size, self.batch_note = auto_batch_size(self.model, next(iter(given.values()), None),
                                                               self.device)
            self.options["batch_size"] = self.batch_size  # derived evaluators keep it, without probing again
        self.datasets = {name: self._place(d) for name, d in given.items()}
        self._labels = {name: self._gather(d.y, d) for name, d in self.datasets.items()}  # full labels on every rank
        self._targets = dict(self.model.state_dict(keep_vars=True))
        self._optional = tuple(getattr(self.model, "optional_prefixes", ()))  # keys a checkpoint may lack
        self.forward_passes = 0  # full passes over a dataset, for overhead accounting

    def derive(self, *, datasets: Sequence[str] | None = None, keep_logits: bool | None = None) -> "Evaluator":
        """A variant of this evaluator on some of its datasets (``datasets``: their names, default all) and/or
        with another ``keep_logits``, built with the same constructor options. It shares this one's model and its
        device-resident data: nothing is copied, re-placed or re-decoded.

        Raises:
            ConfigError: a name is not one of this evaluator's datasets."""
        names = list(self.datasets) if datasets is None else list(datasets)
        unknown = [n for n in names if n not in self.datasets]
        if unknown:
            raise ConfigError(f"dataset {unknown[0]}: not one of the evaluator's ({', '.join(self.datasets)})")
        options = dict(self.options, **({} if keep_logits is None else {"keep_logits": keep_logits}))
        return self._variant({n: self.datasets[n] for n in names}, options)

    def _variant(self, datasets: Mapping[str, TensorData], options: dict[str, Any]) -> "Evaluator":
        """The constructor call derive makes; a subclass with constructor arguments of its own passes them on."""
        return Evaluator(self.model, datasets, **options)

    def _place(self, d: TensorData) -> TensorData:
        if d.meta.get("placed") == (self.device, self.rank, self.world_size):
            return d  # placed by the evaluator this one derives from
        d = self._placed(d)
        d.meta = {**d.meta, "placed": (self.device, self.rank, self.world_size)}
        return d

    def _placed(self, d: TensorData) -> TensorData:
        if self.world_size > 1:
            # Shard by whole global batches so every example meets exactly the batch it meets in a
            # single process: the logits, and so the metrics, are then bit-identical.
            lo, hi, n = self._shard_bounds(len(d), self.rank)
            d = d.subset(slice(lo, hi))
            d.meta = {**d.meta, "shard": (lo, hi, n)}
        if self.stream:
            d.meta = {**d.meta, "streamed": True}
            return d
        if self.device.type == "cuda" and self.stream is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            if d.x.numel() * d.x.element_size() > 0.5 * free:
                # too big to hold: x stays where it is (the cache's memory map), streamed in pinned chunks
                d = replace(d, y=d.y.to(self.device))
                d.meta = {**d.meta, "streamed": True}
                return d
        return d.to(self.device)

    def _shard_bounds(self, n: int, rank: int) -> tuple[int, int, int]:
        nb = -(-n // self.batch_size)
        lo = min(rank * nb // self.world_size * self.batch_size, n)
        hi = min((rank + 1) * nb // self.world_size * self.batch_size, n)
        return lo, hi, n

    def _misfit(self, given: set[str]) -> tuple[list[str], list[str]]:
        # a BatchNorm's num_batches_tracked is never read in evaluation, and published files often leave it out
        missing = sorted(k for k in set(self._targets) - given if not (self._optional and k.startswith(self._optional))
                         and not k.endswith("num_batches_tracked"))
        return missing, sorted(given - set(self._targets))

    def fit(self, weights: Source) -> Any:
        """``weights`` as they fit the model: when its keys do not fit but all do once one common leading prefix
        (a Lightning module's 'model.', a wrapper's name) is removed, a view without it, said once on stderr.
        Anything else is returned as it is (load() then names the keys that do not fit).

        Raises:
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
        """
        in_memory = (isinstance(weights, Mapping) and not hasattr(weights, "info")
                     and all(torch.is_tensor(v) for v in weights.values()))
        src = weights if in_memory else load(weights)
        keys = set(src)
        if not keys or not any(self._misfit(keys)):
            return src
        heads = {k.split(".", 1)[0] for k in keys}
        if len(heads) != 1 or not all("." in k for k in keys):
            return src
        prefix = next(iter(heads)) + "."
        stripped = {k[len(prefix):] for k in keys}
        if any(self._misfit(stripped)):
            return src
        name = getattr(src, "source", "<state dict>")
        if (name, prefix) not in _said:
            _said.add((name, prefix))
            from ..report.terminal import printable
            print(printable(f"weightspace: {name}: its keys fit the model once the prefix '{prefix}' is removed; "
                            f"removed it (?strip_prefix={prefix} or --strip-prefix {prefix} says so explicitly)"),
                  file=sys.stderr)
        if in_memory:
            out = type(src)() if isinstance(src, dict) else {}
            out.update({k[len(prefix):]: v for k, v in src.items()})
            return out
        return src.strip_prefix(prefix, why=" (found by fitting the model)")

    def load(self, weights: Source) -> None:
        """Copy a checkpoint's tensors into the model in place (no re-instantiation).

        Keys wrapped in one common prefix are unwrapped first (see fit).

        Raises:
            IncompatibleCheckpoints: keys or shapes do not fit the model.
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
        """
        src = self.fit(weights)
        name = getattr(src, "source", "<state dict>")
        given = set(src)
        missing, unexpected = self._misfit(given)
        if missing or unexpected:
            raise misfit(name, missing, unexpected)
        with torch.no_grad():
            for k, target in self._targets.items():
                if k not in given:  # an optional key (e.g. a CLIP classifier's head, built after loading)
                    continue
                t = src[k]
                if tuple(t.shape) != tuple(target.shape):
                    raise IncompatibleCheckpoints(f"{name}: key '{k}' has shape {list(t.shape)}, the model expects {list(target.shape)}",
                                                  path=name, key=k)
                target.copy_(t, non_blocking=True)
        hook = getattr(self.model, "after_load", None)
        if callable(hook):
            hook(given)

    def _inputs(self, d: TensorData):
        """Batches of model inputs on the device: sliced from resident data, or streamed chunk by chunk."""
        if not d.meta.get("streamed"):
            yield from (xb for xb, _ in d.batches(self.batch_size, self.device))
            return
        yield from stream_batches(d, self.batch_size, self.device, self.chunk_bytes)

    def _logits(self, d: TensorData) -> torch.Tensor:
        outs = []
        pool = d.meta.get("pool", "max")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            for xb in self._inputs(d):
                if self.channels_last and xb.ndim == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                outs.append(apply_label_map(self.model(xb).float(), d.label_map, pool))
        self.forward_passes += 1
        return torch.cat(outs) if outs else torch.empty(0)

    def _gather(self, t: torch.Tensor, d: TensorData) -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist
        n = d.meta["shard"][2]
        bounds = [self._shard_bounds(n, r)[:2] for r in range(self.world_size)]
        size = max(b - a for a, b in bounds)
        padded = torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: b - a] for p, (a, b) in zip(parts, bounds)])

    def metrics_from_logits(self, logits: Mapping[str, torch.Tensor]) -> Metrics:
        """Metrics of given logits (e.g. an ensemble's mean logits) on the full datasets; no forward pass."""
        out = Metrics()
        for name, lg in logits.items():
            out[name] = _metrics(lg, self._labels[name], self.datasets[name].multilabel)
        return out

    def __call__(self, weights: Source | None = None) -> Metrics:
        """Load ``weights`` (if given) and evaluate on every dataset.

        Raises:
            IncompatibleCheckpoints: ``weights`` do not fit the model.
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
            ConfigError: the evaluator was built without a dataset.
        """
        if not self.datasets:
            raise ConfigError("data: no dataset to evaluate on (Evaluator was given an empty list)")
        if weights is not None:
            self.load(weights)
        out = Metrics()
        for name, d in self.datasets.items():
            lg = self._gather(self._logits(d), d)
            out[name] = _metrics(lg, self._labels[name], d.multilabel)
            if self.keep_logits:
                out.logits[name] = lg.cpu()
        return out

    def recalibrate_bn(self, data: TensorData) -> None:
        """Re-estimate BatchNorm statistics of the loaded weights on ``data``."""
        recalibrate_bn(self.model, data.to(self.device), self.batch_size, self.device)


def stream_batches(d: TensorData, batch_size: int, device: torch.device, chunk_bytes: int = 256 << 20
                   ) -> Iterator[torch.Tensor]:
    """Model inputs of host-resident ``d`` (e.g. memory-mapped): chunks of whole batches are copied into one of two
    pinned buffers and sent to the device asynchronously on a side stream while the previous chunk is computed on."""
    n = len(d)
    if n == 0:
        return
    row = max(1, d.x[:1].numel() * d.x.element_size())
    per_chunk = max(1, chunk_bytes // (row * batch_size)) * batch_size
    cuda = device.type == "cuda"
    bufs = [torch.empty((min(per_chunk, n), *d.x.shape[1:]), dtype=d.x.dtype, pin_memory=cuda) for _ in range(2)]
    copy_stream = torch.cuda.Stream(device) if cuda else None

    def send(k: int, lo: int) -> tuple[torch.Tensor, Any]:
        hi = min(lo + per_chunk, n)
        buf = bufs[k][: hi - lo]
        buf.copy_(d.x[lo:hi])  # page-in from the memory map into pinned memory
        if not cuda:
            return buf, None
        with torch.cuda.stream(copy_stream):
            dev = buf.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return dev, done

    starts = list(range(0, n, per_chunk))
    nxt = send(0, 0)
    for k in range(len(starts)):
        cur, done = nxt
        if done is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(done)
            cur.record_stream(compute)  # allocated on the copy stream, used on this one
        for j, i in enumerate(range(0, len(cur), batch_size)):
            yield d.prepare(cur[i:i + batch_size])
            if j == 0 and k + 1 < len(starts):
                # the device has a batch queued: fill the other pinned buffer (its last copy finished, see below)
                # and send it while this chunk is computed on
                nxt = send((k + 1) % 2, starts[k + 1])
        if cuda and k + 1 < len(starts):
            nxt[1].synchronize()  # one chunk in flight at most: a pinned buffer is refilled only once sent


def _metrics(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> dict[str, float]:
    y = y.to(logits.device)
    if multilabel:
        yf = y.float()
        loss = F.binary_cross_entropy_with_logits(logits, yf, reduction="none").mean(1)
        correct = ((logits > 0) == (yf > 0.5)).double().mean(1)
        res = {"auc": macro_auc(logits.detach(), yf)}
    else:
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(1) == y).double()
        res = {}
    n = max(len(y), 1)
    acc = float(correct.sum(dtype=torch.float64)) / n
    mean_loss = float(loss.double().sum()) / n
    return {"accuracy": acc, "error": 1.0 - acc, "loss": mean_loss, **res, "n": len(y)}

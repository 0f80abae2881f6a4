"""How a recipe turns repeated measurements into a verdict.

A finding is a claim about one or more quantities (P-T's barrier, RI-T's barrier, upper − lower rewind cost, ...).
Each sub-check is "reproduced" only when the 95% interval of its quantity lies entirely beyond the finding's stated
threshold; "not reproduced" when it lies entirely on the other side; "inconclusive" when it straddles the threshold.
Intervals are t-intervals over independent units: seeds, or — for quantities measured on pairs of models, which
share models — a delete-one-model jackknife (:func:`weightspace.report.stats.pairwise_interval`). Quantities
measured on a test set carry that set's sampling noise as well (:func:`~weightspace.report.stats.with_test_noise`),
so identical seeds never give a certain 0 ± 0.

Sub-checks combine by :func:`combine`: all reproduced → "reproduced"; any refuted → "not reproduced" (the refuted
checks are listed); some reproduced and the rest inconclusive → "partly". A verdict that touches BatchNorm is drawn
under both protocols (stored running statistics, and statistics re-estimated on training data) and combined by
:func:`by_protocol`: "reproduced" only when it holds under both, else a verdict naming the protocol it needs.
Findings that compare P-T with RI-T are "not tested: models under-trained" when either kind falls below the
recipe's minimum accuracy (:func:`trained_enough`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..report.stats import (Interval, difference, fmt_interval, judge, pairwise_interval, t_interval,
                            with_test_noise)

__all__ = ["VERDICTS", "UNDER_TRAINED", "check", "combine", "verdict_of", "by_protocol", "trained_enough",
           "has_batchnorm", "PROTOCOLS"]

UNDER_TRAINED = "not tested: models under-trained"
VERDICTS = ("reproduced", "partly", "inconclusive", "not reproduced", "measured", UNDER_TRAINED,
            "reproduced with stored statistics only", "reproduced with re-estimated statistics only")
PROTOCOLS = {"stored": "stored BatchNorm statistics", "re-estimated": "BatchNorm statistics re-estimated on the "
             "target training data"}


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model keeps running statistics (the BatchNorm confound applies)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check(name: str, a: Sequence[float | None], b: Sequence[float | None] | None, threshold: float,
          direction: str = "above", *, paired: bool = True, what: str = "",
          units: Sequence[Sequence[object]] | None = None, n_test: int | None = None) -> dict:
    """One interval check: the interval of mean(a − b) (or of a alone when b is None) against ``threshold``.

    ``units``: for values measured on pairs of models, the models (any hashable labels) each value depends on; the
    interval is then a delete-one-model jackknife instead of a t-interval over the values (needs ``paired`` when b
    is given). ``n_test``: the values are differences of error rates on a test set of that many examples; its
    sampling noise widens the interval (see :func:`~weightspace.report.stats.with_test_noise`).

    Returns {"name", "interval", "threshold", "direction", "verdict", "text"}; raises ValueError for an unknown
    direction or paired lists of different lengths.
    """
    if units is not None:
        if b is not None and len(a) != len(b):
            raise ValueError(f"paired difference: {len(a)} vs {len(b)} values")
        vals = list(a) if b is None else [None if x is None or y is None else x - y for x, y in zip(a, b)]
        iv: Interval = pairwise_interval(vals, units)
    else:
        iv = t_interval(a) if b is None else difference(a, b, paired=paired)
    if n_test:
        iv = with_test_noise(iv, int(n_test))
    verdict = judge(iv, threshold, direction)
    side = ">" if direction == "above" else "<"
    text = f"{what or name}: {fmt_interval(iv)}; needs the interval {side} {threshold:g} → {verdict}"
    out = {"name": name, "interval": iv.to_dict(), "threshold": threshold, "direction": direction,
           "verdict": verdict, "text": text}
    if n_test:
        out["n_test"] = int(n_test)
    return out


def combine(verdicts: Sequence[str] | Mapping[str, str]) -> str:
    """One verdict from the sub-checks of a finding: all agree → that verdict; any refuted ("not reproduced") →
    "not reproduced"; some reproduced, the rest inconclusive → "partly"; else "inconclusive"."""
    vs = list(verdicts.values()) if isinstance(verdicts, Mapping) else list(verdicts)
    if not vs:
        return "inconclusive"
    if all(v == vs[0] for v in vs):
        return vs[0]
    if UNDER_TRAINED in vs:
        return UNDER_TRAINED
    if any(v == "not reproduced" for v in vs):
        return "not reproduced"
    if any(v in ("reproduced", "partly") for v in vs):
        return "partly"
    return "inconclusive"


def verdict_of(checks: Mapping[str, dict]) -> dict:
    """{"verdict", "sub_verdicts": {name: verdict}, "failed": [refuted names]} from named sub-checks (each a
    :func:`check` result)."""
    sub = {k: c["verdict"] for k, c in checks.items()}
    return {"verdict": combine(sub), "sub_verdicts": sub, "failed": [k for k, v in sub.items() if v == "not reproduced"]}


def by_protocol(verdicts: Mapping[str, str]) -> str:
    """One verdict from the same finding under each BatchNorm protocol: "reproduced" only when it holds under every
    protocol; when it holds under one only, "reproduced with <protocol> statistics only"; otherwise as
    :func:`combine`."""
    vs = dict(verdicts)
    if not vs:
        return "inconclusive"
    held = [p for p, v in vs.items() if v == "reproduced"]
    if len(held) == len(vs):
        return "reproduced"
    if len(held) == 1 and UNDER_TRAINED not in vs.values():
        return f"reproduced with {held[0]} statistics only"
    return combine(vs)


def trained_enough(accuracy: Mapping[str, Sequence[float]], minimum: float) -> dict:
    """Whether every kind of model (P-T, RI-T, ...) reached ``minimum`` mean test accuracy, the condition for
    comparing them at all: {"minimum", "mean": {kind: mean accuracy}, "ok"}."""
    means = {k: (sum(v) / len(v) if v else float("nan")) for k, v in accuracy.items()}
    return {"minimum": float(minimum), "mean": means, "ok": all(m >= minimum for m in means.values())}

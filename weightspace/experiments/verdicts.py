"""How a recipe turns repeated measurements into a verdict.

A finding is a claim about the difference between two conditions (P-T vs RI-T, upper vs lower modules, ...). It is
"reproduced" only when the 95% t-interval of that difference, over seeds (or pairs of seeds), lies entirely beyond
the finding's stated threshold; "not reproduced" when it lies entirely on the other side; "inconclusive" when it
straddles the threshold. A verdict that touches BatchNorm is drawn under both protocols (stored running statistics,
and statistics re-estimated on training data); when they disagree the finding is "partly" reproduced and the
text says under which protocol it holds.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..report.stats import Interval, difference, fmt_interval, judge, t_interval

__all__ = ["VERDICTS", "check", "combine", "has_batchnorm", "PROTOCOLS"]

VERDICTS = ("reproduced", "partly", "inconclusive", "not reproduced", "measured")
PROTOCOLS = {"stored": "stored BatchNorm statistics", "re-estimated": "BatchNorm statistics re-estimated on the "
             "target training data"}


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model keeps running statistics (the BatchNorm confound applies)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check(name: str, a: Sequence[float | None], b: Sequence[float | None] | None, threshold: float,
          direction: str = "above", *, paired: bool = True, what: str = "") -> dict:
    """One interval check: the t-interval of mean(a − b) (or of a alone when b is None) against ``threshold``.

    Returns {"name", "interval", "threshold", "direction", "verdict", "text"}; raises ValueError for an unknown
    direction or paired lists of different lengths.
    """
    iv: Interval = t_interval(a) if b is None else difference(a, b, paired=paired)
    verdict = judge(iv, threshold, direction)
    side = ">" if direction == "above" else "<"
    text = f"{what or name}: {fmt_interval(iv)}; needs the interval {side} {threshold:g} → {verdict}"
    return {"name": name, "interval": iv.to_dict(), "threshold": threshold, "direction": direction,
            "verdict": verdict, "text": text}


def combine(verdicts: Sequence[str] | Mapping[str, str]) -> str:
    """One verdict from several (sub-checks, or BatchNorm protocols): all agree → that verdict; some reproduced →
    "partly"; none reproduced but some inconclusive → "inconclusive"; else "not reproduced"."""
    vs = list(verdicts.values()) if isinstance(verdicts, Mapping) else list(verdicts)
    if not vs:
        return "inconclusive"
    if all(v == vs[0] for v in vs):
        return vs[0]
    if any(v in ("reproduced", "partly") for v in vs):
        return "partly"
    if any(v == "inconclusive" for v in vs):
        return "inconclusive"
    return "not reproduced"

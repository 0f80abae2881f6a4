"""The verdict rules of the ``transfer`` recipe's findings, as pure functions of per-seed (or per-pair) numbers, so
each rule can be tested on numbers where its claim is false as well as on numbers where it is true
(tests/test_verdict_rules.py). The analyses in :mod:`.transfer_analyses` measure; these decide.

Each rule returns {"verdict", "sub_verdicts", "failed", "checks"} (see :func:`.verdicts.verdict_of`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .verdicts import check, verdict_of

__all__ = ["barrier_rule", "similarity_rule", "rewind_rule", "block_shuffle_rule"]

Units = Sequence[Sequence[object]] | None


def _ruled(checks: dict) -> dict:
    return {**verdict_of(checks), "checks": checks}


def barrier_rule(pt: Sequence[float | None], ri: Sequence[float | None], no_barrier_below: float, *,
                 units: Units = None, n_test: int | None = None, label: str = "") -> dict:
    """(a) Both halves of "P-T pairs show no barrier, RI-T pairs do": the interval of P-T's barrier lies below
    ``no_barrier_below`` and the interval of RI-T's barrier lies above it. ``units``: the models each pair's
    value depends on (one list for both kinds: P-T pair i and RI-T pair i share their seeds)."""
    tag = f" ({label})" if label else ""
    return _ruled({
        "pt_no_barrier": check("pt_no_barrier", pt, None, no_barrier_below, "below", units=units, n_test=n_test,
                               what=f"P-T error barrier{tag}"),
        "ri_barrier": check("ri_barrier", ri, None, no_barrier_below, "above", units=units, n_test=n_test,
                            what=f"RI-T error barrier{tag}"),
    })


def similarity_rule(l2_pt: Sequence[float | None], l2_ri: Sequence[float | None], cka_pt: Sequence[float | None],
                    cka_ri: Sequence[float | None], cka_margin: float = 0.0, *, units: Units = None) -> dict:
    """(b) P-T pairs are closer in parameter L2 (RI-T − P-T above 0) and more alike in CKA (P-T − RI-T above
    ``cka_margin``), paired pair by pair."""
    return _ruled({
        "l2": check("l2", l2_ri, l2_pt, 0.0, "above", units=units, what="RI-T − P-T parameter L2 within pairs"),
        "cka": check("cka", cka_pt, cka_ri, float(cka_margin), "above", units=units,
                     what="P-T − RI-T linear CKA (mean over modules)"),
    })


def rewind_rule(upper: Sequence[float | None], lower: Sequence[float | None], *, n_test: int | None = None,
                label: str = "") -> dict:
    """(c) Per P-T model, the mean error increase from rewinding the upper half of the body minus that of the
    lower half lies above 0 (paired within the model)."""
    return _ruled({"upper_minus_lower": check("upper_minus_lower", upper, lower, 0.0, "above", n_test=n_test,
                                              what=f"upper − lower half rewind cost{f' ({label})' if label else ''}")})


def block_shuffle_rule(benefit: Mapping[int, Sequence[float]], speed: Mapping[int, Sequence[float]], *,
                       n_test: int | None = None) -> dict:
    """(d) Per data-order seed, by block size (largest first): the benefit of pre-training (P-T − RI-T final
    accuracy) shrinks from the largest block to the smallest, stays above 0 at the smallest, and P-T learns faster
    (P-T − RI-T mean accuracy over training above 0) at every block size."""
    blocks = sorted(benefit, reverse=True)
    first, last = blocks[0], blocks[-1]
    checks = {}
    if len(blocks) > 1:  # the same data-order seed at both block sizes: paired
        checks["shrinks"] = check("shrinks", benefit[first], benefit[last], 0.0, "above", n_test=n_test,
                                  what=f"benefit at block {first} − at block {last}")
    checks["positive"] = check("positive", benefit[last], None, 0.0, "above", n_test=n_test,
                               what=f"benefit (P-T − RI-T final accuracy) at block {last}")
    for b in blocks:
        checks[f"faster_{b}"] = check(f"faster_{b}", speed[b], None, 0.0, "above", n_test=n_test,
                                      what=f"P-T − RI-T mean accuracy over training at block {b}")
    return _ruled(checks)

"""Every verdict rule on synthetic per-seed numbers: "reproduced" where the claim is true, never where it is false
(the negative controls), and the interval used for pairwise quantities covering at its nominal level."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from weightspace.experiments.rules import barrier_rule, block_shuffle_rule, rewind_rule, similarity_rule
from weightspace.experiments.verdicts import UNDER_TRAINED, by_protocol, check, combine, trained_enough
from weightspace.report.stats import Interval, pairwise_interval, t_interval, with_test_noise

PAIRS3 = list(itertools.combinations("xyz", 2))  # three pairs from three models, as the small recipes draw them


def _coverage(design: list[tuple], m: int, reps: int, rng: np.random.Generator, noise: float) -> tuple[float, float]:
    """Coverage of the jackknife and of a naive t-interval over pairs for value(pair) = a_i + a_j + e (true mean 0)."""
    hit = naive = 0
    for _ in range(reps):
        a = rng.normal(0.0, 1.0, m)
        v = [float(sum(a[i] for i in us) + rng.normal(0.0, noise)) for us in design]
        iv = pairwise_interval(v, design)
        hit += iv.low <= 0.0 <= iv.high
        iv = t_interval(v)
        naive += iv.low <= 0.0 <= iv.high
    return hit / reps, naive / reps


@pytest.mark.parametrize("m,design", [(3, list(itertools.combinations(range(3), 2))),   # transfer (a)/(b), align
                                      (5, list(itertools.combinations(range(5), 2))),   # trajectory (b)
                                      (4, [(i, (i + 1) % 4) for i in range(4)])])       # cross-domain: cyclic
def test_pairwise_interval_covers_at_its_nominal_level(m, design):
    rng = np.random.default_rng(m)
    cover, naive = _coverage(design, m, 1500, rng, noise=0.5)
    print(f"m={m}, {len(design)} pairs: jackknife coverage {cover:.3f}, naive t over pairs {naive:.3f}")
    assert cover >= 0.93
    assert naive < 0.90  # the negative control: pairs treated as independent under-cover


def test_pairwise_interval_is_the_t_interval_for_independent_units():
    xs = [0.3, 0.1, 0.25, 0.4]
    a, b = pairwise_interval(xs, [[i] for i in range(4)]), t_interval(xs)
    assert (a.low, a.high) == pytest.approx((b.low, b.high))
    assert np.isnan(pairwise_interval([1.0], [["x", "y"]]).half)


def test_identical_seeds_keep_the_test_sets_noise():
    iv = with_test_noise(t_interval([0.0, 0.0, 0.0]), 400)
    assert iv.low < 0 < iv.high and iv.half == pytest.approx(3.8415 / (400 + 3.8415), rel=1e-3)
    assert with_test_noise(Interval(0.1, 0.05, 0.15, 3), 10 ** 9).half == pytest.approx(0.05, rel=1e-3)
    # no finding rests on 0 ± 0: "the barrier lies below 0.005" is no longer certain from 360 examples
    assert check("x", [0.0] * 3, None, 0.005, "below", n_test=360)["verdict"] == "inconclusive"


def test_combine_a_refuted_sub_check_refutes_the_finding():
    assert combine(["reproduced", "not reproduced"]) == "not reproduced"
    assert combine(["reproduced", "inconclusive"]) == "partly"
    assert combine(["inconclusive", "not reproduced"]) == "not reproduced"
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert by_protocol({"stored": "reproduced", "re-estimated": "not reproduced"}) == \
        "reproduced with stored statistics only"
    assert by_protocol({"stored": "reproduced", "re-estimated": "reproduced"}) == "reproduced"
    assert by_protocol({"stored": "inconclusive", "re-estimated": "not reproduced"}) == "not reproduced"
    assert not trained_enough({"P-T": [0.9, 0.8], "RI-T": [0.25, 0.3]}, 0.4)["ok"]
    assert combine(["reproduced", UNDER_TRAINED]) == UNDER_TRAINED


# ---- transfer (a)-(d): negative controls and positive controls ----

def test_barrier_rule():
    pt_low, ri_high = [0.001, 0.004, 0.0], [0.21, 0.18, 0.25]
    assert barrier_rule(pt_low, ri_high, 0.02, units=PAIRS3, n_test=600)["verdict"] == "reproduced"
    # no barrier difference: both kinds low, or both high
    r = barrier_rule(pt_low, [0.0, 0.003, 0.001], 0.02, units=PAIRS3, n_test=600)
    assert r["verdict"] == "not reproduced" and r["failed"] == ["ri_barrier"]
    r = barrier_rule([0.2, 0.19, 0.23], ri_high, 0.02, units=PAIRS3, n_test=600)
    assert r["verdict"] == "not reproduced" and r["failed"] == ["pt_no_barrier"]
    # P-T's barrier not shown to be absent (its interval straddles the line): not reproduced as a whole
    assert barrier_rule([0.0, 0.05, 0.01], ri_high, 0.02, units=PAIRS3)["verdict"] != "reproduced"


def test_similarity_rule():
    assert similarity_rule([0.8, 0.82, 0.79], [1.0, 1.05, 0.98], [0.98, 0.97, 0.985], [0.95, 0.94, 0.955],
                           units=PAIRS3)["verdict"] == "reproduced"
    same = similarity_rule([0.9, 0.95, 0.85], [0.9, 0.95, 0.85], [0.97, 0.96, 0.98], [0.97, 0.96, 0.98],
                           units=PAIRS3)
    assert same["verdict"] != "reproduced"
    reversed_ = similarity_rule([1.0, 1.05, 0.98], [0.8, 0.82, 0.79], [0.98, 0.97, 0.985], [0.95, 0.94, 0.955])
    assert reversed_["verdict"] == "not reproduced" and reversed_["failed"] == ["l2"]


def test_rewind_rule():
    assert rewind_rule([0.15, 0.14, 0.16], [0.01, 0.0, 0.02], n_test=600)["verdict"] == "reproduced"
    assert rewind_rule([0.05, 0.06, 0.04], [0.05, 0.06, 0.04], n_test=600)["verdict"] != "reproduced"
    assert rewind_rule([0.01, 0.0, 0.02], [0.15, 0.14, 0.16], n_test=600)["verdict"] == "not reproduced"


def test_block_shuffle_rule():
    benefit = {8: [0.14, 0.12, 0.16], 2: [0.05, 0.06, 0.04]}
    speed = {8: [0.1, 0.09, 0.11], 2: [0.03, 0.04, 0.035]}
    assert block_shuffle_rule(benefit, speed, n_test=2000)["verdict"] == "reproduced"
    # no block-size effect: the benefit is the same at every block size
    flat = block_shuffle_rule({8: [0.1, 0.12, 0.11], 2: [0.1, 0.12, 0.11]}, speed, n_test=2000)
    assert flat["verdict"] != "reproduced" and flat["sub_verdicts"]["shrinks"] == "inconclusive"
    # the benefit vanishes at small blocks: refuted although it shrinks ("partly" before issue 21)
    gone = block_shuffle_rule({8: [0.14, 0.12, 0.16], 2: [-0.08, -0.1, -0.07]}, speed, n_test=2000)
    assert gone["verdict"] == "not reproduced" and gone["failed"] == ["positive"]


# ---- the other recipes' rules: each claim false, then true ----

def _trajectory(acc_by_epoch: dict, barrier: float) -> list[dict]:
    from weightspace.experiments.trajectory import _findings
    seeds = [1, 2, 3]
    starts = {e: {"accuracy": {str(s): a for s, a in zip(seeds, accs)}, "barrier_to_final": 0.0,
                  "pairs": [{"pair": list(p), "l2": 1.0, "barrier_stored": barrier + 0.001 * i}
                            for i, p in enumerate(itertools.combinations(seeds, 2))]}
              for e, accs in acc_by_epoch.items()}
    return _findings(starts, seeds, {"within": 0.02, "no_barrier_below": 0.02}, ["stored"], n_test=600)[0]


def test_trajectory_rules():
    plateau = {0: [0.5, 0.52, 0.49], 3: [0.80, 0.795, 0.81], 6: [0.80, 0.80, 0.81]}
    a, b = _trajectory(plateau, 0.0)
    assert a["verdict"] == "reproduced" and b["verdict"] == "reproduced"
    # no plateau: every earlier start point falls well short of the last
    rising = {0: [0.5, 0.52, 0.49], 3: [0.65, 0.66, 0.64], 6: [0.80, 0.80, 0.81]}
    assert _trajectory(rising, 0.0)[0]["verdict"] == "not reproduced"
    # a plateau, but pairs fine-tuned from it are separated by a barrier
    assert _trajectory(plateau, 0.15)[1]["verdict"] == "not reproduced"


def _cross(within: float, cross: float) -> list[dict]:
    from weightspace.experiments.cross_domain import _findings
    seeds = [1, 2, 3, 4]
    w = {n: {"stored": [within + 0.002 * i for i in range(4)]} for n in ("digits", "inverted")}
    c = {n: {"stored": [cross + 0.002 * i + 0.003 * (i % 2) for i in range(4)]} for n in ("digits", "inverted")}
    return _findings(w, c, seeds, {"no_barrier_below": 0.02, "margin": 0.02}, ["stored"], "digits", "inverted",
                     n_test={"digits": 500, "inverted": 500})[0]


def test_cross_domain_rules():
    a, b = _cross(0.0, 0.2)
    assert a["verdict"] == "reproduced" and b["verdict"] == "reproduced"
    # no cross-domain barrier beyond the within-domain one
    assert _cross(0.0, 0.0)[1]["verdict"] == "not reproduced"
    # no shared basin within a domain
    assert _cross(0.2, 0.4)[0]["verdict"] == "not reproduced"


def _align(before: float, after: float) -> list[dict]:
    from weightspace.experiments.align import _findings
    pairs = [{"a": f"m{i}", "b": f"m{j}",
              "curves": {"repair": {"B": {"error_barrier": before + 0.002 * k},
                                    "P_weights(B)": {"error_barrier": after + 0.001 * k}}}}
             for k, (i, j) in enumerate(itertools.combinations(range(5), 2))]
    an = {"clear_barrier": 0.1, "shrink": 0.5, "methods": ["weights"], "steps": 5}
    return _findings(pairs, an, ["repair"], True, [], n_test=700)[0]


def test_align_rules():
    a, b = _align(0.5, 0.05)
    assert a["verdict"] == "reproduced" and b["verdict"] == "reproduced"
    # permutation-aligned barriers unchanged
    assert _align(0.5, 0.5)[1]["verdict"] == "not reproduced"
    # no barrier to begin with
    assert _align(0.0, 0.0)[0]["verdict"] == "not reproduced"


def _head2toe(far_gain: float, near_gain: float) -> list[dict]:
    from weightspace.experiments.head2toe_targets import _findings
    seeds = [1, 2, 3]
    spec = {"pixels": (-0.1, far_gain), "blocks": (-0.05, far_gain), "inverted": (0.1, near_gain),
            "same": (0.3, near_gain)}
    targets = {n: {"affinity": {"mean": aff}, "test": 500,
                   "per_seed": {str(s): {"affinity": aff + 0.001 * s, "gain": g + 0.004 * s - 0.002 * (n == "same")}
                                for s in seeds}} for n, (aff, g) in spec.items()}
    return _findings(targets, seeds, 0.0)[0]


def test_head2toe_rules():
    assert _head2toe(0.2, 0.01)[0]["verdict"] == "reproduced"
    # no Head2Toe gain on far targets beyond the near ones
    assert _head2toe(0.0, 0.0)[0]["verdict"] != "reproduced"
    assert _head2toe(0.0, 0.2)[0]["verdict"] == "not reproduced"


def test_saturation_rule():
    from weightspace.experiments.saturation_pairs import saturation_rule
    a, b = saturation_rule([0.6, 0.5, 0.7], [0.2, 0.25, 0.22], [0.01, 0.0, 0.02], 0.01, 0.05)
    assert a["verdict"] == "reproduced" and b["verdict"] == "reproduced"
    # no saturation: straight-line data have the same slope at both ends; the exact fit's e_∞ is not judged
    a, b = saturation_rule([0.01, -0.02, 0.005], [0.4, 0.45, 0.42], [0.0, 0.0, 0.0], 0.01, 0.05)
    assert a["verdict"] != "reproduced" and b["verdict"] != "reproduced"
    assert a["sub_verdicts"]["e_inf"] == "not tested"
    a, _ = saturation_rule([-0.3, -0.4, -0.35], [0.4, 0.45, 0.42], [0.0, 0.0, 0.0], 0.01, 0.05)
    assert a["verdict"] == "not reproduced"  # returns that grow: refuted

"""Greedy soups: keep/skip decisions on a scripted evaluate function, ties, --strict, memory form, leaderboards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import weightspace as ws
from weightspace import errors
from weightspace.search.greedy import greedy_ensemble, greedy_soup, mean_logits, rank
from weightspace.search.soups import soup_leaderboard

from evalhelpers import CNN, save_all, train_cnns

pytestmark = pytest.mark.usefixtures("one_thread")

# Ingredient i is the state dict {"w": [v_i], "h": [v_i, 2·v_i] in bfloat16, "count": int buffer}; a soup of
# some of them has w = mean of their v. The scripted evaluate looks the soup's mean up in a table, so every
# keep/skip decision below is chosen by hand.
VALUES = [1.0, 2.0, 4.0, 8.0]          # a, b, c, d
INDIVIDUAL = {1.0: 0.5, 2.0: 0.9, 4.0: 0.7, 8.0: 0.7}  # ranking: b, c, d (tied with c, later in input), a


def ingredient(i: int) -> dict[str, torch.Tensor]:
    v = VALUES[i]
    return {"w": torch.tensor([v]), "h": torch.tensor([v, 2 * v], dtype=torch.bfloat16),
            "count": torch.tensor(10 + i, dtype=torch.int64)}


class Scripted:
    """evaluate(weights) → table[mean]; records every mean it was asked about."""

    def __init__(self, soups: dict[float, float]):
        self.table = {**INDIVIDUAL, **soups}
        self.calls: list[float] = []

    def __call__(self, weights) -> float:
        m = round(float(weights["w"][0]), 4)
        self.calls.append(m)
        return self.table[m]


def test_greedy_keeps_on_ties_and_skips_drops():
    ev = Scripted({3.0: 0.9, round(14 / 3, 4): 0.85, round(7 / 3, 4): 0.95})
    found = greedy_soup([ingredient(i) for i in range(4)], ev, progress=False)
    soup, res = found  # a SearchResult unpacks as (weights, record)
    assert found.weights is soup and found.record is res and found.to_dict() == res.to_dict()
    assert res.order == [1, 2, 3, 0]
    assert res.ties == [[2, 3]]  # c and d tie at 0.7; c (earlier in input) goes first
    # b alone (0.9) → +c: 0.9 ≥ 0.9 kept → +d: 0.85 < 0.9 skipped → +a: 0.95 kept
    assert [s["kept"] for s in res.steps] == [True, False, True]
    assert res.kept == [1, 2, 0]
    assert res.score == 0.95
    assert ev.calls == [1.0, 2.0, 4.0, 8.0, 3.0, round(14 / 3, 4), round(7 / 3, 4)]
    assert res.evaluations == 7
    assert soup["w"].item() == pytest.approx(7 / 3)
    assert soup["h"].dtype == torch.bfloat16 and soup["h"][1].item() == pytest.approx(14 / 3, rel=1e-2)
    assert soup["count"].item() == 11  # integer buffers come from the best ingredient, never averaged


def test_strict_rule_skips_ties():
    ev = Scripted({3.0: 0.9, 5.0: 0.92, round(11 / 3, 4): 0.91})
    soup, res = greedy_soup([ingredient(i) for i in range(4)], ev, strict=True, progress=False)
    # b (0.9) → +c: 0.9 is not > 0.9, skipped → +d: 0.92 kept → +a: 0.91 skipped
    assert [s["kept"] for s in res.steps] == [False, True, False]
    assert res.kept == [1, 3] and res.score == 0.92
    assert soup["w"].item() == 5.0
    assert soup.provenance["rule"] == ">"
    assert [i["source"] for i in soup.provenance["ingredients"]] == ["<state dict>", "<state dict>"]
    assert [i["val_score"] for i in soup.provenance["ingredients"]] == [0.9, 0.7]


def test_in_memory_ingredients_are_named_in_kept_results():
    ev = Scripted({3.0: 0.9, round(14 / 3, 4): 0.85, round(7 / 3, 4): 0.95})
    named = {n: ingredient(i) for i, n in enumerate("abcd")}
    soup, res = greedy_soup(named, ev, progress=False)
    assert res.kept == [1, 2, 0] and [res.sources[i] for i in res.kept] == ["b", "c", "a"]
    assert [i["source"] for i in soup.provenance["ingredients"]] == ["b", "c", "a"]
    assert res.to_dict()["ranking"][0]["source"] == "b"
    _, by_names = greedy_soup([ingredient(i) for i in range(4)], Scripted({3.0: 0.9, round(14 / 3, 4): 0.85,
                              round(7 / 3, 4): 0.95}), names=list("abcd"), progress=False)
    assert by_names.sources == res.sources


def test_given_scores_skip_individual_evaluation_and_nan_ranks_last():
    ev = Scripted({6.0: 0.5, 2.5: 0.8, round(7 / 3, 4): 0.1})
    _, res = greedy_soup([ingredient(i) for i in range(4)], ev, scores=[0.5, float("nan"), 0.7, 0.6], progress=False)
    assert res.order == [2, 3, 0, 1]
    # c (0.7) → +d: 0.5 skipped → +a: 0.8 kept → +b (NaN score, last): 0.1 skipped
    assert ev.calls == [6.0, 2.5, round(7 / 3, 4)]  # soups only: the given scores replace individual evaluations
    assert res.kept == [2, 0] and res.evaluations == 3


def test_rank_ties_in_input_order():
    assert rank([0.5, 0.7, 0.7, 0.9, 0.5]) == ([3, 1, 2, 0, 4], [[1, 2], [0, 4]])


def test_greedy_soup_equals_uniform_soup_of_kept_files(tmp_path, trained_mlps):
    paths = []
    for i, sd in enumerate(trained_mlps):
        p = tmp_path / f"m{i}.safetensors"
        ws.save(sd, p)
        paths.append(str(p))
    # Metrics-like return values work too: anything float() accepts.
    scores = {0: 0.80, 1: 0.85, 2: 0.75}
    seen: list[dict] = []

    class Score(float):
        pass

    def evaluate(weights):
        seen.append(dict(weights))
        k = len(seen) - 1
        return Score(scores[k] if k < 3 else 0.9)  # every soup improves: all kept
    soup, res = greedy_soup(paths, evaluate, progress=False)
    assert res.kept == [1, 0, 2]
    ref = ws.uniform_soup([paths[i] for i in res.kept])
    for k in ref:
        if ref[k].is_floating_point():
            assert torch.allclose(soup[k], ref[k], atol=1e-6), k
        else:
            assert torch.equal(soup[k], trained_mlps[1][k]), k
    out = tmp_path / "soup.safetensors"
    ws.save(soup, out)
    with safe_open(str(out), "pt") as f:
        prov = json.loads(f.metadata()["weightspace"])
    assert prov["op"] == "greedy_soup"
    assert [i["source"] for i in prov["ingredients"]] == [os.path.relpath(p, out.parent) for p in (paths[1], paths[0], paths[2])]
    assert all(len(i["sha256"]) == 64 for i in prov["ingredients"])


def test_incompatible_ingredients_are_refused(trained_mlps):
    bad = dict(trained_mlps[1])
    bad.pop("head.bias")
    with pytest.raises(errors.IncompatibleCheckpoints):
        greedy_soup([trained_mlps[0], bad], lambda w: 0.5, progress=False)


def test_greedy_ensemble_and_mean_logits():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 0])
    logits = [{"val": torch.nn.functional.one_hot(p, 3).float()} for p in
              (torch.tensor([0, 1, 2, 1]), torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 2, 0]))]

    def score(lg):
        return float((lg["val"].argmax(1) == y).float().mean())
    val_scores = [score(lg) for lg in logits]
    assert val_scores == [0.75, 0.0, 0.75]
    ens, kept = greedy_ensemble(logits, val_scores, score)
    # 0 → +2: argmax of the mean one-hots (ties → lowest class) = [0, 0, 2, 0]: 0.75 ≥ 0.75 kept
    #   → +1: [0, 0, 2, 1]: 0.5, skipped
    assert kept == [0, 2]
    assert torch.equal(ens["val"], (logits[0]["val"] + logits[2]["val"]) / 2)
    assert greedy_ensemble(logits, val_scores, score, strict=True)[1] == [0]  # 0.75 is not > 0.75; +1 gives 0.25
    assert torch.allclose(mean_logits(logits)["val"], sum(lg["val"] for lg in logits) / 3)


def test_soup_leaderboard_rows_from_real_evaluator(trained_mlps):
    from conftest import make_mlp
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    flat = {n: load_data(f"digits:{n}", transform=lambda x: ((x + 1) / 2).flatten(1)) for n in ("val", "test")}
    ev = Evaluator(make_mlp(), flat, device="cpu", keep_logits=True)
    lb, soups, res = soup_leaderboard(trained_mlps, ev, progress=False)
    methods = [r["method"] for r in lb.rows]
    assert methods[3:] == ["best individual (val)", "uniform soup", "greedy soup", "output ensemble", "greedy ensemble"]
    assert lb.columns == ["val", "test"]
    # every method row matches an independent evaluation of the same weights / logits
    for i, sd in enumerate(trained_mlps):
        assert lb.rows[i]["metrics"]["test"]["accuracy"] == ev(sd)["test"]["accuracy"]
    assert lb.row("greedy soup")["metrics"]["val"]["accuracy"] == res.score
    assert lb.row("uniform soup")["metrics"] == {k: dict(v) for k, v in ev(soups["uniform"]).items()}
    ens = ev.metrics_from_logits(mean_logits([ev(sd).logits for sd in trained_mlps]))
    assert lb.row("output ensemble")["metrics"]["test"]["loss"] == pytest.approx(ens["test"]["loss"])
    best = max(range(3), key=lambda i: (lb.rows[i]["metrics"]["val"]["accuracy"], -i))
    assert lb.row("best individual (val)")["metrics"] == lb.rows[best]["metrics"]
    # each accuracy is printed beside its 95% Wilson interval over the dataset's examples
    headers, rows = lb.table("accuracy")
    assert headers == ["method", "val", "val 95% CI", "test", "test 95% CI"]
    n_test = len(flat["test"])
    for r in rows:
        acc, text = r[3], r[4]
        lo, hi = (float(v) for v in text.strip("[]").split(","))
        assert lo < acc < hi and hi - lo < 0.12
        k = round(acc * n_test)  # Wilson's bounds solve |p̂ − p| = z·sqrt(p(1 − p)/n) for p
        for p in (lo, hi):
            assert abs(k / n_test - p) == pytest.approx(1.959964 * (p * (1 - p) / n_test) ** 0.5, abs=1e-4)


@pytest.fixture(scope="module")
def finetunes(one_thread, tmp_path_factory):
    """Three CNN fine-tunes of one shared init on real digits, saved as safetensors."""
    return save_all(train_cnns([11, 12, 13], shared_init=True, epochs=1), tmp_path_factory.mktemp("ft"), "ft")


def test_cli_soup_greedy_end_to_end(cli, finetunes, tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    out, soup_file = tmp_path / "runs", tmp_path / "greedy.safetensors"
    args = ["soup", "--greedy", *finetunes, "--model", CNN, "--val", "digits:val", "--test", "digits:test",
            "--out", out, "-o", soup_file, "-q"]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| method | digits:val | digits:val 95% CI | digits:test | digits:test 95% CI |"
    assert [ln.split("|")[1].strip() for ln in lines[2:10]] == [
        "ft0", "ft1", "ft2", "best individual (val)", "uniform soup", "greedy soup", "output ensemble",
        "greedy ensemble"]
    results = json.loads((out / "results.json").read_text())
    kept = results["greedy"]["kept"]
    prov = ws.load(soup_file).provenance
    assert [i["source"] for i in prov["ingredients"]] == [os.path.relpath(k, Path(soup_file).parent) for k in kept]
    ranking = {row["source"]: row["val_score"] for row in results["greedy"]["ranking"]}
    assert [i["val_score"] for i in prov["ingredients"]] == [ranking[k] for k in kept]
    # the saved soup is the API's greedy soup, and its leaderboard row is its own evaluation
    ev = Evaluator(build_model(CNN, num_classes=10), [load_data("digits:val"), load_data("digits:test")],
                   device="cpu")
    api, _ = greedy_soup(finetunes, ev, progress=False)
    saved = ws.load(soup_file)
    assert all(torch.equal(saved[k], api[k]) for k in api)
    rows = {row["method"]: row for row in results["leaderboard"]["rows"]}
    assert rows["greedy soup"]["metrics"] == {k: {m: float(v) for m, v in d.items()} for k, d in ev(api).items()}
    # greedy soups start from the best individual and never accept a drop on validation
    assert rows["greedy soup"]["metrics"]["digits:val"]["accuracy"] >= rows["best individual (val)"]["metrics"]["digits:val"]["accuracy"]
    header = (out / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("method,kind,digits:val/accuracy,digits:val/error,digits:val/loss")
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    # nothing is overwritten without --force, and the refusal comes before any work
    r = cli(*args)
    assert r.exit_code == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert cli("soup", "--greedy", *finetunes, "--model", CNN, "-o", tmp_path / "x.safetensors").exit_code == 2


def test_cli_leaderboard_ranks_checkpoints(cli, finetunes, tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    r = cli("leaderboard", *finetunes, "--model", CNN, "--data", "digits:test", "--data", "digits:val",
            "--out", tmp_path / "lb", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    j = json.loads(r.stdout)
    ev = Evaluator(build_model(CNN, num_classes=10), load_data("digits:test"), device="cpu")
    acc = [ev(f)["digits:test"]["accuracy"] for f in finetunes]
    assert [row["source"] for row in j["leaderboard"]["rows"]] == [finetunes[i] for i in rank(acc)[0]]
    assert [row["metrics"]["digits:test"]["accuracy"] for row in j["leaderboard"]["rows"]] == sorted(acc, reverse=True)
    assert json.loads((tmp_path / "lb" / "results.json").read_text())["leaderboard"] == j["leaderboard"]


def test_cli_weighted_soup_is_scored_on_val_and_unsaved_soups_say_so(cli, finetunes, tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    out = tmp_path / "w.safetensors"
    r = cli("soup", "--weights", "1,2,1", *finetunes, "--model", CNN, "--val", "digits:val", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    j = json.loads(r.stdout)
    row = next(row for row in j["leaderboard"]["rows"] if row["method"] == "weighted soup")
    api = ws.weighted_average(finetunes, [1, 2, 1])
    saved = ws.load(out)
    assert all(torch.equal(saved[k], api[k]) for k in api)
    ev = Evaluator(build_model(CNN, num_classes=10), load_data("digits:val"), device="cpu")
    assert row["metrics"]["digits:val"]["accuracy"] == pytest.approx(ev(api)["digits:val"]["accuracy"])
    assert saved.provenance["val_score"] == row["metrics"]["digits:val"]["accuracy"]
    # scored, not saved: said on stderr, and no file appears
    r = cli("soup", "--greedy", *finetunes, "--model", CNN, "--val", "digits:val")
    assert r.exit_code == 0 and "no checkpoint written" in r.stderr and "-o FILE" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]

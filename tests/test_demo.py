"""`weightspace demo --small`: the embedded default run end to end on real MNIST digits, its regime's conditions
(disjoint pre-training data, 1,000-example val and test, fine-tuning vs scratch with an interval), the basin rule
on a constructed broken basin, and determinism."""
from __future__ import annotations

import json

import pytest
import torch

import weightspace as ws

pytestmark = pytest.mark.slow  # the demo trains its models end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the reduced-size demo through the CLI, in-process."""
    from click.testing import CliRunner

    from weightspace_cli.main import main
    out = tmp_path_factory.mktemp("demo") / "run"
    r = CliRunner().invoke(main, ["demo", "--small", "--out", str(out), "-q"], catch_exceptions=False)
    return out, r


def test_demo_small_end_to_end(demo_run):
    out, r = demo_run
    assert r.exit_code == 0, r.stderr
    assert "| greedy soup |" in r.stdout and "| random-init pair | mnist:test?size=14 | error |" in r.stdout
    assert "fine-tuning beats training from scratch on test:" in r.stdout
    for name in ("results.json", "leaderboard.csv", "leaderboard.png", "curve.json", "curve.csv", "curve.png"):
        assert f"{out / name}" in r.stdout or name in ("leaderboard.csv", "curve.csv"), name
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row["metrics"] for row in res["leaderboard"]["rows"]}
    val, test = "mnist:val?size=14", "mnist:test?size=14"
    assert res["leaderboard"]["columns"] == [val, test, test + "+shift"]
    assert len(res["checkpoints"]["fine_tuned"]) == 3 and len(res["checkpoints"]["random_init"]) == 3
    # really trained on real data: well above the 10% of chance
    assert rows["best individual (val)"][test]["accuracy"] > 0.6
    # the greedy soup starts from the best ingredient and never accepts a validation drop
    assert rows["greedy soup"][val]["accuracy"] >= rows["best individual (val)"][val]["accuracy"]
    # the saved greedy soup is the mean of the kept fine-tunes (files on disk, read back)
    kept = [out / p for p in res["greedy"]["kept"]]  # results.json records paths relative to the run folder
    soup = ws.load(out / res["soups"]["greedy"])
    mean = ws.uniform_soup(kept)
    assert all(torch.allclose(soup[k].float(), mean[k].float(), atol=1e-6) for k in mean)
    # fine-tunes of one pre-trained start sit in one basin; independent random inits do not
    b = res["barriers"]
    assert b["random-init pair"][test]["error"]["chord"] > b["fine-tuned pair"][test]["error"]["chord"]
    prov = ws.load(out / res["checkpoints"]["fine_tuned"][0]).provenance
    assert prov["op"] == "train" and prov["config"]["init"] == "linear-probe.safetensors"


def test_demo_is_deterministic_and_refuses_to_overwrite(demo_run, tmp_path):
    from click.testing import CliRunner

    from weightspace.files import MANIFEST_NAME, read_manifest
    from weightspace_cli.main import main
    out, _ = demo_run
    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["demo", "--small", "--out", str(again), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert first == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in first:  # every file, soups and results included: paths are recorded relative to the run folder
        if rel.name == MANIFEST_NAME:  # it records when each file was written: the same files, other times
            assert read_manifest(out).keys() == read_manifest(again).keys()
            continue
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    r = CliRunner().invoke(main, ["demo", "--small", "--out", str(again), "-q"], catch_exceptions=False)
    assert r.exit_code == 2 and "already exists (use --force" in r.stderr


def test_demo_regime_conditions(demo_run):
    """(i) pre-training data disjoint from the target's examples, (iii) ≥ 1,000 val and test examples, (ii) the
    fine-tuned vs scratch interval recomputed from the accuracies it lists."""
    from scipy import stats

    from weightspace.eval.data.tensors import _mnist, mnist_indices
    from weightspace.experiments.demo import SIZES
    out, _ = demo_run
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["source"].startswith("mnist:pretrain") and res["data"]["target"].startswith("mnist:train")
    idx = {s: set(mnist_indices(s).tolist()) for s in ("pretrain", "train", "val", "test")}
    assert [len(v) for v in idx.values()] == [2000, 1000, 1000, 1000]
    assert not idx["pretrain"] & (idx["train"] | idx["val"] | idx["test"])
    assert not idx["val"] & idx["test"] and not idx["train"] & (idx["val"] | idx["test"])
    images, _ = _mnist()  # no pre-training image is a pixel copy of a val or test image either
    seen = {images[i].tobytes() for i in idx["pretrain"]}
    assert not any(images[i].tobytes() in seen for i in idx["val"] | idx["test"])
    assert res["data"]["examples"]["val"] >= 1000 and res["data"]["examples"]["test"] >= 1000
    reg = res["regime"]["finetune_vs_scratch"]
    rows = {row["method"]: row["metrics"] for row in res["leaderboard"]["rows"]}
    names = [p.rsplit("/", 1)[-1].removesuffix(".safetensors") for p in res["checkpoints"]["fine_tuned"]]
    assert reg["finetuned_test_accuracy"] == [rows[n]["mnist:test?size=14"]["accuracy"] for n in names]
    ft, sc = reg["finetuned_test_accuracy"], reg["scratch_test_accuracy"]
    assert len(sc) >= 3
    ci = stats.ttest_ind(ft, sc, equal_var=False).confidence_interval(0.95)
    assert (reg["difference"]["low"], reg["difference"]["high"]) == pytest.approx((ci.low, ci.high))
    assert (reg["over_models_verdict"] == "reproduced") == (ci.low > 0)
    # the verdict is per example: the best fine-tune against the best scratch model on the same 1,000 test images
    pb = reg["paired"]
    assert pb["n"] == 1000 and pb["difference"] == pytest.approx((pb["a_only"] - pb["b_only"]) / 1000)
    assert (reg["verdict"] == "reproduced") == (pb["low"] > 0)
    assert (reg["verdict"] == "not reproduced") == (pb["high"] <= 0)
    band = res["regime"]["band"]
    assert band["largest_gap"] == pytest.approx(max(band["val_accuracy"]) - min(band["val_accuracy"]))
    # few labels: the target is a 200-example class-stratified subset of the train split
    assert res["data"]["examples"]["target"] == 200 and res["data"]["target"].endswith("&limit=200")
    assert [b["epochs"] for b in res["band"]] == [SIZES["small"].finetune_epochs] * 3
    assert ws.load(out / res["checkpoints"]["fine_tuned"][0]).provenance["config"]["label_smoothing"] == 0.0
    for info in res["training"].values():  # early stopping kept the epoch of the lowest validation loss
        assert info["val_losses"][info["best_epoch"] - 1] == min(info["val_losses"])
    # what early stopping did is counted from the runs' records, not asserted
    es = res["regime"]["early_stopping_summary"]
    assert es["kept_an_earlier_epoch"] == [k for k, v in res["training"].items() if v["best_epoch"] < v["epochs_run"]]
    assert es["runs"] == len(res["training"])


def test_demo_compares_soups_with_the_best_individual_on_the_same_examples(demo_run):
    """The paired comparison's discordant counts give exactly the leaderboard's accuracy difference on test."""
    out, r = demo_run
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row["metrics"] for row in res["leaderboard"]["rows"]}
    p, test = res["paired_vs_best"], "mnist:test?size=14"
    assert p["baseline"] in rows
    best = rows["best individual (val)"][test]["accuracy"]
    for method in ("uniform soup", "greedy soup", "output ensemble"):
        c = p["methods"][method]
        assert c["n"] == 1000 and c["difference"] == pytest.approx((c["a_only"] - c["b_only"]) / 1000)
        assert c["difference"] == pytest.approx(rows[method][test]["accuracy"] - best, abs=1e-9)
        assert c["low"] <= c["difference"] <= c["high"]
        assert c["text"] in r.stdout


def test_basin_rule_names_a_random_init_ingredient(demo_run):
    """A constructed broken basin: the demo's fine-tunes plus a model trained from random initialisation."""
    from weightspace.analysis.basin import pairwise_barriers
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    from weightspace.experiments.demo import MODEL
    out, _ = demo_run
    res = json.loads((out / "results.json").read_text())
    ev = Evaluator(build_model(MODEL, num_classes=10), load_data("mnist:val?size=14"), device="cpu")
    mixed = [str(out / p) for p in res["checkpoints"]["fine_tuned"] + res["checkpoints"]["random_init"][:1]]
    basin = pairwise_barriers(mixed, ev, tolerance=0.03)
    assert basin.breakers == ["scratch0"]
    assert basin.medians[-1] > 0.03 and max(basin.medians[:-1]) <= 0.03
    # the matrix is the measured midpoints: one entry recomputed by hand
    a, b = (ws.load(p).materialise() for p in mixed[:2])
    mid = ev({k: (a[k].float() + b[k].float()) / 2 if a[k].is_floating_point() else a[k] for k in a})
    err = mid["mnist:val?size=14"]["error"]
    assert basin.barriers[0][1] == pytest.approx(err - (basin.ends[0] + basin.ends[1]) / 2, abs=1e-6)

"""The what-is-transferred recipe at reduced size, end to end through the CLI; the recipe format's checks."""
from __future__ import annotations

import json
import re

import pytest
from conftest import jack95, run_small_recipe

from weightspace.errors import ConfigError
from weightspace.experiments.rules import barrier_rule
from weightspace.experiments.transfer import load_transfer_recipe as load_recipe
from weightspace.experiments.verdicts import UNDER_TRAINED, VERDICTS, by_protocol, combine

RECIPE = "recipes/what-is-transferred.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wit") / "run"
    return out, run_small_recipe(RECIPE, out)


@pytest.mark.slow  # a recipe run end to end
def test_small_run_reports_every_finding(small_run):
    out, printed = small_run
    results = json.loads((out / "results.json").read_text())
    findings = {f["id"]: f for f in results["findings"]}
    assert set(findings) == {"a", "b", "c", "d"}
    assert all(f["verdict"] in VERDICTS for f in findings.values())
    assert [f["verdict"] for f in printed["findings"]] == [f["verdict"] for f in results["findings"]]
    report = (out / "REPORT.md").read_text()
    for fid, f in findings.items():
        section = re.search(rf"### \({fid}\).*?\n\n\*\*(.+?)\.\*\*", report)
        assert section and section.group(1).lower() == f["verdict"]
        for fig in f["figures"]:
            assert (out / fig).read_bytes()[:4] == b"\x89PNG"
            assert f"]({fig})" in report
    assert "reduced size" in report
    r = results["results"]
    # the numbers behind each verdict are the ones in results.json
    # (a): both halves — P-T's barrier interval below the tolerance, RI-T's above — under both BatchNorm protocols,
    # with the model as the unit of replication (pairs share models); recomputed from the per-pair barriers
    a = r["barriers"]["summary"]
    assert a["protocols"] == ["stored", "re-estimated"]
    pairs = r["barriers"]["pairs"]
    units = [[x.rsplit("-", 1)[-1] for x in e["pair"]] for e in pairs["P-T"]]
    assert len(units) == 3
    for proto, key in (("stored", "error_barrier"), ("re-estimated", "error_barrier_bn_recalibrated")):
        pt, ri = [e[key] for e in pairs["P-T"]], [e[key] for e in pairs["RI-T"]]
        n_test = a["checks"][proto]["pt_no_barrier"]["n_test"]
        assert a["sub_verdicts"][proto] == barrier_rule(pt, ri, a["tolerance"], units=units,
                                                        n_test=n_test)["sub_verdicts"]
        assert a["verdict_by_protocol"][proto] == combine(a["sub_verdicts"][proto])
    if results["results"]["training"]["ok"]:
        assert findings["a"]["verdict"] == by_protocol(a["verdict_by_protocol"])
    assert "stored BatchNorm statistics" in findings["a"]["numbers"] and "re-estimated" in findings["a"]["numbers"]
    # (b): both sub-checks' intervals, paired over the same pairs, jackknifed over the models the pairs share
    s = r["similarity"]["summary"]
    l2 = [ri["l2"] - pt["l2"] for pt, ri in zip(r["similarity"]["pairs"]["P-T"], r["similarity"]["pairs"]["RI-T"])]
    assert (s["checks"]["l2"]["interval"]["low"], s["checks"]["l2"]["interval"]["high"]) == pytest.approx(
        jack95(l2, units))
    both = {s["checks"]["l2"]["verdict"], s["checks"]["cka"]["verdict"]}
    if both == {"reproduced"}:
        assert findings["b"]["verdict"] in ("reproduced", UNDER_TRAINED)
    else:
        assert findings["b"]["verdict"] != "reproduced"
    # the minimum accuracy both kinds need is stated and recorded
    t = results["results"]["training"]
    assert set(t["mean"]) == {"P-T", "RI-T"} and t["minimum"] > 0
    # (c): both protocols judged per P-T model
    assert set(r["rewind"]["checks"]) == {"stored", "re-estimated"}
    assert [e["block"] for e in r["block_shuffle"]["blocks"]] == [8, 2]
    assert r["block_shuffle"]["blocks"][0]["benefit"] == pytest.approx(
        r["block_shuffle"]["blocks"][0]["P-T"]["final_accuracy"] - r["block_shuffle"]["blocks"][0]["RI-T"]["final_accuracy"])


@pytest.mark.slow  # a recipe run end to end
def test_small_run_leaves_checkpoints_and_data_the_cli_can_use(small_run, cli):
    out, _ = small_run
    ck = out / "checkpoints"
    assert {p.name for p in ck.iterdir()} == {"source.safetensors", "pt-init-7.safetensors", "ri-init-7.safetensors",
                                              *[f"{k}-7-{s}.safetensors" for k in ("pt", "ri") for s in (1, 2, 3)]}
    r = cli("rewind", ck / "pt-7-1.safetensors", "--init", ck / "pt-init-7.safetensors", "--model",
            "weightspace.eval.zoo:small_cnn?width=16", "--data", out / "data" / "target_test.pt", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    saved = json.loads((out / "results.json").read_text())["results"]["rewind"]["P-T"]["models"]["pt-7-1"]
    via_cli = json.loads(r.stdout)["metrics"]["conv2"]["init"]
    assert list(via_cli) == [str(out / "data" / "target_test.pt")]
    assert next(iter(via_cli.values()))["error"] == pytest.approx(saved["metrics"]["conv2"]["init"]["target_test"]["error"])


def test_recipe_format_errors(tmp_path):
    cfg = load_recipe(RECIPE, small=True, overrides=["train.finetune.epochs=2"])
    assert cfg["train"]["finetune"]["epochs"] == 2 and cfg["train"]["pretrain"]["epochs"] == 6
    assert cfg["analyses"]["barriers"]["steps"] == 5
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_recipe(RECIPE, overrides=["train.finetune.epoch=2"])
    with pytest.raises(ConfigError, match="unknown analysis 'barrier'"):
        load_recipe(RECIPE, overrides=["analyses.barrier.steps=3"])
    with pytest.raises(ConfigError, match="three different seeds"):
        load_recipe(RECIPE, overrides=["train.seeds=[1, 2]"])
    # the BatchNorm-free variant: the same recipe with GroupNorm in place of BatchNorm
    from weightspace.eval.models import build_model
    from weightspace.experiments.verdicts import has_batchnorm
    gn = load_recipe("recipes/what-is-transferred-groupnorm.yaml")
    assert gn["train"] == load_recipe(RECIPE)["train"] and not has_batchnorm(build_model(gn["model"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(RECIPE, overrides=["train.seeds"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: transfer\ndata: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.slow  # a recipe run end to end
def test_summary_page_is_generated_from_results(small_run, cli, tmp_path):
    out, _ = small_run
    page = tmp_path / "results.md"
    r = cli("recipe", "summary", out, "-o", page)
    assert r.exit_code == 0, r.stderr
    text = page.read_text()
    for f in json.loads((out / "results.json").read_text())["findings"]:
        assert f"| {f['verdict']} | {f['numbers']} |" in text  # numbers copied from results.json, not retyped
    assert "reduced size" in text
    bad = cli("recipe", "summary", tmp_path / "nowhere")
    assert bad.exit_code == 2 and "results.json: no such file" in bad.stderr and bad.stderr.count("\n") == 1

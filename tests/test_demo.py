"""`weightspace demo --small`: the embedded default run end to end on real digits, and its determinism."""
from __future__ import annotations

import json

import pytest
import torch

import weightspace as ws


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
    assert "| greedy soup |" in r.stdout and "| random-init pair | digits:test | error |" in r.stdout
    for name in ("results.json", "leaderboard.csv", "leaderboard.png", "curve.json", "curve.csv", "curve.png"):
        assert f"{out / name}" in r.stdout or name in ("leaderboard.csv", "curve.csv"), name
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row["metrics"] for row in res["leaderboard"]["rows"]}
    assert res["leaderboard"]["columns"] == ["digits:val", "digits:test", "digits:test+shift"]
    assert len(res["checkpoints"]["fine_tuned"]) == 3 and len(res["checkpoints"]["random_init"]) == 2
    # really trained on real data: well above the 10% of chance
    assert rows["best individual (val)"]["digits:test"]["accuracy"] > 0.5
    # the greedy soup starts from the best ingredient and never accepts a validation drop
    assert rows["greedy soup"]["digits:val"]["accuracy"] >= rows["best individual (val)"]["digits:val"]["accuracy"]
    # the saved greedy soup is the mean of the kept fine-tunes (files on disk, read back)
    kept = res["greedy"]["kept"]
    soup = ws.load(res["soups"]["greedy"])
    mean = ws.uniform_soup(kept)
    assert all(torch.allclose(soup[k].float(), mean[k].float(), atol=1e-6) for k in mean)
    # fine-tunes of one pre-trained start sit in one basin; independent random inits do not
    b = res["barriers"]
    assert b["random-init pair"]["digits:test"]["error"]["chord"] > b["fine-tuned pair"]["digits:test"]["error"]["chord"]
    prov = ws.load(res["checkpoints"]["fine_tuned"][0]).provenance
    assert prov["op"] == "train" and prov["config"]["init"] == "linear-probe.safetensors"


def test_demo_is_deterministic_and_refuses_to_overwrite(demo_run, tmp_path):
    from click.testing import CliRunner

    from weightspace_cli.main import main
    out, _ = demo_run
    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["demo", "--small", "--out", str(again), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert first == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in first:
        if rel.name in ("results.json", "curve.json"):  # they name their own folder
            a = (out / rel).read_text().replace(str(out), "OUT")
            b = (again / rel).read_text().replace(str(again), "OUT")
            assert a == b, rel
        elif rel.suffix != ".safetensors" or rel.parent.name != "soups":  # soups record their ingredients' paths
            assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    r = CliRunner().invoke(main, ["demo", "--small", "--out", str(again), "-q"], catch_exceptions=False)
    assert r.exit_code == 2 and "already exists (use --force" in r.stderr

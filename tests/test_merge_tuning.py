"""Every merge method from the CLI (--method NAME --param KEY=VALUE), tuned on validation data (--val, the curve in
--out), and as a row of the soup leaderboard (--merge NAME)."""
from __future__ import annotations

import json

import pytest
import torch
from evalhelpers import save_all, train_cnns

from weightspace import load
from weightspace.errors import ConfigError
from weightspace.ops.merge import merge

pytestmark = pytest.mark.usefixtures("one_thread")

CNN = "weightspace.eval.zoo:small_cnn?width=4"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three small CNNs trained from one shared init (ingredients), and that init (the merges' base), as files."""
    from weightspace import save
    from weightspace.eval.models import build_model
    d = tmp_path_factory.mktemp("tuning")
    torch.manual_seed(1000)  # the init train_cnns(shared_init=True) starts from
    base = str(save(build_model(CNN, num_classes=10).state_dict(), d / "base.safetensors"))
    return d, base, save_all(train_cnns([1, 2, 3], shared_init=True, epochs=1, spec=CNN), d, "ft")


def test_cli_runs_every_method_with_its_params(cli, files):
    d, base, fts = files
    cases = {"slerp": (fts[:1], ["t=0.3"]), "nuslerp": (fts[:2], ["t=0.7", "nuslerp_flatten=false"]),
             "karcher": (fts, []), "model-stock": (fts, []), "breadcrumbs": (fts, ["density=0.8", "gamma=0.05"]),
             "sce": (fts, ["select_topk=0.5"]), "dare-linear": (fts, ["density=0.5", "seed=2"]),
             "dare-ties": (fts, ["density=0.5", "seed=2"]), "della": (fts, ["density=0.5", "epsilon=0.1"])}
    for method, (models, params) in cases.items():
        out = d / f"{method}.safetensors"
        args = [a for p in params for a in ("--param", p)]
        r = cli("merge", "--method", method, "--base", base, *models, *args, "-o", out, "--json", "--quiet")
        assert r.exit_code == 0, (method, r.stderr)
        opts = {k.replace("-", "_"): json.loads(v) if v in ("true", "false") else float(v) if "." in v else int(v)
                for k, v in (p.split("=") for p in params)}
        ref = merge(method, base, models, **opts).materialise()
        got = load(out)
        assert all(torch.equal(got[k], ref[k]) for k in ref), method
        assert got.provenance["method"] == method
    r = cli("merge", "--method", "nope", "--base", base, fts[0], "-o", d / "x.safetensors")
    assert r.exit_code == 2 and "'nope' is not one of" in r.stderr
    r = cli("merge", "--method", "slerp", "--base", base, fts[0], "--param", "t", "-o", d / "x.safetensors")
    assert r.exit_code == 2 and "KEY=VALUE" in r.stderr
    r = cli("merge", "--method", "slerp", "--base", base, *fts, "-o", d / "x.safetensors")
    assert r.exit_code == 2 and "exactly 1 model" in r.stderr and not (d / "x.safetensors").exists()


@pytest.mark.parametrize("method,grid,param", [("breadcrumbs", "0.3,0.9", "density"), ("slerp", "0.0,0.5,1.0", "t")])
def test_cli_tunes_the_main_hyperparameter_on_val(cli, files, method, grid, param):
    d, base, fts = files
    models = fts[:1] if method == "slerp" else fts
    out, report = d / f"tuned-{method}.safetensors", d / f"curve-{method}"
    r = cli("merge", "--method", method, "--base", base, *models, "--model", CNN, "--val", "digits:val",
            "--data", "digits:test", "--grid", grid, "-o", out, "--out", report, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    accs = {s[param]: s["val_accuracy"] for s in res["scores"]}
    assert res["parameter"] == param and list(accs) == [float(g) for g in grid.split(",")]
    assert accs[res[param]] == max(accs.values())
    assert res["metrics"]["digits:val"]["accuracy"] == accs[res[param]] and "digits:test" in res["metrics"]
    assert (report / "curve.png").stat().st_size > 1000 and (report / "curve.csv").exists()
    saved = json.loads((report / "results.json").read_text())
    assert saved["value"] == res[param] and len(saved["scores"]) == len(accs)
    prov = load(out).provenance
    assert prov["method"] == method and prov[f"{param}_search"]["grid"] == list(accs)
    lb = json.loads(cli("leaderboard", out, "--model", CNN, "--data", "digits:val", "--json", "--quiet").stdout)
    assert lb["leaderboard"]["rows"][0]["metrics"]["digits:val"]["accuracy"] == accs[res[param]]


def test_soup_leaderboard_takes_any_method(cli, files):
    d, base, fts = files
    r = cli("soup", *fts, "--model", CNN, "--val", "digits:val", "--base", base, "--merge", "dare-ties",
            "--merge", "model-stock", "--merge", "regmean", "--scales", "0.5,1.0", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    rows = {row["method"].split(" ")[0]: row for row in json.loads(r.stdout)["leaderboard"]["rows"]
            if row["kind"] == "merge"}
    assert set(rows) == {"dare-ties", "model-stock", "regmean"}
    assert rows["dare-ties"]["parameter"] == "density" and rows["model-stock"]["parameter"] == "scale"
    assert rows["regmean"]["detail"] == "statistics on digits:val" and rows["regmean"]["metrics"]["digits:val"]
    for row in (rows["dare-ties"], rows["model-stock"]):
        scores = dict((v, s) for v, s in row["scores"])
        assert scores[row["value"]] == max(scores.values())


def test_cli_fisher_and_regmean_need_a_model_and_data(cli, files):
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    from weightspace.search.fisher import fisher_merge
    from weightspace.search.regmean import regmean_merge
    d, base, fts = files
    data = load_data("digits:val")
    for method, params, run in (("regmean", ["alpha=0.8"], regmean_merge), ("fisher", ["fisher_floor=1e-5"],
                                                                             fisher_merge)):
        out = d / f"{method}.safetensors"
        r = cli("merge", "--method", method, *fts, "--model", CNN, "--train", "digits:val", "--param", params[0],
                "-o", out, "--json", "--quiet")
        assert r.exit_code == 0, r.stderr
        key, value = params[0].split("=")
        ref = run(fts, build_model(CNN, num_classes=10), data, **{key: float(value)})
        got = load(out)
        assert all(torch.allclose(got[k].float(), ref[k].float(), atol=1e-6) for k in ref), method
        assert got.provenance["method"] == method
    r = cli("merge", "--method", "fisher", *fts, "-o", d / "x.safetensors")
    assert r.exit_code == 2 and "--model" in r.stderr
    r = cli("merge", "--method", "fisher", "--base", base, *fts, "-o", d / "x.safetensors")
    assert r.exit_code == 2 and "drop --base" in r.stderr
    with pytest.raises(ConfigError, match="needs a model and data"):
        merge("fisher", base, fts)

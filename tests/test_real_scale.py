"""The real-scale recipes (recipes/real-scale/*.yaml) run end to end, unchanged but for --small, with every Hub id
they name resolved through an offline stand-in HF cache laid out here: each repo's config.json names a tiny timm
model of the same family (test_resnet, test_vit) with random weights, as the Hub's config.json names resnet50.
The data paths they name (~/data/...) are ImageNet-style folders of real digit images under a temporary HOME."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import datahelpers as dh

from weightspace.experiments.verdicts import VERDICTS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, not two fighting over busy cores

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "real-scale"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
# the Hub repo's architecture → a tiny member of its family, with the arguments that keep what the recipe relies on
STAND_INS = {
    "resnet18": ("test_resnet", {}),
    "resnet34": ("test_resnet", {}),
    "resnet50": ("test_resnet", {}),
    "resnet101": ("test_resnet", {}),
    "resnet50_gn": ("test_resnet", {"norm_layer": "groupnorm1"}),  # GroupNorm: no running statistics, like the real one
    "vit_base_patch16_clip_224": ("test_vit", {"img_size": 32}),
}
WNIDS = (1, 207, 980)  # ImageNet classes the digits 0, 3 and 7 are filed under
FOLDERS = ["imagenet/val", "imagenet/train-subset", "imagenet/heldout", "imagenet-r", "imagenet-sketch", "imagenet-a",
           "imagenet-sketch-200"]


def hub_ids() -> set[str]:
    """Every hf-hub:ORG/NAME the real-scale recipes name."""
    return {m for p in RECIPES.glob("*.yaml") for m in re.findall(r"hf-hub:([\w.-]+/[\w.-]+)", p.read_text())}


def put(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay a repo out as huggingface_hub does: refs/main, blobs/<sha256>, snapshots/<commit>/FILE → blob."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / COMMIT


def stand_in(repo_id: str, tmp: Path) -> dict[str, bytes]:
    """config.json + model.safetensors of a tiny model of the repo's family. Models of one pre-training (the tag's
    first word: openai, laion2b, tv, a1, ...) share a random base, each with its own small perturbation, so
    fine-tunes of one start sit in one basin; num_batches_tracked is left out, as in published timm files."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    family, tag = repo_id.split("/", 1)[1].split(".", 1)
    arch, args = STAND_INS[family]
    seed = int(hashlib.sha256(tag.split("_")[0].encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=1000, **args)
    g = torch.Generator().manual_seed(seed + int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16))
    sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp / f"{family}.{tag}.safetensors"
    st.save_file(sd, path)
    own = model.pretrained_cfg
    cfg = {"architecture": arch, "num_classes": 1000, "num_features": model.num_features, "model_args": args,
           "pretrained_cfg": {"tag": tag, "num_classes": 1000, "input_size": [3, 32, 32], "crop_pct": 0.875,
                              "interpolation": "bicubic", "mean": list(IMAGENET_DEFAULT_MEAN),
                              "std": list(IMAGENET_DEFAULT_STD), "first_conv": own["first_conv"],
                              "classifier": own["classifier"]}}
    return {"config.json": json.dumps(cfg).encode(), "model.safetensors": path.read_bytes()}


@pytest.fixture(scope="module")
def stand_in_hub(tmp_path_factory):
    """HOME with ~/data/... image folders, and an offline HF cache holding a stand-in for every Hub id."""
    import huggingface_hub.constants as constants
    from timm.data import ImageNetInfo
    base = tmp_path_factory.mktemp("real-scale")
    cache, home = base / "hub", base / "home"
    weights = {rid: stand_in(rid, base) for rid in sorted(hub_ids())}
    snaps = {rid: put(cache, rid, files) for rid, files in weights.items()}
    wnids = ImageNetInfo("imagenet-1k").label_names()
    for k, folder in enumerate(FOLDERS):  # a few real digits per wnid class, each folder its own images
        for cls, i, arr in dh.digit_images(4, (40 + 4 * k, 40)):
            d = home / "data" / folder / wnids[WNIDS[dh.CLASSES.index(int(cls[-1]))]]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.jpg").write_bytes(dh.jpeg(arr))
    dh.write_folder(home / "data" / "target", per_class=10)  # the transfer target: digit0/3/7, 10 images each
    for folder in ("dtd/images", "eurosat"):  # targets whose classes are not ImageNet's
        dh.write_folder(home / "data" / folder, per_class=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads these two from the environment once, at import time
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield {"snapshots": snaps, "home": home}


def run(cli, name: str, out: Path) -> dict:
    r = cli("recipe", "run", RECIPES / name, "--out", out, "--small", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    return json.loads((out / "results.json").read_text())


def stand_in_tensors(hub: dict, repo_id: str) -> dict[str, torch.Tensor]:
    return st.load_file(hub["snapshots"][repo_id] / "model.safetensors")


def test_every_hub_id_of_the_real_scale_recipes_has_a_stand_in():
    assert {p.name for p in RECIPES.glob("*.yaml")} == {"what-is-transferred.yaml", "what-is-transferred-groupnorm.yaml",
                                                      "align-barrier.yaml", "soup.yaml", "trajectory.yaml",
                                                      "saturation-pairs.yaml", "head2toe-targets.yaml",
                                                      "cross-domain.yaml"}
    assert {rid.split("/")[1].split(".")[0] for rid in hub_ids()} <= set(STAND_INS)


@pytest.mark.slow  # a recipe run end to end
@pytest.mark.parametrize("name,repo", [("what-is-transferred.yaml", "timm/resnet50.a1_in1k"),
                                       ("what-is-transferred-groupnorm.yaml", "timm/resnet50_gn.a1h_in1k")])
def test_transfer_from_a_hub_model(stand_in_hub, cli, tmp_path, name, repo):
    res = run(cli, name, tmp_path / "run")
    assert [f["id"] for f in res["findings"]] == ["a", "b", "c", "d"]
    assert all(f["verdict"] in VERDICTS for f in res["findings"])
    # P-T starts from the Hub weights (the stand-in's file), with a fresh 3-class head
    pub = stand_in_tensors(stand_in_hub, repo)
    init = st.load_file(tmp_path / "run" / "checkpoints" / "pt-init-7.safetensors")
    assert init["fc.weight"].shape == (3, 96) and pub["fc.weight"].shape == (1000, 96)
    body = [k for k in pub if not k.startswith("fc.")]
    assert body and all(torch.equal(init[k], pub[k]) for k in body)
    assert not (tmp_path / "run" / "checkpoints" / "source.safetensors").exists()  # nothing pre-trained here
    # the target images were decoded with the Hub config's eval transform (32 px) and split 5 + 5 per class
    test = torch.load(tmp_path / "run" / "data" / "target_test.pt", weights_only=True)
    assert test["x"].dtype == torch.uint8 and test["x"].shape == (15, 3, 32, 32)
    assert len(res["results"]["models"]) == 6
    cka = res["results"]["similarity"]["summary"]  # full_limit 0: the minibatch estimate, a number in [−1, 1]
    assert all(-1.0 <= cka[f"{k}_mean_linear_cka"] <= 1.0 for k in ("P-T", "RI-T"))
    protocols = res["results"]["barriers"]["summary"]["protocols"]
    assert protocols == (["stored"] if "groupnorm" in name else ["stored", "re-estimated"])
    assert "Source model: the published weights `hf-hub:" + repo in (tmp_path / "run" / "REPORT.md").read_text()


@pytest.mark.slow  # a recipe run end to end
def test_align_published_models(stand_in_hub, cli, tmp_path):
    res = run(cli, "align-barrier.yaml", tmp_path / "run")
    names = ["resnet50.tv_in1k", "resnet50.tv2_in1k", "resnet50.a1_in1k"]
    assert list(res["results"]["models"]) == names
    assert [f["id"] for f in res["findings"]] == ["a", "b"]
    assert len(res["results"]["pairs"]) == 3 and res["results"]["fixes"] == ["none", "recalibrate_bn", "repair"]
    # B aligned to A is a permutation of B: the same multiset of values in every tensor
    b = stand_in_tensors(stand_in_hub, "timm/resnet50.tv2_in1k")
    pb = st.load_file(tmp_path / "run" / "checkpoints" / "resnet50.tv2_in1k-aligned-weights-to-resnet50.tv_in1k.safetensors")
    assert all(torch.equal(torch.sort(pb[k].flatten()).values, torch.sort(b[k].flatten()).values) for k in b)
    assert any(not torch.equal(pb[k], b[k]) for k in b)
    # the 3 wnid folders of ~/data/imagenet/val are scored on those 3 of the model's 1,000 classes
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "barriers on `~/data/imagenet/val` (12 examples)" in report


def test_soup_of_hub_fine_tunes(stand_in_hub, cli, tmp_path):
    out = tmp_path / "run"
    res = run(cli, "soup.yaml", out)
    lb = res["leaderboard"]
    tests = ["~/data/imagenet/val", "~/data/imagenet-r", "~/data/imagenet-sketch", "~/data/imagenet-a"]
    assert lb["columns"] == ["~/data/imagenet/heldout", *tests, "avg shifts"]
    methods = [r["method"] for r in lb["rows"]]
    assert {"uniform soup", "greedy soup", "best individual (val)", "output ensemble", "greedy ensemble"} <= set(methods)
    assert all(r["metrics"][c]["n"] == 12 for r in lb["rows"] for c in lb["columns"][:-1])
    # the greedy soup is the mean of the ingredients it kept, read from the stand-in files
    kept = res["greedy"]["kept"]
    assert kept and set(kept) <= set(res["recipe"]["ingredients"])
    parts = [stand_in_tensors(stand_in_hub, s.split(":", 1)[1]) for s in kept]
    greedy = st.load_file(out / "soups" / "greedy.safetensors")
    for k in ("head.weight", "blocks.0.attn.qkv.weight"):
        assert torch.allclose(greedy[k], sum(p[k] for p in parts) / len(parts), atol=1e-6)
    assert len(res["basin"]["names"]) == 4 and [f["id"] for f in res["findings"]] == ["a", "b"]
    assert (out / "curve.png").exists() and (out / "REPORT.md").read_text().count("avg shifts") >= 1


@pytest.mark.slow  # a recipe run end to end
def test_trajectory_from_published_start_points(stand_in_hub, cli, tmp_path):
    out = tmp_path / "run"
    res = run(cli, "trajectory.yaml", out)
    assert [f["id"] for f in res["findings"]] == ["a", "b"]
    assert list(res["results"]["starts"]) == ["100", "300", "600"] and res["results"]["protocols"] == ["stored", "re-estimated"]
    assert res["results"]["data"] == {"source": None, "source_test": 12, "target_train": 15, "target_test": 15}
    final = res["results"]["starts"]["600"]
    assert final["barrier_to_final"] == 0.0 and 0.0 <= final["source_accuracy"] <= 1.0
    assert all(len(st["accuracy"]) == 3 and len(st["pairs"]) == 3 for st in res["results"]["starts"].values())
    # every start point is the published file's body with the one random 3-class head
    heads = []
    for epochs, tag in (("100", "a3"), ("300", "a2"), ("600", "a1")):
        pub = stand_in_tensors(stand_in_hub, f"timm/resnet50.{tag}_in1k")
        start = st.load_file(out / "checkpoints" / f"start-epoch-{epochs}.safetensors")
        assert all(torch.equal(start[k], pub[k]) for k in pub if not k.startswith("fc."))
        assert start["fc.weight"].shape == (3, 96)
        heads.append(start["fc.weight"])
    assert all(torch.equal(h, heads[0]) for h in heads)
    assert not (out / "checkpoints" / "pretrain-epoch-600.safetensors").exists()  # nothing pre-trained here
    assert "`hf-hub:timm/resnet50.a3_in1k` (100 epochs)" in (out / "REPORT.md").read_text()


@pytest.mark.slow  # a recipe run end to end
def test_saturation_pairs_of_published_models(stand_in_hub, cli, tmp_path):
    out = tmp_path / "run"
    res = run(cli, "saturation-pairs.yaml", out)
    assert [f["id"] for f in res["findings"]] == ["a", "b"]
    points = res["results"]["points"]
    ids = [m for g in ("a1", "a2", "a3") for m in res["recipe"]["published"][g]]
    assert [p["model"] for p in points] == ids and len(ids) == 12
    assert [p["seed"] for p in points] == ["a1"] * 4 + ["a2"] * 4 + ["a3"] * 4
    assert set(res["results"]["fits"]) == {"a1", "a2", "a3"}
    assert res["results"]["data"] == {"upstream_train": None, "upstream_test": 12, "downstream_train": 15,
                                      "downstream_test": 15}
    # every upstream accuracy is the stand-in's own, on the 3 wnid classes of ~/data/imagenet/val
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from timm.data import IMAGENET_DEFAULT_MEAN

    from weightspace.analysis.probe import fit_linear
    from weightspace.analysis.taps import FeatureTaps
    from weightspace.eval.models import build_model
    from weightspace.experiments.kit import task
    for p in points[:2]:
        net = build_model("timm:" + p["model"])
        ev = Evaluator(net, load_data("~/data/imagenet/val", model=net), device="cpu")
        sd = stand_in_tensors(stand_in_hub, p["model"].split(":", 1)[1])
        assert p["upstream"] == float(ev(sd))
        # and the downstream probe read the stand-in's features: the same probe on them scores the same
        net = build_model("timm:" + p["model"])
        net.load_state_dict({**net.state_dict(), **sd})
        tr, te = task({"spec": "~/data/target", "train_per_class": 5}, "downstream", "test", lambda: net)  # noqa: B023
        assert tr.mean == te.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and tr.x.dtype == torch.uint8  # normalised per batch
        taps = FeatureTaps(net, "fc:in", device="cpu")
        ftr, fte = taps(tr), taps(te)
        layer = ftr.layers[-1]
        assert p["downstream"] == fit_linear(ftr.x[layer], ftr.y, 3, device="cpu").accuracy(fte.x[layer], fte.y)
    rows = (out / "pairs.csv").read_text().splitlines()
    assert rows[0] == "group,model,upstream_accuracy,downstream_accuracy" and len(rows) == 13
    assert "`hf-hub:timm/resnet101.a3_in1k`" in (out / "REPORT.md").read_text()


@pytest.mark.slow  # a recipe run end to end
def test_head2toe_targets_from_a_published_backbone(stand_in_hub, cli, tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    out = tmp_path / "run"
    res = run(cli, "head2toe-targets.yaml", out)
    assert [f["id"] for f in res["findings"]] == ["a", "b"]
    targets = res["results"]["targets"]
    assert list(targets) == ["ImageNet (held-out images)", "ImageNet-R", "ImageNet-Sketch", "DTD textures", "EuroSAT"]
    assert all(t["train"] == 6 and t["test"] == 6 for t in targets.values())
    order, far, near = res["results"]["order"], res["results"]["far"], res["results"]["near"]
    assert sorted(order) == sorted(targets) and far == order[:2] and near == order[3:]  # five: the middle one in neither
    # one backbone, the published one: the same probe for every seed, the stand-in's own source accuracy
    for t in targets.values():
        assert len({r["probe"] for r in t["per_seed"].values()}) == 1
    net = build_model("timm:hf-hub:timm/resnet50.a1_in1k")
    ev = Evaluator(net, load_data("~/data/imagenet/val", model=net), device="cpu")
    expected = float(ev(stand_in_tensors(stand_in_hub, "timm/resnet50.a1_in1k")))
    assert res["results"]["source_accuracy"] == {"1": expected, "2": expected, "3": expected}
    assert not (out / "checkpoints").exists()  # nothing pre-trained here
    assert "published weights `hf-hub:timm/resnet50.a1_in1k`" in (out / "REPORT.md").read_text()


@pytest.mark.slow  # a recipe run end to end
def test_cross_domain_from_a_published_model(stand_in_hub, cli, tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    out = tmp_path / "run"
    res = run(cli, "cross-domain.yaml", out)
    assert [f["id"] for f in res["findings"]] == ["a", "b"]
    r = res["results"]
    assert r["protocols"] == ["stored", "re-estimated"]
    assert {n: (d["train"], d["test"]) for n, d in r["domains"].items()} == {"renditions": (6, 6), "sketches": (6, 6)}
    assert all(len(r["within"][n]["stored"]) == 3 and len(r["cross"][n]["re-estimated"]) == 3 for n in r["domains"])
    # every fine-tune starts from the published body with one random 200-class (here 3-class) head
    pub = stand_in_tensors(stand_in_hub, "timm/resnet50.a1_in1k")
    init = st.load_file(out / "checkpoints" / "pt-init.safetensors")
    assert init["fc.weight"].shape == (3, 96)
    assert all(torch.equal(init[k], pub[k]) for k in pub if not k.startswith("fc."))
    net = build_model("timm:hf-hub:timm/resnet50.a1_in1k")
    assert r["source_accuracy"] == float(Evaluator(net, load_data("~/data/imagenet/val", model=net), device="cpu")(pub))
    assert not (out / "checkpoints" / "source.safetensors").exists()  # nothing pre-trained here
    assert "published weights `hf-hub:timm/resnet50.a1_in1k`" in (out / "REPORT.md").read_text()


def test_cross_domain_folders_with_different_classes_are_one_line(stand_in_hub, cli, tmp_path):
    out = tmp_path / "run"
    r = cli("recipe", "run", RECIPES / "cross-domain.yaml", "--out", out, "--small", "--quiet", "--set",
            "domains=[{name: renditions, spec: ~/data/imagenet-r}, {name: textures, spec: ~/data/dtd/images}]")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cross-domain.yaml: domains 'renditions' and 'textures' hold different classes ('n01443537' vs " \
           "'digit0')" in r.stderr
    assert not out.exists()


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(stand_in_hub, cli, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    for name, repo in (("soup.yaml", "timm/vit_base_patch16_clip_224.openai_ft_in1k"),
                       ("what-is-transferred.yaml", "timm/resnet50.a1_in1k"),
                       ("trajectory.yaml", "timm/resnet50.a1_in1k"),  # its model: names the architecture
                       ("saturation-pairs.yaml", "timm/resnet18.a1_in1k")):
        out = tmp_path / name
        r = cli("recipe", "run", RECIPES / name, "--out", out, "--small", "--quiet")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
        assert repo in r.stderr and "HF_HUB_OFFLINE is set and it is not in the cache" in r.stderr
        assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.gpu
def test_transfer_trains_and_evaluates_on_the_gpu(stand_in_hub, tmp_path):
    """The configuration as a GPU machine runs it (--device cuda): training, analyses and report on the device.
    bench/gpu_check.sh runs it (pytest -m gpu); WEIGHTSPACE_TEST_DEVICE=cpu checks the plumbing without a GPU."""
    from weightspace.experiments.runner import run_recipe
    device = os.environ.get("WEIGHTSPACE_TEST_DEVICE", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("GPU tests need CUDA: run them with bench/gpu_check.sh on a GPU machine (make test deselects them)")
    r = run_recipe(RECIPES / "what-is-transferred.yaml", tmp_path / "run", small=True, progress=False, device=device)
    assert [f["id"] for f in r["findings"]] == ["a", "b", "c", "d"]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    accs = [m["accuracy"] for m in res["results"]["models"].values()]
    assert len(accs) == 6 and all(0.0 <= a <= 1.0 for a in accs)
    init = st.load_file(tmp_path / "run" / "checkpoints" / "pt-init-7.safetensors")
    tuned = st.load_file(tmp_path / "run" / "checkpoints" / "pt-7-1.safetensors")
    assert sorted(init) == sorted(tuned) and not torch.equal(init["fc.weight"], tuned["fc.weight"])  # trained there


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["trajectory.yaml", "saturation-pairs.yaml", "head2toe-targets.yaml",
                                  "cross-domain.yaml"])
def test_published_checkpoint_recipes_run_on_the_gpu(stand_in_hub, tmp_path, name):
    """The four recipe kinds over published checkpoints with --device cuda: fine-tuning, scratch models, probes and
    barriers on the device (bench/gpu_check.sh; WEIGHTSPACE_TEST_DEVICE=cpu checks the plumbing without a GPU)."""
    from weightspace.experiments.runner import run_recipe
    device = os.environ.get("WEIGHTSPACE_TEST_DEVICE", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("GPU tests need CUDA: run them with bench/gpu_check.sh on a GPU machine (make test deselects them)")
    r = run_recipe(RECIPES / name, tmp_path / "run", small=True, progress=False, device=device)
    assert [f["id"] for f in r["findings"]] == ["a", "b"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["recipe"]["small_run"] is True

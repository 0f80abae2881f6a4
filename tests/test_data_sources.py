"""Image sources decoded once into uint8: folder, tar, webdataset, `datasets` and CIFAR versions of one real image set
give identical tensors and metrics; uint8 + per-batch normalisation gives timm's float pipeline's logits; the cache
decodes once, is invalidated by a touched file and managed by `weightspace data ls|rm`; subset classes equal
hand-masked logits; the streamed memory-map path equals the resident path; unreadable images are named."""
from __future__ import annotations

import json
import os

import pytest
import torch

import datahelpers as dh
import weightspace as ws
from weightspace import errors
from weightspace.eval import Metrics
from weightspace.eval.data import load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def small_timm(num_classes: int = 3, **cfg):
    """timm resnet18 with a 64-pixel eval transform (Resize 73, bicubic; CentreCrop 64; ImageNet mean/std)."""
    import timm
    overlay = {"input_size": (3, 64, 64), "crop_pct": 0.875, **cfg}
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay).eval()


@pytest.fixture(scope="module")
def imageset(tmp_path_factory):
    base = tmp_path_factory.mktemp("imageset")
    root = dh.write_folder(base / "folder")
    return {"folder": str(root), "tar": str(dh.write_tar(root, base / "images.tar")),
            "wds": dh.write_wds(root, base / "wds"), "hfds": "hfds/" + str(dh.write_hfds(root, base / "hf")),
            "base": base}


def float_pipeline(model, files) -> torch.Tensor:
    """timm's own eval transform on each file (PIL → float tensor → normalised), stacked."""
    import timm.data
    from PIL import Image
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in files])


def test_every_source_gives_the_same_uint8_tensors_and_metrics(imageset):
    model = small_timm()
    loaded = {k: load_data(imageset[k], model=model, workers=2, progress=False) for k in ("folder", "tar", "wds", "hfds")}
    ref = loaded["folder"]
    assert ref.x.dtype == torch.uint8 and ref.x.shape == (18, 3, 64, 64)
    assert ref.meta["classes"] == ["digit0", "digit3", "digit7"] and ref.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for k, d in loaded.items():
        assert torch.equal(d.x, ref.x), k
        assert torch.equal(d.y, ref.y) and d.meta["classes"] == ref.meta["classes"], k
        assert d.mean == ref.mean and d.std == ref.std
    metrics = ws.Evaluator(model, list(loaded.values()), device="cpu", batch_size=8)()
    values = [metrics[d.name] for d in loaded.values()]
    assert all(v == values[0] for v in values) and values[0]["n"] == 18


def test_uint8_with_on_device_normalisation_gives_the_float_pipelines_logits(imageset):
    model = small_timm(num_classes=3, input_size=(3, 224, 224), crop_pct=0.95)  # resnet18's own eval transform
    d = load_data(imageset["folder"], model=model, workers=2, progress=False)
    files = [p for p, _, _ in dh.folder_samples(dh.Path(imageset["folder"]))]
    xf = float_pipeline(model, files)
    assert torch.equal(d.prepare(d.x), xf)  # bit-identical inputs
    r = ws.Evaluator(model, d, device="cpu", batch_size=9, keep_logits=True)()
    with torch.no_grad():
        ref = torch.cat([model(xf[i:i + 9]) for i in range(0, len(xf), 9)])
    assert torch.equal(r.logits[d.name], ref)
    assert d.x.nbytes * 4 == xf.nbytes  # a quarter of the float tensor's memory


def test_cache_hit_decodes_nothing_and_a_touched_file_invalidates_it(imageset, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "set"
    dh.write_folder(root, per_class=3)
    model = small_timm()
    first = load_data(str(root), model=model, workers=0, progress=False)
    assert first.meta["cache"]["hit"] is False

    import weightspace.eval.data.images as images

    def no_decoding(*a, **kw):
        raise AssertionError("a cache hit must not decode")
    monkeypatch.setattr(images, "decode_into", no_decoding)
    again = load_data(str(root), model=model, progress=False)
    assert again.meta["cache"] == {"entry": first.meta["cache"]["entry"], "hit": True}
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    if os.path.exists("/proc/self/maps"):  # memory-mapped from the entry, not read into anonymous memory
        assert first.meta["cache"]["entry"] + ".npy" in open("/proc/self/maps").read()

    victim = next((root / "digit3").iterdir())
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="must not decode"):
        load_data(str(root), model=model, progress=False)  # the touched file makes it a miss
    monkeypatch.undo()
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(tmp_path / "cache"))
    other = load_data(str(root), model=model, workers=0, progress=False)
    assert other.meta["cache"]["hit"] is False and other.meta["cache"]["entry"] != first.meta["cache"]["entry"]

    r = cli("data", "ls", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(e["name"] for e in rows) == sorted([first.meta["cache"]["entry"], other.meta["cache"]["entry"]])
    assert all(e["examples"] == 9 and e["bytes"] > 9 * 3 * 64 * 64 for e in rows)
    r = cli("data", "rm", first.meta["cache"]["entry"])
    assert r.exit_code == 0 and first.meta["cache"]["entry"] in r.stdout
    assert [e["name"] for e in json.loads(cli("data", "ls", "--json").stdout)] == [other.meta["cache"]["entry"]]
    r = cli("data", "rm", "no-such-entry")
    assert r.exit_code == 2 and "no-such-entry" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cache_off_decodes_every_time_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", "off")
    root = dh.write_folder(tmp_path / "set", per_class=2)
    before = sorted(p for p in tmp_path.rglob("*"))
    a = load_data(str(root), model=small_timm(), workers=2, progress=False)
    b = load_data(str(root), model=small_timm(), workers=0, progress=False)
    assert a.meta["cache"]["entry"] is None and torch.equal(a.x, b.x)  # 2 workers == in-process decoding
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_subset_classes_equal_hand_masked_logits(imageset, tmp_path):
    model = small_timm(num_classes=10)
    plain = load_data(imageset["folder"], progress=False, model=small_timm(num_classes=3))
    full = ws.Evaluator(model, plain, device="cpu", keep_logits=True)().logits[plain.name]  # all 10 outputs
    # folder classes digit0/3/7 ↔ model outputs 0/3/7, by an explicit map file
    cmap = tmp_path / "classes.txt"
    cmap.write_text("digit0 0\ndigit3 3\ndigit7 7\n")
    sub = load_data(imageset["folder"] + f"?classes={cmap}", model=model, progress=False)
    r = ws.Evaluator(model, sub, device="cpu", keep_logits=True)()
    masked = full[:, [0, 3, 7]]
    assert torch.equal(r.logits[sub.name], masked)
    assert r[sub.name]["accuracy"] == float((masked.argmax(1) == sub.y).double().mean())
    # many-to-one: digit0 scored by the max over outputs 0 and 8
    cmap.write_text('{"digit0": [0, 8], "digit3": 3, "digit7": "7"}')
    pooled = load_data(imageset["folder"] + f"?classes={cmap}&limit=18", model=model, progress=False)
    lg = ws.Evaluator(model, pooled, device="cpu", keep_logits=True)().logits[pooled.name]
    assert torch.equal(lg, torch.stack([full[:, [0, 8]].amax(1), full[:, 3], full[:, 7]], 1))
    cmap.write_text("digit0 0\ndigit3 3\n")
    with pytest.raises(errors.ConfigError, match="digit7"):
        load_data(imageset["folder"] + f"?classes={cmap}", model=model, progress=False)


def test_imagenet_wnid_folders_are_matched_to_a_1000_class_model(tmp_path):
    from timm.data import ImageNetInfo
    wnids = ImageNetInfo("imagenet-1k").label_names()
    root = tmp_path / "inet-r"
    for cls, i, arr in dh.digit_images(2):
        wn = wnids[[1, 207, 980][dh.CLASSES.index(int(cls[-1]))]]
        (root / wn).mkdir(parents=True, exist_ok=True)
        (root / wn / f"{i}.jpg").write_bytes(dh.jpeg(arr))
    model = small_timm(num_classes=1000)
    d = load_data(str(root), model=model, progress=False)
    assert d.label_map == [[1], [207], [980]]
    ev = ws.Evaluator(model, d, device="cpu", keep_logits=True)
    plain = ws.Evaluator(model, d.__class__(d.name, d.x, d.y, mean=d.mean, std=d.std), device="cpu", keep_logits=True)
    assert torch.equal(ev().logits[d.name], plain().logits[d.name][:, [1, 207, 980]])
    (root / "not_a_wnid").mkdir()
    (root / "not_a_wnid" / "x.jpg").write_bytes(dh.jpeg(dh.digit_images(1)[0][2]))
    with pytest.raises(errors.ConfigError, match="not_a_wnid"):
        load_data(str(root), model=model, progress=False)


def test_streamed_memory_map_equals_resident_data(imageset):
    model = small_timm()
    d = load_data(imageset["folder"], model=model, progress=False)
    assert d.meta["cache"]["entry"]  # memory-mapped from the cache entry
    resident = d.__class__(d.name, d.x.clone(), d.y.clone(), d.num_classes, mean=d.mean, std=d.std)
    a = ws.Evaluator(model, resident, device="cpu", batch_size=4, keep_logits=True)()
    row = 3 * 64 * 64
    b = ws.Evaluator(model, d, device="cpu", batch_size=4, keep_logits=True, stream=True, chunk_bytes=2 * 4 * row)()
    assert torch.equal(a.logits[d.name], b.logits[d.name]) and a == b


def test_an_unreadable_image_is_named_and_skipped_on_request(tmp_path, cli):
    root = dh.write_folder(tmp_path / "set", per_class=2)
    bad = root / "digit3" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = small_timm()
    with pytest.raises(errors.ConfigError, match="broken.jpg") as e:
        load_data(str(root), model=model, progress=False)
    assert e.value.path == str(bad)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        d = load_data(str(root), model=model, skip_bad=True, progress=False)
    assert len(d) == 6 and d.meta["skipped"] == [str(bad)] and d.y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.warns(UserWarning, match="broken.jpg"):
        good = load_data(str(root), model=model, skip_bad=True, progress=False)  # a hit keeps the skip
    assert torch.equal(good.x, d.x)
    zoo = "weightspace.eval.zoo:small_cnn"
    from weightspace.eval.models import build_model
    ws.save(build_model(zoo, num_classes=3).state_dict(), tmp_path / "a.safetensors")  # 3 outputs: digit0/3/7
    r = cli("leaderboard", str(tmp_path / "a.safetensors"), "--model", zoo, "--data", str(root), "--device", "cpu", "--quiet")
    assert r.exit_code == 2 and "broken.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cifar_from_a_local_root_equals_the_same_images_as_pngs(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    # our test batches are not the real CIFAR files, whose md5 torchvision checks: accept them
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    root = dh.write_cifar(tmp_path / "cifar", tmp_path / "pngs")
    model = small_timm(num_classes=10)  # CIFAR-10's classes, one to one
    c = load_data(f"cifar10:test?root={root}", model=model, progress=False)
    f = load_data(str(tmp_path / "pngs"), model=model, progress=False, map_labels=False)  # its first 3 classes
    assert torch.equal(c.x, f.x) and torch.equal(c.y, f.y) and len(c) == 12
    assert c.meta["classes"][:3] == ["airplane", "automobile", "bird"]
    with pytest.raises(errors.ConfigError, match="root"):
        load_data("cifar10:test", model=model, progress=False)


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
sys.path.insert(0, sys.argv[2])
from test_data_sources import small_timm
from weightspace.eval.data import load_data
d = load_data(sys.argv[1], model=small_timm(), workers=0, progress=False)
with open(os.path.join(sys.argv[3], f"rank{dist.get_rank()}.json"), "w") as f:  # not stdout: ranks interleave there
    json.dump({"rank": dist.get_rank(), "cache": d.meta["cache"], "sum": int(d.x.sum())}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes, as torchrun starts them
def test_two_ranks_split_decoding_into_one_entry_identical_to_a_one_process_build(imageset, tmp_path, monkeypatch):
    import subprocess
    import sys
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTSPACE_DATA_CACHE": str(tmp_path / "ranks")}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           imageset["folder"], os.path.dirname(__file__), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["cache"]["hit"] is False for r in ranks)
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(tmp_path / "alone"))
    alone = load_data(imageset["folder"], model=small_timm(), workers=0, progress=False)
    name = alone.meta["cache"]["entry"]
    assert {r["cache"]["entry"] for r in ranks} == {name} and {r["sum"] for r in ranks} == {int(alone.x.sum())}
    shared, single = tmp_path / "ranks", tmp_path / "alone"
    assert sorted(p.name for p in shared.iterdir()) == [f"{name}.json", f"{name}.npy"]  # no temporary file left
    assert (shared / f"{name}.npy").read_bytes() == (single / f"{name}.npy").read_bytes()
    a, b = (json.loads((f / f"{name}.json").read_text()) for f in (shared, single))
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}


def test_shift_suites_get_a_column_each_and_avg_shifts_while_greedy_decides_on_val_only():
    from weightspace.search.soups import soup_leaderboard
    ingredients = [{"w": torch.tensor([float(v)])} for v in (1.0, 2.0, 4.0)]

    def metrics(w: float, val_only: bool = False) -> Metrics:
        # val prefers w near 1.5; both shift sets prefer large w (a greedy soup that peeked at them would keep 4)
        cells = {"val": 1 - abs(w - 1.5) / 4, "test": 0.5, "shiftA": w / 8, "shiftB": w / 10}
        out = Metrics({k: {"accuracy": a, "error": 1 - a, "loss": 1 - a, "n": 10} for k, a in cells.items()})
        return Metrics({"val": out["val"]}) if val_only else out

    lb, _, res = soup_leaderboard(ingredients, lambda sd: metrics(float(sd["w"])),
                                  val_evaluate=lambda sd: metrics(float(sd["w"]), True), progress=False)
    headers, rows = lb.table()
    assert [h for h in headers if not h.endswith("CI")] == ["method", "val", "test", "shiftA", "shiftB", "avg shifts"]
    assert headers[-1] == "avg shifts"  # a mean over sets has no binomial interval of its own
    for row in rows:
        a, b = row[headers.index("shiftA")], row[headers.index("shiftB")]
        assert row[-1] == pytest.approx((a + b) / 2)
    assert res.kept == [0, 1]  # w=1 and w=2 (val ties, input order; their soup w=1.5 is val's best); w=4 (best on
    # both shift sets) refused
    assert lb.to_dict()["columns"][-1] == "avg shifts" and {
        "avg shifts/accuracy", "avg shifts/error", "avg shifts/loss"} <= set(lb.long_table()[0])


@pytest.fixture
def hf_datasets_offline(tmp_path, monkeypatch):
    """An empty HF datasets cache, offline; `datasets` reads both settings once, at import, so they are patched too."""
    import datasets.config
    import huggingface_hub.constants as constants
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hfds_from_the_local_hf_datasets_cache_equals_the_folder(imageset, hf_datasets_offline):
    dh.write_hf_datasets_cache(dh.Path(imageset["folder"]), hf_datasets_offline, "wsorg/digits-jpeg", split="test")
    model = small_timm()
    folder = load_data(imageset["folder"], model=model, workers=0, progress=False)
    for spec in ("hfds/wsorg/digits-jpeg:test", "hfds/wsorg/digits-jpeg"):  # without a name, the test split
        d = load_data(spec, model=model, workers=2, progress=False)
        assert torch.equal(d.x, folder.x) and torch.equal(d.y, folder.y), spec
        assert d.meta["classes"] == ["digit0", "digit3", "digit7"]
    both = ws.Evaluator(model, [folder, d], device="cpu", batch_size=8)()
    assert both[folder.name] == both[d.name] and both[d.name]["n"] == 18
    with pytest.raises(errors.ConfigError, match=r"hfds/wsorg/digits-jpeg:train") as e:
        load_data("hfds/wsorg/digits-jpeg:train", model=model, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(errors.ConfigError, match=r"hfds/wsorg/no-such-set: not in the local HF datasets cache") as e:
        load_data("hfds/wsorg/no-such-set", model=model, progress=False)
    assert "\n" not in str(e.value)

"""torch.distributed on this CPU: 2 gloo processes launched by torchrun give exactly the single-process metrics and
files (greedy soup, barrier curve, leaderboard; --parallel data and points), only rank 0 of the CLI writes or
prints (while ws.save in the user's own group writes on every rank), and an error in one rank's share of a sweep
stops every rank with the same one-line error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import weightspace as ws
from evalhelpers import CNN, save_all, train_cnns

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: torchrun launches two processes

COMMON = ["--model", CNN, "--batch-size", "48", "--device", "cpu", "--json", "--quiet"]

# Runs under torchrun: joins the gloo group itself (so the CLI finds it and leaves it alone at exit), records every
# file-system write below the watched folder with an audit hook, and runs several CLI invocations in one launch
# (one interpreter start for all of them). Exit codes and writes go to a log folder outside the watched one.
WORKER = textwrap.dedent("""
    import json, os, sys
    watch, logdir, runs = os.path.realpath(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    writes = []

    def audit(event, args):
        if event == "open":
            paths = [args[0]] if isinstance(args[2], int) and args[2] & WRITE else []
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                       "os.link", "os.symlink", "shutil.copyfile", "shutil.move"):
            paths = list(args[:2])
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)).startswith(watch):
                writes.append([event, os.fsdecode(p)])

    sys.addaudithook(audit)
    import torch.distributed as dist
    dist.init_process_group("gloo")
    from weightspace_cli.main import main
    codes = []
    for args in runs:
        try:
            main(args, prog_name="weightspace", standalone_mode=False)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code)
    # After the CLI, the library in the user's own group: ws.save writes on every rank that calls it.
    import torch, weightspace as ws
    ws.save({"w": torch.full((2,), float(dist.get_rank()))}, os.path.join(logdir, f"own{os.environ['RANK']}.safetensors"))
    dist.destroy_process_group()
    with open(os.path.join(logdir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"codes": codes, "writes": writes}, f)
""")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ...` (standalone: a free port of its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTSPACE_HASH_CACHE": "off"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def json_docs(text: str) -> list:
    """The JSON documents printed one after another on a stdout."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while i < len(text.rstrip()):
        while text[i].isspace():
            i += 1
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    return docs


def same_files(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n not in skip:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[str]:
    """Three small CNNs fine-tuned on digits:train from one init, each with its own data order."""
    return save_all(train_cnns([1, 2, 3], shared_init=True, epochs=2), tmp_path_factory.mktemp("ckpts"), "cnn")


def soup_args(ckpts: list[str], out: Path) -> list[str]:
    return ["soup", "--greedy", *ckpts, "--val", "digits:val", "--test", "digits:test", *COMMON,
            "-o", str(out / "soup.safetensors"), "--out", str(out)]


def curve_args(ckpts: list[str], out: Path) -> list[str]:
    # BN recalibration at every α: each rank re-estimates on the full digits:train, so it must still match.
    return ["interpolate", ckpts[0], ckpts[1], "--data", "digits:val", "--data", "digits:test", "--steps", "5",
            "--recalibrate-bn", "digits:train", *COMMON, "--out", str(out)]


def test_two_gloo_ranks_match_one_process_exactly(ckpts, tmp_path, cli):
    ref, watch, logs = tmp_path / "ref", tmp_path / "dist", tmp_path / "logs"
    watch.mkdir()
    logs.mkdir()
    # The single-process reference, on one thread like each torchrun worker (OMP_NUM_THREADS=1): CPU kernels
    # may sum in another order with another thread count, which has nothing to do with distribution.
    ref_soup = cli(*soup_args(ckpts, ref / "soup"))
    ref_curve = cli(*curve_args(ckpts, ref / "curve"))
    assert ref_soup.exit_code == 0 and ref_curve.exit_code == 0, ref_soup.stderr + ref_curve.stderr
    ref_soup, ref_curve = json.loads(ref_soup.stdout), json.loads(ref_curve.stdout)

    bad = save_all([{"w": torch.zeros(3)}], tmp_path, "bad")[0]  # fits no CNN
    runs = [soup_args(ckpts, watch / "soup-data") + ["--parallel", "data"],
            soup_args(ckpts, watch / "soup-points") + ["--parallel", "points"],
            curve_args(ckpts, watch / "curve-data"),  # --parallel data is the default
            # index 1 belongs to rank 1: rank 0 must still stop with rank 1's error
            ["leaderboard", ckpts[0], bad, ckpts[2], "--data", "digits:val", *COMMON, "--parallel", "points"]]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch = torchrun(str(worker), str(watch), str(logs), json.dumps(runs), cwd=tmp_path)
    assert launch.returncode == 0, launch.stderr[-3000:]
    log = {r: json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert log[0]["codes"] == log[1]["codes"] == [0, 0, 0, 2]
    for r in (0, 1):  # the CLI's rank-0 rule ended with the CLI: the user's own ws.save wrote on both ranks
        assert ws.load(str(logs / f"own{r}.safetensors"))["w"].tolist() == [float(r)] * 2

    # Only rank 0 printed (three JSON documents; the failing run prints its error on stderr) ...
    soup_data, soup_points, curve_data = json_docs(launch.stdout)
    for got in (soup_data, soup_points):
        assert got["leaderboard"] == ref_soup["leaderboard"]
        assert got["greedy"] == ref_soup["greedy"]
    assert curve_data["curves"] == ref_curve["curves"]
    # ... and one error line per rank, rank 1's tagged, no traceback.
    err_lines = [ln for ln in launch.stderr.splitlines() if ln.startswith("weightspace: error")]
    assert sorted(ln.split(":")[1] for ln in err_lines) == [" error", " error (rank 1)"]
    assert all(f"{bad}: does not fit the model" in ln for ln in err_lines)
    assert "Traceback" not in launch.stderr

    # Only rank 0 touched the output folders; it wrote what the single process wrote, byte for byte.
    assert log[1]["writes"] == []
    # (files are named by linkat(2), which no audit event reports: rank 0's opens for writing below each folder
    # show that it wrote there, the comparisons below what it wrote)
    written = {Path(p).relative_to(watch.resolve()).parts[0] for ev, p in log[0]["writes"]
               if ev == "open" and Path(p).is_relative_to(watch.resolve())}
    assert {"soup-data", "soup-points", "curve-data"} <= written
    for mode in ("data", "points"):
        same_files(ref / "soup", watch / f"soup-{mode}", skip=("results.json",))  # it names its own -o path
        results = json.loads((watch / f"soup-{mode}" / "results.json").read_text())
        assert results["leaderboard"] == json.loads((ref / "soup" / "results.json").read_text())["leaderboard"]
    same_files(ref / "curve", watch / "curve-data")

    # The real entry point: torchrun -m weightspace_cli, the CLI creating and destroying the group itself.
    launch = torchrun("-m", "weightspace_cli", *curve_args(ckpts, tmp_path / "curve-points"), "--parallel", "points",
                      cwd=tmp_path)
    assert launch.returncode == 0, launch.stderr[-3000:]
    (curve_points,) = json_docs(launch.stdout)  # rank 1 printed nothing
    assert curve_points["curves"] == ref_curve["curves"]
    same_files(ref / "curve", tmp_path / "curve-points")

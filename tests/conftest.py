"""Shared fixtures: tiny MLPs really trained on sklearn digits, and a CLI runner with stderr kept apart."""
from __future__ import annotations

import pytest
import torch

from weightspace.ops.parallel import single_thread  # tiny nets train fastest on one thread, not fighting others for cores


def make_mlp() -> torch.nn.Module:
    """64 → 32 (BatchNorm, so it has an int64 num_batches_tracked buffer) → 10; keys like features.1.running_mean."""
    from collections import OrderedDict
    nn = torch.nn
    features = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(32, 10)))


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """The decoded-data cache in a temp folder for the whole run (never the user's ~/.cache); subprocesses inherit it."""
    import os
    folder = tmp_path_factory.mktemp("data-cache")
    before = os.environ.get("WEIGHTSPACE_DATA_CACHE")
    os.environ["WEIGHTSPACE_DATA_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("WEIGHTSPACE_DATA_CACHE", None)
    else:
        os.environ["WEIGHTSPACE_DATA_CACHE"] = before


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 real 8×8 digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@pytest.fixture(scope="session")
def trained_mlps(digits) -> list[dict[str, torch.Tensor]]:
    """Three fine-tunes of one shared init (a soup's ingredients), each trained ~60 steps with its own data order."""
    x, y = digits
    torch.manual_seed(0)
    init = make_mlp().state_dict()
    out = []
    with single_thread():
        for seed in range(3):
            torch.manual_seed(100 + seed)
            model = make_mlp()
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for _ in range(2):
                for idx in torch.randperm(len(x)).split(64):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.fixture
def cli():
    """Run the `weightspace` CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from weightspace_cli.main import main

    def run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (tiny models run faster than on two threads sharing a busy machine)."""
    with single_thread():
        yield


def run_small_recipe(recipe: str, out) -> dict:
    """`weightspace recipe run RECIPE --small --json` in-process; returns the printed JSON (asserts exit 0)."""
    import json

    from click.testing import CliRunner

    from weightspace_cli.main import main
    r = CliRunner().invoke(main, ["recipe", "run", recipe, "--out", str(out), "--small", "--quiet", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def t95(xs) -> tuple[float, float]:
    """The 95% Student-t interval of the mean of ``xs``, computed independently of weightspace.report.stats (scipy);
    with no spread the interval is the point itself, as the library's is."""
    import numpy as np
    from scipy import stats
    if np.ptp(xs) == 0:
        return float(xs[0]), float(xs[0])
    return stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))


def jack95(xs, units) -> tuple[float, float]:
    """Delete-one-unit jackknife 95% t-interval of the mean of ``xs`` (observation i depends on ``units[i]``),
    computed independently of weightspace.report.stats with numpy and scipy."""
    import numpy as np
    from scipy import stats
    xs = np.asarray(xs, dtype=float)
    every = sorted({u for us in units for u in us}, key=repr)
    loo = np.array([xs[[u not in us for us in units]].mean() for u in every])
    se = np.sqrt((len(every) - 1) / len(every) * ((loo - loo.mean()) ** 2).sum())
    h = stats.t.ppf(0.975, len(every) - 1) * se
    return float(xs.mean() - h), float(xs.mean() + h)


def verdict(lo: float, hi: float, threshold: float, direction: str) -> str:
    """A finding's verdict from its interval: reproduced only when the whole interval lies beyond the threshold."""
    if direction == "above":
        return "reproduced" if lo > threshold else ("not reproduced" if hi <= threshold else "inconclusive")
    return "reproduced" if hi < threshold else ("not reproduced" if lo >= threshold else "inconclusive")


def judge(xs, threshold: float, direction: str) -> str:
    """verdict() of the 95% t-interval of ``xs``."""
    return verdict(*t95(xs), threshold, direction)

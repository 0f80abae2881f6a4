"""One Result pattern: every result type offers table(), to_dict(), plot() and write(folder), and write() lays out
its folder through report.write_files (JSON, CSV, PNG; refuses to overwrite without force, writes nothing then)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from weightspace.analysis.basin import BasinResult
from weightspace.analysis.criticality import CriticalityResult, RewindResult
from weightspace.analysis.curve import Curve, CurveSet, interpolation_curve
from weightspace.analysis.head2toe import Head2ToeResult
from weightspace.analysis.probe import ProbeResult
from weightspace.analysis.saturation import SaturationFit, fit_saturation
from weightspace.analysis.similarity import SimilarityResult
from weightspace.errors import ConfigError, OutputExists
from weightspace.eval.evaluator import Metrics
from weightspace.search.greedy import GreedyResult, greedy_soup
from weightspace.search.soups import Leaderboard, leaderboard
from weightspace.search.learned import LearnedSoupResult

RESULTS = [Curve, CurveSet, Leaderboard, GreedyResult, LearnedSoupResult, RewindResult, CriticalityResult,
           SimilarityResult, ProbeResult, Head2ToeResult, SaturationFit, BasinResult]


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_every_result_type_has_the_four_methods(cls):
    for name in ("table", "to_dict", "plot", "write"):
        assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}()"


def _w(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v, -v])}


def _acc(weights) -> Metrics:  # a real function of the weights: accuracy falls as w leaves 1.5
    w = float(weights["w"][0])
    return Metrics({"val": {"accuracy": 1.0 - 0.1 * abs(w - 1.5), "loss": (w - 1.5) ** 2}})


def _read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_soup_curve_and_leaderboard_results_write_their_folders(tmp_path):
    soup, greedy = greedy_soup([_w(1.0), _w(2.0), _w(5.0)], _acc, progress=False)
    files = greedy.write(tmp_path / "greedy", extra={"command": "test"})
    assert [p.name for p in files.values()] == ["greedy.json", "greedy.csv", "greedy.png"]
    saved = json.loads(files["json"].read_text())
    assert saved["command"] == "test" and saved["kept"] == greedy.kept_sources
    assert _read_csv(files["csv"])[0] == greedy.table()[0] and len(_read_csv(files["csv"])) == 4
    assert files["png"].read_bytes()[:4] == b"\x89PNG"

    lb = leaderboard([_w(1.0), _w(5.0)], _acc, progress=False)
    files = lb.write(tmp_path / "lb", extra={"seed": 3})
    assert list(files) == ["results", "csv", "png"] and files["csv"].name == "leaderboard.csv"
    assert json.loads(files["results"].read_text()) == {"seed": 3, "leaderboard": json.loads(json.dumps(lb.to_dict()))}
    with pytest.raises(OutputExists):  # nothing is overwritten without force, and the folder is left as it was
        lb.write(tmp_path / "lb")
    assert lb.write(tmp_path / "lb", force=True).keys() == files.keys()

    curve = interpolation_curve(_w(1.0), _w(3.0), _acc, steps=3, progress=False)
    files = curve.write(tmp_path / "curve")
    assert [p.name for p in files.values()] == list(CurveSet.FILES)
    rows = _read_csv(files["csv"])
    assert len(rows) == 1 + 3 and rows[0] == curve.table()[0]
    assert json.loads(files["json"].read_text())["curves"][0]["alphas"] == [0.0, 0.5, 1.0]
    other = interpolation_curve(_w(1.0), _w(2.0), lambda w: {"val": {"accuracy": 0.5}}, steps=2, progress=False)
    with pytest.raises(ConfigError, match="different metrics"):  # checked before any file is written
        CurveSet([curve, other]).write(tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "curve.json").exists()


def test_saturation_and_learned_results_write_their_folders(tmp_path):
    up = [0.5, 0.6, 0.7, 0.8, 0.9]
    fit = fit_saturation(up, [1 - 0.5 * (1 - u) ** 0.8 - 0.1 for u in up], points="all")
    files = fit.write(tmp_path / "sat")
    assert json.loads(files["results"].read_text())["k"] == pytest.approx(fit.k)
    learned = LearnedSoupResult(["a", "b"], [0.25, 0.75], None, history=[{"step": 0, "loss": 2.0},
                                                                         {"step": 1, "loss": 1.0}])
    files = learned.write(tmp_path / "learned")
    assert _read_csv(files["csv"]) == [["source", "coefficient"], ["a", "0.25"], ["b", "0.75"]]
    assert files["png"].read_bytes()[:4] == b"\x89PNG"

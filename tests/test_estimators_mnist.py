"""benchmarks/estimators_mnist.py --quick end to end on the bundled MNIST sample, in seconds: one
run interrupted, continued and finished across invocations, the results' shape, and a unit's
values reproduced from its seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("estimators_mnist", ROOT / "benchmarks" / "estimators_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("estimators_mnist")

    def invoke(*extra: str) -> int:
        return bench.main(["--quick", "--dataset", "default", "--state", str(tmp / "state"),
                           "--out", str(tmp / "out"), "--snippet", str(tmp / "snippet.md"), *extra])

    invoke.tmp = tmp
    return invoke


def _units(tmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((tmp / "state" / "units").glob("*.json"))}


def _report(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "estimators_mnist_quick.json").read_text())


def test_interrupted_continued_and_finished(run, monkeypatch):
    tmp = run.tmp
    real, calls = bench.run_unit, []

    def interrupted_third(*a, **k):  # Ctrl-C / SIGTERM during the third unit
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "run_unit", interrupted_third)
    assert run() == 130
    monkeypatch.setattr(bench, "run_unit", real)
    first = _units(tmp)
    assert len(first) == 2  # the unit in progress is lost, the finished ones kept
    r = _report(tmp)
    assert not r["complete"] and "IS K=1000: 20 of 20 test digits (complete)" in r["status"]

    assert run("--max-units", "3") == 0
    second = _units(tmp)
    assert len(second) == 5 and all(second[k] == v for k, v in first.items())
    assert not _report(tmp)["complete"]

    assert run() == 0  # finishes
    third = _units(tmp)
    assert len(third) == 12 and all(third[k] == v for k, v in second.items())
    assert run() == 0  # nothing left: rewrites the results only
    assert _units(tmp) == third

    r = _report(tmp)
    assert r["complete"] and all(s.endswith("(complete)") for s in r["status"])
    assert r["model"]["trained_here"] and r["plan"]["quick"]
    assert [i["K"] for i in r["importance"]] == [1000, 5000]
    assert set(r["importance"][1]["curve_L_K"]) == {"1", "10", "100", "200", "500", "1000", "2000", "5000"}
    assert [a["T"] for a in r["ais"]] == [10, 20] and [b["T"] for b in r["bdmc"]] == [10, 20]
    for a in r["ais"]:
        assert a["digits_done"] == 20 and a["gradient_evaluations_per_digit"] == 2 * a["T"] * 11
        assert set(a["vs_importance"]) == {"K=1000", "K=5000"}
        v = a["vs_importance"]["K=5000"]
        assert v["difference"] == pytest.approx(v["ais_mean"] - v["is_mean"])
        assert {"K", "how", "cpu_ratio_ais_to_is", "evaluation_ratio_ais_to_is"} <= set(a["equal_accuracy"])
        assert 0 < a["mean_acceptance"] <= 1 and a["cpu_seconds"] > 0
    for b in r["bdmc"]:
        assert b["digits_done"] == 4
        assert b["width"]["mean"] == pytest.approx(b["upper"]["mean"] - b["lower"]["mean"])
        assert set(b["importance"]) == {"K=1000", "K=5000"}
    md = (tmp / "out" / "estimators_mnist_quick.md").read_text()
    assert "## BDMC on digits simulated from the model" in md and "**Complete.**" in md
    assert (tmp / "state" / "estimators_mnist_quick.json").read_text() == json.dumps(r, indent=2)
    snippet = (tmp / "snippet.md").read_text()
    assert "| AIS, T=20 | 20 |" in snippet and "**When to use which.**" in snippet


def test_unit_reproduced_from_its_seed(run):
    """A unit's values depend on its name and the seed only, not on the invocation."""
    from pyrovae import load_model

    state = run.tmp / "state"
    plan = json.loads((state / "plan.json").read_text())
    x = bench.load_test(plan, None)
    vae = load_model(state / "model")
    unit = next(u for u in bench.make_units(plan, [10, 20]) if u.name == "ais-T20-b001")
    again = bench.run_unit(unit, vae, x, plan)
    saved = json.loads((state / "units" / "ais-T20-b001.json").read_text())
    torch.testing.assert_close(torch.tensor(again["values"]), torch.tensor(saved["values"]))


def test_plan_clash_refused(run, capsys):
    assert run("--chains", "3") == 2
    assert "--chains 3 (the plan has 2)" in capsys.readouterr().err


def test_one_invocation_at_a_time(run, capsys):
    held = bench.hold_lock(run.tmp / "state")
    try:
        assert run() == 2
        assert "another invocation is running" in capsys.readouterr().err
        assert run("--report") == 0  # rewriting the results needs no lock
    finally:
        held.close()

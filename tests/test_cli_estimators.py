"""`pyrovae train`'s AIS check, `pyrovae evaluate --estimator is|ais` with its file formats, and
`pyrovae bdmc`, on one tiny run, checked against the library called directly."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import assert_close, needs_cxx
from pyrovae import ais, bdmc, load_model, log_likelihood
from pyrovae.cli import main
from pyrovae.workflow import _fixed_test_set
from pyrovae.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--num-train", "600",
        "--eval-points", "12", "--num-samples", "20", "--no-progress"]
CHECK = ["--check-points", "6", "--ais-steps", "10", "--ais-chains", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("est") / "run"
    assert main(["train", *TINY, *CHECK, "--out", str(out)]) == 0
    return out


def _test_points(n: int):
    test = load_dataset("default", "test", binarize="dynamic")
    return _fixed_test_set(test, n, 0)


def test_train_reports_ais_beside_is_on_the_same_points(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    check = metrics["ais_check"]
    assert check["num_datapoints"] == 6 and check["num_intermediate"] == 10
    # the same numbers as the library's: IS on the 12 test points, AIS on the first 6
    vae = load_model(run)
    test = _test_points(12)
    ll = log_likelihood(vae, test, num_samples=20, seed=0)
    assert_close(check["is_mean_same_points"], float(ll.values[:6].mean()), rtol=1e-6)
    a = ais(vae, test.subset(6), num_intermediate=10, num_chains=2, leapfrog_steps=10, seed=0)
    assert_close(check["ais"]["mean"], a.mean, rtol=1e-6)
    assert_close(check["ais_minus_is"]["mean"], float((a.values - ll.values[:6]).mean()),
                 rtol=1e-5, atol=1e-6)
    assert any(w in check["verdict"] for w in ("agree within", "below AIS", "below IS"))


def test_evaluate_with_ais_and_never_overwrites(run, capsys):
    args = ["evaluate", str(run), "--estimator", "ais", "--eval-points", "4", "--ais-steps", "8",
            "--ais-chains", "2", "--no-progress", "--per-datapoint"]
    assert main(args) == 0
    assert main(args) == 0  # a second evaluation goes to a new file
    first = json.loads((run / "evaluation-test-ais-T8.json").read_text())
    second = json.loads((run / "evaluation-test-ais-T8-2.json").read_text())
    assert first["estimator"] == "ais" and first["eval_points"] == 4
    values = first["test_log_likelihood"]["per_datapoint"]["values"]
    a = ais(load_model(run), _test_points(4), num_intermediate=8, num_chains=2,
            leapfrog_steps=10, seed=0)
    assert_close(values, a.values, rtol=1e-6)
    assert second["test_log_likelihood"]["mean"] == first["test_log_likelihood"]["mean"]


def test_evaluate_writes_per_datapoint_csv(run):
    assert main(["evaluate", str(run), "--eval-points", "5", "--num-samples", "30",
                 "--check-points", "0", "--format", "csv", "--per-datapoint",
                 "--no-progress"]) == 0
    with (run / "evaluation-test-is-K30.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"index", "values", "khat", "ess"} <= set(rows[0])
    ll = log_likelihood(load_model(run), _test_points(5), num_samples=30, seed=0)
    assert_close([float(r["values"]) for r in rows], ll.values, rtol=1e-6)


@needs_cxx
def test_evaluate_compile_gives_the_library_values(run):
    """``--compile``: the same per-datapoint log p(x) as the eager library call, same seed."""
    assert main(["evaluate", str(run), "--eval-points", "5", "--num-samples", "30",
                 "--check-points", "0", "--per-datapoint", "--no-progress", "--compile"]) == 0
    values = json.loads((run / "evaluation-test-is-K30.json").read_text())
    values = values["test_log_likelihood"]["per_datapoint"]["values"]
    ll = log_likelihood(load_model(run), _test_points(5), num_samples=30, seed=0)
    assert_close(values, ll.values, rtol=1e-5, atol=1e-5)


def test_bdmc_command_brackets_is(run, capsys):
    assert main(["bdmc", str(run), "--points", "4", "--ais-steps", "20", "--ais-chains", "2",
                 "--is-samples", "50", "--no-progress"]) == 0
    report = json.loads((run / "bdmc-T20-n4.json").read_text())
    lower, upper = report["lower"]["mean"], report["upper"]["mean"]
    assert math.isfinite(lower) and math.isfinite(upper)
    # the library's sandwich with the same seed and settings
    b = bdmc(load_model(run), 4, num_intermediate=20, num_chains=2, leapfrog_steps=10,
             is_samples=(50,), seed=0)
    assert_close([lower, upper], [b.lower.mean, b.upper.mean], rtol=1e-6)
    assert "BDMC" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "RUN", "--estimator", "ais", "--ais-steps", "0"], "--ais-steps must be"),
    (["evaluate", "RUN", "--check-points", "-1"], "--check-points must be"),
    (["bdmc", "RUN", "--points", "0"], "--points must be"),
    (["evaluate", "RUN", "--estimator", "ais", "--compile"], "--compile compiles"),
    (["train", "--loss", "meanfield", "--gradient", "dreg"], "--gradient dreg does not apply"),
])
def test_bad_estimator_options_are_one_line(run, argv, message, capsys):
    argv = [str(run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_sample_writes_a_seeded_grid_and_never_overwrites(run):
    from PIL import Image

    assert main(["sample", str(run), "-n", "16", "--seed", "3", "--scale", "2"]) == 0
    assert main(["sample", str(run), "-n", "16", "--seed", "3", "--scale", "2"]) == 0
    first, second = run / "samples-seed3.png", run / "samples-seed3-2.png"
    a, b = Image.open(first), Image.open(second)
    # 8 x 2 digits of 28 pixels with 2-pixel padding, each pixel drawn 2 x 2
    assert a.size == (2 * (8 * 30 + 2), 2 * (2 * 30 + 2))
    assert list(a.getdata()) == list(b.getdata())  # the same seed draws the same images
    assert main(["sample", str(run), "-n", "16", "--seed", "4", "--scale", "2", "--out",
                 str(run / "other.png")]) == 0
    assert list(Image.open(run / "other.png").getdata()) != list(a.getdata())

"""`pyrovae gaps RUN [RUN ...]`: in-process on tiny runs trained on the bundled default data.

The command must measure exactly what :func:`pyrovae.gaps` measures on the run's model and its
test split (first N points, binarized once with the seed), and write gaps.json and gaps.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pyrovae import diagnose, gaps, load_model
from pyrovae.cli import main
from pyrovae.workflow import _fixed_test_set
from pyrovae.data import load_dataset

TRAIN = ["--check-points", "0", "--hidden-dims", "16", "--latent-dim", "2", "--epochs", "1", "--eval-points", "10",
         "--num-samples", "10", "--no-progress"]
GAPS = ["--eval-points", "12", "--num-samples", "40", "--num-elbo-samples", "20",
        "--num-steps", "30", "--seed", "3", "--ais-steps", "100", "--ais-chains", "4",
        "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gap_runs")
    folders = []
    for family in ("diagonal", "full_rank"):
        out = root / family
        assert main(["train", *TRAIN, "--family", family, "--out", str(out)]) == 0
        folders.append(out)
    return folders


def test_gaps_command_matches_the_library(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["gaps", *map(str, runs), *GAPS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "gaps.json").read_text())
    assert list(report["runs"]) == ["diagonal", "full_rank"]  # labelled by run folder name
    assert (out / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "approx. gap" in printed and "active units" in printed and "full_rank" in printed

    # The same numbers from the library on the same model and the same 12 test digits.
    run = runs[0]
    vae = load_model(run)
    test = _fixed_test_set(load_dataset("default", "test"), 12, 3)
    expected = gaps(vae, test, num_samples=40, num_elbo_samples=20, num_steps=30, seed=3,
                    ais_options=dict(num_intermediate=100, num_chains=4))
    got = report["runs"]["diagonal"]["gaps"]
    assert got["num_datapoints"] == 12
    for key, (mean, stderr) in expected.summary().items():
        assert math.isclose(got[key]["mean"], mean, rel_tol=1e-9, abs_tol=1e-9), key
        assert math.isclose(got[key]["stderr"], stderr, rel_tol=1e-9, abs_tol=1e-9), key
    # the decomposition adds up and q* is never worse than the encoder
    assert math.isclose(
        got["approximation_gap"]["mean"] + got["amortization_gap"]["mean"],
        got["log_px"]["mean"] - got["elbo_amortized"]["mean"], rel_tol=1e-5,  # float32 sums
    )
    diag = diagnose(vae, test, seed=3).to_dict()
    written = report["runs"]["diagonal"]["diagnostics"]
    assert written["active_units"] == diag["active_units"]
    assert math.isclose(written["kl"]["total"], diag["kl"]["total"], rel_tol=1e-9)
    agg, agg_expected = written["aggregate_posterior"], diag["aggregate_posterior"]
    assert math.isclose(agg["mutual_information"]["mean"],
                        agg_expected["mutual_information"]["mean"], rel_tol=1e-9, abs_tol=1e-12)
    assert report["settings"]["num_samples"] == 40


def test_gaps_command_one_run_writes_into_it_and_rejects_bad_folders(runs, tmp_path, capsys):
    assert main(["gaps", str(runs[0]), *GAPS, "--eval-points", "5"]) == 0
    assert json.loads((runs[0] / "gaps.json").read_text())["runs"]["diagonal"]["gaps"][
        "num_datapoints"] == 5
    capsys.readouterr()
    assert main(["gaps", str(runs[0]), str(tmp_path / "nowhere"), *GAPS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere is not a folder" in err[0]
    assert main(["gaps", str(runs[0]), *GAPS, "--num-samples", "0"]) == 2
    assert "num_samples must be a positive integer" in capsys.readouterr().err
    assert main(["gaps", str(runs[0]), *GAPS, "--mi-batch-size", "1"]) == 2
    assert "batch_size must be >= 2" in capsys.readouterr().err
    # a minibatch estimate of the aggregate posterior (M = 4 of 12 points)
    assert main(["gaps", str(runs[0]), *GAPS, "--mi-batch-size", "4"]) == 0
    report = json.loads((runs[0] / "gaps.json").read_text())
    assert report["runs"]["diagonal"]["diagnostics"]["aggregate_posterior"]["batch_size"] == 4

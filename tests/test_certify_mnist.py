"""benchmarks/certify_mnist.py at smoke size: AIS beside IS on the same fixed random test digits,
for each complete row of a results file, checked against the library called directly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_certify_smoke(tmp_path):
    import certify_mnist

    from pyrovae import load_model, log_likelihood
    from pyrovae.ais import ais
    from pyrovae.cli import main as cli

    run = tmp_path / "run"
    assert cli(["train", "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2",
                "--num-train", "200", "--eval-points", "2", "--num-samples", "5",
                "--check-points", "0", "--no-progress", "--out", str(run)]) == 0
    state = tmp_path / "state"
    state.mkdir()
    shutil.copyfile(run / "checkpoint.pt", state / "vae-dynamic-k1.pt")
    results = tmp_path / "mnist_nll.json"
    results.write_text(json.dumps([{"setting": "vae-dynamic-k1", "complete": True},
                                   {"setting": "iwae-dynamic-k5", "complete": False}]))
    out = tmp_path / "certified.json"
    args = ["--results", str(results), "--state-dir", str(state), "--out", str(out),
            "--dataset", "default", "--points", "6", "--num-samples", "20", "--ais-steps", "8",
            "--ais-chains", "2"]
    assert certify_mnist.main(args) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]  # the complete row only
    assert row["setting"] == "vae-dynamic-k1" and row["points"] == 6
    # the same digits and numbers as the library's
    parsed = certify_mnist.parse_args(args)
    digits = certify_mnist.test_subset(parsed, "vae-dynamic-k1")
    assert len(digits) == 6
    vae = load_model(state / "vae-dynamic-k1.pt")
    ll = log_likelihood(vae, digits, num_samples=20, seed=1)
    a = ais(vae, digits, num_intermediate=8, num_chains=2, leapfrog_steps=10, seed=1)
    assert_close(row["is"]["nll"], -ll.mean, rtol=1e-6)
    assert_close(row["ais"]["nll"], -a.mean, rtol=1e-6)
    assert_close(row["ais_minus_is"]["mean"], float((a.values - ll.values).mean()),
                 rtol=1e-5, atol=1e-6)
    assert row["ais"]["converged"] == a.converged and row["ais"]["T"] == 8
    table = out.with_suffix(".md").read_text()
    assert "| vae-dynamic-k1 |" in table and "AIS - IS" in table
    # a different subset seed draws different digits
    other = certify_mnist.test_subset(certify_mnist.parse_args(args + ["--subset-seed", "5"]),
                                      "vae-dynamic-k1")
    assert not bool((other[:][0] == digits[:][0]).all())

"""The estimator-speed benchmark's code paths at tiny sizes (the committed results come from full
runs): it times what it says, and its K = 5000 run is the library's estimate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import pyrovae

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import HAS_CXX  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ratio_rows_and_the_full_run(tmp_path):
    import log_likelihood_speed as bench

    compile_ = ["--compile"] if HAS_CXX else []
    out = tmp_path / "speed.json"
    result = bench.main(["--points", "3", "--num-samples", "30", "--rounds", "1", "--out", str(out),
                         *compile_])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    assert row["num_samples"] == 30 and row["points"] == 3
    ratios = ["ratio_no_diagnostics", "ratio_default"]
    ratios += ["ratio_compiled_no_diagnostics", "ratio_compiled_default"] if compile_ else []
    for key in ratios:
        assert math.isfinite(row[key]) and row[key] > 0, row
    assert row["ratio_default"] == pytest.approx(
        row["seconds"]["bare"] / row["seconds"]["pyrovae (default)"])

    full = bench.main(["--full-only", "--full-points", "2", "--no-diagnostics", *compile_])
    assert full["points"] == 2 and full["compiled"] is bool(compile_) and not full["diagnostics"]
    # the library's estimate, called directly (eager) on the same model and digits
    torch.manual_seed(0)
    vae = bench.build().eval()
    x, _ = bench.test_digits()
    expected = pyrovae.log_likelihood(vae, x[:2], 5000, seed=0, diagnostics=False)
    assert full["mean"] == pytest.approx(expected.mean, rel=1e-6)


def test_the_full_run_with_a_reference_beside_it():
    """``--reference-every``: the run in seeded segments, the bare estimator timed after each on
    every N-th digit; the estimate is the library's, segment by segment, and the projection is
    the reference's seconds scaled to all the digits."""
    import log_likelihood_speed as bench

    full = bench.main(["--full-only", "--full-points", "4", "--no-diagnostics",
                       "--reference-every", "2", "--segments", "2"])
    assert [sg["digits"] for sg in full["segments"]] == [2, 2]
    assert [sg["reference_digits"] for sg in full["segments"]] == [1, 1]
    assert full["seconds"] == pytest.approx(sum(sg["seconds"] for sg in full["segments"]))
    assert full["reference_projected_seconds"] == pytest.approx(2 * full["reference_seconds"])
    assert full["reference_ratio"] == pytest.approx(
        full["reference_projected_seconds"] / full["seconds"])
    torch.manual_seed(0)
    vae = bench.build().eval()
    x, _ = bench.test_digits()
    parts = [pyrovae.log_likelihood(vae, x[2 * s : 2 * s + 2], 5000, seed=s, diagnostics=False)
             for s in range(2)]
    expected = torch.cat([p.values for p in parts]).mean()
    assert full["mean"] == pytest.approx(float(expected), rel=1e-6)

"""The GPU timing benchmark's code paths, run on the CPU (CI has no GPU; a session that is lent
one runs ``benchmarks/gpu_timing.py --device cuda``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import HAS_CXX  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gpu_timing_runs_and_writes_its_result(device, tmp_path):
    """The quick run, with the compiled rows where torch.compile can run (a C++ compiler on a
    CPU; the GPU timing itself is run with --compile)."""
    import gpu_timing

    out = tmp_path / "gpu_timing.json"
    compile_ = device == "cuda" or HAS_CXX
    result = gpu_timing.main(["--device", device, "--quick", "--out", str(out)]
                             + (["--compile"] if compile_ else []))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] == device and result["quick"] is True
    assert result["compile"] is compile_
    (row,) = result["training"]
    keys = ["raw_fused_adam_steps_per_s", "fit_steps_per_s", "ratio"]
    keys += ["fit_compiled_steps_per_s", "ratio_compiled"] if compile_ else []
    for key in keys:
        assert math.isfinite(row[key]) and row[key] > 0, row
    est = result["estimation"]
    assert est["num_samples"] == 50 and est["points"] == 2
    assert est["extrapolated_seconds_10000_digits"] == pytest.approx(est["pyrovae_seconds"] * 5000)
    if compile_:
        assert est["extrapolated_seconds_10000_digits_compiled"] == pytest.approx(
            est["pyrovae_compiled_seconds"] * 5000)
        assert est["ratio_compiled"] == pytest.approx(est["bare_seconds"] / est["pyrovae_compiled_seconds"])


def test_gpu_timing_refuses_cuda_without_a_gpu(monkeypatch):
    import gpu_timing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_timing.main(["--device", "cuda", "--quick"])

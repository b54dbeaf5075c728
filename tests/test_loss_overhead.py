"""The fixed-cost benchmark's code paths at tiny sizes: it reports what it measured."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_overhead_reports_its_medians_and_the_gap(tmp_path):
    import loss_overhead

    out = tmp_path / "overhead.json"
    result = loss_overhead.main(["--calls", "20", "--rounds", "1", "--step-blocks", "1",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    med = result["microseconds_median"]
    assert set(med) == {"pyrovae (fastpath.elbo_loss)", "hand-written"}
    for times in med.values():  # (their order is the machine's: no timing is compared here)
        assert set(times) == {"forward", "forward+backward"}
        assert all(math.isfinite(t) and t > 0 for t in times.values())
    gap = med["pyrovae (fastpath.elbo_loss)"]["forward+backward"] - med["hand-written"]["forward+backward"]
    assert result["fixed_cost_gap_us"] == pytest.approx(gap)
    assert result["gap_share_of_full_size_step"] == pytest.approx(
        gap / result["full_size_hand_written_step_us"])
    assert math.isfinite(result["full_size_hand_written_step_us"])

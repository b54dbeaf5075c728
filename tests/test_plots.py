"""The pictures of :mod:`pyrovae.plots` (and :func:`pyrovae.plot_gaps`) draw what they are given:
one point per datapoint, one bar per dimension, one line point per K, the right error bars."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.collections import PathCollection

from pyrovae.diagnostics import ActiveUnits, KLPerDimension
from pyrovae.errors import ConfigError, DataError
from pyrovae.gaps import GapResult
from pyrovae.plots import plot_gaps
from pyrovae.importance import IWAEBounds, LogLikelihood
from pyrovae.plots import (
    latent_manifold,
    plot_iwae_bounds,
    plot_khat,
    plot_kl_per_dimension,
    plot_latent_scatter,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _png(path) -> int:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return len(data)


def _points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))


def test_latent_scatter_one_colour_per_label(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(120, 3, generator=g)
    labels = torch.arange(120) % 4
    fig = plot_latent_scatter(z, labels, dims=(0, 2), path=tmp_path / "codes.png")
    ax = fig.axes[0]
    groups = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(groups) == 4 and _points(ax) == 120
    # each class's points are exactly its codes (dims 0 and 2)
    first = torch.as_tensor(groups[0].get_offsets().data)
    torch.testing.assert_close(first, z[labels == 0][:, [0, 2]].double())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "z1" and ax.get_ylabel() == "z3"
    assert 10_000 < _png(tmp_path / "codes.png") < 300_000
    assert _points(plot_latent_scatter(z[:, :2]).axes[0]) == 120  # no labels: one colour
    with pytest.raises(DataError, match="labels must have shape"):
        plot_latent_scatter(z, labels[:10])
    with pytest.raises(DataError, match="latent_dim >= 2"):
        plot_latent_scatter(z[:, :1])
    with pytest.raises(ConfigError, match="dims"):
        plot_latent_scatter(z, dims=(1, 1))


def test_khat_marks_the_unreliable_datapoints(tmp_path):
    khat = torch.tensor([0.1, 0.5, 0.8, 1.2, float("-inf"), float("nan"), 0.69])
    ll = LogLikelihood(torch.zeros(7), 0.0, 0.0, 100, khat=khat, ess=torch.ones(7))
    fig = plot_khat(ll, path=tmp_path / "khat.png")
    ax = fig.axes[0]
    good, bad, exact = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(good.get_offsets()) == 3 and len(bad.get_offsets()) == 2
    assert len(exact.get_offsets()) == 1  # -inf: equal weights; nan is left out
    assert sorted(float(y) for _, y in bad.get_offsets()) == pytest.approx([0.8, 1.2])
    assert any(abs(line.get_ydata()[0] - 0.7) < 1e-12 for line in ax.get_lines())  # threshold
    assert "33.3% above 0.7" in ax.get_title()  # 2 of the 6 datapoints with a k-hat
    assert _png(tmp_path / "khat.png") > 5_000
    with pytest.raises(DataError, match="num_samples >= 25"):
        plot_khat(torch.full((3,), float("nan")))
    with pytest.raises(ConfigError, match="no k-hat"):
        plot_khat(LogLikelihood(torch.zeros(2), 0.0, 0.0, 10))


def test_iwae_bounds_one_point_per_k_with_standard_errors(tmp_path):
    ks = (1, 10, 100)
    values = torch.tensor([[-5.0, -7.0], [-4.5, -6.5], [-4.2, -6.2]], dtype=torch.float64)
    def bounds(v: torch.Tensor) -> IWAEBounds:
        means, stderrs = v.mean(1), v.std(1) / math.sqrt(2)
        return IWAEBounds(v, float(means[-1]), float(stderrs[-1]), num_samples=ks, means=means,
                          stderrs=stderrs)

    a, b = bounds(values), bounds(values + 0.1)
    fig = plot_iwae_bounds([a, b], labels=["a", "b"], reference=-5.0, path=tmp_path / "iwae.png")
    ax = fig.axes[0]
    lines = [c.lines[0] for c in ax.containers]  # the data line of each errorbar
    assert len(lines) == 2
    assert list(lines[0].get_xdata()) == [1, 10, 100]
    assert [float(v) for v in lines[0].get_ydata()] == pytest.approx(a.means.tolist())
    assert ax.get_xscale() == "log"
    # the error bar of K=1 spans the mean ± its standard error
    segments = ax.containers[0].lines[2][0].get_segments()
    low, high = segments[0][:, 1]
    assert high - low == pytest.approx(2 * float(a.stderrs[0]))
    assert any(line.get_ydata()[0] == -5.0 for line in ax.get_lines() if line.get_linestyle() == "--")
    assert _png(tmp_path / "iwae.png") > 5_000
    with pytest.raises(ConfigError, match="labels"):
        plot_iwae_bounds([a, b], labels=["a"])
    with pytest.raises(ConfigError, match="IWAEBounds"):
        plot_iwae_bounds([1, 2])


def test_kl_per_dimension_one_bar_per_dimension(tmp_path):
    per_dim = torch.tensor([2.0, 0.001, 5.0, 0.0, 1.0])
    kl = KLPerDimension(float(per_dim.sum()), 0.1, per_dim, torch.ones(10), True, 1)
    active = ActiveUnits(3, torch.tensor([0.5, 0.0, 0.9, 0.0, 0.2]), 0.01, 10, True)
    fig = plot_kl_per_dimension(kl, active=active, sort=True, path=tmp_path / "kl.png")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([5.0, 2.0, 1.0, 0.001, 0.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "1", "5", "2", "4"]
    grey = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((0.498, 0.498, 0.498), abs=0.01)]
    assert len(grey) == 2  # the two inactive dimensions
    assert "3 of 5 active" in ax.get_title()
    assert _png(tmp_path / "kl.png") > 5_000
    unsorted = plot_kl_per_dimension(per_dim).axes[0]
    assert [p.get_height() for p in unsorted.patches] == pytest.approx(per_dim.tolist())
    with pytest.raises(ConfigError, match="per-dimension"):
        plot_kl_per_dimension(KLPerDimension(1.0, 0.1, None, torch.ones(3), False, 10))
    with pytest.raises(DataError, match="dimensions"):
        plot_kl_per_dimension(per_dim, active=torch.ones(3, dtype=torch.bool))


class _RecordingVAE(torch.nn.Module):
    """Decodes z to a constant image and records the z's it was asked for."""

    latent_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def likelihood(self, z: torch.Tensor):
        self.seen.append(z)
        return torch.distributions.Bernoulli(probs=torch.full((len(z), 4), 0.5)).expand((len(z), 4))


def test_latent_manifold_decodes_an_inverse_cdf_grid():
    vae = _RecordingVAE()
    grid = latent_manifold(vae, (2, 2), steps=4)
    assert grid.shape[-2:] == (4 * 4 + 2, 4 * 4 + 2)
    z = vae.seen[0]
    u = torch.tensor([0.125, 0.375, 0.625, 0.875])
    expected = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # rows run along z1 left to right; columns run along z2 from top (large) to bottom
    torch.testing.assert_close(z[:4, 0], expected)
    torch.testing.assert_close(z[::4, 1], expected.flip(0))
    # the grid cells hold equal prior mass: Phi(z) is evenly spaced
    torch.testing.assert_close(torch.distributions.Normal(0.0, 1.0).cdf(z[:4, 0]), u)


def _gap_result(n: int = 40, seed: int = 0) -> GapResult:
    g = torch.Generator().manual_seed(seed)
    log_px = -90 + 25 * torch.randn(n, generator=g, dtype=torch.float64)  # datapoints differ a lot
    approx = 1.0 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    amort = 2.0 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    return GapResult.build(log_px, log_px - approx, log_px - approx - amort, torch.zeros(n),
                           torch.zeros(n, dtype=torch.long))


def test_plot_gaps_bounds_carry_paired_standard_errors(tmp_path):
    result = _gap_result()
    s = result.summary()
    fig = plot_gaps(result, tmp_path / "gaps.png")
    bounds, gaps_ax = fig.axes
    half = [float(seg[1, 1] - seg[0, 1]) / 2 for seg in bounds.containers[0].lines[2][0].get_segments()]
    # log p(x) has no bar; L[q*] and L[q] carry the paired SE of their gap to log p(x), far
    # smaller than the SE of a bound over these very different datapoints (~4 nats)
    assert half == pytest.approx([0.0, s["approximation_gap"][1], s["inference_gap"][1]])
    assert max(half) < 0.1 < 3 < s["log_px"][1]
    # the zoomed axis shows the bounds' differences (~3 nats) on a range of a few nats
    low, high = bounds.get_ylim()
    assert high - low < 15
    assert f"{s['log_px'][1]:.2f}" in bounds.get_xlabel()
    gap_half = [float(seg[1, 1] - seg[0, 1]) / 2 for seg in gaps_ax.containers[0].lines[2][0].get_segments()]
    assert gap_half == pytest.approx([s["approximation_gap"][1], s["amortization_gap"][1]])
    assert _png(tmp_path / "gaps.png") > 5_000


def test_torchvision_is_imported_only_to_draw_an_image_grid(tmp_path):
    """`pyrovae train` imports pyrovae.plots before training; torchvision must not come with it
    (it would sit in the process's memory through training), only with the first image grid."""
    code = (
        "import sys, torch, pyrovae, pyrovae.cli, pyrovae.plots as plots\n"
        "assert 'torchvision' not in sys.modules, 'imported with pyrovae.plots'\n"
        "grid = plots.image_grid(torch.rand(4, 6), (2, 3), nrow=2, path=sys.argv[1])\n"
        "assert 'torchvision' in sys.modules and grid.shape[0] == 3\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "grid.png")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _png(tmp_path / "grid.png")


def test_plot_gaps_labels_sit_beyond_the_error_caps(tmp_path):
    """Each value label is anchored at the bar's end plus its error bar (minus, for a negative
    bar) and offset away from the bar, so the label never overlaps the error bar."""
    result = _gap_result()
    fig = plot_gaps(result)
    s = result.summary()
    expected = {  # value -> (anchor, direction)
        round(s["log_px"][0], 2): (s["log_px"][0], -1),
        round(s["elbo_optimal"][0], 2): (s["elbo_optimal"][0] - s["approximation_gap"][1], -1),
        round(s["elbo_amortized"][0], 2): (s["elbo_amortized"][0] - s["inference_gap"][1], -1),
        round(s["approximation_gap"][0], 2): (s["approximation_gap"][0] + s["approximation_gap"][1], 1),
        round(s["amortization_gap"][0], 2): (s["amortization_gap"][0] + s["amortization_gap"][1], 1),
    }
    labels = [t for ax in fig.axes for t in ax.texts]
    assert len(labels) == 5
    for t in labels:
        anchor, direction = expected[float(t.get_text())]
        assert t.xy[1] == pytest.approx(anchor)
        assert t.xyann[1] * direction > 0  # offset away from the bar, past the cap
        assert t.get_va() == ("bottom" if direction > 0 else "top")

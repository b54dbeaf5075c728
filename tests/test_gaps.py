"""Gap decomposition against the linear-Gaussian closed forms (probabilistic PCA).

Model: z ~ N(0, I_L), x | z ~ N(W z + b, s^2 I_D). Then log p(x) = log N(x; b, W W^T + s^2 I),
the posterior is N(A (x - b), s^2 M^{-1}) with M = W^T W + s^2 I and A = M^{-1} W^T, its precision
is Lambda = M / s^2, and the best diagonal Gaussian (precisions diag(Lambda), the exact mean) falls
short of log p(x) by 1/2 (sum_i log Lambda_ii - log det Lambda) nats for every x.
"""

from __future__ import annotations

import json
import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae import VAE, Gaussian, StandardNormal
from pyrovae.errors import ConfigError, DataError
from pyrovae.families import DiagonalNormal
from pyrovae.gaps import GapResult, gaps, plot_gaps

L, D, S = 2, 4, 0.5


def _model_constants() -> dict[str, torch.Tensor]:
    W = torch.tensor([[1.0, 0.8], [0.7, 1.0], [0.5, 0.6], [0.2, -0.3]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.0])
    M = W.T @ W + S**2 * torch.eye(L)
    precision = M / S**2
    return {
        "W": W,
        "b": b,
        "A": torch.linalg.solve(M, W.T),
        "cov": S**2 * torch.linalg.inv(M),
        "precision": precision,
        "marginal": W @ W.T + S**2 * torch.eye(D),
        "diag_gap": 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)),
    }


def _decoder(c: dict[str, torch.Tensor]) -> Gaussian:
    linear = nn.Linear(L, D)
    with torch.no_grad():
        linear.weight.copy_(c["W"])
        linear.bias.copy_(c["b"])
    return Gaussian(linear, scale=S)


def _identity_encoder() -> nn.Linear:
    encoder = nn.Linear(D, D)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(D))
        encoder.bias.zero_()
    return encoder


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


def _diagonal_family(c: dict[str, torch.Tensor], scale: float, shift: float) -> DiagonalNormal:
    """Amortized q(z|x) = N(posterior mean + shift, scale^2 I): right direction, wrong width."""
    family = DiagonalNormal(_identity_encoder(), L)
    with torch.no_grad():
        family.loc_head.weight.copy_(c["A"])
        family.loc_head.bias.copy_(-c["A"] @ c["b"] + shift)
        family.scale_head.weight.zero_()
        family.scale_head.bias.fill_(_softplus_inv(scale - family.min_scale))
    return family


class ExactPosterior(nn.Module):
    """A test-local full-rank family whose encoder returns the exact posterior.

    Local parameters: ``loc (batch, L)`` and ``raw_scale_tril (batch, L, L)`` (strict lower part
    as is, diagonal through softplus).
    """

    def __init__(self, c: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.latent_dim = L
        self.register_buffer("A", c["A"])
        self.register_buffer("b", c["b"])
        chol = torch.linalg.cholesky(c["cov"])
        raw = chol.tril(-1) + torch.diag_embed(torch.log(torch.expm1(chol.diagonal())))
        self.register_buffer("raw", raw)

    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dict:
        loc = (x - self.b) @ self.A.T
        return {"loc": loc, "raw_scale_tril": self.raw.expand(x.shape[0], L, L)}

    def distribution_from_params(self, params: dict) -> dist.Distribution:
        raw = params["raw_scale_tril"]
        tril = raw.tril(-1) + torch.diag_embed(F.softplus(raw.diagonal(dim1=-2, dim2=-1)))
        return dist.MultivariateNormal(params["loc"], scale_tril=tril)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        return self.distribution_from_params(self.local_params(x, idx))


def _data(c: dict[str, torch.Tensor], n: int = 20) -> torch.Tensor:
    return dist.MultivariateNormal(c["b"], c["marginal"]).sample((n,))


def _exact_log_px(c: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return dist.MultivariateNormal(c["b"], c["marginal"]).log_prob(x)


def _kl_to_posterior(c, x, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, cov) || p(z|x)) per datapoint."""
    post = dist.MultivariateNormal((x - c["b"]) @ c["A"].T, c["cov"])
    q = dist.MultivariateNormal(loc, cov)
    return torch.distributions.kl_divergence(q, post)


FAST = dict(num_samples=4000, num_elbo_samples=5000, batch_size=20, seed=1)


def test_diagonal_family_gaps_match_closed_form(float64):
    c = _model_constants()
    x = _data(c)
    scale, shift = 0.5, 0.1
    vae = VAE(StandardNormal(L), _diagonal_family(c, scale, shift), _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # log p(x) by importance sampling agrees with the closed form
    assert abs(float((result.log_px - exact).mean())) < 0.02
    assert float((result.log_px - exact).abs().max()) < 0.1
    # L[q*] = log p(x) - 1/2 (sum log Lambda_ii - log det Lambda), for every x
    gap = float(c["diag_gap"])
    assert 0.3 < gap < 1.0  # the test model has a real gap
    assert abs(float((result.elbo_optimal - (exact - gap)).mean())) < 0.02
    assert float((result.elbo_optimal - (exact - gap)).abs().max()) < 0.1
    assert abs(result.summary()["approximation_gap"][0] - gap) < 0.03
    # L[q] = log p(x) - KL(q || posterior): the amortization gap is that KL minus the diag gap
    loc = (x - c["b"]) @ c["A"].T + shift
    kl = _kl_to_posterior(c, x, loc, scale**2 * torch.eye(L).expand(len(x), L, L))
    # (sd of the log-weights under q is about 3 nats: MC error of the mean about 0.01)
    assert abs(float((result.elbo_amortized - (exact - kl)).mean())) < 0.04
    assert abs(result.summary()["amortization_gap"][0] - float(kl.mean() - gap)) < 0.05
    # the decomposition adds up
    torch.testing.assert_close(
        result.approximation_gap + result.amortization_gap, result.inference_gap
    )


def test_full_rank_family_has_no_approximation_gap(float64):
    families = pytest.importorskip("pyrovae.families")
    if not hasattr(families, "FullRankNormal"):
        pytest.skip("FullRankNormal not available")
    c = _model_constants()
    x = _data(c)
    family = families.FullRankNormal(_identity_encoder(), L)
    with torch.no_grad():  # exact mean + shift, covariance 0.8^2 I: q* must find the posterior
        family.loc_head.weight.copy_(c["A"])
        family.loc_head.bias.copy_(-c["A"] @ c["b"] + 0.1)
        family.scale_head.weight.zero_()
        rows, cols = family.tril_indices
        bias = torch.where(rows == cols, _softplus_inv(0.8 - family.min_scale), 0.0)
        family.scale_head.bias.copy_(bias)
    vae = VAE(StandardNormal(L), family, _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # within the optimizer's own error (noisy reparameterized gradients, about 0.01 nats)
    assert abs(float((result.elbo_optimal - exact).mean())) < 0.02
    assert abs(result.summary()["approximation_gap"][0]) < 0.02
    assert result.summary()["amortization_gap"][0] > 1.0  # the amortized covariance is wrong


def test_exact_encoder_has_no_gaps(float64):
    c = _model_constants()
    x = _data(c)
    vae = VAE(StandardNormal(L), ExactPosterior(c), _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # an exact proposal: every log-weight equals log p(x), so all three agree to rounding
    torch.testing.assert_close(result.log_px, exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.elbo_amortized, exact, atol=1e-9, rtol=0)
    assert float(result.amortization_gap.abs().max()) < 1e-3
    assert float(result.approximation_gap.abs().max()) < 1e-3
    assert bool((result.khat == -math.inf).all())  # equal weights: perfectly reliable


def test_result_dict_and_plot(float64, tmp_path):
    c = _model_constants()
    x = _data(c, 6)
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=100)
    result = gaps(vae, x, num_samples=100, num_elbo_samples=50, num_steps=100, seed=0)
    assert (result.settings["num_samples"], result.settings["num_elbo_samples"]) == (100, 50)
    assert result.log_px.shape == result.elbo_optimal.shape == (6,)
    d = result.to_dict(per_datapoint=True)
    assert json.loads(json.dumps(d)) == d  # JSON-ready: a round trip changes nothing
    assert d["per_datapoint"]["elbo_optimal"] == result.elbo_optimal.tolist()
    assert d["num_datapoints"] == 6
    assert d["approximation_gap"]["mean"] == pytest.approx(
        float(result.approximation_gap.mean())
    )
    assert len(d["per_datapoint"]["log_px"]) == 6
    # 100 steps hold 2 checks (check_every=50), fewer than the max_decays + 1 = 5 halvings that
    # stop early: every datapoint gets all 100 steps
    assert result.num_steps.tolist() == [100] * 6 and d["mean_num_steps"] == 100.0
    fig = plot_gaps([result, result], tmp_path / "gaps.png", labels=["a", "b"])
    assert (tmp_path / "gaps.png").stat().st_size > 0
    assert len(fig.axes) == 2
    with pytest.raises(ConfigError, match="labels"):
        plot_gaps([result], labels=["a", "b"])


def test_gaps_reproducible_with_seed(float64):
    c = _model_constants()
    x = _data(c, 4)
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=100)
    kwargs = dict(num_samples=50, num_elbo_samples=20, num_steps=60, seed=3)
    a, b = gaps(vae, x, **kwargs), gaps(vae, x, **kwargs)
    torch.testing.assert_close(a.elbo_optimal, b.elbo_optimal)
    torch.testing.assert_close(a.log_px, b.log_px)
    # the decoder was not touched and still trains afterwards
    assert all(p.requires_grad for p in vae.parameters())
    assert all(p.grad is None for p in vae.parameters())


def test_gaps_errors(float64):
    c = _model_constants()

    class NoLocal(nn.Module):
        latent_dim = L

        def forward(self, x, idx=None):
            return dist.Normal(torch.zeros(len(x), L), 1.0).to_event(1)

    vae = VAE(StandardNormal(L), NoLocal(), _decoder(c), num_data=10)
    with pytest.raises(ConfigError, match="local_params"):
        gaps(vae, _data(c, 2))
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=10)
    with pytest.raises(ConfigError, match="num_steps"):
        gaps(vae, _data(c, 2), num_steps=0)
    with pytest.raises(DataError):
        gaps(vae, torch.zeros(0, D))
    with pytest.raises(DataError):
        gaps(vae, torch.zeros(2, D + 1), num_samples=2, num_elbo_samples=2, num_steps=2)

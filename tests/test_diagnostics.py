"""Latent-space diagnostics against constructed models and closed forms.

- active units: an encoder whose mean ignores x in k dimensions has exactly k dead units;
- KL per dimension: a diagonal Gaussian against N(0, 1) has
  KL_d = 1/2 (sigma_d^2 + mu_d^2 - 1) - log sigma_d;
- mutual information: with the exact posterior of the linear-Gaussian model the aggregate
  posterior is the prior, so KL(q(z) || p(z)) = 0 and
  I(x; z) = H(z) - H(z | x) = 1/2 log det I - 1/2 log det Sigma = -1/2 log det Sigma,
  Sigma = s^2 (W^T W + s^2 I)^{-1} the posterior covariance (the same for every x).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from linear_gaussian import LinearGaussian
from pyrovae import VAE, Gaussian, StandardNormal
from pyrovae.diagnostics import active_units, diagnose, kl_per_dimension, mutual_information
from pyrovae.errors import ConfigError, DataError
from pyrovae.families import DiagonalNormal, Flow, planar

L, D, DEAD = 5, 6, (1, 3)


def _family() -> DiagonalNormal:
    """q(z|x) = N(A x + c, diag sigma^2) with rows DEAD of A zero: those means ignore x."""
    g = torch.Generator().manual_seed(3)
    encoder = nn.Linear(D, D)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(D))
        encoder.bias.zero_()
    family = DiagonalNormal(encoder, L)
    with torch.no_grad():
        A = torch.randn(L, D, generator=g)
        A[list(DEAD)] = 0.0
        family.loc_head.weight.copy_(A)
        family.loc_head.bias.copy_(torch.randn(L, generator=g))
        # scales depend on x too, between ~0.3 and ~1.5
        family.scale_head.weight.copy_(0.3 * torch.randn(L, D, generator=g))
        family.scale_head.bias.copy_(torch.randn(L, generator=g) * 0.5)
    return family


class _NoMean(nn.Module):
    """Wraps a family's distribution in a TransformedDistribution without transforms: the same
    density, but no closed-form mean and no factorization (forces the Monte Carlo paths)."""

    def __init__(self, family: nn.Module) -> None:
        super().__init__()
        self.inner = family
        self.latent_dim = family.latent_dim

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        return dist.TransformedDistribution(self.inner(x, idx), [])


def _vae(family: nn.Module, prior: nn.Module | None = None) -> VAE:
    return VAE(prior or StandardNormal(L), family, Gaussian(nn.Linear(L, D), 1.0), num_data=1000)


def _data(n: int = 400) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(4))


def test_active_units_counts_dead_dimensions(float64):
    family = _family()
    x = _data()
    result = active_units(_vae(family), x)
    assert result.count == L - len(DEAD)
    assert result.analytic_mean
    assert result.active.tolist() == [d not in DEAD for d in range(L)]
    assert float(result.variances[list(DEAD)].abs().max()) < 1e-20
    # the active dimensions' variance is that of their mean A x + c over the data
    with torch.no_grad():
        expected = family.loc_head(x).var(0)
    torch.testing.assert_close(result.variances, expected)


def test_active_units_monte_carlo_mean_is_noise_corrected(float64):
    family = _family()
    x = _data()
    exact = active_units(_vae(family), x).variances
    mc = active_units(_vae(_NoMean(family)), x, num_samples=200, seed=0)
    assert not mc.analytic_mean
    assert mc.count == L - len(DEAD)
    # Without the correction a dead dimension would show Var_q / S ~ 1/200 of noise.
    assert float(mc.variances[list(DEAD)].abs().max()) < 1e-3
    torch.testing.assert_close(mc.variances, exact, rtol=0.03, atol=1e-3)


def _closed_form_kl(family: DiagonalNormal, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        q = family(x)
    mu, sigma = q.base_dist.loc, q.base_dist.scale
    return 0.5 * (sigma**2 + mu**2 - 1) - torch.log(sigma)  # (N, L)


def test_kl_per_dimension_matches_closed_form(float64):
    family = _family()
    x = _data()
    result = kl_per_dimension(_vae(family), x)
    expected = _closed_form_kl(family, x)
    assert result.analytic
    torch.testing.assert_close(result.per_dim, expected.mean(0))
    torch.testing.assert_close(result.values, expected.sum(1))
    assert math.isclose(result.total, float(expected.sum(1).mean()), rel_tol=1e-12)


class _StudentTPrior(nn.Module):
    """Independent Student-t(df) prior: factorizes, but no registered KL against a Normal."""

    def __init__(self, df: float) -> None:
        super().__init__()
        self.latent_dim = L
        self.df = df

    def forward(self) -> dist.Distribution:
        zeros = torch.zeros(L)
        return dist.StudentT(self.df, zeros, torch.ones(L)).to_event(1)


def test_kl_per_dimension_monte_carlo_paths(float64):
    family = _family()
    x = _data(200)
    expected = _closed_form_kl(family, x)
    # Factorized but no closed form: per-dimension Monte Carlo. A Student-t with huge df is
    # N(0, 1) up to O(1/df), so the closed form against N(0, 1) is the reference.
    mc = kl_per_dimension(_vae(family, _StudentTPrior(1e6)), x, num_samples=2000, seed=0)
    assert not mc.analytic and mc.per_dim is not None
    torch.testing.assert_close(mc.per_dim, expected.mean(0), rtol=0, atol=0.01)
    # Not factorized: only the total, by Monte Carlo.
    total = kl_per_dimension(_vae(_NoMean(family)), x, num_samples=2000, seed=0)
    assert not total.analytic and total.per_dim is None
    assert abs(total.total - float(expected.sum(1).mean())) < 0.02


def test_mutual_information_of_exact_posterior_matches_closed_form(float64):
    model = LinearGaussian(latent_dim=3, num_features=5, scale=0.7)
    n = 2000
    x = model.sample_x(n)
    vae = model.vae(model.exact_family(), num_data=n)
    result = mutual_information(vae, x, num_samples=2, seed=0)
    exact = -0.5 * float(torch.logdet(model.posterior_cov))
    assert 1.0 < exact < math.log(n) - 3  # a real signal, far from the log N ceiling
    # The average KL of these n datapoints in closed form, and its spread over datapoints.
    with torch.no_grad():
        q = vae.family(x)
    kl_n = torch.distributions.kl_divergence(q, dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))
    data_stderr = float(kl_n.std() / math.sqrt(n))
    assert abs(float(kl_n.mean()) - exact) < 4 * data_stderr  # E_x KL(p(z|x) || p(z)) = I
    # The Monte Carlo average KL agrees with the closed form on these data.
    assert result.mutual_information_stderr < 0.03
    assert abs(result.average_kl - float(kl_n.mean())) < 4 * result.mutual_information_stderr
    # The aggregate of exact posteriors is the prior: KL(q(z) || p(z)) = 0 up to the finite-N
    # bias O(e^I / N) ~ 0.01 nats.
    assert abs(result.marginal_kl) < 0.03
    assert math.isclose(
        result.mutual_information + result.marginal_kl, result.average_kl, rel_tol=1e-9
    )
    # Hence I(x; z) = -1/2 log det Sigma within the data's and the draws' sampling error.
    total_stderr = math.hypot(data_stderr, result.mutual_information_stderr)
    assert abs(result.mutual_information - exact) < 4 * total_stderr + 0.03


def test_minibatch_estimator_bias(float64):
    model = LinearGaussian(latent_dim=3, num_features=5, scale=0.7)
    x = model.sample_x(300)
    vae = model.vae(model.exact_family(), num_data=300)
    full = mutual_information(vae, x, seed=5)
    # M = N: the stratified minibatch estimator is the full mixture
    same = mutual_information(vae, x, batch_size=300, seed=5)
    assert math.isclose(same.mutual_information, full.mutual_information, rel_tol=1e-10)
    # M < N: E log q-hat <= log q (Jensen), so I is over- and KL(q(z)||p(z)) under-estimated by
    # the same amount; the average KL (same draws) does not change.
    small = mutual_information(vae, x, batch_size=10, seed=5)
    assert small.mutual_information > full.mutual_information + 0.01
    assert math.isclose(
        small.mutual_information - full.mutual_information,
        full.marginal_kl - small.marginal_kl,
        rel_tol=1e-9,
    )
    assert math.isclose(small.average_kl, full.average_kl, rel_tol=1e-12)


def test_diagnose_and_bad_input(float64):
    vae = _vae(_family())
    x = _data(50)
    d = diagnose(vae, x, seed=0)
    assert d.active_units.count == L - len(DEAD)
    assert set(d.to_dict()) == {"active_units", "kl", "aggregate_posterior"}
    with pytest.raises(DataError, match="at least 2"):
        mutual_information(vae, x[:1])
    with pytest.raises(ConfigError, match="batch_size"):
        mutual_information(vae, x, batch_size=1)
    with pytest.raises(DataError, match="features"):
        active_units(vae, torch.zeros(10, D + 1))
    # planar flows cannot evaluate q(z|x_m) at another datapoint's draw
    base = DiagonalNormal(nn.Linear(D, 8), L)
    flow_vae = _vae(Flow(base, planar(L, 8)))
    with pytest.raises(ConfigError, match="planar"):
        mutual_information(flow_vae, x)
    # ... so diagnose gives the other two for it, and no aggregate posterior (said so)
    flow_d = diagnose(flow_vae, x, seed=0)
    assert flow_d.mutual_information is None and flow_d.to_dict()["aggregate_posterior"] is None
    assert flow_d.active_units.variances.shape == (L,) and math.isfinite(flow_d.kl.total)
    assert "aggregate posterior: n/a" in str(flow_d)
    assert d.mutual_information is not None and math.isfinite(d.mutual_information.mutual_information)


def test_diagnostics_refuse_a_plain_pair_and_restore_the_rng(float64):
    """The latent-space diagnostics read a VAE's family and prior: a (model, guide) pair is
    refused in one line; a seeded call leaves the global RNG and the training mode as they were."""
    vae = VAE(StandardNormal(L), _family(), Gaussian(nn.Linear(L, D), 0.5), num_data=10)
    x = torch.randn(8, D)
    for fn in (active_units, kl_per_dimension, mutual_information):
        with pytest.raises(ConfigError, match="need a pyrovae.VAE"):
            fn((vae.model, vae.guide), x)
    state = torch.get_rng_state()
    a = kl_per_dimension(vae, x, seed=1)
    assert torch.equal(torch.get_rng_state(), state) and vae.training
    assert a.total == kl_per_dimension(vae, x, seed=1).total

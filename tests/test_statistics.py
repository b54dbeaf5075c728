"""The statistics behind every stated uncertainty, against numbers computed by hand: the
standard error of a mean, the delta-method standard error of AIS over chains, the effective
sample size, PSIS k-hat on weights with a known Pareto tail, and the stratified minibatch
estimator of the aggregate posterior in the mutual information."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from conftest import assert_close
from mixture_1d import Identity1D
from pyrovae import VAE, Gaussian, StandardNormal
from pyrovae.ais import _chain_stderr
from pyrovae.diagnostics import mutual_information
from pyrovae.evaluation import mean_stderr
from pyrovae.importance import LogLikelihood, effective_sample_size, psis_khat


# ------------------------------------------------------------------ standard errors
@pytest.mark.parametrize("fn", [mean_stderr], ids=["evaluation"])
def test_mean_stderr_by_hand(fn):
    """[1, 2, 3, 4, 10]: mean 4, unbiased variance (9+4+1+0+36)/4 = 12.5, standard error
    sqrt(12.5 / 5) = sqrt(2.5) -- not the standard deviation sqrt(12.5), nor the biased
    sqrt(10 / 5)."""
    mean, se = fn(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64))
    assert_close(mean, 4.0)
    assert_close(se, math.sqrt(2.5))
    mean, se = fn(torch.tensor([7.0], dtype=torch.float64))
    assert mean == 7.0 and math.isnan(se)  # no spread to measure in one value


def test_ais_chain_stderr_by_hand():
    """Delta method over chains: weights (1, 3) have mean 2, unbiased variance 2, so the
    relative variance of the mean is 2 / (2 * 2^2) = 1/4 and the standard error of log(mean)
    is 1/2; a column with a -inf log-weight has none; a single chain has none."""
    log_w = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.inf]], dtype=torch.float64)
    se = _chain_stderr(log_w + 5.0)  # shifting every log-weight changes nothing
    assert_close(se[0], 0.5)
    assert math.isnan(float(se[1]))
    assert bool(torch.isnan(_chain_stderr(log_w[:1])).all())


# ------------------------------------------------------------------ importance weights
def test_effective_sample_size_by_hand():
    """Weights (1, 1, 2): (1+1+2)^2 / (1+1+4) = 16/6; K equal weights: K; one weight that
    dominates: 1."""
    w = torch.tensor([[0.0, 3.0, 0.0], [0.0, 3.0, -800.0], [math.log(2.0), 3.0, -800.0]],
                     dtype=torch.float64)
    assert_close(effective_sample_size(w), [16 / 6, 3.0, 1.0])


@pytest.mark.parametrize("xi", [0.3, 0.6, 0.9])
def test_psis_khat_recovers_a_known_pareto_tail(xi):
    """Weights drawn from a generalized Pareto distribution with shape xi (w = (U^-xi - 1)/xi,
    U uniform): k-hat estimates xi. 8 columns of 20,000 draws: the Pareto fit of one column has
    a standard error of about (1 + xi) / sqrt(424) ~ 0.07, their mean ~0.025; the tolerance is
    0.08. A k-hat that were off by the log (fitted to the log-weights), or that ignored the tail,
    misses by far more."""
    rng = np.random.default_rng(0)
    u = rng.uniform(size=(20000, 8))
    w = (u ** -xi - 1.0) / xi + 1.0  # shifted to positive weights; the tail shape is xi
    khat = psis_khat(torch.as_tensor(np.log(w)))
    assert abs(float(khat.mean()) - xi) < 0.08, khat
    # scale invariance: multiplying every weight by a constant changes nothing
    assert_close(psis_khat(torch.as_tensor(np.log(w) + 4.0)), khat, rtol=1e-6, atol=1e-6)


def test_psis_khat_special_cases():
    """Equal weights (an exact proposal): -inf, perfectly reliable; fewer than 25 draws: nan;
    a column with a non-finite weight: nan."""
    w = torch.zeros(30, 3, dtype=torch.float64)
    w[:, 1] = torch.linspace(0, 3, 30)
    w[4, 2] = -math.inf
    k = psis_khat(w)
    assert k[0] == -math.inf and math.isfinite(float(k[1])) and math.isnan(float(k[2]))
    assert bool(torch.isnan(psis_khat(w[:24])).all())


def test_share_and_mean_ess_of_a_result():
    """The k-hat share counts datapoints above 0.7 among those with a k-hat (nan left out,
    -inf counted as reliable); the mean ESS is over the finite ones."""
    values = torch.zeros(5, dtype=torch.float64)
    ll = LogLikelihood(values, 0.0, 0.0, num_samples=100,
                       khat=torch.tensor([0.2, 0.71, -math.inf, 0.9, 0.7], dtype=torch.float64),
                       ess=torch.tensor([10.0, 20.0, float("nan"), 30.0, 40.0],
                                        dtype=torch.float64))
    assert ll.unreliable_share == pytest.approx(2 / 5)
    assert ll.mean_ess == pytest.approx(25.0)


# ------------------------------------------------------------------ mutual information
class _MeanSampled(dist.Normal):
    """A normal whose draws are its mean: the estimator's draws are known in advance."""

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.loc.expand(self._extended_shape(sample_shape)).clone()


class _Family(nn.Module):
    """q(z | x) = N(a x, c^2) in 1-D, sampled at its mean."""

    latent_dim = 1

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.a, self.c = a, c
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        loc = self.a * x + 0 * self.dummy
        return _MeanSampled(loc, torch.full_like(loc, self.c)).to_event(1)


def _mi_vae(a: float, c: float, n: int) -> VAE:
    return VAE(StandardNormal(1), _Family(a, c), Gaussian(Identity1D(), 0.5), num_data=n).double()


def test_mutual_information_stratified_weight_by_hand(monkeypatch, float64):
    r"""N = 4 datapoints, minibatches of M = 2 (groups {0, 1} and {2, 3}; the split is fixed
    here), one draw each, at z_n = a x_n. By hand, for n in group B = {n, m}:

        q_hat(z_n) = 1/N q(z_n | x_n) + (N - 1) / (N (|B| - 1)) q(z_n | x_m)
                   = 1/4 N(z_n; z_n, c) + 3/4 N(z_n; z_m, c),

    I = mean_n log N(z_n; z_n, c) - log q_hat(z_n), KL = mean_n log q_hat(z_n) - log N(z_n; 0, 1).
    A weight of 1/(N (|B| - 1)) or 1/|B| (the mutants) moves I by tenths of a nat here."""
    x = torch.tensor([[0.0], [0.3], [1.0], [2.5]], dtype=torch.float64)
    a, c = 1.2, 0.8
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))
    result = mutual_information(_mi_vae(a, c, 4), x, batch_size=2, seed=0)
    z = a * x.flatten()
    partner = torch.tensor([1, 0, 3, 2])
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), c)
    own = q.log_prob(torch.zeros(4, dtype=torch.float64))
    other = q.log_prob(z - z[partner])
    q_hat = torch.log(0.25 * own.exp() + 0.75 * other.exp())
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    assert result.batch_size == 2 and result.num_datapoints == 4
    assert_close(result.mutual_information, float((own - q_hat).mean()))
    assert_close(result.marginal_kl, float((q_hat - prior).mean()))
    assert_close(result.average_kl, float((own - prior).mean()))
    # the full mixture (batch_size=None) by hand: q(z_n) = 1/4 sum_m N(z_n; z_m, c)
    full = mutual_information(_mi_vae(a, c, 4), x, seed=0)
    q_full = torch.logsumexp(q.log_prob(z[:, None] - z[None, :]), 1) - math.log(4)
    assert_close(full.mutual_information, float((own - q_full).mean()))


@pytest.mark.parametrize("batch_size", [2, 3, None])
def test_mutual_information_is_zero_when_the_encoder_ignores_x(batch_size, float64):
    """q(z | x) the same for every x: q(z) = q(z | x), so I_q(x; z) = 0 exactly for the full
    mixture and for every stratified minibatch (N = 7 in groups of unequal sizes): the weights
    1/N and (N - 1)/(N (|B| - 1)) add to one over a group. Any other weight gives log of its sum."""
    x = torch.linspace(-1, 1, 7, dtype=torch.float64).reshape(7, 1)
    vae = _mi_vae(0.0, 0.6, 7)
    result = mutual_information(vae, x, batch_size=batch_size, num_samples=3, seed=1)
    assert abs(result.mutual_information) < 1e-12
    assert_close(result.marginal_kl, result.average_kl)

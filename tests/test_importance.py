"""Importance sampling against an exact marginal: the 1-D mixture model (DESIGN.md), PSIS k-hat
for good and bad proposals, and the IWAE bounds tightening with K.

The model: z ~ sum_n lambda_n N(mu_n, s_n^2) (a 1-D mixture prior), x | z ~ N(z, tau^2). Its
marginal is the 1-D mixture log p(x) = log sum_n lambda_n N(x; mu_n, s_n^2 + tau^2), exactly, and
its posterior is a mixture of Gaussians too, bimodal for x between the components.
"""

from __future__ import annotations

import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from torch import nn

from pyrovae import VAE, Gaussian, MixtureOfGaussians, iwae_bounds, log_likelihood
from pyrovae.errors import ImportanceSamplingWarning

WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-2.0, 1.5])
SCALES = torch.tensor([0.5, 0.8])
TAU = 0.4


class _Identity1D(nn.Module):
    """The decoder mean f(z) = z (a 1-D feature from a 1-D latent)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class _GaussianProposal(nn.Module):
    """q(z | x) = N(a x + b, c^2): a hand-set proposal meeting the family contract."""

    latent_dim = 1

    def __init__(self, a: float, b: float, c: float) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        loc = self.a * x + self.b
        return dist.Normal(loc, torch.full_like(loc, self.c)).to_event(1)


def _mixture_vae(proposal: nn.Module) -> VAE:
    prior = MixtureOfGaussians(1, 2).double()
    with torch.no_grad():
        prior.logits.copy_(WEIGHTS.log())
        prior.locs.copy_(LOCS.view(2, 1))
        scale = SCALES.view(2, 1) - prior.min_scale
        prior.raw_scales.copy_(scale + torch.log(-torch.expm1(-scale)))  # inverse softplus
    likelihood = Gaussian(_Identity1D(), scale=TAU)
    return VAE(prior, proposal, likelihood, num_data=100)


def _exact_log_px(x: torch.Tensor) -> torch.Tensor:
    var = SCALES**2 + TAU**2
    comp = dist.Normal(LOCS, var.sqrt()).log_prob(x.view(-1, 1)) + WEIGHTS.log()
    return torch.logsumexp(comp, -1)


def _x() -> torch.Tensor:
    return torch.tensor([-3.0, -2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0]).view(-1, 1)


def test_prior_is_the_stated_mixture(float64):
    vae = _mixture_vae(_GaussianProposal(1.0, 0.0, 1.0))
    z = torch.linspace(-4, 4, 9).view(-1, 1)
    expected = torch.logsumexp(
        dist.Normal(LOCS, SCALES).log_prob(z) + WEIGHTS.log(), -1
    )
    assert_close(vae.prior().log_prob(z), expected)


def test_importance_sampling_matches_the_exact_mixture_marginal(float64):
    """A broad proposal (covers both posterior modes): the IS estimate converges to the exact
    log p(x) within its Monte Carlo error, and every PSIS k-hat says it is reliable."""
    vae = _mixture_vae(_GaussianProposal(0.7, 0.0, 2.0))
    x = _x()
    exact = _exact_log_px(x)
    k = 20000
    ll = log_likelihood(vae, x, num_samples=k, seed=0)
    # delta method: sd(log p_hat) = sqrt(Var(w) / (K E[w]^2)) = sqrt((K / ESS - 1) / K)
    sd = ((k / ll.ess - 1) / k).sqrt()
    assert bool(((ll.values - exact).abs() < 4 * sd).all()), (ll.values - exact, sd)
    assert bool((sd < 0.03).all())
    assert bool((ll.khat < 0.5).all()), ll.khat
    assert bool((ll.ess > 0.1 * 20000).all())


def test_khat_flags_a_proposal_much_narrower_than_the_posterior(float64):
    """A proposal 20x narrower than the posterior, centred off its mode: heavy-tailed weights,
    k-hat > 0.7, a warning, and an estimate that falls short of the exact log p(x)."""
    vae = _mixture_vae(_GaussianProposal(0.5, 0.3, 0.02))
    x = _x()
    with pytest.warns(ImportanceSamplingWarning, match="k-hat > 0.7"):
        ll = log_likelihood(vae, x, num_samples=2000, seed=0)
    assert bool((ll.khat > 0.7).all()), ll.khat
    assert ll.unreliable_share == 1.0
    assert bool((ll.values < _exact_log_px(x)).all())


def test_iwae_bounds_tighten_towards_log_px(float64):
    """L_1 <= L_10 <= ... <= log p(x) (Burda et al. 2016), here with a proposal of moderate
    quality: the bounds rise with K and the last one is within Monte Carlo error of the truth."""
    vae = _mixture_vae(_GaussianProposal(0.8, 0.0, 0.6))
    g = torch.Generator().manual_seed(5)
    component = torch.multinomial(WEIGHTS, 400, replacement=True, generator=g)
    z = LOCS[component] + SCALES[component] * torch.randn(400, generator=g, dtype=torch.float64)
    x = (z + TAU * torch.randn(400, generator=g, dtype=torch.float64)).view(-1, 1)  # from p(x)
    exact = float(_exact_log_px(x).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        bounds = iwae_bounds(vae, x, (1, 10, 100, 1000, 10000), seed=0)
    means = bounds.means.tolist()
    assert bounds.num_samples == (1, 10, 100, 1000, 10000)
    # nested draws: the differences are far less noisy than the bounds themselves
    assert all(b > a - 0.005 for a, b in zip(means, means[1:])), means
    assert means[0] < exact - 0.2  # the one-sample bound is visibly loose
    assert abs(means[-1] - exact) < 0.02
    # nested: L_K uses the first K of the same draws, so L_max equals log_likelihood with K = max
    ll = log_likelihood(vae, x, num_samples=10000, seed=0, diagnostics=False)
    assert_close(bounds.values[-1], ll.values, rtol=1e-10, atol=1e-10)
    assert math.isfinite(means[0])

"""The 1-D mixture of Gaussians as a latent variable model, built from pyrovae parts, with its
exact marginal: a ground truth for estimator tests (importance sampling, AIS).

    z ~ sum_n w_n N(mu_n, s_n^2),  x | z ~ N(z, tau^2)
    log p(x) = log sum_n w_n N(x; mu_n, s_n^2 + tau^2)
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import VAE, Gaussian, MixtureOfGaussians

WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-2.0, 1.5])
SCALES = torch.tensor([0.5, 0.8])
TAU = 0.4


class Identity1D(nn.Module):
    """The decoder mean f(z) = z (a 1-D feature from a 1-D latent)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class GaussianProposal(nn.Module):
    """q(z | x) = N(a x + b, c^2): a hand-set proposal meeting the family contract."""

    latent_dim = 1

    def __init__(self, a: float, b: float, c: float) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        loc = self.a * x + self.b
        return dist.Normal(loc, torch.full_like(loc, self.c)).to_event(1)


def mixture_vae(proposal: nn.Module) -> VAE:
    """The model above (float64) with ``proposal`` as its family."""
    prior = MixtureOfGaussians(1, 2).double()
    with torch.no_grad():
        prior.logits.copy_(WEIGHTS.log())
        prior.locs.copy_(LOCS.view(2, 1))
        scale = SCALES.view(2, 1) - prior.min_scale
        prior.raw_scales.copy_(scale + torch.log(-torch.expm1(-scale)))  # inverse softplus
    return VAE(prior, proposal, Gaussian(Identity1D(), scale=TAU), num_data=100)


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    """log p(x) of each row of ``x`` ``(N, 1)``, exactly."""
    var = SCALES**2 + TAU**2
    comp = dist.Normal(LOCS, var.sqrt()).log_prob(x.view(-1, 1)) + WEIGHTS.log()
    return torch.logsumexp(comp, -1)

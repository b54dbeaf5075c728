"""The linear-Gaussian latent variable model (probabilistic PCA; Tipping & Bishop 1999) built
from pyrovae parts, with its closed forms: the ground truth for estimator tests.

    z ~ N(0, I_L),  x | z ~ N(W z + b, s^2 I_D)
    log p(x) = log N(x; b, W W^T + s^2 I)
    p(z | x) = N(M^{-1} W^T (x - b), s^2 M^{-1}),  M = W^T W + s^2 I
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import VAE, DiagonalNormal, Gaussian, StandardNormal


class LinearGaussian:
    def __init__(self, latent_dim: int = 3, num_features: int = 5, scale: float = 0.7, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.L, self.D, self.s = latent_dim, num_features, scale
        self.W = torch.randn(num_features, latent_dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(num_features, generator=g, dtype=torch.float64)
        eye = torch.eye(latent_dim, dtype=torch.float64)
        self.M = self.W.T @ self.W + scale**2 * eye
        self.posterior_cov = scale**2 * torch.linalg.inv(self.M)
        #: posterior precision Lambda = M / s^2
        self.precision = self.M / scale**2

    def sample_x(self, n: int, seed: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.L, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.D, generator=g, dtype=torch.float64)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.D, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior_loc_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, c) with posterior mean A x + c."""
        A = torch.linalg.solve(self.M, self.W.T)
        return A, -A @ self.b

    def diagonal_gap(self) -> float:
        """Gap of the best diagonal Gaussian: 1/2 (sum_i log Lambda_ii - log det Lambda)."""
        lam = self.precision
        return 0.5 * float(torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam))

    def decoder(self) -> nn.Linear:
        dec = nn.Linear(self.L, self.D).double()
        with torch.no_grad():
            dec.weight.copy_(self.W)
            dec.bias.copy_(self.b)
        return dec

    def vae(self, family: nn.Module, num_data: int = 100) -> VAE:
        return VAE(StandardNormal(self.L), family, Gaussian(self.decoder(), self.s), num_data).double()

    def exact_family(self) -> nn.Module:
        return ExactPosterior(self)

    def best_diagonal_family(self) -> DiagonalNormal:
        """pyrovae's DiagonalNormal (identity encoder) set to the optimal diagonal Gaussian:
        the posterior mean and precisions equal to diag(Lambda)."""
        fam = DiagonalNormal(nn.Identity(), self.L, feature_dim=self.D).double()
        A, c = self.posterior_loc_map()
        target_scale = torch.diagonal(self.precision).rsqrt()
        with torch.no_grad():
            fam.loc_head.weight.copy_(A)
            fam.loc_head.bias.copy_(c)
            fam.scale_head.weight.zero_()
            # softplus(raw) + min_scale = target  =>  raw = log(expm1(target - min_scale))
            fam.scale_head.bias.copy_(torch.log(torch.expm1(target_scale - fam.min_scale)))
        return fam


class ExactPosterior(nn.Module):
    """A family (by contract only) that returns the exact posterior p(z | x)."""

    def __init__(self, model: LinearGaussian) -> None:
        super().__init__()
        self.latent_dim = model.L
        A, c = model.posterior_loc_map()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.register_buffer("scale_tril", torch.linalg.cholesky(model.posterior_cov))
        # a parameter, so that optimizers have something to hold
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        loc = x @ self.A.T + self.c + 0 * self.dummy
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril.expand(len(x), -1, -1))


def log_normal_const(d: int) -> float:
    return -0.5 * d * math.log(2 * math.pi)

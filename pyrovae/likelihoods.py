r"""Likelihoods :math:`p(x \mid z)` with their decoders.

Contract: a likelihood is a :class:`torch.nn.Module`; ``likelihood(z)`` takes latents of shape
``(..., latent_dim)`` and returns a distribution with ``batch_shape == z.shape[:-1]`` and the data's
``event_shape`` (``(num_features,)`` for pyrovae's flat data). Its ``support`` is what
:meth:`pyrovae.VAE.check_data` checks data against before any training starts.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError

__all__ = ["Likelihood", "Bernoulli", "Gaussian"]


class Likelihood(nn.Module):
    """Base class of likelihoods (optional: any module meeting the contract works).

    :param decoder: module mapping ``(..., latent_dim) -> (..., num_features)``.
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class Bernoulli(Likelihood):
    r"""Independent Bernoulli pixels, :math:`p(x \mid z) = \prod_d \mathrm{Bernoulli}(x_d; \sigma(f(z)_d))`.

    The decoder gives the logits. Data must be binary: binarize grey images first (statically or
    dynamically, see :mod:`pyrovae.data`).
    """

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.decoder(z)).to_event(1)


class Gaussian(Likelihood):
    r"""Independent Gaussian features, :math:`p(x \mid z) = \mathcal N(x; f(z), \mathrm{diag}\,\sigma^2)`.

    The decoder gives the mean :math:`f(z)`.

    :param decoder: module mapping ``(..., latent_dim) -> (..., num_features)``.
    :param scale: a positive number (a fixed :math:`\sigma`), or ``"learned"``: one learnable
        :math:`\sigma_d` per feature, shared by all datapoints (``num_features`` is then needed).
    :param num_features: the data size, needed when ``scale="learned"``.
    :param min_scale: a floor on a learned :math:`\sigma`.
    """

    def __init__(
        self,
        decoder: nn.Module,
        scale: float | str = 1.0,
        *,
        num_features: int | None = None,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__(decoder)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        if isinstance(scale, str):
            if scale != "learned":
                raise ConfigError(
                    f"Gaussian scale must be a positive number or 'learned', got {scale!r}"
                )
            if num_features is None:
                num_features = getattr(decoder, "out_features", None)
            check_positive_int(num_features, "num_features (needed for scale='learned')")
            self.learned = True
            # softplus^{-1}(1 - min_scale): the scale starts at 1.
            init = math.log(math.expm1(1.0 - self.min_scale))
            self.raw_scale = nn.Parameter(torch.full((num_features,), init))
        else:
            self.learned = False
            self.register_buffer("fixed_scale", torch.tensor(check_positive_float(scale, "scale")))

    @property
    def scale(self) -> torch.Tensor:
        """The current :math:`\\sigma`: shape ``(num_features,)`` if learned, else a scalar."""
        if self.learned:
            return nn.functional.softplus(self.raw_scale) + self.min_scale
        return self.fixed_scale

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        loc = self.decoder(z)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)

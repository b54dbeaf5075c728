r"""Variational families :math:`q(z \mid x)` with their encoders (the amortized guide).

Contract: a family is a :class:`torch.nn.Module` with an integer attribute ``latent_dim``;
``family(x, idx)`` takes a batch ``x`` of shape ``(batch, num_features)`` and the batch's indices
``idx`` in the data set (shape ``(batch,)``; amortized families ignore them, per-datapoint families
use them) and returns a reparameterizable distribution with ``batch_shape == (batch,)`` and
``event_shape == (latent_dim,)``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError

__all__ = ["Family", "DiagonalNormal"]


def _feature_dim(encoder: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is None:
        feature_dim = getattr(encoder, "out_features", None)
        if feature_dim is None:
            raise ConfigError(
                f"cannot tell the output size of encoder {type(encoder).__name__}; "
                "pass feature_dim=<size of the encoder's output>"
            )
    return check_positive_int(feature_dim, "feature_dim")


class Family(nn.Module):
    """Base class of variational families (optional: any module meeting the contract works).

    :param latent_dim: the size of ``z``.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class DiagonalNormal(Family):
    r"""Amortized diagonal Gaussian :math:`q(z \mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma(x)^2)`.

    The encoder maps ``x`` to features ``h`` of shape ``(batch, feature_dim)``; two linear heads
    give :math:`\mu(h)` and :math:`\sigma(h) = \mathrm{softplus}(\cdot) + \sigma_{\min}`.

    :param encoder: module mapping ``(batch, num_features) -> (batch, feature_dim)``.
    :param latent_dim: the size of ``z``.
    :param feature_dim: the encoder's output size (read from ``encoder.out_features`` if omitted).
    :param min_scale: a floor on :math:`\sigma` for numerical safety.

    Example::

        >>> from pyrovae.nets import MLP
        >>> q = DiagonalNormal(MLP(784, (400,), 400, "relu"), latent_dim=50)
        >>> q(torch.zeros(8, 784)).batch_shape
        torch.Size([8])
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        *,
        feature_dim: int | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        super().__init__(latent_dim)
        self.encoder = encoder
        self.feature_dim = _feature_dim(encoder, feature_dim)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        self.loc_head = nn.Linear(self.feature_dim, self.latent_dim)
        self.scale_head = nn.Linear(self.feature_dim, self.latent_dim)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        h = self.encoder(x)
        loc = self.loc_head(h)
        scale = F.softplus(self.scale_head(h)) + self.min_scale
        return dist.Normal(loc, scale).to_event(1)

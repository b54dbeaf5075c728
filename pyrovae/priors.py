r"""Priors :math:`p(z)`.

Contract: a prior is a :class:`torch.nn.Module` with an integer attribute ``latent_dim``; called
with no arguments it returns a :class:`~pyro.distributions.Distribution` with
``event_shape == (latent_dim,)`` and ``batch_shape == ()``. The :class:`~pyrovae.VAE` puts it
inside the ``"data"`` plate, which broadcasts it over the minibatch (and over vectorized particles).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ._checks import check_positive_int

__all__ = ["Prior", "StandardNormal"]


class Prior(nn.Module):
    """Base class of priors (optional: any module that meets the contract works).

    :param latent_dim: the size of ``z``.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")

    def forward(self) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class StandardNormal(Prior):
    r"""The isotropic standard normal :math:`p(z) = \mathcal N(z; 0, I)`.

    :param latent_dim: the size of ``z``.

    Example::

        >>> StandardNormal(2)().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        # Buffers, so that ``.to(device)`` and ``.double()`` move them with the model.
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

r"""The :class:`VAE`: a prior, a variational family and a likelihood as one Pyro model and guide."""

from __future__ import annotations

import itertools
from typing import Any

import pyro
import pyro.distributions as dist
from pyro import poutine
import torch
from pyro.nn import PyroModule
from torch import nn

from ._checks import check_finite, check_positive_int
from .errors import ConfigError, DataError
from .families import check_requirements

__all__ = ["VAE"]

_instance_counter = itertools.count()


class VAE(PyroModule):
    r"""A deep latent variable model :math:`p(x) = \int p(x \mid z)\, p(z)\, dz` and its amortized guide.

    .. math::

        \text{model:}\quad z_n \sim p(z), \quad x_n \sim p(x \mid z_n), \qquad
        \text{guide:}\quad z_n \sim q(z \mid x_n), \qquad n \in \text{plate "data"}.

    Both :meth:`model` and :meth:`guide` put their sites inside
    ``pyro.plate("data", num_data, subsample=idx)``, so that any Pyro loss evaluated on a minibatch
    is an unbiased estimate of the loss on the whole data set (the minibatch log-densities are
    scaled by ``num_data / len(idx)``).

    :param prior: a module returning :math:`p(z)` (see :mod:`pyrovae.priors`).
    :param family: a module returning :math:`q(z \mid x)` (see :mod:`pyrovae.families`).
    :param likelihood: a module returning :math:`p(x \mid z)` (see :mod:`pyrovae.likelihoods`).
    :param num_data: the size of the training set, for the plate's scaling.

    Example::

        >>> from pyrovae import VAE, MLP, StandardNormal, DiagonalNormal, Bernoulli
        >>> vae = VAE(StandardNormal(2), DiagonalNormal(MLP(784, (64,), 64), 2),
        ...           Bernoulli(MLP(2, (64,), 784)), num_data=60000)
        >>> vae.sample(4).shape
        torch.Size([4, 784])
    """

    #: The model's nested plates (the ``"data"`` plate), for vectorized losses.
    max_plate_nesting: int = 1

    def __init__(
        self, prior: nn.Module, family: nn.Module, likelihood: nn.Module, num_data: int
    ) -> None:
        super().__init__()
        for name, part in (("prior", prior), ("family", family), ("likelihood", likelihood)):
            if not isinstance(part, nn.Module):
                raise ConfigError(
                    f"the {name} must be a torch.nn.Module (e.g. from pyrovae.{name}s"
                    f"{'' if name != 'family' else ''}), got {type(part).__name__}"
                )
        self.prior = prior
        self.family = family
        self.likelihood = likelihood
        # What the prior needs from the family is declared (``prior.requires``); a prior built
        # on the family (``prior.uses_family``, e.g. the VampPrior) is handed it.
        check_requirements(prior, family)
        if getattr(prior, "uses_family", False):
            prior.attach(family)
        self.num_data = check_positive_int(num_data, "num_data")
        latent_dims = {
            n: getattr(p, "latent_dim", None) for n, p in (("prior", prior), ("family", family))
        }
        if None not in latent_dims.values() and len(set(latent_dims.values())) > 1:
            raise ConfigError(
                f"the prior's latent_dim ({latent_dims['prior']}) differs from the family's "
                f"({latent_dims['family']}); build both with the same latent_dim"
            )
        # A per-instance name in Pyro's global param store, so that two VAEs in one process never
        # share parameters (plain pyro.infer.SVI finds the parameters through these sites).
        self._param_name = f"pyrovae_vae_{next(_instance_counter)}"

    # ------------------------------------------------------------------ Pyro program
    def _plate(self, x: torch.Tensor, idx: torch.Tensor | None) -> pyro.plate:
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        return pyro.plate("data", self.num_data, subsample=idx)

    def model(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> torch.Tensor:
        r"""The generative model: ``z ~ prior``, ``x ~ likelihood(z)`` in plate ``"data"``.

        Registers the parameters as Pyro ``param`` sites (``pyro.module``), so that plain
        ``pyro.infer.SVI`` finds them. This program (or a subclass's rewrite of it) is what
        :func:`pyrovae.fit` trains and every estimator scores (see :mod:`pyrovae.fastpath`).

        :param x: observed batch, shape ``(batch, num_features)``.
        :param idx: the batch's indices in the training set, shape ``(batch,)`` (default:
            ``arange(batch)``; only the count matters to the plate's scale).
        :param kl_weight: :math:`\beta`, the scale of the ``"z"`` site here and in the guide, so
            that the ELBO becomes :math:`E_q[\log p(x|z)] - \beta\,KL(q\|p)` (beta-VAE, KL
            warm-up; Pyro's DMM example passes it as ``annealing_factor``). Losses forward it.
        :returns: the latent sample ``z``, shape ``(batch, latent_dim)``.
        """
        pyro.module(self._param_name, self)
        data = self._plate(x, idx)
        with data, poutine.scale(scale=kl_weight):
            z = pyro.sample("z", self.prior())
        with data:
            pyro.sample("x", self.likelihood(z), obs=x)
        return z

    def guide(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> torch.Tensor:
        r"""The amortized guide: ``z ~ family(x, idx)`` in plate ``"data"``.

        :param x: observed batch, shape ``(batch, num_features)``.
        :param idx: the batch's indices in the training set, shape ``(batch,)``.
        :param kl_weight: the scale of the ``"z"`` site, as in :meth:`model`.
        :returns: the latent sample ``z``, shape ``(batch, latent_dim)``.
        """
        pyro.module(self._param_name, self)
        with self._plate(x, idx) as i, poutine.scale(scale=kl_weight):
            return pyro.sample("z", self.family(x, i))

    # ------------------------------------------------------------------ conveniences
    @property
    def latent_dim(self) -> int:
        return int(getattr(self.prior, "latent_dim", getattr(self.family, "latent_dim", 0)))

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device, t.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """Draw ``x`` from the model: ``z ~ p(z)`` then the likelihood's mean (or a sample).

        :returns: shape ``(num_samples, num_features)``.
        """
        check_positive_int(num_samples, "num_samples")
        z = self.prior().sample((num_samples,))
        return _mean_or_sample(self.likelihood(z), mean)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """Encode ``x`` (one draw ``z ~ q(z|x)``) and decode it (the likelihood's mean).

        :param x: shape ``(batch, num_features)``.
        :returns: shape ``(batch, num_features)``.
        """
        z = self.family(x, torch.arange(x.shape[0], device=x.device)).sample()
        return _mean_or_sample(self.likelihood(z), mean)

    @torch.no_grad()
    def check_data(self, x: torch.Tensor, what: str = "data", *, support: bool = True) -> None:
        """Check that a batch fits this model: 2-D, finite, the decoder's size, in the support.

        Raises :class:`~pyrovae.errors.DataError` naming the problem and the fix. With
        ``support=False`` the support is left to the caller (who counts it over a whole data set
        with :meth:`count_outside_support`).
        """
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise DataError(
                f"{what} must have shape (num_datapoints, num_features), got {tuple(x.shape)}; "
                "flatten images with x.reshape(len(x), -1)"
            )
        if x.shape[0] == 0:
            raise DataError(f"{what} is empty; pass at least one datapoint")
        device, dtype = self._device_dtype()
        if not x.is_floating_point():
            raise DataError(f"{what} must be floating point, got {x.dtype}; use x.to({dtype})")
        if x.dtype != dtype:
            raise DataError(
                f"{what} is {x.dtype} but the model's parameters are {dtype}; convert the data "
                f"with x.to({dtype}) (or the model with vae.to({x.dtype}))"
            )
        if x.device != device:
            raise DataError(
                f"{what} is on {x.device} but the model is on {device}; move one with .to()"
            )
        check_finite(x, what)
        px = self._probe_likelihood()  # one draw from the prior (the same as every check before)
        event_shape = tuple(px.event_shape)
        if tuple(x.shape[1:]) != event_shape:
            raise DataError(
                f"{what} has {tuple(x.shape[1:])} features per datapoint but the decoder produces "
                f"{event_shape}; build the decoder with out_dim={x.shape[1]}"
            )
        if support:
            bad = self.count_outside_support(x, px)
            if bad:
                raise self.support_error(bad, what, px)

    def _probe_likelihood(self) -> Any:
        return self.likelihood(self.prior().sample((1,)))

    @torch.no_grad()
    def count_outside_support(self, x: torch.Tensor, px: Any = None) -> int:
        """How many rows of ``x`` ``(batch, D)`` lie outside the likelihood's support (``px``: a
        likelihood distribution already at hand, else one is made from a prior draw)."""
        px = self._probe_likelihood() if px is None else px
        ok = px.support.check(x.to(self._device_dtype()[1]))
        # An event constraint (e.g. independent) already reduces over the event dims.
        while ok.dim() > 1:
            ok = ok.all(-1)
        return int((~ok).sum())

    def support_error(self, bad: int, what: str = "data", px: Any = None) -> DataError:
        """The error for ``bad`` datapoints of ``what`` outside the likelihood's support."""
        support = (self._probe_likelihood() if px is None else px).support
        binary = getattr(support, "base_constraint", None) is dist.constraints.boolean
        hint = (
            "binarize it first (e.g. binarize='dynamic' in pyrovae.data, or torch.bernoulli(x)), "
            "or keep its grey values with a continuous likelihood (ContinuousBernoulli or "
            "Gaussian)"
            if binary
            else "rescale it or choose a likelihood whose support contains it"
        )
        return DataError(
            f"{bad} datapoint(s) of {what} lie outside the support of the likelihood "
            f"{type(self.likelihood).__name__} ({support}); {hint}"
        )

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, latent_dim={self.latent_dim}"


def _mean_or_sample(d: Any, mean: bool) -> torch.Tensor:
    if mean:
        try:
            return d.mean
        except NotImplementedError:
            pass
    return d.sample()

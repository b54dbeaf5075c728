r"""The :class:`VAE`: a prior, a variational family and a likelihood as one Pyro model and guide."""

from __future__ import annotations

import inspect
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
        ``pyro.infer.SVI`` finds them; :meth:`_model` is the same program without that.

        :param x: observed batch, shape ``(batch, num_features)``.
        :param idx: the batch's indices in the training set, shape ``(batch,)`` (default:
            ``arange(batch)``; only the count matters to the plate's scale).
        :param kl_weight: :math:`\beta`, the scale of the ``"z"`` site here and in the guide, so
            that the ELBO becomes :math:`E_q[\log p(x|z)] - \beta\,KL(q\|p)` (beta-VAE, KL
            warm-up; Pyro's DMM example passes it as ``annealing_factor``). Losses forward it.
        :returns: the latent sample ``z``, shape ``(batch, latent_dim)``.
        """
        pyro.module(self._param_name, self)
        return self._model(x, idx, kl_weight=kl_weight)

    def _model(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> torch.Tensor:
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
        return self._guide(x, idx, kl_weight=kl_weight)

    def _guide(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> torch.Tensor:
        with self._plate(x, idx) as i, poutine.scale(scale=kl_weight):
            return pyro.sample("z", self.family(x, i))

    # ------------------------------------------------------------------ the ELBO without tracing
    def runs_own_program(self) -> bool:
        """Whether :meth:`model` and :meth:`guide` are the VAE's own (a subclass or an instance
        that rewrites them, e.g. to add a site, has a program only Pyro's tracing evaluates)."""
        names = ("model", "_model", "guide", "_guide", "_plate")
        cls = type(self)
        return all(getattr(cls, n) is getattr(VAE, n) for n in names) and not any(
            n in vars(self) for n in names
        )

    def trace_elbo_loss(
        self, x: torch.Tensor, idx: torch.Tensor, *, kl_weight: float = 1.0
    ) -> torch.Tensor | None:
        r"""The loss that ``Trace_ELBO().differentiable_loss(vae._model, vae._guide, x, idx,
        kl_weight=w)`` computes, evaluated straight from the parts.

        With :math:`s = N/B` (the data plate's subsample scale) and one draw
        :math:`z_i \sim q(z \mid x_i)` per row (the same single ``rsample`` the guide makes, so
        the same draw for the same RNG state):

        .. math::

            \hat{\mathcal L} = -\Big(s\,w \sum_i \log p(z_i) + s \sum_i \log p(x_i \mid z_i)
            - s\,w \sum_i \log q(z_i \mid x_i)\Big),

        the value and the gradient of Pyro's one-particle ``Trace_ELBO`` for this program (its
        ``"z"`` site scaled by :math:`s\,w`, its ``"x"`` site by :math:`s`), without running
        Pyro's tracing: :func:`pyrovae.fit` uses it for the default loss, where tracing is
        about a quarter of a small model's forward pass.

        Each part's log-density comes from its closed form where the part has one (a family's
        ``rsample_and_log_prob``, a prior's or a likelihood's ``log_prob``; see the contracts in
        :mod:`pyrovae.families`, :mod:`pyrovae.priors`, :mod:`pyrovae.likelihoods`), else from
        its distribution, broadcast over the plate as Pyro does. The closed forms skip building
        ``torch.distributions`` objects, about 0.4 ms of fixed cost per training step; they
        give ``Trace_ELBO``'s value and gradients to float rounding. A test checks value and
        gradients against ``Trace_ELBO`` for every prior x family x likelihood, in float64.

        :returns: the loss (a scalar), or ``None`` if this family's :math:`q(z \mid x)` has no
            reparameterized sampler (``Trace_ELBO`` would add a score-function term).
        """
        # Pyro's order: the guide's draw, the model's prior and decoder, then the log-densities
        # (model sites, then the guide's); a distribution is broadcast over the plate (expand),
        # as the plate does.
        batch = torch.Size((x.shape[0],))
        draw = _closed_form(self.family, "rsample_and_log_prob", 2,
                            ("forward", "distribution_from_params"))
        if draw is not None:
            z, log_q = draw(x, idx)
        else:
            q = self.family(x, idx).expand(batch)
            if not q.has_rsample:
                return None
            z = q.rsample()
            log_q = None
        prior_log_prob = _closed_form(self.prior, "log_prob", 1, ("forward",))
        log_pz = prior_log_prob(z) if prior_log_prob is not None else (
            self.prior().expand(batch).log_prob(z)
        )
        likelihood_log_prob = _closed_form(self.likelihood, "log_prob", 2, ("forward",))
        log_px = likelihood_log_prob(x, z) if likelihood_log_prob is not None else (
            self.likelihood(z).expand(batch).log_prob(x)
        )
        if log_q is None:
            log_q = q.log_prob(z)
        # Per row log p(x|z) + w (log p(z) - log q(z|x)), summed, times -N/B: four small ops
        # (Pyro scales and sums each site apart, nine).
        kl = log_pz - log_q
        per_row = log_px + (kl if kl_weight == 1.0 else kl_weight * kl)
        return per_row.sum() * (-self.num_data / x.shape[0])

    def importance_log_weights(
        self, x: torch.Tensor, idx: torch.Tensor, num_samples: int
    ) -> torch.Tensor:
        r"""Log importance weights :math:`w_k = \log p(x, z_k) - \log q(z_k \mid x)`, ``z_k ~
        q(z|x)``, shape ``(num_samples, batch)``: what the estimators compute by tracing the
        guide under a particle plate and replaying the model against it, straight from the
        parts' distributions (each broadcast to ``(num_samples, batch)`` as the two plates
        broadcast it; the same draw for the same RNG state; unscaled log-densities summed in the
        traced order, so the weights agree to the bit, as a test checks for every combination).
        """
        batch = torch.Size((num_samples, x.shape[0]))
        q = self.family(x, idx).expand(batch)
        z = q.rsample() if q.has_rsample else q.sample()
        pz = self.prior().expand(batch)
        px = self.likelihood(z).expand(batch)
        w = torch.zeros(batch, dtype=x.dtype, device=x.device)
        return w + pz.log_prob(z) - q.log_prob(z) + px.log_prob(x)

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
            "binarize it first (e.g. binarize='dynamic' in pyrovae.data, or torch.bernoulli(x))"
            if binary
            else "rescale it or choose a likelihood whose support contains it"
        )
        return DataError(
            f"{bad} datapoint(s) of {what} lie outside the support of the likelihood "
            f"{type(self.likelihood).__name__} ({support}); {hint}"
        )

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, latent_dim={self.latent_dim}"


#: (class, method, arguments, the methods it stands in for) -> whether it applies (a class's
#: methods are not expected to change at run time).
_CLOSED_FORMS: dict[tuple[type, str, int, tuple[str, ...]], bool] = {}


def _defines_closed_form(cls: type, name: str, arity: int, stands_in_for: tuple[str, ...]) -> bool:
    """Whether class ``cls`` has a method ``name`` taking ``arity`` positional arguments,
    defined by the class that defines each of ``stands_in_for`` or by a subclass of it (so a
    subclass that overrides ``forward`` does not inherit a closed form of its parent's
    distribution, and a method of that name with another signature is not mistaken for one).
    Memoized in a plain dict, which ``torch.compile`` traces (it warns about
    ``functools.lru_cache``)."""
    key = (cls, name, arity, stands_in_for)
    found = _CLOSED_FORMS.get(key)
    if found is None:
        found = _CLOSED_FORMS[key] = _find_closed_form(cls, name, arity, stands_in_for)
    return found


def _find_closed_form(cls: type, name: str, arity: int, stands_in_for: tuple[str, ...]) -> bool:
    def owner(attr: str) -> type | None:
        return next((c for c in cls.__mro__ if attr in vars(c)), None)

    own = owner(name)
    method = getattr(cls, name, None)
    if own is None or not inspect.isfunction(method):
        return False
    try:
        inspect.signature(method).bind(*([None] * (arity + 1)))  # self and the arguments
    except TypeError:
        return False
    return all((o := owner(a)) is None or issubclass(own, o) for a in stands_in_for)


def _closed_form(part: nn.Module, name: str, arity: int, stands_in_for: tuple[str, ...]) -> Any:
    """``part``'s closed-form method ``name`` (bound), or ``None`` where the part has none, or
    where the method might not match the part's distribution (see :func:`_defines_closed_form`;
    an instance attribute overriding any of the methods also disables it)."""
    if not _defines_closed_form(type(part), name, arity, stands_in_for):
        return None
    attrs = vars(part)
    if name in attrs or any(a in attrs for a in stands_in_for):
        return None
    return getattr(part, name)


def _mean_or_sample(d: Any, mean: bool) -> torch.Tensor:
    if mean:
        try:
            return d.mean
        except NotImplementedError:
            pass
    return d.sample()

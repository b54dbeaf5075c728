r"""Priors :math:`p(z)`.

Contract: a prior is a :class:`torch.nn.Module` with an integer attribute ``latent_dim``; called
with no arguments it returns a :class:`~pyro.distributions.Distribution` with
``event_shape == (latent_dim,)`` and ``batch_shape == ()``. The :class:`~pyrovae.VAE` puts it
inside the ``"data"`` plate, which broadcasts it over the minibatch (and over vectorized particles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from ._checks import check_positive_float, check_positive_int
from .splines import SplineAutoregressive
from .errors import ConfigError

__all__ = [
    "Prior",
    "StandardNormal",
    "LearnedNormal",
    "MixtureOfGaussians",
    "VampPrior",
    "FlowPrior",
    "flow_prior",
]


class Prior(nn.Module):
    """Base class of priors (optional: any module that meets the contract works).

    :param latent_dim: the size of ``z``.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")

    def forward(self) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class DiagonalNormalMixture(dist.MixtureSameFamily):
    r"""A mixture of diagonal Gaussians whose ``log_prob`` costs two matrix products.

    :math:`\log \mathcal N(z; \mu_c, \mathrm{diag}\,\sigma_c^2)` for every row ``z`` and
    component ``c`` expands into :math:`-\tfrac12 (z^2 \cdot \sigma_c^{-2} - 2 z \cdot \mu_c
    \sigma_c^{-2} + \mu_c^2 \cdot \sigma_c^{-2}) - \sum_d \log \sigma_{cd} - \tfrac D2 \log 2\pi`,
    i.e. ``(rows, D) @ (D, C)`` products instead of a ``(rows, C, D)`` tensor: for the VampPrior's
    500 components this is ~20x faster than :class:`~pyro.distributions.MixtureSameFamily` and
    needs no ``rows x C x D`` memory. The quadratic form is accumulated in float64 (its three
    terms are large and cancel when the component scales are small). Sampling is inherited.

    :param logits: mixture logits, shape ``(C,)``.
    :param loc, scale: component parameters, shape ``(C, D)``.
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
        self._loc, self._scale = loc, scale

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        new = self._get_checked_instance(DiagonalNormalMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        num_components = self._loc.shape[0]
        dist.MixtureSameFamily.__init__(
            new,
            self.mixture_distribution.expand(batch_shape),
            self.component_distribution.expand(batch_shape + (num_components,)),
            validate_args=False,
        )
        new._loc, new._scale = self._loc, self._scale
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self._loc.double(), self._scale.double()
        z = value.double()
        precision = scale.pow(-2)  # (C, D)
        quad = (
            z.pow(2) @ precision.T
            - 2 * z @ (loc * precision).T
            + (loc.pow(2) * precision).sum(-1)
        )  # (..., C)
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_weights = torch.log_softmax(self.mixture_distribution.logits.double(), -1)
        out = torch.logsumexp(log_weights - log_norm - 0.5 * quad, -1)
        return out.to(value.dtype)


def _diagonal_mixture(logits: torch.Tensor, components: dist.Distribution) -> dist.Distribution:
    """``MixtureSameFamily``, through :class:`DiagonalNormalMixture` when the components are
    ``Independent(Normal)`` with one batch dimension (the mixture's)."""
    base = getattr(components, "base_dist", None)
    if (
        isinstance(components, dist.Independent)
        and components.reinterpreted_batch_ndims == 1
        and type(base) in (dist.Normal, torch.distributions.Normal)
        and len(components.batch_shape) == 1
    ):
        return DiagonalNormalMixture(logits, base.loc, base.scale)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


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


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class LearnedNormal(Prior):
    r"""A diagonal Gaussian with learnable location and scale, :math:`p(z) = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)`.

    :math:`\sigma = \mathrm{softplus}(\rho) + \sigma_{\min}`; starts at :math:`\mathcal N(0, I)`.

    :param latent_dim: the size of ``z``.
    :param min_scale: a floor on :math:`\sigma`.
    """

    def __init__(self, latent_dim: int, *, min_scale: float = 1e-4) -> None:
        super().__init__(latent_dim)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.raw_scale = nn.Parameter(
            _inverse_softplus(torch.full((self.latent_dim,), 1.0 - self.min_scale))
        )

    @property
    def scale(self) -> torch.Tensor:
        """:math:`\\sigma`, shape ``(latent_dim,)``."""
        return F.softplus(self.raw_scale) + self.min_scale

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixtureOfGaussians(Prior):
    r"""A learnable mixture of diagonal Gaussians.

    .. math::

        p(z) = \sum_{c=1}^C \pi_c\, \mathcal N(z; \mu_c, \mathrm{diag}\,\sigma_c^2), \qquad
        \pi = \mathrm{softmax}(\text{logits}),\ \sigma_c = \mathrm{softplus}(\rho_c) + \sigma_{\min}.

    The weights start equal, the locations at :math:`\mathcal N(0, I)` draws (so the components
    differ), the scales at 1. Built on :class:`pyro.distributions.MixtureSameFamily`.

    :param latent_dim: the size of ``z``.
    :param num_components: :math:`C`.
    :param min_scale: a floor on :math:`\sigma_c`.
    """

    def __init__(self, latent_dim: int, num_components: int, *, min_scale: float = 1e-4) -> None:
        super().__init__(latent_dim)
        self.num_components = check_positive_int(num_components, "num_components")
        self.min_scale = check_positive_float(min_scale, "min_scale")
        c, n = self.num_components, self.latent_dim
        self.logits = nn.Parameter(torch.zeros(c))
        self.locs = nn.Parameter(torch.randn(c, n))
        self.raw_scales = nn.Parameter(_inverse_softplus(torch.full((c, n), 1.0 - self.min_scale)))

    def forward(self) -> dist.Distribution:
        scales = F.softplus(self.raw_scales) + self.min_scale
        return DiagonalNormalMixture(self.logits, self.locs, scales)


class VampPrior(Prior):
    r"""The VampPrior (Tomczak & Welling 2018): the aggregate posterior at learned pseudo-inputs.

    .. math::

        p(z) = \frac1K \sum_{k=1}^K q(z \mid u_k), \qquad u_k = a + (b - a)\,\mathrm{sigmoid}(\rho_k),

    where :math:`q` is the VAE's own (amortized) variational family, encoder included, and
    :math:`u_k \in (a, b)^D` are ``num_pseudo_inputs`` learnable pseudo-inputs (``bounds=(a, b)``,
    ``(0, 1)`` for images; ``bounds=None`` leaves them unconstrained, :math:`u_k = \rho_k`).

    The family is given either here or by :class:`~pyrovae.VAE`, which calls
    :meth:`attach` with its family. The prior does not own the family's parameters (they stay
    the VAE's ``family``), so nothing is counted twice in ``state_dict``. Any amortized family
    whose ``log_prob`` works at arbitrary points can be used (diagonal, full-rank, IAF, spline,
    Householder; planar and radial flows have no inverse and are rejected).

    :param num_pseudo_inputs: :math:`K`.
    :param num_features: :math:`D`, the data size.
    :param family: the variational family (optional; else set by :meth:`attach`).
    :param init: optional initial pseudo-inputs, shape ``(K, D)`` (e.g. random training data);
        default: :math:`u_k` near the middle of the bounds plus small noise.
    :param bounds: the open interval the pseudo-inputs live in, or ``None``.
    """

    def __init__(
        self,
        num_pseudo_inputs: int,
        num_features: int,
        *,
        family: nn.Module | None = None,
        init: torch.Tensor | None = None,
        bounds: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        nn.Module.__init__(self)
        self.num_pseudo_inputs = check_positive_int(num_pseudo_inputs, "num_pseudo_inputs")
        self.num_features = check_positive_int(num_features, "num_features")
        if bounds is not None:
            lo, hi = (float(b) for b in bounds)
            if not lo < hi:
                raise ConfigError(f"bounds must be (low, high) with low < high, got {bounds!r}")
            self.bounds: tuple[float, float] | None = (lo, hi)
        else:
            self.bounds = None
        shape = (self.num_pseudo_inputs, self.num_features)
        if init is None:
            raw = 0.1 * torch.randn(shape)
        else:
            init = torch.as_tensor(init, dtype=torch.get_default_dtype())
            if tuple(init.shape) != shape:
                raise ConfigError(
                    f"init must have shape (num_pseudo_inputs, num_features) = {shape}, "
                    f"got {tuple(init.shape)}"
                )
            if self.bounds is None:
                raw = init.clone()
            else:
                lo, hi = self.bounds
                raw = torch.logit(((init - lo) / (hi - lo)).clamp(0.01, 0.99))
        self.raw_pseudo_inputs = nn.Parameter(raw)
        self._family: tuple[nn.Module, ...] = ()
        if family is not None:
            self.attach(family)

    @property
    def latent_dim(self) -> int | None:  # type: ignore[override]
        """The family's ``latent_dim`` (``None`` before :meth:`attach`)."""
        return getattr(self._family[0], "latent_dim", None) if self._family else None

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """:math:`u`, shape ``(num_pseudo_inputs, num_features)``."""
        if self.bounds is None:
            return self.raw_pseudo_inputs
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.sigmoid(self.raw_pseudo_inputs)

    def attach(self, family: nn.Module) -> None:
        """Use ``family`` as :math:`q` (called by :class:`~pyrovae.VAE` with its family).

        Raises :class:`~pyrovae.errors.ConfigError` if the family is not amortized or cannot
        evaluate its density at arbitrary points.
        """
        if not isinstance(family, nn.Module) or not getattr(family, "amortized", True):
            raise ConfigError(
                f"the VampPrior needs an amortized family (an encoder to evaluate q(z|u)), got "
                f"{type(family).__name__}; use e.g. DiagonalNormal"
            )
        # Kept out of the module tree: the family's parameters belong to the VAE.
        self._family = (family,)
        try:
            with torch.no_grad():
                p = self()
                p.log_prob(p.sample((2,)).clone())
        except (NotImplementedError, KeyError) as exc:
            self._family = ()
            raise ConfigError(
                f"the VampPrior needs log q(z|u) at arbitrary z, which {type(family).__name__} "
                f"cannot give ({type(exc).__name__}); use a family with an inverse "
                "(diagonal, full-rank, IAF, spline, Householder)"
            ) from None

    def forward(self) -> dist.Distribution:
        if not self._family:
            raise ConfigError(
                "this VampPrior has no family yet; pass family=... or build a VAE with it"
            )
        components = self._family[0](self.pseudo_inputs, None)
        u = self.raw_pseudo_inputs
        logits = torch.zeros(self.num_pseudo_inputs, device=u.device, dtype=u.dtype)
        return _diagonal_mixture(logits, components)


class FlowPrior(Prior):
    r"""A standard normal pushed through learnable transforms, as a ``TransformedDistribution``.

    With ``inverse=False`` the transforms :math:`f_1..f_K` map in the sampling direction,
    :math:`z = f_K \circ \dots \circ f_1(\varepsilon)`, :math:`\varepsilon \sim \mathcal N(0, I)`,
    and ``log_prob`` inverts them. With ``inverse=True`` they map in the density direction,
    :math:`\varepsilon = f_K \circ \dots \circ f_1(z)`,

    .. math::

        \log p(z) = \log \mathcal N(\varepsilon; 0, I) + \sum_k \log\left|\det
        \frac{\partial f_k}{\partial \cdot}\right|,

    so that ``log_prob`` (what the ELBO needs at every step) costs one pass of autoregressive
    transforms (a masked autoregressive flow, Papamakarios et al. 2017), and only sampling
    inverts them.

    :param latent_dim: the size of ``z``.
    :param transforms: Pyro transform modules on ``latent_dim``-vectors, e.g.
        ``pyro.distributions.transforms.spline_autoregressive(latent_dim)``; they need an inverse.
    :param inverse: the direction, see above.
    """

    def __init__(
        self, latent_dim: int, transforms: Sequence[nn.Module], *, inverse: bool = False
    ) -> None:
        super().__init__(latent_dim)
        transforms = list(transforms)
        if not transforms or not all(isinstance(t, nn.Module) for t in transforms):
            raise ConfigError(
                "FlowPrior needs a non-empty list of transform modules, e.g. "
                "[pyro.distributions.transforms.affine_autoregressive(latent_dim)]"
            )
        self.transforms = nn.ModuleList(transforms)
        self.inverse = bool(inverse)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        if self.inverse:
            transforms = [t.inv for t in reversed(self.transforms)]
        else:
            transforms = list(self.transforms)
        return dist.TransformedDistribution(base, transforms)


def flow_prior(
    latent_dim: int,
    num_transforms: int = 2,
    kind: str = "affine_autoregressive",
    hidden_dims: Sequence[int] | None = None,
) -> FlowPrior:
    """A :class:`FlowPrior` in the density direction (fast ``log_prob``) from a transform name.

    :param kind: ``"affine_autoregressive"`` (MAF) or ``"spline_autoregressive"``.
    :param num_transforms: how many steps; autoregressive steps alternate the variable order.
    """
    check_positive_int(latent_dim, "latent_dim")
    check_positive_int(num_transforms, "num_transforms")
    if latent_dim < 2:
        raise ConfigError("an autoregressive flow prior needs latent_dim >= 2")
    hidden = list(hidden_dims) if hidden_dims is not None else [max(2 * latent_dim, 8)]
    steps: list[nn.Module] = []
    for k in range(num_transforms):
        order = torch.arange(latent_dim)
        if k % 2:
            order = order.flip(0)
        if kind == "affine_autoregressive":
            arn = AutoRegressiveNN(latent_dim, hidden, permutation=order)
            steps.append(T.AffineAutoregressive(arn))
        elif kind == "spline_autoregressive":
            count_bins = 8
            arn = AutoRegressiveNN(
                latent_dim,
                hidden,
                param_dims=[count_bins, count_bins, count_bins - 1],
                permutation=order,
            )
            steps.append(
                SplineAutoregressive(latent_dim, arn, count_bins=count_bins)
            )
        else:
            raise ConfigError(
                f"unknown flow prior kind {kind!r}; use 'affine_autoregressive' or "
                "'spline_autoregressive'"
            )
    return FlowPrior(latent_dim, steps, inverse=True)

r"""Variational families :math:`q(z \mid x)` with their encoders (the amortized guide).

Contract: a family is a :class:`torch.nn.Module` with an integer attribute ``latent_dim``;
``family(x, idx)`` takes a batch ``x`` of shape ``(batch, num_features)`` and the batch's indices
``idx`` in the data set (shape ``(batch,)``; amortized families ignore them, per-datapoint families
use them) and returns a reparameterizable distribution with ``batch_shape == (batch,)`` and
``event_shape == (latent_dim,)``.

The families shipped here also split that call in two, so that other code can reuse the pieces:

``features(x) -> h``
    the encoder's output, shape ``(batch, feature_dim)`` (amortized families only). A
    :class:`Flow` conditions its transforms on ``h``, so the encoder runs once per call.
``local_params(x, idx) -> dict[str, Tensor]``
    the **per-datapoint variational parameters** of the batch, each of shape ``(batch, ...)``,
    all *unconstrained* (e.g. a raw scale that goes through ``softplus``), so that a gradient
    optimizer can move them freely.
``distribution_from_params(params) -> Distribution``
    the distribution those parameters describe (batch shape ``params[...].shape[:1]``).

``family(x, idx) == family.distribution_from_params(family.local_params(x, idx))``.

Optional closed form (declared in the class attribute ``closed_forms``; used by the direct
training loss of :mod:`pyrovae.fastpath` where proven equal to Pyro's at run time):

``rsample_and_log_prob(x, idx) -> (z, log_q)``
    one reparameterized draw ``z`` of shape ``(batch, latent_dim)`` and its log-density, shape
    ``(batch,)``, computed from the draw's noise (for a Gaussian, :math:`z = \mu + L\epsilon`
    and :math:`\log q = -\tfrac12\|\epsilon\|^2 - \log|\det L| - \tfrac D2 \log 2\pi`)
    without building distribution objects. It must draw the same noise from the same RNG state
    as ``family(x, idx).rsample()`` and give the same values to float rounding. A subclass
    inherits the declaration; if it changes the distribution, the run-time proof fails and the
    closed form is not used (a :class:`~pyrovae.errors.FastPathWarning` says so).

The
amortization-gap analysis of Cremer et al. (2018) optimizes each datapoint's own parameters from
the encoder's output with the decoder fixed::

    params = {k: v.detach().requires_grad_() for k, v in family.local_params(x).items()}
    q = family.distribution_from_params(params)     # optimize params (encoder not used)

For a :class:`Flow` the per-datapoint parameters are the base family's parameters plus the
flow's context vector ``h`` (key ``"context"``); the flow's own networks stay shared.
:class:`Local` wraps any family into a non-amortized one holding such parameters for every
datapoint of a data set; :class:`LocalNormal` is a diagonal Gaussian per datapoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from ._checks import check_positive_float, check_positive_int
from ._densities import LOG_SQRT_2PI
from .splines import ConditionalSplineAutoregressive
from .errors import ConfigError, DataError

__all__ = [
    "Family",
    "CAPABILITIES",
    "capability",
    "check_requirements",
    "has_inverse",
    "DiagonalNormal",
    "FullRankNormal",
    "Flow",
    "LocalNormal",
    "Local",
    "iaf",
    "planar",
    "radial",
    "spline_autoregressive",
    "householder",
    "FLOW_TRANSFORMS",
]

Params = dict[str, torch.Tensor]


def _feature_dim(encoder: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is None:
        feature_dim = getattr(encoder, "out_features", None)
        if feature_dim is None:
            raise ConfigError(
                f"cannot tell the output size of encoder {type(encoder).__name__}; "
                "pass feature_dim=<size of the encoder's output>"
            )
    return check_positive_int(feature_dim, "feature_dim")


#: What each capability means, for error messages: "a family that ...".
CAPABILITIES: dict[str, str] = {
    "amortized": "has an encoder (is amortized)",
    "per_datapoint": "holds parameters per training datapoint",
    "log_prob_anywhere": "can evaluate log q(z|x) at any z (has an inverse)",
}
_DEFAULTS = {"amortized": True, "per_datapoint": False, "log_prob_anywhere": True}


def capability(family: nn.Module, name: str) -> bool:
    """Whether ``family`` declares capability ``name`` (one of :data:`CAPABILITIES`); a module
    that only meets the contract gets the defaults of :class:`Family`."""
    if name not in CAPABILITIES:
        raise ConfigError(f"unknown capability {name!r}; one of {sorted(CAPABILITIES)}")
    return bool(getattr(family, name, _DEFAULTS[name]))


def check_requirements(part: object, family: nn.Module) -> None:
    """Raise :class:`ConfigError` in one line if ``family`` lacks a capability that ``part``
    (a prior, a loss) declares in its ``requires``, naming it and a family that has it."""
    missing = [c for c in sorted(getattr(part, "requires", ())) if not capability(family, c)]
    if missing:
        needs = " and ".join(CAPABILITIES[c] for c in missing)
        raise ConfigError(
            f"{type(part).__name__} needs a variational family that {needs}, which "
            f"{_describe(family)} does not; use DiagonalNormal, FullRankNormal or a Flow with "
            "iaf, spline or householder steps (CLI: --family diagonal|full_rank|iaf|spline|"
            "householder)"
        )


def _describe(family: nn.Module) -> str:
    if isinstance(family, Flow):
        steps = sorted({type(t).__name__ for t in family.transforms if not has_inverse(t)})
        if steps:
            return f"a Flow with {', '.join(steps)} steps (no inverse)"
    return type(family).__name__


#: Transforms that map only in the sampling direction: their log-density is known only at their
#: own samples (Pyro caches the forward pass), so a flow using one cannot score an arbitrary z.
_WITHOUT_INVERSE: tuple[type, ...] = (
    T.Planar, T.ConditionalPlanar, ConditionedPlanar, T.Radial, T.ConditionalRadial,
    ConditionedRadial, T.Sylvester,
)


def has_inverse(transform: object) -> bool:
    """Whether a flow step can be inverted: its own ``has_inverse`` attribute if it declares one,
    else ``False`` for Pyro's planar, radial and Sylvester steps and ``True`` otherwise."""
    declared = getattr(transform, "has_inverse", None)
    if declared is not None:
        return bool(declared)
    return not isinstance(transform, _WITHOUT_INVERSE)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class Family(nn.Module):
    """Base class of variational families (optional: any module meeting the contract works).

    Subclasses implement :meth:`local_params` (amortized ones through :meth:`features` and
    :meth:`params_from_features`) and :meth:`distribution_from_params`; :meth:`forward` composes
    them.

    :param latent_dim: the size of ``z``.

    Capabilities are declared, never probed (:func:`capability` reads them, with the defaults
    below for modules that only meet the contract); a prior states what it needs from the
    family in ``requires`` and :class:`~pyrovae.VAE` refuses a family that lacks it:

    :cvar amortized: ``True`` when ``q(z|x)`` is computed from ``x`` by an encoder, so it can be
        evaluated at new inputs (a :class:`~pyrovae.priors.VampPrior`'s pseudo-inputs, test data).
    :cvar per_datapoint: ``True`` when the family holds parameters for each training datapoint,
        looked up by the batch's indices (:class:`LocalNormal`, :class:`Local`): it has none for
        other data.
    :cvar log_prob_anywhere: ``True`` when ``log q(z|x)`` can be evaluated at any ``z``, not only
        at the family's own samples (every family but flows without an inverse, such as planar
        and radial). The VampPrior, the sticking-the-landing and DReG gradients, and the
        aggregate posterior of :func:`~pyrovae.mutual_information` need it.
    """

    amortized: bool = True
    per_datapoint: bool = False
    log_prob_anywhere: bool = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features ``h``, shape ``(batch, feature_dim)``."""
        raise ConfigError(
            f"{type(self).__name__} has no encoder (it is not amortized); use an amortized "
            "family such as DiagonalNormal"
        )

    def params_from_features(self, h: torch.Tensor) -> Params:  # pragma: no cover - abstract
        """The variational parameters computed from features ``h`` of shape ``(batch, F)``."""
        raise NotImplementedError

    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> Params:
        """Per-datapoint unconstrained variational parameters of a batch, each ``(batch, ...)``."""
        return self.params_from_features(self.features(x))

    def distribution_from_params(self, params: Params) -> dist.Distribution:  # pragma: no cover
        """The distribution with batch shape ``(batch,)`` that ``params`` describe."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        return self.distribution_from_params(self.local_params(x, idx))


def _diagonal_normal(params: Params, min_scale: float) -> dist.Distribution:
    scale = F.softplus(params["raw_scale"]) + min_scale
    return dist.Normal(params["loc"], scale).to_event(1)


def _standard_normal_like(loc: torch.Tensor) -> torch.Tensor:
    """The noise ``torch.distributions`` draws for ``rsample`` of a (multivariate) normal with
    location ``loc`` (its ``_standard_normal``): the same numbers from the same RNG state."""
    return torch.empty_like(loc).normal_()


def _diagonal_normal_rsample(params: Params, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_diagonal_normal`'s ``rsample`` and its ``log_prob`` from the noise (closed form)."""
    loc = params["loc"]
    scale = F.softplus(params["raw_scale"]) + min_scale
    eps = _standard_normal_like(loc)
    z = loc + eps * scale
    log_q = -(0.5 * eps.square() + scale.log()).sum(-1) - loc.shape[-1] * LOG_SQRT_2PI
    return z, log_q


class _GaussianHeads(Family):
    """Shared part of the amortized Gaussian families: an encoder giving features ``h``, and two
    linear heads on ``h`` for the location and the raw scale parameters (``scale_size`` of them,
    under the local-parameter name ``scale_key``)."""

    scale_key = "raw_scale"

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        scale_size: int,
        feature_dim: int | None,
        min_scale: float,
    ) -> None:
        super().__init__(latent_dim)
        self.encoder = encoder
        self.feature_dim = _feature_dim(encoder, feature_dim)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        self.loc_head = nn.Linear(self.feature_dim, self.latent_dim)
        self.scale_head = nn.Linear(self.feature_dim, scale_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def params_from_features(self, h: torch.Tensor) -> Params:
        return {"loc": self.loc_head(h), self.scale_key: self.scale_head(h)}


class DiagonalNormal(_GaussianHeads):
    r"""Amortized diagonal Gaussian :math:`q(z \mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma(x)^2)`.

    The encoder maps ``x`` to features ``h`` of shape ``(batch, feature_dim)``; two linear heads
    give :math:`\mu(h)` and :math:`\sigma(h) = \mathrm{softplus}(\cdot) + \sigma_{\min}`.

    Local parameters: ``{"loc": (batch, latent_dim), "raw_scale": (batch, latent_dim)}`` with
    :math:`\sigma = \mathrm{softplus}(\text{raw\_scale}) + \sigma_{\min}`.

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

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("rsample_and_log_prob",)

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        *,
        feature_dim: int | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        latent_dim = check_positive_int(latent_dim, "latent_dim")
        super().__init__(encoder, latent_dim, latent_dim, feature_dim, min_scale)

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        return _diagonal_normal(params, self.min_scale)

    def rsample_and_log_prob(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One reparameterized draw :math:`z = \mu + \sigma \odot \epsilon` and
        :math:`\log q(z \mid x) = -\sum_d (\tfrac12 \epsilon_d^2 + \log \sigma_d) - \tfrac D2
        \log 2\pi`, shapes ``(batch, latent_dim)`` and ``(batch,)`` (the module docstring's
        closed form)."""
        return _diagonal_normal_rsample(self.local_params(x, idx), self.min_scale)


class FullRankNormal(_GaussianHeads):
    r"""Amortized full-covariance Gaussian :math:`q(z \mid x) = \mathcal N(\mu(x), L(x) L(x)^\top)`.

    Linear heads on the encoder's features give :math:`\mu` and the ``latent_dim * (latent_dim +
    1) / 2`` entries of the lower-triangular Cholesky factor :math:`L`; its diagonal goes through
    :math:`\mathrm{softplus}(\cdot) + \sigma_{\min}` so that it is positive.

    Local parameters: ``{"loc": (batch, latent_dim), "raw_scale_tril": (batch, latent_dim *
    (latent_dim + 1) // 2)}``, the raw lower triangle in ``torch.tril_indices`` order.

    :param encoder: module mapping ``(batch, num_features) -> (batch, feature_dim)``.
    :param latent_dim: the size of ``z``.
    :param feature_dim: the encoder's output size (read from ``encoder.out_features`` if omitted).
    :param min_scale: a floor on the diagonal of :math:`L`.
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("rsample_and_log_prob",)

    scale_key = "raw_scale_tril"

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        *,
        feature_dim: int | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        n = check_positive_int(latent_dim, "latent_dim")
        super().__init__(encoder, n, n * (n + 1) // 2, feature_dim, min_scale)
        self.register_buffer("tril_indices", torch.tril_indices(n, n), persistent=False)
        # Start as the diagonal family: with the default init, the n(n-1)/2 off-diagonal entries
        # of L would each be O(0.5), z's initial spread O(sqrt(n)), and training much slower.
        with torch.no_grad():
            rows, cols = self.tril_indices
            self.scale_head.weight[rows != cols] = 0.0
            self.scale_head.bias[rows != cols] = 0.0

    def scale_tril(self, raw_scale_tril: torch.Tensor) -> torch.Tensor:
        r"""``(..., n(n+1)/2) -> (..., n, n)``: the Cholesky factor :math:`L` from raw entries."""
        n = self.latent_dim
        rows, cols = self.tril_indices
        flat = raw_scale_tril.new_zeros(raw_scale_tril.shape[:-1] + (n * n,))
        raw = flat.index_add(-1, rows * n + cols, raw_scale_tril).unflatten(-1, (n, n))
        diag = F.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)) + self.min_scale
        return raw.tril(-1) + torch.diag_embed(diag)

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        return dist.MultivariateNormal(
            params["loc"], scale_tril=self.scale_tril(params["raw_scale_tril"])
        )

    def rsample_and_log_prob(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One reparameterized draw :math:`z = \mu + L\epsilon` and :math:`\log q(z \mid x) =
        -\tfrac12 \|\epsilon\|^2 - \sum_d \log L_{dd} - \tfrac D2 \log 2\pi`, shapes ``(batch,
        latent_dim)`` and ``(batch,)`` (the module docstring's closed form)."""
        params = self.local_params(x, idx)
        loc, tril = params["loc"], self.scale_tril(params["raw_scale_tril"])
        eps = _standard_normal_like(loc)
        z = loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        log_det = torch.diagonal(tril, dim1=-2, dim2=-1).log().sum(-1)
        log_q = -0.5 * eps.square().sum(-1) - log_det - loc.shape[-1] * LOG_SQRT_2PI
        return z, log_q


class _FlowDistribution(dist.TransformedDistribution):
    """A transformed distribution whose ``log_prob`` broadcasts its value against the batch shape
    first (conditional transforms cannot broadcast a value of a smaller batch shape against their
    context, which a mixture such as the VampPrior needs)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        n = len(self.event_shape)
        batch = value.shape[: value.dim() - n]
        shape = torch.broadcast_shapes(batch, self.batch_shape)
        if batch != shape:
            value = value.expand(shape + self.event_shape)
        return super().log_prob(value)


class Flow(Family):
    r"""A base family pushed through normalizing-flow transforms conditioned on the encoder's features.

    .. math::

        z_0 \sim q_0(z \mid x), \qquad z = f_K \circ \dots \circ f_1(z_0; h(x)), \qquad
        \log q(z \mid x) = \log q_0(z_0 \mid x) - \sum_k \log\left|\det \frac{\partial f_k}
        {\partial z_{k-1}}\right|,

    where :math:`h(x)` are the base family's features (its encoder runs once). The transforms map
    in the sampling direction; conditional ones (``pyro.distributions.transforms.conditional_*``)
    are conditioned on :math:`h`, plain ones are used as they are. Planar and radial flows have
    no inverse, so their ``log_prob`` works only on their own samples (as in the ELBO).

    Local parameters: the base family's, plus ``"context"``: :math:`h` of shape ``(batch,
    feature_dim)``. For gap analysis :math:`h` is thus a per-datapoint free parameter, while the
    flow's own networks (shared by all datapoints) stay as trained.

    :param base: an amortized family with ``features`` / ``params_from_features`` (e.g.
        :class:`DiagonalNormal`).
    :param transforms: transform modules, e.g. from :func:`iaf`, :func:`planar`.

    Example::

        >>> from pyrovae.nets import MLP
        >>> base = DiagonalNormal(MLP(784, (), 64, activate_output=True), latent_dim=8)
        >>> q = Flow(base, iaf(8, context_dim=64, num_transforms=2))
        >>> q(torch.zeros(5, 784)).rsample().shape
        torch.Size([5, 8])
    """

    def __init__(self, base: nn.Module, transforms: Sequence[nn.Module]) -> None:
        if not isinstance(base, Family) or not capability(base, "amortized"):
            raise ConfigError(
                f"the base of a Flow must be an amortized pyrovae family such as DiagonalNormal, "
                f"got {type(base).__name__}"
            )
        super().__init__(base.latent_dim)
        transforms = list(transforms)
        if not transforms:
            raise ConfigError("a Flow needs at least one transform, e.g. iaf(latent_dim, ...)")
        for t in transforms:
            if not isinstance(t, nn.Module):
                raise ConfigError(
                    f"Flow transforms must be modules (Pyro's TransformModule or "
                    f"ConditionalTransformModule), got {type(t).__name__}"
                )
        self.base = base
        self.transforms = nn.ModuleList(transforms)
        self.feature_dim = getattr(base, "feature_dim", None)

    @property
    def log_prob_anywhere(self) -> bool:  # type: ignore[override]
        """Whether every step has an inverse (planar and radial steps have none)."""
        return capability(self.base, "log_prob_anywhere") and all(
            has_inverse(t) for t in self.transforms
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    def params_from_features(self, h: torch.Tensor) -> Params:
        return {**self.base.params_from_features(h), "context": h}

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        context = params["context"]
        base = self.base.distribution_from_params(
            {k: v for k, v in params.items() if k != "context"}
        )
        transforms = [
            t.condition(context) if isinstance(t, ConditionalTransform) else t
            for t in self.transforms
        ]
        return _FlowDistribution(base, transforms)


# ---------------------------------------------------------------------- flow factories
def _check_flow_sizes(latent_dim: int, context_dim: int, num_transforms: int) -> None:
    check_positive_int(latent_dim, "latent_dim")
    check_positive_int(context_dim, "context_dim")
    check_positive_int(num_transforms, "num_transforms")


def _hidden(hidden_dims: Sequence[int] | None, latent_dim: int) -> list[int]:
    return list(hidden_dims) if hidden_dims is not None else [max(2 * latent_dim, 8)]


def iaf(
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 1,
    hidden_dims: Sequence[int] | None = None,
) -> list[nn.Module]:
    r"""Inverse autoregressive flow steps (Kingma et al. 2016), conditioned on a context.

    Each step is :math:`z' = \mu(z, h) + \sigma(z, h) \odot z` with an autoregressive network
    (``ConditionalAffineAutoregressive``); steps alternate the variable order (identity, reversed) so that every coordinate can depend on
    every other. Requires ``latent_dim >= 2``.
    """
    _check_flow_sizes(latent_dim, context_dim, num_transforms)
    if latent_dim < 2:
        raise ConfigError("an autoregressive flow needs latent_dim >= 2; use planar or radial")
    steps: list[nn.Module] = []
    for k in range(num_transforms):
        order = torch.arange(latent_dim)
        if k % 2:
            order = order.flip(0)
        arn = ConditionalAutoRegressiveNN(
            latent_dim, context_dim, _hidden(hidden_dims, latent_dim), permutation=order
        )
        steps.append(T.ConditionalAffineAutoregressive(arn))
    return steps


def planar(
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 1,
    hidden_dims: Sequence[int] | None = None,
) -> list[nn.Module]:
    r"""Planar flow steps :math:`z' = z + u\,\tanh(w^\top z + b)` (Rezende & Mohamed 2015), whose
    :math:`u, w, b` are computed from the context. No inverse (log_prob of own samples only)."""
    _check_flow_sizes(latent_dim, context_dim, num_transforms)
    return [
        T.conditional_planar(latent_dim, context_dim, _hidden(hidden_dims, latent_dim))
        for _ in range(num_transforms)
    ]


def radial(
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 1,
    hidden_dims: Sequence[int] | None = None,
) -> list[nn.Module]:
    r"""Radial flow steps :math:`z' = z + \beta h(\alpha, r)(z - z_0)` (Rezende & Mohamed 2015),
    parameters from the context. No inverse (log_prob of own samples only)."""
    _check_flow_sizes(latent_dim, context_dim, num_transforms)
    return [
        T.conditional_radial(latent_dim, context_dim, _hidden(hidden_dims, latent_dim))
        for _ in range(num_transforms)
    ]


def spline_autoregressive(
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 1,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
) -> list[nn.Module]:
    r"""Autoregressive rational-quadratic spline steps (Durkan et al. 2019) on ``[-bound, bound]``
    (identity outside), conditioned on the context. Requires ``latent_dim >= 2``."""
    _check_flow_sizes(latent_dim, context_dim, num_transforms)
    if latent_dim < 2:
        raise ConfigError("an autoregressive flow needs latent_dim >= 2; use planar or radial")
    check_positive_int(count_bins, "count_bins")
    check_positive_float(bound, "bound")
    return [
        ConditionalSplineAutoregressive(
            latent_dim,
            # Pyro's conditional_spline_autoregressive always asks for the 4 outputs of the
            # linear-order spline, so build the rational-quadratic one's network here.
            ConditionalAutoRegressiveNN(
                latent_dim,
                context_dim,
                _hidden(hidden_dims, latent_dim),
                param_dims=[count_bins, count_bins, count_bins - 1],
            ),
            count_bins=count_bins,
            bound=bound,
        )
        for _ in range(num_transforms)
    ]


def householder(
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 1,
    hidden_dims: Sequence[int] | None = None,
) -> list[nn.Module]:
    r"""Householder reflections :math:`z' = (I - 2 v v^\top / \|v\|^2) z` (Tomczak & Welling
    2016), :math:`v` from the context; volume preserving, so they rotate a diagonal base into a
    correlated one. ``num_transforms`` reflections in one module."""
    _check_flow_sizes(latent_dim, context_dim, num_transforms)
    if latent_dim < 2:
        raise ConfigError("a Householder flow needs latent_dim >= 2")
    return [
        T.conditional_householder(
            latent_dim, context_dim, _hidden(hidden_dims, latent_dim), num_transforms
        )
    ]


spline_autoregressive.options = ("count_bins",)  # type: ignore[attr-defined]

#: name -> factory ``(latent_dim, context_dim, num_transforms, hidden_dims, **options)`` of flow
#: steps; a factory's ``options`` attribute names the extra options it takes.
FLOW_TRANSFORMS: dict[str, Callable[..., list[nn.Module]]] = {
    "iaf": iaf,
    "planar": planar,
    "radial": radial,
    "spline": spline_autoregressive,
    "householder": householder,
}


# ---------------------------------------------------------------------- non-amortized families
def _check_idx(idx: torch.Tensor | None, num_data: int, what: str) -> torch.Tensor:
    if idx is None:
        raise DataError(
            f"{what} keeps parameters per datapoint and needs the batch's indices idx; "
            "call it as family(x, idx)"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_data):
        raise DataError(
            f"{what} was built for {num_data} datapoints but got index {int(idx.max())}; "
            f"build it with num_data >= {int(idx.max()) + 1}"
        )
    return idx


class LocalNormal(Family):
    r"""Non-amortized diagonal Gaussian: free parameters :math:`\mu_n, \sigma_n` for every datapoint.

    :math:`q(z_n) = \mathcal N(\mu_n, \mathrm{diag}\,\sigma_n^2)`, looked up by the batch's
    indices ``idx`` (``x`` is ignored). For encoder-free SVI and for the optimal
    per-datapoint posterior :math:`q^*` of gap analysis. The means start at 0, the scales at
    ``init_scale``.

    Local parameters: ``{"loc", "raw_scale"}`` rows ``idx`` of the tables, as
    :class:`DiagonalNormal`.

    :param num_data: the number of datapoints (the size of the tables).
    :param latent_dim: the size of ``z``.
    :param init_scale: the initial :math:`\sigma`.
    :param min_scale: a floor on :math:`\sigma`.
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("rsample_and_log_prob",)

    amortized = False
    per_datapoint = True

    def __init__(
        self, num_data: int, latent_dim: int, *, init_scale: float = 1.0, min_scale: float = 1e-5
    ) -> None:
        super().__init__(latent_dim)
        self.num_data = check_positive_int(num_data, "num_data")
        self.min_scale = check_positive_float(min_scale, "min_scale")
        init_scale = check_positive_float(init_scale, "init_scale")
        if init_scale <= self.min_scale:
            raise ConfigError(f"init_scale must exceed min_scale={self.min_scale}")
        self.loc = nn.Parameter(torch.zeros(self.num_data, self.latent_dim))
        raw = _inverse_softplus(init_scale - self.min_scale)
        self.raw_scale = nn.Parameter(torch.full((self.num_data, self.latent_dim), raw))

    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> Params:
        idx = _check_idx(idx, self.num_data, "LocalNormal")
        return {"loc": self.loc[idx], "raw_scale": self.raw_scale[idx]}

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        return _diagonal_normal(params, self.min_scale)

    def rsample_and_log_prob(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`DiagonalNormal.rsample_and_log_prob`, for the rows ``idx`` of the tables."""
        return _diagonal_normal_rsample(self.local_params(x, idx), self.min_scale)


class Local(Family):
    r"""Any family made non-amortized: its local parameters stored for every datapoint.

    ``Local(family, params)`` holds ``params[k]`` of shape ``(num_data, ...)`` as learnable tables;
    ``local(x, idx)`` returns ``family.distribution_from_params({k: params[k][idx]})`` and never
    runs the encoder. :meth:`from_family` starts the tables at the amortized family's output for a
    data set (the starting point of Cremer et al.'s per-datapoint optimization). The wrapped
    family stays a submodule (its heads, and a flow's networks, are used by
    ``distribution_from_params``); freeze it with ``local.family.requires_grad_(False)`` to
    optimize only the per-datapoint tables.

    :param family: a family with ``local_params`` / ``distribution_from_params``.
    :param params: name -> tensor of shape ``(num_data, ...)``, e.g. ``family.local_params(x)``.
    """

    amortized = False
    per_datapoint = True

    @property
    def log_prob_anywhere(self) -> bool:  # type: ignore[override]
        return capability(self.family, "log_prob_anywhere")

    def __init__(self, family: nn.Module, params: dict[str, torch.Tensor]) -> None:
        if not hasattr(family, "distribution_from_params"):
            raise ConfigError(
                f"{type(family).__name__} has no distribution_from_params; wrap a pyrovae family"
            )
        super().__init__(family.latent_dim)
        sizes = {int(v.shape[0]) for v in params.values()}
        if len(sizes) != 1:
            raise ConfigError("all local parameter tables must have the same first size num_data")
        self.family = family
        self.num_data = sizes.pop()
        self.params = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
        )

    @classmethod
    @torch.no_grad()
    def from_family(cls, family: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> Local:
        """Start the tables at ``family.local_params`` of every row of ``x`` ``(num_data, D)``."""
        check_positive_int(batch_size, "batch_size")
        chunks = [family.local_params(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        params = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        return cls(family, params)

    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> Params:
        idx = _check_idx(idx, self.num_data, "Local")
        return {k: v[idx] for k, v in self.params.items()}

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        return self.family.distribution_from_params(params)

r"""Several stochastic layers through the three parts: a :class:`Hierarchical` prior and a
:class:`BottomUp` family over :math:`z = (z_1, \dots, z_L)`.

A VAE with stochastic layers :math:`z_1` (next to the data) to :math:`z_L` (the top) is the
ordinary three-part VAE over the concatenation :math:`z = \mathrm{concat}(z_1, \dots, z_L)`, one
Pyro site ``"z"`` with ``event_shape == (d_1 + \dots + d_L,)`` (Burda et al. 2016 [1], two
layers):

.. math::

    p(z) = p(z_L) \prod_{l=1}^{L-1} p(z_l \mid z_{l+1}), \qquad
    q(z \mid x) = q(z_1 \mid x) \prod_{l=1}^{L-1} q(z_{l+1} \mid z_l), \qquad
    p(x \mid z) = p(x \mid z_1),

with :math:`p(z_L) = \mathcal N(0, I)` and every conditional a diagonal Gaussian whose location
and scale come from a network of the layer it is conditioned on. The prior is a distribution
over :math:`z` like any other (``log_prob`` sums the layers' terms; ``rsample`` is ancestral),
and so is the family's (``rsample`` by reparameterization from :math:`z_1` up; ``log_prob`` at any
:math:`z`), so every loss, estimator (IS, AIS, BDMC), the gap analysis and the checkpoints use
them through the contracts alone. The likelihood reads :math:`z_1`: its decoder starts with
:class:`~pyrovae.nets.First` (``Bernoulli(nn.Sequential(First(d1), MLP(d1, ...)))``), so the
likelihoods need no special case.

:class:`TopDown` is the ladder VAE's inference model (Sønderby et al. 2016 [2]) as a family:
:math:`q(z_L \mid x) \prod_{l<L} q(z_l \mid z_{l+1}, x)`, each conditional a precision-weighted
combination of a bottom-up Gaussian from :math:`x` and the prior's :math:`p(z_l \mid z_{l+1})`
(it uses the :class:`Hierarchical` prior's networks, which stay the prior's).

Any family can stand beside the hierarchical prior (a diagonal Gaussian over all of :math:`z` is
the mean-field family of Burda et al.'s two-layer model without the dependence of
:math:`z_2` on :math:`z_1`), and any prior beside the bottom-up family (a standard normal over
:math:`z` makes :math:`z_2` a second, unused code). Only the total size must agree (the
:class:`~pyrovae.VAE` checks ``latent_dim``); :func:`kl_per_layer` and
:func:`active_units_per_layer` also need the parts' layer sizes to agree where both declare
them.

Per-datapoint parameters (gap analysis, :class:`~pyrovae.families.Local`). A bottom-up
family's parameters that depend on :math:`x` are those of :math:`q(z_1 \mid x)`:
``{"loc", "raw_scale"}``, shape ``(batch, d_1)``, as for
:class:`~pyrovae.families.DiagonalNormal`. The conditionals :math:`q(z_{l+1} \mid z_l)` do not
see :math:`x`; they are shared networks, kept as trained, like a
:class:`~pyrovae.families.Flow`'s networks. :math:`q^*` is therefore the best
:math:`q(z_1)` per datapoint under the trained upper conditionals: the amortization gap is
the encoder's (what amortizing :math:`x \mapsto q(z_1 \mid x)` costs), and what the shared
conditionals cannot represent stays in the approximation gap.

References:

1. Y. Burda, R. Grosse, R. Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
2. C. K. Sønderby, T. Raiko, L. Maaløe, S. K. Sønderby, O. Winther (2016). Ladder variational
   autoencoders. NeurIPS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from ._batching import model_batches
from ._checks import check_positive_float, check_positive_int, check_vae
from ._densities import LOG_SQRT_2PI, diagonal_normal_log_prob
from .diagnostics import ActiveUnits, active_units
from .errors import ConfigError
from .evaluation import evaluating, mean_stderr
from .families import Family, Params
from .nets import MLP
from .priors import Prior

__all__ = [
    "GaussianLayer",
    "Hierarchical",
    "BottomUp",
    "HierarchicalNormal",
    "BottomUpNormal",
    "TopDown",
    "TopDownNormal",
    "layer_dims_of",
    "split_layers",
    "kl_per_layer",
    "active_units_per_layer",
    "LayerKL",
]


def _check_layers(layer_dims: Sequence[int], what: str) -> tuple[int, ...]:
    dims = tuple(layer_dims) if isinstance(layer_dims, Sequence) and not isinstance(
        layer_dims, (str, bytes)) else ()
    if len(dims) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(
            f"{what} needs the sizes of two or more stochastic layers, bottom (next to the data) "
            f"first, e.g. layer_dims=(100, 50); got {layer_dims!r}"
        )
    return dims


class GaussianLayer(nn.Module):
    r"""A conditional diagonal Gaussian :math:`\mathcal N(\mu(h), \mathrm{diag}\,\sigma(h)^2)`:
    a trunk network, then two linear heads,

    .. math::

        f = \text{trunk}(h), \qquad \mu = W_\mu f + b_\mu, \qquad
        \sigma = \mathrm{softplus}(W_\sigma f + b_\sigma) + \sigma_{\min}.

    :param in_dim: the size of the input :math:`h` (the layer conditioned on, or ``x``).
    :param out_dim: the size of the Gaussian variable.
    :param hidden_dims: the trunk's layers, e.g. ``(100, 100)`` for Burda et al.'s
        ``in -> 100 tanh -> 100 tanh``; empty: the heads read :math:`h` itself (linear-Gaussian).
    :param activation: a name from :data:`pyrovae.nets.ACTIVATIONS` or a callable.
    :param trunk: a module to use as the trunk instead (``feature_dim`` its output size).
    :param min_scale: the floor :math:`\sigma_{\min}`.

    Shapes: ``(..., in_dim) -> ((..., out_dim), (..., out_dim))``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dims: Sequence[int] = (),
        activation: str | Callable[[], nn.Module] = "tanh",
        *,
        trunk: nn.Module | None = None,
        feature_dim: int | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.min_scale = check_positive_float(min_scale, "min_scale")
        hidden = tuple(hidden_dims)
        if trunk is None:
            trunk = (MLP(in_dim, hidden[:-1], hidden[-1], activation, activate_output=True)
                     if hidden else nn.Identity())
            feature_dim = hidden[-1] if hidden else in_dim
        elif feature_dim is None:
            feature_dim = getattr(trunk, "out_features", None)
            if feature_dim is None:
                raise ConfigError(
                    f"cannot tell the output size of trunk {type(trunk).__name__}; pass "
                    "feature_dim=<size of the trunk's output>"
                )
        self.trunk = trunk
        self.feature_dim = check_positive_int(feature_dim, "feature_dim")
        self.loc_head = nn.Linear(self.feature_dim, self.out_dim)
        self.scale_head = nn.Linear(self.feature_dim, self.out_dim)

    def raw(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and raw (unconstrained) scale, each ``(..., out_dim)``."""
        f = self.trunk(h)
        return self.loc_head(f), self.scale_head(f)

    def scale_of(self, raw_scale: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma = \mathrm{softplus}(\text{raw}) + \sigma_{\min}`."""
        return F.softplus(raw_scale) + self.min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale, each ``(..., out_dim)``."""
        loc, raw = self.raw(h)
        return loc, self.scale_of(raw)


def _normal_noise(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_()


def _noise_log_prob(eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal N(\mu + \sigma\epsilon; \mu, \sigma^2)` summed over the last dim."""
    return -(0.5 * eps.square() + scale.log()).sum(-1) - eps.shape[-1] * LOG_SQRT_2PI


class _LayeredDistribution(dist.TorchDistribution):
    """What the hierarchical distributions share: a real vector split into layers, a density
    that is a sum of per-layer terms, and a reparameterized sampler."""

    arg_constraints: dict[str, Any] = {}
    support = constraints.real_vector
    has_rsample = True

    layer_dims: tuple[int, ...]

    def layer_log_probs(self, value: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        """The per-layer terms of ``log_prob(value)``, bottom layer first."""
        raise NotImplementedError

    def rsample_with_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        terms = self.layer_log_probs(value)
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return out.expand(shape) if out.shape != shape else out

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.rsample_with_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


def _prior_terms(conditionals: Sequence[GaussianLayer], layer_dims: tuple[int, ...],
                 value: torch.Tensor) -> list[torch.Tensor]:
    """The terms of :class:`HierarchicalNormal`'s ``log_prob``, bottom layer first."""
    z = list(value.split(layer_dims, -1))
    terms = []
    for layer, cond in enumerate(conditionals):
        loc, scale = cond(z[layer + 1])
        terms.append(diagonal_normal_log_prob(z[layer], loc, scale))
    top = z[-1]
    terms.append(-0.5 * top.square().sum(-1) - top.shape[-1] * LOG_SQRT_2PI)
    return terms


class HierarchicalNormal(_LayeredDistribution):
    r"""The distribution of a :class:`Hierarchical` prior over :math:`z = (z_1, \dots, z_L)`:

    .. math::

        \log p(z) = \log \mathcal N(z_L; 0, I)
            + \sum_{l=1}^{L-1} \log \mathcal N\big(z_l; \mu_l(z_{l+1}), \mathrm{diag}\,
            \sigma_l(z_{l+1})^2\big).

    ``log_prob`` takes ``(..., sum(layer_dims))`` and returns ``(...)`` broadcast against the
    batch shape; ``rsample`` draws :math:`z_L` then each lower layer given the one above
    (ancestral, reparameterized). The parameters do not depend on the batch, so ``expand`` only
    changes the batch shape.

    :param conditionals: ``conditionals[l]`` gives the location and scale of :math:`z_{l+1}`
        (0-based: layer ``l``) from layer ``l + 1`` (:class:`GaussianLayer`).
    :param layer_dims: :math:`(d_1, \dots, d_L)`.
    :param like: a tensor with the dtype and device of the draws.
    """

    def __init__(
        self,
        conditionals: Sequence[GaussianLayer],
        layer_dims: Sequence[int],
        like: torch.Tensor,
        batch_shape: torch.Size = torch.Size(),
    ) -> None:
        self.conditionals = list(conditionals)
        self.layer_dims = tuple(layer_dims)
        self._like = like
        super().__init__(torch.Size(batch_shape), torch.Size((sum(self.layer_dims),)),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        return HierarchicalNormal(self.conditionals, self.layer_dims, self._like,
                                  torch.Size(batch_shape))

    def layer_log_probs(self, value: torch.Tensor) -> list[torch.Tensor]:
        r"""``[log p(z_1 | z_2), ..., log p(z_{L-1} | z_L), log p(z_L)]``, each ``value.shape[:-1]``."""
        return _prior_terms(self.conditionals, self.layer_dims, value)

    def rsample_with_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An ancestral draw ``(*sample_shape, *batch_shape, D)`` and its ``log_prob`` from the
        draw's noise."""
        shape = torch.Size(sample_shape) + self.batch_shape
        eps = _normal_noise(shape + (self.layer_dims[-1],), self._like)
        z = [eps]
        log_p = _noise_log_prob(eps, torch.ones((), dtype=eps.dtype, device=eps.device))
        for layer in reversed(range(len(self.conditionals))):
            loc, scale = self.conditionals[layer](z[0])
            eps = _normal_noise(loc.shape, loc)
            z.insert(0, loc + scale * eps)
            log_p = log_p + _noise_log_prob(eps, scale)
        return torch.cat(z, -1), log_p


class BottomUpNormal(_LayeredDistribution):
    r"""The distribution of a :class:`BottomUp` family over :math:`z = (z_1, \dots, z_L)`:

    .. math::

        \log q(z \mid x) = \log \mathcal N(z_1; \mu_1, \mathrm{diag}\,\sigma_1^2)
            + \sum_{l=1}^{L-1} \log \mathcal N\big(z_{l+1}; \mu_{l+1}(z_l),
            \mathrm{diag}\,\sigma_{l+1}(z_l)^2\big),

    with :math:`\mu_1, \sigma_1` of shape ``batch_shape + (d_1,)`` (from the encoder, or a
    datapoint's own parameters). ``rsample`` draws :math:`z_1 = \mu_1 + \sigma_1 \epsilon_1`,
    then each layer above from the one below.

    :param loc, scale: :math:`\mu_1, \sigma_1`, shape ``(*batch_shape, d_1)``.
    :param conditionals: ``conditionals[l]`` maps layer ``l`` to the location and scale of
        layer ``l + 1`` (0-based).
    :param layer_dims: :math:`(d_1, \dots, d_L)`.
    """

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        conditionals: Sequence[GaussianLayer],
        layer_dims: Sequence[int],
    ) -> None:
        self.loc, self.scale = loc, scale
        self.conditionals = list(conditionals)
        self.layer_dims = tuple(layer_dims)
        super().__init__(loc.shape[:-1], torch.Size((sum(self.layer_dims),)),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        return BottomUpNormal(self.loc.expand(shape), self.scale.expand(shape),
                              self.conditionals, self.layer_dims)

    def layer_log_probs(self, value: torch.Tensor) -> list[torch.Tensor]:
        r"""``[log q(z_1 | x), log q(z_2 | z_1), ..., log q(z_L | z_{L-1})]``, each
        ``value.shape[:-1]`` (broadcast against the batch shape)."""
        z = list(value.split(self.layer_dims, -1))
        terms = [diagonal_normal_log_prob(z[0], self.loc, self.scale)]
        for layer, cond in enumerate(self.conditionals):
            loc, scale = cond(z[layer])
            terms.append(diagonal_normal_log_prob(z[layer + 1], loc, scale))
        return terms

    def rsample_with_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized draw ``(*sample_shape, *batch_shape, D)`` and its ``log_prob``
        from the draw's noise (no second pass through the conditionals)."""
        shape = torch.Size(sample_shape) + self.loc.shape
        eps = _normal_noise(shape, self.loc)
        z = [self.loc + self.scale * eps]
        log_q = _noise_log_prob(eps, self.scale.expand(shape))
        for cond in self.conditionals:
            loc, scale = cond(z[-1])
            eps = _normal_noise(loc.shape, loc)
            z.append(loc + scale * eps)
            log_q = log_q + _noise_log_prob(eps, scale)
        return torch.cat(z, -1), log_q


class Hierarchical(Prior):
    r"""A prior with stochastic layers, :math:`p(z) = p(z_L) \prod_{l<L} p(z_l \mid z_{l+1})`.

    :math:`p(z_L) = \mathcal N(0, I)`; each :math:`p(z_l \mid z_{l+1})` is a
    :class:`GaussianLayer` of :math:`z_{l+1}` (Burda et al.'s two-layer model: ``layer_dims=(100,
    50)``, ``hidden_dims=(100, 100)``, tanh: :math:`z_2 \to 100 \to 100 \to (\mu_1, \sigma_1)`).
    Called, it returns a :class:`HierarchicalNormal` over :math:`z = \mathrm{concat}(z_1, \dots,
    z_L)`, ``event_shape == (latent_dim,)``, ``latent_dim = sum(layer_dims)``.

    :param layer_dims: :math:`(d_1, \dots, d_L)`, bottom (next to the data) first; ``L >= 2``.
    :param hidden_dims: the hidden layers of each conditional's network (empty: linear).
    :param activation: their activation.
    :param conditionals: instead, the :class:`GaussianLayer` modules themselves, ``L - 1`` of
        them, ``conditionals[l]`` from layer ``l + 1`` to layer ``l`` (0-based).
    :param min_scale: the floor on the conditional scales.

    Example::

        >>> p = Hierarchical((4, 2), hidden_dims=(8,))
        >>> p().rsample((3,)).shape, p().event_shape
        (torch.Size([3, 6]), torch.Size([6]))
    """

    closed_forms: tuple[str, ...] = ("log_prob",)

    def __init__(
        self,
        layer_dims: Sequence[int],
        hidden_dims: Sequence[int] = (100, 100),
        activation: str | Callable[[], nn.Module] = "tanh",
        *,
        conditionals: Sequence[GaussianLayer] | None = None,
        min_scale: float = 1e-4,
    ) -> None:
        dims = _check_layers(layer_dims, "Hierarchical")
        super().__init__(sum(dims))
        self.layer_dims = dims
        if conditionals is None:
            conditionals = [GaussianLayer(dims[l + 1], dims[l], hidden_dims, activation,
                                          min_scale=min_scale) for l in range(len(dims) - 1)]
        conditionals = list(conditionals)
        _check_conditionals(conditionals, [(dims[l + 1], dims[l]) for l in range(len(dims) - 1)],
                            "Hierarchical")
        self.conditionals = nn.ModuleList(conditionals)
        # dtype and device of the draws follow the module (.double(), .to(device))
        self.register_buffer("_like", torch.zeros(()), persistent=False)

    def forward(self) -> dist.Distribution:
        return HierarchicalNormal(list(self.conditionals), self.layer_dims, self._like)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z)` of ``z`` ``(..., latent_dim)``, shape ``(...)`` (the sum in
        :class:`HierarchicalNormal`, without building the distribution objects)."""
        terms = _prior_terms(self.conditionals, self.layer_dims, z)
        return sum(terms[1:], terms[0])


def _check_conditionals(conditionals: list[Any], sizes: list[tuple[int, int]], what: str) -> None:
    if len(conditionals) != len(sizes) or not all(isinstance(c, GaussianLayer) for c in conditionals):
        raise ConfigError(
            f"{what} needs {len(sizes)} GaussianLayer conditional(s), one between each pair of "
            f"layers, got {[type(c).__name__ for c in conditionals]}"
        )
    for c, (i, o) in zip(conditionals, sizes):
        if (c.in_dim, c.out_dim) != (i, o):
            raise ConfigError(
                f"{what}: a conditional maps {c.in_dim} -> {c.out_dim} units where the layer "
                f"sizes need {i} -> {o}; build it as GaussianLayer({i}, {o}, ...)"
            )


class BottomUp(Family):
    r"""A bottom-up family with stochastic layers, :math:`q(z \mid x) = q(z_1 \mid x)
    \prod_{l<L} q(z_{l+1} \mid z_l)` (Burda et al. 2016).

    The encoder maps ``x`` to features ``h`` ``(batch, feature_dim)``; linear heads give
    :math:`q(z_1 \mid x) = \mathcal N(\mu_1(h), \mathrm{diag}\,\sigma_1(h)^2)`; each
    :math:`q(z_{l+1} \mid z_l)` is a :class:`GaussianLayer` of :math:`z_l` (Burda et al.:
    :math:`z_1 \to 100 \to 100 \to (\mu_2, \sigma_2)`, tanh). Called, it returns a
    :class:`BottomUpNormal` with batch shape ``(batch,)`` over :math:`z = \mathrm{concat}(z_1,
    \dots, z_L)`; its ``log_prob`` works at any :math:`z` (``log_prob_anywhere``), so AIS,
    BDMC, the VampPrior, DReG and STL take it.

    Local parameters (see the module docstring): ``{"loc": (batch, d_1), "raw_scale": (batch,
    d_1)}``, those of :math:`q(z_1 \mid x)`, :math:`\sigma_1 = \mathrm{softplus}(\text{raw\_scale})
    + \sigma_{\min}`; the conditionals above stay shared.

    :param encoder: module ``(batch, num_features) -> (batch, feature_dim)``.
    :param layer_dims: :math:`(d_1, \dots, d_L)`, bottom first; ``L >= 2``.
    :param hidden_dims: the hidden layers of each upward conditional's network.
    :param activation: their activation.
    :param feature_dim: the encoder's output size (read from ``encoder.out_features`` if omitted).
    :param conditionals: instead, the :class:`GaussianLayer` modules themselves,
        ``conditionals[l]`` from layer ``l`` to layer ``l + 1`` (0-based).
    :param min_scale: the floor on every scale.

    Example::

        >>> from pyrovae.nets import MLP
        >>> q = BottomUp(MLP(784, (32,), 32, activate_output=True), (4, 2), hidden_dims=(8,))
        >>> q(torch.zeros(5, 784)).rsample().shape
        torch.Size([5, 6])
    """

    closed_forms: tuple[str, ...] = ("rsample_and_log_prob",)

    def __init__(
        self,
        encoder: nn.Module,
        layer_dims: Sequence[int],
        hidden_dims: Sequence[int] = (100, 100),
        activation: str | Callable[[], nn.Module] = "tanh",
        *,
        feature_dim: int | None = None,
        conditionals: Sequence[GaussianLayer] | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        dims = _check_layers(layer_dims, "BottomUp")
        super().__init__(sum(dims))
        self.layer_dims = dims
        self.encoder = encoder
        self.feature_dim = _encoder_dim(encoder, feature_dim)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        self.loc_head = nn.Linear(self.feature_dim, dims[0])
        self.scale_head = nn.Linear(self.feature_dim, dims[0])
        if conditionals is None:
            conditionals = [GaussianLayer(dims[l], dims[l + 1], hidden_dims, activation,
                                          min_scale=min_scale) for l in range(len(dims) - 1)]
        conditionals = list(conditionals)
        _check_conditionals(conditionals, [(dims[l], dims[l + 1]) for l in range(len(dims) - 1)],
                            "BottomUp")
        self.conditionals = nn.ModuleList(conditionals)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def params_from_features(self, h: torch.Tensor) -> Params:
        return {"loc": self.loc_head(h), "raw_scale": self.scale_head(h)}

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        scale = F.softplus(params["raw_scale"]) + self.min_scale
        return BottomUpNormal(params["loc"], scale, list(self.conditionals), self.layer_dims)

    def rsample_and_log_prob(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One reparameterized draw ``(batch, latent_dim)`` and :math:`\log q(z \mid x)`
        ``(batch,)`` from its noise, :math:`\sum_l -\tfrac12\|\epsilon_l\|^2 - \sum_d \log
        \sigma_{l,d} - \tfrac{d_l}2 \log 2\pi` (the same noise, in the same order, as
        ``family(x, idx).rsample()``)."""
        return self(x, idx).rsample_with_log_prob()


def _encoder_dim(encoder: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is None:
        feature_dim = getattr(encoder, "out_features", None)
        if feature_dim is None:
            raise ConfigError(
                f"cannot tell the output size of encoder {type(encoder).__name__}; "
                "pass feature_dim=<size of the encoder's output>"
            )
    return check_positive_int(feature_dim, "feature_dim")


class TopDownNormal(_LayeredDistribution):
    r"""The distribution of a :class:`TopDown` family (Sønderby et al. 2016 [2]): the top layer
    from the bottom-up pass, each lower layer a precision-weighted combination of its bottom-up
    Gaussian :math:`\mathcal N(\hat\mu_l, \hat\sigma_l^2)` and the prior's
    :math:`p(z_l \mid z_{l+1}) = \mathcal N(\mu_l(z_{l+1}), \sigma_l(z_{l+1})^2)`:

    .. math::

        q(z_L \mid x) = \mathcal N(\hat\mu_L, \hat\sigma_L^2), \qquad
        q(z_l \mid z_{l+1}, x) = \mathcal N\Big(\frac{\hat\mu_l \hat\sigma_l^{-2} +
        \mu_l \sigma_l^{-2}}{\hat\sigma_l^{-2} + \sigma_l^{-2}},\
        \frac{1}{\hat\sigma_l^{-2} + \sigma_l^{-2}}\Big).

    :param loc, scale: :math:`\hat\mu, \hat\sigma` of every layer, concatenated,
        ``(*batch_shape, sum(layer_dims))``.
    :param conditionals: the prior's :class:`GaussianLayer` modules (``conditionals[l]`` gives
        layer ``l`` from layer ``l + 1``).
    :param layer_dims: :math:`(d_1, \dots, d_L)`.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor,
                 conditionals: Sequence[GaussianLayer], layer_dims: Sequence[int]) -> None:
        self.loc, self.scale = loc, scale
        self.conditionals = list(conditionals)
        self.layer_dims = tuple(layer_dims)
        super().__init__(loc.shape[:-1], torch.Size((sum(self.layer_dims),)),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        return TopDownNormal(self.loc.expand(shape), self.scale.expand(shape),
                             self.conditionals, self.layer_dims)

    def _combined(self, layer: int, above: torch.Tensor, loc_hat: torch.Tensor,
                  scale_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc_p, scale_p = self.conditionals[layer](above)
        prec_hat, prec_p = scale_hat.pow(-2), scale_p.pow(-2)
        var = 1 / (prec_hat + prec_p)
        return (loc_hat * prec_hat + loc_p * prec_p) * var, var.sqrt()

    def layer_log_probs(self, value: torch.Tensor) -> list[torch.Tensor]:
        r"""``[log q(z_1 | z_2, x), ..., log q(z_L | x)]``, each ``value.shape[:-1]``."""
        z = list(value.split(self.layer_dims, -1))
        locs = list(self.loc.split(self.layer_dims, -1))
        scales = list(self.scale.split(self.layer_dims, -1))
        terms = [diagonal_normal_log_prob(z[-1], locs[-1], scales[-1])]
        for layer in reversed(range(len(self.conditionals))):
            loc, scale = self._combined(layer, z[layer + 1], locs[layer], scales[layer])
            terms.insert(0, diagonal_normal_log_prob(z[layer], loc, scale))
        return terms

    def rsample_with_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw from the top layer down ``(*sample_shape, *batch_shape, D)`` and its
        ``log_prob`` from the draw's noise."""
        locs = list(self.loc.split(self.layer_dims, -1))
        scales = list(self.scale.split(self.layer_dims, -1))
        shape = torch.Size(sample_shape) + locs[-1].shape
        eps = _normal_noise(shape, self.loc)
        z = [locs[-1] + scales[-1] * eps]
        log_q = _noise_log_prob(eps, scales[-1].expand(shape))
        for layer in reversed(range(len(self.conditionals))):
            loc, scale = self._combined(layer, z[0], locs[layer], scales[layer])
            eps = _normal_noise(loc.shape, loc)
            z.insert(0, loc + scale * eps)
            log_q = log_q + _noise_log_prob(eps, scale)
        return torch.cat(z, -1), log_q


class TopDown(Family):
    r"""A top-down family with stochastic layers, the ladder VAE's inference model (Sønderby et
    al. 2016 [2]): :math:`q(z \mid x) = q(z_L \mid x) \prod_{l<L} q(z_l \mid z_{l+1}, x)`, each
    conditional combining a bottom-up Gaussian from :math:`x` with the prior's top-down
    :math:`p(z_l \mid z_{l+1})` by precision weighting (:class:`TopDownNormal`), so the family
    shares the generative path.

    The bottom-up pass: the encoder gives :math:`h_1` ``(batch, feature_dim)``, and
    :math:`h_{l+1} = \mathrm{MLP}_l(h_l)` (``hidden_dims``); linear heads on :math:`h_l` give
    :math:`\hat\mu_l, \hat\sigma_l = \mathrm{softplus}(\cdot) + \sigma_{\min}`.

    The prior's networks are used, not owned: they stay the VAE's ``prior`` (hand the family the
    same :class:`Hierarchical` the VAE gets), so nothing is counted twice in ``state_dict``.

    Local parameters: ``{"loc": (batch, latent_dim), "raw_scale": (batch, latent_dim)}``, the
    bottom-up :math:`\hat\mu, \hat\sigma` of every layer, concatenated (the prior's networks
    stay shared).

    :param encoder: module ``(batch, num_features) -> (batch, feature_dim)``.
    :param prior: the :class:`Hierarchical` prior of the model.
    :param hidden_dims: the bottom-up networks between layers, e.g. ``(100, 100)``.
    :param activation: their activation.
    :param feature_dim: the encoder's output size (read from ``encoder.out_features`` if omitted).
    :param min_scale: the floor on the bottom-up scales.
    """

    closed_forms: tuple[str, ...] = ("rsample_and_log_prob",)

    def __init__(
        self,
        encoder: nn.Module,
        prior: Hierarchical,
        hidden_dims: Sequence[int] = (100, 100),
        activation: str | Callable[[], nn.Module] = "tanh",
        *,
        feature_dim: int | None = None,
        min_scale: float = 1e-5,
    ) -> None:
        if not isinstance(prior, Hierarchical):
            raise ConfigError(
                f"TopDown combines its bottom-up pass with a Hierarchical prior's networks; got "
                f"{type(prior).__name__}; pass the prior the VAE gets, e.g. Hierarchical((100, 50))"
            )
        dims = prior.layer_dims
        super().__init__(sum(dims))
        self.layer_dims = dims
        self._prior = (prior,)  # used, not owned (the VAE's prior holds its parameters)
        self.encoder = encoder
        self.feature_dim = _encoder_dim(encoder, feature_dim)
        self.min_scale = check_positive_float(min_scale, "min_scale")
        hidden = tuple(hidden_dims)
        widths = [self.feature_dim]
        trunks = []
        for _ in dims[1:]:
            trunks.append(MLP(widths[-1], hidden[:-1], hidden[-1], activation, activate_output=True)
                          if hidden else nn.Identity())
            widths.append(hidden[-1] if hidden else widths[-1])
        self.trunks = nn.ModuleList(trunks)
        self.loc_heads = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, dims))
        self.scale_heads = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, dims))

    @property
    def prior(self) -> Hierarchical:
        """The prior whose networks give the top-down terms."""
        return self._prior[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def params_from_features(self, h: torch.Tensor) -> Params:
        locs, raws = [self.loc_heads[0](h)], [self.scale_heads[0](h)]
        for trunk, loc_head, scale_head in zip(self.trunks, self.loc_heads[1:], self.scale_heads[1:]):
            h = trunk(h)
            locs.append(loc_head(h))
            raws.append(scale_head(h))
        return {"loc": torch.cat(locs, -1), "raw_scale": torch.cat(raws, -1)}

    def distribution_from_params(self, params: Params) -> dist.Distribution:
        scale = F.softplus(params["raw_scale"]) + self.min_scale
        return TopDownNormal(params["loc"], scale, list(self.prior.conditionals), self.layer_dims)

    def rsample_and_log_prob(
        self, x: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One reparameterized draw ``(batch, latent_dim)`` and its :math:`\log q` ``(batch,)``
        from the noise (the same noise, in the same order, as ``family(x, idx).rsample()``)."""
        return self(x, idx).rsample_with_log_prob()


# ---------------------------------------------------------------------- per-layer diagnostics
def layer_dims_of(vae: Any) -> tuple[int, ...]:
    """The stochastic layers' sizes, bottom first, that the VAE's prior and family declare
    (``layer_dims``); :class:`ConfigError` in one line if neither does or they disagree."""
    declared = {name: tuple(getattr(part, "layer_dims")) for name, part in
                (("prior", getattr(vae, "prior", None)), ("family", getattr(vae, "family", None)))
                if getattr(part, "layer_dims", None) is not None}
    if not declared:
        raise ConfigError(
            "per-layer diagnostics need a prior or a family with stochastic layers (layer_dims), "
            "e.g. pyrovae.Hierarchical or pyrovae.BottomUp"
        )
    if len(set(declared.values())) > 1:
        raise ConfigError(
            f"the prior's layers {declared['prior']} and the family's {declared['family']} "
            "split z differently; build both with the same layer_dims"
        )
    return next(iter(declared.values()))


def split_layers(values: torch.Tensor, layer_dims: Sequence[int]) -> list[torch.Tensor]:
    """Split a per-dimension tensor ``(..., sum(layer_dims))`` into the layers, bottom first."""
    return list(values.split(tuple(layer_dims), -1))


def _layer_terms(d: Any, z: torch.Tensor, layer_dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-layer log-density terms of ``d`` at ``z``: its own ``layer_log_probs`` with the same
    layers, or its per-dimension factors summed within each layer (a diagonal Gaussian)."""
    if getattr(d, "layer_dims", None) == layer_dims:
        return d.layer_log_probs(z)
    base = d
    if isinstance(base, torch.distributions.Independent) and base.reinterpreted_batch_ndims == 1:
        per_dim = base.base_dist.log_prob(z)
        return [t.sum(-1) for t in split_layers(per_dim, layer_dims)]
    raise ConfigError(
        f"{type(d).__name__} neither has stochastic layers of sizes {layer_dims} nor factorizes "
        "over z's dimensions, so its log-density has no per-layer terms; per-layer KL needs "
        "layered or diagonal parts"
    )


@dataclass(frozen=True)
class LayerKL:
    r"""KL per stochastic layer, averaged over a data set:
    :math:`\mathrm{KL}_l = \frac1N \sum_n \mathbb E_{q(z \mid x_n)}[\log q_l - \log p_l]`, where
    :math:`q_l, p_l` are layer :math:`l`'s factors (:math:`q(z_1 \mid x)` and :math:`p(z_1
    \mid z_2)` for the bottom layer, :math:`q(z_2 \mid z_1)` and :math:`p(z_2)` for the top of
    two). The layers' values sum to the total KL.

    :ivar layer_dims: the layers' sizes, bottom first.
    :ivar means: per layer, the average over datapoints (nats).
    :ivar stderrs: per layer, the standard error over datapoints.
    :ivar num_samples: Monte Carlo draws per datapoint.
    """

    layer_dims: tuple[int, ...]
    means: tuple[float, ...]
    stderrs: tuple[float, ...]
    num_samples: int

    @property
    def total(self) -> float:
        return float(sum(self.means))

    def to_dict(self) -> dict[str, Any]:
        return {"layer_dims": list(self.layer_dims), "means": list(self.means),
                "stderrs": list(self.stderrs), "total": self.total,
                "num_samples": self.num_samples}


@torch.no_grad()
def kl_per_layer(vae: Any, data: Any, *, num_samples: int = 100, batch_size: int = 500,
                 seed: int | None = None) -> LayerKL:
    r"""KL per stochastic layer (see :class:`LayerKL`), by Monte Carlo with ``num_samples``
    draws :math:`z \sim q(z \mid x)` per datapoint:

    .. math::

        \widehat{\mathrm{KL}}_l(x) = \frac1S \sum_s \log q_l(z_s) - \log p_l(z_s).

    Works for a :class:`Hierarchical` prior or a :class:`BottomUp` family beside any part that
    is layered the same way or factorizes over the dimensions (a standard normal prior, a
    diagonal Gaussian family).
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    layers = layer_dims_of(check_vae(vae, ("family", "prior"), "the latent-space diagnostics"))
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    with evaluating(vae, seed):
        p = vae.prior()
        for x, idx in model_batches(vae, data, batch_size):
            q = vae.family(x, idx)
            z = q.sample((num_samples,))  # (S, batch, D)
            lq = _layer_terms(q, z, layers)
            lp = _layer_terms(p, z, layers)
            for out, a, b in zip(per_layer, lq, lp):
                out.append((a - b).mean(0).double().cpu())
    stats = [mean_stderr(torch.cat(v)) for v in per_layer]
    return LayerKL(layers, tuple(m for m, _ in stats), tuple(s for _, s in stats), num_samples)


def active_units_per_layer(vae: Any, data: Any, **kwargs: Any) -> list[Any]:
    """:func:`pyrovae.active_units` split by stochastic layer: one
    :class:`~pyrovae.diagnostics.ActiveUnits` per layer, bottom first (``kwargs`` go to
    :func:`~pyrovae.active_units`)."""
    layers = layer_dims_of(vae)
    result = active_units(vae, data, **kwargs)
    return [
        ActiveUnits(int((v > result.threshold).sum()), v, result.threshold,
                    result.num_datapoints, result.analytic_mean)
        for v in split_layers(result.variances, layers)
    ]

r"""Priors :math:`p(z)`.

Contract: a prior is a :class:`torch.nn.Module` with an integer attribute ``latent_dim``; called
with no arguments it returns a :class:`~pyro.distributions.Distribution` with
``event_shape == (latent_dim,)`` and ``batch_shape == ()``. The :class:`~pyrovae.VAE` puts it
inside the ``"data"`` plate, which broadcasts it over the minibatch (and over vectorized particles).

Optional closed form (declared in the class attribute ``closed_forms = ("log_prob",)``; used by the
direct training loss of :mod:`pyrovae.fastpath` where proven equal to Pyro's at run time):
``prior.log_prob(z)``, :math:`\log p(z)` of latents ``(..., latent_dim)``, shape ``(...)``,
computed without building distribution objects, equal to ``prior().log_prob(z)`` to float
rounding. A subclass that changes the distribution but inherits the declaration fails the
run-time proof, and the closed form is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from ._checks import check_positive_float, check_positive_int
from ._densities import LOG_SQRT_2PI, diagonal_normal_log_prob
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
    :cvar requires: the capabilities the prior needs from the variational family (see
        :data:`pyrovae.families.CAPABILITIES`); :class:`~pyrovae.VAE` refuses a family that does
        not declare them all, before any training.
    :cvar uses_family: ``True`` when the prior is built on the family (the VampPrior): the
        :class:`~pyrovae.VAE` then hands it over with ``prior.attach(family)``.
    """

    requires: frozenset[str] = frozenset()
    uses_family: bool = False

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

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("log_prob",)

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        # Buffers, so that ``.to(device)`` and ``.double()`` move them with the model.
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z) = -\tfrac12 \|z\|^2 - \tfrac D2 \log 2\pi`, shape ``z.shape[:-1]``."""
        return -0.5 * z.square().sum(-1) - z.shape[-1] * LOG_SQRT_2PI


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class LearnedNormal(Prior):
    r"""A diagonal Gaussian with learnable location and scale, :math:`p(z) = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)`.

    :math:`\sigma = \mathrm{softplus}(\rho) + \sigma_{\min}`; starts at :math:`\mathcal N(0, I)`.

    :param latent_dim: the size of ``z``.
    :param min_scale: a floor on :math:`\sigma`.
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("log_prob",)

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

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z) = -\sum_d \big(\tfrac12 ((z_d - \mu_d) / \sigma_d)^2 + \log
        \sigma_d\big) - \tfrac D2 \log 2\pi`, shape ``z.shape[:-1]``."""
        return diagonal_normal_log_prob(z, self.loc, self.scale)


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

    What it needs from the family is declared in :attr:`requires`: an encoder (``amortized``)
    and a density at any point (``log_prob_anywhere``: diagonal, full-rank, IAF, spline,
    Householder; not planar or radial flows, nor per-datapoint families).
    :class:`~pyrovae.VAE` checks it and then calls :meth:`attach` with its family (declared by
    :attr:`uses_family`). The prior does not own the family's parameters (they stay the VAE's
    ``family``), so nothing is counted twice in ``state_dict``.

    Memory is bounded in bytes. A diagonal Gaussian family's mixture costs two matrix products
    (:class:`DiagonalNormalMixture`). Any other family evaluates :math:`q(z_i \mid u_k)` for
    every pair of a row :math:`z_i` and a pseudo-input -- for a flow that means inverting it
    ``rows x K`` times -- so the rows go in chunks of at most ``max_bytes`` of saved
    activations (measured once per dtype and device on one row), and under autograd each chunk
    is recomputed in the backward pass instead of being kept (:class:`_ChunkedLogProb`, which
    works under ``.backward()`` in training and ``torch.autograd.grad`` in HMC alike).

    :param num_pseudo_inputs: :math:`K`.
    :param num_features: :math:`D`, the data size.
    :param family: the variational family (optional; else set by :meth:`attach`).
    :param init: optional initial pseudo-inputs, shape ``(K, D)`` (e.g. random training data);
        default: :math:`u_k` near the middle of the bounds plus small noise.
    :param bounds: the open interval the pseudo-inputs live in, or ``None``.
    :param max_bytes: the activation budget of one chunk of the mixture's log-density.
    """

    requires: frozenset[str] = frozenset({"amortized", "log_prob_anywhere"})
    uses_family: bool = True

    def __init__(
        self,
        num_pseudo_inputs: int,
        num_features: int,
        *,
        family: nn.Module | None = None,
        init: torch.Tensor | None = None,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        max_bytes: int = 256 * 2**20,
    ) -> None:
        nn.Module.__init__(self)
        self.num_pseudo_inputs = check_positive_int(num_pseudo_inputs, "num_pseudo_inputs")
        self.num_features = check_positive_int(num_features, "num_features")
        self.max_bytes = check_positive_int(max_bytes, "max_bytes")
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
        self._row_bytes: dict[tuple[Any, ...], tuple[int, int]] = {}
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

        Raises :class:`~pyrovae.errors.ConfigError` naming the missing capability if the family
        does not declare everything in :attr:`requires`.
        """
        from .families import check_requirements

        check_requirements(self, family)
        # Kept out of the module tree: the family's parameters belong to the VAE.
        self._family = (family,)
        self._row_bytes.clear()

    def forward(self) -> dist.Distribution:
        if not self._family:
            raise ConfigError(
                "this VampPrior has no family yet; pass family=... or build a VAE with it"
            )
        family = self._family[0]
        u = self.pseudo_inputs
        logits = u.new_zeros(self.num_pseudo_inputs)
        if not hasattr(family, "distribution_from_params"):  # a module meeting the contract only
            return dist.MixtureSameFamily(dist.Categorical(logits=logits), family(u, None))
        params = family.local_params(u, None)
        components = family.distribution_from_params(params)
        fast = _diagonal_mixture(logits, components)
        if isinstance(fast, DiagonalNormalMixture):
            return fast
        return _PairwiseMixture(family, params, self.max_bytes, self._row_bytes)


class _PairwiseMixture(dist.TorchDistribution):
    r"""An equal-weight mixture :math:`\frac1K \sum_k q(z \mid \theta_k)` of a family's
    distributions at per-component parameters :math:`\theta_k`, whose ``log_prob`` goes over
    the rows of ``z`` in chunks of bounded bytes, each recomputed in the backward pass."""

    arg_constraints: dict[str, Any] = {}
    has_rsample = False

    def __init__(
        self, family: nn.Module, params: dict[str, torch.Tensor], max_bytes: int,
        row_bytes: dict[tuple[Any, ...], tuple[int, int]],
    ) -> None:
        self.family = family
        self.params = params
        self.max_bytes = max_bytes
        self._row_bytes = row_bytes
        self.num_components = next(iter(params.values())).shape[0]
        super().__init__(torch.Size(), torch.Size((family.latent_dim,)), validate_args=False)

    @property
    def support(self) -> Any:
        return dist.constraints.real_vector

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        return dist.ExpandedDistribution(self, batch_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        n = int(torch.Size(sample_shape).numel())
        k = torch.randint(self.num_components, (n,), device=next(iter(self.params.values())).device)
        with torch.no_grad():
            q = self.family.distribution_from_params({key: v[k] for key, v in self.params.items()})
            z = q.sample()
        return z.reshape(torch.Size(sample_shape) + self.event_shape)

    def _pairwise_params(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.params.values())

    def _chunk(self, z: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` of rows ``z`` ``(r, D)``: ``logsumexp_k log q(z | theta_k) - log K``."""
        q = self.family.distribution_from_params(dict(zip(self.params, values)))
        return torch.logsumexp(q.log_prob(z.unsqueeze(-2)), -1) - math.log(self.num_components)

    def _saved_bytes(self, z: torch.Tensor) -> int:
        """Bytes of tensors the log-density of rows ``z`` keeps for the backward pass."""
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()  # views and expansions share their base's memory
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._chunk(z, *self._pairwise_params())
        return sum(saved.values())

    def _cost(self, z: torch.Tensor) -> tuple[int, int]:
        """``(fixed, per_row)`` bytes of one chunk's saved activations, measured once per dtype,
        device and grad mode on chunks of one and two rows."""
        key = (z.dtype, z.device, torch.is_grad_enabled())
        if key not in self._row_bytes:
            pair = z[:2] if z.shape[0] >= 2 else z[:1].repeat(2, 1)
            one, two = self._saved_bytes(pair[:1].clone()), self._saved_bytes(pair.clone())
            # Without a graph nothing is saved: count the pairwise tensors of one pass instead.
            floor = 16 * self.num_components * z.shape[-1] * z.element_size()
            per_row = max(two - one, floor)
            self._row_bytes[key] = (max(one - per_row, 0), per_row)
        return self._row_bytes[key]

    def rows_per_chunk(self, z: torch.Tensor) -> int:
        """How many rows of ``z`` ``(rows, D)`` one chunk takes within ``max_bytes``."""
        fixed, per_row = self._cost(z)
        return max(1, (self.max_bytes - fixed) // per_row)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch = value.shape[:-1]
        z = value.reshape(-1, value.shape[-1])
        rows = self.rows_per_chunk(z)
        values = self._pairwise_params()
        if z.shape[0] <= rows:
            out = self._chunk(z, *values)
        elif torch.is_grad_enabled():
            # Each chunk is recomputed and differentiated on its own in the backward pass, then
            # freed (see _ChunkedLogProb): works under .backward() and torch.autograd.grad
            # (HMC in AIS) alike. The family's own parameters (an IAF's networks) are used
            # inside the chunks, so they are inputs too.
            shared = tuple(p for p in self.family.parameters() if p.requires_grad)
            out = _ChunkedLogProb.apply(self._chunk, rows, len(values), z, *values, *shared)
        else:
            out = torch.cat([self._chunk(c, *values) for c in z.split(rows)])
        return out.reshape(batch)


class _ChunkedLogProb(torch.autograd.Function):
    r"""``cat([fn(c, *values) for c in z.split(rows)])`` with memory bounded by one chunk in
    both passes: the forward keeps no graph (only ``z`` and the inputs), and the backward
    recomputes each chunk under ``enable_grad``, takes its vector-Jacobian product with
    :func:`torch.autograd.grad` and frees it before the next.

    Unlike ``torch.utils.checkpoint(use_reentrant=True)`` (which calls ``.backward()`` inside
    and refuses ``torch.autograd.grad``, HMC's gradient) it works under either; unlike the
    non-reentrant checkpoint, it holds no recomputed tensors past their chunk. Inputs:
    ``fn, rows, num_values, z, *values, *shared``: ``values`` are passed to ``fn``, ``shared``
    are tensors ``fn`` reads by closure (a family's parameters) whose gradients it returns.
    First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx: Any, fn: Any, rows: int, num_values: int, z: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.rows, ctx.num_values = fn, rows, num_values
        ctx.save_for_backward(z, *inputs)
        values = inputs[:num_values]
        with torch.no_grad():
            return torch.cat([fn(c, *values) for c in z.split(rows)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        z, *inputs = ctx.saved_tensors
        nv = ctx.num_values
        need_z, *need_in = ctx.needs_input_grad[3:]
        values = [v.detach().requires_grad_(n) for v, n in zip(inputs[:nv], need_in[:nv])]
        shared = inputs[nv:]  # the closed-over leaves themselves
        wrt_in = [t for t, n in zip(values + list(shared), need_in) if n]
        sums: list[torch.Tensor | None] = [None] * len(wrt_in)
        z_grads = []
        for c, g in zip(z.split(ctx.rows), grad_out.split(ctx.rows)):
            c = c.detach().requires_grad_(need_z)
            with torch.enable_grad():
                out = ctx.fn(c, *values)
                wrt = ([c] if need_z else []) + wrt_in
                grads = list(torch.autograd.grad(out, wrt, g, allow_unused=True)) if wrt else []
            if need_z:
                gz = grads.pop(0)
                z_grads.append(torch.zeros_like(c) if gz is None else gz)
            for i, gi in enumerate(grads):
                if gi is not None:
                    sums[i] = gi if sums[i] is None else sums[i] + gi
            del out, grads
        it = iter(sums)
        in_grads = tuple(next(it) if n else None for n in need_in)
        return (None, None, None, torch.cat(z_grads) if need_z else None, *in_grads)


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

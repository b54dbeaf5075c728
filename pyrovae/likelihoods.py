r"""Likelihoods :math:`p(x \mid z)` with their decoders.

Contract: a likelihood is a :class:`torch.nn.Module`; ``likelihood(z)`` takes latents of shape
``(..., latent_dim)`` and returns a distribution with ``batch_shape == z.shape[:-1]`` and the data's
``event_shape`` (``(num_features,)`` for pyrovae's flat data). Its ``support`` is what
:meth:`pyrovae.VAE.check_data` checks data against before any training starts.

Optional closed form (declared in the class attribute ``closed_forms = ("log_prob",)``; used by the
direct training loss of :mod:`pyrovae.fastpath` where proven equal to Pyro's at run time):
``likelihood.log_prob(x, z)``, :math:`\log p(x \mid z)` summed over the features, shape
``z.shape[:-1]``, computed without building distribution objects, equal to
``likelihood(z).log_prob(x)`` to float rounding. A subclass that changes the distribution but
inherits the declaration fails the run-time proof, and the closed form is not used.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from ._checks import check_positive_float, check_positive_int
from ._densities import diagonal_normal_log_prob
from .errors import ConfigError

__all__ = [
    "Likelihood",
    "Bernoulli",
    "BernoulliLogits",
    "Gaussian",
    "Laplace",
    "ContinuousBernoulli",
    "Categorical256",
    "IntensityCategorical",
    "intensity_levels",
]


class Likelihood(nn.Module):
    """Base class of likelihoods (optional: any module meeting the contract works).

    :param decoder: module mapping ``(..., latent_dim) -> (..., num_features)``.
    :cvar data_bounds: ``(low, high)`` when every datapoint lies in that box (images in
        [0, 1]), else ``None``. Declared, so that parts that must produce data-like inputs (the
        VampPrior's pseudo-inputs) know where to put them without knowing which likelihood
        this is.
    """

    data_bounds: tuple[float, float] | None = None

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class _BernoulliLogProb(torch.autograd.Function):
    r""":math:`\log p(x \mid \ell) = x \ell - \mathrm{softplus}(\ell)`, elementwise, broadcast.

    With :math:`\mathrm{softplus}(\ell) = \max(\ell, 0) + \log(1 + e^{-|\ell|})`: the same
    function as ``-binary_cross_entropy_with_logits(logits, x)``, whose CPU kernel evaluates
    ``log1p``, which the PyTorch 2.14 CPU build measured for pyrovae does not vectorize
    (about 10 ns per element on an AVX-512 CPU, against about 1 ns for ``exp`` and ``log``; see
    ``benchmarks/results/log_likelihood_speed.md``). Writing ``log(1 + u)`` for
    :math:`u = e^{-|\ell|} \in (0, 1]` costs at most one rounding of :math:`1 + u`
    (:math:`\le 2^{-24}` nats per element in float32, the size of the float32 sum's own
    rounding). The backward pass is the one-pass :math:`x - \sigma(\ell)` (and :math:`\ell`
    for ``x``); it is differentiable again (double backward works).
    """

    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, value)  # type: ignore[attr-defined]
        softplus_tail = logits.abs().neg_().exp_().add_(1).log_()
        return (value * logits).sub_(logits.clamp_min(0)).sub_(softplus_tail)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits, value = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_logits = grad_value = None
        if needs[0]:
            grad_logits = ((value - torch.sigmoid(logits)) * grad).sum_to_size(logits.shape)
        if needs[1]:
            grad_value = (logits * grad).sum_to_size(value.shape)
        return grad_logits, grad_value


class BernoulliLogits(dist.Bernoulli):
    r"""Pyro's ``Bernoulli`` with a faster ``log_prob`` (same values to float rounding).

    ``log_prob`` is :math:`x \ell - \mathrm{softplus}(\ell)` evaluated without ``log1p``
    (see :class:`_BernoulliLogProb`): on a CPU that is ~5x faster than torch's
    ``binary_cross_entropy_with_logits`` forward and ~3x forward and backward, which is ~15 % of
    a training step of a 784-400-400-50 VAE and ~35 % of an importance-sampling estimate.
    Everything else (sampling, mean, support, ``expand``) is Pyro's ``Bernoulli``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.dtype != logits.dtype:
            value = value.to(logits.dtype)
        return _BernoulliLogProb.apply(logits, value)


class Bernoulli(Likelihood):
    r"""Independent Bernoulli pixels, :math:`p(x \mid z) = \prod_d \mathrm{Bernoulli}(x_d; \sigma(f(z)_d))`.

    The decoder gives the logits. Data must be binary: binarize grey images first (statically or
    dynamically, see :mod:`pyrovae.data`).
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("log_prob",)

    data_bounds = (0.0, 1.0)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return BernoulliLogits(logits=self.decoder(z)).to_event(1)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_d x_d \ell_d - \mathrm{softplus}(\ell_d)` for the logits :math:`\ell = f(z)`
        (:class:`BernoulliLogits`' arithmetic), shape ``z.shape[:-1]``."""
        logits = self.decoder(z)
        return _BernoulliLogProb.apply(logits, x.to(logits.dtype)).sum(-1)


class _LocScale(Likelihood):
    """Shared scale handling of location-scale likelihoods (fixed, learned or predicted)."""

    _name = "location-scale"

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
        self.learned = self.predicted = False
        if isinstance(scale, str):
            if scale not in ("learned", "predicted"):
                raise ConfigError(
                    f"{self._name} scale must be a positive number, 'learned' or 'predicted', "
                    f"got {scale!r}"
                )
            if scale == "learned":
                if num_features is None:
                    num_features = getattr(decoder, "out_features", None)
                check_positive_int(num_features, "num_features (needed for scale='learned')")
                self.learned = True
                # softplus^{-1}(1 - min_scale): the scale starts at 1.
                init = math.log(math.expm1(1.0 - self.min_scale))
                self.raw_scale = nn.Parameter(torch.full((num_features,), init))
            else:
                self.predicted = True
        else:
            self.register_buffer("fixed_scale", torch.tensor(check_positive_float(scale, "scale")))

    @property
    def scale(self) -> torch.Tensor:
        """The current shared scale: ``(num_features,)`` if learned, a scalar if fixed."""
        if self.learned:
            return F.softplus(self.raw_scale) + self.min_scale
        if self.predicted:
            raise AttributeError("the scale is predicted per datapoint by the decoder")
        return self.fixed_scale

    def loc_scale(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``z`` ``(..., latent_dim)`` into location and scale, each ``(..., D)``."""
        out = self.decoder(z)
        if self.predicted:
            if out.shape[-1] % 2:
                raise ConfigError(
                    f"with scale='predicted' the decoder must output 2 * num_features values "
                    f"(mean, raw scale), got {out.shape[-1]}"
                )
            loc, raw = out.chunk(2, dim=-1)
            return loc, F.softplus(raw) + self.min_scale
        return out, self.scale.expand_as(out)


class Gaussian(_LocScale):
    r"""Independent Gaussian features, :math:`p(x \mid z) = \mathcal N(x; f(z), \mathrm{diag}\,\sigma^2)`.

    :param decoder: module mapping ``(..., latent_dim) -> (..., num_features)`` (the mean), or
        ``-> (..., 2 * num_features)`` with ``scale="predicted"``: the mean, then the raw scale.
    :param scale: a positive number (a fixed :math:`\sigma`); ``"learned"``: one learnable
        :math:`\sigma_d` per feature shared by all datapoints (``num_features`` is then needed);
        or ``"predicted"``: :math:`\sigma(z) = \mathrm{softplus}(g(z)) + \sigma_{\min}` from the
        decoder's second half.
    :param num_features: the data size, needed when ``scale="learned"``.
    :param min_scale: a floor on a learned or predicted :math:`\sigma`.
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("log_prob",)

    _name = "Gaussian"

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(z)
        return dist.Normal(loc, scale).to_event(1)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`-\sum_d \big(\tfrac12 ((x_d - \mu_d) / \sigma_d)^2 + \log \sigma_d\big) -
        \tfrac D2 \log 2\pi`, shape ``z.shape[:-1]``."""
        return diagonal_normal_log_prob(x, *self.loc_scale(z))


class Laplace(_LocScale):
    r"""Independent Laplace features, :math:`p(x \mid z) = \prod_d \frac{1}{2b_d}
    e^{-|x_d - f(z)_d| / b_d}` (an L1 reconstruction error).

    Same arguments as :class:`Gaussian`; ``scale`` is :math:`b`.
    """

    #: Closed forms this class defines (proven at run time by :mod:`pyrovae.fastpath`).
    closed_forms: tuple[str, ...] = ("log_prob",)

    _name = "Laplace"

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(z)
        return dist.Laplace(loc, scale).to_event(1)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`-\sum_d \big(|x_d - \mu_d| / b_d + \log 2 b_d\big)`, shape ``z.shape[:-1]``."""
        loc, scale = self.loc_scale(z)
        return -((x - loc).abs() / scale + (2 * scale).log()).sum(-1)


class ContinuousBernoulli(Likelihood):
    r"""Independent continuous Bernoulli pixels on :math:`[0, 1]` (Loaiza-Ganem & Cunningham 2019),

    .. math::

        p(x \mid z) = \prod_d C(\lambda_d)\, \lambda_d^{x_d} (1 - \lambda_d)^{1 - x_d}, \qquad
        \lambda = \mathrm{sigmoid}(f(z)),

    the properly normalized density for grey-level data that the Bernoulli "likelihood" of
    non-binary pixels is not. The decoder gives the logits.
    """

    data_bounds = (0.0, 1.0)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=self.decoder(z)).to_event(1)


class _IntensityLattice(constraints.Constraint):
    """The values ``k / (num_levels - 1)``, ``k = 0..num_levels - 1`` (8-bit intensities in [0, 1])."""

    is_discrete = True
    event_dim = 0

    def __init__(self, num_levels: int, tol: float = 1e-3) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.tol = tol

    def check(self, value: torch.Tensor) -> torch.Tensor:
        k = value * (self.num_levels - 1)
        return (value >= 0) & (value <= 1) & ((k - k.round()).abs() <= self.tol)

    def __repr__(self) -> str:
        return f"IntensityLattice(k/{self.num_levels - 1}, k=0..{self.num_levels - 1})"


def intensity_levels(x: torch.Tensor, num_levels: int = 256) -> torch.Tensor:
    """The integer level ``k = round(x * (num_levels - 1))`` of intensities ``x`` in [0, 1]."""
    return (x * (num_levels - 1)).round().long()


class IntensityCategorical(dist.TorchDistribution):
    r"""A categorical distribution over the levels :math:`k/(L-1)`, :math:`k = 0..L-1`, of each pixel.

    ``log_prob(x)`` is :math:`\log \mathrm{softmax}(\text{logits})_k` of the integer level
    :math:`k = \mathrm{round}(x (L-1))` (a probability mass, so log-likelihoods are in nats of
    the discrete 8-bit data); samples and the mean are intensities in [0, 1].

    :param logits: shape ``batch_shape + (L,)``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits.log_softmax(-1)
        self.num_levels = int(logits.shape[-1])
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return _IntensityLattice(self.num_levels)

    def expand(self, batch_shape: torch.Size, _instance: IntensityCategorical | None = None) -> IntensityCategorical:
        batch_shape = torch.Size(batch_shape)
        return IntensityCategorical(self.logits.expand(batch_shape + (self.num_levels,)))

    def _levels(self) -> torch.Tensor:
        return torch.arange(self.num_levels, device=self.logits.device, dtype=self.logits.dtype) / (
            self.num_levels - 1
        )

    @property
    def mean(self) -> torch.Tensor:
        return (self.logits.exp() * self._levels()).sum(-1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        k = dist.Categorical(logits=self.logits).sample(sample_shape)
        return k.to(self.logits.dtype) / (self.num_levels - 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k = intensity_levels(value, self.num_levels)
        k, logits = torch.broadcast_tensors(k.unsqueeze(-1), self.logits)
        return logits.gather(-1, k[..., :1]).squeeze(-1)


class Categorical256(Likelihood):
    r"""A 256-way categorical distribution per pixel over 8-bit intensities :math:`x_d = k_d / 255`.

    .. math::

        p(x \mid z) = \prod_d \mathrm{softmax}(f(z)_{\cdot, d})_{k_d}, \qquad k_d = 255\, x_d,

    a probability mass on the discrete data (as in PixelCNN / VQ-VAE decoders), so its
    log-likelihood is directly comparable to bits per dimension. The decoder outputs
    ``num_levels * num_features`` logits laid out level-major, ``(..., num_levels, D)`` flattened
    (the layout of a convolutional decoder with ``num_levels`` output channels). Data must be
    multiples of ``1 / (num_levels - 1)`` in [0, 1] (e.g. ``load_dataset(..., binarize=None)``).

    :param decoder: module mapping ``(..., latent_dim) -> (..., num_levels * num_features)``.
    :param num_levels: the number of intensity levels (256 for 8-bit images).
    """

    data_bounds = (0.0, 1.0)

    def __init__(self, decoder: nn.Module, num_levels: int = 256) -> None:
        super().__init__(decoder)
        self.num_levels = check_positive_int(num_levels, "num_levels")
        if self.num_levels < 2:
            raise ConfigError("num_levels must be at least 2")

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        out = self.decoder(z)
        if out.shape[-1] % self.num_levels:
            raise ConfigError(
                f"the decoder must output num_levels * num_features = {self.num_levels} * D "
                f"logits, got {out.shape[-1]}"
            )
        logits = out.unflatten(-1, (self.num_levels, -1)).transpose(-1, -2)
        return IntensityCategorical(logits).to_event(1)

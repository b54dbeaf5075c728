r"""Rational-quadratic spline flows (Durkan et al. 2019) with an inverse that is exact at the knots.

Pyro's ``_monotonic_rational_spline`` picks the inverse's bin with ``searchsorted(knots + 1e-6)``,
so a value a few ulps above a knot lands in the bin *below*, at a relative position slightly
above 1, where the bin's quadratic has no real root: its discriminant (about :math:`h^2 d^2` for a
bin of height :math:`h` and knot slope :math:`d`, ~4e-10 for a saturated bin) goes negative by
rounding and Pyro's ``assert discriminant >= 0`` stops training with a bare ``AssertionError``
(in float64 too). It is reached whenever a spline is inverted at a point it did not produce
itself: the VampPrior's :math:`q(z \mid u_k)`, mutual information, gaps, sampling a spline prior.

:func:`rational_quadratic_spline` chooses the bin the same way in both directions, by comparing
with the very knot values whose differences are the bin sizes, so the relative position
:math:`\xi = (y - y_k)/h_k` lies in :math:`[0, 1]` exactly (rounding is monotone); clamps the
discriminant at 0, takes whichever form of the root has no cancellation, and clamps it to
:math:`[0, 1]`. On bin :math:`k` with knots
:math:`(x_k, y_k)`, width :math:`w_k`, height :math:`h_k`, slope :math:`s_k = h_k / w_k` and knot
derivatives :math:`d_k, d_{k+1}`, with :math:`\theta = (x - x_k) / w_k`:

.. math::

    g(x) = y_k + \frac{h_k\,[s_k \theta^2 + d_k \theta (1-\theta)]}
                       {s_k + (d_{k+1} + d_k - 2 s_k)\,\theta (1-\theta)}, \qquad
    g'(x) = \frac{s_k^2\,[d_{k+1}\theta^2 + 2 s_k \theta(1-\theta) + d_k (1-\theta)^2]}
                 {[s_k + (d_{k+1} + d_k - 2 s_k)\,\theta(1-\theta)]^2},

and the inverse solves :math:`a\theta^2 + b\theta + c = 0` for :math:`\theta \in [0, 1]`, with
:math:`\theta = 2c / (-b - \sqrt{b^2 - 4ac})` for :math:`b \ge 0` and
:math:`(-b + \sqrt{b^2 - 4ac}) / 2a` otherwise (the same root, each form free of cancellation
where it is used: in a flat bin with steep ends the first loses half the digits near the ends). Outside :math:`[-B, B]` the spline is the identity
(the boundary derivatives are 1, so the density is continuous there).

:class:`SplineAutoregressive` and :class:`ConditionalSplineAutoregressive` are Pyro's
autoregressive spline transforms (same networks and parameter names, so checkpoints are
unchanged) running on this spline.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pyro.distributions.transforms as T
import torch
from pyro.distributions.transforms.spline import ConditionalSpline, ConditionedSpline
from torch.nn import functional as F

__all__ = [
    "rational_quadratic_spline",
    "SplineAutoregressive",
    "ConditionalSplineAutoregressive",
]


def _knots(fractions: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions on ``[-bound, bound]`` from bin fractions summing to 1, and the bin sizes
    as differences of those very knots (so a comparison with a knot and a subtraction of it
    agree)."""
    knots = F.pad(torch.cumsum(fractions, -1), (1, 0), value=0.0) * (2 * bound) - bound
    knots = torch.cat(
        [knots.new_full(knots.shape[:-1] + (1,), -bound), knots[..., 1:-1],
         knots.new_full(knots.shape[:-1] + (1,), bound)],
        -1,
    )
    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[..., idx]`` per element: ``t`` of shape ``(*batch_t, D, K)``, ``idx`` ``(*batch, D)``."""
    shape = torch.broadcast_shapes(t.shape[:-1], idx.shape)
    return t.expand(shape + t.shape[-1:]).gather(-1, idx.expand(shape).unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    inputs: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The monotone rational-quadratic spline :math:`g` (or :math:`g^{-1}`) elementwise.

    :param inputs: ``x`` (or ``y`` when ``inverse``), shape ``(*batch, D)``.
    :param widths, heights: bin fractions (non-negative, summing to 1 over the last dim), shape
        ``(*batch', D, K)`` broadcastable against ``inputs``; each bin gets at least
        ``min_bin_width`` (``min_bin_height``) of the unit interval before scaling to
        ``[-bound, bound]``.
    :param derivatives: positive derivatives at the ``K - 1`` inner knots, ``(*batch', D, K-1)``
        (``min_derivative`` is added).
    :returns: ``(outputs, log|dg/dx|)`` (for the inverse: ``(x, log|dg^{-1}/dy|)``), both of
        ``inputs``' shape; finite wherever the inputs are.
    """
    num_bins = widths.shape[-1]
    widths = min_bin_width + (1 - min_bin_width * num_bins) * widths
    heights = min_bin_height + (1 - min_bin_height * num_bins) * heights
    xk, w = _knots(widths, bound)
    yk, h = _knots(heights, bound)
    ones = derivatives.new_ones(derivatives.shape[:-1] + (1,))
    d = torch.cat([ones, min_derivative + derivatives, ones], -1)  # (..., D, K + 1)

    inside = (inputs >= -bound) & (inputs <= bound)
    v = inputs.clamp(-bound, bound)
    knots = yk if inverse else xk
    # The bin whose left knot is the last one <= v: the same knot values that give the sizes.
    k = (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1)
    x0, y0 = _gather(xk, k), _gather(yk, k)
    wk, hk = _gather(w, k), _gather(h, k)
    dk, dk1 = _gather(d[..., :-1], k), _gather(d[..., 1:], k)
    s = hk / wk
    curvature = dk1 + dk - 2 * s
    if inverse:
        a = hk * (s - dk) + (v - y0) * curvature
        b = hk * dk - (v - y0) * curvature
        c = -s * (v - y0)
        root = (b.pow(2) - 4 * a * c).clamp(min=torch.finfo(b.dtype).tiny).sqrt()
        # The root in [0, 1] without cancellation: 2c / (-b - root) when b >= 0, else
        # (-b + root) / 2a (then a > 0); the unused branch gets a harmless denominator.
        stable = b >= 0
        theta = torch.where(
            stable,
            2 * c / torch.where(stable, -b - root, -torch.ones_like(b)),
            (root - b) / torch.where(stable, torch.ones_like(a), 2 * a),
        ).clamp(0, 1)
        out = torch.minimum(x0 + theta * wk, _gather(xk[..., 1:], k))
    else:
        theta = ((v - x0) / wk).clamp(0, 1)
        t1t = theta * (1 - theta)
        out = y0 + hk * (s * theta.pow(2) + dk * t1t) / (s + curvature * t1t)
        out = torch.minimum(out, _gather(yk[..., 1:], k))  # monotone across knots despite rounding
    t1t = theta * (1 - theta)
    denominator = s + curvature * t1t
    log_det = (
        2 * s.log()
        + (dk1 * theta.pow(2) + 2 * s * t1t + dk * (1 - theta).pow(2)).log()
        - 2 * denominator.log()
    )
    if inverse:
        log_det = -log_det
    out = torch.where(inside, out, inputs)
    log_det = torch.where(inside, log_det, torch.zeros_like(log_det))
    return out, log_det


class _ConditionedSpline(ConditionedSpline):
    """Pyro's elementwise spline with given parameters, computed by :func:`rational_quadratic_spline`."""

    def spline_op(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w, h, d, _ = self._params() if callable(self._params) else self._params
        return rational_quadratic_spline(x, w, h, d, bound=self.bound, **kwargs)


class _ConditionalSpline(ConditionalSpline):
    def condition(self, context: torch.Tensor) -> _ConditionedSpline:
        return _ConditionedSpline(partial(self._params, context), bound=self.bound, order="quadratic")


class SplineAutoregressive(T.SplineAutoregressive):
    """Pyro's :class:`~pyro.distributions.transforms.SplineAutoregressive` (quadratic order) on
    :func:`rational_quadratic_spline`. ``autoregressive_nn`` must output ``count_bins`` widths,
    ``count_bins`` heights and ``count_bins - 1`` derivatives per dimension."""

    def __init__(
        self, input_dim: int, autoregressive_nn: Any, count_bins: int = 8, bound: float = 3.0
    ) -> None:
        super().__init__(input_dim, autoregressive_nn, count_bins, bound, order="quadratic")
        self.spline = _ConditionalSpline(autoregressive_nn, input_dim, count_bins, bound, "quadratic")


class ConditionalSplineAutoregressive(T.ConditionalSplineAutoregressive):
    """Pyro's :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive` whose
    conditioned transforms are :class:`SplineAutoregressive` (quadratic order)."""

    def __init__(self, input_dim: int, autoregressive_nn: Any, count_bins: int = 8, bound: float = 3.0) -> None:
        super().__init__(input_dim, autoregressive_nn, count_bins=count_bins, bound=bound)

    def condition(self, context: torch.Tensor) -> SplineAutoregressive:
        cond_nn = partial(self.nn, context=context)
        cond_nn.permutation = cond_nn.func.permutation  # type: ignore[attr-defined]
        cond_nn.get_permutation = cond_nn.func.get_permutation  # type: ignore[attr-defined]
        return SplineAutoregressive(self.input_dim, cond_nn, **self.kwargs)

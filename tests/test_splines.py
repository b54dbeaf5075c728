"""The rational-quadratic spline and its inverse at and around every knot (pyrovae.splines).

Pyro's inverse picks the bin with ``searchsorted(knots + 1e-6)``: a value a few ulps above a knot
lands in the bin below, where the quadratic has no real root, and a bare ``AssertionError`` stops
training. These tests put values exactly at every knot of a *saturated* spline (bins at the
minimum height, knot slopes near the minimum) and a few ulps on either side, in float32 and
float64.
"""

from __future__ import annotations

import pyro.distributions.transforms as T
import pytest
import torch
from torch.nn import functional as F

from conftest import assert_close
from pyrovae.splines import (
    ConditionalSplineAutoregressive,
    SplineAutoregressive,
    _knots,
    rational_quadratic_spline,
)

K = 8
BOUND = 3.0
MIN = 1e-3


def _saturated(dtype: torch.dtype, num_dims: int = 8) -> tuple[torch.Tensor, ...]:
    """Bin fractions where many bins sit at the minimum size and knot derivatives near the
    minimum slope (logits of scale 8), so that the discriminant at a knot, ~h^2 d^2, is a few
    ulps from zero; with seed 0 Pyro's own inverse fails on these in float32."""
    g = torch.Generator().manual_seed(0)
    w = F.softmax(8 * torch.randn(num_dims, K, generator=g, dtype=dtype), -1)
    h = F.softmax(8 * torch.randn(num_dims, K, generator=g, dtype=dtype), -1)
    d = F.softplus(8 * torch.randn(num_dims, K - 1, generator=g, dtype=dtype))
    return w, h, d


def _near_knots(knots: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """Every knot (per dimension) and its ``ulps`` float neighbours on each side,
    shape ``(num_points, num_dims)``."""
    cols = []
    for k in knots.unbind(-1):
        below, above = k.clone(), k.clone()
        cols.append(k)
        for _ in range(ulps):
            below = torch.nextafter(below, torch.full_like(below, -torch.inf))
            above = torch.nextafter(above, torch.full_like(above, torch.inf))
            cols += [below, above]
    return torch.stack(cols, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_at_and_around_every_knot(dtype):
    w, h, d = _saturated(dtype)
    heights = MIN + (1 - MIN * K) * h
    yk, _ = _knots(heights, BOUND)
    y = _near_knots(yk)
    x, log_det_inv = rational_quadratic_spline(y, w, h, d, inverse=True, bound=BOUND)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(log_det_inv).all())
    y_back, log_det = rational_quadratic_spline(x, w, h, d, bound=BOUND)
    assert bool(torch.isfinite(log_det).all())
    # forward(inverse(y)) == y up to the rounding of x itself, which the forward map amplifies
    # by its slope g'(x) (steep bins): |dy| <= 8 eps (|y| + |x| g'(x)).
    eps = torch.finfo(dtype).eps
    tol = 8 * eps * (y.abs() + x.abs() * log_det.exp())
    assert bool(((y_back - y).abs() <= tol).all()), (y_back - y).abs().max()
    if dtype == torch.float64:
        # log|g'| varies by ~10 nats across a saturated bin, so in float32 the rounding of the
        # knots alone moves it visibly; the identity is checked where rounding is negligible.
        assert_close(log_det, -log_det_inv, rtol=0, atol=1e-6, msg="log-dets cancel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_at_and_around_every_knot(dtype):
    w, h, d = _saturated(dtype)
    widths = MIN + (1 - MIN * K) * w
    xk, _ = _knots(widths, BOUND)
    x = _near_knots(xk)
    y, log_det = rational_quadratic_spline(x, w, h, d, bound=BOUND)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(log_det).all())
    # Monotone up to rounding: along each dimension, sorting x sorts y within a few ulps of y
    # (a steep bin's ratio rounds to ~1 ulp of its height).
    order = x.argsort(0)
    ys = y.gather(0, order)
    ulps = 4 * torch.finfo(dtype).eps * BOUND
    assert bool((ys[1:] >= ys[:-1] - ulps).all())
    # and the inverse maps every one back to its x (well conditioned where g' is not tiny)
    x_back, _ = rational_quadratic_spline(y, w, h, d, inverse=True, bound=BOUND)
    eps = torch.finfo(dtype).eps
    assert bool(((x_back - x).abs() <= 16 * eps * (x.abs() + y.abs() / log_det.exp())).all())


def test_pyro_inverse_fails_where_ours_holds():
    """The failure this module exists for, so the test above is known to reach it."""
    from pyro.distributions.transforms.spline import _monotonic_rational_spline

    w, h, d = _saturated(torch.float32)
    yk, _ = _knots(MIN + (1 - MIN * K) * h, BOUND)
    y = _near_knots(yk)
    with pytest.raises(AssertionError):
        _monotonic_rational_spline(y, w, h, d, None, inverse=True, bound=BOUND)


def test_log_det_equals_the_derivative_float64():
    """log|g'(x)| against a central finite difference, away from the knots, in float64."""
    g = torch.Generator().manual_seed(1)
    w = F.softmax(torch.randn(3, K, generator=g, dtype=torch.float64), -1)
    h = F.softmax(torch.randn(3, K, generator=g, dtype=torch.float64), -1)
    d = F.softplus(torch.randn(3, K - 1, generator=g, dtype=torch.float64))
    x = torch.linspace(-3.4, 3.4, 301, dtype=torch.float64).unsqueeze(-1).expand(-1, 3)
    eps = 1e-6
    y, log_det = rational_quadratic_spline(x, w, h, d)
    y_plus, _ = rational_quadratic_spline(x + eps, w, h, d)
    y_minus, _ = rational_quadratic_spline(x - eps, w, h, d)
    numeric = ((y_plus - y_minus) / (2 * eps)).log()
    assert_close(log_det, numeric, rtol=0, atol=1e-5)
    # identity outside the box, and the derivative is continuous at its edges (slope 1)
    outside = x.abs() > BOUND
    assert_close(y[outside], x[outside], rtol=0, atol=0)
    edge = torch.tensor([[-BOUND + 1e-12] * 3, [BOUND - 1e-12] * 3], dtype=torch.float64)
    _, log_det_edge = rational_quadratic_spline(edge, w, h, d)
    assert_close(log_det_edge, torch.zeros_like(log_det_edge), rtol=0, atol=1e-6)


def test_autoregressive_spline_transforms_round_trip():
    """The transforms the families and the flow prior use: inverse(forward(z)) == z, and
    log|det J| against the autograd Jacobian, float64."""
    from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN

    torch.manual_seed(0)
    D, C = 3, 4
    t = SplineAutoregressive(D, AutoRegressiveNN(D, [8], param_dims=[K, K, K - 1]), K).double()
    ct = ConditionalSplineAutoregressive(
        D, ConditionalAutoRegressiveNN(D, C, [8], param_dims=[K, K, K - 1]), K
    ).double()
    z = torch.randn(5, D, dtype=torch.float64)
    context = torch.randn(5, C, dtype=torch.float64)
    for transform in (t, ct.condition(context)):
        y = transform(z)
        z_back = transform.inv(y.clone())
        assert_close(z_back, z, rtol=0, atol=1e-10)
        for i in range(5):
            jac = torch.autograd.functional.jacobian(
                lambda v: (t if transform is t else ct.condition(context[i:i + 1]))(v.unsqueeze(0))[0],
                z[i],
            )
            expected = torch.linalg.slogdet(jac)[1]
            assert_close(transform.log_abs_det_jacobian(z, y)[i], expected, rtol=0, atol=1e-8)

r"""Annealed importance sampling (AIS) of :math:`\log p(x)`, and the BDMC sandwich.

AIS (Neal 2001 [1]) estimates :math:`p(x) = \int p(x, z)\, dz` per datapoint by moving draws
from a start distribution :math:`\pi_0(z)` -- the encoder's :math:`q(z \mid x)` or the prior
:math:`p(z)` -- to the posterior :math:`p(z \mid x) \propto p(x, z)` through the geometric path

.. math::

    f_t(z) = \pi_0(z)^{1 - \beta_t}\, p(x, z)^{\beta_t}, \qquad
    0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

with one HMC transition leaving :math:`f_t` invariant between consecutive distributions. Each
chain's log-weight is

.. math::

    \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})\, h(z_{t-1}), \qquad
    h(z) = \log p(x, z) - \log \pi_0(z),

with :math:`z_0 \sim \pi_0` and :math:`z_t \sim T_t(\cdot \mid z_{t-1})`; then
:math:`\mathbb E[w] = p(x)` and :math:`\log \frac1C \sum_c w_c` over ``C`` chains is a stochastic
lower bound on :math:`\log p(x)` (Wu et al. 2017 [2] evaluate decoder-based models this way).
:math:`\beta_t` follows the sigmoid schedule of Grosse et al. (2015) [3].

The HMC transitions are vectorized over datapoints and chains (Pyro's
:func:`pyro.ops.integrator.velocity_verlet`, identity mass matrix, ``leapfrog_steps`` steps);
latent sites with a constrained support move in the unconstrained space of
``biject_to(support)`` with the log-Jacobian in the target. Each datapoint has its own step
size, adapted during the run toward an acceptance rate of 0.65: after each transition it is
multiplied by :math:`\exp(\kappa(\bar a - 0.65))`, :math:`\bar a` the mean acceptance
probability over that datapoint's chains, :math:`\kappa = 0.5` (a proportional version of Wu et
al.'s x1.02 / x0.98 rule, which needs thousands of steps to move a step size far from its start).

The log-joint comes from the model's trace: the latent sites are conditioned on ``z`` and each
site's unscaled ``log_prob`` summed per datapoint, so any model built from any parts (or any
Pyro model with its sites in the data plate) is annealed the same way.

BDMC (Grosse, Ghahramani & Adams 2015 [3]). On data simulated from the model,
:math:`z^\star \sim p(z)`, :math:`x \sim p(x \mid z^\star)`, the generating :math:`z^\star` is an
exact posterior sample of :math:`p(z \mid x)`. Reverse AIS started there and run from
:math:`\beta = 1` down to 0 estimates :math:`1/p(x)` without bias, so
:math:`-\log \frac1C \sum_c w^{\mathrm{rev}}_c` is a stochastic *upper* bound; with forward AIS
the two sandwich :math:`\log p(x)`, and the sandwich's width bounds the error of either.

References:

1. R. M. Neal (2001). Annealed importance sampling. Statistics and Computing 11.
2. Y. Wu, Y. Burda, R. Salakhutdinov, R. Grosse (2017). On the quantitative analysis of
   decoder-based generative models. ICLR.
3. R. B. Grosse, Z. Ghahramani, R. P. Adams (2015). Sandwiching the marginal likelihood using
   bidirectional Monte Carlo. arXiv:1511.02543.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions.transforms import biject_to
from pyro.ops.integrator import velocity_verlet

from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError, PyrovaeWarning
from .options import EstimateOptions, resolve_options
from .evaluation import (
    Scorable,
    Estimate,
    Program,
    chunks,
    gather_parts,
    no_draws,
    resolve_group,
    evaluating,
    frozen,
    mean_stderr,
    refuse_local,
)

__all__ = ["AISConvergenceWarning", "AISResult", "BDMCResult", "ais", "bdmc", "sigmoid_schedule"]

#: The acceptance rate the step sizes are adapted toward (Neal 2011; Wu et al. 2017).
TARGET_ACCEPTANCE = 0.65
#: Step-size adaptation gain: :math:`\epsilon \leftarrow \epsilon\, e^{\kappa (\bar a - 0.65)}`.
_ADAPT_GAIN = 0.5
_STEP_MIN, _STEP_MAX = 1e-4, 2.0
#: AIS keeps autograd graphs of the decoder: its rows cost this many times an IS row.
_AUTOGRAD_FACTOR = 4
#: The start distributions :math:`\pi_0`.
STARTS = ("encoder", "prior", "defensive")
#: The encoder's share of the defensive start :math:`w\, q(z \mid x) + (1 - w)\, p(z)`.
DEFENSIVE_WEIGHT = 0.5


@dataclass(frozen=True)
class AISResult(Estimate):
    r"""AIS estimates of :math:`\log p(x)` per datapoint (an :class:`~pyrovae.evaluation.Estimate`).

    :ivar values: per datapoint, :math:`\log \frac1C \sum_c w_c` over the chains (a stochastic
        lower bound for forward AIS, an upper bound for reverse AIS), shape ``(num_datapoints,)``.
    :ivar mean: their mean; :ivar stderr: its standard error over datapoints.
    :ivar log_weights: the chains' log-weights, shape ``(num_chains, num_datapoints)``.
    :ivar chain_stderr: per datapoint, the Monte Carlo standard error of ``values`` over the
        chains by the delta method, :math:`\sqrt{\widehat{\mathrm{Var}}(w) / (C\, \bar w^2)}`
        (``nan`` where the weights are not finite).
    :ivar acceptance: per datapoint, the mean HMC acceptance probability over chains and
        transitions.
    :ivar step_size: per datapoint, the leapfrog step size at the end of the run.
    :ivar num_intermediate: ``T``, the number of annealing steps.
    :ivar num_chains: ``C``; :ivar leapfrog_steps: leapfrog steps per transition.
    :ivar start: ``"encoder"`` or ``"prior"`` (the start distribution :math:`\pi_0`).
    :ivar direction: ``"forward"`` (lower bound) or ``"reverse"`` (upper bound, BDMC).
    :ivar num_nonfinite_weights: datapoints with a non-finite chain log-weight.
    :ivar check_intermediate: ``T_c``, the steps of the convergence check's independent shorter
        run (``0``: no check).
    :ivar values_check: per datapoint, the estimate of that shorter run.
    :ivar discrepancy: per datapoint, ``values - values_check``. AIS's bias shrinks as ``T``
        grows (about like ``1/T`` once it mixes), so a long run well above a short one has not
        converged; the discrepancy is at least the bias left at ``T_c``.
    :ivar total_stderr: per datapoint,
        :math:`\sqrt{\mathrm{se}_{\mathrm{chains}}^2 + d^2}` with :math:`d` the discrepancy:
        the error to state (see :attr:`error`).
    :ivar converged: ``None`` without a check; else whether the mean discrepancy is within
        :data:`CONVERGENCE_TOL` nats or 3 of its standard errors over datapoints (not
        significantly positive); ``False`` also warns (:class:`AISConvergenceWarning`).
    :ivar convergence: one line on the check.
    """

    log_weights: torch.Tensor | None = None
    chain_stderr: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    step_size: torch.Tensor | None = None
    num_intermediate: int = 0
    num_chains: int = 0
    leapfrog_steps: int = 0
    start: str = "encoder"
    direction: str = "forward"
    num_nonfinite_weights: int = 0
    check_intermediate: int = 0
    values_check: torch.Tensor | None = None
    discrepancy: torch.Tensor | None = None
    total_stderr: torch.Tensor | None = None
    converged: bool | None = None
    convergence: str | None = None

    @property
    def mean_acceptance(self) -> float:
        return float(self.acceptance.double().mean())

    @property
    def error(self) -> torch.Tensor:
        r"""Per datapoint, the error to state: ``total_stderr`` where the convergence check ran
        (the chains' standard error and the discrepancy to the shorter schedule in quadrature),
        else ``chain_stderr`` (which covers the Monte Carlo noise only, not the bias)."""
        return self.chain_stderr if self.total_stderr is None else self.total_stderr

    @property
    def mean_error(self) -> float:
        r"""The Monte Carlo error of ``mean`` (not its spread over datapoints):
        :math:`\sqrt{\sum_n e_n^2} / n` over the finite per-datapoint ``error`` :math:`e_n`."""
        e = self.error[torch.isfinite(self.error)].double()
        return float(e.pow(2).sum().sqrt() / e.numel()) if e.numel() else float("nan")

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        out = super().to_dict(per_datapoint)
        out["mean_acceptance"] = self.mean_acceptance
        finite = self.chain_stderr[torch.isfinite(self.chain_stderr)]
        out["mean_chain_stderr"] = float(finite.mean()) if finite.numel() else None
        out["mean_error"] = self.mean_error
        if self.discrepancy is not None:
            d = self.discrepancy[torch.isfinite(self.discrepancy)].double()
            out["mean_discrepancy"] = float(d.mean()) if d.numel() else None
        pd = out.get("per_datapoint", {})
        pd.pop("log_weights", None)
        pd.pop("converged", None)
        for name in ("values_check", "discrepancy", "total_stderr"):
            if name in pd and getattr(self, name) is None:
                pd.pop(name)
        return out

    def __str__(self) -> str:
        bound = "lower" if self.direction == "forward" else "upper"
        text = (
            f"{Estimate.__str__(self)[:-1]}, AIS {self.direction} ({bound} bound), "
            f"T={self.num_intermediate}, C={self.num_chains}, start={self.start}, "
            f"acceptance {self.mean_acceptance:.2f}, Monte Carlo error {self.mean_error:.3f})"
        )
        if self.converged is False:
            text += f"; NOT CONVERGED: {self.convergence}"
        return text


@dataclass(frozen=True)
class BDMCResult(Estimate):
    r"""The BDMC sandwich on simulated data: ``values`` are the per-datapoint widths
    upper - lower (nats), ``mean``/``stderr`` their mean and standard error.

    :ivar lower: forward AIS (stochastic lower bound), an :class:`AISResult`.
    :ivar upper: reverse AIS from the exact posterior sample (stochastic upper bound).
    :ivar importance: IWAE bounds :math:`L_K` on the same data for ``is_samples``
        (an :class:`~pyrovae.importance.IWAEBounds`), or ``None``.
    :ivar data: the simulated data, shape ``(num_points, ...)``.
    """

    lower: AISResult | None = None
    upper: AISResult | None = None
    importance: Any = None
    data: torch.Tensor | None = None

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "width": {"mean": self.mean, "stderr": self.stderr},
            "lower": self.lower.to_dict(per_datapoint),
            "upper": self.upper.to_dict(per_datapoint),
            "num_datapoints": self.num_datapoints,
        }
        if self.importance is not None:
            out["importance"] = {
                f"K={k}": {"mean": float(m), "stderr": float(e),
                           "below_lower_by": self.lower.mean - float(m)}
                for k, m, e in zip(
                    self.importance.num_samples, self.importance.means, self.importance.stderrs
                )
            }
        return out

    def __str__(self) -> str:
        text = (
            f"BDMC: {self.lower.mean:.2f} <= log p(x) <= {self.upper.mean:.2f} "
            f"(width {self.mean:.2f} ± {self.stderr:.2f} nats, n={self.num_datapoints}, "
            f"T={self.lower.num_intermediate})"
        )
        if self.importance is not None:
            text += "; IS " + ", ".join(
                f"K={k}: {float(m):.2f}"
                for k, m in zip(self.importance.num_samples, self.importance.means)
            )
        return text


def sigmoid_schedule(num_intermediate: int, delta: float = 4.0, dtype: Any = torch.float64) -> torch.Tensor:
    r"""The sigmoid schedule of Grosse et al. (2015), shape ``(T + 1,)`` from 0 to 1:

    .. math::

        \tilde\beta_t = \sigma\big(\delta (2t/T - 1)\big), \qquad
        \beta_t = \frac{\tilde\beta_t - \tilde\beta_0}{\tilde\beta_T - \tilde\beta_0}.
    """
    t = torch.linspace(-delta, delta, num_intermediate + 1, dtype=torch.float64)
    s = torch.sigmoid(t)
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas.to(dtype)


def _unconstraining(name: str, support: Any) -> Any:
    """``biject_to(support)``, looking through wrappers such as a mixture's support."""
    constraint = support
    while constraint is not None:
        try:
            return biject_to(constraint)
        except NotImplementedError:
            constraint = getattr(constraint, "base_constraint", None)
    raise ConfigError(
        f"the latent site {name!r} has support {support}, which has no bijection to the reals; "
        "AIS moves continuous latents only"
    )


class _Annealer:
    """The annealed target of one batch: packs the latent sites into one unconstrained tensor
    ``u`` of shape ``(C, B, D)`` and evaluates :math:`a = \\log \\pi_0 + \\log|J|` and
    :math:`h = \\log p(x, z) - \\log \\pi_0` at it."""

    def __init__(self, program: Program, x: torch.Tensor, idx: torch.Tensor, num_chains: int, start: str) -> None:
        self.program, self.x, self.idx = program, x, idx
        self.C, self.B = num_chains, int(x.shape[0])
        self.start = start
        self.sites = []
        for name in program.latent:
            transform = _unconstraining(name, program.latent_supports[name])
            self.sites.append((name, program.latent_shapes[name], transform))
        self.a = self.h = None

    def pack(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name, _, transform in self.sites:
            u = transform.inv(z[name])
            parts.append(u.reshape(self.C, self.B, -1))
        return torch.cat(parts, -1).detach()

    def unpack(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z, log_det = {}, u.new_zeros(self.C, self.B)
        offset = 0
        for name, shape, transform in self.sites:
            d = math.prod(shape)
            ui = u[..., offset : offset + d].reshape((self.C, self.B) + tuple(shape))
            offset += d
            zi = transform(ui)
            ladj = transform.log_abs_det_jacobian(ui, zi)
            if ladj.dim() > 2:
                ladj = ladj.reshape(self.C, self.B, -1).sum(-1)
            log_det = log_det + ladj.expand(self.C, self.B)
            z[name] = zi
        return z, log_det

    def evaluate(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self.unpack(u)
        prior, lik, q = self.program.log_densities(
            self.x, self.idx, z, self.C, with_guide=self.start != "prior"
        )
        if self.start == "prior":
            return prior + log_det, lik
        if self.start == "defensive":  # pi_0 = w q(z|x) + (1 - w) p(z)
            w = DEFENSIVE_WEIGHT
            start = torch.logaddexp(q + math.log(w), prior + math.log1p(-w))
            return start + log_det, prior + lik - start
        return q + log_det, prior + lik - q

    def potential(self, beta: float) -> Any:
        def fn(z: dict[str, torch.Tensor]) -> torch.Tensor:
            a, h = self.evaluate(z["u"])
            self.a, self.h = a.detach(), h.detach()
            return -(a + beta * h).sum()

        return fn


def _anneal(
    program: Program,
    x: torch.Tensor,
    idx: torch.Tensor,
    betas: torch.Tensor,
    *,
    num_chains: int,
    leapfrog_steps: int,
    start: str,
    step_size: float,
    target: float,
    z_init: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Run AIS along ``betas`` (increasing: forward; decreasing: reverse) on one batch.

    :returns: ``(log_w (C, B), mean acceptance (B,), final step size (B,))``; for a reverse run
        :math:`\mathbb E[e^{\log w}] = 1/p(x)`.
    """
    C, B = num_chains, int(x.shape[0])
    ann = _Annealer(program, x, idx, C, start)
    with torch.no_grad():
        if z_init is None and start == "defensive":
            zq = program.sample_latents(x, idx, C, "encoder")
            zp = program.sample_latents(x, idx, C, "prior")
            from_q = torch.rand(C, B, device=x.device) < DEFENSIVE_WEIGHT
            z0 = {k: torch.where(from_q.reshape((C, B) + (1,) * (v.dim() - 2)), v, zp[k])
                  for k, v in zq.items()}
        elif z_init is None:
            z0 = program.sample_latents(x, idx, C, start)
        else:
            z0 = {k: v.unsqueeze(0).expand((C,) + tuple(v.shape)) for k, v in z_init.items()}
        u = ann.pack(z0)
        a, h = ann.evaluate(u)
    dtype = u.dtype
    log_w = torch.zeros(C, B, dtype=dtype, device=u.device)
    eps = torch.full((B,), step_size, dtype=dtype, device=u.device)
    accept_sum = torch.zeros(B, dtype=dtype, device=u.device)
    num_transitions = 0
    T = len(betas) - 1
    for t in range(1, T + 1):
        b_prev, b = float(betas[t - 1]), float(betas[t])
        log_w = log_w + (b - b_prev) * h
        if t == T:
            break
        r = torch.randn_like(u)
        h0 = -(a + b * h) + 0.5 * (r * r).sum(-1)
        u_new, r_new, _, _ = velocity_verlet(
            {"u": u}, {"u": r}, ann.potential(b), lambda r_: r_, eps.view(1, B, 1),
            leapfrog_steps,
        )
        u_new, r_new = u_new["u"].detach(), r_new["u"].detach()
        a_new, h_new = ann.a, ann.h
        h1 = -(a_new + b * h_new) + 0.5 * (r_new * r_new).sum(-1)
        log_accept = h0 - h1
        ok = torch.isfinite(log_accept) & torch.isfinite(u_new).all(-1)
        log_accept = torch.where(ok, log_accept.clamp(max=0.0), torch.full_like(log_accept, -math.inf))
        accept = torch.rand_like(log_accept).log() < log_accept
        u = torch.where(accept.unsqueeze(-1), u_new, u)
        a = torch.where(accept, a_new, a)
        h = torch.where(accept, h_new, h)
        rate = log_accept.exp().mean(0)  # (B,)
        accept_sum = accept_sum + rate
        num_transitions += 1
        eps = (eps * torch.exp(_ADAPT_GAIN * (rate - target))).clamp(_STEP_MIN, _STEP_MAX)
    acceptance = accept_sum / max(1, num_transitions)
    return log_w.detach(), acceptance, eps


def _chain_stderr(log_w: torch.Tensor) -> torch.Tensor:
    r"""Delta-method standard error of :math:`\log \bar w` over the chains (dim 0)."""
    C = log_w.shape[0]
    if C < 2:
        return torch.full(log_w.shape[1:], float("nan"), dtype=log_w.dtype)
    w = torch.exp(log_w - log_w.max(0).values)
    rel_var = w.var(0, unbiased=True) / w.mean(0) ** 2
    se = (rel_var / C).sqrt()
    return torch.where(torch.isfinite(log_w).all(0), se, torch.full_like(se, float("nan")))


def start_for(family: Any, *, new_points: bool = True) -> str:
    """The AIS start a family can take: ``"encoder"`` where it gives :math:`q(z \\mid x)` at any
    ``z`` (and, for ``new_points``, at datapoints it holds no parameters for), else
    ``"prior"`` (a planar or radial flow has no inverse; a per-datapoint family has nothing for
    new points). The CLI and :func:`pyrovae.gaps` choose their default with it."""
    from .families import capability

    anywhere = capability(family, "log_prob_anywhere")
    if new_points and capability(family, "per_datapoint"):
        anywhere = False
    return "encoder" if anywhere else "prior"


def _check_options(num_intermediate: Any, num_chains: Any, leapfrog_steps: Any, start: Any, step_size: Any) -> None:
    check_positive_int(num_intermediate, "num_intermediate")
    check_positive_int(num_chains, "num_chains")
    check_positive_int(leapfrog_steps, "leapfrog_steps")
    check_positive_float(step_size, "step_size")
    if start not in STARTS:
        raise ConfigError(
            f"start must be 'encoder' (q(z|x)), 'prior' (p(z)) or 'defensive' (the mixture "
            f"{DEFENSIVE_WEIGHT} q(z|x) + {1 - DEFENSIVE_WEIGHT} p(z)), got {start!r}"
        )


def _result(log_w: torch.Tensor, acceptance: torch.Tensor, eps: torch.Tensor, sign: float,
            check_log_w: torch.Tensor | None = None, check_intermediate: int = 0,
            **extra: Any) -> AISResult:
    C = log_w.shape[0]
    values = sign * (torch.logsumexp(log_w, 0) - math.log(C))
    mean, stderr = mean_stderr(values)
    chain_se = _chain_stderr(log_w).cpu()
    check: dict[str, Any] = {}
    if check_log_w is not None:
        check = _convergence(values.cpu(), chain_se, check_log_w, extra["num_intermediate"],
                             check_intermediate)
    return AISResult(
        values.cpu(), mean, stderr, log_weights=log_w.cpu(), chain_stderr=chain_se,
        acceptance=acceptance.cpu(), step_size=eps.cpu(), num_chains=C,
        num_nonfinite_weights=int((~torch.isfinite(log_w)).any(0).sum()), **check, **extra,
    )


#: Mean discrepancies between the run and its convergence check below this many nats per
#: datapoint are not called a failure to converge, however small their standard error.
CONVERGENCE_TOL = 0.01


class AISConvergenceWarning(PyrovaeWarning):
    """An AIS run's estimate moved significantly between the convergence check's shorter
    schedule and the full one: its bias is not negligible (raise ``num_intermediate``)."""


def _convergence(values: torch.Tensor, chain_se: torch.Tensor, check_log_w: torch.Tensor,
                 T: int, T_check: int) -> dict[str, Any]:
    r"""The convergence check's fields: per datapoint :math:`d = \hat\ell_T - \hat\ell_{T_c}`
    and the error :math:`\sqrt{\mathrm{se}^2 + d^2}`; over datapoints, whether the mean of
    :math:`d` is significantly positive (by more than :data:`CONVERGENCE_TOL` and 3 standard
    errors)."""
    C = check_log_w.shape[0]
    check_values = (torch.logsumexp(check_log_w, 0) - math.log(C)).cpu()
    d = values - check_values
    total = (chain_se.pow(2) + d.pow(2)).sqrt()
    finite = torch.isfinite(d)
    mean_d, se_d = mean_stderr(d[finite]) if bool(finite.any()) else (float("nan"), float("nan"))
    se_d = 0.0 if math.isnan(se_d) else se_d
    converged = bool(math.isfinite(mean_d) and mean_d <= max(CONVERGENCE_TOL, 3 * se_d))
    line = (f"the estimate moved by {mean_d:+.3f} ± {se_d:.3f} nats per datapoint from T={T_check} "
            f"to T={T}")
    if converged:
        line += " (within error: converged); each datapoint's error includes its own change"
    else:
        line += (f": AIS has not converged at T={T} and its bias is likely of that order; "
                 f"raise num_intermediate (x4 cuts the bias ~4x) or use a better start")
    return dict(check_intermediate=T_check, values_check=check_values, discrepancy=d,
                total_stderr=total, converged=converged, convergence=line)


#: The fields of :class:`~pyrovae.options.EstimateOptions` that :func:`ais` and :func:`bdmc`
#: took as keywords before ``options`` existed (still taken).
_AIS_KEYWORDS = ("max_bytes", "seed", "progress", "local", "process_group")
_BDMC_KEYWORDS = ("max_bytes", "seed", "progress", "local")


def ais(
    vae: Scorable,
    data: Any,
    *,
    num_intermediate: int = 1000,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    start: str = "encoder",
    step_size: float = 0.05,
    target_acceptance: float = TARGET_ACCEPTANCE,
    convergence_check: bool = True,
    max_intermediate: int | None = None,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> AISResult:
    r"""Estimate :math:`\log p(x)` of each datapoint by annealed importance sampling.

    .. math::

        \log \hat p(x) = \log \frac1C \sum_{c=1}^C \exp \sum_{t=1}^T (\beta_t - \beta_{t-1})
        \big(\log p(x, z^c_{t-1}) - \log \pi_0(z^c_{t-1})\big)

    (see the module docstring; a stochastic lower bound, exact as :math:`T \to \infty`).

    :param vae: a :class:`~pyrovae.VAE` or a ``(model, guide)`` pair (see
        :func:`pyrovae.log_likelihood`).
    :param data: a tensor ``(num_datapoints, ...)`` or a dataset of ``(x, idx)``.
    :param num_intermediate: ``T``, annealing steps (the literature uses 1,000-10,000).
    :param num_chains: ``C``, independent chains per datapoint.
    :param leapfrog_steps: leapfrog steps per HMC transition.
    :param start: ``"encoder"``: :math:`\pi_0 = q(z \mid x)` (the guide must evaluate its
        density at any ``z``: not planar or radial flows); ``"prior"``: :math:`\pi_0 = p(z)`;
        ``"defensive"``: :math:`\pi_0 = \frac12 q(z \mid x) + \frac12 p(z)` (the chains that
        start from the prior keep posterior mass the encoder misses within reach).
    :param step_size: the initial leapfrog step size of every datapoint.
    :param target_acceptance: the acceptance rate the step sizes are adapted toward.
    :param convergence_check: also run an independent AIS with ``T // 4`` steps on the same
        datapoints (25% more work) and report the discrepancy: per datapoint in the error
        (``total_stderr``), over the data set in ``converged`` (with an
        :class:`AISConvergenceWarning` when the estimate is still moving). Without it the stated
        ``chain_stderr`` covers the Monte Carlo noise only, and a short schedule's bias goes
        unreported (``benchmarks/results/ais_calibration.md``).
    :param max_intermediate: adaptive schedule: while the convergence check fails, run again
        with 4x the steps (the previous run, at a quarter of them, is its check) up to this
        many; the result's ``num_intermediate`` is the ``T`` used. ``None`` (default): one ``T``.
    :param options: how the estimate is computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it, as before ``options`` existed: ``max_bytes``,
        ``seed``, ``progress``, ``local``, ``process_group``). The budget sets the chains x
        datapoints per batch; ``seed`` seeds every draw; ``local="lookup"`` serves a
        per-datapoint family with ``start="encoder"`` on its own data (``"fit"`` is not offered
        here: use ``start="prior"``); under a ``process_group`` each datapoint's chains and step
        size are its own, so the values equal one process's for the same ``seed``.
        ``compile=True`` is refused (AIS runs through Pyro's tracing).
    :param keywords: the fields of ``options`` as keywords (see ``options``).
    :returns: an :class:`AISResult` (with the per-datapoint acceptance rates).
    """
    options = resolve_options(options, keywords, "ais", takes=_AIS_KEYWORDS)
    options.refuse("ais", "compile")
    seed = options.seed
    _check_options(num_intermediate, num_chains, leapfrog_steps, start, step_size)
    target = check_positive_float(target_acceptance, "target_acceptance")
    program = Program.resolve(vae, "vae")
    if options.local != "lookup" and start != "prior":
        refuse_local(program, f"ais with start={start!r}")
    group = resolve_group(options.process_group, program)
    if max_intermediate is not None:
        check_positive_int(max_intermediate, "max_intermediate")
        if not convergence_check:
            raise ConfigError("max_intermediate raises T until the convergence check passes; "
                              "it needs convergence_check=True")
    dtype = program.dtype

    def run(steps: list[int], run_seed: int | None) -> list[tuple[torch.Tensor, ...]]:
        """One pass over the data; per schedule length in ``steps``: gathered (log_w, acc, eps)."""
        parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in steps]
        with evaluating(program.modules, run_seed), frozen(program.modules):
            for x, idx, _, _ in chunks(
                program, data, num_chains, max_bytes=options.max_bytes,
                max_rows=options.max_rows, progress=options.progress, desc="AIS",
                need_guide=start != "prior", factor=_AUTOGRAD_FACTOR, seed=run_seed,
                group=group,
            ):
                _check_density(program, x, idx, start)
                hmc = dict(num_chains=num_chains, leapfrog_steps=leapfrog_steps,
                               start=start, step_size=step_size, target=target)
                for k, T in enumerate(steps):
                    parts[k].append(_anneal(program, x, idx, sigmoid_schedule(T), **hmc))
        return [tuple(gather_parts([p[i] for p in ps], group, *where, dtype)
                      for i, where in enumerate([(1, (num_chains, 0)), (0, (0,)), (0, (0,))]))
                for ps in parts]

    T = num_intermediate
    check_steps = max(1, T // 4) if convergence_check else 0
    runs = run([T, check_steps] if check_steps else [T], seed)
    main, check = runs[0], (runs[1] if check_steps else None)
    escalation = 0

    def build() -> AISResult:
        return _result(*main, 1.0, check_log_w=None if check is None else check[0],
                       check_intermediate=check_steps, num_intermediate=T,
                       leapfrog_steps=leapfrog_steps, start=start, direction="forward")

    result = build()
    # Adaptive: T x 4 until the check passes; the previous run (at the new T / 4, on its own
    # draws) is the new run's check, so each step costs only the new run.
    while max_intermediate is not None and result.converged is False and 4 * T <= max_intermediate:
        escalation += 1
        check, check_steps, T = main, T, 4 * T
        (main,) = run([T], None if seed is None else seed + 7919 * escalation)
        result = build()
    if result.converged is False:
        import warnings

        warnings.warn(result.convergence, AISConvergenceWarning, stacklevel=2)
    return result



def _check_density(program: Program, x: torch.Tensor, idx: torch.Tensor, start: str) -> None:
    """Refuse a guide that cannot evaluate :math:`\\log q(z \\mid x)` at points it did not draw."""
    if start == "prior" or getattr(program, "_density_checked", False):
        return
    with torch.no_grad(), no_draws():  # the seeded draws of the batch are not shifted
        z = program.sample_latents(x[:1], idx[:1], 1, "prior")
        try:
            program.log_densities(x[:1], idx[:1], z, 1, with_guide=True)
        except (NotImplementedError, KeyError) as exc:
            raise ConfigError(
                f"ais with start='encoder' needs q(z|x) at points it did not sample, which this "
                f"guide cannot evaluate ({type(exc).__name__}, e.g. a planar or radial flow); "
                "use start='prior'"
            ) from None
    program._density_checked = True


def bdmc(
    vae: Scorable,
    num_points: int,
    *,
    num_intermediate: int = 1000,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    start: str = "encoder",
    step_size: float = 0.05,
    target_acceptance: float = TARGET_ACCEPTANCE,
    is_samples: tuple[int, ...] | None = (1000, 5000),
    example: torch.Tensor | None = None,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> BDMCResult:
    r"""Bidirectional Monte Carlo (Grosse et al. 2015) on ``num_points`` simulated datapoints.

    Draws :math:`z^\star_n \sim p(z)`, :math:`x_n \sim p(x \mid z^\star_n)`, then

    .. math::

        \underbrace{\log \tfrac1C \textstyle\sum_c w^{\mathrm{fwd}}_c}_{\text{lower}}
        \;\lesssim\; \log p(x_n) \;\lesssim\;
        \underbrace{-\log \tfrac1C \textstyle\sum_c w^{\mathrm{rev}}_c}_{\text{upper}},

    forward AIS from :math:`\pi_0` and reverse AIS from :math:`z^\star_n` (an exact posterior
    sample). Both hold in expectation; their gap bounds the error of each on such data.
    Importance sampling with ``K`` in ``is_samples`` on the same data shows where IS falls.

    :param vae: a :class:`~pyrovae.VAE` or a ``(model, guide)`` pair (a pair needs
        ``example``, a batch of real data whose shape the simulated data take).
    :param num_points: simulated datapoints.
    :param is_samples: the ``K`` of the importance-sampling comparison (``None``: skip it).
    :param example: for a pair, a tensor ``(n, ...)`` whose row shape the data have.
    :param options: how the estimate is computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it, as before ``options`` existed: ``max_bytes``,
        ``seed``, ``progress``, ``local``). ``local``: for a per-datapoint family (which needs
        ``start="prior"``), the proposals of the importance-sampling comparison, as for
        :func:`pyrovae.log_likelihood` (``"fit"`` fits each simulated point's own). The
        comparison draws with ``seed + 1``. BDMC runs in one process and through Pyro's
        tracing: ``process_group`` and ``compile`` are refused.
    :param keywords: the fields of ``options`` as keywords (see ``options``).
    :returns: a :class:`BDMCResult` (``values``: the per-datapoint widths).
    """
    options = resolve_options(options, keywords, "bdmc", takes=_BDMC_KEYWORDS)
    options.refuse("bdmc", "process_group", "compile")
    seed = options.seed
    _check_options(num_intermediate, num_chains, leapfrog_steps, start, step_size)
    target = check_positive_float(target_acceptance, "target_acceptance")
    num_points = check_positive_int(num_points, "num_points")
    program = Program.resolve(vae, "vae")
    if start != "prior":
        refuse_local(program, f"bdmc with start={start!r}")
    if program.vae is None and example is None:
        raise ConfigError(
            "bdmc of a (model, guide) pair needs example=<a batch of real data> to know the "
            "shape of the data to simulate"
        )
    lowers, uppers = [], []
    with evaluating(program.modules, seed), frozen(program.modules):
        if example is None:
            with torch.no_grad():
                example = program.vae.sample(1, mean=False)
        device = program.device(example)
        template = example[:1].to(device)
        template = template.expand((num_points,) + tuple(template.shape[1:])).clone()
        idx_all = torch.arange(num_points, device=device)
        program.analyze(template, idx_all, need_guide=start != "prior")
        with torch.no_grad():
            x_all, z_all = program.simulate(template)
        betas = sigmoid_schedule(num_intermediate)
        from .evaluation import rows_per_chunk

        rows = rows_per_chunk(program, options.max_bytes, options.max_rows, _AUTOGRAD_FACTOR)
        points = max(1, rows // num_chains)
        from tqdm.auto import tqdm

        with tqdm(total=num_points, desc="BDMC", unit="pt", disable=not options.progress, leave=False) as bar:
            for s in range(0, num_points, points):
                x, idx = x_all[s : s + points], idx_all[s : s + points]
                z = {k: v[s : s + points] for k, v in z_all.items()}
                _check_density(program, x, idx, start)
                hmc = dict(num_chains=num_chains, leapfrog_steps=leapfrog_steps, start=start,
                               step_size=step_size, target=target)
                lowers.append(_anneal(program, x, idx, betas, **hmc))
                uppers.append(_anneal(program, x, idx, betas.flip(0), z_init=z, **hmc))
                bar.update(int(x.shape[0]))
    common = dict(num_intermediate=num_intermediate, leapfrog_steps=leapfrog_steps, start=start)

    def cat(parts: list, sign: float, direction: str) -> AISResult:
        return _result(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts]),
                       torch.cat([p[2] for p in parts]), sign, direction=direction, **common)

    lower, upper = cat(lowers, 1.0, "forward"), cat(uppers, -1.0, "reverse")
    importance = None
    if is_samples:
        from .importance import iwae_bounds

        importance = iwae_bounds(
            vae, x_all.cpu() if program.vae is None else x_all, tuple(is_samples),
            options=options.seeded(1).replace(progress=False),
        )
    width = upper.values - lower.values
    mean, stderr = mean_stderr(width)
    return BDMCResult(width, mean, stderr, lower=lower, upper=upper, importance=importance,
                      data=x_all.detach().cpu())

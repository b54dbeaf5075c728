r"""The inference gap and its two parts: approximation and amortization (Cremer et al. 2018).

For a datapoint :math:`x`, a VAE's amortized guide :math:`q(z \mid x)` falls short of
:math:`\log p(x)` by the *inference gap* :math:`\log p(x) - \mathcal L[q]`, which splits at
:math:`q^*`, the best member of the same variational family for this one datapoint:

.. math::

    \underbrace{\log p(x) - \mathcal L[q]}_{\text{inference gap}}
    = \underbrace{\log p(x) - \mathcal L[q^*]}_{\text{approximation gap}}
    + \underbrace{\mathcal L[q^*] - \mathcal L[q]}_{\text{amortization gap}},
    \qquad q^* = \arg\max_{q' \in \mathcal Q} \mathcal L[q'],

with :math:`\mathcal L[q] = \mathbb E_{q(z \mid x)}[\log p(x \mid z) + \log p(z) - \log q(z \mid x)]`.
The approximation gap is what the family's shape costs (:math:`\mathrm{KL}(q^* \| p(z \mid x))`);
the amortization gap is what sharing one encoder across datapoints costs.

:func:`gaps` estimates, per datapoint,

- :math:`\log p(x)` by importance sampling with the amortized guide as proposal
  (:func:`pyrovae.importance.log_likelihood`, ``num_samples`` draws, with PSIS :math:`\hat k`;
  the optimized :math:`q^*` is *not* used as a proposal: a diagonal :math:`q^*` is narrower than
  the posterior, and its rare huge weights make the estimate overshoot);
- :math:`\mathcal L[q]` by Monte Carlo with ``num_elbo_samples`` draws;
- :math:`\mathcal L[q^*]` by optimizing each datapoint's own variational parameters
  (the family's ``local_params(x, idx)``, started at the encoder's output, turned into a
  distribution by ``family.distribution_from_params``) with the decoder and the prior fixed,
  until the ELBO stops improving, then estimating the ELBO with ``num_elbo_samples`` draws
  (if that falls below :math:`\mathcal L[q]`, the encoder's output was already the best member
  found, and :math:`\mathcal L[q^*] = \mathcal L[q]`: the amortization gap is never negative).

The ELBOs of different datapoints are independent sums, so a whole batch is optimized jointly by
one :class:`torch.optim.Adam` (Adam is elementwise, so this is the same as one optimizer per
datapoint). For a :class:`~pyrovae.families.Flow` the local parameters are the base family's
parameters and the flow's context vector; the flow's shared networks stay as trained.

Reference: C. Cremer, X. Li, D. Duvenaud (2018). Inference suboptimality in variational
autoencoders. ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError
from .evaluation import (
    Scorable,
    DEFAULT_MAX_BYTES,
    Estimate,
    Program,
    check_budget,
    evaluating,
    frozen,
    mean_stderr,
)
from .importance import elbo, log_likelihood

__all__ = ["GapResult", "gaps", "optimal_elbo", "plot_gaps"]


_mean_stderr = mean_stderr


#: An approximation gap below zero by more than its standard error plus this slack (nats) is an
#: estimator failure: log p(x) was under-estimated (the slack absorbs rounding when q is exact).
FAILURE_SLACK = 1e-3


#: The precision (nats per datapoint) :func:`gaps` aims to resolve the mean gaps to; a larger
#: Monte Carlo error of log p(x) by AIS is reported in ``unresolved``.
RESOLUTION = 0.05


#: AIS settings of :func:`gaps` unless ``ais_options`` says otherwise: those of
#: :func:`pyrovae.ais` (T = 1000, 16 chains, 10 leapfrog steps, with its convergence check).
#: T = 100 with 4 chains (the former defaults) put the approximation gap of a linear-Gaussian toy
#: (latent 2, data 6, 40 points, untrained encoder; closed form 0.008 nats) at 0.071, with
#: log p(x) over-estimated by 0.056 (the larger of IS and a noisy AIS); these give 0.025 and 0.010.
_GAPS_AIS = {"num_intermediate": 1000, "num_chains": 16, "leapfrog_steps": 10, "start": "encoder"}


@dataclass(frozen=True)
class GapResult(Estimate):
    r"""Per-datapoint :math:`\log p(x)`, :math:`\mathcal L[q^*]`, :math:`\mathcal L[q]` and the gaps.

    An :class:`~pyrovae.evaluation.Estimate` whose ``values`` are the per-datapoint
    approximation gaps :math:`\log p(x) - \mathcal L[q^*]` (``mean``, ``stderr`` theirs). All
    tensors have shape ``(num_datapoints,)``, in nats, on the CPU.

    :ivar log_px: the best :math:`\log p(x)` available: importance sampling with the encoder
        (an IWAE bound) or AIS, whichever has the larger mean (both are stochastic lower bounds);
        ``log_px_estimator`` says which.
    :ivar elbo_optimal: :math:`\mathcal L[q^*]`, the ELBO of the locally optimized member.
    :ivar elbo_amortized: :math:`\mathcal L[q]`, the ELBO of the amortized guide.
    :ivar khat: PSIS :math:`\hat k` of the importance sampling per datapoint (``nan`` if
        ``K < 25``, ``-inf`` for equal weights; see :func:`pyrovae.importance.psis_khat`).
    :ivar num_steps: optimizer steps taken for each datapoint's batch.
    :ivar settings: the estimator settings (``num_samples``, ``num_elbo_samples``, ...).
    :ivar log_px_estimator: ``"is"`` or ``"ais"``, the estimator behind ``log_px``.
    :ivar log_px_candidates: ``{"is": mean, "ais": mean}`` of the estimators that were run.
    :ivar estimator_failure: ``None``, or one line saying why the result is not to be read as
        gaps (an approximation gap below zero by more than its standard error means
        :math:`\log p(x)` was under-estimated: :math:`\log p(x) \ge \mathcal L[q^*]` always).
    :ivar log_px_error: the Monte Carlo error of the mean :math:`\log p(x)` where AIS gave it
        (:attr:`pyrovae.ais.AISResult.mean_error`: the chains' noise and the discrepancy of
        its convergence check), else ``None``.
    :ivar unresolved: ``None``, or one line saying why the gaps are not resolved to their stated
        precision (AIS has not converged; its error exceeds the approximation gap's size).
    """

    log_px: torch.Tensor | None = None
    elbo_optimal: torch.Tensor | None = None
    elbo_amortized: torch.Tensor | None = None
    khat: torch.Tensor | None = None
    num_steps: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    log_px_estimator: str = "is"
    log_px_candidates: dict[str, float] = field(default_factory=dict)
    estimator_failure: str | None = None
    log_px_error: float | None = None
    unresolved: str | None = None

    @classmethod
    def build(
        cls,
        log_px: torch.Tensor,
        elbo_optimal: torch.Tensor,
        elbo_amortized: torch.Tensor,
        khat: torch.Tensor,
        num_steps: torch.Tensor,
        settings: dict[str, Any] | None = None,
        log_px_estimator: str = "is",
        log_px_candidates: dict[str, float] | None = None,
        log_px_error: float | None = None,
        unresolved: str | None = None,
    ) -> GapResult:
        """A result from its parts; flags an estimator failure (see ``estimator_failure``)."""
        gap = log_px - elbo_optimal
        mean, stderr = mean_stderr(gap)
        failure = None
        slack = (0.0 if math.isnan(stderr) else stderr) + FAILURE_SLACK
        if not math.isfinite(mean):
            failure = "log p(x) or L[q*] is not finite for some datapoints; the gaps are undefined"
        elif mean < -slack:
            failure = (
                f"estimator failure: the approximation gap log p(x) - L[q*] = {mean:.3f} ± "
                f"{stderr:.3f} nats is below zero, so log p(x) ({log_px_estimator}) is "
                "under-estimated; raise num_samples or the AIS settings (ais_options)"
            )
        return cls(
            gap, mean, stderr, log_px=log_px, elbo_optimal=elbo_optimal,
            elbo_amortized=elbo_amortized, khat=khat, num_steps=num_steps,
            settings=dict(settings or {}), log_px_estimator=log_px_estimator,
            log_px_candidates=dict(log_px_candidates or {}), estimator_failure=failure,
            log_px_error=log_px_error, unresolved=unresolved,
        )

    @property
    def failed(self) -> bool:
        """Whether the estimates contradict :math:`\\log p(x) \\ge \\mathcal L[q^*]`."""
        return self.estimator_failure is not None

    @property
    def approximation_gap(self) -> torch.Tensor:
        r""":math:`\log p(x) - \mathcal L[q^*]` per datapoint."""
        return self.log_px - self.elbo_optimal

    @property
    def amortization_gap(self) -> torch.Tensor:
        r""":math:`\mathcal L[q^*] - \mathcal L[q]` per datapoint."""
        return self.elbo_optimal - self.elbo_amortized

    @property
    def inference_gap(self) -> torch.Tensor:
        r""":math:`\log p(x) - \mathcal L[q]` per datapoint (the sum of the two gaps)."""
        return self.log_px - self.elbo_amortized

    def summary(self) -> dict[str, tuple[float, float]]:
        """``name -> (mean, standard error over datapoints)`` for the six quantities."""
        return {
            "log_px": _mean_stderr(self.log_px),
            "elbo_optimal": _mean_stderr(self.elbo_optimal),
            "elbo_amortized": _mean_stderr(self.elbo_amortized),
            "approximation_gap": _mean_stderr(self.approximation_gap),
            "amortization_gap": _mean_stderr(self.amortization_gap),
            "inference_gap": _mean_stderr(self.inference_gap),
        }

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        """A JSON-ready dict: means and standard errors (and per-datapoint lists if asked);
        ``estimator_failure`` is ``None`` or the reason the gaps are not to be read."""
        out: dict[str, Any] = {"num_datapoints": int(self.log_px.numel())}
        for name, (mean, stderr) in self.summary().items():
            out[name] = {"mean": mean, "stderr": stderr}
        finite = self.khat[~torch.isnan(self.khat)]
        out["khat_above_0.7_share"] = (
            float((finite > 0.7).double().mean()) if finite.numel() else None
        )
        out["mean_num_steps"] = float(self.num_steps.double().mean())
        out["log_px_estimator"] = self.log_px_estimator
        out["log_px_candidates"] = dict(self.log_px_candidates)
        out["estimator_failure"] = self.estimator_failure
        out["log_px_error"] = self.log_px_error
        out["unresolved"] = self.unresolved
        out["settings"] = dict(self.settings)
        if per_datapoint:
            for name in ("log_px", "elbo_optimal", "elbo_amortized", "khat"):
                out.setdefault("per_datapoint", {})[name] = [
                    float(v) for v in getattr(self, name)
                ]
        return out

    def __str__(self) -> str:
        if self.failed:
            return f"{self.estimator_failure} (n={self.log_px.numel()})"
        s = self.summary()
        return (
            f"log p(x) {s['log_px'][0]:.2f} ({self.log_px_estimator}), L[q*] "
            f"{s['elbo_optimal'][0]:.2f}, L[q] {s['elbo_amortized'][0]:.2f}; approximation gap "
            f"{s['approximation_gap'][0]:.2f} ± {s['approximation_gap'][1]:.2f}, amortization gap "
            f"{s['amortization_gap'][0]:.2f} ± {s['amortization_gap'][1]:.2f} nats "
            f"(n={self.log_px.numel()})"
        ) + (f"; UNRESOLVED: {self.unresolved}" if self.unresolved else "")


def _local_program(vae: Scorable, q: Callable[[], Any]) -> Program:
    """The VAE's model with a guide that samples ``z`` from ``q()`` (private): scores any
    proposal against the model with the same machinery as the amortized guide."""

    def guide(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", vae.num_data, subsample=idx):
            return pyro.sample("z", q())

    return Program(vae.model, guide, vae=vae, modules=[vae], takes_idx=True)


def _check_reparameterized(program: Program, x: torch.Tensor, idx: torch.Tensor) -> None:
    """q* is found by reparameterized gradients: refuse a guide site that cannot give them."""
    from pyro import poutine

    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        trace = poutine.trace(program.guide).get_trace(*program.args(x, idx))
    for name in program.latent:
        if not getattr(trace.nodes[name]["fn"], "has_rsample", False):
            raise ConfigError(
                f"L[q*] needs reparameterized gradients, but the guide's site {name!r} "
                f"({type(trace.nodes[name]['fn']).__name__}) has no rsample"
            )


def _check_family(vae: Scorable) -> Any:
    if isinstance(vae, (tuple, list)):
        return None  # a plain pair: its guide's distribution parameters are optimized (_PairLocal)
    family = getattr(vae, "family", None)
    if not (
        callable(getattr(family, "local_params", None))
        and callable(getattr(family, "distribution_from_params", None))
    ):
        raise ConfigError(
            f"gap analysis needs a family with local_params(x, idx) and "
            f"distribution_from_params(params) (all pyrovae families have them); "
            f"{type(family).__name__} lacks them"
        )
    return family


def _start_params(family: Any, x: torch.Tensor, idx: torch.Tensor, lookup: bool) -> dict[str, torch.Tensor]:
    """Where a datapoint's own parameters start: the encoder's output for an amortized family;
    for a per-datapoint family, its stored row only when ``lookup`` (the data are the family's
    own), else the wrapped family's encoder output (``Local`` of an amortized family) or the
    mean of the stored rows (the same neutral start for every datapoint: never another
    datapoint's own parameters)."""
    with torch.no_grad():
        if getattr(family, "amortized", True) or lookup:
            return family.local_params(x, idx)
        inner = getattr(family, "family", None)
        if inner is not None and getattr(inner, "amortized", False):
            return inner.local_params(x)
        tables = family.local_params(x, torch.arange(int(family.num_data), device=x.device))
        return {k: v.mean(0, keepdim=True).expand((x.shape[0],) + tuple(v.shape[1:]))
                for k, v in tables.items()}


class _FamilyLocal:
    """Per-datapoint parameters of a pyrovae family: ``local_params`` / ``distribution_from_params``."""

    def __init__(self, vae: Scorable, lookup: bool) -> None:
        self.vae, self.lookup = vae, lookup
        self.name = type(vae.family).__name__

    def start(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return _start_params(self.vae.family, x, idx, self.lookup)

    def program(self, params: dict[str, torch.Tensor]) -> Program:
        family = self.vae.family
        return _local_program(self.vae, lambda: family.distribution_from_params(params))


class _PairLocal:
    r"""Per-datapoint parameters of a plain guide, found generically: the parameters
    (``arg_constraints``) of each latent site's distribution in the guide's trace, mapped to
    the reals by ``biject_to``; the distribution is rebuilt from them by its own class
    (``Normal(loc, scale)``, ``MultivariateNormal(loc, scale_tril=...)``, ...). A guide site
    that is not such a distribution (a flow) has no parameters to optimize generically: refused.
    """

    name = "the guide"

    def __init__(self, program: Program) -> None:
        self.p = program

    def start(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        from pyro import poutine
        from torch.distributions import biject_to

        with torch.random.fork_rng(), torch.no_grad(), poutine.block():  # draws nothing
            trace = poutine.trace(self.p.guide).get_trace(*self.p.args(x, idx))
        self.sites: dict[str, tuple[type, int, dict[str, Any]]] = {}
        params = {}
        for name in self.p.latent:
            fn = trace.nodes[name]["fn"]
            event = 0
            while isinstance(fn, torch.distributions.Independent):
                event += fn.reinterpreted_batch_ndims
                fn = fn.base_dist
            constraints = getattr(fn, "arg_constraints", None)
            held = {k: c for k, c in (constraints or {}).items()
                    if isinstance(fn.__dict__.get(k), torch.Tensor)}
            if isinstance(fn, torch.distributions.TransformedDistribution) or not held:
                raise ConfigError(
                    f"gaps of a (model, guide) pair optimizes the parameters of each guide "
                    f"site's distribution; site {name!r} is a {type(fn).__name__}, which has none "
                    "that can be optimized generically (use a pyrovae VAE with a family)"
                )
            self.sites[name] = (type(fn), event, held)
            for k, c in held.items():
                value = fn.__dict__[k].detach()
                params[f"{name}.{k}"] = biject_to(c).inv(value).clone()
        return params

    def program(self, params: dict[str, torch.Tensor]) -> Program:
        import pyro
        from torch.distributions import biject_to

        p, sites = self.p, self.sites

        def guide(x: torch.Tensor, *rest: Any) -> None:
            with pyro.plate(p.data_plate, x.shape[0], dim=p.data_dim):
                for name, (cls, event, held) in sites.items():
                    kwargs = {k: biject_to(c)(params[f"{name}.{k}"]) for k, c in held.items()}
                    d = cls(**kwargs)
                    pyro.sample(name, d.to_event(event) if event else d)

        return Program(p.model, guide, modules=p.modules, takes_idx=p.takes_idx)


def _optimize_batch(
    vae: Scorable,
    x: torch.Tensor,
    idx: torch.Tensor,
    *,
    num_steps: int,
    lr: float,
    num_particles: int,
    check_every: int,
    tol: float,
    max_decays: int,
    lookup: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    r"""Maximize :math:`\sum_n \mathcal L[q_n]` over the batch's local parameters.

    Adam on the reparameterized ELBO (``num_particles`` draws per step). At the start and every
    ``check_every`` steps each datapoint's current parameters are scored by a fresh ELBO estimate
    with ``10 * num_particles`` draws, and each datapoint keeps the best parameters seen so far
    (so the result is never worse than the start because of late gradient noise; the
    final ELBO is estimated afterwards on fresh draws, so this choice does not bias it upwards).
    When the batch's mean score improved by less than ``tol`` nats per datapoint the learning
    rate is halved; after ``max_decays`` halvings (or ``num_steps`` steps) the optimization stops.

    :returns: the best parameters (detached) and the number of steps taken.
    """
    local = vae if isinstance(vae, (_PairLocal, _FamilyLocal)) else _FamilyLocal(vae, lookup)
    start = local.start(x, idx)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    if not params:
        raise ConfigError(f"{local.name}.local_params returned no parameters")
    for k, v in params.items():
        if v.dim() == 0 or v.shape[0] != x.shape[0]:
            raise ConfigError(
                f"{local.name}.local_params()[{k!r}] has shape {tuple(v.shape)}; "
                f"local parameters must have the batch size {x.shape[0]} first"
            )
    proposal = local.program(params)
    proposal.analyze(x, idx)
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    leaves = list(params.values())

    def score() -> torch.Tensor:
        with torch.no_grad():
            return proposal.log_weights(x, idx, 10 * num_particles).mean(0)

    best_score = score()
    best_params = {k: v.detach().clone() for k, v in params.items()}
    best_mean = float(best_score.mean())
    decays = 0
    step = 0
    while step < num_steps:
        w = proposal.log_weights(x, idx, num_particles)  # (S, batch)
        grads = torch.autograd.grad(-w.mean(0).sum(), leaves)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            break  # a non-finite gradient: keep the best parameters found so far
        for p, g in zip(leaves, grads):
            p.grad = g
        optimizer.step()
        step += 1
        if step % check_every == 0 or step == num_steps:
            current = score()
            better = current > best_score  # NaN scores never win
            for k, v in params.items():
                mask = better.reshape((-1,) + (1,) * (v.dim() - 1))
                best_params[k] = torch.where(mask, v.detach(), best_params[k])
            best_score = torch.where(better, current, best_score)
            current_mean = float(current.mean())
            if not current_mean >= best_mean + tol:
                decays += 1
                if decays > max_decays:
                    break
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
            best_mean = max(best_mean, current_mean)
    return best_params, step


def optimal_elbo(
    vae: Scorable,
    data: Any,
    *,
    num_elbo_samples: int = 1000,
    num_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    check_every: int = 50,
    tol: float = 1e-3,
    max_decays: int = 4,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
    seed: int | None = None,
    progress: bool = False,
    local: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\mathcal L[q^*]` per datapoint: each datapoint's variational parameters optimized.

    .. math::

        \mathcal L[q^*](x) = \max_{\lambda} \mathbb E_{q_\lambda(z)}[\log p(x, z) - \log q_\lambda(z)]

    Starts every datapoint's parameters at the encoder's output (``vae.family.local_params``;
    for a per-datapoint family see :func:`_start_params`), keeps the decoder, the prior and any
    shared network of the family fixed, and runs :func:`_optimize_batch` on batches of
    ``batch_size`` datapoints; then estimates the ELBO of the optimized distribution with
    ``num_elbo_samples`` draws (in chunks bounded by ``max_bytes`` / ``max_rows``).

    :returns: ``(elbo, num_steps)``, both of shape ``(num_datapoints,)``.
    """
    max_bytes, max_rows = check_budget(max_bytes, max_rows)
    values, steps = [], []
    for sub, x, idx, n_steps in _optimized_batches(
        vae,
        data,
        num_steps=num_steps,
        lr=lr,
        num_particles=num_particles,
        batch_size=batch_size,
        check_every=check_every,
        tol=tol,
        max_decays=max_decays,
        seed=seed,
        progress=progress,
        lookup=local == "lookup",
    ):
        values.append(_mc_elbo(sub, x, idx, num_elbo_samples, max_bytes, max_rows))
        steps.append(torch.full((x.shape[0],), n_steps, dtype=torch.long))
    return torch.cat(values), torch.cat(steps)


def _optimized_batches(
    vae: Scorable,
    data: Any,
    *,
    num_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    check_every: int = 50,
    tol: float = 1e-3,
    max_decays: int = 4,
    seed: int | None = None,
    progress: bool = False,
    lookup: bool = True,
    context: bool = True,
) -> Any:
    """Yield ``(program, x, idx, steps)`` per batch: ``program`` scores the batch's optimized
    per-datapoint distributions against the model (decoder fixed)."""
    program = Program.resolve(vae, "vae")
    if program.vae is not None:
        _check_family(vae)
    num_steps = check_positive_int(num_steps, "num_steps")
    num_particles = check_positive_int(num_particles, "num_particles")
    batch_size = check_positive_int(batch_size, "batch_size")
    check_every = check_positive_int(check_every, "check_every")
    lr = check_positive_float(lr, "lr")
    if isinstance(max_decays, bool) or not isinstance(max_decays, int) or max_decays < 0:
        raise ConfigError(f"max_decays must be a non-negative integer, got {max_decays!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ConfigError(f"tol must be a finite number >= 0 (nats per datapoint), got {tol!r}")
    tol = float(tol)
    dataset = program.dataset(data)
    n = len(dataset)
    device = program.device()
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    outer = evaluating(program.modules, seed) if context else nullcontext()
    with outer, frozen(program.modules), torch.enable_grad(), tqdm(
        total=n, desc="L[q*]", unit="pt", disable=not progress, leave=False
    ) as bar:
        for start in range(0, n, batch_size):
            x, idx = dataset[torch.arange(start, min(start + batch_size, n))]
            x, idx = torch.as_tensor(x).to(device), torch.as_tensor(idx).to(device)
            if start == 0:
                program.check_data(x)
                if program.vae is None:  # (a VAE's per-datapoint family is not run on new data)
                    program.analyze(x, idx)
                    _check_reparameterized(program, x, idx)
            local = _PairLocal(program) if program.vae is None else _FamilyLocal(vae, lookup)
            params, n_steps = _optimize_batch(
                local, x, idx, num_steps=num_steps, lr=lr, num_particles=num_particles,
                check_every=check_every, tol=tol, max_decays=max_decays, lookup=lookup,
            )
            sub = local.program(params)
            yield sub, x, idx, n_steps
            bar.update(x.shape[0])


def _fitted_programs(program: Program, data: Any, **options: Any) -> Any:
    """For ``local="fit"`` in the estimators: ``(program, x, idx)`` per batch, each scoring the
    batch's own fitted parameters (decoder fixed; inside the caller's seeded context)."""
    for sub, x, idx, _ in _optimized_batches(
        program.vae, data, lookup=False, context=False, **options
    ):
        yield sub, x, idx


@torch.no_grad()
def _mc_elbo(
    program: Program,
    x: torch.Tensor,
    idx: torch.Tensor,
    num_samples: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Monte Carlo ELBO of the program's guide, shape ``(batch,)``, draws in bounded chunks."""
    from .evaluation import rows_per_chunk

    program.analyze(x, idx)
    rows = rows_per_chunk(program, max_bytes, max_rows)
    per_chunk = max(1, rows // x.shape[0])
    total = x.new_zeros(x.shape[0])
    for k0 in range(0, num_samples, per_chunk):
        k = min(per_chunk, num_samples - k0)
        total = total + program.log_weights(x, idx, k).sum(0)
    return (total / num_samples).cpu()


def gaps(
    vae: Scorable,
    data: Any,
    *,
    num_samples: int = 5000,
    num_elbo_samples: int = 1000,
    num_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    check_every: int = 50,
    tol: float = 1e-3,
    max_decays: int = 4,
    log_px: str = "best",
    ais_options: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    local: str | None = None,
) -> GapResult:
    r"""Decompose the inference gap of ``vae`` on ``data`` into approximation and amortization gaps.

    .. math::

        \log p(x) - \mathcal L[q] = (\log p(x) - \mathcal L[q^*]) + (\mathcal L[q^*] - \mathcal L[q])

    :math:`\log p(x)` is the best estimate available (``log_px="best"``): importance sampling
    with the encoder as proposal (``num_samples`` draws) and AIS (:func:`pyrovae.ais`, settings
    ``ais_options``), whichever has the larger mean (where PSIS :math:`\hat k` certifies the IS
    weights, AIS must exceed IS by more than the standard error of their per-datapoint
    difference: a tie goes to the less noisy IS) -- both are stochastic lower bounds, and IS
    with a poor encoder falls far below (an untrained encoder on the linear-Gaussian model:
    IS puts the approximation gap at -0.66 nats, where the truth is 0.004). The result says
    which (``log_px_estimator``). An approximation gap below zero by more than its standard
    error cannot be (:math:`\log p(x) \ge \mathcal L[q^*]`): the result then carries an
    ``estimator_failure`` message instead of presenting the numbers as gaps.

    :param vae: a :class:`~pyrovae.VAE` whose family has ``local_params`` and
        ``distribution_from_params`` (every pyrovae family), or a ``(model, guide)`` pair: then
        :math:`q^*` optimizes the parameters of each guide site's distribution per datapoint
        (``Normal(loc, scale)``, ``MultivariateNormal(loc, scale_tril)``, ...: see
        :class:`_PairLocal`); a guide site without such parameters (a flow) or without
        ``rsample`` is refused in one line.
    :param data: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``
        (e.g. 1000 test digits; the cost is linear in their number).
    :param num_samples: ``K``, importance samples per datapoint for :math:`\log p(x)`.
    :param num_elbo_samples: Monte Carlo draws per datapoint for :math:`\mathcal L[q]` and
        :math:`\mathcal L[q^*]` (their standard error per datapoint is
        :math:`\mathrm{sd}(w)/\sqrt{S}`).
    :param num_steps: the most Adam steps per batch for :math:`q^*`.
    :param lr: Adam's initial learning rate for the local parameters.
    :param num_particles: reparameterized draws per datapoint per step.
    :param batch_size: datapoints optimized jointly (rows per decoder call: ``batch_size *
        num_particles``).
    :param check_every: steps per window of the stopping rule.
    :param tol: a window must raise the mean ELBO by this many nats per datapoint, else the
        learning rate halves; after ``max_decays`` halvings the optimization stops.
    :param max_decays: see ``tol``.
    :param log_px: ``"best"`` (IS and AIS, the larger), ``"is"`` or ``"ais"``.
    :param ais_options: keyword arguments of :func:`pyrovae.ais` (default: its own,
        ``num_intermediate=1000, num_chains=16, leapfrog_steps=10, start="encoder"``, with its
        convergence check; where it finds AIS still moving, or its error above
        :data:`RESOLUTION`, the result says so in ``unresolved``). ``start="prior"`` by default for a
        family that evaluates q(z|x) only at its own samples (planar, radial).
    :param max_bytes: memory budget of one decoder call when evaluating.
    :param max_rows: optional cap on rows per decoder call when evaluating.
    :param seed: seeds every draw (``None``: use the global RNG); the global RNG is restored.
    :param progress: show progress bars.
    :param local: for a per-datapoint family: ``"lookup"`` (the data are the family's own
        datapoints); otherwise such a family is refused (its amortized ELBO on other data is
        meaningless).
    :returns: a :class:`GapResult`.
    """
    from .evaluation import check_local, refuse_local

    num_samples = check_positive_int(num_samples, "num_samples")
    num_elbo_samples = check_positive_int(num_elbo_samples, "num_elbo_samples")
    max_bytes, max_rows = check_budget(max_bytes, max_rows)
    _check_family(vae)
    program = Program.resolve(vae, "vae")
    local = check_local(local)
    if local != "lookup":
        refuse_local(program, "gaps")
    if log_px not in ("best", "is", "ais"):
        raise ConfigError(f"log_px must be 'best', 'is' or 'ais', got {log_px!r}")
    options = dict(_GAPS_AIS)
    family = getattr(vae, "family", None)  # (None for a (model, guide) pair)
    if family is not None:  # a per-datapoint family is scored on its own points here (lookup)
        from .ais import start_for

        options["start"] = start_for(family, new_points=False)
    if ais_options is not None:
        if not isinstance(ais_options, dict):
            raise ConfigError(f"ais_options must be a dict of pyrovae.ais arguments, got {ais_options!r}")
        options.update(ais_options)
    import warnings

    from .errors import ImportanceSamplingWarning

    with warnings.catch_warnings():
        # The GapResult carries k-hat; its share is reported there instead of a warning here.
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        ll = log_likelihood(
            vae, data, num_samples, max_bytes=max_bytes, max_rows=max_rows, seed=seed,
            progress=progress, local=local,
        )
    amortized = elbo(
        vae,
        data,
        num_elbo_samples,
        max_bytes=max_bytes,
        max_rows=max_rows,
        seed=None if seed is None else seed + 1,
        progress=progress,
        local=local,
    )
    optimized, steps = optimal_elbo(
        vae,
        data,
        num_elbo_samples=num_elbo_samples,
        num_steps=num_steps,
        lr=lr,
        num_particles=num_particles,
        batch_size=batch_size,
        check_every=check_every,
        tol=tol,
        max_decays=max_decays,
        max_bytes=max_bytes,
        max_rows=max_rows,
        seed=None if seed is None else seed + 2,
        progress=progress,
        local=local,
    )
    candidates = {"is": ll.mean}
    best, estimator = ll.values, "is"
    log_px_error: float | None = None
    unresolved: str | None = None
    if log_px in ("best", "ais"):
        from .ais import ais

        from .ais import AISConvergenceWarning

        with warnings.catch_warnings():  # said in the result's `unresolved` instead
            warnings.simplefilter("ignore", AISConvergenceWarning)
            annealed = ais(vae, data, seed=None if seed is None else seed + 3,
                           progress=progress, max_bytes=max_bytes, local=local, **options)
        candidates["ais"] = annealed.mean
        # Both are stochastic lower bounds: the larger mean wins. Where PSIS certifies the IS
        # weights (k-hat > 0.7 for at most 1% of the datapoints), AIS must be larger by more
        # than the standard error of the per-datapoint difference: then IS is the less noisy
        # of two sound estimates, and a tie should not go to whichever noise came out higher.
        diff, diff_se = mean_stderr(annealed.values - ll.values)
        candidates["ais_minus_is"] = diff
        share = ll.unreliable_share
        margin = diff_se if (not math.isnan(share) and share <= 0.01 and diff_se == diff_se) else 0.0
        if log_px == "ais" or not math.isfinite(ll.mean) or diff > margin:
            best, estimator = annealed.values, "ais"
            log_px_error = annealed.mean_error
        if annealed.converged is False and (estimator == "ais" or diff > 0):
            unresolved = (
                f"log p(x) by AIS has not converged ({annealed.convergence}); the approximation "
                "gap may be under-stated by about as much: raise ais_options num_intermediate"
            )
        elif estimator == "ais" and math.isfinite(log_px_error) and log_px_error > RESOLUTION:
            unresolved = (
                f"the Monte Carlo error of log p(x) by AIS is {log_px_error:.3f} nats per "
                f"datapoint, above {RESOLUTION} nats: raise ais_options num_chains or "
                "num_intermediate"
            )
    # q* is the best member of the family, and the encoder's output is a member: when the
    # optimization ends below its start (gradient noise on a nearly optimal start), keep the start.
    optimal = torch.maximum(optimized, amortized.values)
    khat = ll.khat if ll.khat is not None else torch.full_like(ll.values, float("nan"))
    settings = {
        "num_samples": num_samples,
        "num_elbo_samples": num_elbo_samples,
        "num_steps": num_steps,
        "lr": lr,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "check_every": check_every,
        "tol": tol,
        "max_decays": max_decays,
        "log_px": log_px,
        "ais": options if log_px != "is" else None,
        "seed": seed,
    }
    return GapResult.build(best, optimal, amortized.values, khat, steps, settings, estimator,
                           candidates, log_px_error=log_px_error, unresolved=unresolved)


def plot_gaps(
    results: GapResult | Sequence[GapResult],
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
) -> Any:
    r"""Bar chart of :math:`\log p(x)`, :math:`\mathcal L[q^*]`, :math:`\mathcal L[q]` and the gaps.

    Left panel: the three bounds (nats per datapoint); right panel: the approximation and
    amortization gaps, one group of bars per quantity, one bar per model.

    Error bars are standard errors of the mean over datapoints, of what each panel compares.
    The three bounds are measured on the *same* datapoints, whose :math:`\log p(x)` differ by
    tens of nats, so the standard error of each bound alone (printed under the panel) is far
    larger than the gaps between them; the bars on :math:`\mathcal L[q^*]` and
    :math:`\mathcal L[q]` are therefore the paired standard errors of their differences from
    :math:`\log p(x)` (those of the gaps), and :math:`\log p(x)` carries none.

    :param results: one :class:`GapResult` or several (models side by side).
    :param path: if given, save the figure there (format from the suffix).
    :param labels: one name per result (default ``model 1, model 2, ...``).
    :returns: the :class:`matplotlib.figure.Figure` (Agg canvas; pyplot is not touched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, GapResult):
        results = [results]
    results = list(results)
    if not results or not all(isinstance(r, GapResult) for r in results):
        raise ConfigError("plot_gaps needs one GapResult or a sequence of them (from gaps())")
    if labels is None:
        labels = [f"model {i + 1}" for i in range(len(results))]
    labels = list(labels)
    if len(labels) != len(results):
        raise ConfigError(f"got {len(labels)} labels for {len(results)} results; pass one per result")
    summaries = [r.summary() for r in results]
    # What each bar's error bar is: the bounds' paired errors are those of their gaps.
    error_of = {
        "log_px": None,
        "elbo_optimal": "approximation_gap",
        "elbo_amortized": "inference_gap",
        "approximation_gap": "approximation_gap",
        "amortization_gap": "amortization_gap",
    }
    fig = Figure(figsize=(10, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = (
        (("log_px", "log p(x)"), ("elbo_optimal", "L[q*]"), ("elbo_amortized", "L[q]")),
        (("approximation_gap", "approximation gap"), ("amortization_gap", "amortization gap")),
    )
    width = 0.8 / len(results)
    for p, quantities in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        for i, (summary, label) in enumerate(zip(summaries, labels)):
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(quantities))]
            means = [summary[q][0] for q, _ in quantities]
            errs = []
            for q, _ in quantities:
                source = error_of[q]
                e = float("nan") if source is None else summary[source][1]
                errs.append(0.0 if math.isnan(e) else e)
            bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(quantities)), [name for _, name in quantities])
        ax.set_ylabel("nats per datapoint")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
        if p == 0:
            lows = [s[q][0] - s[error_of[q]][1] if error_of[q] and not math.isnan(s[error_of[q]][1])
                    else s[q][0] for s in summaries for q, _ in quantities]
            highs = [s[q][0] for s in summaries for q, _ in quantities]
            span = max(highs) - min(lows)
            pad = max(span, 1.0)
            if max(highs) < 0:  # bounds are negative: zoom on them instead of on zero
                ax.set_ylim(min(lows) - 0.5 * pad, max(highs) + 0.5 * pad)
            ax.set_title("bounds (bars: paired SE of the gap to log p(x))", fontsize=10)
            own = ", ".join(f"{s['log_px'][1]:.2f}" for s in summaries)
            ax.set_xlabel(f"SE of log p(x) over datapoints alone: {own} nats", fontsize=8)
        else:
            ax.set_title("gaps (bars: SE over datapoints)", fontsize=10)
        if len(results) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path))
    return fig

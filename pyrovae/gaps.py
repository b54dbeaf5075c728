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
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ._checks import check_positive_int
from .ais import AISConvergenceWarning, ais, start_for
from .errors import ConfigError, ImportanceSamplingWarning
from .evaluation import (
    Scorable,
    Estimate,
    Program,
    mean_stderr,
    refuse_local,
)
from .importance import elbo, log_likelihood
from .local import check_family, optimal_elbo
from .options import EstimateOptions, resolve_options

__all__ = ["GapResult", "gaps", "optimal_elbo"]


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
            "log_px": mean_stderr(self.log_px),
            "elbo_optimal": mean_stderr(self.elbo_optimal),
            "elbo_amortized": mean_stderr(self.elbo_amortized),
            "approximation_gap": mean_stderr(self.approximation_gap),
            "amortization_gap": mean_stderr(self.amortization_gap),
            "inference_gap": mean_stderr(self.inference_gap),
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


#: The fields of :class:`~pyrovae.options.EstimateOptions` that :func:`gaps` took as keywords
#: before ``options`` existed (still taken), and its default options (seeded with 0).
_KEYWORDS = ("max_bytes", "max_rows", "seed", "progress", "local")
_DEFAULTS = EstimateOptions(seed=0)


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
    options: EstimateOptions | None = None,
    **keywords: Any,
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
        :class:`pyrovae.local._PairLocal`); a guide site without such parameters (a flow) or without
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
    :param options: how the estimates are computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it, as before ``options`` existed: ``max_bytes``,
        ``max_rows``, ``seed``, ``progress``, ``local``). Default: ``EstimateOptions(seed=0)``
        (gaps is seeded unless told otherwise; an ``options`` object passed is taken as it is,
        so ``EstimateOptions(max_rows=512)`` draws from the global RNG: add ``seed=0``). The
        four estimates draw with ``seed``, ``seed + 1`` (:math:`\mathcal L[q]`), ``seed + 2``
        (:math:`q^*`) and ``seed + 3`` (AIS; AIS keeps its own row cap, ``max_rows`` is for
        the other three). ``local``: for a per-datapoint family, ``"lookup"`` (the data are the
        family's own datapoints); otherwise such a family is refused (its amortized ELBO on
        other data is meaningless). ``process_group`` and ``compile`` are refused.
    :param keywords: the fields of ``options`` as keywords (see ``options``).
    :returns: a :class:`GapResult`.
    """
    options = resolve_options(options, keywords, "gaps", takes=_KEYWORDS, default=_DEFAULTS)
    options.refuse("gaps", "process_group", "compile")
    seed = options.seed
    num_samples = check_positive_int(num_samples, "num_samples")
    num_elbo_samples = check_positive_int(num_elbo_samples, "num_elbo_samples")
    check_family(vae)
    program = Program.resolve(vae, "vae")
    if options.local != "lookup":
        refuse_local(program, "gaps")
    if log_px not in ("best", "is", "ais"):
        raise ConfigError(f"log_px must be 'best', 'is' or 'ais', got {log_px!r}")
    annealing = dict(_GAPS_AIS)
    family = getattr(vae, "family", None)  # (None for a (model, guide) pair)
    if family is not None:  # a per-datapoint family is scored on its own points here (lookup)
        annealing["start"] = start_for(family, new_points=False)
    if ais_options is not None:
        if not isinstance(ais_options, dict):
            raise ConfigError(f"ais_options must be a dict of pyrovae.ais arguments, got {ais_options!r}")
        annealing.update(ais_options)
    with warnings.catch_warnings():
        # The GapResult carries k-hat; its share is reported there instead of a warning here.
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        ll = log_likelihood(vae, data, num_samples, options=options)
    amortized = elbo(vae, data, num_elbo_samples, options=options.seeded(1))
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
        options=options.seeded(2),
    )
    candidates = {"is": ll.mean}
    best, estimator = ll.values, "is"
    log_px_error: float | None = None
    unresolved: str | None = None
    if log_px in ("best", "ais"):
        with warnings.catch_warnings():  # said in the result's `unresolved` instead
            warnings.simplefilter("ignore", AISConvergenceWarning)
            # AIS keeps its default row cap: max_rows bounds the other three estimates
            annealed = ais(vae, data, options=options.seeded(3).replace(max_rows=None),
                           **annealing)
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
        "ais": annealing if log_px != "is" else None,
        "seed": seed,
    }
    return GapResult.build(best, optimal, amortized.values, khat, steps, settings, estimator,
                           candidates, log_px_error=log_px_error, unresolved=unresolved)

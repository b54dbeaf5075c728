r"""Importance-sampled log-likelihood :math:`\log p(x)` and per-datapoint ELBOs.

For each datapoint, with the guide as proposal,

.. math::

    w_k = \log p(x \mid z_k) + \log p(z_k) - \log q(z_k \mid x), \qquad z_k \sim q(z \mid x),
    \quad k = 1..K,

    \log p(x) \approx \log \frac1K \sum_{k=1}^K e^{w_k} \quad (\text{the IWAE bound } L_K),
    \qquad \mathrm{ELBO}(x) \approx \frac1K \sum_{k=1}^K w_k .

The draws are vectorized under a particle plate and chunked so that the decoder's
distributions never hold more than ``max_bytes`` at once (measured per row on a probe, see
:mod:`pyrovae.evaluation`): memory stays bounded for any ``K`` and any likelihood. The weights
are computed from each site's own ``log_prob``, so the ``"data"`` plate's subsample scale never
leaks into them.

What is scored: a :class:`~pyrovae.VAE`, or any Pyro model/guide pair written as in Pyro's VAE
tutorial, passed as a tuple ``(model, guide)``: ``log_likelihood((model, guide), data)``. The
latent and observed sites and the data plate are found from the traces (see
:class:`pyrovae.evaluation.Program`); no ``idx`` is needed.

Non-finite weights. A log-weight is ``-inf`` when a draw gives the datapoint zero density (e.g.
a likelihood whose support misses the datapoint); when *every* draw of a datapoint does, its
estimate is ``-inf`` and its ESS undefined. Such datapoints are counted
(:attr:`LogLikelihood.num_nonfinite_weights`) and said, never averaged into a ``nan``.

Reliability. An importance-sampling estimate is only as good as the proposal's coverage of the
posterior. :func:`log_likelihood` reports, per datapoint, the Pareto-smoothed importance sampling
shape estimate :math:`\hat k` [1] (``arviz.psislw`` on that datapoint's ``K`` log-weights) and the
effective sample size of the normalized weights :math:`\tilde w_k = e^{w_k} / \sum_j e^{w_j}`,

.. math::

    \mathrm{ESS} = 1 \big/ \textstyle\sum_k \tilde w_k^2 \in [1, K].

:math:`\hat k < 0.5` is excellent, :math:`0.5 \le \hat k \le 0.7` good, and
:math:`\hat k > 0.7` means the weights' tail is so heavy that the estimate is unreliable: the
proposal :math:`q(z \mid x)` is too narrow for the posterior.

:func:`iwae_bounds` gives the IWAE bounds :math:`L_K` for several ``K`` from one set of draws.

References:

1. Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
2. Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._checks import check_positive_int
from .errors import ConfigError, ImportanceSamplingWarning
from .evaluation import (
    Scorable,
    Estimate,
    Program,
    gather_parts,
    resolve_group,
    chunks,
    evaluating,
    mean_stderr,
    refuse_local,
    rows_per_chunk,
)
from .local import fitted_programs
from .options import EstimateOptions, resolve_options

__all__ = [
    "LogLikelihood",
    "ELBOEstimate",
    "IWAEBounds",
    "log_weights",
    "log_likelihood",
    "iwae_bounds",
    "elbo",
    "psis_khat",
    "effective_sample_size",
    "KHAT_THRESHOLD",
]

#: Above this PSIS :math:`\hat k` an importance-sampling estimate is unreliable (Vehtari et al.).
KHAT_THRESHOLD = 0.7

#: The fewest draws for which ``arviz.psislw`` can fit a Pareto tail (its tail has > 4 draws).
_MIN_SAMPLES_FOR_KHAT = 25

#: Log-weights of one datapoint that all lie within this many nats of each other are treated as
#: equal (an exact proposal): :math:`\hat k = -\infty`.
_EQUAL_WEIGHTS_ATOL = 1e-6


@dataclass(frozen=True)
class LogLikelihood(Estimate):
    r"""Per-datapoint estimates and their summary (an :class:`~pyrovae.evaluation.Estimate`).

    :ivar values: per-datapoint estimates, shape ``(num_datapoints,)`` (nats).
    :ivar mean: their mean (nats per datapoint).
    :ivar stderr: the standard error of the mean over datapoints.
    :ivar num_samples: ``K``, the importance samples per datapoint.
    :ivar khat: per-datapoint PSIS :math:`\hat k`, shape ``(num_datapoints,)``, or ``None`` when
        diagnostics were not computed. ``-inf`` where all ``K`` log-weights are equal (an exact
        proposal: perfectly reliable; ArviZ itself would say ``inf``); ``nan`` when ``K < 25``
        (too few draws to fit a tail) or when the datapoint has non-finite log-weights.
    :ivar ess: per-datapoint effective sample size :math:`1/\sum_k \tilde w_k^2` of the
        normalized weights, shape ``(num_datapoints,)``, in ``[1, K]``; ``nan`` where every
        log-weight is ``-inf`` (no weight to normalize); or ``None``.
    :ivar num_nonfinite_weights: datapoints with at least one non-finite log-weight (``-inf``:
        a draw of zero density under the model; ``nan``/``+inf``: a broken density).
    """

    num_samples: int = 1
    khat: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    num_nonfinite_weights: int = 0

    @property
    def unreliable_share(self) -> float:
        r"""The share of datapoints whose :math:`\hat k` exceeds :data:`KHAT_THRESHOLD` (0.7).

        ``nan`` when no :math:`\hat k` is available (diagnostics off, or ``K < 25``).
        """
        if self.khat is None or self.khat.numel() == 0 or bool(torch.isnan(self.khat).all()):
            return float("nan")
        return float((self.khat > KHAT_THRESHOLD).double().mean())

    @property
    def mean_ess(self) -> float:
        """Mean ESS over the datapoints where it is defined (``nan`` only if none is)."""
        if self.ess is None:
            return float("nan")
        finite = self.ess[torch.isfinite(self.ess)]
        return float(finite.double().mean()) if finite.numel() else float("nan")

    def reliability(self) -> str:
        """One line on the importance weights: k-hat share, mean ESS, non-finite weights."""
        parts = []
        share = self.unreliable_share
        if not math.isnan(share):
            parts.append(f"k-hat > {KHAT_THRESHOLD} for {100 * share:.1f}%")
        if self.ess is not None:
            defined = int(torch.isfinite(self.ess).sum())
            if defined:
                parts.append(
                    f"mean ESS {self.mean_ess:.1f} of K={self.num_samples}"
                    + ("" if defined == self.num_datapoints else f" over {defined} datapoints")
                )
            else:
                parts.append("ESS undefined for every datapoint")
        if self.num_nonfinite_weights:
            parts.append(
                f"{self.num_nonfinite_weights} of {self.num_datapoints} datapoints had "
                "non-finite log-weights (-inf: zero density under the model)"
            )
        return ", ".join(parts)

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        out = super().to_dict(per_datapoint)
        out["khat_above_0.7_share"] = (
            None if math.isnan(self.unreliable_share) else self.unreliable_share
        )
        out["mean_ess"] = None if math.isnan(self.mean_ess) else self.mean_ess
        return out

    def __str__(self) -> str:
        why = self.why_not_finite()
        head = (
            f"not finite: {why}" if why is not None else f"{self.mean:.2f} ± {self.stderr:.2f} nats"
        )
        text = f"{head} (K={self.num_samples}, n={self.num_datapoints})"
        rel = self.reliability()
        return f"{text}, {rel}" if rel else text


@dataclass(frozen=True)
class ELBOEstimate(Estimate):
    r"""Per-datapoint ELBOs and their summary (an :class:`~pyrovae.evaluation.Estimate`), from
    :func:`elbo`.

    :ivar values: per-datapoint ELBO estimates :math:`\frac1K \sum_k w_k`, shape
        ``(num_datapoints,)`` (nats).
    :ivar mean: their mean (nats per datapoint).
    :ivar stderr: the standard error of the mean over datapoints.
    :ivar num_samples: ``K``, the draws per datapoint.
    :ivar num_nonfinite_weights: datapoints with at least one non-finite log-weight (``-inf``:
        a draw of zero density under the model; ``nan``/``+inf``: a broken density).
    """

    num_samples: int = 1
    num_nonfinite_weights: int = 0

    def __str__(self) -> str:
        why = self.why_not_finite()
        head = (
            f"not finite: {why}" if why is not None else f"{self.mean:.2f} ± {self.stderr:.2f} nats"
        )
        text = f"{head} (K={self.num_samples}, n={self.num_datapoints})"
        if self.num_nonfinite_weights:
            text += (
                f", {self.num_nonfinite_weights} of {self.num_datapoints} datapoints had "
                "non-finite log-weights (-inf: zero density under the model)"
            )
        return text


@dataclass(frozen=True)
class IWAEBounds(Estimate):
    r"""IWAE bounds :math:`L_K` for several ``K`` from one set of draws per datapoint.

    :math:`L_K(x) = \log \frac1K \sum_{k=1}^K e^{w_k}` uses the *first* ``K`` of the same
    :math:`\max K` draws, so the estimates are nested (and :math:`L_1` is one-sample ELBO).
    In expectation :math:`L_1 \le L_{10} \le \dots \le \log p(x)` (Burda et al. 2016).

    :ivar values: per-datapoint bounds, shape ``(m, num_datapoints)``, one row per ``K``.
    :ivar mean: the mean of the tightest bound :math:`L_{\max K}` (the headline estimate).
    :ivar stderr: its standard error over datapoints.
    :ivar num_samples: the ``K`` values, ascending, length ``m``.
    :ivar means: mean over datapoints for each ``K``, shape ``(m,)``.
    :ivar stderrs: standard error of each mean over datapoints, shape ``(m,)``.
    """

    num_samples: tuple[int, ...] = ()
    means: torch.Tensor | None = None
    stderrs: torch.Tensor | None = None

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        """A JSON-ready summary: ``{"num_samples": [...], "mean": [...], "stderr": [...]}``."""
        out = {
            "num_samples": list(self.num_samples),
            "mean": [float(v) for v in self.means],
            "stderr": [float(v) for v in self.stderrs],
            "num_datapoints": int(self.values.shape[1]),
        }
        if per_datapoint:
            out["per_datapoint"] = {f"L_{k}": v.tolist() for k, v in zip(self.num_samples, self.values)}
        return out

    def __str__(self) -> str:
        return ", ".join(
            f"L_{k} = {float(m):.2f} ± {float(e):.2f}"
            for k, m, e in zip(self.num_samples, self.means, self.stderrs)
        )


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    r"""Effective sample size of self-normalized importance weights along dim 0.

    .. math::

        \mathrm{ESS} = \frac{(\sum_k e^{w_k})^2}{\sum_k e^{2 w_k}}
        = \exp\big(2 \operatorname{logsumexp}(w) - \operatorname{logsumexp}(2w)\big).

    :param w: log-weights, shape ``(K, ...)``.
    :returns: shape ``w.shape[1:]``, values in ``[1, K]``; ``nan`` where every log-weight is
        ``-inf`` (no weight to normalize) or one is ``nan``/``+inf``. ``-inf`` weights among
        finite ones simply count as zero weights.
    """
    return torch.exp(2 * torch.logsumexp(w, 0) - torch.logsumexp(2 * w, 0))


def psis_khat(w: torch.Tensor) -> torch.Tensor:
    r"""PSIS :math:`\hat k` of each column's log-weights, by ``arviz.psislw``.

    :param w: log-weights, shape ``(K, batch)``.
    :returns: shape ``(batch,)`` (same dtype and device as ``w``). Columns whose log-weights
        all lie within ``1e-6`` nats of each other get ``-inf`` (equal weights: an exact proposal,
        perfectly reliable, where ArviZ would answer ``inf``); all columns get ``nan`` when
        ``K < 25`` (the Pareto tail would have fewer than 5 draws); a column with a non-finite
        log-weight gets ``nan`` (no tail can be fitted).
    """
    import arviz

    num_samples, batch = w.shape
    if num_samples < _MIN_SAMPLES_FOR_KHAT:
        return torch.full((batch,), float("nan"), dtype=w.dtype, device=w.device)
    lw = w.detach().to("cpu", torch.float64).numpy().T
    finite = np.isfinite(lw).all(1)
    khat = np.full(batch, np.nan)
    if finite.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ArviZ's own k-hat warnings: we issue ours
            _, k = arviz.psislw(np.ascontiguousarray(lw[finite]))
        khat[finite] = np.asarray(k, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        spread = lw.max(1) - lw.min(1)
    khat[finite & np.isfinite(spread) & (spread <= _EQUAL_WEIGHTS_ATOL)] = -np.inf
    return torch.as_tensor(khat, dtype=w.dtype, device=w.device)


def log_weights(model: Any, *args: Any, num_samples: int = 1, **kwargs: Any) -> torch.Tensor:
    r"""Log importance weights :math:`w_k` of each datapoint, shape ``(num_samples, batch)``.

    .. math::

        w_k = \sum_{\text{sites } s \text{ of the model}} \log p_s(v_{s,k})
              - \sum_{\text{latent sites } s} \log q_s(v_{s,k}), \qquad v_k \sim q .

    Two forms, like Pyro's importance functions:

    - ``log_weights(model, guide, *args, num_samples=K, **kwargs)``: any Pyro model and guide,
      called with ``*args, **kwargs``; the batch is the data plate found from the traces;
    - ``log_weights(vae, x, idx=None, num_samples=K)``: a :class:`~pyrovae.VAE` (convenience).

    The guide is traced under a particle plate left of every plate of the programs, the model
    replayed against it, and each sample site's *unscaled* ``log_prob`` summed per datapoint.
    """
    if isinstance(model, (tuple, list)) or (
        isinstance(model, torch.nn.Module) and callable(getattr(model, "check_data", None))
    ):
        program = Program.resolve(model)
        x = args[0] if args else kwargs.pop("x")
        idx = args[1] if len(args) > 1 else kwargs.pop("idx", None)
        if len(args) > 2:
            num_samples = args[2]
        call = (x, idx)
    else:
        if not args or not callable(args[0]):
            raise ConfigError(
                "log_weights takes (model, guide, *args) or (vae, x, idx=None); the second "
                "argument must be the guide"
            )
        program = _CallProgram(model, args[0], args[1:], kwargs)
        call = (None, None)
    num_samples = check_positive_int(num_samples, "num_samples")
    x, idx = call
    if idx is None and x is not None:
        idx = torch.arange(x.shape[0], device=x.device)
    if isinstance(program, _CallProgram):
        return program.weights(num_samples)
    program.analyze(x, idx)
    return program.log_weights(x, idx, num_samples)


class _CallProgram(Program):
    """A model/guide pair called with fixed ``*args, **kwargs`` (for :func:`log_weights`)."""

    def __init__(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> None:
        super().__init__(model, guide)
        self._call = (args, kwargs)

    def _traces(self, x: Any, idx: Any, num_samples: Any, **options: Any) -> Any:
        import pyro
        from pyro import poutine

        args, kwargs = self._call

        def wrap(fn: Any) -> Any:
            if num_samples is None:
                return fn
            return pyro.plate("_pyrovae_particles", num_samples, dim=self.particle_dim)(fn)

        with poutine.block():
            guide_trace = poutine.trace(wrap(self.guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(
                poutine.replay(wrap(self.model), trace=guide_trace)
            ).get_trace(*args, **kwargs)
        return guide_trace, model_trace

    def weights(self, num_samples: int) -> torch.Tensor:
        with torch.random.fork_rng(), torch.no_grad():  # a probe: draws nothing from the stream
            _, model_trace = self._traces(None, None, None)
        # the batch size: the size of the plate enclosing the first observed site
        obs = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
        if not obs:
            raise ConfigError("the model has no observed site (pyro.sample(..., obs=x))")
        frames = [f for f in obs[0]["cond_indep_stack"] if f.vectorized]
        named = [f for f in frames if f.name == "data"]
        frame = (named or sorted(frames, key=lambda f: f.dim) or [None])[0]
        batch = 1 if frame is None else int(frame.size)
        probe = torch.zeros(batch)
        self.analyze(probe, torch.arange(batch))
        return self.log_weights(probe, torch.arange(batch), num_samples)


def _weight_batches(
    program: Program,
    data: Any,
    num_samples: int,
    options: EstimateOptions,
    *,
    desc: str,
    group: Any = None,
) -> Iterator[torch.Tensor]:
    """Yield the log-weights ``(num_samples, batch)`` of consecutive batches covering ``data``
    (this rank's batches under a process ``group``)."""
    if not program.amortized and options.local == "fit":
        for sub, x, idx in fitted_programs(program, data):
            sub.analyze(x, idx)
            rows = rows_per_chunk(sub, options.max_bytes, options.max_rows)
            yield _draw(sub, x, idx, num_samples, rows)
        return
    if options.local != "lookup":
        refuse_local(program, desc)
    for x, idx, per_chunk, _ in chunks(
        program, data, num_samples, max_bytes=options.max_bytes, max_rows=options.max_rows,
        progress=options.progress, desc=desc, seed=options.seed, group=group,
    ):
        parts = []
        for k0 in range(0, num_samples, per_chunk):
            parts.append(program.log_weights(x, idx, min(per_chunk, num_samples - k0)))
        yield torch.cat(parts, 0)


def _draw(program: Program, x: torch.Tensor, idx: torch.Tensor, num_samples: int, rows: int) -> torch.Tensor:
    per_chunk = max(1, min(num_samples, rows // max(1, x.shape[0])))
    parts = []
    for k0 in range(0, num_samples, per_chunk):
        parts.append(program.log_weights(x, idx, min(per_chunk, num_samples - k0)))
    return torch.cat(parts, 0)


def _prepared(vae: Scorable, options: EstimateOptions) -> tuple[Program, Any]:
    """The program to score (its importance weights compiled if ``options.compile``, see
    :meth:`Program.compile`; refused for ``local="fit"``, whose proposals are new programs) and
    the process group the datapoints are split over."""
    program = Program.resolve(vae, "vae")
    group = resolve_group(options.process_group, program, options.local)
    if options.compile and options.local == "fit":
        raise ConfigError(
            "compile=True compiles the amortized encoder's importance weights; local='fit' "
            "fits a new proposal per datapoint: estimate without compile=True (--compile)"
        )
    return program.compile(options.compile), group


def _sum(count: int, group: Any) -> int:
    if group is None:
        return count
    from .distributed import all_reduce_int

    return all_reduce_int(count, group)


def _estimate(cls: type, values: torch.Tensor, **extra: Any) -> Any:
    values = values.detach().cpu()
    mean, stderr = mean_stderr(values)
    return cls(values, mean, stderr, **extra)


@torch.no_grad()
def log_likelihood(
    vae: Scorable,
    data: Any,
    num_samples: int = 1000,
    *,
    diagnostics: bool = True,
    warn_share: float = 0.01,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> LogLikelihood:
    r"""Estimate :math:`\log p(x)` of each datapoint by importance sampling with ``K`` draws.

    .. math::

        \log \hat p(x) = \log \frac1K \sum_{k=1}^K e^{w_k}, \qquad
        w_k = \log p(x, z_k) - \log q(z_k \mid x), \quad z_k \sim q(z \mid x).

    :param vae: a :class:`~pyrovae.VAE`, or a ``(model, guide)`` pair of Pyro programs called
        as ``model(x)`` / ``guide(x)`` with their sites in a plate over the batch (as in Pyro's
        VAE tutorial).
    :param data: a tensor ``(num_datapoints, num_features)`` (a pair also takes
        ``(num_datapoints, ...)``) or a dataset of ``(x, idx)``.
    :param num_samples: ``K``, importance samples per datapoint (>= 1). ``K = 1`` gives an
        unbiased estimate of the ELBO; the estimate is a lower bound in expectation that tightens
        as ``K`` grows (Burda et al. 2016).
    :param diagnostics: also compute each datapoint's PSIS :math:`\hat k` and ESS (see
        :func:`psis_khat`, :func:`effective_sample_size`; cheap: ``arviz.psislw`` takes ~0.35 s
        per million weights, a few percent of the decoder's time).
    :param warn_share: issue an :class:`~pyrovae.errors.ImportanceSamplingWarning` when more than
        this share of datapoints has :math:`\hat k > 0.7` (the estimate is then not to be
        trusted: the proposal is too narrow).
    :param options: how the estimate is computed: memory budget (``max_bytes``, ``max_rows``),
        ``seed``, ``progress``, ``local`` (a per-datapoint family), ``process_group`` and
        ``compile`` (the importance weights through ``torch.compile``: same values, ~15-25 %
        faster on a CPU); see :class:`~pyrovae.options.EstimateOptions`, whose defaults apply
        when it is ``None``.
    :param keywords: the fields of :class:`~pyrovae.options.EstimateOptions` as keywords
        (``seed=0``, ``max_rows=1024``, ...), as before ``options`` existed; not beside
        ``options``.
    :returns: a :class:`LogLikelihood` (with ``khat`` and ``ess`` when ``diagnostics``).
    """
    options = resolve_options(options, keywords, "log_likelihood")
    program, group = _prepared(vae, options)
    num_samples = check_positive_int(num_samples, "num_samples")
    values, khats, esss = [], [], []
    nonfinite = 0
    with evaluating(program.modules, options.seed):
        for w in _weight_batches(program, data, num_samples, options, desc="log p(x)", group=group):
            values.append(torch.logsumexp(w, 0) - math.log(num_samples))
            nonfinite += int((~torch.isfinite(w)).any(0).sum())
            if diagnostics:
                khats.append(psis_khat(w).cpu())
                esss.append(effective_sample_size(w).cpu())
    extra: dict[str, Any] = {
        "num_samples": num_samples,
        "num_nonfinite_weights": _sum(nonfinite, group),
    }
    if diagnostics:
        extra.update(khat=gather_parts(khats, group, dtype=program.dtype),
                     ess=gather_parts(esss, group, dtype=program.dtype))
    result = _estimate(LogLikelihood, gather_parts(values, group, dtype=program.dtype), **extra)
    share = result.unreliable_share
    if diagnostics and not math.isnan(share) and share > warn_share:
        warnings.warn(
            f"importance sampling is not to be trusted: {result.reliability()}; the proposal "
            "q(z|x) is too narrow for the posterior: increase num_samples, use a more flexible "
            "family, or estimate log p(x) by pyrovae.ais",
            ImportanceSamplingWarning,
            stacklevel=3,
        )
    elif result.num_nonfinite:
        warnings.warn(
            f"log p(x) is not finite for {result.num_nonfinite} of {result.num_datapoints} "
            f"datapoints ({result.why_not_finite()}); check that the data lie in the "
            "likelihood's support",
            ImportanceSamplingWarning,
            stacklevel=3,
        )
    return result


@torch.no_grad()
def iwae_bounds(
    vae: Scorable,
    data: Any,
    num_samples: Sequence[int] = (1, 10, 100, 1000, 5000),
    *,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> IWAEBounds:
    r"""IWAE bounds :math:`L_K` of each datapoint for several ``K`` in one pass.

    Draws :math:`\max K` samples per datapoint once; :math:`L_K` is computed from the *first*
    ``K`` log-weights, so the estimates are nested and cost one :math:`\max K` evaluation:

    .. math::

        L_K(x) = \operatorname{logsumexp}_{k \le K} w_k - \log K .

    :param vae: a :class:`~pyrovae.VAE` or a ``(model, guide)`` pair (see :func:`log_likelihood`).
    :param num_samples: the ``K`` values (positive integers; sorted, duplicates dropped).
    :param options: how the estimate is computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it), as for :func:`log_likelihood`.
    :returns: an :class:`IWAEBounds`.
    """
    options = resolve_options(options, keywords, "iwae_bounds")
    if isinstance(num_samples, int):
        num_samples = (num_samples,)
    try:
        ks = sorted({check_positive_int(k, "num_samples") for k in num_samples})
    except TypeError:
        raise ConfigError(
            f"num_samples must be a sequence of positive integers, got {num_samples!r}"
        ) from None
    if not ks:
        raise ConfigError("num_samples is empty; pass e.g. (1, 10, 100, 1000)")
    program, group = _prepared(vae, options)
    columns = []
    with evaluating(program.modules, options.seed):
        for w in _weight_batches(program, data, ks[-1], options, desc="IWAE bounds", group=group):
            columns.append(
                torch.stack([torch.logsumexp(w[:k], 0) - math.log(k) for k in ks]).cpu()
            )
    values = gather_parts(columns, group, dim=1, empty=(len(ks), 0), dtype=program.dtype)
    n = values.shape[1]
    stderrs = (
        values.std(1, unbiased=True) / math.sqrt(n)
        if n > 1
        else torch.full((len(ks),), float("nan"), dtype=values.dtype)
    )
    means = values.mean(1)
    return IWAEBounds(
        values, float(means[-1]), float(stderrs[-1]), tuple(ks), means, stderrs
    )


@torch.no_grad()
def elbo(
    vae: Scorable,
    data: Any,
    num_samples: int = 1,
    *,
    options: EstimateOptions | None = None,
    **keywords: Any,
) -> ELBOEstimate:
    r"""Monte Carlo estimate of each datapoint's ELBO, :math:`\frac1K \sum_k w_k`.

    .. math::

        \mathcal L[q](x) = \mathbb E_{q(z \mid x)}[\log p(x, z) - \log q(z \mid x)]
        \approx \frac1K \sum_{k=1}^K w_k .

    :param vae: a :class:`~pyrovae.VAE` or a ``(model, guide)`` pair (see :func:`log_likelihood`).
    :param num_samples: ``K``, draws per datapoint (>= 1).
    :param options: how the estimate is computed (:class:`~pyrovae.options.EstimateOptions`;
        its fields also as keywords, not beside it), as for :func:`log_likelihood`.
    :returns: an :class:`ELBOEstimate`.
    """
    options = resolve_options(options, keywords, "elbo")
    program, group = _prepared(vae, options)
    num_samples = check_positive_int(num_samples, "num_samples")
    nonfinite = 0
    parts = []
    with evaluating(program.modules, options.seed):
        for w in _weight_batches(program, data, num_samples, options, desc="ELBO", group=group):
            parts.append(w.mean(0))
            nonfinite += int((~torch.isfinite(w)).any(0).sum())
    return _estimate(
        ELBOEstimate, gather_parts(parts, group, dtype=program.dtype), num_samples=num_samples,
        num_nonfinite_weights=_sum(nonfinite, group),
    )

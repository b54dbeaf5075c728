r"""Importance-sampled log-likelihood :math:`\log p(x)` and per-datapoint ELBOs.

For each datapoint, with the guide as proposal,

.. math::

    w_k = \log p(x \mid z_k) + \log p(z_k) - \log q(z_k \mid x), \qquad z_k \sim q(z \mid x),
    \quad k = 1..K,

    \log p(x) \approx \log \frac1K \sum_{k=1}^K e^{w_k} \quad (\text{the IWAE bound } L_K),
    \qquad \mathrm{ELBO}(x) \approx \frac1K \sum_{k=1}^K w_k .

The draws are vectorized under a particle plate and chunked so that at most ``max_rows``
latent rows go through the decoder at once: memory stays bounded for any ``K``. The weights are
computed from each site's own ``log_prob``, so the ``"data"`` plate's subsample scale never leaks
into them.

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

import pyro
import torch
from pyro import poutine

from ._batching import as_dataset
from ._checks import check_positive_int, check_seed, check_vae, to_device
from .errors import ConfigError, ImportanceSamplingWarning

__all__ = [
    "LogLikelihood",
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
class LogLikelihood:
    r"""Per-datapoint estimates and their summary.

    :ivar values: per-datapoint estimates, shape ``(num_datapoints,)`` (nats).
    :ivar mean: their mean (nats per datapoint).
    :ivar stderr: the standard error of the mean over datapoints.
    :ivar num_samples: ``K``, the importance samples per datapoint.
    :ivar khat: per-datapoint PSIS :math:`\hat k`, shape ``(num_datapoints,)``, or ``None`` when
        diagnostics were not computed. ``-inf`` where all ``K`` log-weights are equal (an exact
        proposal: perfectly reliable; ArviZ itself would say ``inf``); ``nan`` when ``K < 25``
        (too few draws to fit a tail).
    :ivar ess: per-datapoint effective sample size :math:`1/\sum_k \tilde w_k^2` of the
        normalized weights, shape ``(num_datapoints,)``, in ``[1, K]``; or ``None``.
    """

    values: torch.Tensor
    mean: float
    stderr: float
    num_samples: int
    khat: torch.Tensor | None = None
    ess: torch.Tensor | None = None

    @property
    def unreliable_share(self) -> float:
        r"""The share of datapoints whose :math:`\hat k` exceeds :data:`KHAT_THRESHOLD` (0.7).

        ``nan`` when no :math:`\hat k` is available (diagnostics off, or ``K < 25``).
        """
        if self.khat is None or self.khat.numel() == 0 or bool(torch.isnan(self.khat).all()):
            return float("nan")
        return float((self.khat > KHAT_THRESHOLD).double().mean())

    def __str__(self) -> str:
        text = f"{self.mean:.2f} ± {self.stderr:.2f} nats (K={self.num_samples}, n={len(self.values)})"
        share = self.unreliable_share
        if not math.isnan(share):
            text += f", k-hat > {KHAT_THRESHOLD} for {100 * share:.1f}%"
        return text


@dataclass(frozen=True)
class IWAEBounds:
    r"""IWAE bounds :math:`L_K` for several ``K`` from one set of draws per datapoint.

    :math:`L_K(x) = \log \frac1K \sum_{k=1}^K e^{w_k}` uses the *first* ``K`` of the same
    :math:`\max K` draws, so the estimates are nested (and :math:`L_1` is one-sample ELBO).
    In expectation :math:`L_1 \le L_{10} \le \dots \le \log p(x)` (Burda et al. 2016).

    :ivar num_samples: the ``K`` values, ascending, length ``m``.
    :ivar values: per-datapoint bounds, shape ``(m, num_datapoints)``.
    :ivar means: mean over datapoints for each ``K``, shape ``(m,)``.
    :ivar stderrs: standard error of each mean over datapoints, shape ``(m,)``.
    """

    num_samples: tuple[int, ...]
    values: torch.Tensor
    means: torch.Tensor
    stderrs: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: ``{"num_samples": [...], "mean": [...], "stderr": [...]}``."""
        return {
            "num_samples": list(self.num_samples),
            "mean": [float(v) for v in self.means],
            "stderr": [float(v) for v in self.stderrs],
            "num_datapoints": int(self.values.shape[1]),
        }

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
    :returns: shape ``w.shape[1:]``, values in ``[1, K]``.
    """
    return torch.exp(2 * torch.logsumexp(w, 0) - torch.logsumexp(2 * w, 0))


def psis_khat(w: torch.Tensor) -> torch.Tensor:
    r"""PSIS :math:`\hat k` of each column's log-weights, by ``arviz.psislw``.

    :param w: log-weights, shape ``(K, batch)``.
    :returns: shape ``(batch,)`` (same dtype and device as ``w``). Columns whose log-weights
        all lie within ``1e-6`` nats of each other get ``-inf`` (equal weights: an exact proposal,
        perfectly reliable, where ArviZ would answer ``inf``); all columns get ``nan`` when
        ``K < 25`` (the Pareto tail would have fewer than 5 draws).
    """
    import arviz

    num_samples, batch = w.shape
    if num_samples < _MIN_SAMPLES_FOR_KHAT:
        return torch.full((batch,), float("nan"), dtype=w.dtype, device=w.device)
    lw = w.detach().to("cpu", torch.float64).numpy().T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own k-hat warnings: we issue ours
        _, khat = arviz.psislw(np.ascontiguousarray(lw))
    khat = np.asarray(khat, dtype=np.float64).reshape(batch)
    spread = lw.max(1) - lw.min(1)
    khat[np.isfinite(spread) & (spread <= _EQUAL_WEIGHTS_ATOL)] = -np.inf
    return torch.as_tensor(khat, dtype=w.dtype, device=w.device)


def log_weights(
    vae: Any, x: torch.Tensor, idx: torch.Tensor | None = None, num_samples: int = 1
) -> torch.Tensor:
    r"""Log importance weights :math:`w_k` for a batch, shape ``(num_samples, batch)``.

    Traces ``vae.guide`` under a particle plate, replays ``vae.model`` against it, and sums each
    sample site's unscaled ``log_prob`` (model sites minus guide sites).
    """
    if idx is None:
        idx = torch.arange(x.shape[0], device=x.device)
    particles = pyro.plate("_pyrovae_particles", num_samples, dim=-2)
    with poutine.block():
        guide_trace = poutine.trace(particles(vae.guide)).get_trace(x, idx)
        model_trace = poutine.trace(
            poutine.replay(particles(vae.model), trace=guide_trace)
        ).get_trace(x, idx)
    w = x.new_zeros(num_samples, x.shape[0])
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            w = w + site["fn"].log_prob(site["value"])
            if not site["is_observed"]:
                g = guide_trace.nodes.get(name)
                if g is None:
                    raise ConfigError(
                        f"latent site {name!r} of the model has no counterpart in the guide"
                    )
                w = w - g["fn"].log_prob(g["value"])
    return w


def _chunked_log_weights(
    vae: Any, data: Any, num_samples: int, max_rows: int, progress: bool, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(idx, w)`` with ``w`` of shape ``(num_samples, len(idx))``, covering ``data``."""
    dataset = as_dataset(data, "data")
    n = len(dataset)
    if n == 0:
        from .errors import DataError

        raise DataError("data is empty; pass at least one datapoint")
    points_per_batch = max(1, max_rows // num_samples)
    particles_per_chunk = min(num_samples, max_rows)
    device = next(iter(vae.parameters()), torch.empty(0)).device
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=desc, unit="pt", disable=not progress, leave=False) as bar:
        for start in range(0, n, points_per_batch):
            x, idx = dataset[torch.arange(start, min(start + points_per_batch, n))]
            x = to_device(torch.as_tensor(x), device)
            idx = torch.as_tensor(idx).to(device)
            if start == 0:
                vae.check_data(x)
            chunks = []
            for k0 in range(0, num_samples, particles_per_chunk):
                k = min(particles_per_chunk, num_samples - k0)
                chunks.append(log_weights(vae, x, idx, k))
            yield idx, torch.cat(chunks, 0)
            bar.update(len(idx))


def _summarize(values: torch.Tensor, num_samples: int) -> LogLikelihood:
    values = values.detach().cpu()
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return LogLikelihood(values, float(values.mean()), stderr, num_samples)


def _check(num_samples: Any, max_rows: Any, vae: Any = None) -> tuple[int, int]:
    check_vae(vae)
    return check_positive_int(num_samples, "num_samples"), check_positive_int(max_rows, "max_rows")


@torch.no_grad()
def log_likelihood(
    vae: Any,
    data: Any,
    num_samples: int = 1000,
    *,
    max_rows: int = 2048,
    seed: int | None = None,
    progress: bool = False,
    diagnostics: bool = True,
    warn_share: float = 0.01,
) -> LogLikelihood:
    r"""Estimate :math:`\log p(x)` of each datapoint by importance sampling with ``K`` draws.

    :param vae: a :class:`~pyrovae.VAE` (or anything with the same ``model``/``guide``).
    :param data: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``.
    :param num_samples: ``K``, importance samples per datapoint (>= 1). ``K = 1`` gives an
        unbiased estimate of the ELBO; the estimate is a lower bound in expectation that tightens
        as ``K`` grows (Burda et al. 2016).
    :param max_rows: at most this many latent rows are decoded at once (bounds memory).
    :param seed: if given, the draws are reproducible (the global RNG is left as it was).
    :param progress: show a progress bar.
    :param diagnostics: also compute each datapoint's PSIS :math:`\hat k` and ESS (see
        :func:`psis_khat`, :func:`effective_sample_size`; cheap: ``arviz.psislw`` takes ~0.35 s
        per million weights, a few percent of the decoder's time).
    :param warn_share: issue an :class:`~pyrovae.errors.ImportanceSamplingWarning` when more than
        this share of datapoints has :math:`\hat k > 0.7` (the estimate is then not to be
        trusted: the proposal is too narrow).
    :returns: a :class:`LogLikelihood` (with ``khat`` and ``ess`` when ``diagnostics``).
    """
    num_samples, max_rows = _check(num_samples, max_rows, vae)
    values, khats, esss = [], [], []
    with _seeded(seed), _evaluating(vae):
        for _, w in _chunked_log_weights(vae, data, num_samples, max_rows, progress, "log p(x)"):
            values.append(torch.logsumexp(w, 0) - math.log(num_samples))
            if diagnostics:
                khats.append(psis_khat(w).cpu())
                esss.append(effective_sample_size(w).cpu())
    result = _summarize(torch.cat(values), num_samples)
    if diagnostics:
        result = LogLikelihood(
            result.values,
            result.mean,
            result.stderr,
            result.num_samples,
            khat=torch.cat(khats),
            ess=torch.cat(esss),
        )
        share = result.unreliable_share
        if not math.isnan(share) and share > warn_share:
            warnings.warn(
                f"importance sampling is not to be trusted: PSIS k-hat > {KHAT_THRESHOLD} for "
                f"{100 * share:.1f}% of the datapoints (mean ESS {float(result.ess.mean()):.1f} "
                f"of K={num_samples}); the proposal q(z|x) is too narrow for the posterior: "
                "increase num_samples or use a more flexible family",
                ImportanceSamplingWarning,
                stacklevel=3,
            )
    return result


@torch.no_grad()
def iwae_bounds(
    vae: Any,
    data: Any,
    num_samples: Sequence[int] = (1, 10, 100, 1000, 5000),
    *,
    max_rows: int = 2048,
    seed: int | None = None,
    progress: bool = False,
) -> IWAEBounds:
    r"""IWAE bounds :math:`L_K` of each datapoint for several ``K`` in one pass.

    Draws :math:`\max K` samples per datapoint once; :math:`L_K` is computed from the *first*
    ``K`` log-weights, so the estimates are nested and cost one :math:`\max K` evaluation:

    .. math::

        L_K(x) = \operatorname{logsumexp}_{k \le K} w_k - \log K .

    :param num_samples: the ``K`` values (positive integers; sorted, duplicates dropped).
    :returns: an :class:`IWAEBounds`.
    """
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
    k_max, max_rows = _check(ks[-1], max_rows, vae)
    columns = []
    with _seeded(seed), _evaluating(vae):
        for _, w in _chunked_log_weights(vae, data, k_max, max_rows, progress, "IWAE bounds"):
            columns.append(
                torch.stack([torch.logsumexp(w[:k], 0) - math.log(k) for k in ks]).cpu()
            )
    values = torch.cat(columns, 1)
    n = values.shape[1]
    stderrs = (
        values.std(1, unbiased=True) / math.sqrt(n)
        if n > 1
        else torch.full((len(ks),), float("nan"), dtype=values.dtype)
    )
    return IWAEBounds(tuple(ks), values, values.mean(1), stderrs)


@torch.no_grad()
def elbo(
    vae: Any,
    data: Any,
    num_samples: int = 1,
    *,
    max_rows: int = 2048,
    seed: int | None = None,
    progress: bool = False,
) -> LogLikelihood:
    r"""Monte Carlo estimate of each datapoint's ELBO, :math:`\frac1K \sum_k w_k`.

    Same arguments as :func:`log_likelihood`; returns a :class:`LogLikelihood` of ELBOs.
    """
    num_samples, max_rows = _check(num_samples, max_rows, vae)
    with _seeded(seed), _evaluating(vae):
        parts = [
            w.mean(0)
            for _, w in _chunked_log_weights(vae, data, num_samples, max_rows, progress, "ELBO")
        ]
    return _summarize(torch.cat(parts), num_samples)


class _seeded:
    """Fork the torch RNG and seed it, if a seed is given."""

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed(seed)
        self._fork: Any = None

    def __enter__(self) -> None:
        if self.seed is not None:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            self._fork = torch.random.fork_rng(devices=devices)
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)


class _evaluating:
    """Put the model in eval mode and turn off distribution validation, then restore both."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    def __enter__(self) -> None:
        self._was_training = self.vae.training
        self.vae.eval()
        self._validation = pyro.validation_enabled(False)
        self._validation.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._validation.__exit__(*exc)
        self.vae.train(self._was_training)

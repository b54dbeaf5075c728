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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine

from ._batching import as_dataset
from ._checks import check_positive_int
from .errors import ConfigError

__all__ = ["LogLikelihood", "log_weights", "log_likelihood", "elbo"]


@dataclass(frozen=True)
class LogLikelihood:
    """Per-datapoint estimates and their summary.

    :ivar values: per-datapoint estimates, shape ``(num_datapoints,)`` (nats).
    :ivar mean: their mean (nats per datapoint).
    :ivar stderr: the standard error of the mean over datapoints.
    :ivar num_samples: ``K``, the importance samples per datapoint.
    """

    values: torch.Tensor
    mean: float
    stderr: float
    num_samples: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.stderr:.2f} nats (K={self.num_samples}, n={len(self.values)})"


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
            x = x.to(device)
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


def _check(num_samples: Any, max_rows: Any) -> tuple[int, int]:
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
    :returns: a :class:`LogLikelihood`.
    """
    num_samples, max_rows = _check(num_samples, max_rows)
    with _seeded(seed), _evaluating(vae):
        parts = [
            torch.logsumexp(w, 0) - math.log(num_samples)
            for _, w in _chunked_log_weights(vae, data, num_samples, max_rows, progress, "log p(x)")
        ]
    return _summarize(torch.cat(parts), num_samples)


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
    num_samples, max_rows = _check(num_samples, max_rows)
    with _seeded(seed), _evaluating(vae):
        parts = [
            w.mean(0)
            for _, w in _chunked_log_weights(vae, data, num_samples, max_rows, progress, "ELBO")
        ]
    return _summarize(torch.cat(parts), num_samples)


class _seeded:
    """Fork the torch RNG and seed it, if a seed is given."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
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

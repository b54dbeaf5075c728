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

from ._batching import as_dataset
from ._checks import check_positive_float, check_positive_int
from .errors import ConfigError, DataError
from .importance import _evaluating, _seeded, elbo, log_likelihood, log_weights

__all__ = ["GapResult", "gaps", "optimal_elbo", "plot_gaps"]


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, stderr


@dataclass(frozen=True)
class GapResult:
    r"""Per-datapoint :math:`\log p(x)`, :math:`\mathcal L[q^*]`, :math:`\mathcal L[q]` and the gaps.

    All tensors have shape ``(num_datapoints,)``, in nats, on the CPU.

    :ivar log_px: :math:`\log p(x)` by importance sampling (an IWAE bound with ``K`` draws; a
        lower bound in expectation, tight when PSIS :math:`\hat k` is small).
    :ivar elbo_optimal: :math:`\mathcal L[q^*]`, the ELBO of the locally optimized member.
    :ivar elbo_amortized: :math:`\mathcal L[q]`, the ELBO of the amortized guide.
    :ivar khat: PSIS :math:`\hat k` of the importance sampling per datapoint (``nan`` if
        ``K < 25``, ``-inf`` for equal weights; see :func:`pyrovae.importance.psis_khat`).
    :ivar num_steps: optimizer steps taken for each datapoint's batch.
    :ivar settings: the estimator settings (``num_samples``, ``num_elbo_samples``, ...).
    """

    log_px: torch.Tensor
    elbo_optimal: torch.Tensor
    elbo_amortized: torch.Tensor
    khat: torch.Tensor
    num_steps: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

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
        """``name -> (mean, standard error over datapoints)`` for the five quantities."""
        return {
            "log_px": _mean_stderr(self.log_px),
            "elbo_optimal": _mean_stderr(self.elbo_optimal),
            "elbo_amortized": _mean_stderr(self.elbo_amortized),
            "approximation_gap": _mean_stderr(self.approximation_gap),
            "amortization_gap": _mean_stderr(self.amortization_gap),
            "inference_gap": _mean_stderr(self.inference_gap),
        }

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        """A JSON-ready dict: means and standard errors (and per-datapoint lists if asked)."""
        out: dict[str, Any] = {"num_datapoints": int(self.log_px.numel())}
        for name, (mean, stderr) in self.summary().items():
            out[name] = {"mean": mean, "stderr": stderr}
        finite = self.khat[~torch.isnan(self.khat)]
        out["khat_above_0.7_share"] = (
            float((finite > 0.7).double().mean()) if finite.numel() else None
        )
        out["mean_num_steps"] = float(self.num_steps.double().mean())
        out["settings"] = dict(self.settings)
        if per_datapoint:
            for name in ("log_px", "elbo_optimal", "elbo_amortized", "khat"):
                out.setdefault("per_datapoint", {})[name] = [
                    float(v) for v in getattr(self, name)
                ]
        return out

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"log p(x) {s['log_px'][0]:.2f}, L[q*] {s['elbo_optimal'][0]:.2f}, "
            f"L[q] {s['elbo_amortized'][0]:.2f}; approximation gap "
            f"{s['approximation_gap'][0]:.2f} ± {s['approximation_gap'][1]:.2f}, amortization gap "
            f"{s['amortization_gap'][0]:.2f} ± {s['amortization_gap'][1]:.2f} nats "
            f"(n={self.log_px.numel()})"
        )


class _LocalGuide:
    """``model``/``guide`` pair whose guide samples ``z`` from a given distribution (private).

    Lets :func:`pyrovae.importance.log_weights` score any proposal against the VAE's model.
    """

    def __init__(self, vae: Any, q: Callable[[], Any]) -> None:
        self.vae = vae
        self.q = q
        self.model = vae.model

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", self.vae.num_data, subsample=idx):
            return pyro.sample("z", self.q())


def _check_family(vae: Any) -> Any:
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


def _optimize_batch(
    vae: Any,
    x: torch.Tensor,
    idx: torch.Tensor,
    *,
    num_steps: int,
    lr: float,
    num_particles: int,
    check_every: int,
    tol: float,
    max_decays: int,
) -> tuple[dict[str, torch.Tensor], int]:
    r"""Maximize :math:`\sum_n \mathcal L[q_n]` over the batch's local parameters.

    Adam on the reparameterized ELBO (``num_particles`` draws per step). At the start and every
    ``check_every`` steps each datapoint's current parameters are scored by a fresh ELBO estimate
    with ``10 * num_particles`` draws, and each datapoint keeps the best parameters seen so far
    (so the result is never worse than the encoder's output because of late gradient noise; the
    final ELBO is estimated afterwards on fresh draws, so this choice does not bias it upwards).
    When the batch's mean score improved by less than ``tol`` nats per datapoint the learning
    rate is halved; after ``max_decays`` halvings (or ``num_steps`` steps) the optimization stops.

    :returns: the best parameters (detached) and the number of steps taken.
    """
    family = vae.family
    with torch.no_grad():
        start = family.local_params(x, idx)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    if not params:
        raise ConfigError(f"{type(family).__name__}.local_params returned no parameters")
    for k, v in params.items():
        if v.dim() == 0 or v.shape[0] != x.shape[0]:
            raise ConfigError(
                f"{type(family).__name__}.local_params()[{k!r}] has shape {tuple(v.shape)}; "
                f"local parameters must have the batch size {x.shape[0]} first"
            )
    proposal = _LocalGuide(vae, lambda: family.distribution_from_params(params))
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    leaves = list(params.values())

    def score() -> torch.Tensor:
        with torch.no_grad():
            return log_weights(proposal, x, idx, 10 * num_particles).mean(0)

    best_score = score()
    best_params = {k: v.detach().clone() for k, v in params.items()}
    best_mean = float(best_score.mean())
    decays = 0
    step = 0
    while step < num_steps:
        w = log_weights(proposal, x, idx, num_particles)  # (S, batch)
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
    vae: Any,
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
    max_rows: int = 2048,
    seed: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\mathcal L[q^*]` per datapoint: each datapoint's variational parameters optimized.

    Starts every datapoint's parameters at the encoder's output (``vae.family.local_params``),
    keeps the decoder, the prior and any shared network of the family fixed, and runs
    :func:`_optimize_batch` on batches of ``batch_size`` datapoints; then estimates the ELBO of
    the optimized distribution with ``num_elbo_samples`` draws (in chunks of ``max_rows``).

    :returns: ``(elbo, num_steps)``, both of shape ``(num_datapoints,)``.
    """
    values, steps = [], []
    for _, x, idx, n_steps, params in _optimized_batches(
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
    ):
        values.append(_mc_elbo(vae, x, idx, params, num_elbo_samples, max_rows))
        steps.append(torch.full((x.shape[0],), n_steps, dtype=torch.long))
    return torch.cat(values), torch.cat(steps)


def _optimized_batches(
    vae: Any,
    data: Any,
    *,
    num_steps: int,
    lr: float,
    num_particles: int,
    batch_size: int,
    check_every: int,
    tol: float,
    max_decays: int,
    seed: int | None,
    progress: bool,
) -> Any:
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
    dataset = as_dataset(data, "data")
    n = len(dataset)
    if n == 0:
        raise DataError("data is empty; pass at least one datapoint")
    device, _ = vae._device_dtype() if hasattr(vae, "_device_dtype") else (None, None)
    from tqdm.auto import tqdm

    frozen = [p for p in vae.parameters() if p.requires_grad]
    with _seeded(seed), _evaluating(vae), tqdm(
        total=n, desc="L[q*]", unit="pt", disable=not progress, leave=False
    ) as bar:
        for p in frozen:
            p.requires_grad_(False)
        try:
            for start in range(0, n, batch_size):
                x, idx = dataset[torch.arange(start, min(start + batch_size, n))]
                idx = torch.as_tensor(idx)
                if device is not None:
                    x, idx = x.to(device), idx.to(device)
                if start == 0 and hasattr(vae, "check_data"):
                    vae.check_data(x)
                params, n_steps = _optimize_batch(
                    vae,
                    x,
                    idx,
                    num_steps=num_steps,
                    lr=lr,
                    num_particles=num_particles,
                    check_every=check_every,
                    tol=tol,
                    max_decays=max_decays,
                )
                yield start, x, idx, n_steps, params
                bar.update(x.shape[0])
        finally:
            for p in frozen:
                p.requires_grad_(True)


@torch.no_grad()
def _mc_elbo(
    vae: Any,
    x: torch.Tensor,
    idx: torch.Tensor,
    params: dict[str, torch.Tensor],
    num_samples: int,
    max_rows: int,
) -> torch.Tensor:
    """Monte Carlo ELBO of ``family.distribution_from_params(params)``, shape ``(batch,)``."""
    proposal = _LocalGuide(vae, lambda: vae.family.distribution_from_params(params))
    per_chunk = max(1, max_rows // x.shape[0])
    total = x.new_zeros(x.shape[0])
    for k0 in range(0, num_samples, per_chunk):
        k = min(per_chunk, num_samples - k0)
        total = total + log_weights(proposal, x, idx, k).sum(0)
    return (total / num_samples).cpu()


def gaps(
    vae: Any,
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
    max_rows: int = 2048,
    seed: int | None = 0,
    progress: bool = False,
) -> GapResult:
    r"""Decompose the inference gap of ``vae`` on ``data`` into approximation and amortization gaps.

    .. math::

        \log p(x) - \mathcal L[q] = (\log p(x) - \mathcal L[q^*]) + (\mathcal L[q^*] - \mathcal L[q])

    :param vae: a :class:`~pyrovae.VAE` whose family has ``local_params`` and
        ``distribution_from_params`` (every pyrovae family).
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
    :param max_rows: at most this many latent rows are decoded at once when evaluating.
    :param seed: seeds every draw (``None``: use the global RNG); the global RNG is restored.
    :param progress: show progress bars.
    :returns: a :class:`GapResult`.
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    num_elbo_samples = check_positive_int(num_elbo_samples, "num_elbo_samples")
    max_rows = check_positive_int(max_rows, "max_rows")
    _check_family(vae)
    import warnings

    from .errors import ImportanceSamplingWarning

    with warnings.catch_warnings():
        # The GapResult carries k-hat; its share is reported there instead of a warning here.
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        ll = log_likelihood(
            vae, data, num_samples, max_rows=max_rows, seed=seed, progress=progress
        )
    amortized = elbo(
        vae,
        data,
        num_elbo_samples,
        max_rows=max_rows,
        seed=None if seed is None else seed + 1,
        progress=progress,
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
        max_rows=max_rows,
        seed=None if seed is None else seed + 2,
        progress=progress,
    )
    # q* is the best member of the family, and the encoder's output is a member: when the
    # optimization ends below its start (gradient noise on a nearly optimal start), keep the start.
    optimal = torch.maximum(optimized, amortized.values)
    log_px = ll.values
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
        "seed": seed,
    }
    return GapResult(log_px, optimal, amortized.values, khat, steps, settings)


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

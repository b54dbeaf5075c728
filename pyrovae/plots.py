"""Pictures of a trained VAE: samples, reconstructions, a 2-D latent manifold, interpolations,
training curves, the latent codes coloured by label, PSIS k-hat per datapoint, IWAE bounds
against K, and the KL of each latent dimension.

Image grids come from :func:`torchvision.utils.make_grid`; charts are drawn on a
:class:`matplotlib.figure.Figure` with the Agg canvas, so nothing here touches pyplot's global
state or needs a display. Every function returns what it drew (an image tensor or a Figure) and
writes a PNG when given ``path``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._checks import check_positive_int
from .errors import ConfigError, DataError

__all__ = [
    "image_grid",
    "sample_grid",
    "reconstruction_grid",
    "latent_manifold",
    "interpolation_grid",
    "plot_history",
    "plot_latent_scatter",
    "plot_khat",
    "plot_iwae_bounds",
    "plot_kl_per_dimension",
    "plot_gaps",
]


def _as_images(x: torch.Tensor, image_shape: Sequence[int]) -> torch.Tensor:
    """``(n, D)`` -> ``(n, C, H, W)`` for torchvision; ``image_shape`` is ``(H, W)`` or ``(C, H, W)``."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ConfigError(f"image_shape must be (H, W) or (C, H, W), got {tuple(image_shape)}")
    numel = shape[0] * shape[1] * shape[2]
    if x.dim() != 2 or x.shape[1] != numel:
        raise DataError(
            f"cannot show data of shape {tuple(x.shape)} as images of shape {shape}; "
            f"pass image_shape matching the {x.shape[-1]} features"
        )
    return x.detach().float().cpu().clamp(0, 1).reshape(-1, *shape)


def image_grid(
    x: torch.Tensor,
    image_shape: Sequence[int],
    *,
    nrow: int = 8,
    path: str | Path | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """Tile flat images ``(n, D)`` into one grid image ``(C, H', W')``; save it if ``path``.

    :param scale: enlarge every pixel to ``scale x scale`` (nearest neighbour), so that 28-pixel
        digits are large enough to see in an image viewer.
    """
    # Imported here, not with this module: `pyrovae train` imports this module before training,
    # and torchvision (with torch._dynamo, which it imports) would otherwise be resident from
    # the start; torchvision's own share is ~15 MB once torch.optim has imported torch._dynamo.
    from torchvision.utils import make_grid, save_image

    check_positive_int(scale, "scale")
    grid = make_grid(_as_images(x, image_shape), nrow=nrow, padding=2, pad_value=1.0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    if path is not None:
        save_image(grid, str(path))
    return grid


def sample_grid(
    vae: Any,
    image_shape: Sequence[int],
    *,
    num_samples: int = 64,
    nrow: int = 8,
    path: str | Path | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """A grid of the likelihood means at ``num_samples`` draws ``z ~ p(z)``."""
    check_positive_int(num_samples, "num_samples")
    return image_grid(vae.sample(num_samples), image_shape, nrow=nrow, path=path, scale=scale)


def reconstruction_grid(
    vae: Any,
    x: torch.Tensor,
    image_shape: Sequence[int],
    *,
    path: str | Path | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """Inputs and their reconstructions in alternating rows (each row up to 8 images): rows 1, 3,
    5, ... are the inputs, and the row below each its reconstructions (``vae.reconstruct``)."""
    x = x[:64]
    recon = vae.reconstruct(x).to(x.device)
    rows = []
    for start in range(0, len(x), 8):
        rows += [x[start : start + 8], recon[start : start + 8]]
    width = min(8, len(x))
    padded = [torch.cat([r, r.new_ones(width - len(r), r.shape[1])]) if len(r) < width else r for r in rows]
    return image_grid(torch.cat(padded), image_shape, nrow=width, path=path, scale=scale)


@torch.no_grad()
def latent_manifold(
    vae: Any,
    image_shape: Sequence[int],
    *,
    steps: int = 20,
    path: str | Path | None = None,
) -> torch.Tensor:
    """The learned 2-D manifold (Kingma & Welling 2014, fig. 4): decode a ``steps x steps`` grid.

    The grid is evenly spaced in probability: ``z = Phi^{-1}(u)`` for ``u`` on a uniform grid in
    ``(0, 1)^2``, which covers a standard normal prior evenly. Needs ``latent_dim == 2``.
    """
    check_positive_int(steps, "steps")
    if vae.latent_dim != 2:
        raise ConfigError(
            f"a latent manifold needs latent_dim=2, this model has {vae.latent_dim}; "
            "train with --latent-dim 2"
        )
    p = next(iter(vae.parameters()))
    u = torch.linspace(0.5 / steps, 1 - 0.5 / steps, steps, dtype=p.dtype, device=p.device)
    normal = torch.distributions.Normal(torch.zeros((), dtype=p.dtype, device=p.device), 1.0)
    g = normal.icdf(u)
    zy, zx = torch.meshgrid(g.flip(0), g, indexing="ij")
    z = torch.stack([zx.reshape(-1), zy.reshape(-1)], -1)
    return image_grid(vae.likelihood(z).mean, image_shape, nrow=steps, path=path)


def _mean_or_draw(q: Any) -> torch.Tensor:
    try:
        return q.mean
    except NotImplementedError:
        return q.sample()


@torch.no_grad()
def interpolation_grid(
    vae: Any,
    x_start: torch.Tensor,
    x_end: torch.Tensor,
    image_shape: Sequence[int],
    *,
    steps: int = 10,
    mean: bool = False,
    path: str | Path | None = None,
) -> torch.Tensor:
    """Decode straight lines in latent space between the encodings of paired inputs.

    :param x_start, x_end: ``(n, D)`` inputs; row ``i`` interpolates from ``x_start[i]`` to
        ``x_end[i]`` through ``steps`` points (the encodings are one draw from ``q(z|x)``, or
        its mean with ``mean=True`` where the family's distribution has one).
    """
    check_positive_int(steps, "steps")
    idx = torch.arange(len(x_start), device=x_start.device)
    q0, q1 = vae.family(x_start, idx), vae.family(x_end, idx)
    z0, z1 = (_mean_or_draw(q0), _mean_or_draw(q1)) if mean else (q0.sample(), q1.sample())
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)[None, :, None]
    z = (1 - t) * z0[:, None] + t * z1[:, None]
    x = vae.likelihood(z.reshape(-1, z.shape[-1])).mean
    return image_grid(x, image_shape, nrow=steps, path=path)


def _figure(figsize: tuple[float, float] = (6, 4), dpi: int = 100) -> Any:
    """A Figure on its own Agg canvas (pyplot's global state is never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, path: str | Path | None) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path))
    return fig


def plot_history(history: Any, *, path: str | Path | None = None, title: str = "") -> Any:
    """The training curve: train objective and validation ELBO (nats per datapoint) per epoch."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    epochs = list(range(1, len(history.train_elbo) + 1))
    ax.plot(epochs, history.train_elbo, marker="o", label="train (objective)")
    valid = [(e, v) for e, v in zip(epochs, history.validation_elbo) if v is not None]
    if valid:
        ax.plot(*zip(*valid), marker="s", label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.set_title(title or "training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path))
    return fig


def _as_cpu_tensor(values: Any, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{what} must be a tensor or array of numbers, got {type(values).__name__}") from None
    return t.detach().cpu().double()


def plot_latent_scatter(
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    dims: tuple[int, int] = (0, 1),
    path: str | Path | None = None,
    title: str = "",
    point_size: float = 6.0,
) -> Any:
    r"""The codes of a data set as a scatter plot, one colour per label (Kingma & Welling 2014).

    :param z: codes, shape ``(num_datapoints, latent_dim)`` with ``latent_dim >= 2``, e.g. the
        posterior means :math:`\mathbb E_{q(z \mid x)}[z]` of the test digits.
    :param labels: integer class labels, shape ``(num_datapoints,)`` (one colour and one legend
        entry per class), or ``None`` (one colour).
    :param dims: the two latent dimensions to show on the x and y axes.
    :param path: if given, save the figure there.
    :returns: the :class:`matplotlib.figure.Figure`; its axes hold one ``PathCollection`` per
        class, together holding every point.
    """
    z = _as_cpu_tensor(z, "z")
    if z.dim() != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise DataError(f"z must have shape (num_datapoints, latent_dim >= 2), got {tuple(z.shape)}")
    i, j = (int(d) for d in dims)
    if not (0 <= i < z.shape[1] and 0 <= j < z.shape[1]) or i == j:
        raise ConfigError(f"dims must be two different dimensions below {z.shape[1]}, got {dims}")
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu()
        if labels.shape != (z.shape[0],):
            raise DataError(
                f"labels must have shape ({z.shape[0]},), one per code, got {tuple(labels.shape)}"
            )
    fig = _figure((6, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    if labels is None:
        ax.scatter(z[:, i].numpy(), z[:, j].numpy(), s=point_size, alpha=0.7, linewidths=0)
    else:
        from matplotlib import colormaps

        classes = sorted({int(c) for c in labels.tolist()})
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for k, c in enumerate(classes):
            mask = labels == c
            ax.scatter(z[mask, i].numpy(), z[mask, j].numpy(), s=point_size, alpha=0.7, linewidths=0,
                       color=cmap(k % cmap.N), label=str(c))
        ax.legend(markerscale=2.5, fontsize=8, loc="upper right", framealpha=0.8, title="label")
    ax.set_xlabel(f"z{i + 1}")
    ax.set_ylabel(f"z{j + 1}")
    ax.set_title(title or f"codes of {z.shape[0]} datapoints")
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def plot_khat(
    khat: Any,
    *,
    threshold: float = 0.7,
    path: str | Path | None = None,
    title: str = "",
) -> Any:
    r"""PSIS :math:`\hat k` of each datapoint's importance sampling, with the 0.7 threshold.

    Points above ``threshold`` (red) mark datapoints whose :math:`\log p(x)` estimate is not to
    be trusted (Vehtari et al. 2024). ``-inf`` (all weights equal: an exact proposal) is drawn
    at the bottom of the axes as a triangle; ``nan`` (too few draws) is left out.

    :param khat: ``LogLikelihood.khat`` from :func:`pyrovae.log_likelihood`, shape
        ``(num_datapoints,)``; or a :class:`~pyrovae.importance.LogLikelihood` itself.
    :returns: the Figure; its axes hold one point per datapoint with a finite or ``-inf``
        :math:`\hat k`.
    """
    if hasattr(khat, "khat"):
        khat = khat.khat
    if khat is None:
        raise ConfigError("no k-hat to plot: call log_likelihood(..., diagnostics=True) with K >= 25")
    k = _as_cpu_tensor(khat, "khat").flatten()
    if k.numel() == 0:
        raise DataError("khat is empty")
    index = torch.arange(k.numel())
    finite = torch.isfinite(k)
    exact = torch.isneginf(k)
    if not bool((finite | exact).any()):
        raise DataError("every k-hat is nan (fewer than 25 draws per datapoint); use num_samples >= 25")
    fig = _figure((7, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    bad = finite & (k > threshold)
    good = finite & ~bad
    ax.scatter(index[good].numpy(), k[good].numpy(), s=8, color="tab:blue", label=rf"$\hat k \leq {threshold}$")
    ax.scatter(index[bad].numpy(), k[bad].numpy(), s=8, color="tab:red", label=rf"$\hat k > {threshold}$")
    low = min(float(k[finite].min()) if bool(finite.any()) else 0.0, 0.0) - 0.1
    if bool(exact.any()):
        ax.scatter(index[exact].numpy(), [low] * int(exact.sum()), marker="v", s=12,
                   color="tab:green", label="equal weights (exact)")
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel("datapoint")
    ax.set_ylabel(r"PSIS $\hat k$")
    share = float(bad.sum()) / max(1, int((finite | exact).sum()))
    ax.set_title(title or rf"PSIS $\hat k$ per datapoint: {100 * share:.1f}% above {threshold}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_iwae_bounds(
    bounds: Any,
    *,
    labels: Sequence[str] | None = None,
    reference: float | None = None,
    reference_label: str = "exact log p(x)",
    errorbars: bool = True,
    path: str | Path | None = None,
    title: str = "",
) -> Any:
    r"""The IWAE bound :math:`L_K` (mean over datapoints, ± its standard error) against ``K``.

    :math:`L_1` is the ELBO; :math:`L_K` rises toward :math:`\log p(x)` as ``K`` grows (Burda et
    al. 2016). ``K`` is on a log axis.

    :param bounds: one :class:`~pyrovae.importance.IWAEBounds` (from :func:`pyrovae.iwae_bounds`)
        or a sequence of them (one line per model).
    :param labels: one name per result.
    :param reference: an exact :math:`\log p(x)` (mean over the same datapoints) to draw as a
        dashed line, when one is known.
    :param errorbars: draw ± the standard error over datapoints (turn off when comparing models on
        the same datapoints: their difference is far more precise than either mean).
    :returns: the Figure; one line per result with ``len(bounds.num_samples)`` points each.
    """
    results = [bounds] if hasattr(bounds, "num_samples") else list(bounds)
    if not results or not all(hasattr(r, "num_samples") and hasattr(r, "means") for r in results):
        raise ConfigError("plot_iwae_bounds needs one IWAEBounds or a sequence of them (from iwae_bounds())")
    if labels is None:
        labels = [f"model {i + 1}" for i in range(len(results))] if len(results) > 1 else [""]
    labels = list(labels)
    if len(labels) != len(results):
        raise ConfigError(f"got {len(labels)} labels for {len(results)} results; pass one per result")
    fig = _figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for r, label in zip(results, labels):
        errs = [0.0 if math.isnan(float(e)) or not errorbars else float(e) for e in r.stderrs]
        ax.errorbar(list(r.num_samples), [float(m) for m in r.means], yerr=errs, marker="o",
                    capsize=3, label=label or None)
    if reference is not None:
        ax.axhline(float(reference), color="black", linestyle="--", linewidth=1, label=reference_label)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel(r"$L_K$, nats per datapoint")
    ax.set_title(title or r"IWAE bound $L_K$ against K ($L_1$ = ELBO)")
    ax.grid(alpha=0.3, which="both")
    if any(labels) or reference is not None:
        ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_kl_per_dimension(
    kl: Any,
    *,
    active: Any = None,
    sort: bool = False,
    path: str | Path | None = None,
    title: str = "",
) -> Any:
    r"""A bar per latent dimension: :math:`\frac1N \sum_n \mathrm{KL}(q(z_d \mid x_n) \| p(z_d))`.

    Collapsed dimensions (posterior equal to the prior for every ``x``) have bars near 0.

    :param kl: a :class:`~pyrovae.diagnostics.KLPerDimension` (from
        :func:`pyrovae.kl_per_dimension`) with ``per_dim`` set, or a tensor ``(latent_dim,)``.
    :param active: an optional :class:`~pyrovae.diagnostics.ActiveUnits` (or a boolean mask
        ``(latent_dim,)``): active dimensions are drawn in blue, inactive ones in grey.
    :param sort: order the bars by decreasing KL (the x tick labels keep the dimension numbers).
    :returns: the Figure; its axes hold one bar per latent dimension.
    """
    per_dim = getattr(kl, "per_dim", kl)
    if per_dim is None:
        raise ConfigError(
            "this KL has no per-dimension split (q or p does not factorize over the dimensions); "
            "plot kl.total instead"
        )
    values = _as_cpu_tensor(per_dim, "kl").flatten()
    if values.numel() == 0:
        raise DataError("kl has no dimensions")
    mask = getattr(active, "active", active)
    if mask is not None:
        mask = torch.as_tensor(mask).detach().cpu().bool().flatten()
        if mask.shape != values.shape:
            raise DataError(f"active has {mask.numel()} dimensions, the KL has {values.numel()}")
    order = torch.argsort(values, descending=True) if sort else torch.arange(values.numel())
    fig = _figure((max(4.0, min(12.0, 0.25 * values.numel() + 3)), 3.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue" if mask is None or bool(mask[d]) else "tab:gray" for d in order.tolist()]
    ax.bar(range(values.numel()), values[order].numpy(), color=colors)
    step = max(1, values.numel() // 25)
    ticks = list(range(0, values.numel(), step))
    ax.set_xticks(ticks, [str(int(order[t]) + 1) for t in ticks], fontsize=7)
    ax.set_xlabel("latent dimension" + (" (sorted by KL)" if sort else ""))
    ax.set_ylabel("KL, nats per datapoint")
    total = float(values.sum())
    extra = "" if mask is None else f", {int(mask.sum())} of {mask.numel()} active"
    ax.set_title(title or f"KL per latent dimension (total {total:.2f} nats{extra})")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path)


def plot_gaps(
    results: Any,
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
) -> Any:
    r"""Bar chart of :math:`\log p(x)`, :math:`\mathcal L[q^*]`, :math:`\mathcal L[q]` and the gaps.

    Left panel: the three bounds (nats per datapoint); right panel: the approximation and
    amortization gaps, one group of bars per quantity, one bar per model.

    Each bar's value is written beyond its error bar's cap (above a positive bar, below a negative
    one), so that label and error bar never overlap.

    Error bars are standard errors of the mean over datapoints, of what each panel compares.
    The three bounds are measured on the *same* datapoints, whose :math:`\log p(x)` differ by
    tens of nats, so the standard error of each bound alone (printed under the panel) is far
    larger than the gaps between them; the bars on :math:`\mathcal L[q^*]` and
    :math:`\mathcal L[q]` are therefore the paired standard errors of their differences from
    :math:`\log p(x)` (those of the gaps), and :math:`\log p(x)` carries none.

    :param results: one :class:`~pyrovae.gaps.GapResult` (from :func:`pyrovae.gaps`) or several (models side by side).
    :param path: if given, save the figure there (format from the suffix).
    :param labels: one name per result (default ``model 1, model 2, ...``).
    :returns: the :class:`matplotlib.figure.Figure` (Agg canvas; pyplot is not touched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .gaps import GapResult  # (here: the image grids of `pyrovae train` need no estimator)

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
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
            for xpos, mean, err in zip(xs, means, errs):
                # beyond the error bar's cap, never across it: above a bar that rises, below one
                # that falls
                up = mean >= 0
                ax.annotate(f"{mean:.2f}", xy=(xpos, mean + err if up else mean - err),
                            xytext=(0, 2 if up else -2), textcoords="offset points",
                            ha="center", va="bottom" if up else "top", fontsize=7)
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

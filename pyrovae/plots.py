"""Pictures of a trained VAE: samples, reconstructions, a 2-D latent manifold, interpolations,
training curves.

Image grids come from :func:`torchvision.utils.make_grid`; charts are drawn on a
:class:`matplotlib.figure.Figure` with the Agg canvas, so nothing here touches pyplot's global
state or needs a display. Every function returns what it drew (an image tensor or a Figure) and
writes a PNG when given ``path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

from ._checks import check_positive_int
from .errors import ConfigError, DataError

__all__ = [
    "image_grid",
    "sample_grid",
    "reconstruction_grid",
    "latent_manifold",
    "interpolation_grid",
    "plot_history",
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
    x: torch.Tensor, image_shape: Sequence[int], *, nrow: int = 8, path: str | Path | None = None
) -> torch.Tensor:
    """Tile flat images ``(n, D)`` into one grid image ``(C, H', W')``; save it if ``path``."""
    grid = make_grid(_as_images(x, image_shape), nrow=nrow, padding=2, pad_value=1.0)
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
) -> torch.Tensor:
    """A grid of the likelihood means at ``num_samples`` draws ``z ~ p(z)``."""
    check_positive_int(num_samples, "num_samples")
    return image_grid(vae.sample(num_samples), image_shape, nrow=nrow, path=path)


def reconstruction_grid(
    vae: Any,
    x: torch.Tensor,
    image_shape: Sequence[int],
    *,
    path: str | Path | None = None,
) -> torch.Tensor:
    """Inputs and their reconstructions in alternating rows (each row up to 8 images)."""
    x = x[:64]
    recon = vae.reconstruct(x).to(x.device)
    rows = []
    for start in range(0, len(x), 8):
        rows += [x[start : start + 8], recon[start : start + 8]]
    width = min(8, len(x))
    padded = [torch.cat([r, r.new_ones(width - len(r), r.shape[1])]) if len(r) < width else r for r in rows]
    return image_grid(torch.cat(padded), image_shape, nrow=width, path=path)


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


@torch.no_grad()
def interpolation_grid(
    vae: Any,
    x_start: torch.Tensor,
    x_end: torch.Tensor,
    image_shape: Sequence[int],
    *,
    steps: int = 10,
    path: str | Path | None = None,
) -> torch.Tensor:
    """Decode straight lines in latent space between the encodings of paired inputs.

    :param x_start, x_end: ``(n, D)`` inputs; row ``i`` interpolates from ``x_start[i]`` to
        ``x_end[i]`` through ``steps`` points (the encodings are one draw from ``q(z|x)``).
    """
    check_positive_int(steps, "steps")
    idx = torch.arange(len(x_start), device=x_start.device)
    z0 = vae.family(x_start, idx).sample()
    z1 = vae.family(x_end, idx).sample()
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)[None, :, None]
    z = (1 - t) * z0[:, None] + t * z1[:, None]
    x = vae.likelihood(z.reshape(-1, z.shape[-1])).mean
    return image_grid(x, image_shape, nrow=steps, path=path)


def plot_history(history: Any, *, path: str | Path | None = None, title: str = "") -> Any:
    """The training curve: train objective and validation ELBO (nats per datapoint) per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
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

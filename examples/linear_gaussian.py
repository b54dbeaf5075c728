"""Probabilistic PCA as a VAE: the ELBO, the IWAE bound and the exact log p(x) side by side.

The linear-Gaussian latent variable model (probabilistic PCA; Tipping & Bishop 1999)

    z ~ N(0, I_L),   x | z ~ N(W z + b, s^2 I_D)

is the one deep latent variable model whose every quantity has a closed form:

    log p(x)  = log N(x; b, W W^T + s^2 I)                      (the exact marginal)
    p(z | x)  = N(M^{-1} W^T (x - b), s^2 M^{-1}),   M = W^T W + s^2 I
    Lambda    = M / s^2                                            (the posterior precision)

A diagonal Gaussian q(z|x) cannot match a correlated posterior. The best one has the posterior
mean and precisions diag(Lambda), and falls short of log p(x) by the same amount for every x:

    log p(x) - ELBO[best diagonal q] = 1/2 (sum_i log Lambda_ii - log det Lambda)   nats.

A full-rank Gaussian family contains the posterior itself, so its gap is zero.

This example fixes the decoder at a known (W, b, s) whose columns are far from orthogonal (so the
posterior is strongly correlated), trains two linear encoders by SVI -- a diagonal and a
full-rank Gaussian family -- and prints, for held-out points, the ELBO, the importance-sampled
IWAE bound L_K for growing K, and the exact log p(x); then the diagonal family's gap beside its
closed form, and the full-rank family's gap (zero). Pictures (``--out``): the posterior of one
datapoint with both fitted q's, and L_K against K.

Run: ``python examples/linear_gaussian.py --out pictures/`` (about 20 seconds); ``--smoke`` runs
a few seconds.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer import TraceMeanField_ELBO
from torch import nn

import pyrovae
from pyrovae import VAE, DiagonalNormal, FullRankNormal, Gaussian, StandardNormal
from pyrovae.errors import ImportanceSamplingWarning
from pyrovae.plots import plot_iwae_bounds


# --------------------------------------------------------------------------- the closed forms
class FixedLinear(nn.Module):
    """The decoder ``z -> W z + b`` with ``W`` ``(D, L)`` and ``b`` ``(D,)`` held as buffers (not
    trained): only the encoder learns."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.out_features = W.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + self.b


def make_model(latent_dim: int, num_features: int, scale: float, correlation: float, seed: int):
    """A decoder ``(W, b, s)`` whose columns have cosine similarity about ``correlation``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_features, latent_dim, generator=g, dtype=torch.float64)
    shared = torch.randn(num_features, 1, generator=g, dtype=torch.float64)
    W = math.sqrt(1 - correlation) * base + math.sqrt(correlation) * shared
    b = torch.randn(num_features, generator=g, dtype=torch.float64)
    return W, b, float(scale)


def exact_log_px(W: torch.Tensor, b: torch.Tensor, s: float, x: torch.Tensor) -> torch.Tensor:
    """log N(x; b, W W^T + s^2 I) for each row of ``x`` ``(n, D)``; shape ``(n,)``."""
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=W.dtype)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def exact_posterior(W: torch.Tensor, b: torch.Tensor, s: float, x: torch.Tensor):
    """Mean ``(n, L)`` and covariance ``(L, L)`` of p(z | x) = N(M^-1 W^T (x - b), s^2 M^-1)."""
    M = W.T @ W + s**2 * torch.eye(W.shape[1], dtype=W.dtype)
    mean = torch.linalg.solve(M, W.T @ (x - b).T).T
    return mean, s**2 * torch.linalg.inv(M)


def diagonal_gap(W: torch.Tensor, s: float) -> float:
    """The best diagonal Gaussian's gap, 1/2 (sum_i log Lambda_ii - log det Lambda), in nats."""
    lam = (W.T @ W + s**2 * torch.eye(W.shape[1], dtype=W.dtype)) / s**2
    return 0.5 * float(torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam))


# --------------------------------------------------------------------------- the example
def build(family: str, W: torch.Tensor, b: torch.Tensor, s: float, num_data: int) -> VAE:
    """A VAE with the fixed linear decoder and a linear encoder (identity features, linear heads)."""
    L, D = W.shape[1], W.shape[0]
    make = {"diagonal": DiagonalNormal, "full_rank": FullRankNormal}[family]
    q = make(nn.Identity(), L, feature_dim=D)
    return VAE(StandardNormal(L), q, Gaussian(FixedLinear(W, b), s), num_data).double()


def plot_posterior(W, b, s, x0, vaes, path) -> None:
    """Density contours of p(z | x0) beside the 2-sigma ellipses of each fitted q(z | x0)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean, cov = exact_posterior(W, b, s, x0[None])
    mean = mean[0]
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sd = cov.diagonal().sqrt()
    r = 3.2 * float(sd.max())
    u = torch.linspace(-r, r, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(u + mean[0], u + mean[1], indexing="xy")
    grid = torch.stack([gx, gy], -1)
    dens = dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(grid).exp()
    ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=12, cmap="Greys")
    t = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    circle = torch.stack([t.cos(), t.sin()], -1) * 2.0
    for (name, vae), color in zip(vaes.items(), ("tab:red", "tab:blue")):
        with torch.no_grad():
            q = vae.family(x0[None])
        cov_q = q.covariance_matrix[0] if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)[0]
        ell = circle @ torch.linalg.cholesky(cov_q).T + q.mean[0]
        ax.plot(ell[:, 0], ell[:, 1], color=color, linewidth=2, label=f"q(z|x), {name} (2 sd)")
    ell = circle @ torch.linalg.cholesky(cov).T + mean
    ax.plot(ell[:, 0], ell[:, 1], "k--", linewidth=1, label="exact p(z|x) (2 sd)")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_aspect("equal")
    ax.set_title("posterior of one datapoint and the fitted q's")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train both families, print the bounds table and the gaps; return the key numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--num-features", type=int, default=6)
    parser.add_argument("--scale", type=float, default=0.5, help="the decoder's noise s")
    parser.add_argument("--correlation", type=float, default=0.9,
                        help="how alike W's columns are, in [0, 1): makes the posterior correlated")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1, 10, 100, 1000, 5000],
                        help="the K values of the IWAE bounds")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: fewer epochs and K")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.num_test = 100, 400, 100
        args.num_samples = [1, 10, 100, 1000]
    if not 0 <= args.correlation < 1:
        parser.error(f"--correlation must be in [0, 1), got {args.correlation}")
    if args.latent_dim < 2 and args.out is not None:
        parser.error("the posterior picture needs --latent-dim >= 2")

    W, b, s = make_model(args.latent_dim, args.num_features, args.scale, args.correlation, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.num_train + args.num_test
    x = torch.randn(n, args.latent_dim, generator=g, dtype=torch.float64) @ W.T + b
    x = x + s * torch.randn(n, args.num_features, generator=g, dtype=torch.float64)
    train, test = x[: args.num_train], x[args.num_train :]
    log_px = exact_log_px(W, b, s, test)
    closed_gap = diagonal_gap(W, s)

    results: dict[str, Any] = {"exact_log_px": float(log_px.mean()), "closed_form_gap": closed_gap,
                               "W": W, "b": b, "scale": s}
    vaes, bounds = {}, {}
    for family in ("diagonal", "full_rank"):
        torch.manual_seed(args.seed)  # the initial encoder
        vae = build(family, W, b, s, len(train))
        # Adam at a constant rate leaves the encoder jittering around the optimum; a second,
        # shorter run at a tenth of the rate settles it (each fit call starts a fresh Adam).
        for epochs, lr in ((args.epochs, 2e-2), (max(1, args.epochs // 2), 2e-3)):
            pyrovae.fit(vae, train, loss=TraceMeanField_ELBO(), num_epochs=epochs, batch_size=50,
                        lr=lr, seed=args.seed, progress=False)
        el = pyrovae.elbo(vae, test, num_samples=2000, seed=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportanceSamplingWarning)
            bounds[family] = pyrovae.iwae_bounds(vae, test, args.num_samples, seed=args.seed)
        vaes[family] = vae
        results[family] = {"elbo": el.mean, "gap": float((log_px - el.values).mean()),
                           "iwae": dict(zip(bounds[family].num_samples,
                                            [float(m) for m in bounds[family].means]))}

    print(f"probabilistic PCA, L={args.latent_dim}, D={args.num_features}, s={s}; "
          f"{args.num_test} held-out points (nats per datapoint)")
    print(f"{'K':>6} {'L_K diagonal':>14} {'L_K full-rank':>14} {'exact log p(x)':>15}")
    for k in bounds["diagonal"].num_samples:
        print(f"{k:>6} {results['diagonal']['iwae'][k]:>14.3f} {results['full_rank']['iwae'][k]:>14.3f} "
              f"{results['exact_log_px']:>15.3f}")
    d, f = results["diagonal"], results["full_rank"]
    print(f"ELBO gap, diagonal family:  {d['gap']:.3f} nats "
          f"(closed form for the best diagonal q: {closed_gap:.3f})")
    print(f"ELBO gap, full-rank family: {f['gap']:.3f} nats (closed form: 0)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_iwae_bounds([bounds["diagonal"], bounds["full_rank"]],
                         labels=["diagonal q", "full-rank q"], reference=results["exact_log_px"],
                         title="probabilistic PCA: IWAE bound against K", errorbars=False,
                         path=args.out / "linear_gaussian_bounds.png")
        plot_posterior(W, b, s, test[0], {"diagonal": vaes["diagonal"], "full rank": vaes["full_rank"]},
                       args.out / "linear_gaussian_posterior.png")
        print(f"pictures in {args.out}")
    return results


if __name__ == "__main__":
    main()

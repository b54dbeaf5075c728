"""A 1-D mixture of Gaussians, two ways: a discrete latent variable and a continuous one (a VAE).

The mixture of Gaussians is the simplest latent variable model. With a discrete z,

    z ~ Categorical(lambda),   x | z = n ~ N(mu_n, sigma_n^2),
    p(x) = sum_n lambda_n N(x; mu_n, sigma_n^2)                  (exact: a finite sum)
    p(z = n | x) = lambda_n N(x; mu_n, sigma_n^2) / p(x)         (exact: the responsibilities)

so the posterior is exact and the ELBO with q(z|x) = p(z|x) equals log p(x): expectation-
maximization fits it. A VAE replaces the discrete z by z ~ N(0, 1) and the table (mu_n, sigma_n)
by networks, x | z ~ N(f(z), g(z)^2); its density p(x) = int p(x|z) p(z) dz has no closed form,
but in one dimension a quadrature over z computes it to any accuracy, which checks pyrovae's
importance-sampling estimate.

The example samples data from a known 3-component mixture, fits the mixture by EM and a VAE
(1-D latent, Gaussian likelihood with a predicted scale) by SVI on the same samples, and prints
the average test log-likelihood of the true mixture, the EM fit, and the VAE (quadrature,
importance sampling, ELBO). The picture (``--out``) draws the densities over the data's
histogram: the VAE's continuous z must sweep between the modes, and leaves thin bridges there.

Run: ``python examples/mixture_1d.py --out pictures/`` (about 30 seconds); ``--smoke`` runs a
few seconds.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import torch

import pyrovae
from pyrovae import MLP, VAE, DiagonalNormal, Gaussian, StandardNormal
from pyrovae.errors import ImportanceSamplingWarning
from pyrovae.plots import plot_khat

#: The data's mixture: weights, means, standard deviations.
TRUE_WEIGHTS = (0.3, 0.5, 0.2)
TRUE_MEANS = (-3.0, 0.0, 2.5)
TRUE_SCALES = (0.5, 0.8, 0.4)


def mixture_log_prob(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    r"""``log sum_n lambda_n N(x; mu_n, sigma_n^2)`` for each entry of ``x`` ``(n,)``: ``(n,)``."""
    comp = torch.distributions.Normal(means, scales).log_prob(x[:, None]) + weights.log()
    return torch.logsumexp(comp, dim=1)


def sample_mixture(n: int, weights, means, scales, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws ``(n,)``: ``z ~ Categorical(weights)``, then ``x ~ N(means[z], scales[z]^2)``."""
    w, m, s = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, scales))
    z = torch.multinomial(w, n, replacement=True, generator=generator)
    return m[z] + s[z] * torch.randn(n, generator=generator, dtype=torch.float64)


def fit_em(x: torch.Tensor, num_components: int, num_iterations: int = 200):
    """Expectation-maximization for a 1-D mixture, started at quantiles of ``x``.

    E-step: the exact posterior p(z = n | x_i) (the responsibilities); M-step: the weighted
    maximum-likelihood weights, means and variances. Each step never lowers log p(x).

    :returns: ``(weights, means, scales)``, each ``(num_components,)``.
    """
    q = torch.linspace(0.1, 0.9, num_components, dtype=x.dtype)
    means = torch.quantile(x, q)
    scales = torch.full((num_components,), float(x.std()) / num_components, dtype=x.dtype)
    weights = torch.full((num_components,), 1.0 / num_components, dtype=x.dtype)
    for _ in range(num_iterations):
        log_r = torch.distributions.Normal(means, scales).log_prob(x[:, None]) + weights.log()
        r = torch.softmax(log_r, dim=1)  # (n, components): the exact posterior p(z | x)
        nk = r.sum(0)
        weights = nk / len(x)
        means = (r * x[:, None]).sum(0) / nk
        scales = ((r * (x[:, None] - means) ** 2).sum(0) / nk).sqrt().clamp_min(1e-3)
    return weights, means, scales


@torch.no_grad()
def vae_log_density(vae: VAE, x: torch.Tensor, num_points: int = 4001, limit: float = 7.0) -> torch.Tensor:
    r"""The VAE's :math:`\log p(x) = \log \int p(x \mid z)\, p(z)\, dz` by the midpoint rule on
    ``num_points`` cells of ``[-limit, limit]`` (1-D latent only): ``x`` ``(n, 1)`` -> ``(n,)``."""
    width = 2 * limit / num_points
    z = (-limit + width * (torch.arange(num_points, dtype=x.dtype) + 0.5))[:, None]
    px = vae.likelihood(z)  # batch (num_points,)
    log_joint = px.log_prob(x[:, None, :]) + vae.prior().log_prob(z)  # (n, num_points)
    return torch.logsumexp(log_joint, dim=1) + math.log(width)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit EM and a VAE to samples of a known mixture; print and return the log-likelihoods."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1000, help="K for the IS estimate")
    parser.add_argument("--out", type=Path, default=None, help="folder for the picture")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_train, args.num_test, args.epochs, args.num_samples = 1000, 500, 30, 200
    if args.num_train < 10 or args.num_test < 2:
        parser.error("need --num-train >= 10 and --num-test >= 2")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    true = tuple(torch.tensor(v, dtype=torch.float64) for v in (TRUE_WEIGHTS, TRUE_MEANS, TRUE_SCALES))
    x = sample_mixture(args.num_train + args.num_test, *true, generator=g)
    train, test = x[: args.num_train], x[args.num_train :]

    em = fit_em(train, len(TRUE_WEIGHTS))
    ll_true = float(mixture_log_prob(test, *true).mean())
    ll_em = float(mixture_log_prob(test, *em).mean())

    H = args.hidden
    vae = VAE(
        StandardNormal(1),
        DiagonalNormal(MLP(1, (H,), H, "tanh", activate_output=True), 1),
        Gaussian(MLP(1, (H, H), 2, "tanh"), "predicted"),  # mean and raw scale of x | z
        num_data=len(train),
    ).double()
    pyrovae.fit(vae, train[:, None], num_epochs=args.epochs, batch_size=100, lr=3e-3,
                seed=args.seed, progress=False)
    vae.eval()
    ll_quad = vae_log_density(vae, test[:, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # its k-hat share is printed
        ll_is = pyrovae.log_likelihood(vae, test[:, None], num_samples=args.num_samples, seed=args.seed)
    el = pyrovae.elbo(vae, test[:, None], num_samples=100, seed=args.seed)
    results = {
        "true_mixture": ll_true, "em_mixture": ll_em,
        "em_weights": em[0].tolist(), "em_means": em[1].tolist(), "em_scales": em[2].tolist(),
        "vae_quadrature": float(ll_quad.mean()), "vae_importance_sampling": ll_is.mean,
        "vae_is_stderr": ll_is.stderr, "vae_elbo": el.mean,
        "vae_quadrature_minus_is": float((ll_quad - ll_is.values).mean()),
    }
    print(f"average test log-likelihood of {len(test)} points (nats per point):")
    print(f"  true mixture (exact sum over z)        {ll_true:8.4f}")
    print(f"  EM fit, 3 components (exact sum over z) {ll_em:8.4f}")
    print(f"  VAE, 1-D continuous z, by quadrature    {results['vae_quadrature']:8.4f}")
    print(f"  VAE by importance sampling (K={args.num_samples})  {ll_is.mean:8.4f} "
          f"(k-hat > 0.7 for {100 * ll_is.unreliable_share:.1f}% of the points)")
    print(f"  VAE ELBO                                {el.mean:8.4f}")
    print("EM's components: " + ", ".join(
        f"{w:.2f} x N({m:+.2f}, {s:.2f}^2)" for w, m, s in zip(*(t.tolist() for t in em))))

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        grid = torch.linspace(float(x.min()) - 1, float(x.max()) + 1, 600, dtype=torch.float64)
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.hist(train.numpy(), bins=80, density=True, color="0.85", label=f"{len(train)} samples")
        ax.plot(grid.numpy(), mixture_log_prob(grid, *true).exp().numpy(), "k--", linewidth=1,
                label="true mixture")
        ax.plot(grid.numpy(), mixture_log_prob(grid, *em).exp().numpy(), color="tab:blue",
                label=f"mixture, discrete z, EM ({ll_em:.3f})")
        ax.plot(grid.numpy(), vae_log_density(vae, grid[:, None]).exp().numpy(), color="tab:red",
                label=f"VAE, continuous z ({results['vae_quadrature']:.3f})")
        ax.set_xlabel("x")
        ax.set_ylabel("density")
        ax.set_title("1-D mixture of Gaussians: test log-likelihood per point in brackets",
                     fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(str(args.out / "mixture_1d.png"))
        plot_khat(ll_is, title=f"VAE on the 1-D mixture: PSIS k-hat per test point (K={args.num_samples})",
                  path=args.out / "mixture_1d_khat.png")
        print(f"picture in {args.out}")
    return results


if __name__ == "__main__":
    main()

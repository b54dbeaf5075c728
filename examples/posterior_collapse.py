"""The VAE's problems, measured: posterior collapse, the aggregate posterior's holes, blurry means.

Three experiments on MNIST (the bundled sample by default):

1. **Balancing reconstruction and KL; posterior collapse.** The same VAE is trained with the KL
   term weighted by beta (beta-VAE, Higgins et al. 2017: E_q[log p(x|z)] - beta KL(q(z|x) || p(z)))
   and with a linear KL warm-up (Sønderby et al. 2016). For each it prints the test ELBO and
   log p(x), the active units (Burda et al. 2016: Var_x E_q[z_d | x] > 0.01), the KL per latent
   dimension, and the split of the average KL into the mutual information I(x; z) and the
   aggregate-posterior mismatch KL(q(z) || p(z)) (Hoffman & Johnson 2016). A larger beta buys a
   smaller KL, spent on fewer dimensions (the KL-per-dimension picture); a dimension whose KL
   goes to zero has collapsed onto the prior and carries no information about x. (With 20
   epochs few dimensions fall below Burda et al.'s activity threshold yet; longer training or
   more latent dimensions show collapse in the active-unit count too.)

2. **The aggregate posterior q(z) = 1/N sum_n q(z | x_n) does not fill the prior.** With a 2-D
   latent space q(z) is computed on a grid; the example prints the share of prior draws that land
   where q(z) < p(z) / 10 (a "hole"), checks the grid's KL(q(z) || p(z)) against pyrovae's
   Monte Carlo estimate, and decodes points from holes beside points from dense regions: the
   holes decode to blends that are not digits.

3. **Blurry samples.** A Gaussian decoder's mean averages over everything the posterior leaves
   open; the example compares the sharpness (mean squared difference of neighbouring pixels) of
   real digits with that of the decoder means of reconstructions and of prior samples.

Run: ``python examples/posterior_collapse.py --out pictures/`` (a few minutes on 2 cores);
``--smoke`` runs a few seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

import pyrovae
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, Gaussian, StandardNormal
from pyrovae.data import load_dataset
from pyrovae.errors import ImportanceSamplingWarning, PyrovaeError
from pyrovae.plots import image_grid, plot_kl_per_dimension


def make_vae(num_features: int, latent_dim: int, hidden: int, num_data: int,
             gaussian_scale: float | None = None) -> VAE:
    """An MLP VAE: encoder ``D-H-H``, diagonal Gaussian q, decoder ``L-H-D``; Bernoulli pixels,
    or Gaussian ones with a fixed scale ``gaussian_scale``."""
    family = DiagonalNormal(MLP(num_features, (hidden,), hidden, activate_output=True), latent_dim)
    decoder = MLP(latent_dim, (hidden,), num_features)
    lik = Bernoulli(decoder) if gaussian_scale is None else Gaussian(decoder, gaussian_scale)
    return VAE(StandardNormal(latent_dim), family, lik, num_data)


# ------------------------------------------------------------------ 2-D aggregate posterior
def latent_grid(limit: float, steps: int) -> tuple[torch.Tensor, float]:
    """Cell centres of a ``steps x steps`` grid on ``[-limit, limit]^2``, shape ``(steps^2, 2)``
    (row-major, z2 varying fastest), and the cell area."""
    width = 2 * limit / steps
    u = -limit + width * (torch.arange(steps) + 0.5)
    z1, z2 = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], -1), width**2


@torch.no_grad()
def log_aggregate_posterior(vae: VAE, x: torch.Tensor, z: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    r"""``log q(z) = logsumexp_n log q(z | x_n) - log N`` at each row of ``z`` ``(G, L)``: ``(G,)``."""
    q = vae.family(x)  # batch (N,)
    out = [torch.logsumexp(q.log_prob(z[i : i + chunk, None, :]), dim=1) for i in range(0, len(z), chunk)]
    return torch.cat(out) - math.log(len(x))


def spread_points(z: torch.Tensor, score: torch.Tensor, k: int, min_distance: float) -> torch.Tensor:
    """Greedily pick up to ``k`` rows of ``z`` with the highest ``score``, each at least
    ``min_distance`` from those already picked; returns their indices."""
    chosen: list[int] = []
    for i in torch.argsort(score, descending=True).tolist():
        if all(float((z[i] - z[j]).norm()) >= min_distance for j in chosen):
            chosen.append(i)
            if len(chosen) == k:
                break
    return torch.tensor(chosen, dtype=torch.long)


# ------------------------------------------------------------------ blur
def sharpness(images: torch.Tensor, image_shape: tuple[int, ...]) -> float:
    """Mean squared difference of horizontally and vertically neighbouring pixels (a blurred
    image has less): ``images`` ``(n, D)`` with ``D = prod(image_shape)``."""
    im = images.reshape(-1, *image_shape[-2:])
    dx = (im[:, :, 1:] - im[:, :, :-1]).pow(2).mean()
    dy = (im[:, 1:, :] - im[:, :-1, :]).pow(2).mean()
    return float((dx + dy) / 2)


def _save_aggregate_picture(z, log_ratio, holes, dense, decoded_dense, decoded_holes, shape, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = int(round(math.sqrt(len(z))))
    fig = Figure(figsize=(9, 4.2), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    lim = min(float(z.abs().max()), 4.0)
    # only where the prior has mass (|z| < 3): elsewhere both densities are negligible
    shown = log_ratio.clamp(-6, 6).masked_fill(z.norm(dim=1) > 3.0, float("nan"))
    img = shown.reshape(steps, steps).T.numpy()
    full = float(z.abs().max())
    mesh = ax.imshow(img, origin="lower", extent=(-full, full, -full, full), cmap="RdBu",
                     vmin=-6, vmax=6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    fig.colorbar(mesh, ax=ax, label="log q(z) - log p(z)  (|z| < 3)")
    t = torch.linspace(0, 2 * math.pi, 100)
    for r in (1, 2):
        ax.plot((r * t.cos()).numpy(), (r * t.sin()).numpy(), "k:", linewidth=0.8)
    ax.scatter(z[dense, 0].numpy(), z[dense, 1].numpy(), marker="o", facecolors="none",
               edgecolors="black", s=50, label="dense")
    ax.scatter(z[holes, 0].numpy(), z[holes, 1].numpy(), marker="x", color="black", s=50, label="hole")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("aggregate posterior against the prior\n(dotted: prior's 1 and 2 sd)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax2 = fig.add_subplot(1, 2, 2)
    n = len(decoded_dense)
    grid = image_grid(torch.cat([decoded_dense, decoded_holes]), shape, nrow=n)
    ax2.imshow(grid.permute(1, 2, 0).numpy())
    ax2.set_xticks([])
    ax2.set_yticks([0.5 * grid.shape[1] / 2, 1.5 * grid.shape[1] / 2], ["dense", "holes"])
    ax2.set_title("decoder means at the marked points", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three experiments; return their key numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--num-train", type=int, default=None, help="use the first N digits")
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--num-samples", type=int, default=200, help="K for log p(x)")
    parser.add_argument("--grid-steps", type=int, default=120, help="grid of the 2-D q(z)")
    parser.add_argument("--gaussian-scale", type=float, default=0.1,
                        help="the fixed pixel noise of the Gaussian decoder (experiment 3)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: little data, 2 epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.num_test, args.hidden = 2, 1000, 200, 128
        args.num_samples, args.grid_steps, args.latent_dim = 30, 50, 8
        args.betas = [1.0, 4.0]
    if any(b <= 0 for b in args.betas):
        parser.error("--betas must be positive")
    if args.gaussian_scale <= 0:
        parser.error("--gaussian-scale must be positive")
    try:
        train = load_dataset(args.dataset, "train", root=args.data_root, binarize="dynamic")
        test = load_dataset(args.dataset, "test", root=args.data_root, binarize="dynamic")
        grey_train = load_dataset(args.dataset, "train", root=args.data_root, binarize="none")
    except PyrovaeError as e:
        sys.exit(f"posterior_collapse: {e}")
    if args.num_train:
        train = train.subset(min(args.num_train, len(train)))
        grey_train = grey_train.subset(min(args.num_train, len(grey_train)))
    test = test.subset(min(args.num_test, len(test)))
    test_x = test.binarized(generator=torch.Generator().manual_seed(args.seed)).images
    D, shape = train.num_features, train.image_shape
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    fit_args = dict(loss=TraceMeanField_ELBO(), num_epochs=args.epochs, batch_size=100,
                    seed=args.seed, progress=False)
    results: dict[str, Any] = {"runs": {}}

    # 1. beta and warm-up against collapse ------------------------------------------------
    runs = [(f"beta={b:g}", b, 0.0) for b in args.betas]
    runs.append(("beta=1, warm-up", 1.0, args.epochs / 2))
    print(f"1. KL weight and collapse: latent_dim={args.latent_dim}, {args.epochs} epochs on "
          f"{len(train)} digits; {len(test_x)} test digits (nats per digit)")
    print(f"{'run':>16} {'ELBO':>8} {'log p(x)':>9} {'KL':>7} {'I(x;z)':>7} {'KL(q(z)|p)':>10} "
          f"{'active':>7} {'KL_d>0.1':>8}")
    for name, beta, warmup in runs:
        pyro.set_rng_seed(args.seed)  # the same initial network for every run
        vae = make_vae(D, args.latent_dim, args.hidden, len(train))
        pyrovae.fit(vae, train, beta=beta, kl_warmup_epochs=warmup, **fit_args)
        el = pyrovae.elbo(vae, test_x, num_samples=10, seed=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportanceSamplingWarning)
            ll = pyrovae.log_likelihood(vae, test_x, num_samples=args.num_samples, seed=args.seed)
        d = pyrovae.diagnose(vae, test_x, seed=args.seed)
        mi = d.mutual_information
        r = {"beta": beta, "warmup_epochs": warmup, "elbo": el.mean, "log_px": ll.mean,
             "kl": d.kl.total, "kl_per_dim": [float(v) for v in d.kl.per_dim],
             "active_units": d.active_units.count,
             "informative_dims": int((d.kl.per_dim > 0.1).sum()),
             "mutual_information": mi.mutual_information,
             "marginal_kl": mi.marginal_kl, "average_kl": mi.average_kl}
        results["runs"][name] = r
        print(f"{name:>16} {el.mean:8.2f} {ll.mean:9.2f} {d.kl.total:7.2f} "
              f"{mi.mutual_information:7.2f} {mi.marginal_kl:10.2f} "
              f"{d.active_units.count:>3}/{args.latent_dim} {r['informative_dims']:>4}/{args.latent_dim}")
        if args.out is not None:
            tag = name.replace("=", "").replace(", ", "_").replace("-", "")
            plot_kl_per_dimension(d.kl, active=d.active_units, sort=True,
                                  title=f"{name}: KL per dimension ({d.active_units.count} of "
                                        f"{args.latent_dim} active)",
                                  path=args.out / f"kl_per_dim_{tag}.png")
    print(f"   active: Var_x E_q[z_d] > 0.01 (Burda et al.); KL_d>0.1: dimensions whose KL exceeds "
          f"0.1 nats; I(x;z) is at most log N = {math.log(len(test_x)):.2f} nats on these "
          f"{len(test_x)} digits")

    # 2. holes in the aggregate posterior (2-D latent space) -------------------------------
    pyro.set_rng_seed(args.seed)
    vae2 = make_vae(D, 2, args.hidden, len(train))
    pyrovae.fit(vae2, train, **fit_args)
    vae2.eval()
    with torch.no_grad():
        q_test = vae2.family(test_x)
        reach = float((q_test.mean.abs() + 5 * q_test.stddev).max())
    limit = max(4.0, reach)  # the grid holds all of q(z)'s mass and the prior's
    z, area = latent_grid(limit, args.grid_steps)
    log_q = log_aggregate_posterior(vae2, test_x, z)
    log_p = StandardNormal(2)().log_prob(z)
    grid_mass = float((log_q.exp() * area).sum())
    grid_kl = float((log_q.exp() * (log_q - log_p) * area).sum())
    mi2 = pyrovae.mutual_information(vae2, test_x, num_samples=20, seed=args.seed)
    draws = torch.randn(20000, 2, generator=torch.Generator().manual_seed(args.seed))
    in_hole = log_aggregate_posterior(vae2, test_x, draws) < StandardNormal(2)().log_prob(draws) - math.log(10)
    hole_share = float(in_hole.double().mean())
    inside = z.norm(dim=1) < 1.75  # where the prior puts most of its mass
    ratio = (log_q - log_p).masked_fill(~inside, float("nan"))
    holes = spread_points(z, (-ratio).nan_to_num(float("-inf")), 6, 0.6)
    dense = spread_points(z, ratio.nan_to_num(float("-inf")), 6, 0.6)
    with torch.no_grad():
        decoded_holes = vae2.likelihood(z[holes]).mean
        decoded_dense = vae2.likelihood(z[dense]).mean
    results["aggregate"] = {"grid_mass": grid_mass, "grid_marginal_kl": grid_kl,
                            "marginal_kl": mi2.marginal_kl, "hole_share": hole_share,
                            "hole_log_ratio": [float(v) for v in ratio[holes]],
                            "dense_log_ratio": [float(v) for v in ratio[dense]]}
    print(f"2. aggregate posterior of a 2-D VAE on {len(test_x)} test digits: KL(q(z) || p(z)) = "
          f"{grid_kl:.3f} nats on a grid ({grid_mass:.3f} of q's mass inside [-{limit:.1f}, {limit:.1f}]^2), "
          f"{mi2.marginal_kl:.3f} ± {mi2.marginal_kl_stderr:.3f} by pyrovae.mutual_information")
    print(f"   {100 * hole_share:.1f}% of prior draws land where q(z) < p(z)/10; the marked holes have "
          f"log q(z)/p(z) from {min(results['aggregate']['hole_log_ratio']):.1f} to "
          f"{max(results['aggregate']['hole_log_ratio']):.1f}")
    if args.out is not None:
        _save_aggregate_picture(z, log_q - log_p, holes, dense, decoded_dense, decoded_holes, shape,
                                args.out / "aggregate_posterior.png")

    # 3. blur of a Gaussian decoder's means --------------------------------------------
    pyro.set_rng_seed(args.seed)
    vae3 = make_vae(D, args.latent_dim, args.hidden, len(grey_train), gaussian_scale=args.gaussian_scale)
    pyrovae.fit(vae3, grey_train, **fit_args)
    vae3.eval()
    real = test.images[:64]
    with torch.no_grad():
        recon = vae3.reconstruct(real)
        zs = vae3.prior().sample((64,))
        px = vae3.likelihood(zs)
        sample_means = px.mean
        sample_draws = px.sample().clamp(0, 1)
    s_real, s_recon, s_sample = (sharpness(t, shape) for t in (real, recon, sample_means))
    results["blur"] = {"real": s_real, "reconstruction_means": s_recon, "sample_means": s_sample}
    print(f"3. Gaussian decoder (fixed scale {args.gaussian_scale:g}): sharpness "
          f"(mean squared neighbour difference) real {s_real:.4f}, reconstruction means "
          f"{s_recon:.4f} ({s_recon / s_real:.2f}x), prior-sample means {s_sample:.4f} "
          f"({s_sample / s_real:.2f}x)")
    if args.out is not None:
        n = 10
        image_grid(torch.cat([real[:n], recon[:n], sample_means[:n], sample_draws[:n]]), shape,
                   nrow=n, path=args.out / "gaussian_blur.png")
        print(f"pictures in {args.out} (gaussian_blur.png rows: real, reconstruction means, "
              "prior-sample means, prior samples with the decoder's noise)")
    return results


if __name__ == "__main__":
    main()

"""Kingma & Welling's Frey-face experiment: a 2-D latent space of one face's expressions and poses.

Auto-Encoding Variational Bayes (Kingma & Welling 2014) trains on 1965 grey 28 x 20 frames of
Brendan Frey's face with a Gaussian likelihood whose mean is squashed into the pixel range,

    x | z ~ N(sigmoid(f(z)), diag sigma(z)^2),   z ~ N(0, I_2),

and shows the learned 2-D manifold (their fig. 4a): the decoder's mean on a grid evenly spaced in
probability, z = Phi^{-1}(u). One axis turns the head, the other changes the expression.

pyrovae's ``Gaussian`` likelihood takes whatever its decoder outputs as the mean, so the bounded
mean is the decoder's job here: :class:`BoundedMeanDecoder` squashes the first half of an MLP's
output (the mean) through a sigmoid and leaves the second half (the raw scale) alone.

Data: the original ``frey_rawface.mat`` under ``--data-root`` (or ``$PYROVAE_DATA``), in
``frey-faces/``; see :func:`pyrovae.data.load_frey_faces`.

Run: ``python examples/frey_faces.py --data-root /data --out pictures/`` (200 epochs, about a
minute); ``--smoke`` runs a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pyrovae
from pyrovae import MLP, VAE, DiagonalNormal, Gaussian, StandardNormal
from pyrovae.data import load_dataset
from pyrovae.errors import ImportanceSamplingWarning, PyrovaeError
from pyrovae.plots import latent_manifold, reconstruction_grid


class BoundedMeanDecoder(nn.Module):
    """``z -> (sigmoid(mean), raw scale)``: a network's output whose first half, the Gaussian's
    mean, is squashed into the pixel range (0, 1); the second half is passed on unchanged.

    :param net: maps ``(..., latent_dim) -> (..., 2 * num_features)``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        loc, raw_scale = self.net(z).chunk(2, dim=-1)
        return torch.cat([torch.sigmoid(loc), raw_scale], dim=-1)


def build(num_features: int, hidden: int, latent_dim: int, num_data: int, min_scale: float) -> VAE:
    """Kingma & Welling's Frey-face model: one tanh hidden layer each way, predicted pixel scales."""
    encoder = MLP(num_features, (), hidden, "tanh", activate_output=True)
    decoder = BoundedMeanDecoder(MLP(latent_dim, (hidden,), 2 * num_features, "tanh"))
    return VAE(StandardNormal(latent_dim), DiagonalNormal(encoder, latent_dim),
               Gaussian(decoder, "predicted", min_scale=min_scale), num_data)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train on Frey faces, draw the face manifold; return the ELBOs and log p(x)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="default: $PYROVAE_DATA")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--min-scale", type=float, default=0.05,
                        help="floor on the pixel standard deviation: a smaller one fits the "
                             "training frames closer and generalizes worse (0.02: test ELBO 428, "
                             "0.05: 496, 0.1: 477 nats after 200 epochs)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-samples", type=int, default=500, help="K for log p(x)")
    parser.add_argument("--steps", type=int, default=12, help="grid size of the manifold")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 5 epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_samples = 5, 50
    if args.min_scale <= 0:
        parser.error("--min-scale must be positive")
    try:
        train = load_dataset("frey-faces", "train", root=args.data_root)
        test = load_dataset("frey-faces", "test", root=args.data_root)
    except PyrovaeError as e:
        sys.exit(f"frey_faces: {e} (this example: --data-root PATH)")

    torch.manual_seed(args.seed)
    vae = build(train.num_features, args.hidden, args.latent_dim, len(train), args.min_scale)
    history = pyrovae.fit(vae, train, num_epochs=args.epochs, batch_size=100, lr=args.lr,
                          seed=args.seed, progress=False)
    vae.eval()
    el = pyrovae.elbo(vae, test, num_samples=20, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # its share is printed
        ll = pyrovae.log_likelihood(vae, test, num_samples=args.num_samples, seed=args.seed)
    with torch.no_grad():
        means = vae.reconstruct(test.images)
    results = {
        "train_elbo": history.train_elbo[-1],
        "test_elbo": el.mean,
        "test_log_px": ll.mean,
        "first_train_elbo": history.train_elbo[0],
        "reconstruction_rmse": float((means - test.images).pow(2).mean().sqrt()),
        "mean_min": float(means.min()),
        "mean_max": float(means.max()),
    }
    print(f"Frey faces, {len(train)} train / {len(test)} test frames of 28 x 20, "
          f"{args.latent_dim}-D latent, {args.epochs} epochs")
    print(f"train ELBO {history.train_elbo[0]:.1f} after epoch 1, {history.train_elbo[-1]:.1f} at the end; "
          f"test ELBO {el.mean:.1f}, test log p(x) {ll} (nats per frame, continuous density)")
    print(f"reconstruction RMSE {results['reconstruction_rmse']:.4f} (pixels in [0, 1]); decoder means in "
          f"[{results['mean_min']:.3f}, {results['mean_max']:.3f}]")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.latent_dim == 2:
            latent_manifold(vae, train.image_shape, steps=args.steps, path=args.out / "frey_manifold.png")
        reconstruction_grid(vae, test.images[::12][:16], train.image_shape,
                            path=args.out / "frey_reconstructions.png")
        print(f"pictures in {args.out}")
    return results


if __name__ == "__main__":
    main()

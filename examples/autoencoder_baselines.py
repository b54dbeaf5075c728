"""PCA, an autoencoder and a denoising autoencoder against the VAE: reconstructions and samples.

An autoencoder compresses x into a code and back; it reconstructs well, but it is not a
generative model: nothing says which codes are "typical", so there is nothing to sample from. A
common patch fits a Gaussian to the codes of the training data and decodes draws from it. This
example compares, at code sizes d = 2, 8, 32 on MNIST (the bundled sample by default):

- PCA (the linear autoencoder; its training reconstruction error is the sum of the discarded
  eigenvalues of the pixel covariance, divided by the number of pixels),
- a deterministic MLP autoencoder,
- a denoising MLP autoencoder (Vincent et al. 2008: a random 30% of the input pixels are zeroed,
  the clean image is the target),
- a VAE with the same networks (Bernoulli pixels, diagonal Gaussian q, standard normal prior),

by the test reconstruction error (mean squared error per pixel, grey values; the VAE reconstructs
from its posterior mean), and by samples: for the three autoencoders, codes drawn from a Gaussian
fitted to the training codes (mean and full covariance), for the VAE draws from its own prior;
each decoded to the mean image. Two numbers describe the samples: the mean confidence of a digit
classifier trained on the labelled training digits (the largest softmax probability; a sample
that looks like no digit in particular gets a low one; test digits give the baseline), and the
distance to the nearest training digit (root mean squared error per pixel), which a blurry
average digit keeps small: read it beside the pictures.

Run: ``python examples/autoencoder_baselines.py --out pictures/`` (a few minutes on 2 cores);
``--smoke`` runs a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from torch.nn import functional as F

import pyrovae
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal
from pyrovae.data import load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.plots import image_grid

MODELS = ("PCA", "autoencoder", "denoising AE", "VAE")


# ------------------------------------------------------------------ the baselines
class PCA:
    """Principal component analysis as a linear autoencoder: ``encode(x) = (x - mean) U``,
    ``decode(z) = z U^T + mean`` with ``U`` ``(D, d)`` the top ``d`` principal directions."""

    def __init__(self, x: torch.Tensor, d: int) -> None:
        self.mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vh[:d].T  # (D, d)
        #: eigenvalues of the (biased) sample covariance, descending, ``(min(N, D),)``
        self.eigenvalues = s**2 / len(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components.T + self.mean

    def train_error(self) -> float:
        """The closed form of the training mean squared error per pixel:
        ``sum_{i > d} lambda_i / D``."""
        d, D = self.components.shape[1], self.components.shape[0]
        return float(self.eigenvalues[d:].sum() / D)


class Autoencoder(nn.Module):
    """An MLP autoencoder ``D -> H -> d -> H -> D`` with sigmoid outputs (pixel intensities)."""

    def __init__(self, num_features: int, hidden: int, code_dim: int) -> None:
        super().__init__()
        self.encoder = MLP(num_features, (hidden,), code_dim)
        self.decoder_logits = MLP(code_dim, (hidden,), num_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder_logits(z))


def train_autoencoder(model: Autoencoder, x: torch.Tensor, *, epochs: int, mask_prob: float = 0.0,
                      lr: float = 1e-3, batch_size: int = 100, seed: int = 0) -> list[float]:
    """Minimize the pixel cross-entropy between the decoded code of a (masked) input and the
    clean input; ``mask_prob > 0`` zeroes that share of input pixels at random (denoising).

    :returns: the mean training loss of each epoch (nats per image).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = x[order[start : start + batch_size]]
            inp = batch
            if mask_prob > 0:
                inp = batch * (torch.rand(batch.shape, generator=g) >= mask_prob)
            logits = model.decoder_logits(model.encode(inp))
            loss = F.binary_cross_entropy_with_logits(logits, batch, reduction="sum") / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(x))
    return losses


def fit_gaussian(codes: torch.Tensor) -> torch.distributions.MultivariateNormal:
    """The Gaussian with the codes' sample mean and covariance (``(n, d)`` codes; a small
    jitter keeps the covariance positive definite)."""
    mean = codes.mean(0)
    centred = codes - mean
    cov = centred.T @ centred / (len(codes) - 1)
    cov = cov + 1e-6 * cov.diagonal().mean() * torch.eye(codes.shape[1], dtype=codes.dtype)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)


def nearest_distance(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Root mean squared pixel error from each sample ``(n, D)`` to its nearest reference row."""
    return (torch.cdist(samples, reference).min(1).values ** 2 / samples.shape[1]).sqrt()


def train_classifier(x: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int = 0) -> nn.Module:
    """A small MLP digit classifier ``D -> 256 -> num_classes`` (cross-entropy, Adam)."""
    torch.manual_seed(seed)
    net = MLP(x.shape[1], (256,), int(labels.max()) + 1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 100):
            i = order[start : start + 100]
            loss = F.cross_entropy(net(x[i]), labels[i].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def confidence(classifier: nn.Module, images: torch.Tensor) -> float:
    """The classifier's mean largest softmax probability on ``images`` ``(n, D)``."""
    return float(classifier(images).softmax(-1).max(-1).values.mean())


def _save_samples_picture(rows: dict[str, torch.Tensor], shape, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(next(iter(rows.values())))
    grid = image_grid(torch.cat(list(rows.values())), shape, nrow=n)
    fig = Figure(figsize=(n * 0.45 + 1.6, len(rows) * 0.5 + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid.permute(1, 2, 0).numpy())
    cell = grid.shape[1] / len(rows)
    ax.set_yticks([cell * (i + 0.5) for i in range(len(rows))], list(rows), fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the four models at each code size; print and return the errors and distances."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--num-train", type=int, default=None, help="use the first N digits")
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=200, help="samples per model")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: little data, 2 epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dims, args.epochs, args.num_train, args.num_test, args.hidden = [2, 8], 2, 1000, 200, 128
        args.num_samples = 50
    if any(d < 1 for d in args.dims):
        parser.error("--dims must be positive")
    try:
        grey = load_dataset(args.dataset, "train", root=args.data_root, binarize="none")
        binary = load_dataset(args.dataset, "train", root=args.data_root, binarize="dynamic")
        test = load_dataset(args.dataset, "test", root=args.data_root, binarize="none")
    except PyrovaeError as e:
        sys.exit(f"autoencoder_baselines: {e}")
    if args.num_train:
        grey, binary = (d.subset(min(args.num_train, len(d))) for d in (grey, binary))
    test = test.subset(min(args.num_test, len(test)))
    x, x_test, shape = grey.images, test.images, grey.image_shape
    D, H = grey.num_features, args.hidden
    baseline = float(nearest_distance(x_test[: args.num_samples], x).mean())
    classifier = None
    if grey.labels is not None:
        classifier = train_classifier(x, grey.labels, epochs=max(3, args.epochs // 3), seed=args.seed)

    def score(images: torch.Tensor) -> float:
        return float("nan") if classifier is None else confidence(classifier, images)

    baseline_confidence = score(x_test)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {"test_to_train_distance": baseline,
                               "test_confidence": baseline_confidence, "dims": {}}
    print(f"{len(x)} training digits, {len(x_test)} test digits. recon MSE: test mean squared "
          "error per pixel; confidence: a digit classifier's mean top probability on the samples "
          f"(test digits: {baseline_confidence:.3f}); nearest: RMSE per pixel from a sample to the "
          f"nearest training digit (test digits: {baseline:.4f})")
    print(f"{'d':>3} {'model':>13} {'recon MSE':>10} {'confidence':>11} {'nearest':>8}")
    for d in args.dims:
        torch.manual_seed(args.seed)
        pyro.set_rng_seed(args.seed)
        pca = PCA(x, d)
        ae = Autoencoder(D, H, d)
        train_autoencoder(ae, x, epochs=args.epochs, seed=args.seed)
        dae = Autoencoder(D, H, d)
        train_autoencoder(dae, x, epochs=args.epochs, mask_prob=0.3, seed=args.seed)
        vae = VAE(StandardNormal(d), DiagonalNormal(MLP(D, (H,), H, activate_output=True), d),
                  Bernoulli(MLP(d, (H,), D)), num_data=len(binary))
        pyrovae.fit(vae, binary, num_epochs=args.epochs, batch_size=100, seed=args.seed, progress=False)
        vae.eval()
        g = torch.Generator().manual_seed(args.seed)
        row: dict[str, Any] = {}
        pictures: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, model in (("PCA", pca), ("autoencoder", ae), ("denoising AE", dae)):
                recon = model.decode(model.encode(x_test)).clamp(0, 1)
                codes = model.encode(x)
                gauss = fit_gaussian(codes)
                eps = torch.randn(args.num_samples, d, generator=g)
                z = gauss.loc + eps @ gauss.scale_tril.T
                samples = model.decode(z).clamp(0, 1)
                row[name] = {"reconstruction_mse": float((recon - x_test).pow(2).mean()),
                             "sample_distance": float(nearest_distance(samples, x).mean()),
                             "sample_confidence": score(samples)}
                pictures[name] = samples[:12]
            recon = vae.likelihood(vae.family(x_test).mean).mean
            z = torch.randn(args.num_samples, d, generator=g)
            samples = vae.likelihood(z).mean
            row["VAE"] = {"reconstruction_mse": float((recon - x_test).pow(2).mean()),
                          "sample_distance": float(nearest_distance(samples, x).mean()),
                          "sample_confidence": score(samples)}
            pictures["VAE (prior)"] = samples[:12]
        row["PCA"]["train_mse"] = float((pca.decode(pca.encode(x)) - x).pow(2).mean())
        row["PCA"]["train_mse_closed_form"] = pca.train_error()
        results["dims"][d] = row
        for name in MODELS:
            print(f"{d:>3} {name:>13} {row[name]['reconstruction_mse']:>10.4f} "
                  f"{row[name]['sample_confidence']:>11.3f} {row[name]['sample_distance']:>8.4f}")
        if args.out is not None:
            _save_samples_picture(
                pictures, shape,
                f"d = {d}: autoencoders decode draws from a Gaussian fitted to their codes;\n"
                "the VAE decodes draws from its prior",
                args.out / f"baseline_samples_d{d}.png")
    if args.out is not None:
        print(f"pictures in {args.out}")
    return results


if __name__ == "__main__":
    main()

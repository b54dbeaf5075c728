"""The learned MNIST manifold of a VAE with a 2-D latent space (Kingma & Welling 2014, fig. 4).

With two latent dimensions the whole model can be looked at:

- the *manifold*: the decoder's mean at an evenly spaced grid in probability,
  z = Phi^{-1}(u) with u on a uniform grid in (0, 1)^2 (Phi^{-1}: the standard normal's inverse
  CDF), so each cell of the picture holds the same prior mass;
- the *codes*: the posterior means E_q[z | x] of the test digits, coloured by their label: the
  encoder sorts the digits by class although it never saw a label;
- *interpolations*: decoding the straight line between the codes of two digits.

It prints the test ELBO and log p(x), how well the 2-D codes separate the classes (accuracy of a
k-nearest-neighbour vote among the training codes), and the mean and variance of the test codes
(a standard normal prior wants 0 and at most 1).

Run: ``python examples/latent_manifold.py --out pictures/`` (bundled MNIST sample, about a
minute); ``--dataset mnist --data-root PATH`` for the full data; ``--smoke`` runs a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import pyro
import torch

import pyrovae
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal
from pyrovae.data import load_dataset
from pyrovae.errors import ImportanceSamplingWarning, PyrovaeError
from pyrovae.plots import interpolation_grid, latent_manifold, plot_khat, plot_latent_scatter


@torch.no_grad()
def encode(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Posterior means E_q[z | x] of ``x`` ``(n, D)``: shape ``(n, latent_dim)``."""
    return torch.cat([vae.family(x[i : i + batch_size]).mean for i in range(0, len(x), batch_size)])


def knn_accuracy(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor,
                 y_test: torch.Tensor, k: int = 10) -> float:
    """Share of test codes whose ``k`` nearest training codes vote for the right label."""
    nearest = torch.cdist(z_test, z_train).topk(k, largest=False).indices  # (n_test, k)
    votes = y_train[nearest]
    predicted = torch.mode(votes, dim=1).values
    return float((predicted == y_test).double().mean())


def pairs_of_different_digits(labels: torch.Tensor, num_pairs: int) -> tuple[list[int], list[int]]:
    """Indices ``(starts, ends)``: the first test digit of class ``c`` and of class ``c + 1``
    for ``c = 0, 1, ...`` (as many pairs as asked, at most 9)."""
    first = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(int(c), i)
    classes = sorted(first)
    pairs = [(first[a], first[b]) for a, b in zip(classes, classes[1:])][:num_pairs]
    return [a for a, _ in pairs], [b for _, b in pairs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train a 2-D VAE, draw its manifold, codes and interpolations; return the key numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default", help="default (bundled sample) or mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-train", type=int, default=None, help="use the first N digits")
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=500, help="K for log p(x)")
    parser.add_argument("--steps", type=int, default=20, help="grid size of the manifold")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: little data, 2 epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.num_test, args.num_samples = 3, 1500, 300, 50
        args.hidden = 200
    try:
        train = load_dataset(args.dataset, "train", root=args.data_root, binarize="dynamic")
        test = load_dataset(args.dataset, "test", root=args.data_root, binarize="dynamic")
    except PyrovaeError as e:
        sys.exit(f"latent_manifold: {e}")
    if train.labels is None or test.labels is None:
        sys.exit(f"latent_manifold: the {args.dataset!r} data has no labels to colour the codes by")
    if args.num_train:
        train = train.subset(min(args.num_train, len(train)))
    test = test.subset(min(args.num_test, len(test)))
    test_x = test.binarized(generator=torch.Generator().manual_seed(args.seed))

    D, H = train.num_features, args.hidden
    pyro.set_rng_seed(args.seed)  # the initial network
    vae = VAE(
        prior=StandardNormal(2),
        family=DiagonalNormal(MLP(D, (H,), H, "tanh", activate_output=True), 2),
        likelihood=Bernoulli(MLP(2, (H, H), D, "tanh")),
        num_data=len(train),
    )
    history = pyrovae.fit(vae, train, num_epochs=args.epochs, batch_size=100, lr=1e-3,
                          seed=args.seed, progress=False)
    el = pyrovae.elbo(vae, test_x, num_samples=10, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        ll = pyrovae.log_likelihood(vae, test_x, num_samples=args.num_samples, seed=args.seed)

    vae.eval()
    # codes of binarized digits, the kind of input the encoder was trained on
    train_x = train.subset(min(5000, len(train))).binarized(torch.Generator().manual_seed(args.seed))
    z_test = encode(vae, test_x.images)
    z_train = encode(vae, train_x.images)
    accuracy = knn_accuracy(z_train, train_x.labels, z_test, test.labels)
    results = {
        "train_elbo": history.train_elbo[-1],
        "test_elbo": el.mean,
        "test_log_px": ll.mean,
        "knn_accuracy": accuracy,
        "code_mean": [float(v) for v in z_test.mean(0)],
        "code_var": [float(v) for v in z_test.var(0)],
        "num_codes": len(z_test),
    }
    print(f"{args.epochs} epochs on {len(train)} digits, 2-D latent space")
    print(f"test ELBO {el.mean:.2f} nats, test log p(x) {ll}")
    print(f"10-nearest-neighbour label accuracy of the 2-D codes: {100 * accuracy:.1f}% "
          f"(chance: 10%)")
    print(f"test codes: mean ({results['code_mean'][0]:+.2f}, {results['code_mean'][1]:+.2f}), "
          f"variance ({results['code_var'][0]:.2f}, {results['code_var'][1]:.2f})")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        shape = train.image_shape
        latent_manifold(vae, shape, steps=args.steps, path=args.out / "manifold.png")
        plot_latent_scatter(z_test, test.labels, title=f"posterior means of {len(z_test)} test digits",
                            path=args.out / "latent_codes.png")
        starts, ends = pairs_of_different_digits(test.labels, 6)
        interpolation_grid(vae, test_x.images[starts], test_x.images[ends], shape, steps=10, mean=True,
                           path=args.out / "interpolations.png")
        plot_khat(ll, title=f"PSIS k-hat of log p(x), K={args.num_samples}, 2-D diagonal q: "
                            f"{100 * ll.unreliable_share:.0f}% above 0.7",
                  path=args.out / "khat.png")
        print(f"pictures in {args.out}")
    return results


if __name__ == "__main__":
    main()

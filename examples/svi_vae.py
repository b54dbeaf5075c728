"""A VAE trained with Pyro's own SVI loop (AEVB, Kingma & Welling 2014), step by step.

pyrovae's ``fit`` does this for you (faster, with validation, checkpoints and progress bars); this
example shows that a pyrovae ``VAE`` is an ordinary Pyro model/guide pair: ``pyro.infer.SVI`` with
``pyro.optim.Adam`` and ``Trace_ELBO`` trains it on minibatches ``(x, idx)``, and the ``"data"``
plate scales each minibatch's loss to the whole training set.

Run: ``python examples/svi_vae.py --epochs 5`` (bundled MNIST sample; ``--dataset mnist
--data-root PATH`` for the full data); ``--smoke`` for a run of seconds; ``--out DIR`` saves
``results.json`` and ``samples.png`` there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal, log_likelihood
from pyrovae.data import load_dataset
from pyrovae.plots import sample_grid


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=None, help="use the first N digits")
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=200, help="K for log p(x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and samples.png")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 1 epoch on 500 digits")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.num_samples = 1, 500, 20

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    train = load_dataset(args.dataset, "train", root=args.data_root, binarize="dynamic")
    test = load_dataset(args.dataset, "test", root=args.data_root, binarize="dynamic")
    if args.num_train:
        train = train.subset(args.num_train)
    test = test.subset(500).binarized(generator=torch.Generator().manual_seed(args.seed))

    D, L = train.num_features, args.latent_dim
    vae = VAE(
        prior=StandardNormal(L),
        family=DiagonalNormal(MLP(D, (400,), 400, activate_output=True), L),
        likelihood=Bernoulli(MLP(L, (400,), D)),
        num_data=len(train),
    )
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    loader = torch.utils.data.DataLoader(
        train,
        sampler=torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(train), args.batch_size, drop_last=False
        ),
        batch_size=None,
    )
    train_elbo = []
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for x, idx in loader:
            # svi.step returns the loss of the whole training set (the plate's scaling);
            # divided by num_data it is -ELBO per datapoint.
            total += svi.step(x, idx) / len(train) * len(idx)
        train_elbo.append(-total / len(train))
        print(f"epoch {epoch}: train ELBO {train_elbo[-1]:.2f} nats per digit")

    ll = log_likelihood(vae, test, num_samples=args.num_samples, seed=args.seed)
    print(f"test log-likelihood: {ll}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results = {"args": {k: str(v) for k, v in vars(args).items()}, "train_elbo": train_elbo,
                   "test_log_likelihood": ll.to_dict()}
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        sample_grid(vae, train.image_shape, path=args.out / "samples.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'samples.png'}")
    return ll.mean


if __name__ == "__main__":
    main()

"""Swap one part at a time: test log-likelihood of priors and variational families on MNIST.

Every model has the same encoder/decoder (MLP 784-200-200 with latent size 50, as in Burda et
al. 2016 but with ReLU), the Bernoulli likelihood, and the same training budget (epochs, batch
size, learning rate, seed) on dynamically binarized MNIST. Each is then scored on the first
``--test-points`` digits of the MNIST test set (one fixed seeded binarization) by importance
sampling with ``K = --num-samples`` draws, with PSIS k-hat. The reference row is the standard
normal prior with the diagonal family; every other row changes exactly one part, and the
table reports its difference from the reference, measured in the same run.

The published numbers (docs/references.md) come from thousands of epochs; this budget is minutes, so the
absolute values are far from them and only the differences between rows mean something.

    python benchmarks/compare_parts.py --data-root ../shared/data --epochs 10 \\
        --out benchmarks/results/compare_parts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import pyrovae
from pyrovae.build import VAEConfig, build_vae
from pyrovae.data import load_dataset

#: name -> (prior, family, options): each differs from "standard + diagonal" in one part.
MODELS = {
    "standard + diagonal (reference)": ("standard", "diagonal", {}),
    "mixture(10) + diagonal": ("mixture", "diagonal", {"num_components": 10}),
    "vamp(500) + diagonal": ("vamp", "diagonal", {"num_pseudo_inputs": 500}),
    "standard + full_rank": ("standard", "full_rank", {}),
    "standard + iaf(2)": ("standard", "iaf", {"num_transforms": 2}),
    "standard + planar(4)": ("standard", "planar", {"num_transforms": 4}),
}

PUBLISHED = {
    "Burda et al. 2016, VAE 784-200-200-50 (dynamic MNIST, K=5000)": -86.76,
    "Burda et al. 2016, IWAE k=50 (dynamic MNIST, K=5000)": -84.78,
    "Tomczak & Welling 2018, VampPrior (static MNIST)": -85.57,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder with mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-points", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=5000, help="K for importance sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="model names to run (default all)")
    p.add_argument("--out", type=Path, default=None, help="write JSON here (and a .md beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = load_dataset("mnist", "train", root=args.data_root, binarize="dynamic")
    train = train.subset(min(args.train_size, len(train)))
    test = load_dataset("mnist", "test", root=args.data_root, binarize="dynamic")
    test = test.subset(args.test_points).binarized(torch.Generator().manual_seed(123))

    rows, values = [], []
    for name, (prior, family, options) in MODELS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        config = VAEConfig(
            num_features=784, latent_dim=50, hidden_dims=(200, 200), prior=prior,
            family=family, options=dict(options),
        )
        torch.manual_seed(args.seed)
        vae = build_vae(config, num_data=len(train))
        t0 = time.perf_counter()
        history = pyrovae.fit(
            vae, train, num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, progress=False,
        )
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyrovae.errors.ImportanceSamplingWarning)
            ll = pyrovae.log_likelihood(vae, test, num_samples=args.num_samples, seed=args.seed)
            el = pyrovae.elbo(vae, test, num_samples=100, seed=args.seed)
        eval_seconds = time.perf_counter() - t0
        row = {
            "model": name, "prior": prior, "family": family, "options": options,
            "num_parameters": sum(p.numel() for p in vae.parameters()),
            "test_log_likelihood": ll.mean, "test_log_likelihood_stderr": ll.stderr,
            "test_elbo": el.mean, "khat_above_0.7_share": ll.unreliable_share,
            "final_train_elbo": history.train_elbo[-1],
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        }
        rows.append(row)
        values.append(ll.values)
        print(
            f"{name:34s} log p(x) {ll.mean:8.2f} ± {ll.stderr:.2f}  ELBO {el.mean:8.2f}  "
            f"k-hat>0.7 {100 * ll.unreliable_share:5.1f}%  train {train_seconds:6.0f}s",
            flush=True,
        )
    if rows and rows[0]["model"].endswith("(reference)"):
        # Paired over the same test digits: the standard error of the mean difference.
        for r, v in zip(rows, values):
            d = (v - values[0]).double()
            r["difference_from_reference"] = float(d.mean())
            r["difference_stderr"] = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")

    result = {
        "benchmark": "compare_parts",
        "data": "MNIST, dynamically binarized for training; test: first "
        f"{args.test_points} test digits, one seeded binarization",
        "architecture": "MLP encoder 784-200-200, latent 50, decoder 50-200-200-784, ReLU, Bernoulli",
        "budget": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "train_size": len(train), "optimizer": "Adam", "loss": "Trace_ELBO"},
        "num_samples": args.num_samples, "seed": args.seed, "threads": args.threads,
        "machine": platform.platform(), "torch": torch.__version__, "pyro": pyrovae_pyro_version(),
        "rows": rows, "published": PUBLISHED,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    return 0


def pyrovae_pyro_version() -> str:
    import pyro

    return pyro.__version__


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"# Swapping parts on MNIST ({b['epochs']} epochs, K = {result['num_samples']})",
        "",
        f"{result['architecture']}; {b['train_size']} training digits, batch {b['batch_size']}, "
        f"Adam lr {b['lr']}, seed {result['seed']}, {result['threads']} thread(s); "
        f"{result['data']}.",
        "",
        "| model | test log p(x) | vs reference (paired) | test ELBO | k-hat > 0.7 | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diff = r.get("difference_from_reference", float("nan"))
        diff_err = r.get("difference_stderr", float("nan"))
        lines.append(
            f"| {r['model']} | {r['test_log_likelihood']:.2f} ± {r['test_log_likelihood_stderr']:.2f}"
            f" | {diff:+.2f} ± {diff_err:.2f} | {r['test_elbo']:.2f} | {100 * r['khat_above_0.7_share']:.1f}% "
            f"| {r['train_seconds']:.0f} |"
        )
    lines += ["", "Published (thousands of epochs, K = 5000, all 10,000 test digits):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result["published"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""log p(x) estimators side by side on an MNIST VAE: importance sampling vs AIS, and BDMC.

Trains Burda et al.'s 784-200-200-50 tanh VAE (Bernoulli likelihood, N(0, I) prior, diagonal
Gaussian q(z|x)) on dynamically binarized MNIST for ``--epochs`` epochs (batch 100, Adam 1e-3,
one thread), then on the first ``--test-points`` test digits (binarized once with a fixed seed):

- importance sampling with the encoder, K = 1000 and 5000 (one pass, nested draws);
- AIS from the encoder (:func:`pyrovae.ais`) with each ``--ais-steps`` T, ``--chains`` chains,
  10 leapfrog steps, step sizes adapted toward 65% acceptance;

and BDMC (:func:`pyrovae.bdmc`) on ``--sim-points`` digits simulated from the model, for each T:
forward AIS (a stochastic lower bound) and reverse AIS from the generating z (an upper bound),
with IS at K = 1000 and 5000 on the same simulated digits. Writes
``benchmarks/results/estimators_mnist.json`` and ``estimators_mnist.md``.

Usage::

    PYROVAE_DATA=/path/to/data python benchmarks/estimators_mnist.py           # the committed run
    PYROVAE_DATA=/path/to/data python benchmarks/estimators_mnist.py --quick   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="data folder (default: $PYROVAE_DATA)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    p.add_argument("--test-points", type=int, default=100, help="first N test digits (default: 100)")
    p.add_argument("--ais-points", type=int, default=50,
                   help="AIS on the first N of those (default: 50)")
    p.add_argument("--sim-points", type=int, default=20, help="simulated digits for BDMC")
    p.add_argument("--ais-steps", type=int, nargs="+", default=[100, 1000],
                   help="numbers of intermediate distributions T (default: 100 1000)")
    p.add_argument("--chains", type=int, default=4, help="AIS chains per digit (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 epoch on 2,000 digits, 10 test digits, T = 10")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from pyrovae import fit, iwae_bounds
    from pyrovae.ais import ais, bdmc
    from pyrovae.build import VAEConfig, build_vae
    from pyrovae.data import load_dataset

    if args.quick:
        args.epochs, args.test_points, args.ais_points, args.sim_points = 1, 10, 5, 5
        args.ais_steps = [10]
    train = load_dataset("mnist", "train", root=args.data_root, binarize="dynamic")
    if args.quick:
        train = train.subset(2000)
    test = load_dataset("mnist", "test", root=args.data_root, binarize="dynamic")
    test = test.subset(args.test_points).binarized(
        generator=torch.Generator().manual_seed(args.seed + 1)
    )
    config = VAEConfig(num_features=784, latent_dim=50, hidden_dims=(200, 200), activation="tanh",
                       prior="standard", family="diagonal", likelihood="bernoulli")
    torch.manual_seed(args.seed)
    vae = build_vae(config, num_data=len(train))
    t0 = time.perf_counter()
    history = fit(vae, train, num_epochs=args.epochs, batch_size=100, lr=1e-3, seed=args.seed,
                  progress=False,
                  on_epoch_end=lambda e, h: print(f"epoch {e:3d} train ELBO {h.train_elbo[-1]:8.2f}",
                                                  flush=True))
    report: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": time.perf_counter() - t0,
        "final_train_elbo": history.train_elbo[-1],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    t0 = time.perf_counter()
    bounds = iwae_bounds(vae, test, (1, 1000, 5000), seed=args.seed)
    report["importance"] = {**bounds.to_dict(), "seconds": time.perf_counter() - t0}
    first = bounds.values[:, : args.ais_points]
    report["importance_on_ais_points"] = {
        f"K={k}": float(v.mean()) for k, v in zip(bounds.num_samples, first)
    }
    print(f"IS: {bounds}", flush=True)
    x_ais = torch.stack([test[i][0] for i in range(min(args.ais_points, len(test)))])
    report["ais"], report["bdmc"] = [], []
    for T in args.ais_steps:
        t0 = time.perf_counter()
        r = ais(vae, x_ais, num_intermediate=T, num_chains=args.chains, leapfrog_steps=10,
                seed=args.seed)
        report["ais"].append({"num_intermediate": T, **r.to_dict(), "seconds": time.perf_counter() - t0})
        print(f"AIS T={T}: {r} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for T in args.ais_steps:
        t0 = time.perf_counter()
        b = bdmc(vae, args.sim_points, num_intermediate=T, num_chains=args.chains,
                 leapfrog_steps=10, seed=args.seed + 2)
        report["bdmc"].append({"num_intermediate": T, **b.to_dict(), "seconds": time.perf_counter() - t0})
        print(f"BDMC T={T}: {b} ({time.perf_counter() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "estimators_mnist_quick" if args.quick else "estimators_mnist"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    write_markdown(args.out / f"{name}.md", report)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    s = report["settings"]
    imp = report["importance"]
    lines = [
        "# log p(x) estimators on an MNIST VAE (benchmarks/estimators_mnist.py)",
        "",
        f"784-200-200-50 tanh VAE, Bernoulli likelihood, N(0, I) prior, diagonal Gaussian "
        f"q(z|x), trained {s['epochs']} epochs on dynamically binarized MNIST (batch 100, Adam "
        f"1e-3, 1 thread; final train ELBO {report['final_train_elbo']:.2f}). A short training "
        "budget: the numbers compare estimators on one model, not the model with the literature.",
        "",
        f"## Test digits (first {imp['num_datapoints']}, binarized once)",
        "",
        "| estimator | log p(x), nats | seconds |",
        "|---|---|---|",
    ]
    for k, m, e in zip(imp["num_samples"], imp["mean"], imp["stderr"]):
        lines.append(f"| IS, K={k} | {m:.2f} ± {e:.2f} | {imp['seconds']:.0f} (one pass) |")
    lines += ["", f"On the first {s['ais_points']} of them (same digits for every row):", "",
              "| estimator | log p(x), nats | mean chain s.e. | acceptance | seconds |",
              "|---|---|---|---|---|"]
    for k, v in report["importance_on_ais_points"].items():
        lines.append(f"| IS, {k} | {v:.2f} | | | |")
    for a in report["ais"]:
        se = a["mean_chain_stderr"]
        lines.append(
            f"| AIS from q(z|x), T={a['num_intermediate']}, C={a['num_chains']} | "
            f"{a['mean']:.2f} ± {a['stderr']:.2f} | {'n/a' if se is None else f'{se:.3f}'} | "
            f"{a['mean_acceptance']:.2f} | {a['seconds']:.0f} |"
        )
    lines += ["", f"## BDMC on {s['sim_points']} digits simulated from the model", "",
              "| T | lower (forward AIS) | upper (reverse AIS) | width | IS K=1000 | IS K=5000 | seconds |",
              "|---|---|---|---|---|---|---|"]
    for b in report["bdmc"]:
        imp_b = b.get("importance", {})
        lines.append(
            f"| {b['num_intermediate']} | {b['lower']['mean']:.2f} | {b['upper']['mean']:.2f} | "
            f"{b['width']['mean']:.2f} ± {b['width']['stderr']:.2f} | "
            f"{imp_b.get('K=1000', {}).get('mean', float('nan')):.2f} | "
            f"{imp_b.get('K=5000', {}).get('mean', float('nan')):.2f} | {b['seconds']:.0f} |"
        )
    lines += ["", "Nats per digit, ± standard error over digits. Both AIS bounds hold in "
              "expectation; the true log p(x) of the simulated digits lies between them."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

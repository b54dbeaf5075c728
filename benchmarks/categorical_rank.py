"""Choose the rank of the categorical256 decoder's factored logit head (`FactoredLogits`).

The MLP decoder of the 256-way categorical likelihood (784-400-400, latent 50) ends either in a
dense `Linear(400, 256 * 784)` (`logit_rank=0`, 80.3 M parameters) or in `r` features per pixel
mapped to the 256 logits by a 1x1 layer shared by all pixels (`logit_rank=r`). Each row trains
the same model (same seed, data, budget) with one rank on the bundled MNIST sample with its grey
values (`binarize=None`), then scores the first `--test-points` test digits: the test ELBO and
the importance-sampled log-likelihood (K = `--num-samples`), paired over the same digits.

Time per step comes from a separate measurement on a shared machine: the ranks take turns, each
turn one `fit` epoch of 5 steps, and the best of `--timing-rounds` turns is reported (the epoch
mean of the training runs is kept in the JSON too; it carries the machine's load).

    OMP_NUM_THREADS=1 python benchmarks/categorical_rank.py --out benchmarks/results/categorical_rank.json
    python benchmarks/categorical_rank.py --timing-only --out ...   # only (re)measure the step time
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[0, 4, 8, 16, 32],
                   help="logit_rank values (0: the dense output layer)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-points", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=50, help="K for importance sampling")
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--timing-only", action="store_true",
                   help="only measure the step time; merge it into an existing --out file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write JSON here (and a .md beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = load_dataset("default", "train", binarize=None).subset(args.train_size)
    test = load_dataset("default", "test", binarize=None).subset(args.test_points)
    if args.timing_only:
        result = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {"rows": []}
        timing = time_steps(args.ranks, args.timing_rounds, train, args.batch_size, args.seed)
        for r in result["rows"]:
            r["seconds_per_step_best"] = timing.get(r["logit_rank"])
        result["timing"] = {"rounds": args.timing_rounds, "steps_per_round": 5,
                            "seconds_per_step_best": timing}
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            if result["rows"]:
                args.out.with_suffix(".md").write_text(markdown(result))
        return 0
    rows, values = [], {}
    for rank in args.ranks:
        config = VAEConfig(num_features=784, likelihood="categorical256",
                           options={"logit_rank": rank})
        torch.manual_seed(args.seed)
        vae = build_vae(config, num_data=len(train))
        t0 = time.perf_counter()
        history = pyrovae.fit(vae, train, num_epochs=args.epochs, batch_size=args.batch_size,
                              seed=args.seed, progress=False)
        train_seconds = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyrovae.errors.ImportanceSamplingWarning)
            ll = pyrovae.log_likelihood(vae, test, num_samples=args.num_samples, seed=args.seed)
            el = pyrovae.elbo(vae, test, num_samples=10, seed=args.seed)
        values[rank] = ll.values
        row = {
            "logit_rank": rank,
            "decoder_parameters": sum(q.numel() for q in vae.likelihood.parameters()),
            "test_log_likelihood": ll.mean, "test_log_likelihood_stderr": ll.stderr,
            "test_elbo": el.mean, "final_train_elbo": history.train_elbo[-1],
            "seconds_per_step": sum(history.epoch_seconds) / history.num_steps,
            "train_seconds": round(train_seconds, 1),
        }
        rows.append(row)
        print(f"logit_rank {rank:3d}  log p(x) {ll.mean:9.2f} ± {ll.stderr:.2f}  ELBO {el.mean:9.2f}"
              f"  {row['seconds_per_step']:.3f} s/step", flush=True)
    timing = time_steps(args.ranks, args.timing_rounds, train, args.batch_size, args.seed)
    for r in rows:
        r["seconds_per_step_best"] = timing[r["logit_rank"]]
    base = 0 if 0 in values else args.ranks[0]
    for r in rows:
        d = (values[r["logit_rank"]] - values[base]).double()
        r["log_likelihood_vs_dense"] = float(d.mean())
        r["log_likelihood_vs_dense_stderr"] = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
    result = {
        "benchmark": "categorical_rank",
        "model": "MLP 784-400-400, latent 50, ReLU, standard prior, diagonal family, Categorical256",
        "budget": {"epochs": args.epochs, "train_size": len(train), "batch_size": args.batch_size,
                   "lr": 1e-3, "optimizer": "Adam", "loss": "Trace_ELBO"},
        "test_points": len(test), "num_samples": args.num_samples, "seed": args.seed,
        "threads": args.threads, "machine": platform.platform(), "torch": torch.__version__,
        "rows": rows,
        "timing": {"rounds": args.timing_rounds, "steps_per_round": 5,
                   "seconds_per_step_best": timing},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    return 0


def time_steps(ranks: list[int], rounds: int, train, batch_size: int, seed: int) -> dict[int, float]:
    """Seconds per `fit` step of each rank: the ranks take turns, best of `rounds` turns."""
    data = train.subset(5 * batch_size)
    models = {}
    for rank in ranks:
        torch.manual_seed(seed)
        config = VAEConfig(num_features=784, likelihood="categorical256", options={"logit_rank": rank})
        models[rank] = build_vae(config, num_data=len(data))
    best = {rank: float("inf") for rank in ranks}
    for _ in range(rounds):
        for rank, vae in models.items():
            h = pyrovae.fit(vae, data, num_epochs=1, batch_size=batch_size, seed=seed, progress=False)
            best[rank] = min(best[rank], sum(h.epoch_seconds) / h.num_steps)
    for rank in ranks:
        print(f"logit_rank {rank:3d}  {best[rank]:.3f} s/step (best of {rounds})", flush=True)
    return best


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"{result['model']}; {b['train_size']} training digits of the bundled sample (grey values), "
        f"{b['epochs']} epochs of batch {b['batch_size']}, Adam {b['lr']}, seed {result['seed']}, "
        f"{result['threads']} thread(s); scored on {result['test_points']} test digits "
        f"(IS with K = {result['num_samples']}; ELBO with 10 samples).",
        "",
        "| logit_rank | decoder parameters | test log p(x) | vs dense (paired) | test ELBO "
        "| s per step (best of turns) | s per step (training, loaded) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: r["logit_rank"]):
        name = "0 (dense)" if r["logit_rank"] == 0 else str(r["logit_rank"])
        lines.append(
            f"| {name} | {r['decoder_parameters'] / 1e6:.1f} M | {r['test_log_likelihood']:.1f} ± "
            f"{r['test_log_likelihood_stderr']:.1f} | {r['log_likelihood_vs_dense']:+.1f} ± "
            f"{r['log_likelihood_vs_dense_stderr']:.1f} | {r['test_elbo']:.1f} | "
            f"{r.get('seconds_per_step_best', float('nan')):.2f} | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

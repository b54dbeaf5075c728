"""AIS beside IS for the headline MNIST rows: is the importance-sampled figure to be trusted?

For each complete row of ``benchmarks/results/mnist_nll.json`` (or ``--settings``), the saved
model (``benchmarks/results/mnist_nll_state/<setting>.pt``) is scored on a fixed random subset of
``--points`` test digits (``torch.randperm`` with ``--subset-seed``; the test set binarized as
benchmarks/mnist_nll.py does, ``--eval-seed``) by

- importance sampling with the encoder, ``K = --num-samples`` (``pyrovae.log_likelihood``), and
- AIS (``pyrovae.ais``: ``--ais-steps`` T, ``--ais-chains``, 10 leapfrog steps, from the encoder,
  with its convergence check at T/4), on the same digits.

Both are stochastic lower bounds of log p(x); the per-digit difference AIS - IS, its mean and
paired standard error, AIS's own Monte Carlo error and its convergence verdict go into
``benchmarks/results/mnist_certified.json`` and a table, ``mnist_certified.md``, beside the row's
IS figure. A difference well above its error means the IS figure is low by at least that much.

Cost (one CPU thread, 784-200-200-50 MLP): see ``--estimate``, which times a few digits at a
short schedule and extrapolates (AIS's cost is linear in digits x chains x T x leapfrog steps).

    PYROVAE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/certify_mnist.py
    python benchmarks/certify_mnist.py --estimate            # seconds per row, extrapolated
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=None,
                   help="default: the complete rows of --results")
    p.add_argument("--results", type=Path, default=RESULTS / "mnist_nll.json")
    p.add_argument("--state-dir", type=Path, default=RESULTS / "mnist_nll_state")
    p.add_argument("--out", type=Path, default=RESULTS / "mnist_certified.json")
    p.add_argument("--points", type=int, default=500)
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1,
                   help="the test set's binarization (as benchmarks/mnist_nll.py) and the draws")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--ais-steps", type=int, default=1000)
    p.add_argument("--ais-chains", type=int, default=16)
    p.add_argument("--leapfrog-steps", type=int, default=10)
    p.add_argument("--data-root", default=None, help="default: $PYROVAE_DATA")
    p.add_argument("--dataset", default=None, help="override the row's data set (tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--estimate", action="store_true",
                   help="time --probe-points digits at T=10 per row and extrapolate to the full run")
    p.add_argument("--probe-points", type=int, default=32)
    return p.parse_args(argv)


def complete_settings(results: Path) -> list[str]:
    rows = json.loads(results.read_text())
    return [r["setting"] for r in rows if r.get("complete")]


def test_subset(args: argparse.Namespace, setting: str) -> Any:
    from mnist_nll import SETTINGS, load_data

    spec = dict(SETTINGS.get(setting, {"dataset": "mnist"}))
    data_args = argparse.Namespace(dataset=args.dataset, data_root=args.data_root,
                                   eval_seed=args.eval_seed)
    _, test, _ = load_data(data_args, spec)
    n = min(args.points, len(test))
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.subset_seed))
    return test.subset(torch.sort(order[:n]).values)


def certify(args: argparse.Namespace, setting: str, points: int | None = None,
            ais_steps: int | None = None) -> dict[str, Any]:
    from pyrovae import load_model, log_likelihood
    from pyrovae.ais import ais

    vae = load_model(args.state_dir / f"{setting}.pt")
    test = test_subset(args, setting)
    if points is not None:
        test = test.subset(torch.arange(min(points, len(test))))
    T = ais_steps or args.ais_steps
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll = log_likelihood(vae, test, num_samples=args.num_samples, seed=args.eval_seed)
    t_is = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ais(vae, test, num_intermediate=T, num_chains=args.ais_chains,
                leapfrog_steps=args.leapfrog_steps, seed=args.eval_seed)
    t_ais = time.perf_counter() - t0
    diff = (a.values - ll.values).double()
    n = len(diff)
    share = ll.unreliable_share
    return {
        "setting": setting, "points": n, "subset_seed": args.subset_seed,
        "is": {"K": args.num_samples, "nll": -ll.mean, "stderr": ll.stderr,
               "khat_above_0.7": None if math.isnan(share) else share, "seconds": t_is},
        "ais": {"T": T, "chains": args.ais_chains, "leapfrog_steps": args.leapfrog_steps,
                "nll": -a.mean, "stderr": a.stderr, "mc_error": a.mean_error,
                "converged": a.converged, "convergence": a.convergence,
                "acceptance": a.mean_acceptance, "seconds": t_ais},
        "ais_minus_is": {"mean": float(diff.mean()),
                         "stderr": float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# AIS beside IS on the headline MNIST rows",
        "",
        f"Machine: {report['machine']}. Date: {report['date']}. Command: `{report['command']}`.",
        "",
        "Each row: the saved model of `benchmarks/results/mnist_nll.json`'s row, on the same "
        f"{report['points']} random test digits (subset seed {report['subset_seed']}). "
        "NLL in nats (lower is better); AIS - IS in log p(x) per digit, ± its paired standard "
        "error; AIS's Monte Carlo error includes its convergence check (T/4 vs T).",
        "",
        "| setting | IS NLL (K) | k-hat > 0.7 | AIS NLL (T, chains) | AIS - IS | AIS MC error "
        "| converged | CPU s (IS / AIS) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        i, a, d = r["is"], r["ais"], r["ais_minus_is"]
        kh = "n/a" if i["khat_above_0.7"] is None else f"{100 * i['khat_above_0.7']:.0f}%"
        lines.append(
            f"| {r['setting']} | {i['nll']:.2f} ± {i['stderr']:.2f} ({i['K']}) | {kh} "
            f"| {a['nll']:.2f} ± {a['stderr']:.2f} ({a['T']}, {a['chains']}) "
            f"| {d['mean']:+.3f} ± {d['stderr']:.3f} | {a['mc_error']:.3f} | {a['converged']} "
            f"| {i['seconds']:.0f} / {a['seconds']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = args.settings or complete_settings(args.results)
    if args.estimate:
        for setting in settings:
            probe, T = args.probe_points, 10  # enough digits for full-size decoder calls
            r = certify(args, setting, points=probe, ais_steps=T)
            per = r["ais"]["seconds"] / (probe * T)
            full = per * args.points * args.ais_steps  # the same chains and leapfrog steps
            is_full = r["is"]["seconds"] / probe * args.points
            print(f"{setting}: AIS {r['ais']['seconds']:.1f} s for {probe} digits at T={T} -> "
                  f"~{full / 3600:.1f} h for {args.points} digits at T={args.ais_steps}; IS "
                  f"~{is_full / 60:.1f} min", flush=True)
        return 0
    report = {"command": " ".join(["python", "benchmarks/certify_mnist.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {args.threads} torch thread(s)",
              "points": args.points, "subset_seed": args.subset_seed, "rows": []}
    for setting in settings:
        row = certify(args, setting)
        report["rows"].append(row)
        print(f"{setting}: IS {row['is']['nll']:.2f}, AIS {row['ais']['nll']:.2f}, AIS - IS "
              f"{row['ais_minus_is']['mean']:+.3f} ± {row['ais_minus_is']['stderr']:.3f}", flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

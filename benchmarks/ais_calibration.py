"""Do AIS's stated errors cover the truth? A calibration benchmark on models with known log p(x).

Models (float64, exact log p(x); tests/linear_gaussian.py, tests/mixture_1d.py):
  lg-good    linear-Gaussian (latent 3, data 10), the best diagonal Gaussian family as encoder
  lg-poor    the same model, an untrained MLP encoder
  lg-wrong   the same model, the best diagonal family shifted by +3 posterior sd, 0.3x as wide
  mixture    the 1-D mixture of two Gaussians, encoder N(x, 0.4^2) (the posterior is bimodal
             between the components)
For each model, start (encoder, defensive = 1/2 encoder + 1/2 prior, prior) and schedule (T,
leapfrog steps), one `pyrovae.ais` run with its convergence check (an independent run at T/4)
on the same points measures, per datapoint, err = estimate - exact, and reports
  beyond2/3_chain  share of points with |err| > 2 / 3 x chain_stderr (the chains' delta-method
                   error, all AIS stated before)
  beyond2/3_total  the same for total_stderr = sqrt(chain_stderr^2 + discrepancy^2)
  mean_err, mean_abs_err, mean_chain_se, mean_total_se; converged (the result's flag); seconds.
Nominal: ~5% beyond 2 and ~0.3% beyond 3 errors. Importance sampling with the encoder at
K = 10^2..10^5 on the same points gives the cost of IS at equal accuracy.

    OMP_NUM_THREADS=1 python benchmarks/ais_calibration.py --out benchmarks/results/ais_calibration.json
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from linear_gaussian import LinearGaussian  # noqa: E402
from mixture_1d import GaussianProposal, exact_log_px, mixture_vae  # noqa: E402

from pyrovae import MLP, DiagonalNormal, log_likelihood  # noqa: E402
from pyrovae.ais import ais  # noqa: E402

#: (T, leapfrog steps) of the grid; the first is far too short, the last near the defaults.
SCHEDULES = [(50, 5), (200, 5), (200, 10), (800, 5)]
STARTS = ["encoder", "defensive", "prior"]


def models(num_points: int, seed: int) -> dict:
    """name -> (vae, x, exact log p(x))."""
    lg = LinearGaussian(latent_dim=3, num_features=10, scale=0.7, seed=seed)
    x = lg.sample_x(num_points, seed=seed + 1)
    exact = lg.log_px(x)
    good = lg.best_diagonal_family()
    torch.manual_seed(seed)
    poor = DiagonalNormal(MLP(lg.D, (8,), 8), lg.L).double()
    wrong = lg.best_diagonal_family()
    with torch.no_grad():
        sd = torch.diagonal(lg.posterior_cov).sqrt()
        wrong.loc_head.bias.add_(3 * sd)
        target = 0.3 * torch.diagonal(lg.precision).rsqrt()
        wrong.scale_head.bias.copy_(torch.log(torch.expm1(target - wrong.min_scale)))
    g = torch.Generator().manual_seed(seed + 2)
    comp = torch.bernoulli(torch.full((num_points,), 0.7), generator=g).long()
    locs, scales = torch.tensor([-2.0, 1.5]), torch.tensor([0.5, 0.8])
    z = locs[comp] + scales[comp] * torch.randn(num_points, generator=g)
    xm = (z + 0.4 * torch.randn(num_points, generator=g)).double().view(-1, 1)
    return {
        "lg-good": (lg.vae(good, num_points), x, exact),
        "lg-poor": (lg.vae(poor, num_points), x, exact),
        "lg-wrong": (lg.vae(wrong, num_points), x, exact),
        "mixture": (mixture_vae(GaussianProposal(1.0, 0.0, 0.4)).double(), xm,
                    exact_log_px(xm).double()),
    }


def calibrate(vae, x, exact, T: int, L: int, start: str, chains: int, seed: int,
              max_intermediate: int | None = None) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ais(vae, x, num_intermediate=T, leapfrog_steps=L, num_chains=chains, start=start,
                seed=seed, max_intermediate=max_intermediate)
    seconds = time.perf_counter() - t0
    err = (r.values - exact).double()
    cse, tse = r.chain_stderr.double(), r.total_stderr.double()
    share = lambda k, se: float((err.abs() > k * se).double().mean())  # noqa: E731
    n = len(err)
    return {
        "T": T, "leapfrog_steps": L, "start": start, "num_chains": chains,
        "max_intermediate": max_intermediate, "T_used": r.num_intermediate,
        "beyond2_chain": share(2, cse), "beyond3_chain": share(3, cse),
        "beyond2_total": share(2, tse), "beyond3_total": share(3, tse),
        "mean_err": float(err.mean()), "mean_abs_err": float(err.abs().mean()),
        "mean_chain_se": float(cse.mean()), "mean_total_se": float(tse.mean()),
        # the mean over points against the Monte Carlo error of the mean
        "mean_err_over_stated": float(err.mean() / (tse.pow(2).sum().sqrt() / n)),
        "mean_discrepancy": float(r.discrepancy.mean()), "converged": r.converged,
        "acceptance": r.mean_acceptance, "seconds": seconds,
        # the runs made: T (adaptive: T0, 4 T0, ... up to T_used) and the first check at T0 / 4
        "gradient_evaluations_per_point": int(chains * L * (T // 4 + sum(
            T * 4**k for k in range(int(round(math.log(r.num_intermediate / T, 4))) + 1)))),
    }


def importance(vae, x, exact, ks, seed) -> list[dict]:
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ll = log_likelihood(vae, x, num_samples=k, seed=seed, diagnostics=False)
        err = (ll.values - exact).double()
        rows.append({"K": k, "mean_err": float(err.mean()), "mean_abs_err": float(err.abs().mean()),
                     "seconds": time.perf_counter() - t0})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--schedules", nargs="+", default=None, help="T:L pairs, e.g. 200:5")
    p.add_argument("--starts", nargs="+", default=STARTS)
    p.add_argument("--is-samples", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    p.add_argument("--adaptive", type=int, default=None, metavar="MAX",
                   help="only adaptive rows: ais(..., max_intermediate=MAX) from each T")
    p.add_argument("--merge", action="store_true",
                   help="append the rows to --out's existing report instead of replacing it")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    schedules = ([tuple(int(v) for v in s.split(":")) for s in args.schedules]
                 if args.schedules else SCHEDULES)
    table = models(args.points, args.seed)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} {platform.processor() or ''}, "
                         f"{torch.get_num_threads()} torch thread(s)",
              "torch": torch.__version__, "points": args.points, "rows": [], "importance": {}}
    if args.merge and args.out and args.out.exists():
        old = json.loads(args.out.read_text())
        report["rows"], report["importance"] = old["rows"], old["importance"]
        report["command"] = old["command"] + " ; " + report["command"]
    for name in args.models or list(table):
        vae, x, exact = table[name]
        for start in args.starts:
            for T, L in schedules:
                if start == "prior" and (T, L) != (200, 5):
                    continue  # the prior start at one schedule (a reference)
                row = {"model": name, **calibrate(vae, x, exact, T, L, start, args.chains,
                                                  args.seed, args.adaptive)}
                report["rows"].append(row)
                print(f"{name:9s} {start:9s} T={T:4d}->{row['T_used']:4d} L={L:2d}  err {row['mean_err']:+.3f} "
                      f"|err| {row['mean_abs_err']:.3f}  >3 chain {row['beyond3_chain']:.2f} "
                      f">3 total {row['beyond3_total']:.2f} >2 total {row['beyond2_total']:.2f}  "
                      f"converged {row['converged']}  {row['seconds']:.1f}s", flush=True)
        if args.adaptive is not None:
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
            continue
        report["importance"][name] = importance(vae, x, exact, args.is_samples, args.seed)
        for r in report["importance"][name]:
            print(f"{name:9s} IS K={r['K']:6d}  err {r['mean_err']:+.3f} |err| "
                  f"{r['mean_abs_err']:.3f}  {r['seconds']:.2f}s", flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

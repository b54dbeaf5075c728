"""Speed of :func:`pyrovae.log_likelihood` against a bare importance-sampling estimator.

Both score the same 784-400-400-50 MLP VAE (ReLU, Bernoulli likelihood, diagonal Gaussian
q(z|x), N(0, I) prior; the weights of a short training run, or random ones: the cost does not
depend on them) on the same binarized digits with the same chunks of draws (``max_rows`` rows per
decoder call), interleaved over several rounds in one process; the median seconds of each are
reported, and their ratio (pyrovae's speed / the bare one's).

The bare estimator is the loop a PyTorch user writes: the encoder's ``loc, scale`` from the same
modules, ``z = loc + scale * eps``, ``logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] -
log K`` with ``torch.distributions``-free formulas and ``binary_cross_entropy_with_logits``; no
Pyro, no diagnostics. ``log_likelihood`` is timed with its PSIS diagnostics off (the same work)
and on (its default: k-hat and ESS of every datapoint).

``--full`` also times ``log_likelihood`` with K = 5000 on all 10,000 MNIST test digits (the
issue's target: 6 minutes on 2 cores) and reports the process's peak resident memory.

Run: ``PYROVAE_DATA=... python benchmarks/log_likelihood_speed.py [--threads 2] [--full]``;
``torchrun --standalone --nproc-per-node 2 benchmarks/log_likelihood_speed.py --threads 1
--full-only`` splits the K = 5000 run over two processes (``process_group=True``); ``--compile``
times ``log_likelihood(..., compile=True)`` beside the eager one (its compilation apart), or with
``--full-only`` the whole compiled run, its compilation included (``TORCHINDUCTOR_CACHE_DIR`` set to
an empty folder makes that a first run's compilation). ``--reference-every N`` (with
``--full-only``) times the bare estimator beside the run: after each tenth of the digits, on
every N-th digit of it; the result adds its projected full time and the ratio, part by part, so
that a drifting machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

import pyrovae
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal

D, H, L = 784, 400, 50
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def build() -> VAE:
    return VAE(
        StandardNormal(L),
        DiagonalNormal(MLP(D, (H,), H, activate_output=True), L),
        Bernoulli(MLP(L, (H, H), D)),
        num_data=60000,
    )


@torch.no_grad()
def bare_log_likelihood(vae: VAE, x: torch.Tensor, k: int, max_rows: int = 2048) -> torch.Tensor:
    """log p(x) per datapoint by importance sampling, written by hand with the same chunks."""
    points = max(1, max_rows // k)
    per_call = min(k, max_rows)
    decoder = vae.likelihood.decoder
    out = []
    for start in range(0, len(x), points):
        xb = x[start : start + points]
        q = vae.family(xb, torch.arange(len(xb), device=xb.device)).base_dist  # Normal(loc, scale), (B, L)
        loc, scale = q.loc, q.scale
        log_w = []
        for k0 in range(0, k, per_call):
            eps = torch.randn((min(per_call, k - k0), *loc.shape), dtype=loc.dtype, device=loc.device)
            z = loc + scale * eps
            log_px = -F.binary_cross_entropy_with_logits(
                decoder(z), xb.expand(z.shape[0], *xb.shape), reduction="none"
            ).sum(-1)
            log_pz = (-0.5 * z.square() - HALF_LOG_2PI).sum(-1)
            log_qz = (-0.5 * eps.square() - scale.log() - HALF_LOG_2PI).sum(-1)
            log_w.append(log_px + log_pz - log_qz)
        out.append(torch.logsumexp(torch.cat(log_w), 0) - math.log(k))
    return torch.cat(out)


def test_digits(data_root: str | None = None) -> tuple[torch.Tensor, str]:
    """The 10,000 binarized MNIST test digits (fixed binarization) and what they are; without
    the data, 10,000 random binary images of the same size (the cost does not depend on them)."""
    try:
        from pyrovae.data import load_dataset

        test = load_dataset("mnist", "test", root=data_root, binarize="dynamic")
        test = test.binarized(generator=torch.Generator().manual_seed(0))
        return test[torch.arange(len(test))][0], "MNIST test digits"
    except Exception as exc:  # noqa: BLE001 - no data: random binary images, same cost
        g = torch.Generator().manual_seed(0)
        return (torch.bernoulli(torch.full((10000, D), 0.13), generator=g),
                f"random binary images (no MNIST: {type(exc).__name__})")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--points", type=int, default=200, help="digits per timed call")
    p.add_argument("--num-samples", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also K=5000 on all 10,000 test digits")
    p.add_argument("--full-only", action="store_true",
                   help="only the K=5000 run on all test digits (under torchrun: split across "
                        "the processes with process_group=True)")
    p.add_argument("--compile", action="store_true",
                   help="also time log_likelihood(..., compile=True) (its compilation apart; "
                        "with --full-only: the K=5000 run compiled, compilation included)")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="with --full-only: log_likelihood(..., diagnostics=False) (no PSIS k-hat, ESS)")
    p.add_argument("--full-points", type=int, default=None,
                   help="with --full/--full-only: the first N test digits (default: all 10,000)")
    p.add_argument("--reference-every", type=int, default=0, metavar="N",
                   help="with --full-only: split the run into --segments parts and, after each, "
                        "time the bare estimator on every N-th digit of that part (a reference "
                        "measured beside the run, whose full time is projected x N)")
    p.add_argument("--segments", type=int, default=10,
                   help="with --reference-every: how many parts (default 10)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # k-hat warnings of an untrained model
    load_at_start = list(os.getloadavg())
    torch.manual_seed(0)
    vae = build().eval()
    x_all, data = test_digits(args.data_root)
    x = x_all[: args.points]
    x_all = x_all[: args.full_points]
    if args.full_only:
        return _full_only(vae, x_all, args)
    rows = []
    for k in args.num_samples:
        times = {"bare": [], "pyrovae (no diagnostics)": [], "pyrovae (default)": []}
        calls = {
            "pyrovae (no diagnostics)": lambda: pyrovae.log_likelihood(vae, x, k, diagnostics=False),
            "pyrovae (default)": lambda: pyrovae.log_likelihood(vae, x, k),
        }
        compile_seconds = None
        if args.compile:
            # compile once for this K's chunk shapes (a 2-digit call), outside the timings
            compile_seconds = timed(lambda: pyrovae.log_likelihood(vae, x[:2], k, compile=True))
            calls["compiled (no diagnostics)"] = lambda: pyrovae.log_likelihood(
                vae, x, k, diagnostics=False, compile=True)
            calls["compiled (default)"] = lambda: pyrovae.log_likelihood(vae, x, k, compile=True)
            times.update({name: [] for name in calls if name.startswith("compiled")})
        for _ in range(args.rounds):
            times["bare"].append(timed(lambda: bare_log_likelihood(vae, x, k)))
            for name, call in calls.items():
                times[name].append(timed(call))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append({
            "num_samples": k,
            "points": len(x),
            "seconds": med,
            "ratio_no_diagnostics": med["bare"] / med["pyrovae (no diagnostics)"],
            "ratio_default": med["bare"] / med["pyrovae (default)"],
        })
        if args.compile:
            rows[-1].update(
                compile_seconds=compile_seconds,
                ratio_compiled_no_diagnostics=med["bare"] / med["compiled (no diagnostics)"],
                ratio_compiled_default=med["bare"] / med["compiled (default)"],
            )
        print(json.dumps(rows[-1]), flush=True)
    # The two agree in distribution: same estimator, different draws.
    torch.manual_seed(1)
    bare = bare_log_likelihood(vae, x[:50], 1000)
    ours = pyrovae.log_likelihood(vae, x[:50], 1000, seed=1, diagnostics=False).values
    result: dict = {
        "benchmark": "log_likelihood_speed",
        "model": f"{D}-{H}-{H}-{L} MLP VAE (ReLU, Bernoulli)",
        "data": data,
        "rows": rows,
        "agreement_mean_difference_50_points_K1000": float((ours - bare).mean()),
        "torch": torch.__version__,
        "pyro": __import__("pyro").__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_at_start": load_at_start,
    }
    if args.full:
        t0 = time.perf_counter()
        ll = pyrovae.log_likelihood(vae, x_all, 5000, seed=0)
        result["full"] = {
            "num_samples": 5000,
            "points": len(x_all),
            "seconds": time.perf_counter() - t0,
            "mean": ll.mean,
            "stderr": ll.stderr,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        }
        print(json.dumps(result["full"]), flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _full_only(vae: VAE, x_all: torch.Tensor, args: argparse.Namespace) -> dict:
    """K = 5000 on every test digit, in this process or split over torchrun's processes.

    With ``--reference-every N`` the digits are scored in ``--segments`` consecutive parts (each
    seeded by its number), and after each part the bare estimator scores every N-th digit of it,
    split over the same processes: a reference timed beside the run, segment by segment, so
    that the machine's drift (+-20 % over minutes on a shared VM) falls on both alike. Its
    projected full time is its seconds x N; ``reference_ratio`` = that / pyrovae's seconds."""
    from pyrovae import distributed
    from pyrovae.importance import mean_stderr

    group = distributed.process_group(None)
    every = args.reference_every
    bounds = ([0, len(x_all)] if not every else
              torch.linspace(0, len(x_all), args.segments + 1).round().long().tolist())
    seconds, reference_seconds, values, segments = 0.0, 0.0, [], []
    for s, (b0, b1) in enumerate(zip(bounds[:-1], bounds[1:])):
        t0 = time.perf_counter()
        ll = pyrovae.log_likelihood(vae, x_all[b0:b1], 5000, seed=s if every else 0,
                                    process_group=group or False, compile=args.compile,
                                    diagnostics=args.diagnostics)
        ours = time.perf_counter() - t0
        seconds += ours
        values.append(ll.values)
        if every:
            xr = x_all[b0:b1:every]
            mine = xr[distributed.shard_indices(len(xr), group)]
            t0 = time.perf_counter()
            bare_log_likelihood(vae, mine, 5000)
            if group is not None:
                distributed.barrier(group)
            ref = time.perf_counter() - t0
            reference_seconds += ref
            segments.append({"digits": b1 - b0, "seconds": ours, "reference_digits": len(xr),
                             "reference_seconds": ref,
                             "ratio": ref * (b1 - b0) / len(xr) / ours})
    mean, stderr = mean_stderr(torch.cat(values))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    peaks = [peak]
    if group is not None:
        peaks = distributed.gather_objects(peak, group) or peaks
    result = {
        "num_samples": 5000, "points": len(x_all), "seconds": seconds,
        "mean": mean, "stderr": stderr,
        "compiled": args.compile, "diagnostics": args.diagnostics,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "processes": distributed.world_size(group),
        "threads_per_process": torch.get_num_threads(), "peak_rss_gb_per_process": peaks,
        "torch": torch.__version__, "load_average_at_end": list(os.getloadavg()),
    }
    if every:
        projected = reference_seconds * sum(sg["digits"] for sg in segments) / sum(
            sg["reference_digits"] for sg in segments)
        result.update(reference="bare estimator (hand-written loop, eager)",
                      reference_every=every, reference_seconds=reference_seconds,
                      reference_projected_seconds=projected,
                      reference_ratio=projected / seconds, segments=segments)
    if distributed.is_main(group):
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result

if __name__ == "__main__":
    main()

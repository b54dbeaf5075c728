"""What the Pyro model/guide form costs per training step, apart from the arithmetic.

The same two losses as ``train_throughput.py`` -- pyrovae's default loss evaluated without Pyro's
tracing (``pyrovae.fastpath.elbo_loss``, proven equal to ``Trace_ELBO`` at run time) and the hand-written
PyTorch VAE's loss -- on a tiny network (8-8-8-2, batch 4), where the arithmetic is negligible and
what is left is each call's fixed cost: Python, the dispatcher, building ``torch.distributions``
objects, autograd nodes. Forward, and forward + backward, median microseconds of interleaved
rounds; with ``--compile``, pyrovae's loss through ``torch.compile`` too. Beside them, the full-size
step (784-400-400-50, batch 128, fused Adam) of the hand-written loop, so the fixed-cost gap can be
read as a share of a real step.

Run: ``python benchmarks/loss_overhead.py [--threads 2] [--compile] [--out FILE]``
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import BATCH, D, RawVAE, _HandLoop, _pyrovae_vae  # noqa: E402

from pyrovae.fastpath import elbo_loss  # noqa: E402


def _microseconds(fn, calls: int, rounds: int) -> list[float]:
    for _ in range(max(10, calls // 10)):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _with_backward(loss_fn):
    def step() -> None:
        loss_fn().backward()

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also the compiled pyrovae loss")
    p.add_argument("--step-blocks", type=int, default=3,
                   help="timed 20-step epochs of the full-size hand-written loop")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, h, latent, batch = 8, 8, 2, 4
    vae = _pyrovae_vae(100, d, h, latent)
    raw = RawVAE(d, h, latent)
    x = torch.bernoulli(torch.rand(batch, d))
    idx = torch.arange(batch)
    losses = {
        "pyrovae (fastpath.elbo_loss)": lambda: elbo_loss(vae, x, idx),
        "hand-written": lambda: raw.loss(x, 100),
    }
    if args.compile:
        from pyrovae._compile import compile_direct

        compiled = compile_direct(functools.partial(elbo_loss, vae), "the loss", "")
        losses["pyrovae, compiled"] = lambda: compiled(x, idx)
    times: dict[str, dict[str, list[float]]] = {n: {"forward": [], "forward+backward": []} for n in losses}
    with pyro.validation_enabled(False):
        for _ in range(args.rounds):  # interleaved: each round times every loss once
            for name, fn in losses.items():
                times[name]["forward"] += _microseconds(fn, args.calls, 1)
                times[name]["forward+backward"] += _microseconds(_with_backward(fn), args.calls, 1)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    # the full-size hand-written step, for scale (one 100-step epoch after a warm-up epoch)
    data = torch.bernoulli(torch.rand(20 * BATCH, D) * 0.3)
    loop = _HandLoop(data, fused=True)
    loop.block_seconds()
    step_us = statistics.median(loop.block_seconds() for _ in range(args.step_blocks)) / 20 * 1e6
    gap = med["pyrovae (fastpath.elbo_loss)"]["forward+backward"] - med["hand-written"]["forward+backward"]
    result = {
        "benchmark": "loss_overhead",
        "tiny_model": f"{d}-{h}-{h}-{latent}, batch {batch}",
        "microseconds_median": med,
        "fixed_cost_gap_us": gap,
        "full_size_hand_written_step_us": step_us,
        "gap_share_of_full_size_step": gap / step_us,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

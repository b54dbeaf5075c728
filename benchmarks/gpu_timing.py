"""Training and estimator speed on an accelerator, each against a hand-written loop in the same run.

The training-core issue asks for ``fit`` to be timed on a GPU when one is lent. This script is
that measurement, prepared so that a session with a GPU runs it in one call:

- **training**: the 784-400-400-50 VAE of ``train_throughput.py`` at batch 128 (and 1024), the
  hand-written loop with the fused Adam against ``pyrovae.fit`` (data on the host, as ``fit``
  takes it, each minibatch copied through pinned memory; and the hand-written loop is given the
  data already on the device, its best case), steps per second and their ratio;
- **estimation**: ``pyrovae.log_likelihood`` with K = 5000 on ``--points`` digits against the
  bare estimator of ``log_likelihood_speed.py`` on the same device, seconds and their ratio, and
  the extrapolated time for all 10,000 MNIST test digits;
- with ``--compile``, ``fit(compile=True)`` and ``log_likelihood(compile=True)`` beside them
  (compiled before the timings; on a GPU inductor writes Triton kernels).

Every timing synchronizes the device before reading the clock. On a CPU (``--device cpu``) it
runs the same code paths (a smoke test runs it with ``--quick``).

    python benchmarks/gpu_timing.py --device cuda --compile --out benchmarks/results/gpu_timing.json
    python benchmarks/gpu_timing.py --device cpu --quick          # the code paths, in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyrovae  # noqa: E402
from log_likelihood_speed import bare_log_likelihood  # noqa: E402
from train_throughput import RawVAE, _pyrovae_vae  # noqa: E402

D = 784


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_steps_per_second(data: torch.Tensor, steps: int, batch: int, device: torch.device) -> float:
    """The hand-written loop with the fused Adam, its data already on the device."""
    torch.manual_seed(0)
    model = RawVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    data = data.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = len(data)
    for warm in (True, False):
        _sync(device)
        start = time.perf_counter()
        for _ in range(10 if warm else steps):
            x = data[torch.randint(0, n, (batch,), generator=gen, device=device)]
            loss = model.loss(x, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
    return steps / (time.perf_counter() - start)


def fit_steps_per_second(data: torch.Tensor, steps: int, batch: int, device: torch.device,
                         compile: bool = False) -> float:
    """``pyrovae.fit`` on host data (minibatches copied to the device through pinned memory)."""
    torch.manual_seed(0)
    vae = _pyrovae_vae(len(data))
    epochs = max(2, -(-steps * batch // len(data)))
    history = pyrovae.fit(vae, data, num_epochs=epochs, batch_size=batch, device=device,
                          progress=False, compile=compile)
    # the first epoch holds the warm-up (allocations, kernel selection): skip it
    steps_per_epoch = -(-len(data) // batch)
    return steps_per_epoch * (epochs - 1) / sum(history.epoch_seconds[1:])


def estimator_seconds(x: torch.Tensor, k: int, device: torch.device, rounds: int,
                      compile: bool = False) -> dict:
    """Median seconds of ``log_likelihood`` (and, with ``compile``, of ``compile=True``, its
    compilation done before the timings) and of the bare estimator, taking turns."""
    torch.manual_seed(0)
    vae = _pyrovae_vae(60000).to(device).eval()
    x = x.to(device)

    def ours(compiled: bool) -> None:
        pyrovae.log_likelihood(vae, x, num_samples=k, diagnostics=False, progress=False, seed=0,
                               compile=compiled)

    calls = {"pyrovae": lambda: ours(False), "bare": lambda: bare_log_likelihood(vae, x, k)}
    if compile:
        calls["pyrovae_compiled"] = lambda: ours(True)
        ours(True)  # compile for these shapes
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    o, b = med["pyrovae"], med["bare"]
    out = {"num_samples": k, "points": len(x), "pyrovae_seconds": o, "bare_seconds": b,
           "ratio": b / o, "extrapolated_seconds_10000_digits": o / len(x) * 10000}
    if compile:
        c = med["pyrovae_compiled"]
        out.update(pyrovae_compiled_seconds=c, ratio_compiled=b / c,
                   extrapolated_seconds_10000_digits_compiled=c / len(x) * 10000)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--points", type=int, default=200, help="digits for the estimator timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the code paths")
    p.add_argument("--compile", action="store_true",
                   help="also fit(compile=True) and log_likelihood(compile=True)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_timing: --device cuda but torch sees no CUDA device")
    steps, points, rounds, k = (args.steps, args.points, args.rounds, 5000)
    if args.quick:
        steps, points, rounds, k = 6, 2, 1, 50
    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(4096 if not args.quick else 256, D) * 0.3)
    training = []
    for batch in (128, 1024) if not args.quick else (32,):
        raw = statistics.median(raw_steps_per_second(data, steps, batch, device) for _ in range(rounds))
        ours = statistics.median(fit_steps_per_second(data, steps, batch, device) for _ in range(rounds))
        training.append({"batch_size": batch, "raw_fused_adam_steps_per_s": raw,
                         "fit_steps_per_s": ours, "ratio": ours / raw})
        if args.compile:
            compiled = statistics.median(
                fit_steps_per_second(data, steps, batch, device, compile=True) for _ in range(rounds)
            )
            training[-1].update(fit_compiled_steps_per_s=compiled, ratio_compiled=compiled / raw)
        print(json.dumps(training[-1]), flush=True)
    estimation = estimator_seconds(data[:points], k, device, rounds, compile=args.compile)
    print(json.dumps(estimation), flush=True)
    result = {
        "benchmark": "gpu_timing", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "training": training, "estimation": estimation, "quick": args.quick,
        "compile": args.compile,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

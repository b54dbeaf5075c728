"""Peak memory (and time per step) of `pyrovae train` for the memory-hungry combinations.

Each case runs `pyrovae train` in its own process and reads that process's peak resident memory
from the kernel (`os.wait4`'s `ru_maxrss`), beside the reference — the default model, measured in
the same run — so the ratio says what a part costs on top of PyTorch, Pyro and the data:

- `vamp-iaf`: VampPrior (500 pseudo-inputs) with an IAF family at the CLI's default sizes
  (784-400-400, latent 50, batch 100). Its prior evaluates q(z|u_k) for every pair of a latent
  row and a pseudo-input, which for a flow means inverting it 100 x 500 times per step (50
  sequential passes x 2 steps each); before the byte-bounded chunks it was killed at 24 GB.
  Target: under 3 GB.
- `categorical256`: a 256-way categorical likelihood (784 x 256 logits per latent row), trained
  and scored by importance sampling. Target: under 2 GB.

    python benchmarks/memory.py            # writes benchmarks/results/memory.{json,md}
    python benchmarks/memory.py --quick    # fewer steps and evaluation points (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: name -> (extra `pyrovae train` arguments, target peak in GB or None)
CASES: dict[str, tuple[list[str], float | None]] = {
    "reference": ([], None),
    "vamp-iaf": (["--prior", "vamp", "--family", "iaf"], 3.0),
    "categorical256": (["--likelihood", "categorical256", "--binarize", "none"], 2.0),
}


def run_case(name: str, extra: list[str], num_train: int, eval_points: int, num_samples: int,
             threads: int, workdir: Path) -> dict:
    out = workdir / name
    argv = ["train", *extra, "--num-train", str(num_train), "--epochs", "1",
            "--validation-fraction", "0", "--eval-points", str(eval_points), "--check-points", "0",
            "--num-samples", str(num_samples), "--no-progress", "--out", str(out)]
    code = (f"import sys, torch; torch.set_num_threads({threads}); "
            "from pyrovae.cli import main; sys.exit(main(sys.argv[1:]))")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{output}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    steps = history["num_steps"]
    return {
        "argv": argv,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # Linux reports kB
        "wall_seconds": wall,
        "train_steps": steps,
        "seconds_per_step": sum(history["epoch_seconds"]) / steps,
        "evaluation_seconds": metrics["evaluation_seconds"],
        "eval_points": eval_points,
        "num_samples": num_samples,
        "test_log_likelihood": metrics["test_log_likelihood"]["mean"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, 10 evaluation points")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                        help="cases to run (the reference always runs; other cases' earlier "
                        "results in the output file are kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    previous = args.out / "memory.json"
    if previous.is_file() and not args.quick:
        results = json.loads(previous.read_text())["results"]
    cases = ["reference", *[c for c in args.cases if c != "reference"]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            extra, target = CASES[name]
            # (num_train, eval_points, K): the VampPrior + IAF step is slow (see the docstring):
            # two steps and 5 points x K = 20 (as many latent rows as one step) measure it; a
            # categorical row decodes 784 x 256 logits, so 20 points x K = 100 (2,000 rows).
            sizes = {"vamp-iaf": (200, 5, 20), "categorical256": (1000, 20, 100)}
            num_train, points, k = (200, 5, 20) if args.quick else sizes.get(name, (1000, 100, 1000))
            r = run_case(name, extra, num_train, points, k, args.threads, Path(tmp))
            r["target_gb"] = target
            results[name] = r
            print(f"{name:15s} peak {r['peak_rss_gb']:.2f} GB  {r['seconds_per_step']:.2f} s/step "
                  f"(target {target} GB)", flush=True)
    ref = results.get("reference")
    for r in results.values():
        r["peak_ratio_to_reference"] = r["peak_rss_gb"] / ref["peak_rss_gb"] if ref else None
        r["step_time_ratio_to_reference"] = (
            r["seconds_per_step"] / ref["seconds_per_step"] if ref else None)
    report = {
        "results": results,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
    }
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = ["# Peak memory of `pyrovae train` (benchmarks/memory.py)", "",
                 f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
                 f"load average at the end {os.getloadavg()[0]:.1f} (a shared machine: the "
                 "seconds are inflated, the bytes are not).", "",
                 "| case | peak RSS | × reference | target | s per step | × reference | "
                 "steps | evaluation (points × K) |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            ok = "" if r["target_gb"] is None else (
                f"< {r['target_gb']:.0f} GB {'met' if r['peak_rss_gb'] < r['target_gb'] else 'MISSED'}")
            lines.append(
                f"| {name} | {r['peak_rss_gb']:.2f} GB | {r['peak_ratio_to_reference']:.2f} | {ok} | "
                f"{r['seconds_per_step']:.2f} | {r['step_time_ratio_to_reference']:.1f} | "
                f"{r['train_steps']} | {r['eval_points']} × {r['num_samples']} |")
        (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()

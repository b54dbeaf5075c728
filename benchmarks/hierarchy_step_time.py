"""What a second stochastic layer costs per training step, beyond its arithmetic (issue 24).

Two models trained by ``pyrovae.fit`` with the default loss, side by side in one process, taking
turns epoch by epoch (the cores are shared, so both see the same disturbances):

- **two layers**: Burda et al.'s 784-100-100-(z1: 100)-50-50-(z2: 50) tanh with the mirrored
  decoder (``pyrovae.Hierarchical`` prior, ``pyrovae.BottomUp`` family, the decoder reading z1;
  benchmarks/mnist_nll.py's ``burda-2l``);
- **one layer, same arithmetic**: 784-H-H-50 tanh with a diagonal Gaussian family and a
  standard normal prior, H chosen so that its linear layers hold the same number of
  multiply-adds per datapoint (each ``Linear(a, b)`` costs ``a * b``) as the two-layer model's.

Each round trains one timed epoch of ``--steps`` steps of each model (data: random binary
784-pixel images; the time does not depend on the values). Reported: seconds per step of each
model's median epoch, and the median over rounds of the paired ratio (two layers / one layer);
the target is at most 1.2.

Run: ``OMP_NUM_THREADS=1 python benchmarks/hierarchy_step_time.py [--batch-size 100]
[--rounds 8] [--steps 200]``; results in ``benchmarks/results/hierarchy_step_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the pyrovae of this tree, not whichever is installed
    sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"


def multiply_adds(module: torch.nn.Module) -> int:
    """Multiply-adds per datapoint of the module's linear layers (``in * out`` each)."""
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, torch.nn.Linear))


def two_layer_config(num_features: int = 784):
    from pyrovae.build import VAEConfig

    return VAEConfig(num_features, latent_dim=150, hidden_dims=(100, 100), activation="tanh",
                     prior="hierarchical", family="bottom_up",
                     options={"layers": [100, 50], "layer_hidden_dims": [50, 50]})


def one_layer_config(hidden: int, num_features: int = 784):
    from pyrovae.build import VAEConfig

    return VAEConfig(num_features, latent_dim=50, hidden_dims=(hidden, hidden), activation="tanh")


def matching_hidden(target: int, num_features: int = 784) -> int:
    """The H whose 784-H-H-50 model's multiply-adds are nearest ``target``."""
    from pyrovae.build import build_vae

    return min(range(20, 400), key=lambda h: abs(
        multiply_adds(build_vae(one_layer_config(h, num_features), 1)) - target))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=200, help="steps per timed epoch")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "hierarchy_step_time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pyrovae import fit
    from pyrovae.build import build_vae

    n = args.batch_size * args.steps
    data = (torch.rand(n, 784, generator=torch.Generator().manual_seed(0)) < 0.13).float()
    torch.manual_seed(0)
    two = build_vae(two_layer_config(), n)
    hidden = matching_hidden(multiply_adds(two))
    torch.manual_seed(0)
    one = build_vae(one_layer_config(hidden), n)
    models = {"two_layers": two, "one_layer": one}
    macs = {k: multiply_adds(v) for k, v in models.items()}
    print(f"multiply-adds per datapoint: two layers {macs['two_layers']:,}, one layer "
          f"(784-{hidden}-{hidden}-50) {macs['one_layer']:,}", flush=True)
    seconds: dict[str, list[float]] = {k: [] for k in models}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, vae in models.items():  # untimed: the fast path's proof, allocator warm-up
            fit(vae, data, num_epochs=1, batch_size=args.batch_size, progress=False, seed=0)
        for r in range(args.rounds):
            for name, vae in (models.items() if r % 2 == 0 else reversed(models.items())):
                h = fit(vae, data, num_epochs=1, batch_size=args.batch_size, progress=False,
                        seed=r + 1)
                seconds[name].append(h.epoch_seconds[-1] / args.steps)
            print(f"round {r + 1}: two layers {1e3 * seconds['two_layers'][-1]:.2f} ms/step, "
                  f"one layer {1e3 * seconds['one_layer'][-1]:.2f} ms/step, ratio "
                  f"{seconds['two_layers'][-1] / seconds['one_layer'][-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(seconds["two_layers"], seconds["one_layer"])]
    ratio = statistics.median(ratios)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} thread(s), "
                  f"{os.cpu_count()} cores shared)",
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
        "batch_size": args.batch_size, "steps_per_epoch": args.steps, "rounds": args.rounds,
        "models": {
            "two_layers": {"architecture": "784-100-100-(z1: 100)-50-50-(z2: 50) tanh, "
                                           "Hierarchical prior, BottomUp family, decoder reads z1",
                           "multiply_adds": macs["two_layers"]},
            "one_layer": {"architecture": f"784-{hidden}-{hidden}-50 tanh, StandardNormal prior, "
                                          "DiagonalNormal family",
                          "multiply_adds": macs["one_layer"]},
        },
        "seconds_per_step": {k: v for k, v in seconds.items()},
        "median_seconds_per_step": {k: statistics.median(v) for k, v in seconds.items()},
        "paired_ratios": ratios,
        "median_ratio": ratio,
        "target": 1.2,
        "within_target": ratio <= 1.2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    med = result["median_seconds_per_step"]
    md = [
        "# A second stochastic layer: time per training step (benchmarks/hierarchy_step_time.py)",
        "",
        f"{result['date']}, {result['device']}, load average {result['load_average']:.1f}, "
        f"torch {result['torch']}; `pyrovae.fit` with the default loss, minibatch "
        f"{args.batch_size}, {args.rounds} rounds of one {args.steps}-step epoch per model, "
        "taking turns.",
        "",
        "| model | multiply-adds / datapoint | ms / step (median epoch) |",
        "|---|---|---|",
        f"| two layers: {result['models']['two_layers']['architecture']} "
        f"| {macs['two_layers']:,} | {1e3 * med['two_layers']:.2f} |",
        f"| one layer, same arithmetic: {result['models']['one_layer']['architecture']} "
        f"| {macs['one_layer']:,} | {1e3 * med['one_layer']:.2f} |",
        "",
        f"Median paired ratio (two layers / one layer): **{ratio:.3f}** (rounds: "
        + ", ".join(f"{x:.3f}" for x in ratios) + f"); target <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'not met'}.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print(f"median ratio {ratio:.3f} (target <= 1.2); wrote {args.out.with_suffix('.json')}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

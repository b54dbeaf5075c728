"""What :func:`pyrovae.fit` adds to the engine it runs, in its two modes (project issue 22).

``fit`` trains the VAE's public Pyro program. Where :mod:`pyrovae.fastpath` proves its direct loss
equal to Pyro's on that program (the VAE's own program), the direct loss runs; elsewhere (a user's
program with other sites) Pyro's ``Trace_ELBO`` runs. Each mode is timed beside its reference, in
one process, epoch for epoch (a callback runs one epoch of the reference after each of ``fit``'s
epochs, on the same minibatch size and data), so that a busy machine slows both alike:

- **direct** -- ``fit`` on the 784-400-400-50 MLP VAE (ReLU, Bernoulli, diagonal Gaussian, standard
  normal; batch 128), its run-time proof included, against the hand-written ``torch`` loop of the
  same model with the same fused Adam. Target: >= 1.0x.
- **pyro** -- ``fit`` on the same VAE with a ``pyro.factor`` per datapoint in its model (so the
  direct loss does not apply), against a hand-written loop of
  ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, idx)`` on the same program with the
  same fused Adam. Target: >= 0.98x (the library adds nothing to Pyro's engine).

Reported: per mode, the median over epochs of the paired ratio (reference seconds / ``fit``
seconds; > 1 means ``fit`` is faster) with a bootstrap 95 % interval, and the steps per second.

Run: ``python benchmarks/fit_overhead.py [--threads 2] [--epochs 12] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import pyrovae  # noqa: E402
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal  # noqa: E402
from pyrovae.training import _adam  # noqa: E402
from train_throughput import RawVAE  # noqa: E402

D, H, L, BATCH = 784, 400, 50, 128


class Penalized(VAE):
    """The VAE's program plus a per-datapoint ``pyro.factor``: a user's program."""

    def model(self, x, idx=None, *, kl_weight=1.0):
        pyro.module(self._param_name, self)
        with self._plate(x, idx):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)
            pyro.factor("penalty", -0.01 * z.square().sum(-1))
        return z


def make_vae(cls: type, num_data: int, d: int = D, h: int = H, latent: int = L) -> VAE:
    return cls(StandardNormal(latent), DiagonalNormal(MLP(d, (h,), h, activate_output=True), latent),
               Bernoulli(MLP(latent, (h, h), d)), num_data=num_data)


class Reference:
    """One epoch at a time of a hand-written loop: ``loss_fn(x, idx)``, backward, fused Adam."""

    def __init__(self, loss_fn, params, data: torch.Tensor, seed: int = 1) -> None:
        self.loss_fn, self.opt, self.data = loss_fn, _adam(params, 1e-3), data
        self.gen = torch.Generator().manual_seed(seed)
        self.seconds: list[float] = []

    def epoch(self) -> None:
        order = torch.randperm(len(self.data), generator=self.gen).split(BATCH)
        with pyro.validation_enabled(False):
            start = time.perf_counter()
            for idx in order:
                loss = self.loss_fn(self.data[idx], idx)
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            self.seconds.append(time.perf_counter() - start)

    def on_epoch_end(self, state) -> None:  # a fit callback: one reference epoch per fit epoch
        self.epoch()


def paired(fit_seconds: list[float], ref_seconds: list[float], seed: int = 0) -> dict:
    """Median paired ratio reference / fit (> 1: fit is faster) and a bootstrap 95 % interval."""
    ratios = [r / f for f, r in zip(fit_seconds, ref_seconds)]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"median_ratio": statistics.median(ratios), "ci95": [boot[49], boot[1949]],
            "ratios": ratios}


def measure(mode: str, data: torch.Tensor, epochs: int) -> dict:
    """``fit`` against its reference for ``mode`` ("direct" or "pyro"), epoch for epoch; the
    first epoch of each (warm-up, and fit's proof) is dropped from the ratio but reported."""
    n, d = data.shape
    torch.manual_seed(0)
    if mode == "direct":
        vae, raw = make_vae(VAE, n, d), RawVAE(d)
        ref = Reference(lambda x, idx: raw.loss(x, n), list(raw.parameters()), data)
    else:
        vae, other = make_vae(Penalized, n, d), make_vae(Penalized, n, d)
        elbo = Trace_ELBO()
        ref = Reference(lambda x, idx: elbo.differentiable_loss(other.model, other.guide, x, idx),
                        list(other.parameters()), data)
    pyro.set_rng_seed(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FastPathWarning of the "pyro" mode is expected
        history = pyrovae.fit(vae, data, num_epochs=epochs + 1, batch_size=BATCH, progress=False,
                              callbacks=[ref])
    fit_s, ref_s = history.epoch_seconds, ref.seconds
    steps = -(-n // BATCH)
    out = paired(fit_s[1:], ref_s[1:])
    out.update(
        first_epoch_seconds={"fit": fit_s[0], "reference": ref_s[0]},
        fit_steps_per_s=steps / statistics.median(fit_s[1:]),
        reference_steps_per_s=steps / statistics.median(ref_s[1:]),
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=12, help="timed epochs per mode (+1 warm-up)")
    p.add_argument("--steps", type=int, default=40, help="minibatches per epoch")
    p.add_argument("--features", type=int, default=D)
    p.add_argument("--out", type=Path, default=HERE / "results" / "fit_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.rand(args.steps * BATCH, args.features, generator=g) * 0.5)
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"pyro {pyro.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/fit_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "epochs": args.epochs, "steps_per_epoch": args.steps, "batch": BATCH,
        "targets": {"direct": 1.0, "pyro": 0.98},
    }
    for mode in ("direct", "pyro"):
        result[mode] = measure(mode, data, args.epochs)
        print(f"{mode}: fit / reference {result[mode]['median_ratio']:.3f} "
              f"(95% {result[mode]['ci95'][0]:.3f}-{result[mode]['ci95'][1]:.3f}), "
              f"fit {result[mode]['fit_steps_per_s']:.1f} steps/s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

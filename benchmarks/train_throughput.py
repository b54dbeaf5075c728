"""Training throughput of :func:`pyrovae.fit` against a hand-written PyTorch VAE.

Both train the same 784-400-400-50 MLP VAE (ReLU, Bernoulli likelihood, diagonal Gaussian
family, standard normal prior) with Adam at batch 128 on the same binary data, in the same process,
taking turns over several rounds, in timed epochs of 100 steps; the steps per second of each loop's
fastest epoch (the one least disturbed by other jobs: this machine's cores are shared) and of its
median epoch are reported, and their ratios.

The reference is the loop a PyTorch user writes by hand: encoder -> reparameterized sample ->
decoder -> BCE + analytic-free Monte Carlo KL, ``torch.optim.Adam`` with its defaults. A second
reference uses ``Adam(fused=True)``, as ``fit`` does where torch has it, so the ratio against it
isolates what the Pyro form costs. ``fit`` evaluates the default ``Trace_ELBO`` without Pyro's
tracing (``pyrovae.fastpath.elbo_loss``, proven equal to Pyro's loss at the first step); ``fit`` with a
``Trace_ELBO`` subclass runs Pyro's tracing, and is measured too. A breakdown times the phases of
one step (loss forward, backward, optimizer) for each, to say where the remaining time goes.

The headline ratios come from ``fit``'s epochs alternating with the hand-written loops' epochs
in one run (a callback runs one epoch of each hand-written loop after each of ``fit``'s): the
median over blocks of the paired ratio, with a bootstrap 95 % interval. The same is measured for
``fit(compile=True)`` (``torch.compile``'d loss; compilation falls in an untimed first epoch).

Run: ``python benchmarks/train_throughput.py [--threads 2] [--rounds 6] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

import pyrovae
from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal
from pyrovae.fastpath import elbo_loss

D, H, L, BATCH = 784, 400, 50, 128


class RawVAE(nn.Module):
    """A textbook hand-written VAE of the same architecture as the pyrovae one."""

    def __init__(self, d: int = D, h: int = H, latent: int = L) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.loc = nn.Linear(h, latent)
        self.scale = nn.Linear(h, latent)
        self.dec = nn.Sequential(
            nn.Linear(latent, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
        )

    def loss(self, x: torch.Tensor, num_data: int) -> torch.Tensor:
        h = self.enc(x)
        loc, scale = self.loc(h), F.softplus(self.scale(h)) + 1e-5
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_px = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - scale.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)
        return -(log_px + log_pz - log_qz).sum() * (num_data / x.shape[0])


def raw_block_seconds(data: torch.Tensor, blocks: int, fused: bool = False) -> list[float]:
    """Seconds of each of ``blocks`` epochs of the hand-written loop (an epoch = one block of
    ``len(data) / BATCH`` steps), after one untimed warm-up epoch."""
    loop = _HandLoop(data, fused)
    return [loop.block_seconds() for _ in range(blocks + 1)][1:]


class TracedELBO(Trace_ELBO):
    """Pyro's ``Trace_ELBO`` under another name: ``fit`` runs a subclass through Pyro's tracing
    (only ``Trace_ELBO`` itself gets the direct evaluation, ``pyrovae.fastpath.elbo_loss``)."""


def pyrovae_block_seconds(data: torch.Tensor, blocks: int, traced: bool = False) -> list[float]:
    """Seconds of each of ``blocks`` epochs of :func:`pyrovae.fit` (its own per-epoch clock),
    after one untimed warm-up epoch."""
    vae = _pyrovae_vae(len(data))
    loss = TracedELBO() if traced else None
    history = pyrovae.fit(vae, data, loss=loss, num_epochs=blocks + 1, batch_size=BATCH,
                          progress=False)
    return history.epoch_seconds[1:]


def _pyrovae_vae(num_data: int, d: int = D, h: int = H, latent: int = L) -> VAE:
    return VAE(
        StandardNormal(latent),
        DiagonalNormal(MLP(d, (h,), h, activate_output=True), latent),
        Bernoulli(MLP(latent, (h, h), d)),
        num_data=num_data,
    )


def breakdown(data: torch.Tensor, steps: int) -> dict:
    """Milliseconds per step in each phase, for the raw loop and for fit's step function.

    ``train_step`` is timed whole (loss, backward, the finiteness guard, the fused Adam step
    skipped on the device if needed, the running sums) and, separately, the plain Pyro loss,
    backward and optimizer phases that it is made of; the rest of ``fit``'s time per step is
    its loop (minibatch gather, the host's read of the step flags, progress bookkeeping).
    """
    import pyro

    from pyrovae.training import TrainState, _adam, objective, train_step

    def timed(loss_fn, opt) -> dict:
        phases = {"loss": 0.0, "backward": 0.0, "optimizer": 0.0}
        gen = torch.Generator().manual_seed(1)
        for i in range(steps + 10):
            idx = torch.randint(0, len(data), (BATCH,), generator=gen)
            x = data[idx]
            t0 = time.perf_counter()
            loss = loss_fn(x, idx)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i >= 10:  # warm-up
                phases["loss"] += t1 - t0
                phases["backward"] += t2 - t1
                phases["optimizer"] += t3 - t2
        return {k: 1000 * v / steps for k, v in phases.items()}

    torch.manual_seed(0)
    raw = RawVAE()
    out = {"raw (default Adam)": timed(lambda x, idx: raw.loss(x, len(data)),
                                         torch.optim.Adam(raw.parameters(), lr=1e-3))}
    torch.manual_seed(0)
    raw = RawVAE()
    out["raw (fused Adam)"] = timed(lambda x, idx: raw.loss(x, len(data)),
                                    torch.optim.Adam(raw.parameters(), lr=1e-3, fused=True))
    torch.manual_seed(0)
    vae = _pyrovae_vae(len(data))
    obj = objective(vae, Trace_ELBO())  # the unregistered program, as fit uses for Trace_ELBO
    with pyro.validation_enabled(False):
        out["pyrovae (Pyro loss, fused Adam)"] = timed(
            lambda x, idx: obj.loss.differentiable_loss(obj.model, obj.guide, x, idx),
            _adam(list(vae.parameters()), 1e-3),
        )
        out["pyrovae (untraced Trace_ELBO, fused Adam)"] = timed(
            lambda x, idx: elbo_loss(vae, x, idx), _adam(list(vae.parameters()), 1e-3),
        )
        state = TrainState(vae, _adam(list(vae.parameters()), 1e-3), seed=0)
        gen = torch.Generator().manual_seed(1)
        total = 0.0
        for i in range(steps + 10):
            idx = torch.randint(0, len(data), (BATCH,), generator=gen)
            x = data[idx]
            t0 = time.perf_counter()
            train_step(state, x, idx, obj)
            state.unreported.clear()
            if i >= 10:
                total += time.perf_counter() - t0
        out["pyrovae train_step (whole step)"] = {"step": 1000 * total / steps}
    return out
class _HandLoop:
    """The hand-written loop, one epoch (block) per call, its model and optimizer kept between
    calls, so that its blocks can take turns with ``fit``'s epochs."""

    def __init__(self, data: torch.Tensor, fused: bool) -> None:
        torch.manual_seed(0)
        self.data, self.model = data, RawVAE()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=fused or None)
        self.gen = torch.Generator().manual_seed(0)

    def block_seconds(self) -> float:
        n, start = len(self.data), time.perf_counter()
        perm = torch.randperm(n, generator=self.gen)
        for i in range(0, n, BATCH):
            loss = self.model.loss(self.data[perm[i : i + BATCH]], n)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - start


def interleaved(data: torch.Tensor, blocks: int, compile: bool = False) -> dict[str, list[float]]:
    """Block seconds of ``fit`` and of both hand-written loops, strictly alternating: after each
    of ``fit``'s epochs (timed by ``fit`` itself, before its epoch-end hooks run), a hook runs one
    epoch of each hand-written loop. Neighbouring blocks see nearly the same machine, so the ratio
    of each ``fit`` block to the hand-written blocks beside it is paired."""
    loops = {"hand-written, fused Adam": _HandLoop(data, fused=True),
             "hand-written, default Adam": _HandLoop(data, fused=False)}
    out: dict[str, list[float]] = {name: [] for name in loops}

    class Turns:
        def on_epoch_end(self, state) -> None:
            for name, loop in loops.items():
                out[name].append(loop.block_seconds())

    vae = _pyrovae_vae(len(data))
    history = pyrovae.fit(vae, data, num_epochs=blocks + 1, batch_size=BATCH, progress=False,
                          callbacks=[Turns()], compile=compile)
    out = {name: ts[1:] for name, ts in out.items()}  # the first block of each: warm-up
    out["fit"] = history.epoch_seconds[1:]
    return out


def _paired(fit_s: list[float], ref_s: list[float]) -> dict:
    """Median over blocks of (reference seconds / fit seconds), i.e. fit's speed relative to the
    reference, with a bootstrap 95 % interval of that median (2000 resamples, fixed seed)."""
    ratios = [r / f for f, r in zip(fit_s, ref_s)]
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor(ratios)
    draws = t[torch.randint(0, len(t), (2000, len(t)), generator=gen)].median(dim=1).values
    return {"median": statistics.median(ratios),
            "ci95": [float(draws.quantile(0.025)), float(draws.quantile(0.975))],
            "blocks": len(ratios)}


def _rates(block_seconds: list[float], block: int) -> dict:
    """Steps per second of the fastest block and of the median block."""
    return {"best": block / min(block_seconds), "median": block / statistics.median(block_seconds)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=100, help="steps per timed block (one epoch)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per loop per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=60,
                        help="alternating blocks of fit and the hand-written loops")
    parser.add_argument("--breakdown-steps", type=int, default=200)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="skip fit(compile=True) (torch.compile needs a C++ compiler on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_at_start = list(os.getloadavg())  # the machine is shared: note how busy it was
    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(args.block * BATCH, D) * 0.3)  # one epoch = one block
    raw_block_seconds(data, 1)  # warm-up
    loops = {
        "hand-written, default Adam": lambda: raw_block_seconds(data, args.blocks),
        "hand-written, fused Adam": lambda: raw_block_seconds(data, args.blocks, fused=True),
        "fit": lambda: pyrovae_block_seconds(data, args.blocks),
        "fit, traced Trace_ELBO subclass": lambda: pyrovae_block_seconds(data, args.blocks, traced=True),
    }
    seconds: dict[str, list[list[float]]] = {name: [] for name in loops}
    for _ in range(args.rounds):  # the loops take turns, so drifts of the machine hit all alike
        for name, loop in loops.items():
            seconds[name].append(loop())
    flat = {name: [t for r in rounds for t in r] for name, rounds in seconds.items()}
    rates = {name: _rates(ts, args.block) for name, ts in flat.items()}
    fit_, fused, plain = rates["fit"], rates["hand-written, fused Adam"], rates["hand-written, default Adam"]
    paired = [
        statistics.median(f) ** -1 / statistics.median(r) ** -1
        for f, r in zip(seconds["fit"], seconds["hand-written, fused Adam"])
    ]
    turns = interleaved(data, args.pairs)
    # fit(compile=True): torch.compile'd loss; its compilation falls in the untimed first epoch.
    turns_compiled = interleaved(data, args.pairs, compile=True) if args.compiled else None
    phases = breakdown(data, args.breakdown_steps)
    phases["pyrovae fit, rest of the loop"] = {
        "step": 1000 / fit_["best"] - phases["pyrovae train_step (whole step)"]["step"]
    }
    result = {
        "benchmark": "train_throughput",
        "architecture": f"{D}-{H}-{H}-{L} MLP VAE, batch {BATCH}",
        "protocol": (
            f"{args.rounds} rounds; in each, every loop runs one untimed epoch and then "
            f"{args.blocks} timed epochs of {args.block} steps; 'best' = the fastest epoch of "
            "each loop over all rounds (the least disturbed by other jobs on the machine), "
            "'median' = its median epoch"
        ),
        # The headline: fit's epochs alternating with the hand-written loops' (paired blocks).
        "paired_ratio_vs_fused_adam_reference": _paired(turns["fit"], turns["hand-written, fused Adam"]),
        "paired_ratio_vs_default_adam_reference": _paired(turns["fit"], turns["hand-written, default Adam"]),
        "compiled_paired_ratio_vs_fused_adam_reference": turns_compiled and _paired(
            turns_compiled["fit"], turns_compiled["hand-written, fused Adam"]),
        "compiled_paired_ratio_vs_default_adam_reference": turns_compiled and _paired(
            turns_compiled["fit"], turns_compiled["hand-written, default Adam"]),
        "interleaved_steps_per_second": {
            name: _rates(ts, args.block) for name, ts in turns.items()
        },
        "steps_per_second": rates,
        "ratio_vs_fused_adam_reference": fit_["best"] / fused["best"],
        "ratio_vs_fused_adam_reference_medians": fit_["median"] / fused["median"],
        "per_round_ratios_vs_fused_adam_reference": paired,
        "ratio_vs_default_adam_reference": fit_["best"] / plain["best"],
        "ratio_vs_default_adam_reference_medians": fit_["median"] / plain["median"],
        "traced_ratio_vs_fused_adam_reference": (
            rates["fit, traced Trace_ELBO subclass"]["best"] / fused["best"]
        ),
        "block_seconds": seconds,
        "interleaved_block_seconds": turns,
        "compiled_interleaved_block_seconds": turns_compiled,
        "ms_per_step_by_phase": phases,
        "torch": torch.__version__,
        "pyro": __import__("pyro").__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
    }
    summary = {k: v for k, v in result.items()
               if k not in ("block_seconds", "interleaved_block_seconds",
                            "compiled_interleaved_block_seconds", "ms_per_step_by_phase")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

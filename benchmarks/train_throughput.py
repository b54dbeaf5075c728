"""Training throughput of :func:`pyrovae.fit` against a hand-written PyTorch VAE.

Both train the same 784-400-400-50 MLP VAE (ReLU, Bernoulli likelihood, diagonal Gaussian
family, standard normal prior) with Adam at batch 128 on the same binary data, in the same process,
interleaved over several rounds; the median steps per second of each is reported, and their ratio.

The reference is the loop a PyTorch user writes by hand: encoder -> reparameterized sample ->
decoder -> BCE + analytic-free Monte Carlo KL, ``torch.optim.Adam`` with its defaults. A second
reference uses ``Adam(fused=True)``, as ``fit`` does where torch has it, so the ratio against it
isolates what the Pyro form costs. ``fit`` evaluates the default ``Trace_ELBO`` without Pyro's
tracing (``VAE.trace_elbo_loss``: the same loss, gradients equal to the bit); ``fit`` with a
``Trace_ELBO`` subclass runs Pyro's tracing, and is measured too. A breakdown times the phases of
one step (loss forward, backward, optimizer) for each, to say where the remaining time goes.

Run: ``python benchmarks/train_throughput.py [--steps 300] [--rounds 3] [--out FILE]``
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

D, H, L, BATCH = 784, 400, 50, 128


class RawVAE(nn.Module):
    """A textbook hand-written VAE of the same architecture as the pyrovae one."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.loc = nn.Linear(H, L)
        self.scale = nn.Linear(H, L)
        self.dec = nn.Sequential(
            nn.Linear(L, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D)
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


def raw_steps_per_second(data: torch.Tensor, steps: int, fused: bool = False) -> float:
    torch.manual_seed(0)
    model = RawVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    n = len(data)
    gen = torch.Generator().manual_seed(0)
    done = 0
    start = time.perf_counter()
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            x = data[perm[i : i + BATCH]]
            loss = model.loss(x, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


class TracedELBO(Trace_ELBO):
    """Pyro's ``Trace_ELBO`` under another name: ``fit`` runs a subclass through Pyro's tracing
    (only ``Trace_ELBO`` itself gets the untraced evaluation, ``VAE.trace_elbo_loss``)."""


def pyrovae_steps_per_second(data: torch.Tensor, steps: int, traced: bool = False) -> float:
    vae = _pyrovae_vae(len(data))
    num_epochs = steps * BATCH // len(data)
    loss = TracedELBO() if traced else None
    history = pyrovae.fit(vae, data, loss=loss, num_epochs=num_epochs, batch_size=BATCH,
                          progress=False)
    return history.num_steps / sum(history.epoch_seconds)


def _pyrovae_vae(num_data: int) -> VAE:
    return VAE(
        StandardNormal(L),
        DiagonalNormal(MLP(D, (H,), H, activate_output=True), L),
        Bernoulli(MLP(L, (H, H), D)),
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
            lambda x, idx: vae.trace_elbo_loss(x, idx), _adam(list(vae.parameters()), 1e-3),
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
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_at_start = list(os.getloadavg())  # the machine is shared: note how busy it was
    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(args.steps * BATCH // 4, D) * 0.3)  # 4 epochs of data
    raw_steps_per_second(data, 20)  # warm-up
    raw, raw_fused, ours, traced = [], [], [], []
    for _ in range(args.rounds):
        raw.append(raw_steps_per_second(data, args.steps))
        raw_fused.append(raw_steps_per_second(data, args.steps, fused=True))
        ours.append(pyrovae_steps_per_second(data, args.steps))
        traced.append(pyrovae_steps_per_second(data, args.steps, traced=True))
    phases = breakdown(data, args.steps // 2)
    fit_ms = 1000 / statistics.median(ours)
    phases["pyrovae fit, rest of the loop"] = {
        "step": fit_ms - phases["pyrovae train_step (whole step)"]["step"]
    }
    result = {
        "benchmark": "train_throughput",
        "architecture": f"{D}-{H}-{H}-{L} MLP VAE, batch {BATCH}",
        "steps_per_measurement": args.steps,
        "rounds": args.rounds,
        "raw_pytorch_steps_per_s": statistics.median(raw),
        "pyrovae_fit_steps_per_s": statistics.median(ours),
        "raw_pytorch_fused_adam_steps_per_s": statistics.median(raw_fused),
        "pyrovae_fit_traced_steps_per_s": statistics.median(traced),
        "ratio": statistics.median(ours) / statistics.median(raw),
        "ratio_vs_fused_adam_reference": statistics.median(ours) / statistics.median(raw_fused),
        "traced_ratio_vs_fused_adam_reference": (
            statistics.median(traced) / statistics.median(raw_fused)
        ),
        "ms_per_step_by_phase": phases,
        "torch": torch.__version__,
        "pyro": __import__("pyro").__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

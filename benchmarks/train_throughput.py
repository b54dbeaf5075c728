"""Training throughput of :func:`pyrovae.fit` against a hand-written PyTorch VAE.

Both train the same 784-400-400-50 MLP VAE (ReLU, Bernoulli likelihood, diagonal Gaussian
family, standard normal prior) with Adam at batch 128 on the same binary data, in the same process,
interleaved over several rounds; the median steps per second of each is reported, and their ratio.

The reference is the loop a PyTorch user writes by hand: encoder -> reparameterized sample ->
decoder -> BCE + analytic-free Monte Carlo KL, ``torch.optim.Adam`` with its defaults.

Run: ``python benchmarks/train_throughput.py [--steps 300] [--rounds 3] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
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


def raw_steps_per_second(data: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = RawVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
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


def pyrovae_steps_per_second(data: torch.Tensor, steps: int) -> float:
    vae = VAE(
        StandardNormal(L),
        DiagonalNormal(MLP(D, (H,), H, activate_output=True), L),
        Bernoulli(MLP(L, (H, H), D)),
        num_data=len(data),
    )
    num_epochs = steps * BATCH // len(data)
    history = pyrovae.fit(vae, data, num_epochs=num_epochs, batch_size=BATCH, progress=False)
    return history.num_steps / sum(history.epoch_seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(args.steps * BATCH // 4, D) * 0.3)  # 4 epochs of data
    raw_steps_per_second(data, 20)  # warm-up
    raw, ours = [], []
    for _ in range(args.rounds):
        raw.append(raw_steps_per_second(data, args.steps))
        ours.append(pyrovae_steps_per_second(data, args.steps))
    result = {
        "benchmark": "train_throughput",
        "architecture": f"{D}-{H}-{H}-{L} MLP VAE, batch {BATCH}",
        "steps_per_measurement": args.steps,
        "rounds": args.rounds,
        "raw_pytorch_steps_per_s": statistics.median(raw),
        "pyrovae_fit_steps_per_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(raw),
        "torch": torch.__version__,
        "pyro": __import__("pyro").__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

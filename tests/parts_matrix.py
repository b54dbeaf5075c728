"""What the training-matrix tests share: tiny models on a small batch of real digits.

The matrix (``test_matrix_normal.py``, ``test_matrix_flows.py``) runs tiny networks on a small
batch of real digits (``PYROVAE_DATA``, else the bundled sample, else synthetic 8-bit images);
``test_parts.py`` uses the configurations. A module of helpers, not of tests, so that pytest-xdist
(``--dist loadfile``) can put the matrix's files on different workers.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae import VAE, log_likelihood
from pyrovae.build import FAMILIES, LIKELIHOODS, PRIORS, VAEConfig, build_vae
from pyrovae.losses import IWAE

NUM_POINTS = 16
LATENT_DIM = 2
OPTIONS_SMALL = {"num_pseudo_inputs": 3, "num_components": 3, "num_transforms": 2}
#: The combinations that cannot work, and must be refused before training with the reason: the
#: VampPrior evaluates q(z|u) at its pseudo-inputs and at arbitrary z, which needs an encoder
#: (not "local") and a flow with an inverse (not planar or radial). Every other one must train.
INVALID = {("vamp", "planar"), ("vamp", "radial"), ("vamp", "local")}
#: The matrix runs on the digits average-pooled to 8 x 8 (64 features: the same combinations at a
#: twelfth of the cost of 784 pixels, which lets every combination run for three seeds).
SMALL_SHAPE = (8, 8)
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------- data
def _grey_digits() -> torch.Tensor:
    """``NUM_POINTS`` 8-bit grey images ``(N, 784)`` with values ``k / 255``."""
    root = os.environ.get("PYROVAE_DATA")
    try:
        from pyrovae.data import load_dataset

        if root and Path(root).is_dir():
            data = load_dataset("mnist", "train", root=root, binarize="none")
        else:
            data = load_dataset("default", "train", binarize="none")
        x, _ = data[list(range(NUM_POINTS))]
        return torch.as_tensor(x, dtype=torch.float32)
    except Exception:  # no data module or files: synthetic blobs, quantized to 8 bits
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        centers = 8 + 12 * torch.rand(NUM_POINTS, 2, generator=g)
        d2 = (yy - centers[:, :1, None]) ** 2 + (xx - centers[:, 1:, None]) ** 2
        return (torch.exp(-d2 / 20) * 255).round().div(255).reshape(NUM_POINTS, -1)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    grey = _grey_digits()
    g = torch.Generator().manual_seed(1)
    small = torch.nn.functional.adaptive_avg_pool2d(grey.reshape(-1, 1, 28, 28), SMALL_SHAPE)
    small = (small.reshape(len(grey), -1) * 255).round() / 255  # 8-bit levels again
    return {
        "grey": grey,
        "binary": torch.bernoulli(grey, generator=g),
        "small_grey": small,
        "small_binary": torch.bernoulli(small, generator=g),
    }


def _data_for(likelihood: str, digits: dict[str, torch.Tensor]) -> torch.Tensor:
    return digits["binary" if likelihood == "bernoulli" else "grey"]


def _config(prior: str, family: str, likelihood: str, **kw) -> VAEConfig:
    options = dict(OPTIONS_SMALL)
    options.update(kw.pop("options", {}))
    return VAEConfig(
        num_features=784,
        latent_dim=LATENT_DIM,
        hidden_dims=(8,),
        prior=prior,
        family=family,
        likelihood=likelihood,
        image_shape=(28, 28),
        options=options,
        **kw,
    )


def _train(vae: VAE, x: torch.Tensor, loss, num_steps: int, lr: float = 0.03) -> list[float]:
    idx = torch.arange(len(x))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    for _ in range(num_steps):
        if hasattr(loss, "differentiable_loss"):
            value = loss.differentiable_loss(vae.model, vae.guide, x, idx)
            value.backward()
            value = value.item()
        else:
            value = loss.loss_and_grads(vae.model, vae.guide, x, idx)
        opt.step()
        opt.zero_grad()
        losses.append(value)
    return losses


def _assert_gradients_everywhere(vae: VAE, x: torch.Tensor) -> None:
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, torch.arange(len(x)))
    loss.backward()
    missing = [
        n for n, p in vae.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reaches {missing}"
    vae.zero_grad()


def _decreased(losses: list[float]) -> bool:
    k = max(2, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


VALID = [
    c for c in itertools.product(PRIORS, FAMILIES, LIKELIHOODS) if (c[0], c[1]) not in INVALID
]


def _small_config(prior: str, family: str, likelihood: str) -> VAEConfig:
    return VAEConfig(
        num_features=SMALL_SHAPE[0] * SMALL_SHAPE[1], latent_dim=LATENT_DIM, hidden_dims=(8,),
        prior=prior, family=family, likelihood=likelihood, image_shape=SMALL_SHAPE,
        options=dict(OPTIONS_SMALL),
    )



def check_combination_trains(prior: str, family: str, likelihood: str, seed: int, digits) -> None:
    """Trace_ELBO steps lower the loss, gradients reach every parameter, IWAE steps
    (pyrovae.losses.IWAE) are finite, and log p(x) / sampling work."""
    x = digits["small_binary" if likelihood == "bernoulli" else "small_grey"]
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = build_vae(_small_config(prior, family, likelihood), num_data=len(x))
    _assert_gradients_everywhere(vae, x)
    losses = _train(vae, x, Trace_ELBO(), 12)
    assert all(math.isfinite(v) for v in losses)
    assert _decreased(losses), losses
    iwae = _train(vae, x, IWAE(num_particles=3), 2)
    assert all(math.isfinite(v) for v in iwae)
    # a per-datapoint family scores its own training points with their stored rows
    local = {"local": "lookup"} if family == "local" else {}
    ll = log_likelihood(vae, x[:4], num_samples=6, seed=0, **local)
    assert ll.values.shape == (4,) and bool(torch.isfinite(ll.values).all())
    samples = vae.sample(3)
    assert samples.shape == (3, x.shape[1]) and bool(torch.isfinite(samples).all())

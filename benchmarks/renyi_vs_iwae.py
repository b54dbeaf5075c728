"""Why not ``RenyiELBO(alpha=0)`` for IWAE: its value under minibatching against the IWAE bound.

Per datapoint on one minibatch (B = 100 of the bundled N = 6000 MNIST points, K = 5): Pyro's
``RenyiELBO(0)``, :class:`pyrovae.losses.IWAE`, the mean of max_k w and the ELBO, for a 784-200-50
tanh VAE untrained and after 2 epochs of IWAE(5). The numbers quoted in ``docs/objectives.md``.

Run: ``python benchmarks/renyi_vs_iwae.py`` (formerly ``python -m pyrovae.losses``).
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, StandardNormal, fit, log_weights
from pyrovae.data import load_dataset
from pyrovae.losses import IWAE


def measure_renyi(num_epochs: int = 2, seed: int = 0) -> dict[str, float]:
    """The numbers of docs/objectives.md ("Why not RenyiELBO(alpha=0)?"): per datapoint, RenyiELBO(alpha=0), the IWAE bound, the
    mean of max_k w and the ELBO on one minibatch (B = 100 of the bundled N = 6000 points,
    K = 5), for a 784-200-50 VAE trained ``num_epochs`` with IWAE(5)."""
    torch.manual_seed(seed)
    data = load_dataset("default", "train", binarize="dynamic")
    num_data = len(data)
    vae = VAE(
        StandardNormal(50),
        DiagonalNormal(MLP(784, (), 200, "tanh", activate_output=True), 50),
        Bernoulli(MLP(50, (200,), 784, "tanh")),
        num_data=num_data,
    )
    if num_epochs:
        fit(vae, data, loss=IWAE(5), num_epochs=num_epochs, batch_size=100, progress=False)
    xb, idx = data[torch.arange(100)]
    out: dict[str, float] = {"num_epochs": num_epochs}
    with pyro.validation_enabled(False):
        for name, loss in (
            ("renyi", RenyiELBO(0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)),
            ("iwae", IWAE(num_particles=5, max_plate_nesting=1)),
            ("elbo", Trace_ELBO()),
        ):
            pyro.set_rng_seed(seed)
            out[name] = -loss.loss(vae.model, vae.guide, xb, idx) / num_data
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            out["max_w"] = float(log_weights(vae, xb, idx, 5).max(0).values.mean())
    return out


if __name__ == "__main__":
    for epochs in (0, 2):
        print(measure_renyi(epochs))

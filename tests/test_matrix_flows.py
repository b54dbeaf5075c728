"""Every prior x likelihood trains with a flow family (IAF, planar, radial, spline,
Householder), for three seeds, and the VampPrior over a spline flow trains for 200 steps.
Helpers: ``parts_matrix.py``; the normal families' half of the matrix: ``test_matrix_normal.py``.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from parts_matrix import (
    SEEDS,
    VALID,
    _decreased,
    _small_config,
    _train,
    check_combination_trains,
    digits,  # noqa: F401  (the module-scoped fixture)
)
from pyrovae.build import build_vae

FLOWS = ("iaf", "planar", "radial", "spline", "householder")
FLOW_COMBINATIONS = [c for c in VALID if c[1] in FLOWS]


# ---------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "prior,family,likelihood", FLOW_COMBINATIONS, ids=["-".join(c) for c in FLOW_COMBINATIONS]
)
def test_every_combination_trains(prior, family, likelihood, seed, digits):
    """For three seeds: Trace_ELBO steps lower the loss, gradients reach every parameter, IWAE
    steps (pyrovae.losses.IWAE) are finite, and log p(x) / sampling work."""
    check_combination_trains(prior, family, likelihood, seed, digits)


@pytest.mark.parametrize("seed", SEEDS)
def test_vampprior_with_a_spline_family_trains_200_steps(seed, digits):
    """The combination that stopped training with an AssertionError inside Pyro's spline
    inverse (q(z|u_k) inverts the flow at points it did not produce): 200 steps at lr 0.03."""
    x = digits["small_binary"]
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    cfg = _small_config("vamp", "spline", "bernoulli")
    cfg.options = {"num_pseudo_inputs": 10, "num_transforms": 2}
    vae = build_vae(cfg, num_data=len(x))
    losses = _train(vae, x, Trace_ELBO(), 200, lr=0.03)
    assert all(math.isfinite(v) for v in losses)
    assert _decreased(losses)

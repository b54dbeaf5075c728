"""Every prior x likelihood trains with a normal family (diagonal, full-rank, local, the
stochastic layers' bottom-up), for three seeds; impossible combinations are refused; the other
Pyro losses (TraceMeanField_ELBO, JitTrace_ELBO) and ``fit`` train. Helpers: ``parts_matrix.py``;
the flow families' half of the matrix: ``test_matrix_flows.py``.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from pyro.infer import JitTrace_ELBO, TraceMeanField_ELBO

from conftest import assert_close
from parts_matrix import (
    INVALID,
    NUM_POINTS,
    SEEDS,
    VALID,
    _config,
    _decreased,
    _small_config,
    _train,
    check_combination_trains,
    digits,  # noqa: F401  (the module-scoped fixture)
)
from pyrovae import ConfigError
from pyrovae.build import FAMILIES, PRIORS, build_vae

#: The flow families run in test_matrix_flows.py; this file runs every other family.
FLOWS = ("iaf", "planar", "radial", "spline", "householder")
NORMAL = [c for c in VALID if c[1] not in FLOWS]


# ---------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prior,family,likelihood", NORMAL, ids=["-".join(c) for c in NORMAL])
def test_every_combination_trains(prior, family, likelihood, seed, digits):
    """For three seeds: Trace_ELBO steps lower the loss, gradients reach every parameter, IWAE
    steps (pyrovae.losses.IWAE) are finite, and log p(x) / sampling work."""
    check_combination_trains(prior, family, likelihood, seed, digits)


@pytest.mark.parametrize("prior,family", sorted(itertools.product(PRIORS, FAMILIES)))
def test_refused_combinations_are_exactly_the_impossible_ones(prior, family):
    """Each combination in INVALID is refused when the VAE is built (before any training), in
    one line naming the missing capability and families that have it; every other builds."""
    cfg = _small_config(prior, family, "bernoulli")
    if (prior, family) in INVALID:
        with pytest.raises(ConfigError) as info:
            build_vae(cfg, num_data=NUM_POINTS)
        message = str(info.value)
        assert "\n" not in message and "needs a variational family that" in message
        assert "DiagonalNormal" in message and "--family diagonal" in message
    else:
        build_vae(cfg, num_data=NUM_POINTS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trace_mean_field_trains_every_family(family, digits):
    """Analytic KL where torch has one (diagonal, local), Monte Carlo otherwise: no error."""
    x = digits["binary"]
    vae = build_vae(_config("standard", family, "bernoulli"), num_data=len(x))
    losses = _train(vae, x, TraceMeanField_ELBO(), 12)
    assert all(math.isfinite(v) for v in losses) and _decreased(losses)


def test_trace_mean_field_uses_the_analytic_kl(digits):
    """For diagonal q and a standard normal prior, TraceMeanField_ELBO's loss is
    -E_q[log p(x|z)] + KL(q||p) with the closed-form KL: check it against a hand computation."""
    x = digits["binary"][:4]
    vae = build_vae(_config("standard", "diagonal", "bernoulli"), num_data=4)
    idx = torch.arange(4)
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x, idx)
    pyro.set_rng_seed(3)
    q = vae.family(x, idx)
    z = q.rsample()
    kl = torch.distributions.kl_divergence(q, vae.prior().expand((4,)))
    expected = -(vae.likelihood(z).log_prob(x) - kl).sum()
    assert_close(loss.item(), expected.item(), rtol=1e-5, atol=1e-3)


def test_jit_trace_elbo_trains_the_standard_vae(digits):
    x = digits["binary"]
    vae = build_vae(_config("standard", "diagonal", "bernoulli"), num_data=len(x))
    losses = _train(vae, x, JitTrace_ELBO(), 12)
    assert all(math.isfinite(v) for v in losses) and _decreased(losses)


def test_fit_trains_a_flow_vampprior_combination(digits):
    """pyrovae.fit (not a manual loop) on VampPrior + IAF + Gaussian with predicted scales."""
    from pyrovae import fit

    x = digits["grey"]
    cfg = _config("vamp", "iaf", "gaussian", options={"scale": "predicted"})
    vae = build_vae(cfg, num_data=len(x))
    history = fit(vae, x, num_epochs=6, batch_size=8, lr=0.03, progress=False)
    assert all(math.isfinite(v) for v in history.train_elbo)
    assert history.train_elbo[-1] > history.train_elbo[0]

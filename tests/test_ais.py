"""AIS and BDMC against closed forms: the linear-Gaussian model (probabilistic PCA) and the 1-D
mixture of Gaussians (docs/references.md), in float64 with fixed seeds.

Tolerances. AIS's log-weights over ``C`` chains give each datapoint's estimate a Monte Carlo
standard error ``chain_stderr`` (delta method over the chains); with enough intermediate
distributions the bias of the lower bound is far below it, so every datapoint must lie within
4 of its own standard errors of the exact log p(x) (a wrong weight, a missing Jacobian or an
HMC that does not leave f_t invariant moves whole data sets by many standard errors), and the
mean error over datapoints within 3 standard errors of that mean.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from linear_gaussian import LinearGaussian
from torch import nn

from pyrovae import MLP, VAE, DiagonalNormal, Gaussian, MixtureOfGaussians
from pyrovae.ais import AISResult, BDMCResult, ais, bdmc, sigmoid_schedule
from pyrovae.errors import ConfigError
from pyrovae.evaluation import Estimate
from mixture_1d import LOCS, SCALES, TAU, WEIGHTS
from mixture_1d import GaussianProposal as _GaussianProposal
from mixture_1d import exact_log_px as _exact_log_px
from mixture_1d import mixture_vae as _mixture_vae


@pytest.fixture
def lg(float64, one_thread) -> LinearGaussian:
    return LinearGaussian(latent_dim=3, num_features=5, scale=0.7)


def _untrained(lg: LinearGaussian) -> VAE:
    torch.manual_seed(0)
    return lg.vae(DiagonalNormal(MLP(lg.D, (8,), 8), lg.L).double())


def _assert_matches(result: AISResult, exact: torch.Tensor) -> None:
    err = result.values - exact
    se = result.chain_stderr
    assert bool(torch.isfinite(se).all()), se
    assert bool((err.abs() < 4 * se).all()), (err, se)
    mean_se = float(se.pow(2).mean().sqrt()) / math.sqrt(len(err))
    assert abs(float(err.mean())) < 3 * mean_se, (float(err.mean()), mean_se)


@pytest.mark.parametrize("start", ["encoder", "prior", "defensive"])
def test_ais_matches_linear_gaussian_log_px(lg, start):
    """An untrained encoder (far from the posterior), the prior, or their even mixture (the
    defensive start: its density is the mixture's, its draws from either) as the start: AIS
    recovers the closed-form log p(x) of every datapoint within its chains' standard error."""
    x = lg.sample_x(8)
    vae = _untrained(lg)
    result = ais(vae, x, num_intermediate=200, num_chains=32, leapfrog_steps=5, start=start, seed=0)
    assert isinstance(result, AISResult) and isinstance(result, Estimate)
    assert result.values.shape == (8,) and result.log_weights.shape == (32, 8)
    _assert_matches(result, lg.log_px(x))
    assert float(result.chain_stderr.max()) < 0.15  # the check above has teeth
    # the step sizes were adapted toward 65% acceptance, per datapoint
    assert bool(((result.acceptance > 0.5) & (result.acceptance < 0.85)).all()), result.acceptance
    assert result.step_size.shape == (8,)
    d = result.to_dict()
    assert d["num_chains"] == 32 and d["start"] == start and 0.5 < d["mean_acceptance"] < 0.85
    assert "AIS forward" in str(result)


def test_ais_is_reproducible_and_leaves_the_rng(lg):
    x = lg.sample_x(3)
    vae = _untrained(lg)
    state = torch.get_rng_state()
    a = ais(vae, x, num_intermediate=5, num_chains=4, leapfrog_steps=2, seed=7)
    b = ais(vae, x, num_intermediate=5, num_chains=4, leapfrog_steps=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.log_weights, b.log_weights)
    assert all(p.requires_grad for p in vae.parameters())  # frozen only during the run


# ---------------------------------------------------------------------- the 1-D mixture
@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_ais_matches_the_mixture_marginal(float64, one_thread, start):
    """Bimodal posteriors (x between the components): AIS from the prior, or from a narrow
    proposal centred off the modes, still gives the exact 1-D mixture marginal."""
    vae = _mixture_vae(_GaussianProposal(0.5, 0.3, 0.2))
    x = torch.tensor([-3.0, -2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0]).view(-1, 1)
    result = ais(vae, x, num_intermediate=200, num_chains=32, leapfrog_steps=5, start=start, seed=1)
    _assert_matches(result, _exact_log_px(x))


# ---------------------------------------------------------------------- BDMC
def test_bdmc_sandwiches_the_exact_log_px_and_narrows(lg):
    """On data simulated from the model, forward AIS <= log p(x) <= reverse AIS (in
    expectation; here on the mean over datapoints, within its Monte Carlo error), and the
    sandwich narrows as the number of intermediate distributions grows."""
    vae = _untrained(lg)
    options = dict(num_chains=8, leapfrog_steps=5, start="prior", is_samples=(10, 100))
    results = {}
    for T in (5, 150):
        r = bdmc(vae, 12, num_intermediate=T, seed=3, **options)
        assert isinstance(r, BDMCResult) and isinstance(r, Estimate)
        exact = float(lg.log_px(r.data).mean())
        se = math.sqrt(r.lower.stderr**2 * 0 + float(r.lower.chain_stderr.pow(2).mean()) / 12)
        assert r.lower.mean <= exact + 3 * se, (r.lower.mean, exact, se)
        assert r.upper.mean >= exact - 3 * se, (r.upper.mean, exact, se)
        results[T] = r
    assert results[5].mean > 0.5  # a short chain leaves a wide sandwich
    assert results[150].mean < 0.1 * results[5].mean, (results[5].mean, results[150].mean)
    assert results[150].mean < 0.1
    r = results[150]
    assert r.importance.num_samples == (10, 100)
    d = r.to_dict()
    assert set(d) >= {"width", "lower", "upper", "importance"}
    assert "BDMC" in str(r)
    # the same seed simulates the same data
    again = bdmc(vae, 12, num_intermediate=5, seed=3, **options)
    assert torch.equal(again.data, results[5].data)


def test_bdmc_reverse_chain_starts_at_the_generating_latent(lg):
    """With a single intermediate step the reverse weight is exactly
    -(log p(x, z*) - log p(z*)) = -log p(x | z*) at the generating z*: its chains agree."""
    vae = _untrained(lg)
    r = bdmc(vae, 4, num_intermediate=1, num_chains=3, start="prior", is_samples=None, seed=0)
    w = r.upper.log_weights
    assert_close(w, w[:1].expand_as(w), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- arguments
def test_schedule_and_errors(lg):
    b = sigmoid_schedule(10)
    assert b.shape == (11,) and float(b[0]) == 0.0 and float(b[-1]) == 1.0
    assert bool((b[1:] > b[:-1]).all())
    vae = _untrained(lg)
    x = lg.sample_x(2)
    with pytest.raises(ConfigError, match="start"):
        ais(vae, x, start="posterior")
    with pytest.raises(ConfigError, match="num_chains"):
        ais(vae, x, num_chains=0)
    with pytest.raises(ConfigError, match="pyrovae.VAE"):
        ais("vae", x)
    with pytest.raises(ConfigError, match="example"):
        bdmc((vae.model, vae.guide), 3)


def test_ais_and_bdmc_score_a_plain_pair(lg):
    """A (model, guide) pair written as in Pyro's VAE tutorial (sites "latent" and "obs", plate
    "data" of len(x)): AIS matches the closed form, BDMC simulates from the pair's model."""
    W, b, s = lg.W, lg.b, lg.s

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(len(x), lg.L), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ W.T + b, s).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(x.new_zeros(len(x), lg.L), 1.5).to_event(1))

    x = lg.sample_x(6)
    r = ais((model, guide), x, num_intermediate=200, num_chains=32, leapfrog_steps=5, seed=0)
    _assert_matches(r, lg.log_px(x))
    sandwich = bdmc((model, guide), 10, example=x, num_intermediate=150, num_chains=8,
                    leapfrog_steps=5, start="prior", is_samples=(100,), seed=0)
    assert sandwich.data.shape == (10, lg.D)
    exact = float(lg.log_px(sandwich.data).mean())
    se = math.sqrt(float(sandwich.lower.chain_stderr.pow(2).mean()) / 10)
    assert sandwich.lower.mean <= exact + 3 * se and sandwich.upper.mean >= exact - 3 * se
    assert sandwich.mean < 0.2


# ---------------------------------------------------------------------- stated errors that cover
def _wrong_encoder(lg: LinearGaussian) -> VAE:
    """The best diagonal family moved 3 posterior sd off and made 0.3x as wide: a start that
    misses the posterior (benchmarks/ais_calibration.py's lg-wrong)."""
    family = lg.best_diagonal_family()
    with torch.no_grad():
        family.loc_head.bias.add_(3 * torch.diagonal(lg.posterior_cov).sqrt())
        target = 0.3 * torch.diagonal(lg.precision).rsqrt()
        family.scale_head.bias.copy_(torch.log(torch.expm1(target - family.min_scale)))
    return lg.vae(family)


@pytest.fixture
def lg10(float64, one_thread) -> LinearGaussian:
    return LinearGaussian(latent_dim=3, num_features=10, scale=0.7, seed=3)


def test_a_short_schedule_is_flagged_and_its_stated_error_covers(lg10):
    """T = 50 with 5 leapfrog steps from a wrong encoder: AIS is ~1 nat low, and the chains'
    standard error alone misses the truth by more than 3 of them on a fifth of the points or
    more (what AIS stated before). The convergence check (an independent run at T/4) sees the
    estimate still moving: converged is False, with a warning; the per-datapoint error that
    includes the discrepancy covers the truth within 3 errors on >= 90% of the points, and the
    mean's error covers the mean."""
    from pyrovae.ais import AISConvergenceWarning

    x = lg10.sample_x(30, seed=4)
    exact = lg10.log_px(x)
    with pytest.warns(AISConvergenceWarning, match="has not converged at T=50"):
        r = ais(_wrong_encoder(lg10), x, num_intermediate=50, leapfrog_steps=5, seed=0)
    err = r.values - exact
    assert float(err.mean()) < -0.3  # really biased
    assert float((err.abs() > 3 * r.chain_stderr).double().mean()) >= 0.2  # the old error misses
    assert r.converged is False and r.check_intermediate == 12
    assert_close(r.discrepancy, r.values - r.values_check)
    assert_close(r.total_stderr, (r.chain_stderr**2 + r.discrepancy**2).sqrt())
    assert float((err.abs() > 3 * r.error).double().mean()) <= 0.1
    assert abs(float(err.mean())) < 3 * r.mean_error
    d = r.to_dict()
    assert d["converged"] is False and d["mean_error"] == pytest.approx(r.mean_error)
    assert "NOT CONVERGED" in str(r)


def test_the_defensive_start_keeps_the_mass_a_wrong_encoder_misses(lg10):
    """The same short schedule from the even mixture of the wrong encoder and the prior: its
    mean error is a fraction of the encoder start's (the chains from the prior reach the
    posterior), and the convergence check finds no significant trend."""
    import warnings

    x = lg10.sample_x(30, seed=4)
    exact = lg10.log_px(x)
    vae = _wrong_encoder(lg10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = ais(vae, x, num_intermediate=50, leapfrog_steps=5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no AISConvergenceWarning
        mixed = ais(vae, x, num_intermediate=50, leapfrog_steps=5, start="defensive", seed=0)
    assert abs(float((mixed.values - exact).mean())) < 0.3 * abs(float((enc.values - exact).mean()))
    assert mixed.converged is True and mixed.start == "defensive"


def test_a_converged_run_and_no_check(lg10):
    """A good encoder at T = 200: converged, no warning, and the stated error still includes the
    (small) discrepancy; without the check the error is the chains' alone and nothing is
    claimed about convergence."""
    import warnings

    x = lg10.sample_x(10, seed=4)
    vae = lg10.vae(lg10.best_diagonal_family())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = ais(vae, x, num_intermediate=200, leapfrog_steps=5, seed=0)
    assert r.converged is True and "converged" in r.convergence
    assert bool((r.error >= r.chain_stderr).all())
    bare = ais(vae, x, num_intermediate=200, leapfrog_steps=5, seed=0, convergence_check=False)
    assert bare.converged is None and bare.total_stderr is None and bare.check_intermediate == 0
    assert torch.equal(bare.error, bare.chain_stderr)
    assert torch.equal(bare.values, r.values)  # the check runs after, on its own draws


def test_the_adaptive_schedule_raises_t_until_the_check_passes(lg10):
    """max_intermediate: from T = 50 (flagged, ~1 nat low above) AIS quadruples T, each run
    checked against the previous one, and stops at the first T whose check passes: here 800
    (50 and 200 fail), with the truth inside the stated errors and the T it used reported."""
    import warnings

    x = lg10.sample_x(30, seed=4)
    exact = lg10.log_px(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the final run converged: no warning
        r = ais(_wrong_encoder(lg10), x, num_intermediate=50, leapfrog_steps=5, seed=0,
                max_intermediate=3200)
    assert (r.num_intermediate, r.check_intermediate) == (800, 200) and r.converged is True
    err = r.values - exact
    assert abs(float(err.mean())) < 0.1 and abs(float(err.mean())) < 3 * r.mean_error
    assert float((err.abs() > 3 * r.error).double().mean()) <= 0.05
    with pytest.raises(ConfigError, match="convergence_check=True"):
        ais(_wrong_encoder(lg10), x, max_intermediate=100, convergence_check=False)

"""Importance sampling against an exact marginal: the 1-D mixture model (docs/references.md), PSIS k-hat
for good and bad proposals, and the IWAE bounds tightening with K.

The model: z ~ sum_n lambda_n N(mu_n, s_n^2) (a 1-D mixture prior), x | z ~ N(z, tau^2). Its
marginal is the 1-D mixture log p(x) = log sum_n lambda_n N(x; mu_n, s_n^2 + tau^2), exactly, and
its posterior is a mixture of Gaussians too, bimodal for x between the components.
"""

from __future__ import annotations

import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from torch import nn

from pyrovae import VAE, Gaussian, MixtureOfGaussians, iwae_bounds, log_likelihood
from pyrovae.errors import ImportanceSamplingWarning
from mixture_1d import LOCS, SCALES, TAU, WEIGHTS
from mixture_1d import GaussianProposal as _GaussianProposal
from mixture_1d import exact_log_px as _exact_log_px
from mixture_1d import mixture_vae as _mixture_vae

def _x() -> torch.Tensor:
    return torch.tensor([-3.0, -2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0]).view(-1, 1)


def test_prior_is_the_stated_mixture(float64):
    vae = _mixture_vae(_GaussianProposal(1.0, 0.0, 1.0))
    z = torch.linspace(-4, 4, 9).view(-1, 1)
    expected = torch.logsumexp(
        dist.Normal(LOCS, SCALES).log_prob(z) + WEIGHTS.log(), -1
    )
    assert_close(vae.prior().log_prob(z), expected)


def test_importance_sampling_matches_the_exact_mixture_marginal(float64):
    """A broad proposal (covers both posterior modes): the IS estimate converges to the exact
    log p(x) within its Monte Carlo error, and every PSIS k-hat says it is reliable."""
    vae = _mixture_vae(_GaussianProposal(0.7, 0.0, 2.0))
    x = _x()
    exact = _exact_log_px(x)
    k = 20000
    ll = log_likelihood(vae, x, num_samples=k, seed=0)
    # delta method: sd(log p_hat) = sqrt(Var(w) / (K E[w]^2)) = sqrt((K / ESS - 1) / K)
    sd = ((k / ll.ess - 1) / k).sqrt()
    assert bool(((ll.values - exact).abs() < 4 * sd).all()), (ll.values - exact, sd)
    assert bool((sd < 0.03).all())
    assert bool((ll.khat < 0.5).all()), ll.khat
    assert bool((ll.ess > 0.1 * 20000).all())


def test_khat_flags_a_proposal_much_narrower_than_the_posterior(float64):
    """A proposal 20x narrower than the posterior, centred off its mode: heavy-tailed weights,
    k-hat > 0.7 (for at least 3/4 of the datapoints: k-hat is itself estimated from 2000 draws;
    a proposal that covers the posterior gives k-hat < 0.5), a warning, and an estimate that
    falls short of the exact log p(x)."""
    vae = _mixture_vae(_GaussianProposal(0.5, 0.3, 0.02))
    x = _x()
    with pytest.warns(ImportanceSamplingWarning, match="k-hat > 0.7"):
        ll = log_likelihood(vae, x, num_samples=2000, seed=0)
    assert float((ll.khat > 0.7).double().mean()) >= 0.75, ll.khat
    assert float(ll.khat.median()) > 0.7
    assert ll.unreliable_share >= 0.75
    assert bool((ll.values < _exact_log_px(x)).all())


def test_iwae_bounds_tighten_towards_log_px(float64):
    """L_1 <= L_10 <= ... <= log p(x) (Burda et al. 2016), here with a proposal of moderate
    quality: the bounds rise with K and the last one is within Monte Carlo error of the truth."""
    vae = _mixture_vae(_GaussianProposal(0.8, 0.0, 0.6))
    g = torch.Generator().manual_seed(5)
    component = torch.multinomial(WEIGHTS, 400, replacement=True, generator=g)
    z = LOCS[component] + SCALES[component] * torch.randn(400, generator=g, dtype=torch.float64)
    x = (z + TAU * torch.randn(400, generator=g, dtype=torch.float64)).view(-1, 1)  # from p(x)
    exact = float(_exact_log_px(x).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        # (a 1-D model's rows are tiny: 20,000 per decoder call keeps the chunks few)
        bounds = iwae_bounds(vae, x, (1, 10, 100, 1000, 10000), seed=0, max_rows=20000)
    means = bounds.means.tolist()
    assert bounds.num_samples == (1, 10, 100, 1000, 10000)
    # nested draws: the differences are far less noisy than the bounds themselves
    assert all(b > a - 0.005 for a, b in zip(means, means[1:])), means
    assert means[0] < exact - 0.2  # the one-sample bound is visibly loose
    assert abs(means[-1] - exact) < 0.02
    # nested: L_K uses the first K of the same draws, so L_max equals log_likelihood with K = max
    ll = log_likelihood(vae, x, num_samples=10000, seed=0, diagnostics=False, max_rows=20000)
    assert_close(bounds.values[-1], ll.values, rtol=1e-10, atol=1e-10)
    assert math.isfinite(means[0])


# ---------------------------------------------------------------------- the evaluation core
def _reference_log_weights(vae, x, idx, num_samples):
    """The estimators' log-weights before the evaluation core existed (frozen copy)."""
    import pyro
    from pyro import poutine

    particles = pyro.plate("_pyrovae_particles", num_samples, dim=-2)
    with poutine.block():
        guide_trace = poutine.trace(particles(vae.guide)).get_trace(x, idx)
        model_trace = poutine.trace(
            poutine.replay(particles(vae.model), trace=guide_trace)
        ).get_trace(x, idx)
    w = x.new_zeros(num_samples, x.shape[0])
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            w = w + site["fn"].log_prob(site["value"])
            if not site["is_observed"]:
                w = w - guide_trace.nodes[name]["fn"].log_prob(guide_trace.nodes[name]["value"])
    return w


def _reference_weights(vae, x, num_samples, max_rows, seed):
    """The previous chunking: max_rows // K datapoints per batch, min(K, max_rows) draws per
    call, check_data on the first batch, all inside a forked RNG; batch b seeded by
    seed + b * 0x9E3779B97F4A7C15 (mod 2**64), so that a batch's draws do not depend on the
    batches before it (what makes a distributed evaluation equal a single-process one)."""
    import pyro

    points = max(1, max_rows // num_samples)
    per_chunk = min(num_samples, max_rows)
    out = []
    with torch.random.fork_rng(), pyro.validation_enabled(False), torch.no_grad():
        vae.eval()
        for b, start in enumerate(range(0, len(x), points)):
            xb = x[start : start + points]
            idx = torch.arange(start, start + len(xb))
            if start == 0:
                vae.check_data(xb)
            torch.manual_seed((seed + b * 0x9E3779B97F4A7C15) % 2**64)
            parts = [
                _reference_log_weights(vae, xb, idx, min(per_chunk, num_samples - k0))
                for k0 in range(0, num_samples, per_chunk)
            ]
            out.append(torch.cat(parts, 0))
        vae.train()
    return out


@pytest.mark.parametrize("num_samples,max_rows", [(7, None), (300, None), (3000, None), (50, 64)])
def test_estimators_reproduce_the_previous_values(float64, num_samples, max_rows):
    """The evaluation core changes how estimators are organized, not one value: for a fixed
    seed, log_likelihood, elbo and iwae_bounds equal the previous implementation bit for bit
    (where the byte budget does not bind, the chunking is the previous max_rows chunking; each
    batch is seeded by (seed, batch))."""
    from linear_gaussian import LinearGaussian

    from pyrovae import MLP, DiagonalNormal, elbo

    lg = LinearGaussian(latent_dim=3, num_features=5, scale=0.7)
    torch.manual_seed(0)
    vae = lg.vae(DiagonalNormal(MLP(5, (8,), 8), 3).double())
    x = lg.sample_x(13)
    options = {} if max_rows is None else {"max_rows": max_rows}
    ref = _reference_weights(vae, x, num_samples, max_rows or 2048, seed=4)
    expected = torch.cat([torch.logsumexp(w, 0) - math.log(num_samples) for w in ref])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        ll = log_likelihood(vae, x, num_samples, seed=4, **options)
    assert torch.equal(ll.values, expected)
    assert torch.equal(elbo(vae, x, num_samples, seed=4, **options).values,
                       torch.cat([w.mean(0) for w in ref]))
    bounds = iwae_bounds(vae, x, (1, num_samples), seed=4, **options)
    assert torch.equal(bounds.values[-1], expected)
    assert torch.equal(bounds.values[0], torch.cat([w[0] for w in ref]))
    assert bounds.mean == pytest.approx(float(expected.mean()), rel=1e-15)


class _TutorialVAE(nn.Module):
    """A model/guide pair written as in Pyro's VAE tutorial (sites "latent" and "obs", plate
    "data" of len(x), pyro.module in model and guide), sharing a pyrovae VAE's networks."""

    def __init__(self, vae: VAE, scale: float) -> None:
        super().__init__()
        self.encoder, self.loc_head = vae.family.encoder, vae.family.loc_head
        self.scale_head, self.decoder = vae.family.scale_head, vae.likelihood.decoder
        self.min_scale, self.scale, self.z_dim = vae.family.min_scale, scale, vae.latent_dim

    def model(self, x):
        import pyro

        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc = self.decoder(z)
            pyro.sample("obs", dist.Normal(loc, self.scale * torch.ones_like(loc)).to_event(1), obs=x)

    def guide(self, x):
        import pyro

        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            h = self.encoder(x)
            z_scale = torch.nn.functional.softplus(self.scale_head(h)) + self.min_scale
            pyro.sample("latent", dist.Normal(self.loc_head(h), z_scale).to_event(1))


def test_a_tutorial_pair_scores_exactly_like_the_vae(float64):
    """log_weights, log_likelihood, elbo, iwae_bounds and ais of a plain (model, guide) pair
    equal those of the pyrovae VAE with the same weights, for the same seeds."""
    from linear_gaussian import LinearGaussian

    from pyrovae import MLP, DiagonalNormal, elbo, log_weights
    from pyrovae.ais import ais

    lg = LinearGaussian(latent_dim=3, num_features=5, scale=0.7)
    torch.manual_seed(0)
    vae = lg.vae(DiagonalNormal(MLP(5, (8,), 8), 3).double())
    tutorial = _TutorialVAE(vae, lg.s)
    pair = (tutorial.model, tutorial.guide)
    x = lg.sample_x(9)
    torch.manual_seed(1)
    a = log_weights(vae, x, num_samples=20)
    torch.manual_seed(1)
    b = log_weights(tutorial.model, tutorial.guide, x, num_samples=20)
    assert a.shape == (20, 9) and torch.equal(a, b)
    # The VAE checks its data first (one draw from the prior); the pair has no such check.
    # Skip it, so that both consume the same random stream.
    vae.check_data = lambda x: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        for fn, kwargs in ((log_likelihood, {"num_samples": 100}), (elbo, {"num_samples": 5}),
                           (iwae_bounds, {"num_samples": (1, 30)}),
                           (ais, {"num_intermediate": 3, "num_chains": 4, "leapfrog_steps": 2})):
            u, v = fn(vae, x, seed=2, **kwargs), fn(pair, x, seed=2, **kwargs)
            assert torch.equal(u.values, v.values), fn.__name__
    assert all(m.training for m in tutorial.modules())  # eval mode restored


def test_pairs_that_cannot_be_scored_are_refused(float64):
    import pyro

    from pyrovae import ConfigError

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))

    def global_latent(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("x", dist.Normal(w + z, 1.0), obs=x[:, 0])

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))
        guide(x)

    def no_plate(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[:, 0])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])

    x = torch.randn(4, 1)
    with pytest.raises(ConfigError, match="'w' lies outside the data plate"):
        log_likelihood((global_latent, global_guide), x, 5)
    with pytest.raises(ConfigError, match="not inside a plate"):
        log_likelihood((no_plate, guide), x, 5)
    with pytest.raises(ConfigError, match="no counterpart in the guide"):
        log_likelihood((model, lambda x: None), x, 5)
    with pytest.raises(ConfigError, match=r"\(model, guide\) pair"):
        log_likelihood((model,), x, 5)
    ll = log_likelihood((model, guide), x, 4000, seed=0)  # the sound pair: z ~ N(0,1), x ~ N(z, 1)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x[:, 0])
    assert bool(((ll.values - exact).abs() < 0.05).all()), (ll.values, exact)


def test_nonfinite_weights_are_counted_and_said(float64):
    """A likelihood with bounded support gives -inf log-weights; a datapoint whose every draw
    has zero density has log p(x) = -inf and no ESS. The summary counts them and never prints
    a nan: 'mean ESS nan' was what a single such datapoint used to produce."""
    import pyro

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Uniform(z - 1.0, z + 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 1), 1.0).to_event(1))

    x = torch.tensor([[0.0], [0.5], [40.0]])
    with pytest.warns(ImportanceSamplingWarning) as record:
        ll = log_likelihood((model, guide), x, 200, seed=0, warn_share=0.0)
    assert ll.values[2] == -math.inf and bool(torch.isfinite(ll.values[:2]).all())
    assert math.isnan(float(ll.ess[2])) and math.isfinite(ll.mean_ess)
    assert ll.num_nonfinite_weights == 3  # some draws of the first two fall outside too
    text = str(ll)
    assert "nan" not in text and "got -inf" in text and "over 2 datapoints" in text, text
    assert all("nan" not in str(w.message) for w in record)
    assert ll.to_dict()["not_finite"].startswith("1 datapoint(s) got -inf")
    # exact for the finite ones: p(x) = P(|z - x| < 1) / 2
    from torch.distributions import Normal

    n = Normal(0.0, 1.0)
    exact = torch.log((n.cdf(x[:2, 0] + 1) - n.cdf(x[:2, 0] - 1)) / 2)
    assert bool(((ll.values[:2] - exact).abs() < 0.05).all())


def test_rows_per_call_follow_the_byte_budget(monkeypatch):
    """A Categorical256 likelihood holds num_features x 256 logits per decoded row; the rows
    per decoder call come from the bytes measured on a probe, not from a row count."""
    from pyrovae import MLP, Categorical256, DiagonalNormal, StandardNormal
    from pyrovae.evaluation import Program

    D = 20
    vae = VAE(StandardNormal(2), DiagonalNormal(MLP(D, (), 8, activate_output=True), 2),
              Categorical256(MLP(2, (), 256 * D)), num_data=50)
    x = torch.randint(0, 256, (10, D)) / 255.0
    calls = []
    original = Program.log_weights

    def recording(self, xb, idx, k):
        calls.append(k * len(xb))
        return original(self, xb, idx, k)

    monkeypatch.setattr(Program, "log_weights", recording)
    program = Program.resolve(vae)
    program.analyze(x[:2], torch.arange(2))
    assert program.row_bytes >= D * 256 * 4  # the float32 logits of one row
    budget = 2**20
    rows = budget // (program.row_bytes * 4)
    assert 1 <= rows < 20
    ll = log_likelihood(vae, x, 30, max_bytes=budget, seed=0, diagnostics=False)
    assert max(calls) <= rows and sum(calls) == 30 * 10
    calls.clear()
    ll_big = log_likelihood(vae, x, 30, seed=0, diagnostics=False)  # 256 MiB: one call per 2048 rows
    assert max(calls) == 300
    assert abs(ll.mean - ll_big.mean) < 1.0  # same estimand, other draws

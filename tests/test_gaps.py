"""Gap decomposition against the linear-Gaussian closed forms (probabilistic PCA).

Model: z ~ N(0, I_L), x | z ~ N(W z + b, s^2 I_D). Then log p(x) = log N(x; b, W W^T + s^2 I),
the posterior is N(A (x - b), s^2 M^{-1}) with M = W^T W + s^2 I and A = M^{-1} W^T, its precision
is Lambda = M / s^2, and the best diagonal Gaussian (precisions diag(Lambda), the exact mean) falls
short of log p(x) by 1/2 (sum_i log Lambda_ii - log det Lambda) nats for every x.
"""

from __future__ import annotations

import json
import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae import VAE, Gaussian, StandardNormal
from pyrovae.errors import ConfigError, DataError, ImportanceSamplingWarning
from pyrovae.families import DiagonalNormal
from pyrovae.gaps import GapResult, gaps
from pyrovae.plots import plot_gaps

L, D, S = 2, 4, 0.5


def _model_constants() -> dict[str, torch.Tensor]:
    W = torch.tensor([[1.0, 0.8], [0.7, 1.0], [0.5, 0.6], [0.2, -0.3]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.0])
    M = W.T @ W + S**2 * torch.eye(L)
    precision = M / S**2
    return {
        "W": W,
        "b": b,
        "A": torch.linalg.solve(M, W.T),
        "cov": S**2 * torch.linalg.inv(M),
        "precision": precision,
        "marginal": W @ W.T + S**2 * torch.eye(D),
        "diag_gap": 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)),
    }


def _decoder(c: dict[str, torch.Tensor]) -> Gaussian:
    linear = nn.Linear(L, D)
    with torch.no_grad():
        linear.weight.copy_(c["W"])
        linear.bias.copy_(c["b"])
    return Gaussian(linear, scale=S)


def _identity_encoder() -> nn.Linear:
    encoder = nn.Linear(D, D)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(D))
        encoder.bias.zero_()
    return encoder


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


def _diagonal_family(c: dict[str, torch.Tensor], scale: float, shift: float) -> DiagonalNormal:
    """Amortized q(z|x) = N(posterior mean + shift, scale^2 I): right direction, wrong width."""
    family = DiagonalNormal(_identity_encoder(), L)
    with torch.no_grad():
        family.loc_head.weight.copy_(c["A"])
        family.loc_head.bias.copy_(-c["A"] @ c["b"] + shift)
        family.scale_head.weight.zero_()
        family.scale_head.bias.fill_(_softplus_inv(scale - family.min_scale))
    return family


class ExactPosterior(nn.Module):
    """A test-local full-rank family whose encoder returns the exact posterior.

    Local parameters: ``loc (batch, L)`` and ``raw_scale_tril (batch, L, L)`` (strict lower part
    as is, diagonal through softplus).
    """

    def __init__(self, c: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.latent_dim = L
        self.register_buffer("A", c["A"])
        self.register_buffer("b", c["b"])
        chol = torch.linalg.cholesky(c["cov"])
        raw = chol.tril(-1) + torch.diag_embed(torch.log(torch.expm1(chol.diagonal())))
        self.register_buffer("raw", raw)

    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dict:
        loc = (x - self.b) @ self.A.T
        return {"loc": loc, "raw_scale_tril": self.raw.expand(x.shape[0], L, L)}

    def distribution_from_params(self, params: dict) -> dist.Distribution:
        raw = params["raw_scale_tril"]
        tril = raw.tril(-1) + torch.diag_embed(F.softplus(raw.diagonal(dim1=-2, dim2=-1)))
        return dist.MultivariateNormal(params["loc"], scale_tril=tril)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dist.Distribution:
        return self.distribution_from_params(self.local_params(x, idx))


def _data(c: dict[str, torch.Tensor], n: int = 20) -> torch.Tensor:
    return dist.MultivariateNormal(c["b"], c["marginal"]).sample((n,))


def _exact_log_px(c: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return dist.MultivariateNormal(c["b"], c["marginal"]).log_prob(x)


def _kl_to_posterior(c, x, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, cov) || p(z|x)) per datapoint."""
    post = dist.MultivariateNormal((x - c["b"]) @ c["A"].T, c["cov"])
    q = dist.MultivariateNormal(loc, cov)
    return torch.distributions.kl_divergence(q, post)


# log p(x) by IS alone: these tests check L[q*] and L[q] against closed forms with tolerances
# sized for IS with K = 4000 (the choice between IS and AIS is tested on its own below).
FAST = dict(num_samples=4000, num_elbo_samples=5000, batch_size=20, seed=1, log_px="is")
# AIS for tests of everything but its accuracy (gaps' defaults are T = 1000 with 16 chains).
SHORT_AIS = dict(num_intermediate=20, num_chains=4)


def test_diagonal_family_gaps_match_closed_form(float64):
    c = _model_constants()
    x = _data(c)
    scale, shift = 0.5, 0.1
    vae = VAE(StandardNormal(L), _diagonal_family(c, scale, shift), _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # log p(x) by importance sampling agrees with the closed form
    assert abs(float((result.log_px - exact).mean())) < 0.02
    assert float((result.log_px - exact).abs().max()) < 0.1
    # L[q*] = log p(x) - 1/2 (sum log Lambda_ii - log det Lambda), for every x
    gap = float(c["diag_gap"])
    assert 0.3 < gap < 1.0  # the test model has a real gap
    assert abs(float((result.elbo_optimal - (exact - gap)).mean())) < 0.02
    assert float((result.elbo_optimal - (exact - gap)).abs().max()) < 0.1
    assert abs(result.summary()["approximation_gap"][0] - gap) < 0.03
    # L[q] = log p(x) - KL(q || posterior): the amortization gap is that KL minus the diag gap
    loc = (x - c["b"]) @ c["A"].T + shift
    kl = _kl_to_posterior(c, x, loc, scale**2 * torch.eye(L).expand(len(x), L, L))
    # (sd of the log-weights under q is about 3 nats: MC error of the mean about 0.01)
    assert abs(float((result.elbo_amortized - (exact - kl)).mean())) < 0.04
    assert abs(result.summary()["amortization_gap"][0] - float(kl.mean() - gap)) < 0.05
    # the decomposition adds up
    torch.testing.assert_close(
        result.approximation_gap + result.amortization_gap, result.inference_gap
    )


def test_full_rank_family_has_no_approximation_gap(float64):
    families = pytest.importorskip("pyrovae.families")
    if not hasattr(families, "FullRankNormal"):
        pytest.skip("FullRankNormal not available")
    c = _model_constants()
    x = _data(c)
    family = families.FullRankNormal(_identity_encoder(), L)
    with torch.no_grad():  # exact mean + shift, covariance 0.8^2 I: q* must find the posterior
        family.loc_head.weight.copy_(c["A"])
        family.loc_head.bias.copy_(-c["A"] @ c["b"] + 0.1)
        family.scale_head.weight.zero_()
        rows, cols = family.tril_indices
        bias = torch.where(rows == cols, _softplus_inv(0.8 - family.min_scale), 0.0)
        family.scale_head.bias.copy_(bias)
    vae = VAE(StandardNormal(L), family, _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # within the optimizer's own error (noisy reparameterized gradients, about 0.01 nats)
    assert abs(float((result.elbo_optimal - exact).mean())) < 0.02
    assert abs(result.summary()["approximation_gap"][0]) < 0.02
    assert result.summary()["amortization_gap"][0] > 1.0  # the amortized covariance is wrong


def test_exact_encoder_has_no_gaps(float64):
    c = _model_constants()
    x = _data(c)
    vae = VAE(StandardNormal(L), ExactPosterior(c), _decoder(c), num_data=100)
    result = gaps(vae, x, **FAST)
    exact = _exact_log_px(c, x)
    # an exact proposal: every log-weight equals log p(x), so all three agree to rounding
    torch.testing.assert_close(result.log_px, exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.elbo_amortized, exact, atol=1e-9, rtol=0)
    assert float(result.amortization_gap.abs().max()) < 1e-3
    assert float(result.approximation_gap.abs().max()) < 1e-3
    assert bool((result.khat == -math.inf).all())  # equal weights: perfectly reliable


def test_result_dict_and_plot(float64, tmp_path):
    c = _model_constants()
    x = _data(c, 6)
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=100)
    result = gaps(vae, x, num_samples=100, num_elbo_samples=50, num_steps=100, seed=0,
                  ais_options=SHORT_AIS)
    assert (result.settings["num_samples"], result.settings["num_elbo_samples"]) == (100, 50)
    assert result.log_px.shape == result.elbo_optimal.shape == (6,)
    d = result.to_dict(per_datapoint=True)
    assert json.loads(json.dumps(d)) == d  # JSON-ready: a round trip changes nothing
    assert d["per_datapoint"]["elbo_optimal"] == result.elbo_optimal.tolist()
    assert d["num_datapoints"] == 6
    assert d["approximation_gap"]["mean"] == pytest.approx(
        float(result.approximation_gap.mean())
    )
    assert len(d["per_datapoint"]["log_px"]) == 6
    # 100 steps hold 2 checks (check_every=50), fewer than the max_decays + 1 = 5 halvings that
    # stop early: every datapoint gets all 100 steps
    assert result.num_steps.tolist() == [100] * 6 and d["mean_num_steps"] == 100.0
    fig = plot_gaps([result, result], tmp_path / "gaps.png", labels=["a", "b"])
    assert (tmp_path / "gaps.png").stat().st_size > 0
    assert len(fig.axes) == 2
    with pytest.raises(ConfigError, match="labels"):
        plot_gaps([result], labels=["a", "b"])


def test_gaps_reproducible_with_seed(float64):
    c = _model_constants()
    x = _data(c, 4)
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=100)
    kwargs = dict(num_samples=50, num_elbo_samples=20, num_steps=60, seed=3, ais_options=SHORT_AIS)
    a, b = gaps(vae, x, **kwargs), gaps(vae, x, **kwargs)
    torch.testing.assert_close(a.elbo_optimal, b.elbo_optimal)
    torch.testing.assert_close(a.log_px, b.log_px)
    # the decoder was not touched and still trains afterwards
    assert all(p.requires_grad for p in vae.parameters())
    assert all(p.grad is None for p in vae.parameters())


def test_gaps_errors(float64):
    c = _model_constants()

    class NoLocal(nn.Module):
        latent_dim = L

        def forward(self, x, idx=None):
            return dist.Normal(torch.zeros(len(x), L), 1.0).to_event(1)

    vae = VAE(StandardNormal(L), NoLocal(), _decoder(c), num_data=10)
    with pytest.raises(ConfigError, match="local_params"):
        gaps(vae, _data(c, 2))
    vae = VAE(StandardNormal(L), _diagonal_family(c, 0.8, 0.1), _decoder(c), num_data=10)
    with pytest.raises(ConfigError, match="num_steps"):
        gaps(vae, _data(c, 2), num_steps=0)
    with pytest.raises(DataError):
        gaps(vae, torch.zeros(0, D))
    with pytest.raises(DataError):
        gaps(vae, torch.zeros(2, D + 1), num_samples=2, num_elbo_samples=2, num_steps=2)


# ---------------------------------------------------------------------- the best log p(x)
def test_untrained_encoder_gap_uses_the_best_log_px(float64, one_thread):
    """An untrained encoder is a poor IS proposal: IS alone under-estimates log p(x) and so the
    approximation gap. gaps takes the larger of IS and AIS, says which, and recovers the
    closed-form gap of the best diagonal Gaussian, 1/2 (sum_i log Lambda_ii - log det Lambda)."""
    from linear_gaussian import LinearGaussian

    from pyrovae import MLP

    lg = LinearGaussian(latent_dim=3, num_features=5, scale=0.7)
    x = lg.sample_x(20)
    torch.manual_seed(0)
    vae = lg.vae(DiagonalNormal(MLP(5, (8,), 8), 3).double())
    options = dict(num_samples=1000, num_elbo_samples=2000, batch_size=20, seed=1)
    ais_options = dict(num_intermediate=200, num_chains=16, leapfrog_steps=5)
    result = gaps(vae, x, ais_options=ais_options, **options)
    gap = lg.diagonal_gap()
    assert result.log_px_estimator == "ais"
    assert result.log_px_candidates["ais"] > result.log_px_candidates["is"]
    assert not result.failed and result.estimator_failure is None
    assert abs(float(result.approximation_gap.mean()) - gap) < 0.05 + 0.15 * gap, (
        float(result.approximation_gap.mean()), gap)
    # AIS with T = 200 falls short by about 0.04 nats here (a lower bound; IS by 0.1)
    assert abs(float((result.log_px - lg.log_px(x)).mean())) < 0.06
    assert result.mean == pytest.approx(float(result.approximation_gap.mean()))  # an Estimate
    d = result.to_dict()
    assert d["log_px_estimator"] == "ais" and d["estimator_failure"] is None
    assert "(ais)" in str(result)
    # IS alone is what the result would have been: visibly short of the truth
    only_is = gaps(vae, x, log_px="is", **options)
    assert only_is.log_px_estimator == "is" and "ais" not in only_is.log_px_candidates
    assert float(only_is.approximation_gap.mean()) < gap - 0.05


def test_a_negative_approximation_gap_is_an_estimator_failure(float64):
    """log p(x) >= L[q*] always: an approximation gap below zero by more than its standard
    error is reported as a failure of the log p(x) estimator, never printed as gaps."""
    n = 10
    log_px = torch.linspace(-5.0, -4.0, n)
    elbo_optimal = log_px + 0.3 + 0.01 * torch.randn(n)  # L[q*] above log p(x): impossible
    result = GapResult.build(log_px, elbo_optimal, elbo_optimal - 1.0,
                             torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.long))
    assert result.failed and "estimator failure" in result.estimator_failure
    assert "under-estimated" in str(result) and "approximation gap -" not in str(result)
    assert result.to_dict()["estimator_failure"] == result.estimator_failure
    # within its standard error of zero (an exact q): not a failure
    ok = GapResult.build(log_px, log_px + 1e-9 * torch.randn(n), log_px - 1.0,
                         torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.long))
    assert not ok.failed


# ---------------------------------------------------------------------- per-datapoint families
def _local_vae(c, num_data: int = 5):
    from pyrovae.families import LocalNormal

    return VAE(StandardNormal(L), LocalNormal(num_data, L), _decoder(c), num_data=num_data)


def test_local_family_is_refused_on_data_it_holds_no_parameters_for(float64):
    """LocalNormal keeps parameters for its training datapoints only; scoring other data with
    them (looking up rows by position) is refused in one line naming the fixes."""
    from pyrovae import elbo, iwae_bounds, log_likelihood
    from pyrovae.ais import ais

    c = _model_constants()
    vae = _local_vae(c)
    x = _data(c, 4)
    for fn in (log_likelihood, elbo, iwae_bounds, gaps, ais):
        with pytest.raises(ConfigError, match="amortized = False.*local='fit'"):
            fn(vae, x)
    with pytest.raises(ConfigError, match="local must be"):
        log_likelihood(vae, x, local="yes")


def test_local_family_fits_each_datapoints_own_parameters(float64, one_thread):
    """local='fit': each scored datapoint gets its own parameters, fitted with the decoder
    fixed from a start shared by all datapoints; IS with them recovers the exact log p(x) and
    the stored tables (here deliberately wrong) are never used."""
    from pyrovae import elbo, log_likelihood

    c = _model_constants()
    vae = _local_vae(c, num_data=3)
    with torch.no_grad():  # the tables hold nonsense: a lookup would be far off
        vae.family.loc.fill_(5.0)
    x = _data(c, 6)  # more datapoints than the family holds
    exact = _exact_log_px(c, x)
    with pytest.warns(ImportanceSamplingWarning):
        ll = log_likelihood(vae, x, 2000, local="fit", seed=0)
    # (a diagonal q* is much narrower than this correlated posterior: k-hat 0.6-0.9 and errors
    # of up to 0.25 nats per datapoint at K = 2000, so the mean of 6 moves by ~0.15 with the
    # random stream; a lookup of the tables is off by > 1 nat)
    assert abs(float((ll.values - exact).mean())) < 0.25, (ll.values - exact)
    assert float((ll.values - exact).abs().max()) < 0.35, (ll.values - exact)
    e = elbo(vae, x, 2000, local="fit", seed=0)
    # the fitted q* is the best diagonal Gaussian: its ELBO sits the closed-form gap below
    assert abs(float((exact - e.values).mean()) - float(c["diag_gap"])) < 0.1
    # lookup is the user's word that these are the family's own datapoints: rows idx are used
    looked = log_likelihood(vae, x[:3], 200, local="lookup", seed=0, diagnostics=False)
    assert float((looked.values - exact[:3]).mean()) < -1.0


def test_gaps_of_a_plain_pair_optimize_the_guide_distributions(float64):
    """A (model, guide) pair has no family: q* optimizes the parameters of each guide site's
    distribution (here Normal(loc, scale) per datapoint) with the model fixed, and finds the
    closed-form approximation gap; a guide site without parameters (a flow) is refused."""
    import pyro

    c = _model_constants()
    x = _data(c)
    W, b = c["W"], c["b"]
    A = c["A"]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(len(x), L), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ W.T + b, S).to_event(1), obs=x)

    def guide(x):  # the right direction, the wrong width (as the diagonal test above)
        with pyro.plate("data", x.shape[0]):
            loc = (x - b) @ A.T + 0.1
            pyro.sample("latent", dist.Normal(loc, 0.5 * torch.ones_like(loc)).to_event(1))

    result = gaps((model, guide), x, **FAST)
    exact = _exact_log_px(c, x)
    gap = float(c["diag_gap"])
    assert abs(float((result.elbo_optimal - (exact - gap)).mean())) < 0.03
    assert abs(result.summary()["approximation_gap"][0] - gap) < 0.04
    assert result.summary()["amortization_gap"][0] > 0.1

    def flow_guide(x):
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(x.new_zeros(len(x), L), 1.0).to_event(1)
            pyro.sample("latent", dist.TransformedDistribution(
                base, [dist.transforms.AffineTransform(0.0, 2.0)]))

    with pytest.raises(ConfigError, match="TransformedDistribution"):
        gaps((model, flow_guide), x[:3], num_samples=10, num_elbo_samples=10, num_steps=2,
             log_px="is")


# ---------------------------------------------------------------------- defaults that resolve
def _toy_untrained():
    """Latent 2, data 6, 40 points, an untrained diagonal encoder (issue 23's toy)."""
    from linear_gaussian import LinearGaussian

    from pyrovae import MLP

    lg = LinearGaussian(latent_dim=2, num_features=6, scale=0.7)
    x = lg.sample_x(40)
    torch.manual_seed(0)
    return lg, x, lg.vae(DiagonalNormal(MLP(6, (8,), 8), 2).double(), num_data=40)


def test_gaps_defaults_resolve_the_closed_form_gap(float64, one_thread):
    """At its defaults (AIS at T = 1000, 16 chains, with its convergence check) gaps gives the
    closed-form approximation gap of the best diagonal Gaussian, 1/2 (sum_i log Lambda_ii -
    log det Lambda) = 0.008 nats, within 0.05, and calls the result resolved. The former
    defaults (T = 100, 4 chains) gave 0.071 (log p(x) over-estimated by 0.056). ~1 min."""
    lg, x, vae = _toy_untrained()
    result = gaps(vae, x)
    gap = lg.diagonal_gap()
    assert 0.0 < gap < 0.02
    assert abs(float(result.approximation_gap.mean()) - gap) < 0.05, (
        float(result.approximation_gap.mean()), gap)
    assert abs(float((result.log_px - lg.log_px(x)).mean())) < 0.05
    assert not result.failed and result.unresolved is None, result.unresolved
    assert result.settings["ais"]["num_intermediate"] == 1000
    assert result.to_dict()["unresolved"] is None


def test_gaps_say_when_their_ais_cannot_resolve(float64, one_thread):
    """A schedule far too short for the untrained encoder: AIS's convergence check finds the
    estimate still moving, and the result says the gaps are unresolved (in its dict and its
    line) instead of presenting them as measured."""
    lg, x, vae = _toy_untrained()
    result = gaps(vae, x[:10], num_samples=200, num_elbo_samples=200, num_steps=50, log_px="ais",
                  ais_options=dict(num_intermediate=8, num_chains=4, leapfrog_steps=2))
    assert result.log_px_estimator == "ais"
    assert result.unresolved is not None and "Monte Carlo error" in result.unresolved
    assert result.log_px_error > 0.05 and "raise ais_options" in result.unresolved
    assert "UNRESOLVED" in str(result) and result.to_dict()["unresolved"] == result.unresolved


def test_gaps_say_when_their_ais_has_not_converged(float64, one_thread):
    """A wrong encoder (3 posterior sd off, 0.3x as wide) and T = 50: AIS's convergence check
    finds the estimate still rising, and gaps says the approximation gap may be under-stated."""
    from linear_gaussian import LinearGaussian
    from test_ais import _wrong_encoder

    lg = LinearGaussian(latent_dim=3, num_features=10, scale=0.7, seed=3)
    x = lg.sample_x(30, seed=4)
    result = gaps(_wrong_encoder(lg), x, num_samples=200, num_elbo_samples=200, num_steps=50,
                  log_px="ais", ais_options=dict(num_intermediate=50, leapfrog_steps=5))
    assert result.unresolved is not None and "has not converged" in result.unresolved

"""Two stochastic layers (pyrovae.hierarchy) against the closed forms of a two-layer
linear-Gaussian model, in float64 under fixed seeds:

    z2 ~ N(0, I),  z1 = A z2 + c + e1,  e1 ~ N(0, diag s1^2),  x = W z1 + b + e2,  e2 ~ N(0, s^2 I)

(z1, z2, x) is jointly Gaussian: log p(x) = log N(x; W c + b, W (A A^T + S1) W^T + s^2 I), the
prior of (z1, z2) and any linear bottom-up q(z1|x) q(z2|z1) are joint Gaussians, and the joint
posterior p(z1, z2 | x) is Gaussian. The parts are built with linear networks (no hidden layers)
set to these matrices.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import (
    VAE,
    Bernoulli,
    BottomUp,
    DiagonalNormal,
    First,
    Gaussian,
    GaussianLayer,
    Hierarchical,
    MLP,
    StandardNormal,
    TopDown,
    active_units_per_layer,
    ais,
    elbo,
    fit,
    gaps,
    kl_per_layer,
    log_likelihood,
)
from pyrovae.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _raw(scale: torch.Tensor, min_scale: float) -> torch.Tensor:
    """softplus(raw) + min_scale = scale."""
    return torch.log(torch.expm1(scale - min_scale))


def _set_linear_gaussian(layer: GaussianLayer, weight: torch.Tensor, bias: torch.Tensor,
                         scale: torch.Tensor) -> GaussianLayer:
    """A linear GaussianLayer: loc = weight h + bias, scale constant."""
    with torch.no_grad():
        layer.loc_head.weight.copy_(weight)
        layer.loc_head.bias.copy_(bias)
        layer.scale_head.weight.zero_()
        layer.scale_head.bias.copy_(_raw(scale, layer.min_scale))
    return layer


class TwoLayerLinearGaussian:
    """The model above with its closed forms. ``diagonal=True`` makes every posterior factor
    diagonal (A's columns on the axes, W's columns orthogonal), so that a bottom-up family of
    diagonal Gaussians can be the exact posterior."""

    def __init__(self, d1: int = 3, d2: int = 2, D: int = 4, *, diagonal: bool = False,
                 seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d1, self.d2, self.D = d1, d2, D
        if diagonal:
            self.A = torch.zeros(d1, d2, dtype=F64)
            self.A[range(d2), range(d2)] = torch.tensor([1.5, -0.8], dtype=F64)[:d2]
            q, _ = torch.linalg.qr(torch.randn(D, d1, generator=g, dtype=F64))
            self.W = q * torch.tensor([2.0, 1.0, 0.5], dtype=F64)[:d1]
            self.s1 = torch.full((d1,), 0.6, dtype=F64)
        else:
            self.A = torch.randn(d1, d2, generator=g, dtype=F64)
            self.W = torch.randn(D, d1, generator=g, dtype=F64)
            self.s1 = 0.4 + torch.rand(d1, generator=g, dtype=F64)
        self.c = torch.randn(d1, generator=g, dtype=F64)
        self.b = torch.randn(D, generator=g, dtype=F64)
        self.s = 0.5
        # joint Gaussian of v = (z1, z2)
        self.S11 = self.A @ self.A.T + torch.diag(self.s1**2)
        self.cov_v = torch.cat([torch.cat([self.S11, self.A], 1),
                                torch.cat([self.A.T, torch.eye(d2, dtype=F64)], 1)], 0)
        self.mean_v = torch.cat([self.c, torch.zeros(d2, dtype=F64)])
        self.mean_x = self.W @ self.c + self.b
        self.cov_x = self.W @ self.S11 @ self.W.T + self.s**2 * torch.eye(D, dtype=F64)
        #: Cov(v, x), (d1 + d2, D)
        self.cov_vx = torch.cat([self.S11 @ self.W.T, self.A.T @ self.W.T], 0)

    # ------------------------------------------------------------------ closed forms
    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return dist.MultivariateNormal(self.mean_x, covariance_matrix=self.cov_x).log_prob(x)

    def joint_prior(self) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.mean_v, covariance_matrix=self.cov_v)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """p(z1, z2 | x), batch ``(n,)``."""
        gain = self.cov_vx @ torch.linalg.inv(self.cov_x)  # (d, D)
        loc = self.mean_v + (x - self.mean_x) @ gain.T
        cov = self.cov_v - gain @ self.cov_vx.T
        return dist.MultivariateNormal(loc, covariance_matrix=cov.expand(len(x), -1, -1))

    def sample_x(self, n: int, seed: int = 4) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        chol = torch.linalg.cholesky(self.cov_x)
        return self.mean_x + torch.randn(n, self.D, generator=g, dtype=F64) @ chol.T

    # ------------------------------------------------------------------ the parts
    def prior(self) -> Hierarchical:
        p = Hierarchical((self.d1, self.d2), hidden_dims=()).double()
        _set_linear_gaussian(p.conditionals[0], self.A, self.c, self.s1)
        return p

    def likelihood(self) -> Gaussian:
        dec = nn.Linear(self.d1, self.D).double()
        with torch.no_grad():
            dec.weight.copy_(self.W)
            dec.bias.copy_(self.b)
        return Gaussian(nn.Sequential(First(self.d1), dec), self.s)

    def posterior_family(self, widen: float = 1.0) -> BottomUp:
        r"""The bottom-up family nearest the posterior: q(z1|x) with the posterior mean of z1 and
        its marginal standard deviations, q(z2|z1) with the mean of p(z2|z1) (= p(z2|z1, x):
        z2 and x are independent given z1) and its marginal standard deviations. Exact when the
        posterior factors are diagonal. ``widen`` multiplies every standard deviation."""
        d1 = self.d1
        gain = self.cov_vx @ torch.linalg.inv(self.cov_x)
        post_cov = (self.cov_v - gain @ self.cov_vx.T) * widen**2
        M, m = gain[:d1], (self.mean_v - gain @ self.mean_x)[:d1]
        S11inv = torch.linalg.inv(self.S11)
        B = self.A.T @ S11inv  # E[z2 | z1] = B (z1 - c)
        cond_cov = (torch.eye(self.d2, dtype=F64) - self.A.T @ S11inv @ self.A) * widen**2
        q = BottomUp(nn.Identity(), (self.d1, self.d2), hidden_dims=(), feature_dim=self.D).double()
        with torch.no_grad():
            q.loc_head.weight.copy_(M)
            q.loc_head.bias.copy_(m)
            q.scale_head.weight.zero_()
            q.scale_head.bias.copy_(_raw(torch.diagonal(post_cov[:d1, :d1]).sqrt(), q.min_scale))
        _set_linear_gaussian(q.conditionals[0], B, -B @ self.c, torch.diagonal(cond_cov).sqrt())
        self.q_params = (M, m, torch.diagonal(post_cov[:d1, :d1]), B, torch.diagonal(cond_cov))
        return q

    def q_joint(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The posterior family's q(z1, z2 | x) as one joint Gaussian (by hand)."""
        M, m, v1, B, v2 = self.q_params
        mu1 = x @ M.T + m
        mu2 = (mu1 - self.c) @ B.T
        D1, D2 = torch.diag(v1), torch.diag(v2)
        cov = torch.cat([torch.cat([D1, D1 @ B.T], 1), torch.cat([B @ D1, B @ D1 @ B.T + D2], 1)])
        return dist.MultivariateNormal(torch.cat([mu1, mu2], -1),
                                       covariance_matrix=cov.expand(len(x), -1, -1))

    def vae(self, family: nn.Module | None = None, num_data: int = 100) -> VAE:
        family = self.posterior_family() if family is None else family
        return VAE(self.prior(), family, self.likelihood(), num_data).double()


@pytest.fixture
def model() -> TwoLayerLinearGaussian:
    return TwoLayerLinearGaussian()


@pytest.fixture
def exact() -> TwoLayerLinearGaussian:
    return TwoLayerLinearGaussian(diagonal=True)


# ---------------------------------------------------------------------- the parts' densities
def test_prior_log_prob_is_the_joint_gaussian(model):
    """p(z2) p(z1|z2) with linear conditionals is the joint Gaussian N((c, 0), [[AA^T+S1, A],
    [A^T, I]]), at z of shape (K, batch, d) after the estimators' expand((batch,))."""
    p = model.prior()
    z = torch.randn(7, 5, model.d1 + model.d2, dtype=F64, generator=torch.Generator().manual_seed(0))
    d = p()
    assert d.event_shape == (5,) and d.batch_shape == () and p.latent_dim == 5
    expected = model.joint_prior().log_prob(z)
    torch.testing.assert_close(d.expand((5,)).log_prob(z), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.log_prob(z), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.log_prob(z), expected, rtol=1e-10, atol=1e-10)  # closed form
    # one value against a batch: broadcast to the batch shape, as torch distributions do
    one = d.expand((4,)).log_prob(z[0, 0])
    assert one.shape == (4,)
    torch.testing.assert_close(one, expected[0, 0].expand(4), rtol=1e-10, atol=1e-10)
    terms = d.layer_log_probs(z)  # log p(z1|z2) + log p(z2)
    torch.testing.assert_close(terms[1], dist.Normal(0.0, 1.0).log_prob(z[..., 3:]).sum(-1))
    torch.testing.assert_close(terms[0] + terms[1], expected)


def test_prior_samples_are_ancestral_draws_of_the_joint(model):
    """rsample: the draws have the joint's mean and covariance, and their log-density from the
    noise equals log_prob."""
    torch.manual_seed(0)
    z, log_p = model.prior()().rsample_with_log_prob((40000,))
    assert z.shape == (40000, 5)
    torch.testing.assert_close(log_p, model.joint_prior().log_prob(z), rtol=1e-10, atol=1e-10)
    se = (torch.diagonal(model.cov_v) / 40000).sqrt()
    assert bool(((z.mean(0) - model.mean_v).abs() < 4 * se).all())
    torch.testing.assert_close(torch.cov(z.T), model.cov_v, atol=0.08, rtol=0.05)


def test_family_log_prob_is_the_joint_gaussian(model):
    """q(z1|x) q(z2|z1) with linear networks is a joint Gaussian computed by hand, at any z
    (log_prob_anywhere), batch (batch,), broadcast over particles."""
    q = model.posterior_family()
    x = model.sample_x(6)
    d = q(x, torch.arange(6))
    assert d.batch_shape == (6,) and d.event_shape == (5,) and q.log_prob_anywhere
    z = torch.randn(9, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(d.log_prob(z), model.q_joint(x).log_prob(z), rtol=1e-10, atol=1e-10)
    # a pairwise evaluation (the VampPrior's, the aggregate posterior's): rows x datapoints
    pair = d.log_prob(z[0].unsqueeze(1))  # (6 rows, 6 datapoints)
    torch.testing.assert_close(pair, model.q_joint(x).log_prob(z[0].unsqueeze(1)))


def test_family_draws_and_closed_form_are_the_same_draw(model):
    """rsample_and_log_prob draws what family(x).rsample() draws from the same RNG state, with
    log q from the noise equal to log_prob; the draws have q's moments."""
    q = model.posterior_family()
    x = model.sample_x(3)
    torch.manual_seed(5)
    z_a, log_q = q.rsample_and_log_prob(x)
    torch.manual_seed(5)
    z_b = q(x).rsample()
    torch.testing.assert_close(z_a, z_b, rtol=0, atol=0)
    torch.testing.assert_close(log_q, model.q_joint(x).log_prob(z_a), rtol=1e-10, atol=1e-10)
    torch.manual_seed(6)
    z = q(x).rsample((40000,))
    joint = model.q_joint(x)
    torch.testing.assert_close(z.mean(0), joint.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z[:, 0].T), joint.covariance_matrix[0], atol=0.05, rtol=0.05)


def test_the_likelihood_reads_the_bottom_layer_only(model):
    lik = model.likelihood()
    z = torch.randn(4, 5, dtype=F64)
    moved = z.clone()
    moved[:, 3:] += 10.0  # z2 does not reach the decoder
    torch.testing.assert_close(lik(z).mean, lik(moved).mean)
    torch.testing.assert_close(lik(z).mean, z[:, :3] @ model.W.T + model.b)


# ---------------------------------------------------------------------- estimators
def test_exact_posterior_family_gives_log_px_exactly(exact):
    """With diagonal posterior factors the bottom-up family is p(z1, z2 | x) itself: every
    importance weight is log p(x), so IS with K = 8 and the ELBO both equal it (to rounding)."""
    x = exact.sample_x(10)
    vae = exact.vae()
    truth = exact.log_px(x)
    post = exact.posterior(x)
    torch.testing.assert_close(torch.diagonal(post.covariance_matrix[0]),
                               torch.diagonal(exact.q_joint(x).covariance_matrix[0]))
    ll = log_likelihood(vae, x, num_samples=8, seed=0)
    torch.testing.assert_close(ll.values.double(), truth, rtol=0, atol=1e-9)
    el = elbo(vae, x, num_samples=4, seed=0)
    torch.testing.assert_close(el.values.double(), truth, rtol=0, atol=1e-9)


def test_is_and_ais_match_the_exact_log_px(model):
    """A correlated posterior that the diagonal bottom-up family does not match: IS (K = 4000)
    and AIS (from the encoder and from the prior) recover the closed-form log p(x) within their
    stated standard errors, and the ELBO stays below it."""
    x = model.sample_x(6)
    vae = model.vae(model.posterior_family(widen=1.5))
    truth = model.log_px(x)
    ll = log_likelihood(vae, x, num_samples=4000, seed=0, diagnostics=False)
    assert abs(ll.mean - float(truth.mean())) < 4 * ll.stderr + 0.02, (ll.mean, float(truth.mean()))
    assert bool(((ll.values.double() - truth).abs() < 0.05).all()), ll.values.double() - truth
    gap = truth - elbo(vae, x, num_samples=2000, seed=0).values.double()
    assert bool((gap > 0.5).all()), gap  # the family is not exact: the check above has teeth
    for start in ("encoder", "prior"):
        result = ais(vae, x, num_intermediate=500, num_chains=32, leapfrog_steps=5, start=start,
                     seed=0)
        err, se = result.values.double() - truth, result.chain_stderr.double()
        assert bool(torch.isfinite(se).all()) and float(se.max()) < 0.2, se
        assert bool((err.abs() < 4 * se + 1e-3).all()), (start, err, se)


def test_kl_per_layer_sums_to_the_closed_form_kl(model):
    """KL(q(z1,z2|x) || p(z1,z2)) between two joint Gaussians, split into the bottom layer's
    E[log q(z1|x) - log p(z1|z2)] and the top's E[log q(z2|z1) - log p(z2)]."""
    x = model.sample_x(20)
    vae = model.vae(num_data=20)
    truth = torch.distributions.kl_divergence(model.q_joint(x), model.joint_prior())
    result = kl_per_layer(vae, x, num_samples=4000, seed=0)
    assert result.layer_dims == (3, 2) and len(result.means) == 2
    assert abs(result.total - float(truth.mean())) < 0.05, (result, float(truth.mean()))
    # the top layer alone: E_q[log q(z2|z1)] = -H (constant scales), E_q[log p(z2)] from q's
    # moments of z2; the bottom layer is the rest
    v2 = model.q_params[4]
    q = model.q_joint(x)
    mu2, cov22 = q.mean[:, 3:], q.covariance_matrix[:, 3:, 3:]
    top = (-0.5 * torch.log(2 * math.pi * math.e * v2).sum()
           + 0.5 * (mu2.square().sum(-1) + torch.diagonal(cov22, dim1=-2, dim2=-1).sum(-1))
           + 0.5 * model.d2 * math.log(2 * math.pi))
    assert abs(result.means[1] - float(top.mean())) < 0.03, (result.means, float(top.mean()))
    assert all(m > 0 for m in result.means)  # both layers carry information here
    # a diagonal family and a standard normal prior split by dimensions
    torch.manual_seed(0)
    other = VAE(StandardNormal(5), model.posterior_family(), model.likelihood(), 20).double()
    assert kl_per_layer(other, x, num_samples=10, seed=0).layer_dims == (3, 2)
    units = active_units_per_layer(vae, x, num_samples=50, seed=0)
    assert [u.variances.numel() for u in units] == [3, 2]


def test_gaps_take_the_bottom_layer_per_datapoint(exact):
    """The per-datapoint parameters are q(z1|x)'s; at the exact posterior both gaps vanish."""
    x = exact.sample_x(4)
    vae = exact.vae(num_data=4)
    params = vae.family.local_params(x)
    assert set(params) == {"loc", "raw_scale"} and params["loc"].shape == (4, 3)
    result = gaps(vae, x, num_samples=50, num_elbo_samples=50, num_steps=20, log_px="is", seed=0)
    approximation = result.log_px - result.elbo_optimal
    amortization = result.elbo_optimal - result.elbo_amortized
    torch.testing.assert_close(result.log_px.double(), exact.log_px(x), rtol=0, atol=1e-8)
    # L[q] is exact (every weight is log p(x)); L[q*] is the Monte Carlo ELBO of the best of
    # the optimizer's noisy steps from there, so it is log p(x) within that noise
    torch.testing.assert_close(result.elbo_amortized.double(), exact.log_px(x), rtol=0, atol=1e-8)
    assert float(approximation.abs().max()) < 0.1 and float(amortization.abs().max()) < 0.1


# ---------------------------------------------------------------------- the top-down family
def _exact_top_down(m: TwoLayerLinearGaussian, prior: Hierarchical) -> TopDown:
    """TopDown set to the exact posterior of the diagonal model: q(z2|x) = p(z2|x), and the
    bottom-up term of z1 = p(x|z1) as a Gaussian in z1, N((W'W)^-1 W'(x - b), s^2 (W'W)^-1)
    (diagonal: W's columns are orthogonal), which precision weighting with p(z1|z2) turns into
    p(z1|z2, x)."""
    q = TopDown(nn.Identity(), prior, hidden_dims=(), feature_dim=m.D).double()
    gain = m.cov_vx @ torch.linalg.inv(m.cov_x)
    post_cov = m.cov_v - gain @ m.cov_vx.T
    wtw = m.W.T @ m.W
    lsq = torch.linalg.solve(wtw, m.W.T)
    with torch.no_grad():
        q.loc_heads[0].weight.copy_(lsq)
        q.loc_heads[0].bias.copy_(-lsq @ m.b)
        q.loc_heads[1].weight.copy_(gain[m.d1:])
        q.loc_heads[1].bias.copy_((m.mean_v - gain @ m.mean_x)[m.d1:])
        for head, scale in ((q.scale_heads[0], m.s * torch.diagonal(torch.linalg.inv(wtw)).sqrt()),
                            (q.scale_heads[1], torch.diagonal(post_cov[m.d1:, m.d1:]).sqrt())):
            head.weight.zero_()
            head.bias.copy_(_raw(scale, q.min_scale))
    return q


def test_top_down_family_is_the_exact_posterior(exact):
    """Precision weighting of the bottom-up Gaussians with the prior's p(z1|z2) gives the joint
    posterior p(z1, z2 | x) of the diagonal model at any z; so IS is exact, and the closed-form
    draw is family(x).rsample()'s with log q from its noise."""
    prior = exact.prior()
    q = _exact_top_down(exact, prior)
    x = exact.sample_x(5)
    d = q(x)
    assert d.batch_shape == (5,) and d.event_shape == (5,)
    z = torch.randn(7, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(d.log_prob(z), exact.posterior(x).log_prob(z), rtol=1e-9, atol=1e-9)
    torch.manual_seed(3)
    z_a, log_q = q.rsample_and_log_prob(x)
    torch.manual_seed(3)
    torch.testing.assert_close(z_a, q(x).rsample(), rtol=0, atol=0)
    torch.testing.assert_close(log_q, d.log_prob(z_a), rtol=1e-10, atol=1e-10)
    torch.manual_seed(4)  # the draws are the posterior's (IS below is exact at any draw)
    draws = q(x[:1]).rsample((40000,))[:, 0]
    post = exact.posterior(x[:1])
    torch.testing.assert_close(draws.mean(0), post.mean[0], atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), post.covariance_matrix[0], atol=0.03, rtol=0.05)
    vae = VAE(prior, q, exact.likelihood(), 5).double()
    torch.testing.assert_close(log_likelihood(vae, x, num_samples=8, seed=0).values.double(),
                               exact.log_px(x), rtol=0, atol=1e-9)
    # the prior's networks are used, not owned: one copy in the state dict
    assert not any(k.startswith("family.prior") for k in vae.state_dict())
    with pytest.raises(ConfigError, match="Hierarchical prior"):
        TopDown(nn.Identity(), StandardNormal(5), feature_dim=4)


# ---------------------------------------------------------------------- combinations
@pytest.mark.parametrize("combo", ["hierarchical+diagonal", "standard+bottom_up",
                                   "hierarchical+bottom_up", "hierarchical+top_down"])
def test_every_combination_trains(combo):
    """Hierarchical prior with any family, any prior with the bottom-up family: the default
    loss trains them (the ELBO improves on 64 binary points)."""
    torch.manual_seed(0)
    x = (torch.rand(64, 12, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    enc = MLP(12, (), 16, "tanh", activate_output=True)
    prior = (Hierarchical((4, 2), hidden_dims=(8,)) if combo.startswith("hierarchical")
             else StandardNormal(6))
    family = (DiagonalNormal(enc, 6) if combo.endswith("diagonal")
              else TopDown(enc, prior, hidden_dims=(8,)) if combo.endswith("top_down")
              else BottomUp(enc, (4, 2), hidden_dims=(8,)))
    vae = VAE(prior, family, Bernoulli(nn.Sequential(First(4), MLP(4, (16,), 12, "tanh"))), 64)
    history = fit(vae, x, num_epochs=30, batch_size=16, lr=3e-3, progress=False, seed=0)
    assert history.train_elbo[-1] > history.train_elbo[0] + 1.0, history.train_elbo


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="two or more stochastic layers"):
        Hierarchical((5,))
    with pytest.raises(ConfigError, match=r"GaussianLayer\(3, 2"):
        BottomUp(nn.Identity(), (3, 2), feature_dim=4, conditionals=[GaussianLayer(3, 3)])
    with pytest.raises(ConfigError, match="latent_dim"):  # the VAE checks the total size
        VAE(Hierarchical((3, 2), hidden_dims=()), BottomUp(nn.Identity(), (3, 3), hidden_dims=(),
            feature_dim=4), Gaussian(nn.Linear(6, 4)), 10)
    split = VAE(Hierarchical((3, 2), hidden_dims=()), BottomUp(nn.Identity(), (2, 3),
                hidden_dims=(), feature_dim=4), Gaussian(nn.Sequential(First(3), nn.Linear(3, 4))), 10)
    with pytest.raises(ConfigError, match="split z differently"):
        kl_per_layer(split, torch.randn(10, 4))
    with pytest.raises(ConfigError, match="no per-layer terms|stochastic layers"):
        kl_per_layer(VAE(StandardNormal(2), DiagonalNormal(nn.Identity(), 2, feature_dim=4),
                         Gaussian(nn.Linear(2, 4)), 10), torch.randn(10, 4))
    with pytest.raises(ConfigError, match="First"):
        First(0)
    assert math.isfinite(float(split.prior().log_prob(torch.zeros(5)).detach()))

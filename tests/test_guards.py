"""Guards: tests that fail on specific, plausible bugs that the rest of the suite let through
(project issue 9). Each test names the bug it guards against; each was checked to fail with the
bug put in on purpose.

- the KL weight (beta, warm-up) must weight the ``"z"`` site of the model *and* the guide, so that
  fit's objective is E_q log p(x|z) - beta KL(q || p) (checked against the linear-Gaussian closed
  form, and step by step through the site scales a loss sees);
- a learned Gaussian scale is a standard deviation, not a variance (closed-form MLE);
- flow transforms are conditioned on the encoder's features h (against Pyro's own
  ``ConditionalTransformedDistribution``, and two contexts give two distributions);
- PSIS k-hat recovers the tail index of log-weights whose exp is generalized-Pareto;
- the active-unit threshold is Burda et al.'s 0.01 (units with variance 0.02 and 0.05 count);
- each epoch draws a new minibatch order.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from conftest import assert_close
from linear_gaussian import LinearGaussian
from pyrovae import VAE, DiagonalNormal, Flow, Gaussian, StandardNormal, fit
from pyrovae.diagnostics import active_units
from pyrovae.families import FLOW_TRANSFORMS
from pyrovae.importance import psis_khat


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------------- KL weight (beta, warm-up)
def _beta_objective(lg: LinearGaussian, family: DiagonalNormal, x: torch.Tensor, beta: float) -> float:
    r"""Closed form of :math:`\frac1N \sum_n E_q \log p(x_n|z) - \beta\,KL(q(z|x_n) \| N(0, I))`
    for the linear-Gaussian model and a diagonal Gaussian q = N(mu, diag sigma^2):

        E_q log p(x|z) = -D/2 log(2 pi s^2) - (|x - W mu - b|^2 + sum_j sigma_j^2 |W_j|^2) / (2 s^2),
        KL = 1/2 sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2).
    """
    with torch.no_grad():
        q = family(x, None).base_dist
        mu, var = q.loc, q.scale**2
        residual = x - mu @ lg.W.T - lg.b
        expected_ll = -0.5 * lg.D * math.log(2 * math.pi * lg.s**2) - (
            residual.pow(2).sum(-1) + var @ lg.W.pow(2).sum(0)
        ) / (2 * lg.s**2)
        kl = 0.5 * (var + mu**2 - 1 - var.log()).sum(-1)
        return float((expected_ll - beta * kl).mean())


@pytest.mark.parametrize("loss_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_fit_objective_is_the_beta_weighted_elbo(float64, loss_cls):
    """With beta = 0.5, fit's reported objective is E_q log p(x|z) - 0.5 KL (closed form).

    Guards against the KL weight reaching the model's "z" site but not the guide's (then
    Trace_ELBO optimizes E log p(x|z) + 0.5 E log p(z) - E log q(z), 0.5 H[q] = 0.9 nats away here,
    and TraceMeanField_ELBO, which scales the analytic KL by the guide's scale, ignores beta), and
    against beta never reaching the loss (0.5 KL = 1.2 nats away here).

    One step on one batch of N = 4000: the reported value is the one-sample estimate at the initial
    parameters. Its per-datapoint standard deviation is below 2 nats, so the mean's Monte Carlo
    error is below 2 / sqrt(4000) = 0.03 nats; the tolerance 0.1 is > 3 of those and far below
    either bug's shift.
    """
    lg = LinearGaussian()
    n = 4000
    x = lg.sample_x(n)
    family = lg.best_diagonal_family()
    vae = lg.vae(family, num_data=n)
    beta = 0.5
    expected = _beta_objective(lg, family, x, beta)
    unweighted = _beta_objective(lg, family, x, 1.0)  # 1.2 nats below: for the message
    history = fit(vae, x, loss=loss_cls(), num_epochs=1, batch_size=n, beta=beta, lr=1e-6,
                  progress=False, seed=0)
    assert history.num_steps == 1
    assert abs(history.train_elbo[0] - expected) < 0.1, (history.train_elbo[0], expected, unweighted)


class _ScaleSpy(Trace_ELBO):
    """Trace_ELBO that records, at every step, the KL weight the model and the guide put on "z"
    (the site's scale divided by the data plate's subsample scale, read from the "x" site).
    Works however fit hands the weight to the model and guide (an attribute or a keyword): it
    traces them with the very arguments the loss gets, on a forked RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.model_weights: list[float] = []
        self.guide_weights: list[float] = []

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with torch.random.fork_rng(), poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        plate_scale = float(model_trace.nodes["x"]["scale"])
        self.model_weights.append(float(model_trace.nodes["z"]["scale"]) / plate_scale)
        self.guide_weights.append(float(guide_trace.nodes["z"]["scale"]) / plate_scale)
        return super().differentiable_loss(model, guide, *args, **kwargs)


def test_kl_warmup_weights_every_step(float64):
    """kl_warmup_epochs = 2, beta = 0.5, 3 steps per epoch: step s of epoch e (from 0) weights
    the KL by 0.5 min(1, (e + (s + 1) / 3) / 2), in the model and in the guide alike.

    Guards against warm-up being ignored (every weight 0.5), beta being ignored (the weights
    rise to 1), and the weight missing from the guide."""
    lg = LinearGaussian()
    x = lg.sample_x(12)
    vae = lg.vae(lg.best_diagonal_family(), num_data=12)
    spy = _ScaleSpy()
    fit(vae, x, loss=spy, num_epochs=3, batch_size=4, beta=0.5, kl_warmup_epochs=2,
        progress=False, seed=0)
    expected = [0.5 * min(1.0, (e + (s + 1) / 3) / 2) for e in range(3) for s in range(3)]
    assert_close(spy.model_weights, expected, msg="the model's KL weight per step")
    assert_close(spy.guide_weights, expected, msg="the guide's KL weight per step")
    # and back to the plain model afterwards: log-likelihoods use no weight
    spy_after = _ScaleSpy()
    spy_after.differentiable_loss(vae.model, vae.guide, x, torch.arange(12))
    assert spy_after.model_weights == spy_after.guide_weights == [1.0]


# ---------------------------------------------------------------------- learned Gaussian scale
def test_learned_gaussian_scale_is_a_standard_deviation(float64):
    """Fit scale="learned" by maximum likelihood on data of known noise: the MLE of a Gaussian's
    scale is the root mean squared residual, sigma_d = sqrt(mean_n (x_nd - mu_d)^2); the learned
    ``scale`` must reach it, and log_prob must be Normal(mu, scale)'s.

    Guards against the learned value being used as a variance (it would converge to sigma^2,
    here 0.25 and 4.0 instead of 0.5 and 2.0)."""
    D, n = 2, 500
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    noise = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x = mu + noise * torch.randn(n, D, generator=g, dtype=torch.float64)
    decoder = nn.Linear(1, D).double()  # the mean ignores z: weight 0, bias mu
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.copy_(mu)
    decoder.requires_grad_(False)
    lik = Gaussian(decoder, "learned", num_features=D).double()
    z = torch.zeros(n, 1, dtype=torch.float64)
    opt = torch.optim.LBFGS(lik.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -lik(z).log_prob(x).mean()
        loss.backward()
        return loss

    opt.step(closure)
    mle = (x - mu).pow(2).mean(0).sqrt()
    assert_close(lik.scale, mle, rtol=1e-6, atol=1e-6, msg="learned scale vs the MLE")
    with torch.no_grad():
        assert_close(lik(z[:3]).log_prob(x[:3]),
                     dist.Normal(mu, lik.scale).log_prob(x[:3]).sum(-1))


# ---------------------------------------------------------------------- flows use the context
def _flow(name: str, latent_dim: int = 3, feature_dim: int = 4) -> Flow:
    base = DiagonalNormal(nn.Identity(), latent_dim, feature_dim=feature_dim)
    return Flow(base, FLOW_TRANSFORMS[name](latent_dim, feature_dim, num_transforms=2)).double()


@pytest.mark.parametrize("name", sorted(FLOW_TRANSFORMS))
def test_flow_transforms_are_conditioned_on_the_context(float64, name):
    """A Flow's q(z|x) is Pyro's ConditionalTransformedDistribution(base, transforms) conditioned
    on the features h: the same samples for the same seed and the same density. With the base
    parameters held fixed, two contexts give two different samples from the same base draw.

    Guards against the transforms being used unconditioned (or conditioned on anything but h)."""
    torch.manual_seed(0)
    flow = _flow(name)
    h = torch.randn(2, 4)
    params = flow.params_from_features(h)
    # the same base distribution for both rows: only the context differs
    params = {k: (v if k == "context" else v[:1].expand_as(v)) for k, v in params.items()}
    q = flow.distribution_from_params(params)
    base = flow.base.distribution_from_params({k: v for k, v in params.items() if k != "context"})
    reference = dist.ConditionalTransformedDistribution(base, list(flow.transforms)).condition(h)
    torch.manual_seed(1)
    z = q.rsample()
    torch.manual_seed(1)
    z_ref = reference.rsample()
    assert_close(z, z_ref, msg="samples")
    assert_close(q.log_prob(z), reference.log_prob(z_ref), msg="log q of own samples")
    # one base draw pushed through both contexts
    one = {k: v[:1] for k, v in params.items()}
    other = {**one, "context": h[1:]}
    torch.manual_seed(2)
    z_one = flow.distribution_from_params(one).rsample()
    torch.manual_seed(2)
    z_other = flow.distribution_from_params(other).rsample()
    assert float((z_one - z_other).detach().abs().max()) > 1e-3, "the context does not change q(z|x)"
    if name in ("iaf", "spline", "householder"):  # invertible: a density at any point
        point = torch.randn(1, 3)
        lp_one = flow.distribution_from_params(one).log_prob(point)
        lp_other = flow.distribution_from_params(other).log_prob(point)
        assert float((lp_one - lp_other).detach().abs()) > 1e-3


# ---------------------------------------------------------------------- PSIS k-hat
@pytest.mark.parametrize("k", [0.2, 0.5])
def test_psis_khat_recovers_a_known_tail_index(k):
    """Log-weights whose exp is generalized-Pareto with shape k (scale 1, shifted by 3 nats,
    which k-hat must not notice): k-hat averaged over 100 columns of K = 20000 draws is k.

    K = 20000 puts M = ceil(3 sqrt(K)) = 425 draws in the fitted tail. ArviZ's prior shrinks
    k-hat towards 0.5 by 10 / (M + 10) = 2.3% (+0.007 at k = 0.2, none at 0.5); one column's
    k-hat has a standard deviation of 0.06 (k = 0.2) to 0.08 (k = 0.5), so the mean of 100 has
    a standard error below 0.008. Measured: 0.211 and 0.503. The tolerance 0.04 is the
    shrinkage plus > 4 standard errors. Guards against k-hat fitted to the (normalized)
    weights instead of the log-weights: 0.30 at k = 0.2 and 0.56 at k = 0.5 on these draws
    (and inf for the raw weights)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, 100, generator=g, dtype=torch.float64)
    w = torch.log(torch.expm1(-k * torch.log1p(-u)) / k) + 3.0  # log GPD(k): inverse CDF
    khat = psis_khat(w)
    assert khat.shape == (100,) and khat.dtype == torch.float64
    assert abs(float(khat.mean()) - k) < 0.04, float(khat.mean())


# ---------------------------------------------------------------------- active units
def test_active_units_threshold_is_001(float64):
    """Latent means E[z_d|x] = a_d x_1 with Var_x(x_1) = 1 exactly, so Var_x E[z_d|x] = a_d^2:
    0.005 (dead), 0.02 and 0.05 (active: above Burda et al.'s 0.01, below 0.1) and 0.5.

    Guards against the default threshold 0.1 (only one active unit)."""
    D, L, n = 2, 4, 50
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, unbiased=True)
    variances = torch.tensor([0.005, 0.02, 0.05, 0.5], dtype=torch.float64)
    family = DiagonalNormal(nn.Identity(), L, feature_dim=D).double()
    with torch.no_grad():
        family.loc_head.weight.zero_()
        family.loc_head.weight[:, 0] = variances.sqrt()
        family.loc_head.bias.fill_(0.3)
    vae = VAE(StandardNormal(L), family, Gaussian(nn.Linear(L, D), 1.0), num_data=n).double()
    au = active_units(vae, x)
    assert au.analytic_mean
    assert_close(au.variances, variances, rtol=1e-10, atol=1e-12)
    assert au.active.tolist() == [False, True, True, True]
    assert au.count == 3


# ---------------------------------------------------------------------- minibatch order
class _Recording(torch.utils.data.Dataset):
    """A dataset of ``(x, idx)`` that records every index batch it serves."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.served: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        idx = torch.as_tensor(index, dtype=torch.long)
        self.served.append(idx.reshape(-1).tolist())
        return self.x[idx], idx


def _epoch_orders(seed: int, num_epochs: int = 3) -> list[list[int]]:
    lg = LinearGaussian()
    data = _Recording(lg.sample_x(12))
    vae = lg.vae(lg.best_diagonal_family(), num_data=12)
    fit(vae, data, num_epochs=num_epochs, batch_size=4, progress=False, seed=seed)
    batches = [b for b in data.served if len(b) == 4]  # the checks before training read all 12
    assert len(batches) == 3 * num_epochs
    return [sum(batches[3 * e : 3 * e + 3], []) for e in range(num_epochs)]


def test_every_epoch_draws_a_new_minibatch_order(float64):
    """Each epoch visits every datapoint once, in a new order; the orders depend on the seed
    and repeat with it. Guards against one permutation reused for every epoch."""
    orders = _epoch_orders(seed=0)
    for order in orders:
        assert sorted(order) == list(range(12))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2], orders
    assert orders[0] != list(range(12))  # shuffled
    assert _epoch_orders(seed=0) == orders
    assert _epoch_orders(seed=1) != orders

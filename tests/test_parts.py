"""Each part's density is right: families, priors, likelihoods, networks and the build.

The part tests check densities against closed forms: normalization on a grid, samples against the
density, flow log-determinants against the autograd Jacobian, and the linear-Gaussian model's
exact posterior. That every prior x family x likelihood trains is in ``test_matrix_normal.py``
and ``test_matrix_flows.py`` (helpers in ``parts_matrix.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

from conftest import assert_close
from linear_gaussian import LinearGaussian
from parts_matrix import (
    NUM_POINTS,
    OPTIONS_SMALL,
    _config,
    _data_for,
    _decreased,
    _train,
    digits,  # noqa: F401  (the module-scoped fixture)
)
from pyrovae import (
    VAE,
    Bernoulli,
    BottomUp,
    Categorical256,
    ConfigError,
    ContinuousBernoulli,
    ConvDecoder,
    ConvEncoder,
    DataError,
    DiagonalNormal,
    Flow,
    FlowPrior,
    FullRankNormal,
    Gaussian,
    Laplace,
    LearnedNormal,
    Local,
    LocalNormal,
    MixtureOfGaussians,
    MLP,
    StandardNormal,
    VampPrior,
    elbo,
    flow_prior,
    log_weights,
)
from pyrovae.build import FAMILIES, LIKELIHOODS, OPTIONS, VAEConfig, build_vae
from pyrovae.families import FLOW_TRANSFORMS


# ---------------------------------------------------------------------- families
def _family(name: str, latent_dim: int = 2, num_features: int = 3, context_dim: int = 6):
    torch.manual_seed(5)
    if name == "local":
        return LocalNormal(4, latent_dim, init_scale=0.7)
    encoder = MLP(num_features, (), context_dim, "tanh", activate_output=True)
    if name == "diagonal":
        return DiagonalNormal(encoder, latent_dim)
    if name == "full_rank":
        return FullRankNormal(encoder, latent_dim)
    if name == "bottom_up":  # two stochastic layers: q(z1|x) q(z2|z1)
        return BottomUp(encoder, (latent_dim - 1, 1), hidden_dims=(4,))
    base = DiagonalNormal(encoder, latent_dim)
    return Flow(base, FLOW_TRANSFORMS[name](latent_dim, context_dim, 2))


def _perturb(module: nn.Module, scale: float = 0.5) -> None:
    """Move every parameter away from its (often near-identity) initialization."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


INVERTIBLE_FAMILIES = ["diagonal", "full_rank", "iaf", "spline", "householder", "local", "bottom_up"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_contract_and_local_params(name, float64):
    q = _family(name).double()
    _perturb(q, 0.3)
    x = torch.randn(4, 3)
    idx = torch.arange(4)
    d = q(x, idx)
    assert d.batch_shape == (4,) and d.event_shape == (2,) and d.has_rsample
    params = q.local_params(x, idx)
    assert all(v.shape[0] == 4 for v in params.values())
    # a generic local copy gives the same distribution without running the encoder
    local = Local.from_family(q, x) if name != "local" else Local(q, q.local_params(x, idx))
    draws = []
    for d in (d, q.distribution_from_params(params), local(x * 0 + 100.0, idx)):
        pyro.set_rng_seed(7)  # same draws; planar/radial can only score their own samples
        z = d.rsample((3,))
        draws.append((z, d.log_prob(z)))
    for z, log_q in draws[1:]:
        assert_close(z, draws[0][0])
        assert_close(log_q, draws[0][1])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_samples_agree_with_log_prob(name, float64):
    r"""Samples and ``log_prob`` describe the same distribution.

    Invertible families (``log_prob`` anywhere): the first two moments of the samples match those
    of the density on a fine 2-D grid over the samples' range. Planar and radial flows
    (``log_prob`` only on their own samples): the importance identity
    :math:`E_{z \sim q}[p(z)/q(z)] = 1` for a normalized Gaussian p narrower than q; a missing
    log-determinant or a bad constant biases it.
    """
    invertible = name in INVERTIBLE_FAMILIES
    q = _family(name).double()
    _perturb(q, {"spline": 0.15}.get(name, 0.3 if invertible else 0.5))
    batch = 2 if invertible else 4
    d = q(torch.randn(batch, 3), torch.arange(batch))
    n = 40000
    z = d.sample((n,))
    if invertible:
        grid, _ = _sample_grid(z, 301)
        with torch.no_grad():
            weights = _grid_log_prob(d, grid.unsqueeze(1)).softmax(0)  # (G, batch)
        for f in (lambda v: v, lambda v: v**2):
            exact = torch.einsum("gi,gb->bi", f(grid), weights)
            fz = f(z)
            err = fz.std(0) / math.sqrt(n)
            # 5e-3: the grid's own error for the sharpest (spline) densities
            assert bool(((fz.mean(0) - exact).abs() < 5 * err + 5e-3).all()), (exact, fz.mean(0))
        return
    log_q = d.log_prob(z)
    mean = z.mean(0)
    cov = torch.einsum("nbi,nbj->bij", z - mean, z - mean) / n
    p = dist.MultivariateNormal(mean, covariance_matrix=0.5 * cov)
    w = (p.log_prob(z) - log_q).exp()
    est, err = w.mean(0), w.std(0) / math.sqrt(n)
    assert bool(((est - 1).abs() < 5 * err + 1e-3).all()), (est, err)


@pytest.mark.parametrize("name", INVERTIBLE_FAMILIES)
def test_invertible_family_integrates_to_one(name, float64):
    q = _family(name).double()
    _perturb(q, 0.15 if name == "spline" else 0.3)  # larger moves make splines too sharp to grid
    d = q(torch.randn(1, 3), torch.arange(1))
    grid, area = _sample_grid(d.sample((20000,)), 401)
    with torch.no_grad():
        total = _grid_log_prob(d, grid.unsqueeze(1)).exp().sum() * area
    assert_close(total, 1.0, atol=2e-3, rtol=0)


def _sample_grid(z: torch.Tensor, n: int, pad: float = 1.5) -> tuple[torch.Tensor, float]:
    """An ``n x n`` grid over the box of all samples ``z`` ``(S, batch, 2)``, widened by ``pad``
    (the mass beyond is negligible), and its cell area."""
    flat = z.detach().reshape(-1, 2)
    lo, hi = flat.min(0).values - pad, flat.max(0).values + pad
    axes = [torch.linspace(float(lo[i]), float(hi[i]), n, dtype=torch.float64) for i in range(2)]
    zz = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    return zz, float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))


# ---------------------------------------------------------------------- priors
def _grid_log_prob(d, grid: torch.Tensor) -> torch.Tensor:
    """``d.log_prob`` on a large grid, in chunks (bounded memory for flows)."""
    return torch.cat([d.log_prob(g) for g in grid.split(65536)])


def _priors() -> dict[str, nn.Module]:
    torch.manual_seed(4)
    learned = LearnedNormal(2)
    mixture = MixtureOfGaussians(2, 3)
    vamp = VampPrior(3, 3, family=_family("diagonal"), bounds=None)
    vamp_iaf = VampPrior(3, 3, family=_family("iaf"), bounds=None)
    maf = flow_prior(2, num_transforms=2)
    spline = flow_prior(2, num_transforms=2, kind="spline_autoregressive")
    import pyro.distributions.transforms as T

    sample_direction = FlowPrior(2, [T.affine_autoregressive(2)], inverse=False)
    for p in (learned, mixture, vamp, vamp_iaf, maf, spline, sample_direction):
        _perturb(p, 0.3)
    return {
        "standard": StandardNormal(2),
        "learned": learned,
        "mixture": mixture,
        "vamp": vamp,
        "vamp_iaf": vamp_iaf,
        "maf": maf,
        "spline": spline,
        "sample_direction": sample_direction,
    }


PRIOR_CASES = list(_priors())


@pytest.mark.parametrize("name", PRIOR_CASES)
def test_prior_integrates_to_one_and_samples_agree(name, float64):
    prior = _priors()[name].double()
    if isinstance(prior, VampPrior):  # its family was built before the dtype switch
        prior._family[0].double()
    with torch.no_grad():
        d = prior()
        assert d.batch_shape == () and d.event_shape == (2,)
        n = 40000
        z = d.sample((n,))
        grid, area = _sample_grid(z.unsqueeze(1), 501, pad=3.0)
        density = _grid_log_prob(d, grid).exp()
        total = density.sum() * area
        assert_close(total, 1.0, atol=2e-3, rtol=0)
        # E[z] and E[z^2] on the grid against the sample averages
        for f in (lambda v: v, lambda v: v**2):
            exact = (f(grid) * density.unsqueeze(-1)).sum(0) * area
            fz = f(z)
            err = fz.std(0) / math.sqrt(n)
            assert bool(((fz.mean(0) - exact).abs() < 5 * err + 1e-3).all()), (name, exact, fz.mean(0))


def test_vampprior_is_the_mixture_of_posteriors_at_pseudo_inputs(float64):
    family = _family("diagonal").double()
    prior = VampPrior(3, 3, family=family, bounds=(0.0, 1.0)).double()
    z = torch.randn(7, 2)
    u = prior.pseudo_inputs
    assert bool(((u > 0) & (u < 1)).all())
    q = family(u, None)
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(1)), -1) - math.log(3)
    assert_close(prior().log_prob(z), expected)
    # the family's parameters belong to the VAE, not to the prior
    assert {n for n, _ in prior.named_parameters()} == {"raw_pseudo_inputs"}


def test_vampprior_gets_the_vae_family_through_attach():
    family = _family("diagonal")
    prior = VampPrior(4, 3)
    with pytest.raises(ConfigError, match="no family"):
        prior()
    vae = VAE(prior, family, Gaussian(MLP(2, (), 3), 1.0), num_data=10)
    assert vae.prior.latent_dim == 2
    # attached: the prior is the mixture of the VAE's own family at the 4 pseudo-inputs
    z = torch.randn(5, 2)
    q = family(prior.pseudo_inputs, None)
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(1)), -1) - math.log(4)
    assert_close(prior().log_prob(z), expected, rtol=1e-5, atol=1e-5)
    assert len(list(vae.parameters())) == len({id(p) for p in vae.parameters()})


def test_mixture_prior_log_prob_is_the_weighted_sum(float64):
    prior = MixtureOfGaussians(2, 3)
    _perturb(prior)
    z = torch.randn(5, 2)
    w = prior.logits.softmax(0)
    scales = torch.nn.functional.softplus(prior.raw_scales) + prior.min_scale
    comp = torch.stack(
        [dist.Normal(prior.locs[c], scales[c]).log_prob(z).sum(-1) for c in range(3)], -1
    )
    assert_close(prior().log_prob(z), torch.logsumexp(comp + w.log(), -1))


# ---------------------------------------------------------------------- linear-Gaussian model
def _full_rank_exact(model: LinearGaussian) -> FullRankNormal:
    """FullRankNormal (identity encoder) set to the exact posterior N(A x + c, s^2 M^-1)."""
    fam = FullRankNormal(nn.Identity(), model.L, feature_dim=model.D).double()
    A, c = model.posterior_loc_map()
    chol = torch.linalg.cholesky(model.posterior_cov)
    rows, cols = torch.tril_indices(model.L, model.L)
    raw = chol[rows, cols].clone()
    diag = rows == cols
    raw[diag] = torch.log(torch.expm1(raw[diag] - fam.min_scale))
    with torch.no_grad():
        fam.loc_head.weight.copy_(A)
        fam.loc_head.bias.copy_(c)
        fam.scale_head.weight.zero_()
        fam.scale_head.bias.copy_(raw)
    return fam


def test_full_rank_represents_the_exact_posterior(float64):
    """Every importance weight equals log p(x) exactly: the gap is zero."""
    model = LinearGaussian()
    x = model.sample_x(6)
    vae = model.vae(_full_rank_exact(model), num_data=6)
    w = log_weights(vae, x, num_samples=16)
    assert_close(w, model.log_px(x).expand(16, -1), rtol=1e-9, atol=1e-9)


def test_best_diagonal_gap_is_the_closed_form(float64):
    """With diagonal precisions diag(Lambda), the gap is 1/2 (sum log Lambda_ii - log det Lambda)."""
    model = LinearGaussian()
    x = model.sample_x(4)
    vae = model.vae(model.best_diagonal_family(), num_data=4)
    gap_formula = model.diagonal_gap()
    assert gap_formula > 0.05
    est = elbo(vae, x, num_samples=20000, seed=0)
    gaps = model.log_px(x) - est.values
    assert_close(gaps, torch.full((4,), gap_formula), atol=0.03, rtol=0)


def _fit_family(model: LinearGaussian, family: nn.Module, x: torch.Tensor, steps: int) -> VAE:
    vae = model.vae(family, num_data=len(x))
    vae.likelihood.requires_grad_(False)
    opt = torch.optim.Adam(family.parameters(), lr=0.03)
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True)
    idx = torch.arange(len(x))
    for step in range(steps):
        if step in (steps // 2, 3 * steps // 4):  # anneal: the gradient noise stays at the optimum
            for group in opt.param_groups:
                group["lr"] *= 0.2
        loss.differentiable_loss(vae.model, vae.guide, x, idx).backward()
        opt.step()
        opt.zero_grad()
    return vae


def test_fitted_families_reach_their_best_gap(float64):
    """SVI from a random start: full-rank reaches gap ~0, diagonal the closed-form gap > 0."""
    model = LinearGaussian(latent_dim=2, num_features=3, scale=0.5, seed=7)
    x = model.sample_x(8)
    torch.manual_seed(0)
    full = _fit_family(model, FullRankNormal(nn.Identity(), 2, feature_dim=3).double(), x, 1200)
    torch.manual_seed(0)
    diag = _fit_family(model, DiagonalNormal(nn.Identity(), 2, feature_dim=3).double(), x, 1200)
    log_px = model.log_px(x)
    gap_full = (log_px - elbo(full, x, num_samples=4000, seed=1).values).mean()
    gap_diag = (log_px - elbo(diag, x, num_samples=4000, seed=1).values).mean()
    best = model.diagonal_gap()
    assert best > 0.4
    assert float(gap_full) < 0.02, float(gap_full)
    assert abs(float(gap_diag) - best) < 0.03, (float(gap_diag), best)


# ---------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_is_the_binary_cross_entropy(dtype):
    """The fast log-density (no log1p) is -BCE-with-logits: to float64 rounding in float64, to
    float32's own rounding in float32 (the same error as torch's kernel against float64), for
    logits of every size (including |logits| > 30, where log(1 + e^-|l|) underflows to 0)."""
    from pyrovae.likelihoods import BernoulliLogits

    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(6, 40, generator=gen, dtype=dtype) * 5,
                        torch.tensor([[-60.0, -31.0, -1e-4, 0.0, 1e-4, 31.0, 60.0] * 5 + [0.0] * 5],
                                     dtype=dtype)])
    x = torch.bernoulli(torch.full((7, 40), 0.4, dtype=dtype), generator=gen)
    exact = -F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
    fast = BernoulliLogits(logits=logits).log_prob(x)
    assert fast.dtype == dtype and fast.shape == (7, 40)
    tol = 1e-14 if dtype == torch.float64 else 4 * 2.0**-24 * (1 + exact.abs())
    assert ((fast.double() - exact).abs() <= tol).all(), (fast.double() - exact).abs().max()
    # broadcast over a leading sample dimension, as the estimators and the plates use it
    wide = BernoulliLogits(logits=logits.expand(3, 7, 40)).to_event(1).log_prob(x)
    assert wide.shape == (3, 7)
    assert torch.equal(wide[1], fast.sum(-1))


def test_bernoulli_log_prob_gradients(float64):
    """d/dl = x - sigmoid(l), d/dx = l; second derivatives too (gradgradcheck)."""
    from pyrovae.likelihoods import _BernoulliLogProb

    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 5, generator=gen) * 3).requires_grad_()
    x = torch.rand(3, 5, generator=gen).requires_grad_()  # broadcast over the first dimension
    out = _BernoulliLogProb.apply(logits, x)
    g_l, g_x = torch.autograd.grad(out.sum(), (logits, x))
    assert_close(g_l, x.detach() - torch.sigmoid(logits.detach()), atol=1e-14, rtol=0)
    assert_close(g_x, logits.detach().sum(0), atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(_BernoulliLogProb.apply, (logits, x))
    assert torch.autograd.gradgradcheck(_BernoulliLogProb.apply, (logits, x))


def test_categorical256_is_the_softmax_of_the_level(float64):
    torch.manual_seed(0)
    lik = Categorical256(MLP(2, (), 256 * 3)).double()
    z = torch.randn(2, 2)
    k = torch.tensor([[0, 17, 255], [128, 3, 254]])
    d = lik(z)
    logits = lik.decoder(z).unflatten(-1, (256, 3)).transpose(-1, -2).log_softmax(-1)
    expected = logits.gather(-1, k.unsqueeze(-1)).squeeze(-1).sum(-1)
    assert_close(d.log_prob(k / 255), expected)
    levels = torch.arange(256.0) / 255
    mass = d.base_dist.log_prob(levels.view(256, 1, 1).expand(256, 2, 3)).exp().sum(0)
    assert_close(mass, torch.ones(2, 3))


def test_categorical256_support_rejects_non_lattice_values():
    vae = VAE(
        StandardNormal(2),
        DiagonalNormal(MLP(3, (), 4), 2),
        Categorical256(MLP(2, (), 256 * 3)),
        num_data=2,
    )
    vae.check_data(torch.tensor([[0.0, 1.0, 17 / 255]]))
    with pytest.raises(DataError, match="support"):
        vae.check_data(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(DataError, match="support"):
        vae.check_data(torch.tensor([[0.0, 1.2, 1.0]]))


@pytest.mark.parametrize("kind", [Gaussian, Laplace])
def test_predicted_scale_splits_the_decoder_output(kind, float64):
    decoder = MLP(2, (), 6)
    lik = kind(decoder, "predicted", min_scale=1e-3).double()
    z = torch.randn(4, 5, 2)
    d = lik(z)
    out = decoder(z)
    assert d.batch_shape == (4, 5) and d.event_shape == (3,)
    assert_close(d.base_dist.loc, out[..., :3])
    assert_close(d.base_dist.scale, torch.nn.functional.softplus(out[..., 3:]) + 1e-3)
    x = torch.randn(4, 5, 3)
    loc, scale = out[..., :3], torch.nn.functional.softplus(out[..., 3:]) + 1e-3
    if kind is Laplace:
        expected = (-(x - loc).abs() / scale - torch.log(2 * scale)).sum(-1)
    else:
        expected = (-0.5 * ((x - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert_close(d.log_prob(x), expected)


def test_scale_kinds_are_validated():
    with pytest.raises(ConfigError, match="predicted"):
        Gaussian(MLP(2, (), 3), "bogus")
    with pytest.raises(ConfigError, match="2 \\* num_features"):
        Laplace(MLP(2, (), 3), "predicted")(torch.zeros(1, 2))


def test_continuous_bernoulli_integrates_to_one(float64):
    lik = ContinuousBernoulli(MLP(2, (), 1)).double()
    _perturb(lik, 2.0)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    d = lik(torch.randn(3, 2))
    density = d.log_prob(t.view(-1, 1, 1)).exp()
    total = torch.trapezoid(density, t, dim=0)
    assert_close(total, torch.ones(3), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- networks and build
@pytest.mark.parametrize("image_shape", [(28, 28), (28, 20), (1, 13, 9)])
def test_conv_nets_shapes(image_shape):
    num = math.prod(image_shape)
    enc = ConvEncoder(image_shape, 16, channels=(4, 8))
    dec = ConvDecoder(3, image_shape, out_channels=2, channels=(8, 4))
    assert enc(torch.rand(5, num)).shape == (5, 16) and enc.out_features == 16
    assert dec(torch.randn(7, 5, 3)).shape == (7, 5, 2 * num) and dec.out_features == 2 * num


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_conv_network_trains_every_likelihood(likelihood, digits):
    """network="conv" on 28x20 crops (a rectangular image) for each likelihood."""
    x = _data_for(likelihood, digits).reshape(-1, 28, 28)[:, :, 4:24].reshape(NUM_POINTS, -1)
    cfg = VAEConfig(
        num_features=560,
        latent_dim=2,
        hidden_dims=(16,),
        likelihood=likelihood,
        image_shape=(28, 20),
        network="conv",
        options={"conv_channels": [4, 8], "scale": "predicted"},
    )
    vae = build_vae(cfg, num_data=NUM_POINTS)
    losses = _train(vae, x, Trace_ELBO(), 10, lr=0.01)
    assert all(math.isfinite(v) for v in losses) and _decreased(losses)
    assert vae.sample(2).shape == (2, 560)


def test_config_is_json_serializable_and_rebuilds():
    cfg = _config("mixture", "iaf", "gaussian", options={"scale": "predicted"}, network="mlp")
    restored = VAEConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    torch.manual_seed(0)
    a = build_vae(cfg, 10)
    torch.manual_seed(0)
    b = build_vae(restored, 10)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys()


def test_build_rejects_bad_names_and_options():
    with pytest.raises(ConfigError, match="known options"):
        build_vae(_config("standard", "diagonal", "bernoulli", options={"num_flows": 3}), 10)
    with pytest.raises(ConfigError, match="network"):
        build_vae(_config("standard", "diagonal", "bernoulli", network="resnet"), 10)
    with pytest.raises(ConfigError, match="image_shape"):
        build_vae(
            dataclasses.replace(_config("standard", "diagonal", "bernoulli"), image_shape=None,
                                network="conv"),
            10,
        )
    with pytest.raises(ConfigError, match="family"):
        build_vae(_config("standard", "nope", "bernoulli"), 10)
    assert set(OPTIONS) >= set(OPTIONS_SMALL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_mixture_log_prob_matches_mixture_same_family(dtype):
    """The matrix-product log-density (VampPrior, mixture prior) equals MixtureSameFamily's,
    values and gradients, including tiny component scales (the cancelling quadratic terms)."""
    from pyrovae.priors import DiagonalNormalMixture

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, generator=g, dtype=dtype).requires_grad_()
    loc = (2 * torch.randn(7, 5, generator=g, dtype=dtype)).requires_grad_()
    scale = (0.01 + torch.rand(7, 5, generator=g, dtype=dtype)).requires_grad_()
    z = torch.randn(3, 11, 5, generator=g, dtype=dtype) * 2
    fast = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
    ref = dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    ).log_prob(z)
    assert fast.shape == ref.shape == (3, 11) and fast.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert_close(fast, ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(fast.sum(), (logits, loc, scale))
    ref_grads = torch.autograd.grad(ref.sum(), (logits, loc, scale))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=100 * tol, atol=100 * tol)
    # expanded inside a plate (as Pyro does with the prior), still the same density
    d = DiagonalNormalMixture(logits, loc, scale).expand((11,))
    assert d.batch_shape == (11,) and d.sample((3,)).shape == (3, 11, 5)
    assert_close(d.log_prob(z), ref, rtol=tol, atol=tol)


def test_full_rank_family_starts_diagonal():
    """A fresh FullRankNormal's Cholesky factor is diagonal (its off-diagonal head starts at 0),
    so it starts where DiagonalNormal does instead of with an O(sqrt(n)) spread."""
    q = FullRankNormal(MLP(6, (), 8, activate_output=True), 5)
    scale_tril = q(torch.randn(4, 6), None).scale_tril
    assert_close(scale_tril, torch.diag_embed(torch.diagonal(scale_tril, dim1=-2, dim2=-1)))
    assert bool((torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0).all())


@pytest.mark.parametrize("family_name", ["iaf", "spline", "full_rank"])
def test_vampprior_chunks_give_the_same_density_and_gradients(family_name, float64):
    """The byte-bounded VampPrior (rows in chunks, each recomputed in the backward pass) gives
    exactly the unchunked mixture's log-density and gradients, and each chunk keeps at most
    ``max_bytes`` of activations for the backward pass."""
    family = _family(family_name, latent_dim=2, num_features=3).double()
    _perturb(family, 0.2)
    prior = VampPrior(5, 3, family=family, bounds=None).double()
    z = torch.randn(3, 7, 2, dtype=torch.float64)

    def density_and_grads(max_bytes: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        prior.max_bytes = max_bytes
        prior._row_bytes.clear()
        family.zero_grad()
        prior.zero_grad()
        value = prior().log_prob(z)
        value.sum().backward()
        grads = [p.grad.clone() for p in (*family.parameters(), prior.raw_pseudo_inputs)]
        return value.detach(), grads

    whole, whole_grads = density_and_grads(2**40)
    q = family(prior.pseudo_inputs, None)
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(-2)), -1) - math.log(5)
    assert_close(whole, expected, msg="the mixture of q(z|u_k)")
    rows = z.reshape(-1, 2)
    fixed, per_row = prior()._cost(rows)
    budget = fixed + 3 * per_row
    # a budget of about three rows: 21 rows go in several chunks, each recomputed in backward
    chunked, chunked_grads = density_and_grads(budget)
    chunk = prior().rows_per_chunk(rows)
    assert 1 <= chunk < len(rows)
    assert_close(chunked, whole, msg="chunked density")
    for g, h in zip(chunked_grads, whole_grads):
        assert_close(g, h, msg="chunked gradients")
    # what one chunk keeps for the backward pass stays within the budget (storage accounting)
    assert prior()._saved_bytes(rows[:chunk].clone()) <= 1.05 * budget


def test_bad_datapoints_are_counted_over_the_whole_data_set():
    """fit checks the data in chunks of 8192 rows; the refusal counts every bad datapoint."""
    from pyrovae import fit

    vae = VAE(StandardNormal(2), DiagonalNormal(MLP(4, (), 8, activate_output=True), 2),
              Bernoulli(MLP(2, (), 4)), num_data=9000)
    x = torch.bernoulli(torch.full((9000, 4), 0.5))
    x[::2, 0] = 0.5  # 4500 grey datapoints, in both chunks
    with pytest.raises(DataError, match="^4500 datapoint"):
        fit(vae, x, num_epochs=1, progress=False)


def _closed_form_families() -> dict[str, nn.Module]:
    return {
        "diagonal": DiagonalNormal(MLP(6, (5,), 5, activate_output=True), 3),
        "full_rank": FullRankNormal(MLP(6, (5,), 5, activate_output=True), 3),
        "local": LocalNormal(7, 3, init_scale=0.7),
    }


def _closed_form_likelihoods() -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"bernoulli": Bernoulli(MLP(3, (5,), 6))}
    for cls in (Gaussian, Laplace):
        out[f"{cls.__name__}-fixed"] = cls(MLP(3, (5,), 6), 0.3)
        out[f"{cls.__name__}-learned"] = cls(MLP(3, (5,), 6), "learned")
        out[f"{cls.__name__}-predicted"] = cls(MLP(3, (5,), 12), "predicted")
    return out


@pytest.mark.parametrize("name", ["diagonal", "full_rank", "local"])
def test_family_closed_form_is_its_distribution(name, float64):
    """A family's rsample_and_log_prob draws the same z from the same RNG state as
    family(x, idx).rsample() and gives its log_prob, with the same gradients (float64 rounding)."""
    family = _closed_form_families()[name]
    _perturb(family, 0.3)
    x, idx = torch.rand(4, 6), torch.tensor([6, 0, 3, 3])
    results = []
    for closed in (True, False):
        torch.manual_seed(2)
        if closed:
            z, log_q = family.rsample_and_log_prob(x, idx)
        else:
            q = family(x, idx)
            z = q.rsample()
            log_q = q.log_prob(z)
        family.zero_grad()
        (log_q.sum() + z.square().sum()).backward()
        results.append((z.detach(), log_q.detach(),
                        {n: p.grad.clone() for n, p in family.named_parameters() if p.grad is not None}))
    (z1, lq1, g1), (z2, lq2, g2) = results
    assert z1.shape == (4, 3) and lq1.shape == (4,)
    assert torch.allclose(z1, z2, rtol=1e-12, atol=1e-14)
    assert torch.allclose(lq1, lq2, rtol=1e-12, atol=1e-12)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("name", ["standard", "learned"])
def test_prior_closed_form_is_its_distribution(name, float64):
    """prior.log_prob(z) = prior().log_prob(z) at latents of any batch shape, and its gradients."""
    prior = StandardNormal(3) if name == "standard" else LearnedNormal(3)
    _perturb(prior, 0.3)
    z = torch.randn(2, 4, 3, requires_grad=True)
    closed, reference = prior.log_prob(z), prior().log_prob(z)
    assert closed.shape == (2, 4)
    assert torch.allclose(closed, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(closed.sum(), [z, *prior.parameters()]),
                    torch.autograd.grad(reference.sum(), [z, *prior.parameters()])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_closed_form_likelihoods()))
def test_likelihood_closed_form_is_its_distribution(name, float64):
    """likelihood.log_prob(x, z) = likelihood(z).log_prob(x), and its gradients."""
    likelihood = _closed_form_likelihoods()[name]
    _perturb(likelihood, 0.3)
    z = torch.randn(2, 4, 3, requires_grad=True)
    x = torch.bernoulli(torch.full((4, 6), 0.5)) if name == "bernoulli" else torch.rand(4, 6)
    closed, reference = likelihood.log_prob(x, z), likelihood(z).log_prob(x)
    assert closed.shape == (2, 4)
    assert torch.allclose(closed, reference, rtol=1e-12, atol=1e-12)
    wrt = [z, *likelihood.parameters()]
    for a, b in zip(torch.autograd.grad(closed.sum(), wrt), torch.autograd.grad(reference.sum(), wrt)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)



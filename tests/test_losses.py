"""The IWAE bound under minibatching, DReG and STL gradients (pyrovae.losses), against identities
and closed forms on the linear-Gaussian model (tests/linear_gaussian.py).

Per-draw gradients come cheap from a per-datapoint family: with :class:`LocalNormal` holding the
same parameters for R copies of one datapoint, one pass gives R independent draws of the encoder
gradient (row r of the parameter tables' gradient is draw r's).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from linear_gaussian import LinearGaussian
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from torch import nn

from pyrovae import MLP, VAE, Bernoulli, DiagonalNormal, Flow, FullRankNormal, LocalNormal
from pyrovae import StandardNormal, fit, iaf, log_weights, planar
from pyrovae.errors import ConfigError
from pyrovae.losses import IWAE, ReparamELBO, log_prob_anywhere

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ helpers
def _diagonal_family(lg: LinearGaussian, shift: float = 0.5, scale: float = 0.6) -> DiagonalNormal:
    """A non-optimal diagonal encoder: the exact posterior mean + shift, a wrong scale."""
    fam = DiagonalNormal(nn.Identity(), lg.L, feature_dim=lg.D).double()
    A, c = lg.posterior_loc_map()
    with torch.no_grad():
        fam.loc_head.weight.copy_(A)
        fam.loc_head.bias.copy_(c + shift)
        fam.scale_head.weight.zero_()
        fam.scale_head.bias.fill_(math.log(math.expm1(scale)))
    return fam


def _exact_full_rank(lg: LinearGaussian) -> FullRankNormal:
    """pyrovae's FullRankNormal (identity encoder) set to the exact posterior."""
    fam = FullRankNormal(nn.Identity(), lg.L, feature_dim=lg.D).double()
    A, c = lg.posterior_loc_map()
    L = torch.linalg.cholesky(lg.posterior_cov)
    rows, cols = fam.tril_indices
    raw = L[rows, cols].clone()
    diag = rows == cols
    raw[diag] = torch.log(torch.expm1(raw[diag] - fam.min_scale))
    with torch.no_grad():
        fam.loc_head.weight.copy_(A)
        fam.loc_head.bias.copy_(c)
        fam.scale_head.weight.zero_()
        fam.scale_head.bias.copy_(raw)
    return fam


def _local_copies(lg: LinearGaussian, x0: torch.Tensor, copies: int) -> tuple[VAE, torch.Tensor]:
    """A VAE whose LocalNormal holds, for each of `copies` copies of x0, the same non-optimal
    diagonal q: loc = exact mean + 0.5, scale 0.6."""
    fam = LocalNormal(copies, lg.L).double()
    A, c = lg.posterior_loc_map()
    with torch.no_grad():
        fam.loc.copy_((A @ x0 + c + 0.5).expand(copies, -1))
        fam.raw_scale.fill_(math.log(math.expm1(0.6 - fam.min_scale)))
    vae = lg.vae(fam, num_data=copies)
    return vae, x0.expand(copies, -1).contiguous()


def _per_draw_grads(loss, vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Rows: one draw each of d loss / d(loc, raw_scale) of a LocalNormal, shape (R, 2 L)."""
    fam = vae.family
    fam.zero_grad(set_to_none=True)
    loss.differentiable_loss(vae.model, vae.guide, x, torch.arange(len(x))).backward()
    return torch.cat([fam.loc.grad, fam.raw_scale.grad], 1)


@torch.no_grad()
def _analytic_beta_objective(lg: LinearGaussian, fam, x: torch.Tensor, beta: float) -> torch.Tensor:
    r"""E_q log p(x|z) - beta KL(q || N(0, I)) per datapoint, in closed form for Gaussian q."""
    q = fam(x)
    mu, cov = q.mean, q.variance if isinstance(q, dist.Independent) else q.covariance_matrix
    if cov.dim() == 2:
        cov = torch.diag_embed(cov)
    resid = x - mu @ lg.W.T - lg.b
    trace = torch.einsum("ij,bjk,ik->b", lg.W, cov, lg.W)
    expected_loglik = -0.5 * lg.D * math.log(2 * math.pi * lg.s**2) - (
        (resid**2).sum(-1) + trace
    ) / (2 * lg.s**2)
    kl = 0.5 * (
        torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
        + (mu**2).sum(-1)
        - lg.L
        - torch.logdet(cov)
    )
    return expected_loglik - beta * kl


# ------------------------------------------------------------------------------ scale identity
@pytest.mark.parametrize("gradient", ["standard", "dreg"])
def test_iwae_scale_sits_outside_the_logsumexp(float64, gradient):
    lg = LinearGaussian()
    fam = _diagonal_family(lg)
    x = lg.sample_x(6)
    idx = torch.arange(6)
    K, N, B = 7, 600, 6
    values = {}
    for num_data in (N, B):
        vae = lg.vae(fam, num_data=num_data)
        pyro.set_rng_seed(3)
        values[num_data] = -IWAE(K, gradient, max_plate_nesting=1).differentiable_loss(
            vae.model, vae.guide, x, idx
        )
    assert_close(values[N], N / B * values[B], rtol=1e-12)
    # ... and both equal N/B sum_i (logsumexp_k w_ik - log K) from pyrovae.log_weights
    vae = lg.vae(fam, num_data=B)  # (building it draws the decoder's init: before the seed)
    pyro.set_rng_seed(3)
    w = log_weights(vae, x, idx, num_samples=K).detach()
    expected = N / B * (torch.logsumexp(w, 0) - math.log(K)).sum()
    assert_close(values[N], expected, rtol=1e-12)
    # the IWAE bound lies between the ELBO and the largest weight, per datapoint
    assert float(w.mean(0).sum()) < float(values[B].detach()) < float(w.max(0).values.sum())


def test_renyi_elbo_violates_the_scale_identity(float64):
    """Documents the Pyro behaviour this module exists for: RenyiELBO(alpha=0) puts N/B inside
    the logsumexp, so its minibatch objective is not N/B times the batch's IWAE bound."""
    lg = LinearGaussian()
    fam = _diagonal_family(lg)
    x, idx = lg.sample_x(6), torch.arange(6)
    K, N, B = 7, 600, 6
    renyi = {}
    for num_data in (N, B):
        vae = lg.vae(fam, num_data=num_data)
        pyro.set_rng_seed(3)
        loss = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
        renyi[num_data] = -loss.loss(vae.model, vae.guide, x, idx)
    vae = lg.vae(fam, num_data=B)
    pyro.set_rng_seed(3)
    w = log_weights(vae, x, idx, num_samples=K).detach()
    iwae_b = float((torch.logsumexp(w, 0) - math.log(K)).sum())
    assert renyi[B] == pytest.approx(iwae_b, rel=1e-9)  # no subsampling: the two agree
    assert abs(renyi[N] - N / B * iwae_b) > 1.0  # with N/B = 100: not the IWAE bound
    # it is N/B sum_i max_k w_ik up to B log K instead (the scale sharpens the logsumexp into a max)
    top = N / B * float(w.max(0).values.sum())
    assert top - B * math.log(K) <= renyi[N] <= top


# ------------------------------------------------------------------------ K = 1 and beta
def _beta_model_and_guide(lg: LinearGaussian, fam: nn.Module, num_data: int):
    W, b, s = lg.W, lg.b, lg.s

    def model(x, idx, kl_weight=1.0):
        with pyro.plate("data", num_data, subsample=idx):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", dist.Normal(x.new_zeros(lg.L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, s).to_event(1), obs=x)

    def guide(x, idx, kl_weight=1.0):
        pyro.module("fam", fam)
        with pyro.plate("data", num_data, subsample=idx), poutine.scale(scale=kl_weight):
            pyro.sample("z", fam(x))

    return model, guide


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_one_particle_iwae_is_trace_elbo_beta_included(float64, kl_weight):
    lg = LinearGaussian()
    fam = _diagonal_family(lg)
    model, guide = _beta_model_and_guide(lg, fam, num_data=50)
    x, idx = lg.sample_x(5), torch.arange(5)
    grads = {}
    for name, loss in (
        ("trace", Trace_ELBO()),
        ("iwae", IWAE(1)),
        ("elbo", ReparamELBO(1)),
    ):
        if not isinstance(loss, Trace_ELBO):
            loss._guess_max_plate_nesting(model, guide, (x, idx), {"kl_weight": kl_weight})
        pyro.set_rng_seed(4)
        fam.zero_grad(set_to_none=True)
        value = loss.differentiable_loss(model, guide, x, idx, kl_weight=kl_weight)
        value.backward()
        grads[name] = (float(value.detach()), [p.grad.clone() for p in fam.parameters()])
    for name in ("iwae", "elbo"):
        assert grads[name][0] == pytest.approx(grads["trace"][0], rel=1e-12)
        for g, g0 in zip(grads[name][1], grads["trace"][1]):
            assert_close(g, g0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_class", [IWAE, ReparamELBO])
def test_half_kl_weight_gives_the_analytic_beta_objective(float64, loss_class):
    """E_q log p(x|z) - 0.5 KL(q || p), closed form, vs the loss with poutine.scale(0.5) on z,
    over many draws (K = 1, so IWAE is an ELBO; the draws come from copies of the batch)."""
    lg = LinearGaussian()
    fam = _diagonal_family(lg)
    copies, B = 4000, 3
    x = lg.sample_x(B).repeat(copies, 1)
    idx = torch.arange(len(x))
    model, guide = _beta_model_and_guide(lg, fam, num_data=len(x))
    with torch.no_grad():
        pyro.set_rng_seed(5)
        value = -loss_class(1, max_plate_nesting=1).loss(model, guide, x, idx, kl_weight=0.5)
        # the per-copy spread of the objective sets the tolerance
        q = fam(x)
        z = q.sample()
        px = dist.Normal(z @ lg.W.T + lg.b, lg.s).to_event(1)
        pz = dist.Normal(torch.zeros(lg.L), 1.0).to_event(1)
        per_copy = (px.log_prob(x) + 0.5 * (pz.log_prob(z) - q.log_prob(z))).view(copies, B).sum(1)
    stderr = float(per_copy.std()) * math.sqrt(copies)  # of the sum over all copies
    expected = float(_analytic_beta_objective(lg, fam, x[:B], 0.5).sum()) * copies
    assert abs(value - expected) < 4 * stderr
    # and beta = 1 is visibly different (the test can tell 0.5 from 1)
    wrong = float(_analytic_beta_objective(lg, fam, x[:B], 1.0).sum()) * copies
    assert abs(value - wrong) > 8 * stderr


# --------------------------------------------------------------------------- DReG and STL
def test_dreg_is_unbiased_and_has_lower_variance(float64):
    lg = LinearGaussian()
    x0 = lg.sample_x(1)[0]
    R = 20000
    grads = {}
    for gradient in ("standard", "dreg"):
        vae, x = _local_copies(lg, x0, R)
        pyro.set_rng_seed(6)
        grads[gradient] = _per_draw_grads(IWAE(5, gradient, max_plate_nesting=1), vae, x)
    mean = {g: v.mean(0) for g, v in grads.items()}
    var = {g: v.var(0) for g, v in grads.items()}
    z = (mean["dreg"] - mean["standard"]) / ((var["dreg"] + var["standard"]) / R).sqrt()
    assert float(z.abs().max()) < 4.0, z
    # the gradient is not trivially zero: its mean stands out of the noise
    assert float((mean["standard"].abs() / (var["standard"] / R).sqrt()).max()) > 10
    assert float(var["dreg"].sum()) < 0.5 * float(var["standard"].sum())


def test_stl_is_unbiased_and_dreg_with_one_particle_is_stl(float64):
    lg = LinearGaussian()
    x0 = lg.sample_x(1)[0]
    R = 20000
    grads = {}
    for name, loss in (
        ("standard", ReparamELBO(1, "standard", max_plate_nesting=1)),
        ("stl", ReparamELBO(1, "stl", max_plate_nesting=1)),
        ("dreg1", IWAE(1, "dreg", max_plate_nesting=1)),
    ):
        vae, x = _local_copies(lg, x0, R)
        pyro.set_rng_seed(7)
        grads[name] = _per_draw_grads(loss, vae, x)
    assert_close(grads["dreg1"], grads["stl"], rtol=1e-10, atol=1e-10)
    m, v = grads["standard"].mean(0), grads["standard"].var(0)
    ms, vs = grads["stl"].mean(0), grads["stl"].var(0)
    z = (ms - m) / ((v + vs) / R).sqrt()
    assert float(z.abs().max()) < 4.0, z
    # the score term's removal shows: the per-draw gradients differ
    assert float((grads["stl"] - grads["standard"]).abs().max()) > 1e-3


@pytest.mark.parametrize("loss", [ReparamELBO(1, "stl"), IWAE(3, "dreg")], ids=["stl", "dreg"])
def test_exact_posterior_gives_zero_gradient_for_every_draw(float64, loss):
    lg = LinearGaussian()
    fam = _exact_full_rank(lg)
    vae = lg.vae(fam, num_data=4)
    x = lg.sample_x(4)
    standard = ReparamELBO(1) if isinstance(loss, ReparamELBO) else IWAE(3)
    for seed in range(5):
        for which, objective in (("path", loss), ("standard", standard)):
            pyro.set_rng_seed(seed)
            fam.zero_grad(set_to_none=True)
            objective.differentiable_loss(vae.model, vae.guide, x).backward()
            norm = torch.cat([p.grad.flatten() for p in fam.parameters()]).abs().max()
            if which == "path":
                assert float(norm) < 1e-9, (seed, float(norm))
            else:
                assert float(norm) > 1e-3, (seed, float(norm))


def test_stl_and_dreg_values_are_the_standard_values(float64):
    lg = LinearGaussian()
    vae = lg.vae(_diagonal_family(lg), num_data=40)
    x = lg.sample_x(4)
    for a, b in ((IWAE(4, "dreg"), IWAE(4)), (ReparamELBO(3, "stl"), ReparamELBO(3))):
        pyro.set_rng_seed(8)
        va = a.differentiable_loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(8)
        vb = b.loss(vae.model, vae.guide, x)
        assert float(va.detach()) == pytest.approx(vb, rel=1e-12)


def test_dreg_through_an_iaf_flow_matches_the_standard_gradient_in_mean(float64):
    """The generic path (a flow: log q at a fixed z needs the inverse) on a tiny IAF family."""
    lg = LinearGaussian()
    torch.manual_seed(0)
    base = DiagonalNormal(MLP(lg.D, (), 8, activate_output=True), lg.L).double()
    fam = Flow(base, iaf(lg.L, 8, num_transforms=2)).double()
    x0 = lg.sample_x(1)
    R = 4000
    x = x0.expand(R, -1)
    grads = {}
    for gradient in ("standard", "dreg"):
        vae = lg.vae(fam, num_data=R)
        draws = []
        pyro.set_rng_seed(9)
        for chunk in x.split(50):  # 80 gradients, each the mean over 50 draws
            fam.zero_grad(set_to_none=True)
            IWAE(3, gradient, max_plate_nesting=1).differentiable_loss(
                vae.model, vae.guide, chunk, torch.arange(len(chunk))
            ).backward()
            grads_now = [p.grad.flatten() for p in fam.parameters() if p.grad is not None]
            draws.append(torch.cat(grads_now))
        grads[gradient] = torch.stack(draws)
    n = len(grads["dreg"])
    m, v = grads["standard"].mean(0), grads["standard"].var(0)
    md, vd = grads["dreg"].mean(0), grads["dreg"].var(0)
    ok = (v + vd) > 1e-20
    z = (md - m)[ok] / ((v + vd)[ok] / n).sqrt()
    assert float(z.abs().max()) < 4.5
    assert float(vd.sum()) < float(v.sum())


# --------------------------------------------------------------------- fit, SVI, refusals
def _tiny_vae(family: str, num_data: int) -> VAE:
    torch.manual_seed(0)
    base = DiagonalNormal(MLP(784, (), 16, "tanh", activate_output=True), 4)
    fam = {
        "diagonal": lambda: base,
        "iaf": lambda: Flow(base, iaf(4, 16)),
        "planar": lambda: Flow(base, planar(4, 16)),
    }[family]()
    return VAE(StandardNormal(4), fam, Bernoulli(MLP(4, (16,), 784, "tanh")), num_data=num_data)


def _binary_data(n: int) -> torch.Tensor:
    from pyrovae.data import load_dataset

    x, _ = load_dataset("default", "train", binarize="none")[torch.arange(n)]
    return (x > 0.5).to(x.dtype)


@pytest.mark.parametrize("loss", [IWAE(5, "dreg"), ReparamELBO(2, "stl")], ids=["iwae", "elbo"])
def test_fit_trains_a_tiny_vae(loss):
    x = _binary_data(200)
    vae = _tiny_vae("diagonal", len(x))
    history = fit(vae, x, loss=loss, num_epochs=3, batch_size=50, lr=3e-3, progress=False)
    assert all(math.isfinite(v) for v in history.train_elbo)
    assert history.train_elbo[-1] > history.train_elbo[0] + 5


@pytest.mark.parametrize("family", ["diagonal", "iaf"])
def test_pyro_svi_trains_with_iwae(family):
    x = _binary_data(100)
    vae = _tiny_vae(family, len(x))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), IWAE(5, "dreg"))
    before = [p.detach().clone() for p in vae.family.parameters()]
    losses = [svi.step(x, torch.arange(len(x))) for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    moved = [not torch.equal(a, b) for a, b in zip(before, vae.family.parameters())]
    assert all(moved)  # SVI found every encoder (and flow) parameter through the param sites


@pytest.mark.parametrize("loss", [IWAE(3, "dreg"), ReparamELBO(1, "stl")], ids=["dreg", "stl"])
def test_path_gradients_refuse_a_planar_flow_in_one_line(loss):
    x = _binary_data(20)
    vae = _tiny_vae("planar", len(x))
    with pytest.raises(ConfigError, match="planar") as e:
        fit(vae, x, loss=loss, num_epochs=1, batch_size=10, progress=False)
    assert "\n" not in str(e.value)
    # the standard gradient works for planar flows (their own samples only)
    assert math.isfinite(IWAE(3).loss(vae.model, vae.guide, x))


def test_capability_is_declared_not_probed():
    x = torch.zeros(2, 784)
    assert log_prob_anywhere(_tiny_vae("iaf", 2).family(x))
    assert log_prob_anywhere(_tiny_vae("diagonal", 2).family(x))
    assert not log_prob_anywhere(_tiny_vae("planar", 2).family(x))

    class Declared(dist.Normal):
        log_prob_anywhere = False

    assert not log_prob_anywhere(Declared(0.0, 1.0))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: IWAE(num_particles=0), "num_particles must be an integer >= 1"),
        (lambda: IWAE(num_particles=2.5), "num_particles"),
        (lambda: IWAE(gradient="stl"), "ReparamELBO\\(gradient='stl'\\)"),
        (lambda: ReparamELBO(gradient="dreg"), "IWAE\\(gradient='dreg'\\)"),
        (lambda: IWAE(gradient="fast"), "choose one of 'standard', 'dreg'"),
        (lambda: IWAE(max_plate_nesting=-1), "max_plate_nesting"),
    ],
)
def test_bad_options_fail_in_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_global_latents_are_refused_by_iwae_but_not_by_the_elbo():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))

    x = torch.randn(5)
    with pytest.raises(ConfigError, match="outside the data plate") as e:
        IWAE(3).loss(model, guide, x)
    assert "\n" not in str(e.value)
    # the ELBO is linear in the log-densities: a global latent is fine, and it is Trace_ELBO
    pyro.set_rng_seed(1)
    a = ReparamELBO(1, max_plate_nesting=1).loss(model, guide, x)
    pyro.set_rng_seed(1)
    assert a == pytest.approx(Trace_ELBO().loss(model, guide, x), rel=1e-6)


# ------------------------------------------------------------------------------- the example
def test_iwae_example_runs_in_smoke_mode(capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "iwae.py"
    spec = importlib.util.spec_from_file_location("iwae_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--objectives", "elbo,iwae5-dreg", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "test log p(x)" in out and "active" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "elbo" in lines and "iwae5-dreg" in lines
    assert set(results) == {"elbo", "iwae5-dreg"}
    for r in results.values():
        assert math.isfinite(r["test_log_px"]) and -600 < r["test_log_px"] < 0
        # K = 20 importance samples: log p(x) estimate above the one-sample ELBO
        assert r["test_log_px"] > r["test_elbo"]
        assert 0 <= r["active_units"] <= r["latent_dim"]
        assert f"{r['test_log_px']:.2f}" in out
    assert (tmp_path / "results.json").is_file()


def test_path_gradients_refuse_a_guide_with_two_latent_sites():
    def model(x):
        with pyro.plate("data", 10, subsample=torch.arange(len(x))):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", 10, subsample=torch.arange(len(x))):
            a = pyro.sample("a", dist.Normal(loc + 0 * x, 1.0))
            pyro.sample("b", dist.Normal(a, 1.0))

    x = torch.randn(5)
    for loss in (IWAE(3, "dreg"), ReparamELBO(1, "stl")):
        with pytest.raises(ConfigError, match="one latent site") as e:
            loss.loss(model, guide, x)
        assert "\n" not in str(e.value)
    assert math.isfinite(IWAE(3).loss(model, guide, x))  # the standard gradient handles them


# ------------------------------------------------------------------- every kind of part
def _parts_cases() -> list[tuple[str, str, str]]:
    from pyrovae.build import FAMILIES, LIKELIHOODS, PRIORS

    cases = [(p, "iaf" if p == "vamp" else "diagonal", "bernoulli") for p in PRIORS]
    cases += [("standard", f, "bernoulli") for f in FAMILIES]
    cases += [("standard", "diagonal", lik) for lik in LIKELIHOODS if lik != "bernoulli"]
    return cases


@pytest.mark.parametrize("prior,family,likelihood", _parts_cases(), ids="-".join)
def test_every_part_works_through_the_traces(prior, family, likelihood):
    """One axis at a time (the other parts fixed): IWAE(1) equals Trace_ELBO on the same draws,
    and IWAE(3) (DReG where the family can evaluate log q anywhere) gives finite gradients that
    reach every parameter the ELBO's gradient reaches."""
    from pyrovae.build import VAEConfig, build_vae

    x = _binary_data(8)
    if likelihood != "bernoulli":
        x = x * 0.9 + 0.05  # inside every likelihood's support (e.g. a logit-normal)
    config = VAEConfig(
        num_features=784, latent_dim=2, hidden_dims=(8,), prior=prior, family=family,
        likelihood=likelihood, image_shape=(28, 28),
        options={"num_pseudo_inputs": 3, "num_components": 3, "num_transforms": 2},
    )
    vae = build_vae(config, num_data=40)
    idx = torch.arange(len(x))
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(11)
        expected = Trace_ELBO().loss(vae.model, vae.guide, x, idx)
        pyro.set_rng_seed(11)
        assert IWAE(1, max_plate_nesting=1).loss(vae.model, vae.guide, x, idx) == pytest.approx(
            expected, rel=1e-5
        )
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, idx).backward()
        reached = {
            n for n, p in vae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        vae.zero_grad(set_to_none=True)
        q = vae.family(x, idx)
        gradient = "dreg" if log_prob_anywhere(q) else "standard"
        value = IWAE(3, gradient).differentiable_loss(vae.model, vae.guide, x, idx)
        value.backward()
    assert math.isfinite(float(value.detach()))
    grads = {n: p.grad for n, p in vae.named_parameters() if p.grad is not None}
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    missing = sorted(n for n in reached if n not in grads or not bool(grads[n].abs().sum() > 0))
    assert not missing, f"{gradient}: no gradient reaches {missing}"

"""One semantics: the user's Pyro program is what trains and what is scored, and the direct
evaluation (pyrovae.fastpath) runs only where it proves itself equal to Pyro's on that program.

The penalty cases: a ``pyro.factor("penalty", -20)`` per datapoint, written in a VAE subclass's
``model``, in a likelihood's ``forward`` or (as a +5 factor) in a rewritten ``guide``, shifts every
number by exactly that many nats per datapoint: the training objective of ``fit`` (Trace_ELBO
and IWAE), ``elbo``, ``log_likelihood``, ``iwae_bounds``, ``ais`` and ``gaps``. A constant factor
leaves the gradients, and so the whole training trajectory, unchanged, which makes the shift exact.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

import pyrovae
from pyrovae import (
    MLP,
    VAE,
    Bernoulli,
    DiagonalNormal,
    StandardNormal,
    fastpath,
)
from pyrovae.build import FAMILIES, LIKELIHOODS, PRIORS, VAEConfig, build_vae
from pyrovae.errors import ConfigError, FastPathWarning
from pyrovae.losses import IWAE

N, D, LATENT = 24, 6, 2
PENALTY = -20.0


class Penalized(VAE):
    """A subclass whose public model adds a per-datapoint factor (a rewrite, as a user writes it)."""

    def model(self, x, idx=None, *, kl_weight=1.0):
        pyro.module(self._param_name, self)
        with self._plate(x, idx):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)
            pyro.factor("penalty", x.new_full((x.shape[0],), PENALTY))
        return z


class GuideBonus(VAE):
    """A rewritten guide with a factor: Pyro's ELBO subtracts it (log q + c), so +5 here is -5."""

    def guide(self, x, idx=None, *, kl_weight=1.0):
        pyro.module(self._param_name, self)
        with self._plate(x, idx) as i:
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.family(x, i))
            pyro.factor("bonus", x.new_full((x.shape[0],), 5.0), has_rsample=True)
        return z


class PenalizedBernoulli(Bernoulli):
    """A likelihood whose forward holds the factor (it runs inside the model's data plate)."""

    def forward(self, z):
        pyro.factor("penalty", z.new_full(z.shape[:-1], PENALTY))
        return super().forward(z)


class Shifted(VAE):
    """A model with a pyro.param outside the VAE's modules (a user's own parameter)."""

    def model(self, x, idx=None, *, kl_weight=1.0):
        shift = pyro.param("my_shift", torch.zeros(()))
        pyro.module(self._param_name, self)
        with self._plate(x, idx):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Bernoulli(logits=self.likelihood.decoder(z) + shift).to_event(1),
                        obs=x)
        return z


def _vae(cls=VAE, likelihood_cls=Bernoulli, num_data=N):
    torch.manual_seed(0)
    return cls(StandardNormal(LATENT), DiagonalNormal(MLP(D, (8,), 8), LATENT),
               likelihood_cls(MLP(LATENT, (8,), D)), num_data=num_data)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((N, D), 0.4), generator=g)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ the penalty cases
@pytest.mark.parametrize("variant,shift", [
    ("model", PENALTY), ("likelihood", PENALTY), ("guide", -5.0),
])
@pytest.mark.parametrize("loss", ["trace_elbo", "iwae"])
def test_fit_trains_the_users_program(data, variant, shift, loss):
    """fit's training objective is the user's: shifted by the factor, same trajectory."""
    def make():
        if variant == "model":
            return _vae(Penalized)
        if variant == "likelihood":
            return _vae(likelihood_cls=PenalizedBernoulli)
        return _vae(GuideBonus)

    losses = {"trace_elbo": Trace_ELBO, "iwae": lambda: IWAE(5)}
    plain = _quiet(pyrovae.fit, _vae(), data, loss=losses[loss](), num_epochs=2, batch_size=8,
                   progress=False, seed=3)
    user = _quiet(pyrovae.fit, make(), data, loss=losses[loss](), num_epochs=2, batch_size=8,
                  progress=False, seed=3)
    for a, b in zip(user.train_objective, plain.train_objective):
        assert a == pytest.approx(b + shift, abs=1e-3)


@pytest.mark.parametrize("variant,shift", [
    ("model", PENALTY), ("likelihood", PENALTY), ("guide", -5.0),
])
def test_every_estimator_scores_the_users_program(data, variant, shift, float64):
    """elbo, log_likelihood, iwae_bounds, ais and gaps see the factor: the same draws (same seed)
    give the plain VAE's numbers shifted by exactly the factor (float64, so that AIS's accept
    decisions do not flip on rounding)."""
    user = {"model": lambda: _vae(Penalized), "likelihood": lambda: _vae(likelihood_cls=PenalizedBernoulli),
            "guide": lambda: _vae(GuideBonus)}[variant]()
    plain = _vae()
    x = data[:6].double()
    for estimator, kwargs in (
        (pyrovae.elbo, {"num_samples": 4}),
        (pyrovae.log_likelihood, {"num_samples": 30, "diagnostics": False}),
        (pyrovae.iwae_bounds, {"num_samples": (1, 10)}),
        (pyrovae.ais, {"num_intermediate": 20, "num_chains": 2, "leapfrog_steps": 2}),
    ):
        a = _quiet(estimator, user, x, seed=4, **kwargs)
        b = _quiet(estimator, plain, x, seed=4, **kwargs)
        assert a.mean == pytest.approx(b.mean + shift, abs=1e-3), estimator.__name__
    # gaps: log p(x), L[q*] and L[q] all move by the factor (the model's); a guide's factor is
    # part of the amortized guide only, so only L[q] moves for it.
    a = _quiet(pyrovae.gaps, user, x, seed=5, num_samples=50, num_steps=20, log_px="is")
    b = _quiet(pyrovae.gaps, plain, x, seed=5, num_samples=50, num_steps=20, log_px="is")
    assert a.elbo_amortized.mean() == pytest.approx(float(b.elbo_amortized.mean()) + shift, abs=1e-3)
    if variant != "guide":
        assert a.log_px.mean() == pytest.approx(float(b.log_px.mean()) + shift, abs=1e-3)
        assert a.elbo_optimal.mean() == pytest.approx(float(b.elbo_optimal.mean()) + shift, abs=1e-3)


def test_pyros_own_loss_agrees(data):
    """The reference: Pyro's Trace_ELBO on the public programs sees the penalty too."""
    idx = torch.arange(N)
    losses = []
    for vae in (_vae(), _vae(Penalized)):
        pyro.set_rng_seed(0)
        losses.append(Trace_ELBO().loss(vae.model, vae.guide, data, idx) / N)
    assert losses[1] == pytest.approx(losses[0] - PENALTY, abs=1e-4)


# ------------------------------------------------------------------------------ the run-time proof
def _verdict(vae, x, kl_weight=1.0, weighted=False):
    loss = fastpath.TrainingLoss(vae, Trace_ELBO(), weighted=weighted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verdict = loss.prepare(x, torch.arange(len(x)), kl_weight)
    return verdict, [w for w in caught if issubclass(w.category, FastPathWarning)]


def test_the_vaes_own_program_is_proven_with_its_closed_forms(data):
    verdict, said = _verdict(_vae(), data[:8], 0.7, weighted=True)
    assert verdict.level == "closed_forms" and not said


@pytest.mark.parametrize("make,site", [
    (lambda: _vae(Penalized), "'penalty'"),
    (lambda: _vae(likelihood_cls=PenalizedBernoulli), "'penalty'"),
    (lambda: _vae(GuideBonus), "'bonus'"),
])
def test_other_sites_send_it_to_pyro_and_say_so_once(data, make, site):
    vae = make()
    verdict, said = _verdict(vae, data[:8])
    assert verdict.level is None and site in verdict.reason
    assert len(said) == 1 and site in str(said[0].message)
    again, said = _verdict(vae, data[:8])  # remembered: said once
    assert again == verdict and not said


def test_a_param_that_is_not_the_vaes_sends_it_to_pyro(data):
    pyro.clear_param_store()
    verdict, _ = _verdict(_vae(Shifted), data[:8])
    assert verdict.level is None and "my_shift" in verdict.reason


def test_a_closed_form_off_by_a_constant_is_caught(data, float64):
    """A declared closed form that is wrong (off by 0.1 nats) is not used: the proof falls back to
    the parts' distributions, which equal Pyro's, and says why; training then gives Pyro's loss."""

    class OffPrior(StandardNormal):
        def log_prob(self, z):
            return super().log_prob(z) + 0.1

    torch.manual_seed(0)
    vae = VAE(OffPrior(LATENT), DiagonalNormal(MLP(D, (8,), 8), LATENT),
              Bernoulli(MLP(LATENT, (8,), D)), num_data=N).double()
    x = data[:8].double()
    verdict, said = _verdict(vae, x)
    assert verdict.level == "distributions" and "OffPrior" in verdict.reason and len(said) == 1
    loss = fastpath.TrainingLoss(vae, Trace_ELBO(), weighted=False)
    torch.manual_seed(2)
    ours = loss(x, torch.arange(8))
    torch.manual_seed(2)
    pyros = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, torch.arange(8))
    assert float(ours.detach()) == pytest.approx(float(pyros.detach()), rel=1e-12)
    # ...while the wrong closed form itself would have been off by 0.1 per datapoint:
    torch.manual_seed(2)
    wrong = fastpath.elbo_loss(vae, x, torch.arange(8), level="closed_forms")
    assert float(wrong.detach()) - float(pyros.detach()) == pytest.approx(-0.1 * N, rel=1e-9)


def test_a_subclass_that_changes_the_distribution_is_not_given_its_parents_closed_form(data, float64):
    class Wide(StandardNormal):
        def forward(self):
            return dist.Normal(self.loc, 2 * self.scale).to_event(1)

    torch.manual_seed(0)
    vae = VAE(Wide(LATENT), DiagonalNormal(MLP(D, (8,), 8), LATENT),
              Bernoulli(MLP(LATENT, (8,), D)), num_data=N).double()
    verdict, _ = _verdict(vae, data[:8].double())
    assert verdict.level == "distributions"


def test_a_model_that_ignores_the_kl_weight_is_caught_at_the_second_weight(data):
    class Unweighted(VAE):
        def model(self, x, idx=None, *, kl_weight=1.0):  # drops the weight
            pyro.module(self._param_name, self)
            with self._plate(x, idx):
                z = pyro.sample("z", self.prior())
                pyro.sample("x", self.likelihood(z), obs=x)
            return z

    verdict, _ = _verdict(_vae(Unweighted), data[:8], 1.0, weighted=True)
    assert verdict.level is None and "'z'" in verdict.reason and "scaled" in verdict.reason
    # without a KL weight the same rewrite is the VAE's program, and is proven
    assert _verdict(_vae(Unweighted), data[:8], 1.0, weighted=False)[0].fast


def test_the_proof_draws_nothing_and_keeps_the_buffers(data):
    vae = _vae()
    vae.register_buffer("counter", torch.zeros(()))
    real = vae.likelihood.forward

    def counting(z):
        vae.counter += 1
        return real(z)

    vae.likelihood.forward = counting  # an instance method: a new program key, proven anew
    state = torch.get_rng_state()
    verdict, _ = _verdict(vae, data[:8], 0.5, weighted=True)
    assert verdict.fast
    assert torch.equal(torch.get_rng_state(), state) and float(vae.counter) == 0


def test_the_proof_is_made_again_when_a_part_changes(data):
    vae = _vae()
    assert _verdict(vae, data[:8])[0].fast
    vae.likelihood = PenalizedBernoulli(MLP(LATENT, (8,), D))
    assert not _verdict(vae, data[:8])[0].fast


def test_fit_uses_the_direct_loss_for_the_vae_and_pyros_for_a_rewrite(data, monkeypatch):
    """Counting Pyro's evaluations of the training loss: the plain VAE runs Pyro's loss only in
    its proof (two KL weights), the rewrite at every step."""
    calls = []
    real = Trace_ELBO.differentiable_loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trace_ELBO, "differentiable_loss", counted)
    steps = 2 * N // 8
    _quiet(pyrovae.fit, _vae(), data, num_epochs=2, batch_size=8, progress=False, beta=0.5)
    assert len(calls) == 2
    calls.clear()
    _quiet(pyrovae.fit, _vae(Penalized), data, num_epochs=2, batch_size=8, progress=False)
    assert len(calls) == steps


def test_the_estimators_use_the_direct_weights_only_where_proven(data):
    from pyrovae.evaluation import Program

    x, idx = data[:6], torch.arange(6)
    for vae, fast in ((_vae(), True), (_vae(Penalized), False), (_vae(GuideBonus), False)):
        program = Program.resolve(vae)
        _quiet(program.analyze, x, idx)
        assert program.fast is fast
        torch.manual_seed(1)
        a = program.log_weights(x, idx, 5)
        torch.manual_seed(1)
        b = program.log_weights(x, idx, 5, traced=True)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compile_is_refused_in_one_line_for_a_program_it_cannot_take(data):
    with pytest.raises(ConfigError, match="penalty.*without compile=True"):
        _quiet(pyrovae.fit, _vae(Penalized), data, num_epochs=1, batch_size=8, progress=False,
               compile=True)
    with pytest.raises(ConfigError, match="penalty.*without compile=True"):
        _quiet(pyrovae.log_likelihood, _vae(Penalized), data, 10, compile=True)


def test_a_guide_with_a_latent_the_model_lacks_is_refused_by_the_estimators(data):
    class Auxiliary(VAE):
        def guide(self, x, idx=None, *, kl_weight=1.0):
            pyro.module(self._param_name, self)
            with self._plate(x, idx) as i:
                pyro.sample("a", dist.Normal(0.0, 1.0))
                return pyro.sample("z", self.family(x, i))

    with pytest.raises(ConfigError, match="guide samples 'a'"):
        _quiet(pyrovae.log_likelihood, _vae(Auxiliary), data, 10)


# ------------------------------------------------------------------------------ the shipped parts
def _one_part_cases():
    base = {"prior": "standard", "family": "diagonal", "likelihood": "bernoulli"}
    cases = []
    for kind, names in (("prior", PRIORS), ("family", FAMILIES), ("likelihood", LIKELIHOODS)):
        for name in names:
            cases.append({**base, kind: name})
    return cases


@pytest.mark.parametrize("case", _one_part_cases(), ids=lambda c: "-".join(c.values()))
def test_every_shipped_part_takes_the_direct_path(case, float64):
    """Every prior, family and likelihood of the CLI (each beside the defaults) is proven: the
    direct loss and weights run for the library's own parts (so they keep their speed)."""
    options = {"num_pseudo_inputs": 4}
    if "hierarchical" in case.values() or "bottom_up" in case.values():
        options.update(layers=[2, 1], layer_hidden_dims=[4])
    config = VAEConfig(num_features=16, latent_dim=3, hidden_dims=(6,), image_shape=(4, 4),
                       options=options, **case)
    torch.manual_seed(0)
    vae = build_vae(config, num_data=N).double()
    g = torch.Generator().manual_seed(0)
    if case["likelihood"] == "bernoulli":
        x = torch.bernoulli(torch.full((8, 16), 0.4), generator=g).double()
    elif case["likelihood"] == "categorical256":
        x = (torch.randint(0, 256, (8, 16), generator=g) / 255).double()
    else:
        x = torch.rand(8, 16, generator=g).double().clamp(0.05, 0.95)
    verdict, said = _verdict(vae, x, 0.6, weighted=True)
    assert verdict.fast and not said, verdict.reason
    if getattr(vae.family, "amortized", True):
        from pyrovae.evaluation import Program

        program = Program.resolve(vae.eval())
        _quiet(program.analyze, x, torch.arange(8))
        assert program.fast


def test_bdmc_refuses_a_model_whose_factor_reweights_its_joint(data):
    """BDMC simulates (x, z) by ancestral sampling, which a pyro.factor does not follow."""
    with pytest.raises(ConfigError, match="pyro.factor.*BDMC cannot simulate"):
        _quiet(pyrovae.bdmc, _vae(Penalized), 4, num_intermediate=5, num_chains=2, example=data[:1])


def test_fit_refuses_a_parameter_it_would_not_train(data, tmp_path):
    """A pyro.param outside the VAE's modules would stay at its initial value under fit (which
    optimizes and checkpoints the VAE's parameters): refused in one line before any update."""
    pyro.clear_param_store()
    vae = _vae(Shifted)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    for loss in (Trace_ELBO(), IWAE(3)):
        with pytest.raises(ConfigError, match="'my_shift'.*never change"):
            _quiet(pyrovae.fit, vae, data, loss=loss, num_epochs=1, batch_size=8, progress=False,
                   checkpoint_dir=tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

"""The core estimators against the linear-Gaussian model's closed forms, and the plate's scale."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from conftest import assert_close
from linear_gaussian import LinearGaussian
from pyrovae import (
    MLP,
    VAE,
    Bernoulli,
    ConfigError,
    DataError,
    DiagonalNormal,
    StandardNormal,
    elbo,
    fit,
    log_likelihood,
    log_weights,
)


@pytest.fixture
def lg(float64) -> LinearGaussian:
    return LinearGaussian(latent_dim=3, num_features=5, scale=0.7)


@pytest.mark.parametrize("num_samples", [1, 7, 300])
def test_exact_posterior_gives_exact_log_likelihood(lg, num_samples):
    """With q = p(z|x) every importance weight equals log p(x): the estimate is exact for any K."""
    x = lg.sample_x(40)
    vae = lg.vae(lg.exact_family())
    w = log_weights(vae, x, num_samples=num_samples)
    assert w.shape == (num_samples, 40)
    assert_close(w, lg.log_px(x).expand(num_samples, -1), rtol=0, atol=1e-10)
    ll = log_likelihood(vae, x, num_samples=num_samples, max_rows=64)
    assert_close(ll.values, lg.log_px(x), rtol=0, atol=1e-10)
    # The ELBO of the exact posterior is log p(x) too (the gap is KL(q || p(z|x)) = 0).
    assert_close(elbo(vae, x, num_samples=num_samples).values, lg.log_px(x), rtol=0, atol=1e-10)


def test_diagonal_family_elbo_is_below_and_is_approaches(lg):
    """The best diagonal Gaussian's ELBO sits exactly diagonal_gap() below log p(x); importance
    sampling closes the gap as K grows."""
    x = lg.sample_x(30)
    vae = lg.vae(lg.best_diagonal_family())
    exact = lg.log_px(x)
    gap = lg.diagonal_gap()
    assert gap > 0.05
    e = elbo(vae, x, num_samples=4000, seed=0)
    assert (e.values < exact).all()
    # MC error of a 4000-sample mean per point is small; compare the average gap.
    assert abs(float((exact - e.values).mean()) - gap) < 4 * e.stderr / math.sqrt(4000) + 0.01
    # L_1's error is the ELBO's (its 4000-draw average, not one noisy draw); L_K's shrinks with K.
    errors = [float((exact - e.values).mean())]
    for k in (10, 100, 2000):
        ll = log_likelihood(vae, x, num_samples=k, seed=0)
        errors.append(float((exact - ll.values).mean()))
    assert errors[0] > errors[1] > errors[2] > errors[3] >= -0.01
    assert errors[-1] < 0.05 * gap + 0.01


def test_log_likelihood_chunking_keeps_values(lg):
    """Memory chunking (max_rows) changes only how draws are batched, never the estimand: with the
    exact posterior any chunking gives log p(x) exactly, also for K far above max_rows."""
    x = lg.sample_x(3)
    vae = lg.vae(lg.exact_family())
    ll = log_likelihood(vae, x, num_samples=5000, max_rows=700)
    assert ll.num_samples == 5000
    assert_close(ll.values, lg.log_px(x), rtol=0, atol=1e-9)


def test_subsample_scale_never_reaches_the_weights(lg):
    """log p(x) does not depend on the plate's num_data (the minibatch scale)."""
    x = lg.sample_x(20)
    family = lg.best_diagonal_family()
    small = lg.vae(family, num_data=20)
    large = VAE(small.prior, family, small.likelihood, num_data=10**6)
    a = log_likelihood(small, x, num_samples=50, seed=3)
    b = log_likelihood(large, x, num_samples=50, seed=3)
    assert_close(a.values, b.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_plate_scales_minibatch_loss_by_num_data_over_batch(lg, loss_cls):
    """loss(x_B, idx) == -(num_data / |B|) * sum of the per-datapoint ELBO terms (same draws)."""
    num_data = 1000
    x = lg.sample_x(8)
    idx = torch.tensor([3, 17, 150, 151, 600, 700, 998, 999])
    vae = lg.vae(lg.best_diagonal_family(), num_data=num_data)
    pyro.set_rng_seed(5)
    loss = loss_cls().loss(vae.model, vae.guide, x, idx)
    pyro.set_rng_seed(5)
    w = log_weights(vae, x, idx, num_samples=1)[0]
    if loss_cls is Trace_ELBO:
        expected = -(num_data / len(idx)) * float(w.detach().sum())
        assert loss == pytest.approx(expected, rel=1e-12)
    else:
        # Analytic KL: E_q[log p(x|z)] - KL(q || p) per datapoint, scaled the same way.
        q = vae.family(x, idx)
        kl = torch.distributions.kl_divergence(q, vae.prior().expand([len(x)]))
        pyro.set_rng_seed(5)
        z = q.rsample()
        rec = vae.likelihood(z).log_prob(x)
        expected = -(num_data / len(idx)) * float((rec - kl).sum())
        assert loss == pytest.approx(expected, rel=1e-12)


def _tiny_vae(num_data: int, latent_dim: int = 4) -> VAE:
    return VAE(
        StandardNormal(latent_dim),
        DiagonalNormal(MLP(784, (), 64, activate_output=True), latent_dim),
        Bernoulli(MLP(latent_dim, (64,), 784)),
        num_data=num_data,
    )


@pytest.fixture(scope="module")
def default_sample():
    from pyrovae.data import load_default

    train = load_default("train")
    test = load_default("test")
    return train.subset(2000), test.subset(300).binarized(generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loss_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_training_on_real_digits_raises_validation_elbo(default_sample, loss_cls):
    """A few epochs on 2000 real (bundled) MNIST digits lift the validation ELBO by > 100 nats."""
    train, valid = default_sample
    vae = _tiny_vae(len(train), latent_dim=8)
    before = elbo(vae, valid, num_samples=1, seed=0).mean
    history = fit(vae, train, loss=loss_cls(), num_epochs=3, batch_size=64, lr=3e-3,
                  validation=valid, progress=False)
    assert history.num_steps == 3 * math.ceil(len(train) / 64)
    assert len(history.validation_elbo) == 3
    assert history.validation_elbo[-1] > before + 100
    assert history.train_elbo[-1] > history.train_elbo[0]
    # The importance-sampled log-likelihood bounds the ELBO from above (on average).
    ll = log_likelihood(vae, valid, num_samples=50, seed=0)
    assert ll.mean > elbo(vae, valid, num_samples=1, seed=0).mean


def test_training_on_full_mnist_digits(real_data_root):
    """The same on 3000 digits of the real MNIST files (skips without PYROVAE_DATA)."""
    from pyrovae.data import load_mnist

    train = load_mnist(real_data_root, "train", binarize="dynamic").subset(3000)
    valid = load_mnist(real_data_root, "test", binarize="dynamic").subset(500)
    valid = valid.binarized(generator=torch.Generator().manual_seed(0))
    vae = _tiny_vae(len(train), latent_dim=8)
    before = elbo(vae, valid, seed=0).mean
    history = fit(vae, train, num_epochs=2, batch_size=100, lr=3e-3, validation=valid,
                  progress=False)
    assert history.validation_elbo[-1] > before + 100


def test_bad_inputs_fail_before_training(default_sample):
    train, _ = default_sample
    grey = train.images if hasattr(train, "images") else None
    vae = _tiny_vae(len(train))
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(DataError, match="support"):
        fit(vae, grey, num_epochs=1, progress=False)
    nan = torch.bernoulli(torch.full((len(train), 784), 0.5))
    nan[3, 5] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fit(vae, nan, num_epochs=1, progress=False)
    with pytest.raises(DataError, match="784"):
        fit(_tiny_vae(10), torch.zeros(10, 100), num_epochs=1, batch_size=5, progress=False)
    with pytest.raises(ConfigError, match="num_data"):
        fit(vae, torch.zeros(5, 784), num_epochs=1, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        fit(_tiny_vae(5), torch.zeros(5, 784), batch_size=6, progress=False)
    with pytest.raises(DataError, match="empty"):
        log_likelihood(vae, torch.zeros(0, 784))
    with pytest.raises(ConfigError, match="num_samples"):
        log_likelihood(vae, torch.zeros(2, 784), num_samples=0)
    for p, q in zip(before, vae.parameters()):
        assert torch.equal(p, q), "a failed call must not touch the parameters"

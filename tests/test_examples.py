"""Each example runs end to end on small data (``--smoke``), as a user would run it, and what it
prints and returns is checked against closed forms where the example has them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from linear_gaussian import LinearGaussian

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"pyrovae_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_png(path: Path, max_kb: int = 400) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert 2_000 < len(data) < max_kb * 1024, f"{path} has {len(data)} bytes"


def test_svi_example_trains_with_pyro_svi(capsys):
    ll = _load("svi_vae").main(["--epochs", "2", "--num-train", "1000", "--num-samples", "20",
                                "--latent-dim", "8"])
    out = capsys.readouterr().out
    assert "epoch 2" in out and "test log-likelihood" in out
    # 784 Bernoulli pixels at p=1/2 give -543 nats; two epochs of SVI must do far better.
    assert math.isfinite(ll) and ll > -400


def test_swap_parts_example_trains_both_models(capsys):
    results = _load("swap_parts").main(
        ["--prior", "vamp", "--family", "iaf", "--loss", "iwae", "--epochs", "1",
         "--num-train", "300", "--num-samples", "30", "--gap-points", "4", "--gap-steps", "20",
         "--latent-dim", "4"]
    )
    out = capsys.readouterr().out
    assert "baseline" in out and "vamp prior, iaf family, iwae" in out
    assert len(results) == 2
    for r in results.values():
        # the importance-sampled estimate is an IWAE bound: above the ELBO
        assert r["log_px"] > r["elbo"]
        assert r["amortization_gap"] >= 0  # L[q*] is never below L[q]


# ------------------------------------------------------------------ linear_gaussian.py
def test_linear_gaussian_closed_forms_match_the_reference(float64):
    """The example's own closed forms agree with the test suite's pPCA reference, and the exact
    posterior satisfies Bayes' rule: log p(x) = log p(x|z) + log p(z) - log p(z|x) at any z."""
    ex = _load("linear_gaussian")
    ref = LinearGaussian(latent_dim=3, num_features=5, scale=0.7, seed=1)
    x = ref.sample_x(7)
    assert_close(ex.exact_log_px(ref.W, ref.b, ref.s, x), ref.log_px(x), rtol=1e-10, atol=1e-10)
    assert_close(ex.diagonal_gap(ref.W, ref.s), ref.diagonal_gap(), rtol=1e-10, atol=1e-12)
    mean, cov = ex.exact_posterior(ref.W, ref.b, ref.s, x)
    z = torch.randn(7, 3, dtype=torch.float64)
    post = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    lik = torch.distributions.Normal(z @ ref.W.T + ref.b, ref.s).log_prob(x).sum(-1)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert_close(lik + prior - post.log_prob(z), ref.log_px(x), rtol=1e-9, atol=1e-9)


def test_linear_gaussian_example_reaches_the_closed_forms(capsys, tmp_path, one_thread):
    r = _load("linear_gaussian").main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "exact log p(x)" in out and "closed form for the best diagonal q" in out
    # the printed closed form is the reference formula for the example's decoder
    lam = (r["W"].T @ r["W"] + r["scale"] ** 2 * torch.eye(r["W"].shape[1], dtype=torch.float64))
    lam = lam / r["scale"] ** 2
    expected_gap = 0.5 * float(torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam))
    assert_close(r["closed_form_gap"], expected_gap, rtol=1e-10)
    assert expected_gap > 0.3, "the example's posterior must be correlated enough to show a gap"
    assert f"{expected_gap:.3f}" in out
    diag, full = r["diagonal"], r["full_rank"]
    # A trained diagonal family cannot beat the best diagonal Gaussian, and gets close to it.
    assert expected_gap - 0.03 < diag["gap"] < expected_gap + 0.08
    # The full-rank family contains the posterior: its gap closes.
    assert abs(full["gap"]) < 0.04
    exact = r["exact_log_px"]
    ks = sorted(diag["iwae"])
    assert ks[0] == 1 and ks[-1] >= 1000
    # L_1 is the ELBO; the IWAE bound rises with K toward log p(x) and stays below it.
    assert_close(diag["iwae"][1], diag["elbo"], atol=0.1)
    lk = [diag["iwae"][k] for k in ks]
    assert all(a <= b + 1e-3 for a, b in zip(lk, lk[1:])), lk
    assert max(lk) < exact + 0.01
    assert exact - diag["iwae"][ks[-1]] < 0.3 * (exact - diag["iwae"][1])
    # with an (almost) exact proposal every L_K is log p(x)
    for k in ks:
        assert abs(full["iwae"][k] - exact) < 0.1
    _assert_png(tmp_path / "linear_gaussian_bounds.png")
    _assert_png(tmp_path / "linear_gaussian_posterior.png")


# ------------------------------------------------------------------ latent_manifold.py
def test_knn_accuracy_and_digit_pairs():
    ex = _load("latent_manifold")
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(3).repeat_interleave(20)
    z = centres[y] + 0.1 * torch.randn(60, 2)
    assert ex.knn_accuracy(z, y, z + 0.01, y, k=5) == 1.0
    assert ex.knn_accuracy(z, y, z, (y + 1) % 3, k=5) == 0.0
    starts, ends = ex.pairs_of_different_digits(torch.tensor([3, 1, 0, 1, 2, 0]), 2)
    assert (starts, ends) == ([2, 1], [1, 4])  # first 0 -> first 1, first 1 -> first 2


def test_latent_manifold_example(capsys, tmp_path, one_thread):
    from PIL import Image

    r = _load("latent_manifold").main(["--smoke", "--out", str(tmp_path), "--steps", "12"])
    out = capsys.readouterr().out
    assert "test log p(x)" in out and "nearest-neighbour label accuracy" in out
    assert r["num_codes"] == 300
    # the codes sort the digits by class although no label was used in training: chance is 10%
    assert r["knn_accuracy"] > 0.2
    assert -300 < r["test_elbo"] < -100
    assert r["test_log_px"] > r["test_elbo"]  # an IWAE bound with K=50 is above the ELBO
    assert all(math.isfinite(v) for v in r["code_mean"] + r["code_var"])
    # 12 x 12 decoded 28 x 28 digits with 2-pixel padding; 6 interpolations of 10 steps
    with Image.open(tmp_path / "manifold.png") as im:
        assert im.size == (12 * 30 + 2, 12 * 30 + 2)
    with Image.open(tmp_path / "interpolations.png") as im:
        assert im.size == (10 * 30 + 2, 6 * 30 + 2)
    _assert_png(tmp_path / "latent_codes.png")


def test_latent_manifold_rejects_unknown_data():
    with pytest.raises(SystemExit, match="latent_manifold: unknown dataset"):
        _load("latent_manifold").main(["--dataset", "nope", "--smoke"])

"""Each example runs end to end on small data (``--smoke``), as a user would run it, and what it
prints and returns is checked against closed forms where the example has them."""

from __future__ import annotations

import importlib.util
import json
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


def test_svi_example_trains_with_pyro_svi(capsys, tmp_path):
    ll = _load("svi_vae").main(["--epochs", "2", "--num-train", "1000", "--num-samples", "20",
                                "--latent-dim", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "epoch 2" in out and "test log-likelihood" in out
    # 784 Bernoulli pixels at p=1/2 give -543 nats; two epochs of SVI must do far better.
    assert math.isfinite(ll) and ll > -400
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["train_elbo"]) == 2 and saved["test_log_likelihood"]["mean"] == pytest.approx(ll)
    _assert_png(tmp_path / "samples.png")


def test_svi_example_smoke_is_one_short_epoch(tmp_path):
    _load("svi_vae").main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["train_elbo"]) == 1 and saved["args"]["num_train"] == "500"


def test_swap_parts_example_trains_both_models(capsys, tmp_path):
    results = _load("swap_parts").main(
        ["--prior", "vamp", "--family", "iaf", "--loss", "iwae", "--epochs", "1",
         "--num-train", "300", "--num-samples", "30", "--gap-points", "4", "--gap-steps", "20",
         "--latent-dim", "4", "--gap-estimator", "is", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"].keys() == results.keys()
    _assert_png(tmp_path / "samples_baseline.png")
    _assert_png(tmp_path / "samples_variant.png")
    out = capsys.readouterr().out
    assert "baseline" in out and "vamp prior, iaf family, iwae" in out
    assert len(results) == 2
    for r in results.values():
        # the importance-sampled estimate is an IWAE bound: above the ELBO
        assert r["log_px"] > r["elbo"]
        assert math.isfinite(r["approximation_gap"]) and math.isfinite(r["amortization_gap"])


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
    # (L_1 is one draw per datapoint: about 0.1 nats of Monte Carlo noise on 100 points)
    assert_close(diag["iwae"][1], diag["elbo"], atol=0.3)
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
    _assert_png(tmp_path / "khat.png")


def test_latent_manifold_rejects_unknown_data():
    with pytest.raises(SystemExit, match="latent_manifold: unknown dataset"):
        _load("latent_manifold").main(["--dataset", "nope", "--smoke"])


# ------------------------------------------------------------------ posterior_collapse.py
class _PriorFamily(torch.nn.Module):
    """q(z | x) = N(0, I) for every x: the aggregate posterior is the prior."""

    latent_dim = 2

    def forward(self, x, idx=None):
        return torch.distributions.Independent(
            torch.distributions.Normal(torch.zeros(len(x), 2), torch.ones(len(x), 2)), 1)


class _ShiftedFamily(torch.nn.Module):
    """q(z | x_n) = N((x_n, 0), 0.5^2 I)."""

    latent_dim = 2

    def forward(self, x, idx=None):
        loc = torch.cat([x[:, :1], torch.zeros(len(x), 1)], 1)
        return torch.distributions.Independent(torch.distributions.Normal(loc, 0.5), 1)


def test_aggregate_posterior_on_a_grid():
    ex = _load("posterior_collapse")
    z, area = ex.latent_grid(6.0, 120)
    assert z.shape == (120 * 120, 2) and area == pytest.approx(0.01)
    assert float(z.min()) == pytest.approx(-5.95) and float(z.max()) == pytest.approx(5.95)
    x = torch.randn(30, 3)
    vae = type("V", (), {"family": _PriorFamily()})()
    log_q = ex.log_aggregate_posterior(vae, x, z)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert_close(log_q, log_p, rtol=1e-5, atol=1e-5)
    # two components: q(z) is their average, exactly
    vae.family = _ShiftedFamily()
    x = torch.tensor([[-1.0, 9.0], [2.0, 9.0]])
    point = torch.tensor([[0.5, 0.25]])
    expected = 0.5 * sum(
        torch.distributions.Normal(torch.tensor([m, 0.0]), 0.5).log_prob(point).sum(-1).exp()
        for m in (-1.0, 2.0)
    )
    assert_close(ex.log_aggregate_posterior(vae, x, point), expected.log(), rtol=1e-6)
    picked = ex.spread_points(z, -z.norm(dim=1), 3, 1.0)
    assert len(picked) == 3 and float(z[picked[0]].norm()) < 0.1
    assert all(float((z[a] - z[b]).norm()) >= 1.0 for a in picked for b in picked if a != b)


def test_sharpness_drops_under_blur():
    ex = _load("posterior_collapse")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 28 * 28, generator=g)
    blurred = torch.nn.functional.avg_pool2d(images.reshape(4, 1, 28, 28), 3, 1, 1).reshape(4, -1)
    assert ex.sharpness(blurred, (28, 28)) < 0.3 * ex.sharpness(images, (28, 28))
    assert ex.sharpness(torch.full((2, 784), 0.3), (28, 28)) == 0.0


def test_posterior_collapse_example(capsys, tmp_path, one_thread):
    r = _load("posterior_collapse").main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "KL(q(z)|p)" in out and "active" in out and "sharpness" in out
    runs = r["runs"]
    assert set(runs) == {"beta=1", "beta=4", "beta=1, warm-up"}
    for run in runs.values():
        assert sum(run["kl_per_dim"]) == pytest.approx(run["kl"], rel=1e-4)
        assert 0 <= run["active_units"] <= 8
        assert run["mutual_information"] <= math.log(200) + 0.05
        assert run["log_px"] > run["elbo"]
    # a heavier KL weight buys a smaller KL with no more active units
    assert runs["beta=4"]["kl"] < 0.5 * runs["beta=1"]["kl"]
    assert runs["beta=4"]["active_units"] <= runs["beta=1"]["active_units"]
    assert runs["beta=4"]["informative_dims"] <= runs["beta=1"]["informative_dims"]
    for run in runs.values():
        assert run["informative_dims"] == sum(k > 0.1 for k in run["kl_per_dim"])
    agg = r["aggregate"]
    # the example's grid quadrature of KL(q(z)||p(z)) agrees with pyrovae's Monte Carlo estimate
    assert agg["grid_mass"] == pytest.approx(1.0, abs=0.01)
    assert agg["grid_marginal_kl"] == pytest.approx(agg["marginal_kl"], rel=0.05, abs=0.1)
    assert 0 < agg["hole_share"] < 1
    # the marked holes are real holes (q below a tenth of p) and emptier than the dense points
    assert min(agg["hole_log_ratio"]) < math.log(0.1)
    assert max(agg["hole_log_ratio"]) < min(agg["dense_log_ratio"])
    # a Gaussian decoder's reconstruction means are blurrier than the digits
    assert r["blur"]["reconstruction_means"] < r["blur"]["real"]
    for name in ("aggregate_posterior", "gaussian_blur", "kl_per_dim_beta1", "kl_per_dim_beta4",
                 "kl_per_dim_beta1_warmup"):
        _assert_png(tmp_path / f"{name}.png")


# ------------------------------------------------------------------ mixture_1d.py
def test_mixture_log_prob_and_em(float64):
    ex = _load("mixture_1d")
    w, m, s = (torch.tensor(v, dtype=torch.float64) for v in (ex.TRUE_WEIGHTS, ex.TRUE_MEANS, ex.TRUE_SCALES))
    x = torch.linspace(-6, 6, 50, dtype=torch.float64)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=w), torch.distributions.Normal(m, s))
    assert_close(ex.mixture_log_prob(x, w, m, s), reference.log_prob(x), rtol=1e-12, atol=1e-12)
    data = ex.sample_mixture(4000, w, m, s, torch.Generator().manual_seed(1))
    fw, fm, fs = ex.fit_em(data, 3)
    assert_close(fm, m, atol=0.1)
    assert_close(fs, s, atol=0.1)
    assert_close(fw, w, atol=0.03)
    # EM maximizes the likelihood: the fit is at least as likely on its own data as the truth
    assert float(ex.mixture_log_prob(data, fw, fm, fs).mean()) >= float(reference.log_prob(data).mean())


def test_vae_density_by_quadrature_is_exact_for_a_linear_decoder(float64):
    """z ~ N(0, 1), x | z ~ N(a z + b, s^2)  =>  p(x) = N(x; b, a^2 + s^2)."""
    from pyrovae import VAE, DiagonalNormal, Gaussian, StandardNormal

    ex = _load("mixture_1d")
    decoder = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        decoder.weight.fill_(1.5)
        decoder.bias.fill_(-0.5)
    vae = VAE(StandardNormal(1), DiagonalNormal(torch.nn.Identity(), 1, feature_dim=1),
              Gaussian(decoder, 0.4), num_data=10).double()
    x = torch.linspace(-5, 5, 21, dtype=torch.float64)[:, None]
    expected = torch.distributions.Normal(-0.5, math.sqrt(1.5**2 + 0.4**2)).log_prob(x[:, 0])
    assert_close(ex.vae_log_density(vae, x), expected, rtol=1e-8, atol=1e-8)


def test_mixture_1d_example(capsys, tmp_path, one_thread):
    r = _load("mixture_1d").main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "true mixture" in out and "by quadrature" in out and "ELBO" in out
    # EM recovers the mixture: on held-out points it is as good as the truth, to 0.02 nats
    assert abs(r["em_mixture"] - r["true_mixture"]) < 0.02
    assert sorted(r["em_means"]) == pytest.approx([-3.0, 0.0, 2.5], abs=0.15)
    # the importance-sampled estimate agrees with the quadrature, and the ELBO is below both
    assert abs(r["vae_quadrature_minus_is"]) < 0.02
    assert r["vae_elbo"] < r["vae_importance_sampling"]
    # the VAE cannot beat the true density on held-out data
    assert r["vae_quadrature"] < r["true_mixture"] + 0.02
    assert r["vae_quadrature"] > r["true_mixture"] - 1.0
    _assert_png(tmp_path / "mixture_1d.png")
    _assert_png(tmp_path / "mixture_1d_khat.png")


# ------------------------------------------------------------------ frey_faces.py
def test_bounded_mean_decoder_squashes_only_the_mean():
    ex = _load("frey_faces")
    net = torch.nn.Linear(2, 6)
    decoder = ex.BoundedMeanDecoder(net)
    z = 10 * torch.randn(5, 2)
    out = decoder(z)
    raw = net(z)
    assert_close(out[:, :3], torch.sigmoid(raw[:, :3]))
    assert_close(out[:, 3:], raw[:, 3:])
    vae = ex.build(num_features=6, hidden=4, latent_dim=2, num_data=10, min_scale=0.02)
    with torch.no_grad():
        px = vae.likelihood(100 * torch.randn(50, 2))
    assert float(px.mean.min()) >= 0 and float(px.mean.max()) <= 1
    assert float(px.stddev.min()) >= 0.02


def test_frey_faces_example_without_data_exits_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        _load("frey_faces").main(["--smoke", "--data-root", str(tmp_path / "missing")])
    message = str(exit_info.value.code)
    assert message.startswith("frey_faces: ") and "\n" not in message and "--data-root" in message


def test_frey_faces_example(capsys, tmp_path, real_data_root, one_thread):
    from PIL import Image

    r = _load("frey_faces").main(["--smoke", "--data-root", str(real_data_root), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "1765 train / 200 test frames" in out and "test log p(x)" in out
    # five epochs already raise the ELBO by hundreds of nats (a continuous density per frame)
    assert r["train_elbo"] > r["first_train_elbo"] + 100
    assert r["test_log_px"] > r["test_elbo"]
    assert 0 <= r["mean_min"] and r["mean_max"] <= 1  # the bounded mean
    assert r["reconstruction_rmse"] < 0.2
    with Image.open(tmp_path / "frey_manifold.png") as im:  # 12 x 12 faces of 28 x 20 (+2 padding)
        assert im.size == (12 * 22 + 2, 12 * 30 + 2)
    _assert_png(tmp_path / "frey_reconstructions.png")


# ------------------------------------------------------------------ autoencoder_baselines.py
def test_pca_error_is_the_discarded_variance_and_gaussian_fit(float64):
    ex = _load("autoencoder_baselines")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    for d in (1, 3, 6):
        pca = ex.PCA(x, d)
        mse = float((pca.decode(pca.encode(x)) - x).pow(2).mean())
        assert_close(mse, float(eig[d:].sum()) / 6, atol=1e-10)
        assert_close(pca.train_error(), mse, atol=1e-10)
    mix = torch.tensor([[1.0, 0.8, 0.0], [0.0, 2.0, -0.5], [0.0, 0.0, 0.5]], dtype=torch.float64)
    codes = torch.randn(500, 3, generator=g, dtype=torch.float64) @ mix + 4  # correlated codes
    gauss = ex.fit_gaussian(codes)
    assert_close(gauss.loc, codes.mean(0))
    assert_close(gauss.covariance_matrix, torch.cov(codes.T), rtol=1e-5, atol=1e-6)
    samples = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    ref = torch.tensor([[0.0, 0.5], [3.0, 3.0]])
    assert_close(ex.nearest_distance(samples, ref), torch.tensor([0.5 / math.sqrt(2), math.sqrt(1.25 / 2)]))


def test_denoising_autoencoder_masks_its_input():
    ex = _load("autoencoder_baselines")
    model = ex.Autoencoder(4, 3, 2)
    seen = []
    model.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x = torch.full((200, 4), 0.5)
    ex.train_autoencoder(model, x, epochs=1, mask_prob=0.3, batch_size=200)
    assert abs(float((seen[0] == 0).double().mean()) - 0.3) < 0.05
    seen.clear()
    ex.train_autoencoder(model, x, epochs=1, batch_size=200)
    assert bool((seen[0] == 0.5).all())


def test_autoencoder_baselines_example(capsys, tmp_path, one_thread):
    r = _load("autoencoder_baselines").main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "recon MSE" in out and "confidence" in out
    rows = r["dims"]
    assert set(rows) == {2, 8}
    for d, row in rows.items():
        assert set(row) == {"PCA", "autoencoder", "denoising AE", "VAE"}
        # PCA's training error is its closed form, the discarded eigenvalues
        assert_close(row["PCA"]["train_mse"], row["PCA"]["train_mse_closed_form"], rtol=1e-3)
        for m in row.values():
            assert 0 < m["reconstruction_mse"] < 0.12  # grey pixels: the mean image scores ~0.11
            assert 0.1 <= m["sample_confidence"] <= 1
        _assert_png(tmp_path / f"baseline_samples_d{d}.png")
    # more principal components reconstruct better
    assert rows[8]["PCA"]["reconstruction_mse"] < rows[2]["PCA"]["reconstruction_mse"]

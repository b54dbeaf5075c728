"""The factored (PixelCNN-style) logit head of the categorical256 decoder and its build option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pyrovae
from pyrovae import Categorical256, CheckpointError, ConfigError, FactoredLogits, MLP
from pyrovae.build import OPTIONS, VAEConfig, build_vae
from pyrovae.checkpoint import CONFIG_NAME, load_checkpoint, load_model, save_checkpoint

from conftest import assert_close

H, D, R = 5, 3, 2


def _head(num_levels: int) -> FactoredLogits:
    torch.manual_seed(0)
    head = FactoredLogits(H, num_features=D, num_levels=num_levels, rank=R).double()
    with torch.no_grad():
        head.bias.normal_()  # starts at zero: make it count
    return head


def _by_hand(head: FactoredLogits, h: torch.Tensor) -> torch.Tensor:
    """logits[..., l, d] = sum_k B[l, k] (W h)[k * D + d] + c[l, d], by loops, shape (..., L, D)."""
    W, B, c = head.features.weight, head.weight, head.bias
    L = B.shape[0]
    out = torch.empty(*h.shape[:-1], L, D, dtype=h.dtype)
    a = h @ W.T  # (..., R * D): feature k of pixel d is entry k * D + d
    for l in range(L):
        for d in range(D):
            out[..., l, d] = sum(B[l, k] * a[..., k * D + d] for k in range(R)) + c[l, d]
    return out


def test_factored_logits_are_the_by_hand_logits_level_major(float64):
    head = _head(num_levels=7)
    h = torch.randn(4, 2, H)
    expected = _by_hand(head, h)  # (4, 2, L, D)
    assert head(h).shape == (4, 2, 7 * D)
    assert_close(head(h), expected.flatten(-2))  # level-major: entry l * D + d
    assert_close(head(h[0, 0]), expected[0, 0].flatten())  # no batch dimension


def test_categorical256_log_prob_is_the_log_softmax_of_the_by_hand_logits(float64):
    head = _head(num_levels=256)
    lik = Categorical256(head, num_levels=256)
    h = torch.randn(2, H)
    k = torch.tensor([[0, 17, 255], [128, 3, 254]])
    logits = _by_hand(head, h)  # (2, 256, D)
    expected = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        for d in range(D):
            expected[i] += logits[i, :, d].log_softmax(0)[k[i, d]]
    assert_close(lik(h).log_prob(k / 255), expected)


def test_factored_logits_parameter_count():
    for in_dim, num_features, num_levels, rank in [(H, D, 7, R), (400, 784, 256, 16)]:
        head = FactoredLogits(in_dim, num_features, num_levels, rank)
        count = sum(p.numel() for p in head.parameters())
        assert count == in_dim * rank * num_features + num_levels * rank + num_levels * num_features
    assert count == 5_222_400  # against 80,482,304 for nn.Linear(400, 256 * 784)


def _config(**options) -> VAEConfig:
    return VAEConfig(num_features=12, latent_dim=2, hidden_dims=(8, 6), likelihood="categorical256",
                     image_shape=(3, 4), options=options)


def test_build_uses_the_factored_head_by_default_and_dense_for_rank_zero():
    default = build_vae(_config(), num_data=10).likelihood.decoder
    trunk, head = default
    assert isinstance(head, FactoredLogits) and head.rank == OPTIONS["logit_rank"][0] == 32
    assert (head.in_features, head.num_features, head.num_levels) == (6, 12, 256)
    assert isinstance(trunk, MLP) and trunk.out_features == 6
    assert isinstance(trunk[-1], nn.ReLU)  # the trunk's output is activated
    assert build_vae(_config(logit_rank=4), num_data=10).likelihood.decoder[1].rank == 4
    dense = build_vae(_config(logit_rank=0), num_data=10).likelihood.decoder
    assert isinstance(dense, MLP) and dense.out_features == 256 * 12
    assert not any(isinstance(m, FactoredLogits) for m in dense.modules())
    no_hidden = VAEConfig(num_features=12, latent_dim=2, hidden_dims=(), likelihood="categorical256")
    assert build_vae(no_hidden, num_data=10).likelihood.decoder[1].in_features == 2
    conv = VAEConfig(num_features=64, latent_dim=2, hidden_dims=(8,), likelihood="categorical256",
                     image_shape=(8, 8), network="conv")
    assert isinstance(build_vae(conv, num_data=10).likelihood.decoder, pyrovae.ConvDecoder)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "16", None, [16]])
def test_bad_logit_rank_is_refused(bad):
    with pytest.raises(ConfigError, match=r"option logit_rank must be an integer >= 1 .* or 0"):
        build_vae(_config(logit_rank=bad), num_data=10)


# ------------------------------------------------------------------------------- run folders
def test_a_new_run_records_the_logit_rank_it_used(tmp_path: Path):
    vae = build_vae(_config(), num_data=10)
    pyrovae.fit(vae, torch.randint(0, 256, (10, 12)) / 255, num_epochs=1, batch_size=5,
                progress=False, checkpoint_dir=tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())["vae"]
    assert saved["options"] == {"logit_rank": 32}
    assert isinstance(load_model(tmp_path).likelihood.decoder[1], FactoredLogits)


def _old_run(tmp_path: Path, monkeypatch) -> pyrovae.VAE:
    """A run folder as pyrovae wrote it before logit_rank existed: a dense head, no option."""
    old = build_vae(_config(logit_rank=0), num_data=10)
    with monkeypatch.context() as m:
        m.setattr("pyrovae.build.pin_options", lambda config: config)  # the old writer
        save_checkpoint(tmp_path, old, config=_config())
        pyrovae.checkpoint.save_config(tmp_path, _config())
    assert "logit_rank" not in (tmp_path / CONFIG_NAME).read_text()
    return old


def test_an_old_dense_run_loads_as_logit_rank_zero(tmp_path: Path, monkeypatch):
    old = _old_run(tmp_path, monkeypatch)
    model = load_model(tmp_path)
    assert model.config.options == {"logit_rank": 0}
    for (name, a), b in zip(model.state_dict().items(), old.state_dict().values()):
        assert_close(a, b, rtol=0, atol=0, msg=name)
    (tmp_path / CONFIG_NAME).unlink()  # the copy inside the checkpoint reads the same way
    assert isinstance(load_model(tmp_path).likelihood.decoder, MLP)


def test_an_old_dense_checkpoint_into_a_factored_model_says_to_pass_logit_rank_zero(
    tmp_path: Path, monkeypatch
):
    _old_run(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, vae=build_vae(_config(), num_data=10))
    message = str(err.value)
    assert "\n" not in message and "options={'logit_rank': 0}" in message

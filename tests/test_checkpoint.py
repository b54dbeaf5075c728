"""Checkpoints: atomic writes, safe reads, resume equal to an uninterrupted run, load_model."""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.infer import RenyiELBO

import pyrovae
from pyrovae import CheckpointError, fit, load_checkpoint, load_model, save_checkpoint
from pyrovae.build import VAEConfig, build_vae
from pyrovae.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, read_checkpoint

from conftest import assert_close

N, D = 96, 10
CONFIG = VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,))


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(N, D, generator=g) * 0.6)


def _model(config: VAEConfig = CONFIG, init_seed: int = 1) -> pyrovae.VAE:
    torch.manual_seed(init_seed)
    return build_vae(config, num_data=N)


def _params(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


FIT = dict(batch_size=16, progress=False, seed=3)


# ------------------------------------------------------------------------------ resume = uninterrupted
@pytest.mark.parametrize("stop", [(1, None), (2, 4)], ids=["epoch-checkpoints", "with-step-checkpoints"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, stop) -> None:
    """Stopping after `stop` (epochs, extra steps) and resuming ends with bit-identical parameters,
    optimizer state and history to a run never interrupted; the resumed run redoes no step."""
    data = _data()
    ref = _model()
    ref_hist = fit(ref, data, num_epochs=3, validation=data[:20], **FIT)

    run = tmp_path / "run"
    epochs, extra = stop
    vae = _model()
    if extra is None:
        fit(vae, data, num_epochs=epochs, validation=data[:20], checkpoint_dir=run, **FIT)
        expected_step = epochs * (N // 16)
    else:
        # A run that checkpoints every 4 steps, then "crashes": resume from its mid-epoch checkpoint.
        fit(vae, data, num_epochs=epochs, validation=data[:20], checkpoint_dir=run,
            checkpoint_every_steps=4, **FIT)
        expected_step = epochs * (N // 16)  # epoch checkpoint overwrote the step ones
    ckpt = read_checkpoint(run)
    assert ckpt["training_state"]["epoch"] == epochs and ckpt["training_state"]["batch"] == 0
    # Scramble every global RNG, as a fresh process would have them.
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    resumed = _model(init_seed=77)
    hist = fit(resumed, data, num_epochs=3, validation=data[:20], checkpoint_dir=run, resume=True, **FIT)
    _assert_same_params(_params(resumed), _params(ref))
    assert hist.train_elbo == ref_hist.train_elbo
    assert hist.validation_elbo == ref_hist.validation_elbo
    assert hist.num_steps == ref_hist.num_steps == 3 * (N // 16)
    assert hist.resumed_at_step == [expected_step]


def test_resume_from_mid_epoch_step_checkpoint(tmp_path: Path) -> None:
    """A step checkpoint inside an epoch (batch > 0) resumes at exactly that minibatch."""
    data = _data()
    ref = _model()
    ref_hist = fit(ref, data, num_epochs=2, **FIT)

    run = tmp_path / "run"
    vae = _model()
    snapshots = {}

    class Stop(Exception):
        pass

    # Interrupt right after the step checkpoint at step 8 (epoch 2 of 6-step epochs, batch 2).
    orig_save = pyrovae.checkpoint.save_checkpoint

    def save_then_stop(*args, **kwargs):
        path = orig_save(*args, **kwargs)
        state = kwargs["training_state"]
        snapshots["state"] = (state["epoch"], state["batch"])
        if state["epoch"] == 1 and state["batch"] == 2:
            raise Stop
        return path

    pyrovae.checkpoint.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            fit(vae, data, num_epochs=2, checkpoint_dir=run, checkpoint_every_steps=4, **FIT)
    finally:
        pyrovae.checkpoint.save_checkpoint = orig_save
    ckpt = read_checkpoint(run)
    assert (ckpt["training_state"]["epoch"], ckpt["training_state"]["batch"]) == (1, 2)
    assert ckpt["history"]["num_steps"] == 8
    torch.manual_seed(5)
    resumed = _model(init_seed=42)
    hist = fit(resumed, data, num_epochs=2, checkpoint_dir=run, resume=run, **FIT)
    _assert_same_params(_params(resumed), _params(ref))
    assert hist.train_elbo == pytest.approx(ref_hist.train_elbo, rel=1e-12)
    assert hist.resumed_at_step == [8] and hist.num_steps == 12


def test_resume_iwae_loss_and_warmup(tmp_path: Path) -> None:
    """The RenyiELBO (loss_and_grads) path with KL warm-up resumes exactly too."""
    data = _data()
    kw = dict(FIT, kl_warmup_epochs=2.0)
    ref = _model()
    fit(ref, data, num_epochs=2, loss=RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True), **kw)
    run = tmp_path / "run"
    vae = _model()
    fit(vae, data, num_epochs=1, loss=RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
        checkpoint_dir=run, **kw)
    resumed = _model(init_seed=9)
    fit(resumed, data, num_epochs=2, loss=RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
        resume=run, **kw)
    _assert_same_params(_params(resumed), _params(ref))


def test_resume_when_already_done_trains_nothing(tmp_path: Path) -> None:
    data = _data()
    vae = _model()
    fit(vae, data, num_epochs=1, checkpoint_dir=tmp_path, **FIT)
    again = _model(init_seed=5)
    hist = fit(again, data, num_epochs=1, resume=tmp_path, **FIT)
    assert hist.num_epochs == 1 and hist.num_steps == N // 16
    _assert_same_params(_params(again), _params(vae))


def test_resume_refuses_other_data_or_batch_size(tmp_path: Path) -> None:
    data = _data()
    stop = {}
    orig = pyrovae.checkpoint.save_checkpoint

    def stop_mid_epoch(*args, **kwargs):
        orig(*args, **kwargs)
        if kwargs["training_state"]["batch"]:
            raise KeyboardInterrupt

    pyrovae.checkpoint.save_checkpoint = stop_mid_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(_model(), data, num_epochs=1, checkpoint_dir=tmp_path, checkpoint_every_steps=2, **FIT)
    finally:
        pyrovae.checkpoint.save_checkpoint = orig
    del stop
    with pytest.raises(CheckpointError, match="batch_size=16"):
        fit(_model(), data, num_epochs=1, resume=tmp_path, **dict(FIT, batch_size=8))
    smaller = build_vae(CONFIG, num_data=N - 1)
    with pytest.raises(CheckpointError, match="num_data"):
        fit(smaller, data[:-1], num_epochs=1, resume=tmp_path, **FIT)
    with pytest.raises(pyrovae.ConfigError, match="checkpoint_dir"):
        fit(_model(), data, num_epochs=1, resume=True, **FIT)
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(_model(), data, num_epochs=1, resume=tmp_path / "nowhere", **FIT)


# ------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_load_model(tmp_path: Path) -> None:
    """load_model rebuilds the model from config.json + weights: same parameters, same log p(x)."""
    data = _data()
    vae = _model()
    fit(vae, data, num_epochs=1, checkpoint_dir=tmp_path, **FIT)  # vae.config set by build_vae
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / CHECKPOINT_NAME).is_file()
    model = load_model(tmp_path)
    _assert_same_params(_params(model), _params(vae))
    assert model.config == CONFIG and model.num_data == N and not model.training
    a = pyrovae.log_likelihood(vae, data[:10], 20, seed=0)
    b = pyrovae.log_likelihood(model, data[:10], 20, seed=0)
    assert_close(a.values, b.values, rtol=0, atol=0)
    # A bare checkpoint file works too (config taken from inside the checkpoint).
    (tmp_path / CONFIG_NAME).unlink()
    _assert_same_params(_params(load_model(tmp_path / CHECKPOINT_NAME)), _params(vae))


def test_save_checkpoint_from_own_loop(tmp_path: Path) -> None:
    vae = _model()
    opt = torch.optim.Adam(vae.parameters(), lr=0.1)
    loss = sum(p.sum() for p in vae.parameters())
    loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path / "a" / "b.pt", vae, opt, config=CONFIG)
    vae2 = _model(init_seed=3)
    opt2 = torch.optim.Adam(vae2.parameters(), lr=0.5)
    ckpt = load_checkpoint(path, vae=vae2, optimizer=opt2)
    _assert_same_params(_params(vae2), _params(vae))
    assert opt2.param_groups[0]["lr"] == 0.1
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert_close(s1["exp_avg"], s2["exp_avg"], rtol=0, atol=0)
    assert ckpt["model_description"]["config"]["hidden_dims"] == [8]
    assert not list(path.parent.glob("*.tmp"))


def test_other_model_is_named(tmp_path: Path) -> None:
    """A checkpoint of another configuration: nothing is loaded, the differences are named."""
    vae = _model()
    save_checkpoint(tmp_path, vae)
    other = _model(VAEConfig(num_features=D, latent_dim=3, hidden_dims=(8, 8)))
    before = _params(other)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, vae=other)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing parameters" in msg and "family.encoder.2.weight" in msg
    assert "shape mismatch" in msg and "(2," in msg and "(3," in msg
    assert "latent_dim" in msg  # the saved config is shown as the fix
    _assert_same_params(_params(other), before)
    fewer = _model(VAEConfig(num_features=D, latent_dim=2, hidden_dims=()))
    with pytest.raises(CheckpointError, match="unexpected parameters"):
        load_checkpoint(tmp_path, vae=fewer)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="has no checkpoint.pt"):
        load_model(tmp_path)
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a pyrovae checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello, world\n")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text.pt")
    # a checkpoint without a config cannot be rebuilt by load_model
    vae = _model()
    vae.config = None
    save_checkpoint(tmp_path / "noconfig", vae)
    with pytest.raises(CheckpointError, match="no model configuration"):
        load_model(tmp_path / "noconfig")


class _Evil:
    """Unpickling this would create a marker file (if a loader ever ran it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["raw-pickle", "raw-pickle-protocol2", "inside-torch-zip", "in-state-dict"])
def test_malicious_checkpoint_never_runs_code(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    evil = _Evil(marker)
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps(evil))
    elif kind == "raw-pickle-protocol2":
        path.write_bytes(pickle.dumps({"format": "pyrovae-checkpoint", "x": evil}, protocol=2))
    elif kind == "inside-torch-zip":
        torch.save({"format": "pyrovae-checkpoint", "version": 1, "model": {}, "history": evil}, path)
    else:
        torch.save({"format": "pyrovae-checkpoint", "version": 1, "model": {"w": evil}}, path)
    # sanity: the file really is armed (a plain unpickler would run it)
    assert "mkdir" in path.read_bytes().decode("latin-1")
    for call in (lambda: load_checkpoint(path, vae=_model()), lambda: load_model(path)):
        with pytest.raises(CheckpointError) as e:
            call()
        assert "\n" not in str(e.value)
    assert not marker.exists()
    if kind != "raw-pickle":
        assert "mkdir" in str(e.value) or "safely" in str(e.value)


def test_truncated_and_corrupted_files(tmp_path: Path) -> None:
    """Every truncation and single-bit flip is refused (CRC checked), never loaded silently."""
    vae = _model()
    good = save_checkpoint(tmp_path / "good.pt", vae, torch.optim.Adam(vae.parameters()))
    raw = good.read_bytes()
    bad = tmp_path / "bad.pt"
    lengths = sorted({0, 1, 2, 10, 64, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 1})
    for n in lengths:
        bad.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match="corrupted|truncated|safely"):
            load_checkpoint(bad)
    rng = random.Random(0)
    refused = loaded_identical = 0
    for _ in range(60):
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(b))
        try:
            ckpt = load_checkpoint(bad)
        except CheckpointError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        # A flip in zip padding or an unused header byte may load: then the content is intact.
        _assert_same_params(ckpt["model"], _params(vae))
        loaded_identical += 1
    assert refused + loaded_identical == 60 and refused >= 30


def test_partial_temp_file_leaves_good_checkpoint(tmp_path: Path) -> None:
    """A writer killed mid-write leaves only a temporary file: the good checkpoint still loads,
    and resuming removes the leftover."""
    data = _data()
    vae = _model()
    fit(vae, data, num_epochs=1, checkpoint_dir=tmp_path, **FIT)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    stale = tmp_path / f".{CHECKPOINT_NAME}.abc123.tmp"
    stale.write_bytes(good[: len(good) // 2])
    ckpt = load_checkpoint(tmp_path, vae=_model(init_seed=4))
    assert ckpt["training_state"]["epoch"] == 1
    with pytest.raises(CheckpointError):
        load_checkpoint(stale)
    fit(_model(init_seed=4), data, num_epochs=2, resume=tmp_path, **FIT)
    assert not stale.exists()


def test_failed_write_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while writing (disk full, ...) leaves the previous checkpoint byte-identical and
    no temporary file behind."""
    vae = _model()
    path = save_checkpoint(tmp_path, vae)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, vae)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    assert zipfile.is_zipfile(path)

"""Injected faults: SIGKILL during an epoch and during a checkpoint write, NaN/inf losses and
gradients, a learning rate that blows up. Each test states what must survive."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from pyro.infer import RenyiELBO, Trace_ELBO

import pyrovae
from pyrovae import CheckpointError, TrainingError, fit, load_checkpoint
from pyrovae.errors import NumericalWarning
from pyrovae.build import VAEConfig, build_vae
from pyrovae.checkpoint import CHECKPOINT_NAME, read_checkpoint

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ killed processes
# A training run in a child process. It logs every step it starts to OUT.steps, may slow each
# step down (so the parent can kill it mid-epoch), and in mode "hang-in-write" writes half of its
# second checkpoint's temporary file, then waits to be killed.
CHILD = r"""
import io, json, os, sys, time
import torch
torch.set_num_threads(1)
from pyro.infer import Trace_ELBO
import pyrovae
from pyrovae.build import VAEConfig, build_vae

run, mode, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
g = torch.Generator().manual_seed(0)
data = torch.bernoulli(torch.rand(192, 12, generator=g) * 0.6, generator=g)
torch.manual_seed(1)
vae = build_vae(VAEConfig(num_features=12, latent_dim=2, hidden_dims=(16,)), num_data=192)
log = open(out + ".steps", "a")

class Logged(Trace_ELBO):
    def differentiable_loss(self, model, guide, *args, **kwargs):
        log.write("step\n"); log.flush()
        time.sleep(delay)
        return super().differentiable_loss(model, guide, *args, **kwargs)

real_save = torch.save
if mode == "hang-in-write":
    calls = [0]
    def hanging_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            buf = io.BytesIO(); real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
            open(out + ".writing", "w").close()
            time.sleep(600)
        return real_save(obj, f, *a, **k)
    torch.save = hanging_save

history = pyrovae.fit(vae, data, num_epochs=3, batch_size=16, seed=7, progress=False, loss=Logged(),
                      checkpoint_dir=run, checkpoint_every_steps=4, resume=(mode == "resume"))
real_save(vae.state_dict(), out)
json.dump(history.to_dict(), open(out + ".json", "w"))
"""
STEPS = 3 * 192 // 16  # 36 steps, 12 per epoch, a checkpoint every 4


def _child(tmp: Path, run: Path, mode: str, out: Path, delay: float) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(script), str(run), mode, str(out), str(delay)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(p: subprocess.Popen) -> None:
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output[-3000:]


def _wait_for(path: Path, p: subprocess.Popen) -> None:
    while not path.exists():
        if p.poll() is not None:
            raise AssertionError(f"child ended before {path.name} appeared: {p.stdout.read()[-3000:]}")
        time.sleep(0.002)


def _kill(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL


def _result(out: Path) -> tuple[dict, dict]:
    return torch.load(out, weights_only=True), json.loads(Path(str(out) + ".json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("reference")
    _finish(_child(tmp, tmp / "run", "full", tmp / "out.pt", 0.0))
    return _result(tmp / "out.pt")


def _assert_same_run(out: Path, reference: tuple[dict, dict], resumed_at: int) -> dict:
    params, history = _result(out)
    ref_params, ref_history = reference
    for k in ref_params:
        assert_close(params[k], ref_params[k], rtol=1e-6, atol=1e-7, msg=k)
    assert history["train_elbo"] == pytest.approx(ref_history["train_elbo"], rel=1e-6)
    assert history["num_steps"] == ref_history["num_steps"] == STEPS
    assert history["resumed_at_step"] == [resumed_at]
    return history


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, uninterrupted) -> None:
    """SIGKILL during an epoch loses only the steps since the last step checkpoint; the resumed
    run ends with the parameters and history of a run never killed."""
    run, out = tmp_path / "run", tmp_path / "out.pt"
    p = _child(tmp_path, run, "kill-me", out, 0.05)
    _wait_for(run / CHECKPOINT_NAME, p)
    _kill(p)
    started = len(Path(str(out) + ".steps").read_text().splitlines())
    ckpt = read_checkpoint(run)
    saved_step = ckpt["history"]["num_steps"]
    assert ckpt["training_state"]["batch"] > 0, "the kill should land inside an epoch"
    assert 0 < saved_step < STEPS
    lost = started - saved_step  # steps begun but not in the checkpoint
    assert 0 <= lost <= 4, (started, saved_step)
    print(f"\nkilled after starting {started} steps; checkpoint at step {saved_step}; lost {lost}")

    os.unlink(str(out) + ".steps")
    _finish(_child(tmp_path, run, "resume", out, 0.0))
    _assert_same_run(out, uninterrupted, saved_step)
    redone = len(Path(str(out) + ".steps").read_text().splitlines())
    assert redone == STEPS - saved_step


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path: Path, uninterrupted) -> None:
    """A process killed while its checkpoint's temporary file is half written leaves the previous
    checkpoint loadable; resuming from it reproduces the uninterrupted run and cleans up."""
    run, out = tmp_path / "run", tmp_path / "out.pt"
    p = _child(tmp_path, run, "hang-in-write", out, 0.0)
    _wait_for(Path(str(out) + ".writing"), p)
    _kill(p)
    temps = list(run.glob(f".{CHECKPOINT_NAME}.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    with pytest.raises(CheckpointError):
        read_checkpoint(temps[0])
    ckpt = read_checkpoint(run)
    assert ckpt["history"]["num_steps"] == 4  # the first step checkpoint, intact
    _finish(_child(tmp_path, run, "resume", out, 0.0))
    _assert_same_run(out, uninterrupted, 4)
    assert not list(run.glob("*.tmp"))


# ------------------------------------------------------------------------------- numerical faults
N, D = 64, 8


def _setup(seed: int = 0) -> tuple[pyrovae.VAE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.bernoulli(torch.rand(N, D, generator=g) * 0.5)
    torch.manual_seed(1)
    return build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,)), num_data=N), data


def _snapshot(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class FaultyELBO(Trace_ELBO):
    """Trace_ELBO that returns a NaN/inf loss, or a finite loss whose gradient is NaN, at chosen
    calls, and snapshots the parameters before each call."""

    def __init__(self, vae, faults: dict[int, str]) -> None:
        super().__init__()
        self.vae, self.faults, self.calls, self.before = vae, faults, 0, []

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self.calls += 1
        self.before.append(_snapshot(self.vae))
        value = super().differentiable_loss(model, guide, *args, **kwargs)
        fault = self.faults.get(self.calls)
        if fault == "nan":
            return value * math.nan
        if fault == "inf":
            return value + math.inf
        if fault == "grad":
            value.register_hook(lambda g: g * math.nan)
        return value


class FaultyRenyi(RenyiELBO):
    """RenyiELBO (gradients computed inside loss_and_grads) with a NaN gradient at chosen calls."""

    def __init__(self, vae, bad: set[int]) -> None:
        super().__init__(alpha=0, num_particles=2, vectorize_particles=True)
        self.vae, self.bad, self.calls, self.before = vae, bad, 0, []

    def loss_and_grads(self, model, guide, *args, **kwargs):
        self.calls += 1
        self.before.append(_snapshot(self.vae))
        value = super().loss_and_grads(model, guide, *args, **kwargs)
        if self.calls in self.bad:
            p = next(p for p in self.vae.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = math.inf
        return value


def test_nonfinite_loss_or_gradient_skips_the_update() -> None:
    vae, data = _setup()
    faults = {3: "nan", 5: "inf", 6: "grad", 11: "nan"}
    loss = FaultyELBO(vae, faults)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(vae, data, loss=loss, num_epochs=2, batch_size=8, progress=False)
    numerical = [w for w in caught if issubclass(w.category, NumericalWarning)]
    assert [int(str(w.message).split()[1]) for w in numerical] == sorted(faults)
    assert "update was skipped" in str(numerical[0].message)
    assert history.skipped_steps == len(faults) and history.num_steps == 16
    for step in faults:  # parameters after a bad step == parameters before it
        assert _equal(loss.before[step], loss.before[step - 1])
    for step in (2, 4, 8):  # good steps do move them
        assert not _equal(loss.before[step], loss.before[step - 1])
    assert all(math.isfinite(e) for e in history.train_elbo)
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_nonfinite_gradient_in_loss_and_grads_path() -> None:
    vae, data = _setup()
    loss = FaultyRenyi(vae, {2, 7})
    with pytest.warns(NumericalWarning, match="non-finite gradient"):
        history = fit(vae, data, loss=loss, num_epochs=1, batch_size=8, progress=False)
    assert history.skipped_steps == 2
    assert _equal(loss.before[2], loss.before[1]) and _equal(loss.before[7], loss.before[6])
    assert not _equal(loss.before[3], loss.before[2])


@pytest.mark.parametrize("foreach", [True, False], ids=["one-kernel", "per-gradient sums"])
def test_the_gradient_check_finds_exactly_the_nonfinite_gradients(foreach, monkeypatch) -> None:
    """The guard flags a NaN or an infinity in any gradient, of any dtype, in either of its two
    ways (GradScaler's foreach check, and the per-gradient sums it falls back to where that op
    does not apply, e.g. sparse gradients), and nothing else; it leaves the gradients as they were."""
    from pyrovae.training import _nonfinite_gradient

    if not foreach:
        def unavailable(*args):
            raise NotImplementedError("no such kernel here")

        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", unavailable)

    def flagged(*grads: torch.Tensor) -> bool:
        params = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
            p.grad = g.clone()
            params.append(p)
        bad = bool(_nonfinite_gradient(params + [torch.nn.Parameter(torch.zeros(2))], None))
        assert all(torch.equal(p.grad, g) or torch.isnan(g).any() for p, g in zip(params, grads))
        return bad

    finite = torch.tensor([1e30, -3.0, 0.0])
    assert not flagged(finite, torch.ones(4, 2, dtype=torch.float64))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert flagged(finite, torch.tensor([[1.0], [bad]]))
        assert flagged(torch.tensor([bad], dtype=torch.float64), finite)
    sparse = torch.tensor([0.0, float("nan")]).to_sparse()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = sparse
    assert bool(_nonfinite_gradient([p], None))


def test_bad_streak_stops_training_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    vae, data = _setup()
    loss = FaultyELBO(vae, {5: "nan", 6: "nan", 7: "inf"})
    with pytest.warns(NumericalWarning), pytest.raises(TrainingError) as e:
        fit(vae, data, loss=loss, num_epochs=2, batch_size=8, progress=False, max_bad_steps=3,
            checkpoint_dir=tmp_path, checkpoint_every_steps=2)
    msg = str(e.value)
    assert "\n" not in msg and "3 steps in a row" in msg and "step 7" in msg and "intact" in msg
    good = loss.before[4]  # parameters after step 4, the last good update
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["history"]["num_steps"] == 6 and ckpt["history"]["skipped_steps"] == 2
    assert _equal(ckpt["model"], good) and _equal(_snapshot(vae), good)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # ... and training resumes from it with a sound loss.
    vae2, _ = _setup()
    history = fit(vae2, data, num_epochs=2, batch_size=8, progress=False, resume=tmp_path)
    assert history.num_steps == 16 and history.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in vae2.parameters())


def test_exploding_learning_rate_never_leaves_nan_parameters(tmp_path: Path) -> None:
    vae, data = _setup()
    fit(vae, data, num_epochs=1, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    saved = read_checkpoint(tmp_path)["model"]
    with pytest.warns(NumericalWarning), pytest.raises(TrainingError, match="lower the learning rate"):
        fit(vae, data, num_epochs=3, batch_size=8, lr=1e30, progress=False, max_bad_steps=2,
            checkpoint_dir=tmp_path / "b")
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert _equal(read_checkpoint(tmp_path)["model"], saved)


def test_clip_grad_norm_bounds_the_first_adam_moment(tmp_path: Path) -> None:
    """After one Adam step, exp_avg = (1 - beta1) * g, so its total norm is 0.1 * ||clipped g||."""
    for clip in (1e-3, None):
        vae, data = _setup()
        fit(vae, data, num_epochs=1, batch_size=N, progress=False, clip_grad_norm=clip,
            checkpoint_dir=tmp_path / str(clip))
        state = read_checkpoint(tmp_path / str(clip))["optimizer"]["state"]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s["exp_avg"]) for s in state.values()]))
        if clip is None:
            assert norm > 0.1 * 1e-3 * 100  # the raw gradient is far larger than the clip
        else:
            assert_close(norm, 0.1 * clip, rtol=1e-4, atol=0)

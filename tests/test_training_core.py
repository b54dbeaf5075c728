"""The training core: the KL weight as a model/guide keyword, the objective's name, the loss set
up without mutating the model, host-synchronization-free steps, SIGTERM and a full disk."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from pyro import poutine
from pyrovae.losses import IWAE
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO

import pyrovae
from pyrovae import CheckpointError, TrainingError, fit
from pyrovae import training
from pyrovae.build import VAEConfig, build_vae
from pyrovae.checkpoint import CHECKPOINT_NAME, load_train_state, read_checkpoint
from pyrovae.errors import NumericalWarning
from pyrovae.training import EXIT_PREEMPTED, History, TrainState, objective, train_step

from conftest import assert_close, needs_cxx

REPO = Path(__file__).resolve().parents[1]
N, D = 64, 8
CONFIG = VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,))
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed: int = 0, init_seed: int = 1) -> tuple[pyrovae.VAE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.bernoulli(torch.rand(N, D, generator=g) * 0.5)
    torch.manual_seed(init_seed)
    return build_vae(CONFIG, num_data=N), data


def _params(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


# --------------------------------------------------------------------------------- KL weight
@pytest.mark.parametrize("w", [1.0, 0.3])
def test_kl_weight_scales_z_in_model_and_guide(w: float) -> None:
    r"""The loss with ``kl_weight=w`` equals, for the same draw of z, the hand-computed
    :math:`-\frac{N}{B}\sum_i [\log p(x_i|z_i) + w(\log p(z_i) - \log q(z_i|x_i))]`."""
    vae, data = _setup()
    x, idx = data[:16], torch.arange(16)
    pyro.set_rng_seed(5)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, idx, kl_weight=w)
    pyro.set_rng_seed(5)
    q = vae.family(x, idx)
    z = q.rsample()
    log_px = vae.likelihood(z).log_prob(x)
    expected = -(N / 16) * (log_px + w * (vae.prior().log_prob(z) - q.log_prob(z))).sum()
    assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    for program in (vae.model, vae.guide):
        tr = poutine.trace(program).get_trace(x, idx, kl_weight=w)
        assert tr.nodes["z"]["scale"] == pytest.approx(w * N / 16)


def test_fit_passes_the_warmup_schedule_and_never_mutates_the_vae() -> None:
    """Warm-up reaches the model as a keyword, one weight per step, w = beta * min(1, t / E)
    with t the epochs done including this step; the VAE's attributes are the same after fit.
    (A Trace_ELBO subclass runs Pyro's tracing, which calls the public model at every step.)"""
    vae, data = _setup()
    seen = []
    real = vae.model

    def spy(x, idx=None, *, kl_weight=1.0):
        seen.append(kl_weight)
        return real(x, idx, kl_weight=kl_weight)

    class Traced(Trace_ELBO):
        pass

    before = {k: v for k, v in vars(vae).items() if not k.startswith("_") or k == "_param_name"}
    vae.model = spy
    fit(vae, data, loss=Traced(), num_epochs=3, batch_size=16, progress=False, beta=0.5,
        kl_warmup_epochs=2.0)
    steps = 4  # per epoch
    expected = [0.5 * min(1.0, (s + 1) / steps / 2.0) for s in range(3 * steps)]
    # (the first call is fit's one-time check of the program's parameters, at the first weight)
    assert seen == pytest.approx(expected[:1] + expected, rel=1e-12)
    del vae.model
    after = {k: v for k, v in vars(vae).items() if not k.startswith("_") or k == "_param_name"}
    assert after.keys() == before.keys() and not hasattr(vae, "kl_weight")


def test_history_names_its_objective() -> None:
    vae, data = _setup()
    kw = dict(num_epochs=1, batch_size=16, progress=False)
    assert fit(vae, data, **kw).objective == "elbo"
    assert fit(vae, data, beta=0.5, **kw).objective == "beta-elbo(β=0.5)"
    iwae = IWAE(num_particles=3)
    h = fit(vae, data, loss=iwae, **kw)
    assert h.objective == "iwae(k=3)"
    assert fit(vae, data, loss=IWAE(3, gradient="dreg"), **kw).objective == "iwae(k=3, dreg)"
    assert fit(vae, data, loss=iwae, beta=2.0, kl_warmup_epochs=1, **kw).objective == (
        "beta-iwae(k=3, β=2) + KL warm-up (1 epochs)"
    )
    # RenyiELBO(alpha=0) is not the IWAE bound under subsampling, and is not called one
    renyi = RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True)
    assert fit(vae, data, loss=renyi, **kw).objective == "renyi(α=0, k=3)"
    assert h.train_elbo is h.train_objective and len(h.train_objective) == 1
    d = h.to_dict()
    assert d["train_elbo"] == d["train_objective"] and d["objective"] == "iwae(k=3)"
    # A history written before `objective` existed reads back.
    old = History.from_dict({"train_elbo": [-5.0], "validation_elbo": [None], "num_steps": 4})
    assert old.train_objective == [-5.0] and old.objective == ""  # unknown until resumed


def test_checkpoint_of_pyrovae_0_1_resumes(tmp_path: Path) -> None:
    """A mid-epoch checkpoint written by the fit of pyrovae 0.1 (before TrainState: epoch 2,
    minibatch 2, beta 0.7 with warm-up, validation) resumes to the parameters and training
    objective that pyrovae 0.1's own uninterrupted run reached after 2 epochs (both saved by
    that version in tests/data)."""
    data_dir = REPO / "tests" / "data"
    (tmp_path / CHECKPOINT_NAME).write_bytes((data_dir / "checkpoint-fit-0.1.pt").read_bytes())
    expected = torch.load(data_dir / "params-fit-0.1-after-2-epochs.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.rand(48, 6, generator=g) * 0.6, generator=g)
    torch.manual_seed(55)
    vae = build_vae(VAEConfig(num_features=6, latent_dim=2, hidden_dims=(8,)), num_data=48)
    hist = fit(vae, data, resume=tmp_path, batch_size=8, seed=2, progress=False, beta=0.7,
               kl_warmup_epochs=1.5, validation=data[:8], num_epochs=2)
    # The same draws and steps; today's default loss evaluates the same gradients with the
    # parts' closed forms, to float32 rounding (0.1 evaluated Pyro's sites' distributions).
    for k, v in _params(vae).items():
        assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    # 0.1's history; its losses were Pyro's float64 sums of the sites' float32 sums, today's are
    # the float32 sum, so the reported objective agrees to float32 precision.
    assert hist.train_objective == pytest.approx([-4.237221558888754, -4.425570646921793],
                                                 rel=1e-6)
    assert hist.resumed_at_step == [8] and hist.num_steps == 12
    assert hist.objective == "beta-elbo(β=0.7) + KL warm-up (1.5 epochs)"


def test_plate_nesting_is_set_not_guessed(monkeypatch) -> None:
    """A vectorized loss gets max_plate_nesting from the VAE (data plate + particle plate);
    Pyro's private guess (which runs model and guide) is never called."""

    def no_guess(*args, **kwargs):
        raise AssertionError("_guess_max_plate_nesting was called")

    monkeypatch.setattr(ELBO, "_guess_max_plate_nesting", no_guess)
    vae, data = _setup()
    loss = RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True)
    fit(vae, data, loss=loss, num_epochs=1, batch_size=16, progress=False)
    assert loss.max_plate_nesting == 2
    single = Trace_ELBO(num_particles=1, vectorize_particles=True)
    fit(vae, data, loss=single, num_epochs=1, batch_size=16, progress=False)
    assert single.max_plate_nesting == 1


def test_every_loss_runs_the_public_program() -> None:
    """Every loss runs the VAE's public model and guide (which register the parameters as
    param sites, as RenyiELBO and plain SVI need); a loss that differentiates a tensor and one
    that backpropagates itself both train."""
    vae, data = _setup()
    renyi = RenyiELBO(alpha=0, num_particles=2, vectorize_particles=True)
    for loss in (Trace_ELBO(), IWAE(2), renyi):
        obj = objective(vae, loss)
        assert obj.model == vae.model and obj.guide == vae.guide
        before = _params(vae)
        fit(vae, data, loss=loss, num_epochs=1, batch_size=16, progress=False)
        assert any(not torch.equal(before[k], v) for k, v in _params(vae).items())


def test_jit_loss_with_warmup_is_refused() -> None:
    from pyro.infer import JitTrace_ELBO

    vae, data = _setup()
    with pytest.raises(pyrovae.ConfigError, match="warm-up"):
        fit(vae, data, loss=JitTrace_ELBO(), kl_warmup_epochs=1, num_epochs=1, progress=False)


# ---------------------------------------------------------------------- no host synchronization
def test_train_step_never_reads_a_device_value(monkeypatch) -> None:
    """On a device whose flags the host reads lazily (a GPU; here the CPU made to act like one),
    train_step itself converts no tensor to a Python value (each would be a GPU wait); the
    only reads are Pyro's own NaN warnings, outside pyrovae."""
    monkeypatch.setitem(training._SYNC_EVERY, "cpu", 32)
    vae, data = _setup()
    opt = training._adam(list(vae.parameters()), 1e-3)
    state = TrainState(vae, opt, seed=0)
    obj = objective(vae, Trace_ELBO())
    reads = []
    here = str(Path(training.__file__).resolve())
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == here:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for clip in (None, 1.0):
        train_step(state, data[:16], torch.arange(16), obj, clip_grad_norm=clip)
    assert reads == []
    assert state.history.num_steps == 2 and len(state.unreported) == 2


def test_fit_reads_the_device_only_where_the_host_syncs(monkeypatch, tmp_path: Path) -> None:
    """On a device whose flags the host reads every 4 steps (a GPU; here the CPU made to act
    like one), fit's loop and its callbacks (progress bar, checkpoints, SIGTERM) convert no
    tensor to a Python value between those reads: only at a synced step (reads attributed to
    it) and at an epoch's end."""
    monkeypatch.setitem(training._SYNC_EVERY, "cpu", 4)
    vae, data = _setup()
    events: list[Any] = []
    here = str(Path(training.__file__).resolve())
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == here:
                events.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Marker:
        def on_step_end(self, state: TrainState) -> None:
            events.append(state.history.num_steps)

    fit(vae, data, num_epochs=2, batch_size=8, progress=True, callbacks=[Marker()],
        checkpoint_dir=tmp_path / "run")
    last, after = 0, set()  # after: the steps after whose marker some read came
    for event in events:
        if isinstance(event, int):
            last = event
        else:
            after.add(last)
    # Step k's report (k = 4, 8, ...) comes after marker k - 1; an epoch's end and its
    # checkpoint after its last step's marker (8, 16).
    assert after == {3, 7, 11, 15, 8, 16}, sorted(after)


def test_lazy_host_checks_stop_at_the_exact_step(monkeypatch) -> None:
    """With the host reading the device flags only every 4 steps (as on a GPU), a streak of
    bad steps still stops training at its exact step, no update after it is applied, and the
    warnings are the same, in order."""
    from test_faults import FaultyELBO

    monkeypatch.setitem(training._SYNC_EVERY, "cpu", 4)
    vae, data = _setup()
    loss = FaultyELBO(vae, {2: "nan", 5: "nan", 6: "grad", 7: "inf"})
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingError) as e:
        warnings.simplefilter("always")
        fit(vae, data, loss=loss, num_epochs=2, batch_size=8, progress=False, max_bad_steps=3)
    assert "up to step 7" in str(e.value)
    steps = [int(str(w.message).split()[1]) for w in caught if w.category is NumericalWarning]
    assert steps == [2, 5, 6, 7]
    assert loss.calls == 8  # step 8 ran before the host looked, but was not applied
    good = loss.before[4]  # parameters after step 4, the last good update
    assert all(torch.equal(v, good[k]) for k, v in _params(vae).items())


@pytest.mark.parametrize("sync_every", [1, 32], ids=["host flags (cpu)", "device flags"])
def test_train_step_alone_skips_bad_steps_and_stops_after_a_streak(sync_every, monkeypatch) -> None:
    """train_step without fit (no host report): bad steps leave the parameters alone and are not
    summed; after max_bad_steps in a row no update is applied, even a good one; the running sums
    count the good steps only. The same on the host path (a CPU) and the device path."""
    from test_faults import FaultyELBO

    monkeypatch.setitem(training._SYNC_EVERY, "cpu", sync_every)
    vae, data = _setup()
    loss = FaultyELBO(vae, {2: "nan", 4: "grad", 5: "inf", 6: "nan"})
    state = TrainState(vae, training._adam(list(vae.parameters()), 1e-3), seed=0)
    obj = objective(vae, loss)
    values = []
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 9):
            _, value = train_step(state, data[:8], torch.arange(8), obj, max_bad_steps=3)
            values.append(float(value))
            assert int(state.bad_streak) == {2: 1, 4: 1, 5: 2, 6: 3}.get(step, 0)
            assert bool(state.stopped) == (step >= 6)
    loss.before.append(_params(vae))  # parameters after step 8
    moved = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(loss.before, loss.before[1:])]
    assert moved == [True, False, True, False, False, False, False, False]
    good = [-values[0] / N * 8, -values[2] / N * 8]  # steps 1 and 3 (step 4's loss is finite)
    assert int(state.datapoints) == 16
    assert float(state.objective_sum) == pytest.approx(sum(good), rel=1e-12)
    assert [r[4] if isinstance(r[4], bool) else bool(r[4]) for r in state.unreported] == [
        False, True, False, True, True, True, False, False]


# ------------------------------------------------------------------------------------------ SVI
def test_svi_by_hand_is_fit() -> None:
    """SVI.init and SVI.update by hand, over fit's minibatch order with fit's KL weights, end
    with fit's parameters and training objective, bit for bit: fit adds callbacks, no arithmetic;
    train_step is SVI.update."""
    whole, data = _setup()
    hist = fit(whole, data, num_epochs=2, batch_size=16, progress=False, seed=4, beta=0.5,
               clip_grad_norm=5.0)
    for by_hand in ("svi", "train_step"):
        vae, _ = _setup()
        obj = objective(vae, Trace_ELBO(), beta=0.5)
        svi = training.SVI(obj, lambda params: training._adam(params, 1e-3), clip_grad_norm=5.0)
        pyro.set_rng_seed(4)
        state = svi.init(vae, seed=4)
        vae.train()
        means = []
        for epoch in range(2):
            state.start_epoch(epoch)
            for batch in training._epoch_order(N, 4, epoch).split(16):
                w = obj.kl_weight(epoch + (state.batch + 1) / (N // 16))
                if by_hand == "svi":
                    state, _ = svi.update(state, data[batch], batch, kl_weight=w)
                else:
                    state, _ = train_step(state, data[batch], batch, obj, kl_weight=w,
                                          clip_grad_norm=5.0)
            means.append(float(state.objective_sum) / int(state.datapoints))
        assert all(torch.equal(v, _params(whole)[k]) for k, v in _params(vae).items()), by_hand
        assert means == hist.train_objective
        assert state.history.num_steps == hist.num_steps == 2 * N // 16


def test_one_guard_for_host_numbers_and_device_scalars() -> None:
    """The bad-step guard decides alike on Python numbers (a CPU, the host's report) and on
    device scalars: skip a bad step, count the streak, stop at max_bad_steps and skip from then."""
    flags = [False, True, True, False, True, True, True, False]
    host = (0, False)
    device = (torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.bool))
    seen = []
    for bad in flags:
        skip, *host = training._guard(bad, *host, 3)
        skip_d, *device = training._guard(torch.tensor(bad), *device, 3)
        assert (bool(skip_d), int(device[0]), bool(device[1])) == (skip, *host)
        seen.append((skip, *host))
    assert seen == [(False, 0, False), (True, 1, False), (True, 2, False), (False, 0, False),
                    (True, 1, False), (True, 2, False), (True, 3, True), (True, 0, True)]


def test_fit_runs_its_jobs_in_order(tmp_path: Path) -> None:
    """An epoch's end: the schedule's rate was set at its start; the user's on_epoch_end sees
    the finished epoch (state.epoch) with its validation ELBO, before that epoch's checkpoint.
    A step's end: the user's on_step_end runs before the step's checkpoint (every 2 steps)."""
    vae, data = _setup()
    seen, steps = [], []
    ckpt = tmp_path / "run" / CHECKPOINT_NAME

    class Probe:
        def on_step_end(self, state: TrainState) -> None:
            steps.append(read_checkpoint(ckpt)["history"]["num_steps"] if ckpt.exists() else 0)

        def on_epoch_end(self, state: TrainState) -> None:
            saved = read_checkpoint(ckpt)["history"]["num_steps"] if ckpt.exists() else 0
            seen.append((state.epoch, state.history.validation_elbo[-1] is not None, saved,
                         state.optimizer.param_groups[0]["lr"]))

    fit(vae, data, num_epochs=2, batch_size=16, progress=False, validation=data[:8],
        lr=lambda e: 1e-3 * (e + 1), checkpoint_dir=tmp_path / "run", checkpoint_every_steps=2,
        callbacks=[Probe()])
    assert seen == [(0, True, 2, 1e-3), (1, True, 6, 2e-3)]
    assert steps == [0, 0, 2, 2, 4, 4, 6, 6]  # saved at 2 and 6 (mid-epoch), 4 and 8 (epoch ends)
    assert read_checkpoint(ckpt)["history"]["num_steps"] == 2 * N // 16


# ------------------------------------------------------------------------------------ full disk
def test_full_disk_keeps_previous_checkpoint_and_resumes(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC while writing the second checkpoint: one line naming the folder and the space
    needed; the first checkpoint is intact; once space is back, resuming ends exactly as a run
    never interrupted."""
    vae, data = _setup()
    ref_vae, _ = _setup()
    ref_hist = fit(ref_vae, data, num_epochs=2, batch_size=8, progress=False, seed=4)
    real_save = torch.save
    calls = [0]

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        fit(vae, data, num_epochs=2, batch_size=8, progress=False, seed=4, checkpoint_dir=tmp_path,
            checkpoint_every_steps=3)
    msg = str(e.value)
    assert "\n" not in msg and "No space left" in msg and str(tmp_path) in msg
    assert "MiB" in msg and "previous checkpoint is intact" in msg
    monkeypatch.setattr(torch, "save", real_save)
    state = load_train_state(tmp_path)
    assert (state.epoch, state.batch, state.history.num_steps) == (0, 3, 3)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    resumed, _ = _setup(init_seed=9)
    hist = fit(resumed, data, num_epochs=2, batch_size=8, progress=False, seed=4, resume=tmp_path)
    assert all(torch.equal(v, _params(ref_vae)[k]) for k, v in _params(resumed).items())
    assert hist.train_objective == pytest.approx(ref_hist.train_objective, rel=1e-12)


def test_zip_writer_failure_is_a_disk_full_message(tmp_path: Path, monkeypatch) -> None:
    """torch.save's zip writer reports a full disk as a RuntimeError ("unexpected pos"): it
    becomes the same one-line CheckpointError, with the space needed and free."""
    vae, _ = _setup()
    pyrovae.save_checkpoint(tmp_path, vae)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def enforce_fail(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(CheckpointError) as e:
        pyrovae.save_checkpoint(tmp_path, vae)
    msg = str(e.value)
    assert "\n" not in msg and "needs about" in msg and "0.0 MiB free" in msg
    assert "enforce fail" not in msg.split("needs")[1]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


# -------------------------------------------------------------------------------------- SIGTERM
CHILD = r"""
import sys, time
import torch
torch.set_num_threads(1)
from pyrovae import training
from pyrovae.cli import main

log, delay = sys.argv[1], float(sys.argv[2])
real = training.SVI.update
def logged(*args, **kwargs):
    with open(log, "a") as f:
        f.write("step\n")
    time.sleep(delay)
    return real(*args, **kwargs)
training.SVI.update = logged
sys.exit(main(["train", *sys.argv[3:]]))
"""
TINY = ["--hidden-dims", "16", "--latent-dim", "2", "--eval-points", "20", "--num-samples", "10",
        "--no-progress", "--epochs", "2"]


def _child(tmp: Path, log: Path, delay: float, *args: str) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(log), str(delay), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM in epoch 1: the step in progress finishes, a checkpoint of exactly the steps
    taken is written, the exit status is 75 with the resume command; resuming ends with the
    parameters and history of a run never stopped."""
    ref = tmp_path / "reference"
    p = _child(tmp_path, tmp_path / "ref.log", 0.0, *TINY, "--out", str(ref))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]

    run, log = tmp_path / "run", tmp_path / "run.log"
    p = _child(tmp_path, log, 0.02, *TINY, "--out", str(run))
    while not log.exists() or len(log.read_text().splitlines()) < 10:
        assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]
    assert err.count("\n") == 1 and f"resume with: pyrovae train --resume {run}" in err
    started = len(log.read_text().splitlines())
    state = load_train_state(run)
    assert state.history.num_steps == started  # the step in progress finished, none was lost
    assert state.epoch == 0 and state.batch == started
    assert not (run / "metrics.json").exists()

    p = _child(tmp_path, log, 0.0, "--resume", str(run), "--eval-points", "20", "--num-samples",
               "10", "--no-progress")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    a, b = read_checkpoint(run), read_checkpoint(ref)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run, ref))
    assert ma["history"]["train_objective"] == mb["history"]["train_objective"]
    assert ma["history"]["resumed_at_step"] == [started]
    assert ma["test_log_likelihood"]["mean"] == mb["test_log_likelihood"]["mean"]


def test_sigterm_without_checkpoint_dir_is_left_alone() -> None:
    """fit installs its SIGTERM handler only when it can checkpoint, and restores the old one."""
    vae, data = _setup()
    old = signal.getsignal(signal.SIGTERM)
    seen = []

    class Probe:
        def on_step_end(self, state):
            seen.append(signal.getsignal(signal.SIGTERM))

    fit(vae, data, num_epochs=1, batch_size=32, progress=False, callbacks=[Probe()])
    assert seen and all(h is old for h in seen)
    assert signal.getsignal(signal.SIGTERM) is old


def test_fit_evaluates_trace_elbo_without_tracing_only_where_it_is_proven() -> None:
    """The direct loss (pyrovae.fastpath) is a candidate for exactly Pyro's one-particle
    Trace_ELBO; a subclass of the loss, more particles, another loss, or traced=True run Pyro's
    loss; a VAE whose model is rewritten is proven or not at run time (test_fastpath). fit's
    trajectory is the traced one's."""
    from pyrovae import VAE

    vae = build_vae(VAEConfig(num_features=6, latent_dim=2, hidden_dims=(4,)), num_data=20)
    x, idx = torch.bernoulli(torch.full((5, 6), 0.5)), torch.arange(5)

    def fast(obj):
        return obj.differentiable is not None and obj.differentiable.verdict(x, idx).fast

    assert fast(training.objective(vae, Trace_ELBO()))
    assert fast(training.objective(vae))  # the default loss
    assert not fast(training.objective(vae, Trace_ELBO(), traced=True))
    assert not fast(training.objective(vae, Trace_ELBO(num_particles=2)))
    assert not fast(training.objective(vae, IWAE(num_particles=3)))

    class MyELBO(Trace_ELBO):
        pass

    assert not fast(training.objective(vae, MyELBO()))
    # The objective runs the public programs (a subclass's own model is what trains).
    obj = training.objective(vae, Trace_ELBO())
    assert obj.model == vae.model and obj.guide == vae.guide

    # Same parameters after a few epochs whether or not the loss is traced (float tolerance).
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(20, 6, generator=g), generator=g)
    finals = []
    for traced in (False, True):
        torch.manual_seed(3)
        model = build_vae(VAEConfig(num_features=6, latent_dim=2, hidden_dims=(4,)), num_data=20)
        if traced:
            real = training.objective
            training.objective = lambda *a, **k: real(*a, **{**k, "traced": True})
        try:
            fit(model, x, num_epochs=3, batch_size=5, seed=1, progress=False)
        finally:
            if traced:
                training.objective = real
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(finals[0], finals[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(finals[0], torch.cat(
        [p.detach().flatten() for p in build_vae(
            VAEConfig(num_features=6, latent_dim=2, hidden_dims=(4,)), num_data=20).parameters()]
    ))


# ------------------------------------------------------------------------ lr schedule, Adam eps
class _RateLog:
    """Records (epoch, lr, eps) at every step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_step_end(self, state: TrainState) -> None:
        g = state.optimizer.param_groups[0]
        self.seen.append((state.epoch, g["lr"], g["eps"]))


def test_lr_schedule_sets_each_epochs_rate_and_a_constant_one_equals_a_number() -> None:
    vae, data = _setup()
    log = _RateLog()
    rates = [3e-2, 1e-2, 3e-3]
    fit(vae, data, lr=lambda e: rates[e], adam_eps=1e-4, num_epochs=3, batch_size=16,
        progress=False, callbacks=[log])
    assert {(e, lr, eps) for e, lr, eps in log.seen} == {(e, rates[e], 1e-4) for e in range(3)}
    assert len(log.seen) == 3 * (N // 16)
    const, _ = _setup()
    number, _ = _setup()
    fit(const, data, lr=lambda e: 1e-2, num_epochs=2, batch_size=16, progress=False)
    fit(number, data, lr=1e-2, num_epochs=2, batch_size=16, progress=False)
    assert all(torch.equal(v, _params(number)[k]) for k, v in _params(const).items())


def test_lr_schedule_and_eps_survive_a_resume(tmp_path: Path) -> None:
    """Interrupted after epoch 1 and resumed with the same schedule: bit-identical to a run
    never interrupted (the checkpoint's saved lr is overridden by the schedule); adam_eps=None
    on resume keeps the checkpoint's eps, a number replaces it."""
    schedule = lambda e: 1e-2 * 10 ** (-e / 2)  # noqa: E731
    whole, data = _setup()
    fit(whole, data, lr=schedule, adam_eps=1e-4, num_epochs=3, batch_size=16, progress=False, seed=3)
    part, _ = _setup()
    fit(part, data, lr=schedule, adam_eps=1e-4, num_epochs=1, batch_size=16, progress=False,
        seed=3, checkpoint_dir=tmp_path / "run")
    log = _RateLog()
    fit(part, data, lr=schedule, num_epochs=3, batch_size=16, progress=False, seed=3,
        resume=tmp_path / "run", callbacks=[log])
    assert all(torch.equal(v, _params(whole)[k]) for k, v in _params(part).items())
    assert {(e, eps) for e, _, eps in log.seen} == {(1, 1e-4), (2, 1e-4)}
    log = _RateLog()
    fit(part, data, lr=1e-3, adam_eps=1e-6, num_epochs=4, batch_size=16, progress=False,
        seed=3, resume=tmp_path / "run", callbacks=[log])
    assert {(lr, eps) for _, lr, eps in log.seen} == {(schedule(2), 1e-6)}  # a number keeps the saved lr


@pytest.mark.parametrize("bad, message", [
    (lambda e: 0.0, "positive finite number, got 0.0 at epoch 0"),
    (lambda e: math.nan, "positive finite number, got nan at epoch 0"),
    (lambda e: "0.1", "positive finite number, got '0.1' at epoch 0"),
    (lambda e: 1e-3 if e == 0 else -1.0, "got -1.0 at epoch 1"),
    (lambda e: [1e-3][e], "failed at epoch 1: IndexError"),
])
def test_bad_lr_schedules_are_refused_naming_the_epoch(bad, message, tmp_path: Path) -> None:
    vae, data = _setup()
    with pytest.raises(pyrovae.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        fit(vae, data, lr=bad, num_epochs=2, batch_size=16, progress=False,
            checkpoint_dir=tmp_path / "run")
    if "epoch 1" in message:  # epoch 0's checkpoint is intact and resumable
        assert read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["history"]["num_steps"] == N // 16
    else:  # refused before anything was set up or written
        assert not (tmp_path / "run").exists()
    with pytest.raises(pyrovae.ConfigError, match="adam_eps"):
        fit(vae, data, adam_eps=0.0, num_epochs=1, progress=False)


# -------------------------------------------------------------------------------- torch.compile
def _count_compiled_calls(monkeypatch) -> list[int]:
    """Make every function that torch.compile returns append to the returned list when called."""
    calls: list[int] = []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        compiled_fn = real_compile(fn, **kwargs)

        def counted(*args, **kw):
            calls.append(1)
            return compiled_fn(*args, **kw)

        return counted

    monkeypatch.setattr(torch, "compile", counting_compile)
    return calls


@needs_cxx
def test_compiled_loss_is_the_eager_loss_and_fit_uses_it(monkeypatch) -> None:
    """The compiled loss draws the same noise as the eager one (inductor's fallback_random) and
    gives the same value and gradient to float rounding, for two KL weights and a ragged last
    minibatch; fit(compile=True) runs on it. (Whole runs are not compared bit-wise: Adam's first
    steps are +-lr for any gradient element near 0, so rounding can flip them.)"""
    vae, data = _setup()
    eager = objective(vae, Trace_ELBO(), beta=0.5)
    compiled = objective(vae, Trace_ELBO(), beta=0.5, compile=True)
    compiled.differentiable.prepare(data[:16], torch.arange(16), 1.0)
    with pyro.validation_enabled(False):
        for rows, w in ((16, 1.0), (16, 0.3), (10, 0.3)):
            x, idx = data[:rows], torch.arange(rows)
            values, grads = [], []
            for obj in (eager, compiled):
                vae.zero_grad(set_to_none=True)
                pyro.set_rng_seed(7)
                value = obj.differentiable(x, idx, w)
                value.backward()
                values.append(value.detach())
                grads.append([p.grad.clone() for p in vae.parameters()])
            assert_close(values[1], values[0], rtol=1e-6, atol=0)
            for g_compiled, g_eager in zip(*grads[::-1]):
                assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-5)
    calls = _count_compiled_calls(monkeypatch)

    class StepLosses:
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_step_end(self, state) -> None:
            self.values.append(float(state.objective_sum))  # the epoch's running sum

    runs = []
    for compile_ in (True, False):
        vae, _ = _setup()  # (the same initial parameters; the same data for both runs)
        losses = StepLosses()
        fit(vae, data, num_epochs=2, batch_size=16, progress=False, compile=compile_,
            callbacks=[losses])
        runs.append(losses.values)
    assert len(calls) == 2 * N // 16  # every step of the compiled run ran the compiled loss
    # The first step: same parameters, same draw, same loss; later ones drift with rounding.
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert runs[0] == pytest.approx(runs[1], rel=0.05)


@needs_cxx
def test_compiled_estimators_are_the_eager_estimators(monkeypatch) -> None:
    """log_likelihood, elbo and iwae_bounds with compile=True evaluate every chunk of importance
    weights through the compiled function, draw the same noise for the same seed and give the
    same per-datapoint values (and PSIS k-hat) to float rounding, over ragged chunks: 11 points
    in batches of 2 (the last of 1) with K = 50, and of 40 with K = 3."""
    vae, data = _setup()
    x = data[:11]
    calls = _count_compiled_calls(monkeypatch)
    cases = (
        (pyrovae.log_likelihood, {"num_samples": 50, "warn_share": 1.0}, 6),
        (pyrovae.elbo, {"num_samples": 3}, 1),
        (pyrovae.iwae_bounds, {"num_samples": (1, 7, 50)}, 6),
    )
    for estimator, options, chunks in cases:
        eager = estimator(vae, x, seed=3, max_rows=120, **options)
        before = len(calls)
        compiled = estimator(vae, x, seed=3, max_rows=120, compile=True, **options)
        assert len(calls) - before == chunks
        assert_close(compiled.values, eager.values, rtol=1e-5, atol=1e-5)
        if estimator is pyrovae.log_likelihood:
            assert_close(compiled.khat, eager.khat, rtol=1e-4, atol=1e-4)
    assert len(calls) == 13


def test_compile_is_refused_where_it_does_not_apply() -> None:
    vae, data = _setup()
    with pytest.raises(pyrovae.ConfigError, match="Pyro's tracing"):
        fit(vae, data, loss=IWAE(num_particles=2), num_epochs=1, progress=False, compile=True)
    with pytest.raises(pyrovae.ConfigError, match="compile must be True or False"):
        fit(vae, data, num_epochs=1, progress=False, compile="yes")
    with pytest.raises(pyrovae.ConfigError, match="Pyro's tracing"):
        pyrovae.log_likelihood((vae.model, vae.guide), data, 5, compile=True)
    with pytest.raises(pyrovae.ConfigError, match="compile must be True or False"):
        pyrovae.elbo(vae, data, compile="yes")
    local = build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,), family="local"),
                      num_data=N)
    with pytest.raises(pyrovae.ConfigError, match="local='fit'"):
        pyrovae.iwae_bounds(local, data, (1, 5), local="fit", compile=True)


def test_validation_data_is_refused_for_a_per_datapoint_family(tmp_path) -> None:
    """LocalNormal holds parameters for the training datapoints only: a validation ELBO of
    held-out points would crash after the first epoch (it did, from the CLI), so fit refuses it
    before training, leaving the model and the checkpoint folder untouched; without validation
    data the same model trains."""
    _, data = _setup()
    local = build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,), family="local"),
                      num_data=N)
    before = _params(local)
    with pytest.raises(pyrovae.ConfigError, match=r"LocalNormal.*local='fit'"):
        fit(local, data, validation=data[:5], num_epochs=1, batch_size=8, progress=False,
            checkpoint_dir=tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in local.state_dict().items())
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()
    history = fit(local, data, num_epochs=1, batch_size=8, progress=False)
    assert history.validation_elbo == [None] and math.isfinite(history.train_objective[-1])

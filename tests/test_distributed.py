"""Data-parallel training under torchrun (loopback, gloo, 2 CPU processes, a tiny model).

The parameters after two epochs on 2 processes equal those of one process with the same global
minibatches (float tolerance; the latent noise is switched off so both draw alike); a run
checkpointed and resumed under torchrun ends exactly as one never stopped; a rank that dies ends
the run with its error and the last checkpoint intact; ``python -m torch.distributed.run ... -m
pyrovae train`` writes one run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributions as td

import pyrovae.families
from pyrovae import distributed, fit
from pyrovae.build import VAEConfig, build_vae
from pyrovae.checkpoint import CHECKPOINT_NAME, load_train_state, read_checkpoint

from conftest import assert_close

REPO = Path(__file__).resolve().parents[1]
N, D, BATCH = 91, 10, 16  # the last global minibatch has 11 rows: shards of 6 and 5
pytestmark = pytest.mark.usefixtures("one_thread")

#: Evaluations run on 2 ranks (process_group=True) and in one process; several batches each
#: (split unevenly between the ranks), and one batch (rank 1 has none).
EVALUATIONS = r"""
import pyrovae
EVALUATIONS = {
    "log_likelihood": lambda vae, x, **kw: pyrovae.log_likelihood(
        vae, x, 30, max_rows=64, seed=5, **kw),
    "elbo": lambda vae, x, **kw: pyrovae.elbo(vae, x, 3, max_rows=16, seed=5, **kw),
    "iwae_bounds": lambda vae, x, **kw: pyrovae.iwae_bounds(
        vae, x, (1, 10), max_rows=64, seed=5, **kw),
    "ais": lambda vae, x, **kw: pyrovae.ais(
        vae, x[:9], num_intermediate=10, num_chains=3, leapfrog_steps=2, max_bytes=2**14, seed=5,
        **kw),
    "one_batch": lambda vae, x, **kw: pyrovae.log_likelihood(vae, x[:3], 30, seed=5, **kw),
}
"""

COMMON = r"""
import os, sys, json
import torch
torch.set_num_threads(1)
from torch import distributions as td
import pyrovae
from pyrovae import distributed
from pyrovae.build import VAEConfig, build_vae

N, D, BATCH = 91, 10, 16
g = torch.Generator().manual_seed(0)
data = torch.bernoulli(torch.rand(N, D, generator=g) * 0.6, generator=g)
rank = int(os.environ["RANK"])
out = sys.argv[1]
real_rsample = td.Normal.rsample
real_noise = pyrovae.families._standard_normal_like
def no_noise(self, sample_shape=torch.Size()):
    return self.loc.expand(self._extended_shape(sample_shape))
def noise_off(off):
    # Both ways a Gaussian q draws: its distribution's rsample, and the closed form's noise.
    td.Normal.rsample = no_noise if off else real_rsample
    pyrovae.families._standard_normal_like = torch.zeros_like if off else real_noise
def model():
    torch.manual_seed(1)
    return build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,)), num_data=N)
def save(vae, name):
    torch.save(vae.state_dict(), os.path.join(out, f"{name}-rank{rank}.pt"))
"""

TRAIN = COMMON + EVALUATIONS + r"""
# 1. Same global minibatches as one process; no latent noise, so the gradients correspond.
noise_off(True)
vae = model()
h = pyrovae.fit(vae, data, num_epochs=2, batch_size=BATCH, seed=3, progress=False, lr=1e-2)
save(vae, "parity")
noise_off(False)
# 2. With noise: an uninterrupted run, and one stopped mid-epoch 2 then resumed.
vae = model()
pyrovae.fit(vae, data, num_epochs=2, batch_size=BATCH, seed=3, progress=False,
            checkpoint_dir=os.path.join(out, "full"))
save(vae, "full")
stopped = os.path.join(out, "stopped")
pyrovae.fit(model(), data, num_epochs=1, batch_size=BATCH, seed=3, progress=False,
            checkpoint_dir=stopped)
torch.manual_seed(100 + rank)  # as a fresh process would have it
vae = model()
pyrovae.fit(vae, data, num_epochs=2, batch_size=BATCH, seed=3, progress=False, resume=stopped)
save(vae, "resumed")
# 3. Per-datapoint values computed on shards, gathered in order.
idx = distributed.shard_indices(N)
values = distributed.all_gather_values(torch.stack([idx * 2.0, -idx * 1.0], -1), N)
torch.save(values, os.path.join(out, f"gathered-rank{rank}.pt"))
# 4. Distributed evaluation of the resumed model: each rank scores its batches, then gathers.
import warnings
warnings.simplefilter("ignore")
torch.manual_seed(200 + rank)  # the ranks' global RNGs differ; the seeded values must not
evaluated = {
    name: fn(vae, data, process_group=True).values for name, fn in EVALUATIONS.items()
}
torch.save(evaluated, os.path.join(out, f"evaluated-rank{rank}.pt"))
json.dump({"history": h.to_dict(), "world": distributed.world_size()},
          open(os.path.join(out, f"info-rank{rank}.json"), "w"))
"""

DIE = COMMON + r"""
from pyro.infer import Trace_ELBO
class Dies(Trace_ELBO):
    calls = 0
    def differentiable_loss(self, *args, **kwargs):
        Dies.calls += 1
        if rank == 1 and Dies.calls == 10:
            raise RuntimeError("rank 1 fell over at step 10")
        return super().differentiable_loss(*args, **kwargs)
pyrovae.fit(model(), data, loss=Dies(), num_epochs=3, batch_size=BATCH, seed=3, progress=False,
            checkpoint_dir=os.path.join(out, "run"), checkpoint_every_steps=4)
"""


def _torchrun(tmp: Path, script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    path = tmp / "script.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    target = [str(path), str(tmp)] if not args else ["-m", "pyrovae", *args]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *target],
        env=env, cwd=cwd or tmp, capture_output=True, text=True, timeout=900,
    )


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.rand(N, D, generator=g) * 0.6, generator=g)


def _model():
    torch.manual_seed(1)
    return build_vae(VAEConfig(num_features=D, latent_dim=2, hidden_dims=(8,)), num_data=N)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("torchrun")
    result = _torchrun(tmp, TRAIN)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return tmp


def test_two_processes_follow_the_single_process_trajectory(two_ranks: Path, monkeypatch) -> None:
    """2 ranks x ~8 rows == 1 process x 16 rows, step for step (uneven last minibatch included):
    same parameters after 2 epochs (12 steps) to float tolerance, on both ranks."""
    monkeypatch.setattr(td.Normal, "rsample",
                        lambda self, sample_shape=torch.Size(): self.loc.expand(self._extended_shape(sample_shape)))
    monkeypatch.setattr(pyrovae.families, "_standard_normal_like", torch.zeros_like)
    vae = _model()
    single = fit(vae, _data(), num_epochs=2, batch_size=BATCH, seed=3, progress=False, lr=1e-2)
    ranks = [torch.load(two_ranks / f"parity-rank{r}.pt") for r in (0, 1)]
    moved = 0.0
    for k, v in vae.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the replicas stay identical
        assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved = max(moved, float((v - _model().state_dict()[k]).abs().max()))
    assert moved > 1e-2  # training did move them
    info = json.loads((two_ranks / "info-rank0.json").read_text())
    assert info["world"] == 2 and info["history"]["num_steps"] == single.num_steps == 12
    assert info["history"]["train_objective"] == pytest.approx(single.train_objective, rel=1e-5)


def test_resume_under_torchrun_is_exact(two_ranks: Path) -> None:
    """A 2-process run stopped after epoch 1 and resumed (every rank's RNG restored) ends
    bit-identical to one never stopped; only rank 0 wrote the run folders."""
    for r in (0, 1):
        full = torch.load(two_ranks / f"full-rank{r}.pt")
        resumed = torch.load(two_ranks / f"resumed-rank{r}.pt")
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    ckpt = read_checkpoint(two_ranks / "stopped")
    assert len(ckpt["training_state"]["rng_ranks"]) == 2
    assert ckpt["training_state"]["settings"]["world_size"] == 2
    assert sorted(p.name for p in (two_ranks / "full").iterdir()) == [CHECKPOINT_NAME, "config.json"]


def test_gathered_values_are_in_datapoint_order(two_ranks: Path) -> None:
    expected = torch.stack([torch.arange(N) * 2.0, -torch.arange(N) * 1.0], -1)
    for r in (0, 1):
        assert torch.equal(torch.load(two_ranks / f"gathered-rank{r}.pt"), expected)


def test_a_dead_rank_ends_the_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    result = _torchrun(tmp_path, DIE)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 fell over at step 10" in output
    state = load_train_state(tmp_path / "run")
    assert state.history.num_steps == 8 and state.batch == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_cli_under_torchrun_writes_one_run_folder(tmp_path: Path) -> None:
    result = _torchrun(tmp_path, "", "train", "--epochs", "1", "--hidden-dims", "16",
                       "--latent-dim", "2", "--eval-points", "20", "--num-samples", "10",
                       "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert {"checkpoint.pt", "config.json", "metrics.json"} <= {p.name for p in runs[0].iterdir()}
    assert result.stdout.count("run folder:") == 1 and "processes=2" in result.stdout
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["history"]["num_steps"] == 54  # global minibatches of 100, as one process
    assert metrics["processes"] == 2  # the test points were scored by both ranks

    # `pyrovae evaluate` under torchrun: one result file, the very per-datapoint values of one
    # process (the ranks split the batches; each batch is seeded by (seed, batch)).
    options = ["evaluate", str(runs[0]), "--eval-points", "40", "--num-samples", "30",
               "--per-datapoint", "--no-progress"]
    result = _torchrun(tmp_path, "", *options, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.count("wrote ") == 1 and "2 processes" in result.stdout
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "pyrovae", *options], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (json.loads((runs[0] / name).read_text())["test_log_likelihood"]
                for name in ("evaluation-test-is-K30.json", "evaluation-test-is-K30-2.json"))
    assert len(one["per_datapoint"]["values"]) == 40
    assert two["per_datapoint"] == one["per_datapoint"]


def test_distributed_evaluation_equals_one_process(two_ranks: Path) -> None:
    """log_likelihood, elbo, iwae_bounds and ais with process_group=True on 2 ranks return, on
    both ranks, exactly the per-datapoint values of one process for the same seed: the ranks
    score disjoint runs of batches, each batch seeded by (seed, batch), and gather in order
    (also when one rank has no batch at all)."""
    namespace: dict = {}
    exec(EVALUATIONS, namespace)
    vae = _model()
    vae.load_state_dict(torch.load(two_ranks / "resumed-rank0.pt", weights_only=True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {name: fn(vae, _data()).values for name, fn in namespace["EVALUATIONS"].items()}
    assert expected["ais"].shape == (9,) and expected["log_likelihood"].shape == (N,)
    for r in (0, 1):
        got = torch.load(two_ranks / f"evaluated-rank{r}.pt", weights_only=True)
        for name, values in expected.items():
            assert torch.equal(got[name], values), (r, name)


# ------------------------------------------------------------------------- single-process helpers
def test_helpers_in_one_process() -> None:
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    x = torch.arange(7.0)
    assert torch.equal(distributed.all_gather_values(x, 7), x)
    assert torch.equal(distributed.shard_indices(7), torch.arange(7))
    parts = [distributed.shard(torch.arange(11), r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat(parts), torch.arange(11))


SLOW_CLI = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
from pyrovae import training
from pyrovae.cli import main
real = training.SVI.update
def slow(*args, **kwargs):
    with open(f"steps{os.environ['RANK']}", "a") as f:
        f.write("step\n")
    time.sleep(0.03)
    return real(*args, **kwargs)
training.SVI.update = slow
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_sigterm_to_torchrun_stops_every_rank_at_one_checkpoint(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers: they agree on the step to stop at, rank 0
    writes a checkpoint holding every step taken, and prints the torchrun resume command once."""
    import signal
    import time

    (tmp_path / "child.py").write_text(SLOW_CLI)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "child.py", "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "2", "--no-progress",
         "--out", "run"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log = tmp_path / "steps0"
    while not log.exists() or len(log.read_text().splitlines()) < 10:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    started = [len((tmp_path / f"steps{r}").read_text().splitlines()) for r in (0, 1)]
    assert started[0] == started[1]
    state = load_train_state(tmp_path / "run")
    assert state.history.num_steps == started[0] and state.batch == started[0]
    assert err.count("preempted") == 1
    assert "resume with: torchrun --nproc-per-node=2 -m pyrovae train --resume run" in err


def test_process_group_true_outside_torchrun_is_a_one_line_error(monkeypatch) -> None:
    """An estimator asked to split its work with no process group to split it over says so
    (and how to start one), instead of silently scoring everything in one process."""
    from pyrovae import log_likelihood
    from pyrovae.errors import ConfigError

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        log_likelihood(_model(), _data()[:4], 5, process_group=True)
    # False (the default) and None score in this process.
    assert log_likelihood(_model(), _data()[:4], 5, seed=0, process_group=None).values.shape == (4,)

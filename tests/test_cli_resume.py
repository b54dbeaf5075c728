"""`pyrovae train` checkpoints into its run folder; `--resume RUN` continues it exactly.

Every run here trains a tiny model on the bundled default data, in-process through
``pyrovae.cli.main``; a resumed run must end with the parameters, history and test estimates of a
run never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyrovae.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, read_checkpoint
from pyrovae.cli import main

TINY = ["--check-points", "0", "--hidden-dims", "16", "--latent-dim", "2", "--eval-points", "20", "--num-samples", "10",
        "--no-progress"]
STEPS_PER_EPOCH = 54  # 5,400 training digits (10% of 6,000 held out), batch 100


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(*args: str) -> int:
    return main(["train", *TINY, *args])


def _result(run: Path) -> tuple[dict, dict]:
    return read_checkpoint(run)["model"], json.loads((run / "metrics.json").read_text())


def _assert_same_run(run: Path, reference: tuple[dict, dict], resumed_at: list[int]) -> None:
    params, metrics = _result(run)
    ref_params, ref_metrics = reference
    assert params.keys() == ref_params.keys()
    for k in params:
        assert torch.equal(params[k], ref_params[k]), k
    for key in ("train_elbo", "validation_elbo", "num_steps"):
        assert metrics["history"][key] == ref_metrics["history"][key], key
    assert metrics["history"]["resumed_at_step"] == resumed_at
    for key in ("test_elbo", "test_log_likelihood"):
        assert metrics[key]["mean"] == ref_metrics[key]["mean"], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    run = tmp_path_factory.mktemp("cli") / "reference"
    assert _train("--epochs", "3", "--out", str(run)) == 0
    return _result(run)


def test_resume_more_epochs_equals_uninterrupted(tmp_path: Path, uninterrupted, capsys) -> None:
    """2 epochs, then `--resume RUN --epochs 3`, ends exactly as one 3-epoch run; the saved
    options are used, and repeating a saved model option is not a conflict."""
    run = tmp_path / "run"
    assert _train("--epochs", "2", "--out", str(run)) == 0
    assert (run / CHECKPOINT_NAME).is_file() and not (run / "model.pt").exists()
    saved = json.loads((run / CONFIG_NAME).read_text())
    assert saved["vae"]["latent_dim"] == 2 and saved["cli"]["epochs"] == 2
    assert read_checkpoint(run)["training_state"]["epoch"] == 2
    capsys.readouterr()
    # Only --resume and what may change: the model, data and training options come from the run.
    assert main(["train", "--resume", str(run), "--epochs", "3", "--hidden-dims", "16",
                 "--eval-points", "20", "--num-samples", "10", "--no-progress"]) == 0
    assert "resuming from" in capsys.readouterr().out
    _assert_same_run(run, uninterrupted, [2 * STEPS_PER_EPOCH])
    assert json.loads((run / CONFIG_NAME).read_text())["cli"]["epochs"] == 3


def test_interrupted_mid_epoch_resumes_from_step_checkpoint(
    tmp_path: Path, uninterrupted, monkeypatch, capsys
) -> None:
    """Ctrl-C in epoch 2 (step 85) with --checkpoint-every-steps 10: exit code 130, the checkpoint
    of step 80 survives, and `--resume RUN` (nothing else) finishes the run exactly."""
    from pyrovae import training

    real = training.SVI.update
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 85:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(training.SVI, "update", interrupted)
    assert _train("--epochs", "3", "--checkpoint-every-steps", "10", "--out", str(run)) == 130
    monkeypatch.setattr(training.SVI, "update", real)
    assert "interrupted" in capsys.readouterr().err
    state = read_checkpoint(run)["training_state"]
    assert (state["epoch"], state["batch"]) == (1, 80 - STEPS_PER_EPOCH)
    assert not (run / "metrics.json").exists()
    assert main(["train", "--resume", str(run), "--eval-points", "20", "--num-samples", "10",
                 "--no-progress"]) == 0
    _assert_same_run(run, uninterrupted, [80])
    # `pyrovae evaluate RUN` loads the same checkpoint and reproduces the run's test estimate.
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run), "--num-samples", "10", "--eval-points", "20", "--check-points", "0",
                 "--no-progress"]) == 0
    evaluation = json.loads((run / "evaluation-test-is-K10.json").read_text())
    assert evaluation["test_log_likelihood"]["mean"] == metrics["test_log_likelihood"]["mean"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--latent-dim", "3"], "--latent-dim 3 conflicts with the run's saved latent_dim=2"),
        (["--hidden-dims", "16", "16"], "saved hidden_dims=[16]"),
        (["--family", "iaf"], "saved family='diagonal'"),
        (["--option", "scale=0.1"], "saved options={}"),
        (["--lr", "0.01"], "--lr 0.01 conflicts with the run's saved lr=0.001"),
        (["--adam-eps", "0.0001"], "--adam-eps 0.0001 conflicts with the run's saved adam_eps=None"),
        (["--dataset", "mnist"], "saved dataset='default'"),
        (["--batch-size", "50"], "saved batch_size=100"),
        (["--seed", "1"], "saved seed=0"),
        (["--out", "elsewhere"], "--out elsewhere conflicts with --resume"),
    ],
)
def test_conflicting_options_with_resume(uninterrupted_run: Path, extra, message, capsys) -> None:
    before = read_checkpoint(uninterrupted_run)["model"]
    assert main(["train", "--resume", str(uninterrupted_run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyrovae train: error: ") and message in err
    after = read_checkpoint(uninterrupted_run)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run folder (for checks that must not train)."""
    run = tmp_path_factory.mktemp("cli") / "one-epoch"
    assert _train("--epochs", "1", "--out", str(run)) == 0
    return run


def test_missing_run_checkpoint_or_config(tmp_path: Path, uninterrupted_run: Path, capsys) -> None:
    cases = {}
    cases["no folder"] = (tmp_path / "nowhere", "no such run folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config"] = (empty, "has no config.json")
    killed_early = tmp_path / "killed-early"  # config written, killed before the first checkpoint
    killed_early.mkdir()
    (killed_early / CONFIG_NAME).write_text((uninterrupted_run / CONFIG_NAME).read_text())
    cases["no checkpoint"] = (killed_early, "has no checkpoint.pt")
    for name, (run, message) in cases.items():
        assert main(["train", "--resume", str(run)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
    # A corrupted checkpoint is named too, and so is re-using a run folder without --resume.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CONFIG_NAME).write_text((uninterrupted_run / CONFIG_NAME).read_text())
    data = (uninterrupted_run / CHECKPOINT_NAME).read_bytes()
    (corrupt / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    assert main(["train", "--resume", str(corrupt), "--no-progress"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    assert _train("--out", str(uninterrupted_run)) == 2
    assert "already holds a trained run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_clip_grad_norm_option_reaches_fit(tmp_path: Path) -> None:
    """--clip-grad-norm bounds the first Adam moment after one step: ||exp_avg|| = 0.1 * clip."""
    run = tmp_path / "run"
    clip = 1e-4
    assert main(["train", *TINY, "--epochs", "1", "--validation-fraction", "0",
                 "--batch-size", "6000", "--clip-grad-norm", str(clip), "--out", str(run)]) == 0
    state = read_checkpoint(run)["optimizer"]["state"]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(s["exp_avg"]) for s in state.values()])
    )
    torch.testing.assert_close(float(norm), 0.1 * clip, rtol=1e-4, atol=0)
    assert json.loads((run / CONFIG_NAME).read_text())["cli"]["clip_grad_norm"] == clip


def test_adam_eps_option_reaches_fit(tmp_path: Path) -> None:
    """--adam-eps is the optimizer's epsilon in the checkpoint, and the run saves it."""
    run = tmp_path / "run"
    eps = 1e-4
    assert main(["train", *TINY, "--epochs", "1", "--validation-fraction", "0",
                 "--adam-eps", str(eps), "--out", str(run)]) == 0
    ckpt = read_checkpoint(run)
    assert {g["eps"] for g in ckpt["optimizer"]["param_groups"]} == {eps}
    assert json.loads((run / CONFIG_NAME).read_text())["cli"]["adam_eps"] == eps

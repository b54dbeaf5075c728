"""`pyrovae train` swaps parts, networks and losses from the command line (tiny runs, in-process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyrovae.checkpoint import load_model
from pyrovae.cli import main

TINY = ["--check-points", "0", "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--eval-points", "20",
        "--num-samples", "10", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--loss", "jit"], {}),
        (["--network", "conv"], {"network": "conv"}),
        (["--prior", "mixture", "--family", "iaf", "--option", "num_components=3"],
         {"prior": "mixture", "family": "iaf"}),
        (["--loss", "iwae", "--num-particles", "3", "--family", "planar"], {"family": "planar"}),
    ],
)
def test_train_swaps_from_the_command_line(tmp_path, capsys, args, expect):
    run = tmp_path / "run"
    assert main(["train", *TINY, *args, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    ll, el = metrics["test_log_likelihood"]["mean"], metrics["test_elbo"]["mean"]
    # one epoch beats 784 fair coins (-543 nats), and the IS estimate bounds the ELBO from above
    assert math.isfinite(ll) and -543 < ll and el < ll + 1.0
    vae = load_model(run)
    for key, value in expect.items():
        assert getattr(vae.config, key) == value
    printed = capsys.readouterr().out
    assert "test log-likelihood" in printed
    assert "reconstructions.png (odd rows: test images, even rows: their reconstructions)" in printed
    # a 2-D latent space gets its manifold, codes and interpolations drawn
    for picture in ("samples.png", "manifold.png", "latent_scatter.png", "interpolation.png"):
        assert (run / picture).stat().st_size > 1000, picture


@pytest.mark.parametrize("args, message", [
    (["--prior", "vamp", "--family", "planar"], "VampPrior needs a variational family that"),
    (["--prior", "vamp", "--family", "local"], "--family diagonal"),
    (["--binarize", "none"], "binarize it first (--binarize dynamic), or keep its grey values with "
     "a continuous likelihood (--likelihood continuous_bernoulli or --likelihood gaussian)"),
    (["--dataset", "mnist", "--data-root", "/nonexistent/folder"], "--data-root"),
    (["--loss", "elbo", "--gradient", "dreg"], "use --loss iwae"),
    (["--loss", "iwae", "--compile"], "train without compile=True (--compile)"),
])
def test_refused_runs_speak_cli_and_leave_no_folder(tmp_path, capsys, args, message):
    """A refused run prints one line in the CLI's own words and leaves no run folder behind."""
    run = tmp_path / "run"
    assert main(["train", *TINY, *args, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "binarize='" not in err and "root=" not in err
    assert not run.exists()


def test_a_local_family_runs_through_the_cli(tmp_path, capsys):
    """`--family local` (parameters per training datapoint, no encoder) trains and is scored by
    every command that can score it: no validation split (held-out points have no parameters;
    fit refuses them), AIS from the prior (an encoder start needs q(z|x) of new points), the
    BDMC's IS beside fitted proposals; `gaps` (no amortization gap without an encoder) refuses
    it in one line. Each of these failed after training, with the API's words, before."""
    run = tmp_path / "run"
    tiny = [a if a != "0" else "3" for a in TINY] + ["--ais-steps", "5"]  # --check-points 3
    assert main(["train", *tiny, "--family", "local", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "(6000 train, 0 validation, 1000 test)" in out and "no validation split" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ais_check"]["ais"]["start"] == "prior"
    assert math.isfinite(metrics["ais_check"]["ais_minus_is"]["mean"])
    assert main(["evaluate", str(run), "--estimator", "ais", "--eval-points", "4",
                 "--ais-steps", "5", "--no-progress"]) == 0
    assert main(["bdmc", str(run), "--points", "3", "--ais-steps", "5", "--is-samples", "10",
                 "--no-progress"]) == 0
    (bdmc_file,) = run.glob("bdmc-*.json")
    assert json.loads(bdmc_file.read_text())["lower"]["start"] == "prior"
    capsys.readouterr()
    assert main(["gaps", str(run), "--eval-points", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no amortization gap" in err and "local='fit'" not in err
    assert not list(run.glob("gaps*"))


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_a_flow_without_inverse_runs_through_the_cli(tmp_path, capsys, family):
    """A planar or radial flow gives q(z|x) only at its own samples: the AIS check, `evaluate
    --estimator ais` and `bdmc` start from the prior, and `gaps` (AIS from the prior too) prints
    n/a for the aggregate posterior, which needs q(z|x) at other points' draws. Each of these
    stopped with the API's words (the AIS check after training) before."""
    run = tmp_path / "run"
    tiny = [a if a != "0" else "3" for a in TINY] + ["--ais-steps", "5"]  # --check-points 3
    assert main(["train", *tiny, "--family", family, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ais_check"]["ais"]["start"] == "prior"
    assert main(["evaluate", str(run), "--estimator", "ais", "--eval-points", "4",
                 "--ais-steps", "5", "--no-progress"]) == 0
    assert main(["bdmc", str(run), "--points", "2", "--ais-steps", "5", "--is-samples", "10",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["gaps", str(run), "--eval-points", "4", "--num-samples", "10", "--num-steps",
                 "10", "--ais-steps", "10", "--ais-chains", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(log p(x) by AIS)" in out or "(log p(x) by IS)" in out
    assert "n/a: the family evaluates q(z|x) only at its own samples" in out
    report = json.loads((run / "gaps.json").read_text())["runs"]["run"]
    assert report["diagnostics"]["aggregate_posterior"] is None
    assert math.isfinite(report["gaps"]["approximation_gap"]["mean"])


_EACH_PART = ([["--family", f] for f in
               ("diagonal", "full_rank", "iaf", "planar", "radial", "spline", "householder")]
              + [["--prior", p] for p in ("learned", "mixture", "vamp", "flow")]
              + [["--likelihood", lk] for lk in
                 ("gaussian", "laplace", "continuous_bernoulli", "categorical256")])


@pytest.mark.parametrize("args", _EACH_PART, ids=lambda a: "-".join(a).lstrip("-"))
def test_each_part_trains_and_is_measured_by_every_command(tmp_path, args):
    """Every part the command line offers (with the defaults for the other two), end to end:
    train with the AIS check, then `evaluate --estimator ais`, `bdmc` and `gaps`. A part whose
    run trained and then stopped at a later measurement would fail here (the planar and radial
    flows and the local family did). `--family local` (no gaps) has its own test."""
    run = tmp_path / "run"
    tiny = [a if a != "0" else "3" for a in TINY] + ["--ais-steps", "5", "--num-train", "300"]
    assert main(["train", *tiny, *args, "--out", str(run)]) == 0
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["ais_check"]["ais"]["mean"])
    assert main(["evaluate", str(run), "--estimator", "ais", "--eval-points", "3",
                 "--ais-steps", "5", "--no-progress"]) == 0
    assert main(["bdmc", str(run), "--points", "2", "--ais-steps", "5", "--is-samples", "10",
                 "--no-progress"]) == 0
    assert main(["gaps", str(run), "--eval-points", "3", "--num-samples", "10", "--num-steps",
                 "10", "--ais-steps", "10", "--ais-chains", "2", "--no-progress"]) == 0
    gap = json.loads((run / "gaps.json").read_text())["runs"]["run"]["gaps"]
    assert math.isfinite(gap["approximation_gap"]["mean"])


def test_a_run_remembers_its_data_root(tmp_path, monkeypatch, real_data_root):
    """`pyrovae evaluate RUN` finds the data where the run found it, without --data-root."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--dataset", "binarized-mnist", "--num-train", "200",
                 "--data-root", str(real_data_root), "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["cli"]
    assert saved["data_root"] == str(real_data_root.resolve()) and saved["num_train"] == 200
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    assert main(["evaluate", str(run), "--num-samples", "5", "--eval-points", "5",
                 "--check-points", "0", "--no-progress"]) == 0


# ------------------------------------------------------------------ the parser, before torch
_NO_TORCH = """
import sys
from pyrovae.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
assert "torch" not in sys.modules and "pyro" not in sys.modules, "the parser imported torch"
print("exit", code)
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["train", "--help"], 0), (["gaps", "--help"], 0),
    (["train", "--epochs", "x"], 2), (["train", "--bogus"], 2), (["evaluate"], 2), ([], 2),
], ids=["help", "train-help", "gaps-help", "bad-int", "unknown-option", "missing-run", "no-command"])
def test_help_and_argument_errors_answer_before_torch_is_imported(argv, code):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=argv)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"exit {code}")


def test_every_option_has_help_and_every_command_a_description():
    import argparse

    from pyrovae.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"train", "evaluate", "sample", "bdmc", "gaps"}
    for name, sub in commands.choices.items():
        assert sub.description, f"pyrovae {name} --help has no description"
        for action in sub._actions:
            assert action.help, f"pyrovae {name}: {action.option_strings or action.dest} has no help"


def test_the_parser_names_the_registered_parts():
    from pyrovae import build, cli

    assert list(cli.PRIORS) == sorted(build.PRIORS)
    assert list(cli.FAMILIES) == sorted(build.FAMILIES)
    assert list(cli.LIKELIHOODS) == sorted(build.LIKELIHOODS)

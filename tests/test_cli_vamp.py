"""The VampPrior with every family that can evaluate q(z|x) anywhere, through every command, at
a size where its log-density goes in byte-bounded chunks (each recomputed in the backward pass):
`train` (with the AIS check), `evaluate --estimator ais`, `bdmc` and `gaps`. HMC differentiates
with torch.autograd.grad, which the reentrant checkpoint the chunks once used refused: every AIS
call of a VampPrior over a flow crashed at real sizes, while the tiny test sizes never chunked.
Also: a failure after training is one line, and the metrics measured before it are kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pyrovae.build
from pyrovae import priors
from pyrovae.build import FAMILIES, VAEConfig, build_vae
from pyrovae.cli import main
from pyrovae.errors import ConfigError
from pyrovae.families import capability

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--num-train", "300",
        "--eval-points", "4", "--num-samples", "10", "--check-points", "3", "--ais-steps", "5",
        "--ais-chains", "2", "--no-progress", "--prior", "vamp", "--option",
        "num_pseudo_inputs=10"]
#: A budget of a few rows per chunk (the default, 256 MiB, chunks only at real sizes); a spline's
#: rows cost more, so it chunks at a larger one (and runs 10x faster there than at 16 KiB).
SMALL_BUDGET = {"spline": 48 * 2**10}
DEFAULT_SMALL_BUDGET = 16 * 2**10


def _anywhere_families() -> dict[str, list[str]]:
    """The command line's families that declare ``log_prob_anywhere`` (a VampPrior needs it),
    each with the options it needs at latent_dim 2 (a hierarchy its layer sizes)."""
    names = {}
    for name in sorted(FAMILIES):
        for options in ({}, {"layers": [1, 1]}):
            cfg = VAEConfig(num_features=4, latent_dim=2, hidden_dims=(4,), family=name,
                            options=options)
            try:
                family = build_vae(cfg, num_data=3).family
            except ConfigError:
                continue
            if capability(family, "log_prob_anywhere") and not capability(family, "per_datapoint"):
                names[name] = [a for k, v in options.items()
                               for a in ("--option", f"{k}={json.dumps(v)}")]
            break
        else:
            raise AssertionError(f"family {name} could not be built at latent_dim 2")
    return names


ANYWHERE = _anywhere_families()


@pytest.fixture
def chunked(monkeypatch):
    """VampPriors built with a small byte budget; counts the log-densities that went in several
    chunks with a graph (``grad``) and without (``no_grad``)."""
    counts = {"grad": 0, "no_grad": 0, "hmc": 0, "budget": DEFAULT_SMALL_BUDGET}

    class SmallVamp(priors.VampPrior):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, max_bytes=counts["budget"], **kwargs)

    real = priors._PairwiseMixture.log_prob

    def log_prob(self, value):
        z = value.reshape(-1, value.shape[-1])
        if z.shape[0] > self.rows_per_chunk(z):
            counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            frozen = not any(p.requires_grad for p in self.family.parameters())
            if torch.is_grad_enabled() and value.requires_grad and frozen:
                counts["hmc"] += 1  # AIS's leapfrog gradient (torch.autograd.grad)
        return real(self, value)

    monkeypatch.setattr(pyrovae.build, "VampPrior", SmallVamp)
    monkeypatch.setattr(priors._PairwiseMixture, "log_prob", log_prob)
    return counts


def test_the_families_that_a_vampprior_takes():
    """The list the next test runs over: not planar, radial (no inverse) or local (no encoder);
    the five one-layer families with an inverse among them."""
    assert {"diagonal", "full_rank", "householder", "iaf", "spline"} <= set(ANYWHERE)
    assert not {"planar", "radial", "local"} & set(ANYWHERE)


@pytest.mark.parametrize("family", sorted(ANYWHERE))
def test_vampprior_through_every_command_in_chunks(tmp_path, chunked, family):
    chunked["budget"] = SMALL_BUDGET.get(family, DEFAULT_SMALL_BUDGET)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--family", family, *ANYWHERE[family], "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "failure" not in metrics
    assert math.isfinite(metrics["ais_check"]["ais"]["mean"])
    assert main(["evaluate", str(run), "--estimator", "ais", "--eval-points", "3",
                 "--ais-steps", "5", "--ais-chains", "2", "--no-progress"]) == 0
    assert main(["bdmc", str(run), "--points", "2", "--ais-steps", "5", "--ais-chains", "2",
                 "--is-samples", "10", "--no-progress"]) == 0
    assert main(["gaps", str(run), "--eval-points", "3", "--num-samples", "10", "--num-steps",
                 "10", "--num-elbo-samples", "20", "--ais-steps", "5", "--ais-chains", "2",
                 "--no-progress"]) == 0
    gap = json.loads((run / "gaps.json").read_text())["runs"]["run"]["gaps"]
    assert math.isfinite(gap["approximation_gap"]["mean"])
    assert gap["settings"]["ais"]["num_intermediate"] == 5
    if family == "diagonal":  # two matrix products, never chunked
        assert (chunked["grad"], chunked["no_grad"], chunked["hmc"]) == (0, 0, 0)
    else:  # training and HMC differentiated through chunks; IS went in chunks without a graph
        assert chunked["hmc"] > 0 and chunked["grad"] > chunked["hmc"], chunked
        assert chunked["no_grad"] > 0, chunked


def test_a_failure_after_training_is_one_line_and_keeps_the_metrics(tmp_path, monkeypatch,
                                                                    capsys):
    """The AIS check raising a raw error (as the reentrant checkpoint did) after training: one
    line naming the stage, exit code 2, and metrics.json with the estimates measured before it,
    the failure and its traceback beside the checkpoint."""
    import importlib

    def broken(*args, **kwargs):
        raise RuntimeError("something deep\nwith a second line")

    # (the package's name `pyrovae.ais` is the function; the module is in sys.modules)
    monkeypatch.setattr(importlib.import_module("pyrovae.ais"), "ais", broken)
    run = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--prior", "vamp", "--option", "num_pseudo_inputs=10")]
    assert main(["train", *tiny, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "the AIS check failed (RuntimeError: something deep)" in err
    assert f"pyrovae evaluate {run}" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test_log_likelihood"]["mean"])
    assert math.isfinite(metrics["test_elbo"]["mean"]) and "ais_check" not in metrics
    assert metrics["failure"]["stage"] == "the AIS check"
    assert any("something deep" in line for line in metrics["failure"]["traceback"])
    assert (run / "checkpoint.pt").exists() and metrics["epochs"] == 1

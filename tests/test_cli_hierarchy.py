"""Two stochastic layers through every command at tiny sizes: `pyrovae train --prior hierarchical
--family bottom_up --option layers=[...]`, then evaluate (IS and AIS), bdmc and gaps on the run
folder, which rebuilds the model from its saved config (a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyrovae import BottomUp, Hierarchical, load_model, log_likelihood
from pyrovae.cli import main
from pyrovae.workflow import _fixed_test_set
from pyrovae.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["--prior", "hierarchical", "--family", "bottom_up", "--latent-dim", "5",
          "--option", "layers=[3,2]", "--option", "layer_hidden_dims=[8]"]
TINY = ["--epochs", "1", "--hidden-dims", "16", "--num-train", "600", "--eval-points", "12",
        "--num-samples", "20", "--check-points", "4", "--ais-steps", "10", "--ais-chains", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers") / "run"
    assert main(["train", *TINY, *LAYERS, "--out", str(out)]) == 0
    return out


def test_train_saves_a_layered_model_that_reloads(run):
    metrics = json.loads((run / "metrics.json").read_text())
    ll, el = metrics["test_log_likelihood"]["mean"], metrics["test_elbo"]["mean"]
    assert math.isfinite(ll) and -543 < ll and el < ll + 1.0
    assert math.isfinite(metrics["ais_check"]["ais"]["mean"])
    vae = load_model(run)
    assert isinstance(vae.prior, Hierarchical) and isinstance(vae.family, BottomUp)
    assert vae.prior.layer_dims == vae.family.layer_dims == (3, 2)
    assert vae.likelihood.decoder[0].num == 3  # the decoder reads z1
    test = _fixed_test_set(load_dataset("default", "test", binarize="dynamic"), 12, 0)
    again = log_likelihood(vae, test, num_samples=20, seed=0)
    assert again.mean == pytest.approx(ll, abs=1e-4)  # the same model, the same draws


def test_evaluate_bdmc_and_gaps_run_on_it(run, capsys):
    assert main(["evaluate", str(run), "--estimator", "ais", "--num-samples", "20",
                 "--eval-points", "4", "--ais-steps", "10", "--ais-chains", "2",
                 "--no-progress"]) == 0
    assert main(["bdmc", str(run), "--points", "3", "--ais-steps", "10", "--ais-chains", "2",
                 "--is-samples", "20", "--no-progress"]) == 0
    assert main(["gaps", str(run), "--eval-points", "6", "--num-samples", "30",
                 "--num-elbo-samples", "10", "--num-steps", "10", "--ais-steps", "10",
                 "--ais-chains", "2", "--no-progress"]) == 0
    report = json.loads((run / "gaps.json").read_text())
    gap = next(iter(report["runs"].values()))["gaps"]
    assert math.isfinite(gap["amortization_gap"]["mean"])
    out = capsys.readouterr().out
    assert "AIS" in out and "BDMC" in out


def test_layers_must_sum_to_latent_dim(tmp_path, capsys):
    argv = [a if a != "5" else "6" for a in LAYERS]  # --latent-dim 6 against layers 3 + 2
    assert main(["train", *TINY, *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--latent-dim 5" in err, err
    assert not (tmp_path / "r").exists()
    assert main(["train", *TINY, "--prior", "hierarchical", "--latent-dim", "1",
                 "--out", str(tmp_path / "r")]) == 2
    assert "latent_dim >= 2" in capsys.readouterr().err


def test_layers_default_to_two_thirds_and_one_third():
    """Without the option: 150 -> Burda et al.'s (100, 50), for the prior, the family and the
    decoder alike."""
    from pyrovae.build import VAEConfig, build_vae

    vae = build_vae(VAEConfig(784, latent_dim=150, hidden_dims=(16,), prior="hierarchical",
                              family="bottom_up"), 10)
    assert vae.prior.layer_dims == vae.family.layer_dims == (100, 50)
    assert vae.likelihood.decoder[0].num == 100
    one = build_vae(VAEConfig(784, latent_dim=2, hidden_dims=(16,), family="bottom_up"), 10)
    assert one.family.layer_dims == (1, 1) and one.likelihood.decoder[0].num == 1
    assert not isinstance(build_vae(VAEConfig(784, latent_dim=2, hidden_dims=(16,)), 10)
                          .likelihood.decoder[0], type(one.likelihood.decoder[0]))

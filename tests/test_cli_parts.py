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
    assert "test log-likelihood" in capsys.readouterr().out

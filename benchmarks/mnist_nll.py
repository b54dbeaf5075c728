"""Test log-likelihood of MNIST VAEs in the settings of Burda, Grosse & Salakhutdinov 2016 (IWAE,
table 1) and Tomczak & Welling 2018 (VampPrior), trained and scored by pyrovae (project issue 13).

Model (Burda et al.): one stochastic layer, encoder and decoder MLPs 784-200-200-50 with tanh,
Bernoulli likelihood, N(0, I) prior. Training: Adam (beta1 = 0.9, beta2 = 0.999, eps = 1e-4), the
schedule of 3^i passes at learning rate 1e-3 * 10^(-i/7) for i = 0..7 (3,280 epochs), dynamically
binarized training digits. Scoring: ``pyrovae.log_likelihood`` with K = 5000 importance samples on
all 10,000 test digits, binarized once with a fixed seed.

Settings (``--setting``): ``vae-dynamic-k1`` (published 86.76; ``vae-dynamic-k1-exact`` is the same
model under the ``burda-exact`` protocol, to test whether it closes the 0.81 nats), ``iwae-dynamic-k5`` (85.54),
``iwae-dynamic-k50`` (84.78), ``vae-static-k1`` (Larochelle & Murray's binarized MNIST, 88.71),
``iwae-static-k50`` (87.10), ``vampprior-static`` (500 pseudo-inputs, 85.57); with two
stochastic layers (784-100-100-(z1: 100)-50-50-(z2: 50) tanh, mirrored decoder;
``pyrovae.Hierarchical`` prior and ``pyrovae.BottomUp`` family): ``vae-dynamic-k1-2l`` (85.33),
``iwae-dynamic-k5-2l`` (83.89), ``iwae-dynamic-k50-2l`` (82.90). The IWAE settings
need ``pyrovae.losses.IWAE`` (the IWAE bound with the plate's scale outside the logsumexp);
``pyro.infer.RenyiELBO`` is *not* that bound under subsampling (docs/references.md) and is never used.

Schedules (``--schedule``): ``burda`` (minibatch 20, as published), ``burda-b100`` (the same
epochs and learning rates at minibatch 100: 2.4x faster per epoch on one CPU thread, see
benchmarks/results/mnist_nll.md; the default), ``burda-exact`` (Burda et al.'s protocol as in
their released code: minibatch 20, the first 59,600 training digits with the last 400 held out,
the decoder's output bias initialised to the logit of the training mean), ``tomczak``
(VampPrior: lr 5e-4, batch 100, KL warm-up over 100 epochs, 2,000 epochs without early
stopping), ``smoke`` and ``smoke-exact`` (tests). Every row names the schedule that produced it.

One run continues across many invocations. Its state lives in a run folder outside the git
tree (``--run-dir``, default ``../pyrovae-runs/mnist_nll/<setting>``): ``checkpoint.pt``
(written by ``pyrovae.fit`` after every epoch) and ``mnist_nll.json`` (the schedule and the
learning curve). Each invocation trains within its budget (``--max-epochs`` more epochs and/or
``--max-hours`` of wall time; none: until the schedule ends), scoring the learning curve (test
NLL on the first ``--curve-num-test`` digits with K = ``--curve-num-samples``) at every stage's
end and every ``--curve-every`` epochs; when the schedule completes it runs the final K = 5000
evaluation on all test digits. ``--evaluate-now`` scores the current checkpoint with the final
protocol and exits (the row is then marked ``complete: false`` unless the schedule had ended).
After each evaluation it rewrites ``benchmarks/results/mnist_nll.json`` (one row per setting),
``mnist_nll.md`` and ``mnist_nll_curve.png``.

Learning rate and eps per stage: ``pyrovae.fit(lr=schedule, adam_eps=eps)``, the schedule a
function of the epoch applied at each epoch's start (also after a resume, over the checkpoint's
saved rate). The stages run as successive ``fit(..., resume=True)`` calls that stop at the
learning-curve points.

To move a run to another machine, ``--save-state`` copies the checkpoint and the run's JSON to
``benchmarks/results/mnist_nll_state/<setting>.{pt,json}``; a later invocation whose run folder
is missing starts from there automatically (or from ``--from-state FILE``).

Usage::

    PYROVAE_DATA=/path/to/data python benchmarks/mnist_nll.py --setting vae-dynamic-k1
    python benchmarks/mnist_nll.py --setting vae-dynamic-k1 --max-hours 2      # continue, 2 h
    python benchmarks/mnist_nll.py --setting vae-dynamic-k1 --evaluate-now     # score it now
    python benchmarks/mnist_nll.py --setting vae-dynamic-k1 --save-state       # before a commit
    python benchmarks/mnist_nll.py --render        # .md, PNG and docs/readme-snippets/mnist_nll.md
    python benchmarks/mnist_nll.py --measure-speed                             # steps/s, 1 thread

A row's ``nll`` is its most recent evaluation (at equal epochs the final protocol wins);
``num_test`` and ``num_samples`` say which protocol it is, ``epochs`` and ``hours`` (training
time, evaluations excluded) the budget it had, ``complete`` whether the schedule had ended and
all test digits were scored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the pyrovae of this tree, not whichever is installed
    sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"
#: Run folders live beside the clone (outside the git tree): ``<clone>/../pyrovae-runs``.
DEFAULT_RUNS = Path(__file__).resolve().parents[2] / "pyrovae-runs" / "mnist_nll"
META_NAME = "mnist_nll.json"

PYTHAE = "pythae (its own settings and reference)"

#: name -> what defines the setting and its published figure (nats, test NLL, K = 5000).
SETTINGS: dict[str, dict[str, Any]] = {
    "vae-dynamic-k1": {
        "dataset": "mnist", "loss": "elbo", "k": 1, "published": 86.76,
        "source": "Burda et al. 2016, table 1 (VAE, k=1, 1 stochastic layer)",
        "schedule": "burda-b100", "architecture": "burda",
        "other_libraries": [],
    },
    "vae-dynamic-k1-exact": {
        "dataset": "mnist", "loss": "elbo", "k": 1, "published": 86.76,
        "source": "Burda et al. 2016, table 1 (VAE, k=1, 1 stochastic layer), their protocol",
        "schedule": "burda-exact", "architecture": "burda",
        "other_libraries": [],
    },
    "iwae-dynamic-k5": {
        "dataset": "mnist", "loss": "iwae", "k": 5, "published": 85.54,
        "source": "Burda et al. 2016, table 1 (IWAE, k=5, 1 stochastic layer)",
        "schedule": "burda-b100", "architecture": "burda",
        "other_libraries": [],
    },
    "iwae-dynamic-k50": {
        "dataset": "mnist", "loss": "iwae", "k": 50, "published": 84.78,
        "source": "Burda et al. 2016, table 1 (IWAE, k=50, 1 stochastic layer)",
        "schedule": "burda-b100", "architecture": "burda",
        "other_libraries": [],
    },
    "vae-dynamic-k1-2l": {
        "dataset": "mnist", "loss": "elbo", "k": 1, "published": 85.33,
        "source": "Burda et al. 2016, table 1 (VAE, k=1, 2 stochastic layers)",
        "schedule": "burda-b100", "architecture": "burda-2l",
        "other_libraries": [],
    },
    "iwae-dynamic-k5-2l": {
        "dataset": "mnist", "loss": "iwae", "k": 5, "published": 83.89,
        "source": "Burda et al. 2016, table 1 (IWAE, k=5, 2 stochastic layers)",
        "schedule": "burda-b100", "architecture": "burda-2l",
        "other_libraries": [],
    },
    "iwae-dynamic-k50-2l": {
        "dataset": "mnist", "loss": "iwae", "k": 50, "published": 82.90,
        "source": "Burda et al. 2016, table 1 (IWAE, k=50, 2 stochastic layers)",
        "schedule": "burda-b100", "architecture": "burda-2l",
        "other_libraries": [],
    },
    "vae-static-k1": {
        "dataset": "binarized-mnist", "loss": "elbo", "k": 1, "published": 88.71,
        "source": "Burda et al. 2016, appendix (VAE, k=1, Larochelle & Murray's binarization)",
        "schedule": "burda-b100", "architecture": "burda",
        "other_libraries": [
            {"library": "pythae", "nll": 89.78, "its_reference": 89.9,
             "note": "pythae's VAE against Rezende & Mohamed 2015's diagonal-Gaussian 89.9, "
                     "not this setting"},
        ],
    },
    "iwae-static-k50": {
        "dataset": "binarized-mnist", "loss": "iwae", "k": 50, "published": 87.10,
        "source": "Burda et al. 2016, appendix (IWAE, k=50, Larochelle & Murray's binarization)",
        "schedule": "burda-b100", "architecture": "burda",
        "other_libraries": [
            {"library": "pythae", "nll": 86.82, "its_reference": 87.1,
             "note": "pythae's own training settings"},
        ],
    },
    "vampprior-static": {
        "dataset": "binarized-mnist", "loss": "elbo", "k": 1, "published": 85.57,
        "source": "Tomczak & Welling 2018, table 2 (VAE + VampPrior, 500 pseudo-inputs)",
        "schedule": "tomczak", "architecture": "tomczak",
        "other_libraries": [
            {"library": "pythae", "nll": 85.79, "its_reference": 85.57,
             "note": "pythae's own training settings"},
        ],
    },
}

#: Architectures: Burda et al.'s, and Tomczak & Welling's sizes (they used gated units; pyrovae's
#: MLP has none, so tanh here).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "burda": {"latent_dim": 50, "hidden_dims": (200, 200), "activation": "tanh",
              "text": "784-200-200-50 tanh"},
    "tomczak": {"latent_dim": 40, "hidden_dims": (300, 300), "activation": "tanh",
                "text": "784-300-300-40 tanh (Tomczak & Welling: gated units)"},
    # Burda et al. 2016, section 5 (and docs/references.md): two deterministic layers of 100 units between
    # x and z1 (100 units), two of 50 units between z1 and z2 (50 units), tanh, mirrored in the
    # decoder: p(z2) = N(0, I), p(z1|z2) by 50-50-50-(100), p(x|z1) by 100-100-100-784.
    "burda-2l": {"latent_dim": 150, "hidden_dims": (100, 100), "activation": "tanh",
                 "layers": [100, 50], "layer_hidden_dims": [50, 50],
                 "text": "784-100-100-(z1: 100)-50-50-(z2: 50) tanh, mirrored decoder "
                         "(pyrovae.Hierarchical prior, pyrovae.BottomUp family)"},
}


def _burda_stages(last: int = 7) -> list[tuple[int, float]]:
    return [(3**i, 1e-3 * 10 ** (-i / 7)) for i in range(last + 1)]


#: name -> batch size, Adam eps, KL warm-up epochs, and stages [(epochs, learning rate), ...].
SCHEDULES: dict[str, dict[str, Any]] = {
    "burda": {"batch_size": 20, "eps": 1e-4, "kl_warmup_epochs": 0.0, "stages": _burda_stages(),
              "text": "Burda et al.: 3^i epochs at lr 1e-3*10^(-i/7), i=0..7 (3,280 epochs), "
                      "minibatch 20, Adam eps 1e-4"},
    "burda-b100": {"batch_size": 100, "eps": 1e-4, "kl_warmup_epochs": 0.0,
                   "stages": _burda_stages(),
                   "text": "Burda et al.'s epochs and learning rates (3^i epochs at "
                           "1e-3*10^(-i/7), i=0..7; 3,280 epochs) at minibatch 100, Adam eps 1e-4"},
    "burda-exact": {"batch_size": 20, "eps": 1e-4, "kl_warmup_epochs": 0.0,
                    "stages": _burda_stages(), "holdout": 400, "output_bias": "train-mean-logit",
                    "text": "Burda et al.'s protocol as in their released code: 3^i epochs at "
                            "1e-3*10^(-i/7), i=0..7 (3,280 epochs), minibatch 20, Adam eps 1e-4, "
                            "the first 59,600 training digits (the last 400 held out, unused), "
                            "the decoder's output bias initialised to the logit of the training "
                            "digits' mean intensity (clipped to [0.001, 0.999])"},
    "tomczak": {"batch_size": 100, "eps": 1e-8, "kl_warmup_epochs": 100.0,
                "stages": [(2000, 5e-4)],
                "text": "Tomczak & Welling: lr 5e-4, minibatch 100, KL warm-up 100 epochs, "
                        "2,000 epochs (no early stopping)"},
    "smoke": {"batch_size": 100, "eps": 1e-4, "kl_warmup_epochs": 0.0, "stages": _burda_stages(1),
              "text": "smoke test: 1 + 3 epochs at 1e-3 and 1e-3*10^(-1/7), minibatch 100"},
    "smoke-exact": {"batch_size": 20, "eps": 1e-4, "kl_warmup_epochs": 0.0,
                    "stages": _burda_stages(0), "holdout": 40, "output_bias": "train-mean-logit",
                    "text": "smoke test of burda-exact: 1 epoch at 1e-3, minibatch 20, 40 digits "
                            "held out, output bias at the logit of the training mean"},
}


class BenchmarkError(Exception):
    """A bad option or state: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------- schedules
def stage_ends(schedule: dict[str, Any]) -> list[int]:
    ends, total = [], 0
    for epochs, _ in schedule["stages"]:
        total += epochs
        ends.append(total)
    return ends


def stage_at(schedule: dict[str, Any], epoch: int) -> tuple[int, int, float]:
    """For 0-based epoch ``epoch`` (== epochs done): (stage index, its end epoch, its lr)."""
    for i, end in enumerate(stage_ends(schedule)):
        if epoch < end:
            return i, end, schedule["stages"][i][1]
    raise BenchmarkError("the schedule has ended")


def curve_epochs(schedule: dict[str, Any], every: int) -> set[int]:
    total = stage_ends(schedule)[-1]
    points = set(stage_ends(schedule)) | set(range(every, total + 1, every))
    return {e for e in points if e <= total}


# ---------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="vae-dynamic-k1")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                   help="default: the run folder's, else the setting's (burda-b100; tomczak)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="train at most this many more epochs in this invocation")
    p.add_argument("--max-hours", type=float, default=None,
                   help="stop starting new epochs after this many hours of wall time")
    p.add_argument("--run-dir", type=Path, default=None,
                   help=f"run folder (default {DEFAULT_RUNS}/<setting>)")
    p.add_argument("--from-state", type=Path, default=None,
                   help="start a missing run folder from this checkpoint file (a saved state)")
    p.add_argument("--state-dir", type=Path, default=RESULTS / "mnist_nll_state",
                   help="where --save-state writes, and where a missing run folder is looked for")
    p.add_argument("--save-state", action="store_true",
                   help="copy the run's checkpoint and JSON to --state-dir/<setting>.{pt,json} (alone: "
                   "copy and exit; with --max-epochs/--max-hours: after training)")
    p.add_argument("--evaluate-now", action="store_true",
                   help="score the current checkpoint with the final protocol and exit")
    p.add_argument("--data-root", default=None, help="data folder (default: $PYROVAE_DATA)")
    p.add_argument("--dataset", default=None,
                   help="override the setting's data set (e.g. 'default', the bundled sample; tests)")
    p.add_argument("--curve-every", type=int, default=100,
                   help="also score the learning curve every this many epochs (default 100)")
    p.add_argument("--curve-num-test", type=int, default=1000)
    p.add_argument("--curve-num-samples", type=int, default=1000)
    p.add_argument("--eval-num-test", type=int, default=None, help="final: default all test digits")
    p.add_argument("--eval-num-samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="model initialization and training")
    p.add_argument("--eval-seed", type=int, default=1,
                   help="the test set's fixed binarization and the importance samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--render", action="store_true",
                   help="only rewrite mnist_nll.md and the curve PNG from --out's mnist_nll.json")
    p.add_argument("--snippet", type=Path, default=HERE.parent / "docs" / "readme-snippets" / "mnist_nll.md",
                   help="with --render: where the README snippet goes")
    p.add_argument("--measure-speed", action="store_true",
                   help="time training steps at minibatch 20 and 100 and exit")
    p.add_argument("--speed-steps", type=int, default=1500)
    args = p.parse_args(argv)
    for name in ("max_epochs", "curve_every", "curve_num_test", "curve_num_samples",
                 "eval_num_test", "eval_num_samples", "threads", "speed_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.seed < 0 or args.eval_seed < 0:
        p.error("--seed and --eval-seed must be non-negative integers")
    if args.max_hours is not None and not (0 < args.max_hours < math.inf):
        p.error(f"--max-hours must be a positive number, got {args.max_hours}")
    if args.from_state is not None and not args.from_state.is_file():
        p.error(f"--from-state {args.from_state} is not a file; pass a saved checkpoint (.pt)")
    return args


# ---------------------------------------------------------------------------------- small I/O
def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{path} cannot be read as JSON ({e}); restore or remove it") from None


def update_meta(run_dir: Path, change: Any) -> dict[str, Any]:
    """Read the run's JSON, apply ``change(meta)``, write it back atomically (re-reading each time
    so that an ``--evaluate-now`` beside a running invocation is not lost)."""
    meta = read_json(run_dir / META_NAME, {})
    change(meta)
    _atomic_text(run_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


# ------------------------------------------------------------------------------------ the data
def load_data(args: argparse.Namespace, spec: dict[str, Any]) -> tuple[Any, Any, str]:
    from pyrovae.data import load_dataset

    name = args.dataset or spec["dataset"]
    root = args.data_root or os.environ.get("PYROVAE_DATA")
    if name != "default" and not root:
        raise BenchmarkError(
            f"dataset {name!r} needs the data root: pass --data-root or set PYROVAE_DATA "
            "(e.g. ../shared/data)"
        )
    if name == "binarized-mnist":
        train = load_dataset(name, "train", root=root)
        test = load_dataset(name, "test", root=root)
    else:
        train = load_dataset(name, "train", root=root, binarize="dynamic")
        test = load_dataset(name, "test", root=root, binarize="dynamic").binarized(
            generator=torch.Generator().manual_seed(args.eval_seed)
        )
    return train, test, name


# ----------------------------------------------------------------------------------- the model
def make_config(spec: dict[str, Any], num_features: int) -> Any:
    from pyrovae.build import VAEConfig

    arch = ARCHITECTURES[spec["architecture"]]
    prior = "vamp" if spec["architecture"] == "tomczak" else "standard"
    family = "diagonal"
    options: dict[str, Any] = {"num_pseudo_inputs": 500} if prior == "vamp" else {}
    if "layers" in arch:  # stochastic layers: the hierarchical prior and the bottom-up family
        prior, family = "hierarchical", "bottom_up"
        options = {"layers": list(arch["layers"]),
                   "layer_hidden_dims": list(arch["layer_hidden_dims"])}
    return VAEConfig(num_features, latent_dim=arch["latent_dim"], hidden_dims=arch["hidden_dims"],
                     activation=arch["activation"], prior=prior, family=family,
                     likelihood="bernoulli", options=options)


def protocol_data(train: Any, schedule: dict[str, Any]) -> Any:
    """The training digits a schedule uses: all of them, or (``holdout``, Burda et al.'s
    protocol) the first ``N - holdout``, the last ``holdout`` held out."""
    holdout = schedule.get("holdout")
    if not holdout:
        return train
    if holdout >= len(train):
        raise BenchmarkError(f"the schedule holds out {holdout} digits but the data set has "
                             f"only {len(train)}")
    return train.subset(len(train) - holdout)


def output_bias_logits(train: Any) -> torch.Tensor:
    r"""Burda et al.'s initial decoder output bias: :math:`\mathrm{logit}(\bar x)` of the
    training digits' mean intensity per pixel, clipped to [0.001, 0.999] (their released code),
    shape ``(num_features,)``."""
    mean = train.images.double().mean(0).clamp(0.001, 0.999)
    return torch.logit(mean).float()


def init_output_bias(vae: Any, bias: torch.Tensor) -> None:
    """Set the bias of the decoder's last linear layer (its logits) to ``bias``."""
    last = [m for m in vae.likelihood.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    if last.bias is None or last.bias.shape != bias.shape:
        raise BenchmarkError(f"the decoder's last layer has no bias of shape {tuple(bias.shape)}")
    with torch.no_grad():
        last.bias.copy_(bias.to(last.bias))


def make_loss(setting: str, spec: dict[str, Any]) -> Any:
    if spec["loss"] == "elbo":
        from pyro.infer import Trace_ELBO

        return Trace_ELBO()
    from pyrovae.losses import IWAE  # the bound with the minibatch scale outside the logsumexp

    # the VAE has one plate: no guessing at the first step (it would draw from the RNG)
    return IWAE(num_particles=spec["k"], max_plate_nesting=1)


# ---------------------------------------------------------------------------------- evaluation
#: setting -> what changed in pyrovae's code while that run was in progress (provenance of a
#: number trained across many invocations).
RUN_NOTES: dict[str, tuple[str, ...]] = {
    "vae-dynamic-k1": (
        "epochs 1-1482 used Pyro's `Bernoulli.log_prob` (torch's `binary_cross_entropy_with_logits`); "
        "from epoch 1483 on, pyrovae's `BernoulliLogits` (the same function without `log1p`, equal to "
        "float32 rounding: tested against float64), which made an epoch ~25 % faster",
        "the learning rate and Adam's eps of each stage were set by a `torch.optim` step pre-hook in "
        "every invocation up to the one that started at epoch 1483 (included), and by "
        "`fit(lr=schedule, adam_eps=1e-4)` in later ones: the same values at every step",
        "its learning curve scores the first 1000 test digits (it began before new runs switched to "
        "a fixed random 1000); on dynamic MNIST the two differ within noise (87.44 +- 0.79 against "
        "88.53 +- 0.75 at epoch ~2000, K = 200)",
        "the complete run: 87.57 +- 0.24 on all 10,000 test digits (K = 5000) against the "
        "published 86.76, 0.81 nats (3.4 standard errors) worse; its curve on the first 1000 "
        "digits ended at 86.81, so the first 1000 of dynamic MNIST are ~0.8 nats easier than the "
        "whole set. The likely cause of the gap is the minibatch: at 100 instead of Burda et "
        "al.'s 20 the same 3,280 epochs take 5x fewer Adam steps (2.0 M instead of 9.8 M), and "
        "the curve was still falling at the end (87.12 at epoch 2400, 86.81 at 3280: ~0.035 nats per "
        "100 epochs, within its noise from point to point); `--schedule burda` "
        "(minibatch 20, ~15 h here) tests this",
        "also different from the paper: tanh units as in Burda et al., but PyTorch's default "
        "initialization, and a test set binarized once with a fixed seed",
    ),
    "vae-dynamic-k1-2l": (
        "the architecture of Burda et al.'s two-stochastic-layer models as docs/references.md and issue 24 "
        "give it: 784-100-100-(z1: 100)-50-50-(z2: 50), tanh, mirrored in the decoder (a first "
        "run to epoch 123 used 200/100-unit deterministic layers and was discarded)",
    ),
    "vae-static-k1": (
        "the complete run: 89.69 +- 0.26 on all 10,000 test digits (K = 5000) against the "
        "published 88.71, 0.98 nats (3.8 standard errors) worse, and 0.09 nats better than "
        "pythae's reproduction (89.78, its own settings). Unlike vae-dynamic-k1 its learning curve "
        "had flattened (89.85-89.91 on the fixed random 1000 digits from epoch 2200 to 3280, "
        "final training bound -89.31), so the gap is not from stopping early. Not tested here: "
        "the minibatch of 100 instead of 20 (5x fewer Adam steps over the same epochs) and "
        "PyTorch's default initialization; `--schedule burda` tests the first",
    ),
}

#: Seed of the fixed random subset of test digits that the learning curves of new runs use.
CURVE_DIGITS_SEED = 0


def curve_subset(test: Any, num_test: int | None, how: str) -> Any:
    """The test digits a learning-curve point is scored on: ``"random"``, a fixed random subset
    (seeded by :data:`CURVE_DIGITS_SEED`, in test-set order), or ``"first"``, the first
    ``num_test`` digits. The first digits are not representative of a whole test set: the first
    1000 of Larochelle & Murray's static test set are 9.5 nats harder for a trained VAE than a
    random 1000 (101.2 against 91.7, mean pixel 0.170 against 0.132). Runs started before this
    choice existed keep ``"first"``, so that their curves stay comparable along their length."""
    if num_test is None or num_test >= len(test):
        return test
    if how == "first":
        return test.subset(num_test)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(CURVE_DIGITS_SEED))
    return test.subset(order[:num_test].sort().values)


def evaluate(run_dir: Path, test: Any, num_test: int | None, num_samples: int, seed: int,
             device: str, how: str = "first") -> dict[str, Any]:
    """Score the saved model (``pyrovae.load_model(run_dir)``) with ``pyrovae.log_likelihood``
    on ``num_test`` test digits chosen by ``how`` (see :func:`curve_subset`; all of them for
    ``None``)."""
    from pyrovae import load_model, log_likelihood
    from pyrovae.errors import ImportanceSamplingWarning

    vae = load_model(run_dir, device=device)
    data = curve_subset(test, num_test, how)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # recorded as khat_share
        ll = log_likelihood(vae, data, num_samples=num_samples, seed=seed)
    share = ll.unreliable_share
    return {
        "nll": -ll.mean, "stderr": ll.stderr, "num_test": len(data), "num_samples": num_samples,
        "test_digits": "all" if len(data) == len(test) else how,
        "eval_seed": seed, "khat_above_0.7": None if math.isnan(share) else share,
        "eval_seconds": time.perf_counter() - t0,
    }


def training_progress(run_dir: Path) -> dict[str, Any]:
    """Epochs done, training hours and steps/s from the checkpoint's history (0 without one)."""
    from pyrovae.checkpoint import read_checkpoint

    if not (run_dir / "checkpoint.pt").is_file():
        return {"epochs": 0, "hours": 0.0, "steps": 0}
    h = read_checkpoint(run_dir)["history"] or {}
    seconds = float(sum(h.get("epoch_seconds", [])))
    steps = int(h.get("num_steps", 0))
    return {"epochs": len(h.get("train_elbo", [])), "hours": seconds / 3600, "steps": steps,
            "steps_per_second": steps / seconds if seconds > 0 else None,
            "train_elbo": (h.get("train_elbo") or [None])[-1]}


# ------------------------------------------------------------------------------------- results
def device_text(device: str, threads: int) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {threads} thread{'s' if threads != 1 else ''}, {os.cpu_count()} cores shared)"


def make_row(setting: str, meta: dict[str, Any]) -> dict[str, Any]:
    spec = SETTINGS[setting]
    schedule = SCHEDULES[meta["schedule"]]
    total = stage_ends(schedule)[-1]
    curve = sorted(meta.get("curve", []), key=lambda c: c["epochs"])
    finals = sorted(meta.get("evaluations", []), key=lambda c: c["epochs"])
    # The headline is the most recent evaluation; at equal epochs the full protocol wins.
    candidates = [(c["epochs"], 0, c) for c in curve] + [(c["epochs"], 1, c) for c in finals]
    head = max(candidates, key=lambda t: t[:2])[2] if candidates else None
    row: dict[str, Any] = {
        "setting": setting,
        "published": spec["published"],
        "source": spec["source"],
        "nll": head and head["nll"],
        "stderr": head and head["stderr"],
        "num_test": head and head["num_test"],
        "num_samples": head and head["num_samples"],
        "epochs": head and head["epochs"],
        "hours": head and head["hours"],
        "device": meta.get("device"),
        "schedule": meta["schedule"],
        "schedule_text": schedule["text"],
        "schedule_epochs": total,
        "batch_size": schedule["batch_size"],
        "architecture": ARCHITECTURES[spec["architecture"]]["text"],
        "loss": "ELBO (Trace_ELBO)" if spec["loss"] == "elbo" else f"IWAE (k={spec['k']})",
        "dataset": meta.get("dataset"),
        "complete": bool(head and head.get("complete")),
        "epochs_trained": meta.get("epochs_trained", 0),
        "hours_trained": meta.get("hours_trained", 0.0),
        "steps_per_second": meta.get("steps_per_second"),
        "estimated_total_hours": meta.get("estimated_total_hours"),
        "khat_above_0.7": head and head.get("khat_above_0.7"),
        "other_libraries": spec["other_libraries"],
        "curve_digits": meta.get("curve_digits", "first"),
        "curve": curve,
        "full_evaluations": finals,
    }
    return row


def placeholder_row(setting: str) -> dict[str, Any]:
    spec = SETTINGS[setting]
    schedule = SCHEDULES[spec["schedule"]]
    return {
        "setting": setting, "published": spec["published"], "source": spec["source"],
        "nll": None, "stderr": None, "num_test": None, "num_samples": None, "epochs": 0,
        "hours": 0.0, "device": None, "schedule": spec["schedule"],
        "schedule_text": schedule["text"], "schedule_epochs": stage_ends(schedule)[-1],
        "batch_size": schedule["batch_size"],
        "architecture": ARCHITECTURES[spec["architecture"]]["text"],
        "loss": "ELBO (Trace_ELBO)" if spec["loss"] == "elbo" else f"IWAE (k={spec['k']})",
        "dataset": spec["dataset"], "complete": False, "status": "not run yet",
        "other_libraries": spec["other_libraries"], "curve": [],
    }


def write_results(out: Path, row: dict[str, Any]) -> None:
    """Replace this setting's row in ``out/mnist_nll.json``; rewrite the .md and the curve PNG."""
    path = out / "mnist_nll.json"
    rows = read_json(path, [])
    if not isinstance(rows, list):
        raise BenchmarkError(f"{path} is not a list of rows; restore or remove it")
    by_name = {r.get("setting"): r for r in rows if isinstance(r, dict)}
    by_name[row["setting"]] = row
    for name in SETTINGS:
        by_name.setdefault(name, placeholder_row(name))
    rows = [by_name[n] for n in SETTINGS] + [r for n, r in by_name.items() if n not in SETTINGS]
    _atomic_text(path, json.dumps(rows, indent=2) + "\n")
    _atomic_text(out / "mnist_nll.md", markdown(rows, out))
    with contextlib.suppress(Exception):  # a picture must never stop a training run
        plot_curves(out / "mnist_nll_curve.png", rows)


def render(out: Path, snippet: Path | None = None) -> None:
    rows = read_json(out / "mnist_nll.json", None)
    if not isinstance(rows, list) or not rows:
        raise BenchmarkError(f"{out / 'mnist_nll.json'} holds no rows; run a setting first")
    _atomic_text(out / "mnist_nll.md", markdown(rows, out))
    plot_curves(out / "mnist_nll_curve.png", rows)
    if snippet is not None:
        _atomic_text(snippet, readme_snippet(rows))


def certified(out: Path = RESULTS) -> dict[str, str]:
    """Per setting, AIS beside IS on the fixed random 500 test digits of
    ``benchmarks/certify_mnist.py`` (``mnist_certified.json``), as table text."""
    path = out / "mnist_certified.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {
        r["setting"]: (f"AIS {r['ais']['nll']:.2f} vs IS {r['is']['nll']:.2f}: "
                       f"{r['ais_minus_is']['mean']:+.2f} ± {r['ais_minus_is']['stderr']:.2f}")
        for r in report.get("rows", [])
    }


def readme_snippet(rows: list[dict[str, Any]]) -> str:
    """The README's section on this benchmark (docs/readme-snippets/mnist_nll.md)."""
    first = [r["setting"] for r in rows if r.get("curve") and r.get("curve_digits", "first") == "first"]
    lines = [
        "### Test log-likelihood on MNIST: the published settings (`benchmarks/mnist_nll.py`)",
        "",
        "Burda et al. 2016's one-stochastic-layer models (784-200-200-50 tanh, Bernoulli "
        "likelihood, Adam with eps 1e-4, 3^i epochs at learning rate 1e-3·10^(-i/7) for "
        "i = 0..7, 3,280 epochs in all) and Tomczak & Welling 2018's VampPrior, trained by "
        "`pyrovae.fit` and scored by `pyrovae.log_likelihood`. The published protocol is "
        "K = 5000 importance samples on all 10,000 test digits; a row that is not complete shows "
        "its latest learning-curve point (1000 test digits, K = 1000: a fixed random 1000"
        + (f"; the first 1000 for {', '.join(first)}, whose curve began on them" if first else "")
        + ") and how far its schedule has got. Test NLL in nats, lower is better.",
        "",
        "| setting | pyrovae | K / test digits | budget so far (epochs, training hours, minibatch, "
        "protocol) "
        "| complete | published | other libraries (their figure vs their reference) "
        "| AIS beside IS, 500 random test digits (NLL; log p(x) AIS - IS) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checked = certified()
    for r in rows:
        others = "; ".join(
            f"{o['library']}: {o['nll']} vs {o['its_reference']}" for o in r.get("other_libraries", [])
        ) or "–"
        if r.get("nll") is None:
            ours, protocol = "not run yet", "–"
        else:
            ours = f"{r['nll']:.2f} ± {r['stderr']:.2f}"
            protocol = f"{r['num_samples']} / {r['num_test']}"
        budget = (f"{r.get('epochs') or 0} of {r['schedule_epochs']} epochs, "
                  f"{_fmt(r.get('hours'), 1)} h, batch {r['batch_size']}, "
                  f"protocol `{r['schedule']}`")
        if not r.get("complete") and r.get("estimated_total_hours"):
            budget += f" (whole schedule at its rate: ~{r['estimated_total_hours']:.0f} h)"
        lines.append(f"| {r['setting']} | {ours} | {protocol} | {budget} | "
                     f"{'yes' if r.get('complete') else 'no'} | {r['published']} | {others} "
                     f"| {checked.get(r['setting'], '–')} |")
    done = [r for r in rows if r.get("complete") and r.get("nll") is not None]
    if done:
        lines.append("")
    for r in done:
        gap = r["nll"] - r["published"]
        lines.append(
            f"`{r['setting']}` is complete: {r['nll']:.2f} ± {r['stderr']:.2f} against the "
            f"published {r['published']} ({gap:+.2f} nats, {abs(gap) / r['stderr']:.1f} standard "
            "errors); what differs from the paper and the likely cause are in "
            "[mnist_nll.md](benchmarks/results/mnist_nll.md)."
        )
    lines += [
        "",
        "Sources: Burda et al. 2016 table 1 and appendix (IWAE rows need "
        "`pyrovae.losses.IWAE`; `pyro.infer.RenyiELBO` is not the IWAE bound under "
        "subsampling); Tomczak & Welling 2018 table 2. pythae's figures are for its own "
        "training settings; its VAE figure is against Rezende & Mohamed 2015's 89.9. "
        "The Burda rows here run Burda et al.'s epochs and learning rates at minibatch 100 "
        "(schedule `burda-b100`, about 2x faster per epoch on one CPU thread than the published "
        "minibatch of 20; `--schedule burda` runs that, `--schedule burda-exact` also their "
        "59,600/400 split and output-bias initialisation). Details, speeds and the learning "
        "curves: [benchmarks/results/mnist_nll.md](benchmarks/results/mnist_nll.md).",
        "",
        "![MNIST test NLL against epochs and training hours](benchmarks/results/mnist_nll_curve.png)",
        "",
        "A run continues across invocations from its run folder (default "
        "`../pyrovae-runs/mnist_nll/<setting>`, outside the git tree); when that folder is "
        "missing it starts from the committed state `benchmarks/results/mnist_nll_state/<setting>.pt`:",
        "",
        "```",
        "PYROVAE_DATA=../shared/data nohup nice -n 10 python benchmarks/mnist_nll.py \\",
        "    --setting vae-dynamic-k1 [--max-hours H] [--max-epochs N] \\",
        "    >> ../pyrovae-runs/mnist_nll/vae-dynamic-k1.log 2>&1 &",
        "python benchmarks/mnist_nll.py --setting vae-dynamic-k1 --evaluate-now  # K=5000 now",
        "python benchmarks/mnist_nll.py --setting vae-dynamic-k1 --save-state    # to commit",
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict[str, Any]], out: Path = RESULTS) -> str:
    lines = [
        "# Test log-likelihood on MNIST (benchmarks/mnist_nll.py)",
        "",
        "Test NLL in nats (lower is better), by `pyrovae.log_likelihood` (importance sampling, "
        "the guide as proposal). The final protocol is K = 5000 on all 10,000 test digits "
        "(dynamic MNIST: binarized once with a fixed seed); until a run completes, the row shows "
        "its latest learning-curve point (K and the number of test digits are in the row). "
        "\"budget\" is what the row was trained for so far.",
        "",
        "| setting | NLL (ours) | K | test digits | budget: epochs / schedule | hours | batch "
        "| complete | published | other libraries | AIS beside IS (500 digits) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checked = certified(out)
    for r in rows:
        others = "; ".join(
            f"{o['library']} {o['nll']} (vs {o['its_reference']})" for o in r.get("other_libraries", [])
        ) or "–"
        nll = "not run yet" if r.get("nll") is None else f"{r['nll']:.2f} ± {r['stderr']:.2f}"
        lines.append(
            f"| {r['setting']} | {nll} | {r.get('num_samples') or '–'} | {r.get('num_test') or '–'} "
            f"| {r.get('epochs') or 0} / {r['schedule_epochs']} ({r['schedule']}) "
            f"| {_fmt(r.get('hours'))} | {r['batch_size']} | {'yes' if r.get('complete') else 'no'} "
            f"| {r['published']} | {others} | {checked.get(r['setting'], '–')} |"
        )
    if checked:
        lines += ["", "AIS beside IS: `benchmarks/certify_mnist.py` (T = 1000, 4 chains, its "
                  "convergence check passed) and IS (K = 5000) on the same fixed random 500 test "
                  "digits ([mnist_certified.json](./mnist_certified.json); its table: "
                  "`benchmarks/results/mnist_certified.md`). AIS is the stronger estimate; "
                  "the IS figures of the table are low by about that much."]
    notes = [f"- `{r['setting']}`: {note}" for r in rows for note in RUN_NOTES.get(r["setting"], ())]
    if notes:
        lines += ["", "What changed in the code during a run (the values it computes did not, beyond "
                  "float rounding):", "", *notes]
    lines += ["", "Settings:", ""]
    for r in rows:
        lines.append(f"- `{r['setting']}`: {r['source']}; {r['architecture']}, Bernoulli "
                     f"likelihood, {r['loss']}; schedule `{r['schedule']}`: {r['schedule_text']}.")
    lines += ["", "Learning curves (test NLL on 1000 test digits, K = 1000; which 1000 is said per "
              "row: a fixed random subset (seed 0), or the first 1000 for runs begun before that "
              "choice, whose curves stay on them; the first 1000 of the static test set are ~9.5 "
              "nats harder than a random 1000):",
              "![learning curves](mnist_nll_curve.png)", ""]
    for r in rows:
        if r.get("curve"):
            pts = ", ".join(f"{c['epochs']}: {c['nll']:.2f}" for c in r["curve"])
            which = "random 1000" if r.get("curve_digits") == "random" else "first 1000"
            lines.append(f"- `{r['setting']}` ({which} test digits; epoch: NLL): {pts}.")
    speed = read_json(out / "mnist_nll_speed.json", None)
    if speed:
        lines += ["", "## Speed and the choice of schedule", ""]
        lines.append(
            f"Measured on {speed['device']} ({speed['date']}), vae-dynamic-k1 model, one thread, "
            f"{speed['steps']} training steps each through `pyrovae.fit`:"
        )
        lines.append("")
        lines.append("| minibatch | steps/s | s/epoch (60,000 digits) | 3,280 epochs (h) "
                     "| conditions |")
        lines.append("|---|---|---|---|---|")
        conditions = f"{speed['steps']} steps, load average {speed.get('load_average', 0):.1f}"
        for m in speed["measurements"]:
            lines.append(f"| {m['batch_size']} | {m['steps_per_second']:.0f} | "
                         f"{m['seconds_per_epoch']:.1f} | {m['schedule_hours']:.1f} | {conditions} |")
        for m in speed.get("other_measurements", []):
            lines.append(f"| {m['batch_size']} | {m['steps_per_second']:.0f} | "
                         f"{m['seconds_per_epoch']:.1f} | {m['schedule_hours']:.1f} | {m['note']} |")
        lines += ["", speed["decision"]]
    for r in rows:
        if r.get("steps_per_second"):
            lines.append(
                f"- `{r['setting']}` measured during its run: {r['steps_per_second']:.0f} steps/s "
                f"on average over {r['epochs_trained']} epoch(s); the whole schedule at that rate: "
                f"{_fmt(r.get('estimated_total_hours'), 1)} h of training (plus evaluations)."
            )
    lines += [
        "",
        "Continue a run: `PYROVAE_DATA=../shared/data nice -n 10 python "
        "benchmarks/mnist_nll.py --setting <setting> [--max-hours H]` (the run folder "
        "`../pyrovae-runs/mnist_nll/<setting>` holds its state; without it the committed "
        "`benchmarks/results/mnist_nll_state/<setting>.pt` is used).",
        "",
    ]
    return "\n".join(lines)


def plot_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        curve = r.get("curve") or []
        if not curve:
            continue
        for ax, key in zip(axes, ("epochs", "hours")):
            (line,) = ax.plot([c[key] for c in curve], [c["nll"] for c in curve], "o-", ms=3,
                              label=f"{r['setting']} (batch {r['batch_size']})")
            ax.axhline(r["published"], color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("epochs")
    axes[1].set_xlabel("training hours")
    axes[0].set_ylabel("test NLL (nats), 1000 digits, K=1000")
    axes[0].legend(fontsize=8)
    axes[0].set_title("dashed: published (K=5000, all test digits)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the run
def prepare_run(args: argparse.Namespace, run_dir: Path) -> None:
    """Start a missing run folder from a saved state (``--from-state`` or the state folder)."""
    if (run_dir / "checkpoint.pt").is_file():
        if args.from_state is not None:
            print(f"mnist_nll: {run_dir} already holds a checkpoint; --from-state ignored", flush=True)
        return
    state = args.from_state or (args.state_dir / f"{args.setting}.pt")
    if not state.is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(state, run_dir / "checkpoint.pt")
    saved_meta = state.with_suffix(".json")
    if saved_meta.is_file():
        shutil.copyfile(saved_meta, run_dir / META_NAME)
    print(f"mnist_nll: started {run_dir} from the saved state {state}", flush=True)


def save_state(args: argparse.Namespace, run_dir: Path) -> None:
    if not (run_dir / "checkpoint.pt").is_file():
        raise BenchmarkError(f"{run_dir} has no checkpoint to save; train first")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    target = args.state_dir / f"{args.setting}.pt"
    shutil.copyfile(run_dir / "checkpoint.pt", target)
    if (run_dir / META_NAME).is_file():
        shutil.copyfile(run_dir / META_NAME, target.with_suffix(".json"))
    print(f"mnist_nll: saved the run's state to {target} ({target.stat().st_size / 1e6:.1f} MB)",
          flush=True)


def record_progress(meta: dict[str, Any], progress: dict[str, Any], schedule: dict[str, Any]) -> None:
    meta["epochs_trained"] = progress["epochs"]
    meta["hours_trained"] = progress["hours"]
    meta["steps_per_second"] = progress.get("steps_per_second")
    if progress["epochs"]:
        total = stage_ends(schedule)[-1]
        meta["estimated_total_hours"] = progress["hours"] / progress["epochs"] * total


def run(args: argparse.Namespace) -> None:
    import pyro

    from pyrovae import fit
    from pyrovae.build import build_vae

    t_start = time.perf_counter()
    spec = SETTINGS[args.setting]
    run_dir = args.run_dir or DEFAULT_RUNS / args.setting
    prepare_run(args, run_dir)
    meta = read_json(run_dir / META_NAME, {})
    if meta and meta.get("setting") not in (None, args.setting):
        raise BenchmarkError(
            f"{run_dir} holds a run of setting {meta['setting']}; pass --setting "
            f"{meta['setting']} or another --run-dir"
        )
    schedule_name = args.schedule or meta.get("schedule") or spec["schedule"]
    if meta.get("schedule") not in (None, schedule_name):
        raise BenchmarkError(
            f"{run_dir} was started with --schedule {meta['schedule']}; pass --schedule "
            f"{meta['schedule']} or another --run-dir"
        )
    schedule = SCHEDULES[schedule_name]
    loss = None if args.evaluate_now else make_loss(args.setting, spec)  # refuse IWAE early
    train, test, dataset = load_data(args, spec)
    train = protocol_data(train, schedule)
    bias = output_bias_logits(train) if schedule.get("output_bias") else None
    if meta.get("dataset") not in (None, dataset):
        raise BenchmarkError(
            f"{run_dir} was trained on {meta['dataset']}; pass --dataset {meta['dataset']} or "
            "another --run-dir"
        )
    if schedule["batch_size"] > len(train):
        raise BenchmarkError(f"schedule {schedule_name} needs at least {schedule['batch_size']} "
                             f"training digits, {dataset} has {len(train)}")
    total = stage_ends(schedule)[-1]
    device = device_text(args.device, args.threads)

    def base(m: dict[str, Any]) -> None:
        m.update(setting=args.setting, schedule=schedule_name, dataset=dataset, seed=args.seed,
                 device=device)
        # runs whose curve began on the first test digits keep them; new runs use a random subset
        m.setdefault("curve_digits", "first" if m.get("curve") else "random")
        m.setdefault("curve", [])
        m.setdefault("evaluations", [])

    meta = update_meta(run_dir, base)

    def score(kind: str) -> None:
        nonlocal meta
        progress = training_progress(run_dir)
        if kind == "curve":
            result = evaluate(run_dir, test, args.curve_num_test, args.curve_num_samples,
                              args.eval_seed, args.device, meta["curve_digits"])
        else:
            result = evaluate(run_dir, test, args.eval_num_test, args.eval_num_samples,
                              args.eval_seed, args.device, meta["curve_digits"])
        result.update(epochs=progress["epochs"], hours=progress["hours"], kind=kind,
                      complete=kind != "curve" and progress["epochs"] >= total
                      and result["num_test"] == len(test),
                      train_elbo=progress.get("train_elbo"))
        key = "curve" if kind == "curve" else "evaluations"

        def add(m: dict[str, Any]) -> None:
            m[key] = [c for c in m.get(key, []) if c["epochs"] != result["epochs"]] + [result]
            record_progress(m, progress, schedule)

        meta = update_meta(run_dir, add)
        write_results(args.out, make_row(args.setting, meta))
        print(f"mnist_nll: [{args.setting}] {kind} at epoch {result['epochs']} "
              f"({result['hours']:.2f} h): test NLL {result['nll']:.2f} ± {result['stderr']:.2f} "
              f"(K={result['num_samples']}, {result['num_test']} digits, "
              f"{result['eval_seconds']:.0f} s)", flush=True)

    if args.evaluate_now:
        if not (run_dir / "checkpoint.pt").is_file():
            raise BenchmarkError(f"{run_dir} has no checkpoint to evaluate; train first")
        score("evaluate-now")
        return

    points = curve_epochs(schedule, args.curve_every)
    start = training_progress(run_dir)
    done = start["epochs"]
    trained = 0
    # The budget in hours is checked between fit calls: size each call by the time per epoch so
    # far (the first call of a new run trains one epoch to measure it).
    last_epoch_seconds: float | None = start["hours"] * 3600 / done if done else None
    print(f"mnist_nll: [{args.setting}] {dataset}: {len(train)} train / {len(test)} test digits; "
          f"schedule {schedule_name} ({total} epochs, batch {schedule['batch_size']}); "
          f"{done} epochs done; run folder {run_dir}", flush=True)
    while True:
        have_curve = {c["epochs"] for c in meta.get("curve", [])}
        if done in points and done not in have_curve:
            score("curve")
        if done >= total:
            if not any(e["epochs"] >= total and e.get("complete") for e in meta.get("evaluations", [])):
                score("final")
            print(f"mnist_nll: [{args.setting}] the schedule is complete", flush=True)
            break
        if args.max_epochs is not None and trained >= args.max_epochs:
            break
        elapsed = time.perf_counter() - t_start
        if args.max_hours is not None and trained and elapsed >= args.max_hours * 3600:
            break  # (an invocation trains at least one epoch)
        stage, end, lr = stage_at(schedule, done)
        target = min(end, min(p for p in points if p > done))
        if args.max_epochs is not None:
            target = min(target, done + args.max_epochs - trained)
        if args.max_hours is not None:
            fits = int((args.max_hours * 3600 - elapsed) // last_epoch_seconds) if last_epoch_seconds else 1
            target = min(target, done + max(1, fits))
        torch.manual_seed(args.seed)
        pyro.clear_param_store()
        vae = build_vae(make_config(spec, train.num_features), num_data=len(train))
        resume = (run_dir / "checkpoint.pt").is_file()
        if bias is not None and not resume:  # a resumed run's checkpoint holds its own
            init_output_bias(vae, bias)

        def log(epoch: int, h: Any, stage: int = stage, lr: float = lr) -> None:
            print(f"  [{args.setting}] epoch {epoch:4d}/{total} stage {stage} lr {lr:.2e} "
                  f"train bound {h.train_elbo[-1]:8.2f} ({h.epoch_seconds[-1]:.1f} s)", flush=True)

        history = fit(vae, train, loss=loss, num_epochs=target, batch_size=schedule["batch_size"],
                      lr=lambda epoch: stage_at(schedule, epoch)[2], adam_eps=schedule["eps"],
                      seed=args.seed, device=args.device, progress=False,
                      kl_warmup_epochs=schedule["kl_warmup_epochs"], on_epoch_end=log,
                      checkpoint_dir=run_dir, resume=True if resume else None)
        trained += target - done
        done = history.num_epochs
        last_epoch_seconds = history.epoch_seconds[-1]
        progress = training_progress(run_dir)
        meta = update_meta(run_dir, lambda m: record_progress(m, progress, schedule))
    if args.save_state:
        save_state(args, run_dir)
    print(f"mnist_nll: [{args.setting}] stopped at epoch {done}/{total} "
          f"({(time.perf_counter() - t_start) / 3600:.2f} h this invocation)", flush=True)


# ------------------------------------------------------------------------------------- speed
def measure_speed(args: argparse.Namespace) -> None:
    """Steps/s of the vae-dynamic-k1 model through ``pyrovae.fit`` at minibatch 20 and 100."""
    from pyrovae import fit
    from pyrovae.build import build_vae

    spec = SETTINGS["vae-dynamic-k1"]
    train, _, dataset = load_data(args, spec)
    measurements = []
    for bs in (20, 100):
        n = min(len(train), bs * args.speed_steps)
        sub = train.subset(n)
        torch.manual_seed(args.seed)
        vae = build_vae(make_config(spec, train.num_features), num_data=n)
        h = fit(vae, sub, num_epochs=1, batch_size=bs, lr=1e-3, adam_eps=1e-4, seed=args.seed,
                progress=False)
        rate = h.num_steps / h.epoch_seconds[0]
        per_epoch = 60000 / bs / rate
        measurements.append({"batch_size": bs, "steps": h.num_steps, "steps_per_second": rate,
                             "seconds_per_epoch": per_epoch, "schedule_hours": per_epoch * 3280 / 3600})
        print(f"mnist_nll: minibatch {bs}: {rate:.0f} steps/s, {per_epoch:.1f} s per epoch, "
              f"3,280 epochs in {per_epoch * 3280 / 3600:.1f} h", flush=True)
    b20, b100 = measurements
    load = os.getloadavg()[0]
    decision = (
        f"Burda et al.'s schedule at minibatch 20 would take {b20['schedule_hours']:.1f} h of "
        f"training at this rate; at minibatch 100 it takes {b100['schedule_hours']:.1f} h "
        f"({b20['schedule_hours'] / b100['schedule_hours']:.1f}x less). The rate was measured "
        f"on a machine shared with other jobs (load average {load:.1f} on {os.cpu_count()} "
        "cores), so an idle core is faster and a busier one slower. The default schedule is therefore "
        "`burda-b100`: the same 3^i-epoch stages and learning rates at minibatch 100 (5x fewer "
        "Adam steps per epoch; the rows say so). `--schedule burda` runs the published minibatch "
        "of 20. Curve evaluations (1000 digits, K=1000) and the final one (10,000 digits, "
        "K=5000) come on top."
    )
    out = {"device": device_text("cpu", args.threads), "date": time.strftime("%Y-%m-%d"),
           "steps": args.speed_steps, "dataset": dataset, "load_average": load, "measurements": measurements,
           "decision": decision}
    _atomic_text(args.out / "mnist_nll_speed.json", json.dumps(out, indent=2) + "\n")
    print(decision, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pyrovae.errors import PyrovaeError

    try:
        if args.measure_speed:
            measure_speed(args)
        elif args.render:
            render(args.out, args.snippet)
        elif args.save_state and args.max_epochs is None and args.max_hours is None \
                and not args.evaluate_now:
            save_state(args, args.run_dir or DEFAULT_RUNS / args.setting)
        else:
            run(args)
    except (BenchmarkError, PyrovaeError) as e:
        print(f"mnist_nll: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

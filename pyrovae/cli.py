"""The ``pyrovae`` command line: ``pyrovae train`` (the main job), ``pyrovae evaluate`` (IS or
AIS), ``pyrovae bdmc`` (the BDMC sandwich on simulated data) and ``pyrovae gaps``
(approximation and amortization gaps of trained runs).

``pyrovae train`` with no arguments trains a VAE on the bundled MNIST sample, prints per-epoch
progress, the test ELBO and the importance-sampled test log-likelihood, and writes a run folder
(``metrics.json``, ``config.json``, ``checkpoint.pt`` and PNG pictures). The run folder holds a
checkpoint written atomically after every epoch (and every ``--checkpoint-every-steps`` steps), so
``pyrovae train --resume RUN`` continues an interrupted run exactly where its last checkpoint
stands, with the run's saved options.

``torchrun --standalone --nproc-per-node=N -m pyrovae train ...`` (or the multi-node form,
``torchrun --nnodes=M --nproc-per-node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m pyrovae
train ...``) trains one run data-parallel: ``--batch-size`` is the global minibatch, split across
the processes; rank 0 alone writes the run folder and prints (see :mod:`pyrovae.distributed`).

Exit status of ``pyrovae train``: 0 done; 1 an operating-system error; 2 a pyrovae error (bad
option, data, checkpoint; a full disk while checkpointing, with the resume command); 75
(:data:`pyrovae.training.EXIT_PREEMPTED`) stopped by SIGTERM after writing a checkpoint: run the
printed ``--resume`` command to continue exactly; 130 interrupted by Ctrl-C.

This module is the parser alone (argparse, nothing of torch or Pyro), so that ``pyrovae --help``
and every argument error answer at once; :mod:`pyrovae.workflow` runs the parsed command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

LOSSES = ("elbo", "meanfield", "iwae", "jit")
GRADIENTS = ("standard", "dreg", "stl")


#: The names of :data:`pyrovae.build.PRIORS`, ``FAMILIES`` and ``LIKELIHOODS`` (spelled out here so
#: that the parser imports no torch; ``tests/test_cli_parts.py`` checks they match).
PRIORS = ("flow", "hierarchical", "learned", "mixture", "standard", "vamp")
FAMILIES = ("bottom_up", "diagonal", "full_rank", "householder", "iaf", "local", "planar", "radial",
            "spline")
LIKELIHOODS = ("bernoulli", "categorical256", "continuous_bernoulli", "gaussian", "laplace")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=50, help="size of z (default: 50)")
    g.add_argument(
        "--hidden-dims", type=int, nargs="*", default=[400, 400],
        help="hidden layer sizes of encoder and decoder (default: 400 400)",
    )
    g.add_argument("--activation", default="relu", help="MLP activation (default: relu)")
    g.add_argument("--prior", default="standard", help=f"one of {sorted(PRIORS)}")
    g.add_argument("--family", default="diagonal", help=f"one of {sorted(FAMILIES)}")
    g.add_argument("--likelihood", default="bernoulli", help=f"one of {sorted(LIKELIHOODS)}")
    g.add_argument(
        "--network", default="mlp", choices=("mlp", "conv"),
        help="encoder/decoder networks: mlp, or conv (convolutional, for images) (default: mlp)",
    )
    g.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="extra part option, e.g. --option scale=0.1 or --option num_transforms=4 (repeatable)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset", default="default",
        help="default (bundled MNIST sample), mnist, fashion-mnist, binarized-mnist, frey-faces",
    )
    g.add_argument(
        "--data-root", default=None,
        help="folder holding the data files (default: $PYROVAE_DATA; not needed for 'default')",
    )
    g.add_argument(
        "--binarize", default=None, choices=("dynamic", "none"),
        help="dynamic: redraw each pixel as Bernoulli(intensity) on every use (Burda et al. 2016); "
        "none: keep grey values (default: the dataset's own default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae", description="Variational autoencoders as Pyro programs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train a VAE and report its test log-likelihood",
        description="Train a VAE by SVI and report its test ELBO and importance-sampled test "
        "log-likelihood (with an AIS check), writing a run folder: metrics.json, config.json, "
        "checkpoint.pt and PNG pictures. With no arguments: the bundled MNIST sample, about 40 s "
        "on 2 CPU cores.",
    )
    _add_data_options(t)
    _add_model_options(t)
    g = t.add_argument_group("training")
    g.add_argument("--loss", default="elbo", choices=LOSSES,
                   help="elbo: the ELBO (Trace_ELBO); meanfield: TraceMeanField_ELBO (analytic KL); "
                   "iwae: the IWAE bound (pyrovae.losses.IWAE); jit: JitTrace_ELBO (compiled)")
    g.add_argument("--num-particles", type=int, default=None,
                   help="particles per datapoint (IWAE's k; default: 5 for iwae, 1 otherwise)")
    g.add_argument("--gradient", default="standard", choices=GRADIENTS,
                   help="the gradient estimator: standard (reparameterized); dreg (doubly "
                   "reparameterized, Tucker et al. 2019; --loss iwae); stl (sticking the landing, "
                   "Roeder et al. 2017; --loss elbo) (default: standard)")
    g.add_argument("--beta", type=float, default=1.0, help="weight on the KL term (default: 1)")
    g.add_argument("--kl-warmup", type=float, default=0.0, help="epochs of linear KL warm-up")
    g.add_argument("--epochs", type=int, default=60,
                   help="passes over the training set (default: 60: about 40 s for the default "
                   "model on the bundled sample on 2 CPU cores, and samples that look like digits)")
    g.add_argument("--batch-size", type=int, default=100,
                   help="datapoints per minibatch (under torchrun: the global minibatch) "
                   "(default: 100)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    g.add_argument("--adam-eps", type=float, default=None, metavar="EPS",
                   help="Adam's epsilon (default: torch's 1e-8; Burda et al. used 1e-4)")
    g.add_argument("--compile", action="store_true",
                   help="compile the loss and the final test estimates with torch.compile "
                   "(default loss only; ~10-25 s of compiling, then ~5-8%% faster steps and "
                   "~15-25%% faster importance sampling on a CPU: for long runs)")
    g.add_argument("--num-train", type=int, default=None, metavar="N",
                   help="train on the first N datapoints of the training split (default: all)")
    g.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of the training split held out for validation (default: 0.1)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the initialization, the minibatch order, the validation split and "
                   "every draw: the same seed gives the same run (default: 0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default: runs/<dataset>-<time>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = t.add_argument_group("reliability")
    r.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help="continue the run in folder RUN from its last checkpoint, with its saved "
                   "options (only --epochs, --checkpoint-every-steps, --clip-grad-norm, --device, "
                   "--data-root and the evaluation options may be given anew)")
    r.add_argument("--checkpoint-every-steps", type=int, default=None, metavar="N",
                   help="also checkpoint every N steps inside an epoch (default: after each epoch only)")
    r.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="clip the total gradient 2-norm to MAX at every step (default: no clipping)")
    e = t.add_argument_group("evaluation")
    e.add_argument("--num-samples", type=int, default=1000,
                   help="importance samples K per test datapoint (default: 1000)")
    e.add_argument("--eval-points", type=int, default=None,
                   help="evaluate on the first N test datapoints (default: all)")
    e.add_argument("--check-points", type=int, default=100, metavar="N",
                   help="run AIS on the first N test points beside IS, to say how far the IS "
                   "figure can be trusted (default: 100; 0 skips it)")
    e.add_argument("--ais-steps", type=int, default=100,
                   help="AIS intermediate distributions for the check (default: 100)")
    e.add_argument("--ais-chains", type=int, default=4, help="AIS chains per point (default: 4)")

    v = sub.add_parser(
        "evaluate", help="test log-likelihood of a trained run (IS or AIS)",
        description="Score a trained run's test points by importance sampling or AIS. Under "
        "torchrun (torchrun --standalone --nproc-per-node=N -m pyrovae evaluate RUN) the "
        "processes split the points; the values equal one process's for the same --seed.",
    )
    v.add_argument("run", type=Path, help="a run folder written by 'pyrovae train'")
    v.add_argument("--estimator", default="is", choices=("is", "ais"),
                   help="is: importance sampling with the encoder (with an AIS check on "
                   "--check-points points); ais: annealed importance sampling on every point "
                   "(default: is)")
    v.add_argument("--num-samples", type=int, default=5000,
                   help="importance samples K per datapoint (default: 5000)")
    v.add_argument("--eval-points", type=int, default=None,
                   help="the first N datapoints of the split (default: all)")
    v.add_argument("--check-points", type=int, default=100, metavar="N",
                   help="with --estimator is: AIS on the first N points beside IS (default: 100; "
                   "0 skips it)")
    v.add_argument("--ais-steps", type=int, default=1000,
                   help="AIS intermediate distributions (default: 1000)")
    v.add_argument("--ais-chains", type=int, default=4, help="AIS chains per point (default: 4)")
    v.add_argument("--leapfrog-steps", type=int, default=10,
                   help="leapfrog steps per HMC transition (default: 10)")
    v.add_argument("--format", default="json", choices=("json", "csv"),
                   help="the result file's format (default: json); never overwrites an earlier one")
    v.add_argument("--per-datapoint", action="store_true",
                   help="also write each datapoint's estimate (and k-hat, ESS for IS)")
    v.add_argument("--data-root", default=None,
                   help="folder holding the data files (default: the run's own, else $PYROVAE_DATA)")
    v.add_argument("--split", default="test", help="the split to score (default: test)")
    v.add_argument("--seed", type=int, default=0, help="seeds the draws (default: 0)")
    v.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    v.add_argument("--compile", action="store_true",
                   help="with --estimator is: compile the importance weights with torch.compile "
                   "(the same values for the same --seed; ~10-25 s of compiling, then ~15-25%% less "
                   "time per point on a CPU at K=5000)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")

    sp = sub.add_parser("sample", help="draw images from a trained run's model: z ~ p(z), then "
                        "the likelihood's mean",
                        description="Draw images from a trained run's model: z ~ p(z), then the "
                        "mean of p(x|z), written as one PNG grid.")
    sp.add_argument("run", type=Path, help="a run folder written by 'pyrovae train'")
    sp.add_argument("-n", "--num-samples", type=int, default=64, help="images (default: 64)")
    sp.add_argument("--out", type=Path, default=None,
                    help="the PNG to write (default: RUN/samples-seed<S>.png, never overwriting)")
    sp.add_argument("--seed", type=int, default=0, help="seeds the draws (default: 0)")
    sp.add_argument("--scale", type=int, default=3,
                    help="pixels per image pixel, so digits are large enough to see (default: 3)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")

    b = sub.add_parser("bdmc", help="the BDMC sandwich of log p(x) on data simulated from a run's "
                       "model (Grosse et al. 2015), with IS beside it",
                       description="Simulate datapoints from a trained run's model and bound "
                       "their log p(x) from both sides by forward and reverse AIS (bidirectional "
                       "Monte Carlo, Grosse et al. 2015); the importance-sampling estimates with "
                       "--is-samples draws are placed in the sandwich.")
    b.add_argument("run", type=Path, help="a run folder written by 'pyrovae train'")
    b.add_argument("--points", type=int, default=100, help="simulated datapoints (default: 100)")
    b.add_argument("--ais-steps", type=int, default=1000,
                   help="intermediate distributions of forward and reverse AIS (default: 1000)")
    b.add_argument("--ais-chains", type=int, default=4, help="chains per point (default: 4)")
    b.add_argument("--leapfrog-steps", type=int, default=10, help="per transition (default: 10)")
    b.add_argument("--is-samples", type=int, nargs="+", default=[1000, 5000],
                   help="the K of the IS estimates placed in the sandwich (default: 1000 5000)")
    b.add_argument("--seed", type=int, default=0, help="seeds the simulation and the draws (default: 0)")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    gp = sub.add_parser(
        "gaps", help="approximation and amortization gaps of trained runs (Cremer et al. 2018)",
        description="Split each run's inference gap log p(x) - L[q] on test points into the "
        "approximation gap log p(x) - L[q*] and the amortization gap L[q*] - L[q], where q* is "
        "the best member of the family for each datapoint (Cremer et al. 2018); with the "
        "latent-space diagnostics. Writes gaps.json and the chart gaps.png.",
    )
    gp.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                    help="run folders written by 'pyrovae train' (compared side by side)")
    gp.add_argument("--eval-points", type=int, default=1000,
                    help="the first N test datapoints (default: 1000)")
    gp.add_argument("--num-samples", type=int, default=5000,
                    help="importance samples K for log p(x) (default: 5000)")
    gp.add_argument("--num-elbo-samples", type=int, default=1000,
                    help="draws per datapoint for L[q] and L[q*] (default: 1000)")
    gp.add_argument("--num-steps", type=int, default=2000,
                    help="most optimizer steps per batch for q* (default: 2000)")
    gp.add_argument("--mi-batch-size", type=int, default=None,
                    help="mixture components per estimate of the aggregate posterior q(z) "
                    "(default: all test points, the exact mixture; for a flow family, whose "
                    "density at another point costs an inverse, e.g. 100 is much faster and "
                    "slightly biased)")
    gp.add_argument("--ais-steps", type=int, default=None,
                    help="AIS intermediate distributions for log p(x) (default: pyrovae.gaps's, "
                    "1000, with a convergence check at a quarter of them)")
    gp.add_argument("--ais-chains", type=int, default=None,
                    help="AIS chains per point (default: pyrovae.gaps's, 16)")
    gp.add_argument("--estimator", default="best", choices=("best", "is", "ais"),
                    help="log p(x) for the gaps: best (the larger of IS and AIS, as Cremer et "
                    "al.), is or ais (default: best)")
    gp.add_argument("--data-root", default=None,
                    help="folder holding the data files (default: each run's own, else $PYROVAE_DATA)")
    gp.add_argument("--seed", type=int, default=0, help="seeds every draw (default: 0)")
    gp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    gp.add_argument("--no-progress", action="store_true", help="no progress bars")
    gp.add_argument("--out", type=Path, default=None,
                    help="folder for gaps.json and gaps.png (default: the run folder for one run, "
                    "runs/gaps-<time> for several)")
    return parser


def given_options(argv: list[str]) -> set[str]:
    """The ``train`` options written on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for a in action.choices["train"]._actions:
                a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}



def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyrovae`` console script: parse, then run the command
    (:func:`pyrovae.workflow.run`, which imports torch and Pyro)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.given = given_options(argv)  # to tell a conflicting option from a default
    from .workflow import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())

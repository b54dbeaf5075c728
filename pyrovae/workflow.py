"""What the ``pyrovae`` commands do, once :mod:`pyrovae.cli` has parsed their arguments.

:func:`run` takes the parsed ``argparse.Namespace`` and runs ``train``, ``evaluate``, ``sample``,
``bdmc`` or ``gaps``: loads the data and the runs, trains and estimates, writes the run folder and
its pictures, and turns pyrovae's errors into one line on stderr and an exit status (see
:mod:`pyrovae.cli` for the statuses). It imports torch and Pyro; the parser does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, PyrovaeError
from .options import EstimateOptions

if TYPE_CHECKING:  # for annotations only
    from .vae import VAE

__all__ = ["run"]


def _parse_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option needs KEY=VALUE, got {item!r}; e.g. --option scale=0.1")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s); use cuda:0 or --device auto")
    return device


def _load(dataset: str, split: str, root: Any, binarize: Any) -> Any:
    from .data import load_dataset

    return load_dataset(dataset, split, root=root, binarize=binarize)


def _loss(name: str, num_particles: int | None, gradient: str = "standard") -> Any:
    """The objective that ``--loss``, ``--num-particles`` and ``--gradient`` name."""
    from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

    from .losses import IWAE, ReparamELBO

    if num_particles is None:
        num_particles = 5 if name == "iwae" else 1
    if num_particles < 1:
        raise ConfigError(f"--num-particles must be >= 1, got {num_particles}")
    allowed = {"iwae": ("standard", "dreg"), "elbo": ("standard", "stl")}.get(name, ("standard",))
    if gradient not in allowed:
        fix = {"dreg": "--loss iwae", "stl": "--loss elbo"}.get(gradient, "--gradient standard")
        raise ConfigError(f"--gradient {gradient} does not apply to --loss {name}; use {fix}")
    vectorize = num_particles > 1
    if name == "iwae":
        return IWAE(num_particles=num_particles, gradient=gradient)
    if name == "elbo":
        if gradient == "stl":
            return ReparamELBO(num_particles=num_particles, gradient="stl")
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize)
    if name == "meanfield":
        return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=vectorize)
    return JitTrace_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, ignore_jit_warnings=True
    )


def _split_validation(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    if not 0 <= fraction < 1:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {fraction}")
    n_valid = int(round(len(train) * fraction))
    if n_valid == 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_valid:]), train.subset(perm[:n_valid])


def _fixed_test_set(test: Any, eval_points: int | None, seed: int) -> Any:
    if eval_points is not None:
        if eval_points < 1:
            raise ConfigError(f"--eval-points must be >= 1, got {eval_points}")
        test = test.subset(min(eval_points, len(test)))
    # One fixed binarization (seeded), so the ELBO and log p(x) score the same digits.
    if getattr(test, "dynamic_binarization", False):
        test = test.binarized(generator=torch.Generator().manual_seed(seed + 1))
    return test


def _local(vae: VAE) -> str | None:
    """``EstimateOptions.local`` for ``vae`` on new points: a per-datapoint family fits their own
    parameters with the decoder fixed (``"fit"``: it holds none for them); others ``None``."""
    from .families import capability

    return "fit" if capability(vae.family, "per_datapoint") else None


def _ais_start(vae: VAE) -> dict[str, Any]:
    """AIS options for a family that cannot give q(z|x) at any z (a planar or radial flow: no
    inverse) or at new points (a per-datapoint family): start the chains from the prior, which
    an encoder start would need."""
    from .ais import start_for

    return {} if start_for(vae.family) == "encoder" else {"start": "prior"}


def _report_estimates(vae: VAE, test: Any, num_samples: int, seed: int, progress: bool, *,
                      check_points: int = 0, ais_steps: int = 100, ais_chains: int = 4,
                      group: Any = None, per_datapoint: bool = False,
                      compile: bool = False, into: dict | None = None,
                      stage: list[str] | None = None) -> dict:
    """Print and return the test ELBO, the importance-sampled log p(x) with its diagnostics, and
    (``check_points`` > 0) AIS on the first test points beside IS on the same points: how far
    the IS figure can be trusted. Under a process ``group`` every rank computes its share and
    rank 0 alone prints. ``compile``: the importance weights through ``torch.compile`` (not for
    a per-datapoint family, whose points are scored by fitting their own proposals).
    ``into``: the dict to fill, entry by entry as each is computed (so that what was measured
    survives a later failure); ``stage``: a list the name of each step is appended to."""
    from . import distributed
    from .importance import elbo, log_likelihood

    say = _printer(group)  # rank 0 speaks for all
    metrics: dict[str, Any] = {} if into is None else into
    stage = [] if stage is None else stage
    local = _local(vae)
    options = EstimateOptions(seed=seed, progress=progress, local=local,
                              process_group=group or False, compile=compile and local is None)
    t0 = time.perf_counter()
    stage.append("the test ELBO")
    test_elbo = elbo(vae, test, num_samples=10, options=options)
    metrics["test_elbo"] = {**test_elbo.to_dict(), "num_samples": 10}
    stage.append("the importance-sampled test log-likelihood")
    ll = log_likelihood(vae, test, num_samples=num_samples, options=options)
    seconds = time.perf_counter() - t0
    say(f"test ELBO            {test_elbo.mean:9.2f} ± {test_elbo.stderr:.2f} nats "
        f"(10 samples per datapoint, n={len(test_elbo.values)})")
    say(f"test log-likelihood  {ll.mean:9.2f} ± {ll.stderr:.2f} nats "
        f"(importance sampling, K={ll.num_samples}, n={len(ll.values)})")
    for result in (test_elbo, ll):
        why = result.why_not_finite()
        if why:
            say(f"  not finite: {why}")
    reliability = ll.reliability()
    if reliability:
        say(f"importance weights: {reliability}")
    metrics["test_log_likelihood"] = ll.to_dict(per_datapoint)
    metrics["evaluation_seconds"] = seconds
    if group is not None:
        metrics["processes"] = distributed.world_size(group)
    if check_points:
        stage.append("the AIS check")
        metrics["ais_check"] = _ais_check(vae, test, ll, check_points, ais_steps, ais_chains,
                                          seed, progress, group)
    return metrics


def _printer(group: Any) -> Any:
    """``print`` on rank 0 (or in a single process), a no-op on the other ranks."""
    from . import distributed

    if group is None or distributed.is_main(group):
        return print
    return lambda *args, **kwargs: None


def _ais_check(vae: VAE, test: Any, ll: Any, points: int, steps: int, chains: int, seed: int,
               progress: bool, group: Any = None) -> dict:
    """AIS on the first ``points`` test datapoints beside IS's values on the same points."""
    from .ais import ais

    say = _printer(group)  # rank 0 speaks for all
    import warnings

    from .ais import AISConvergenceWarning

    n = min(points, len(ll.values))
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # said in the verdict instead
        warnings.simplefilter("ignore", AISConvergenceWarning)
        a = ais(vae, test.subset(n) if hasattr(test, "subset") else test[:n],
                num_intermediate=steps, num_chains=chains, leapfrog_steps=10, **_ais_start(vae),
                options=EstimateOptions(seed=seed, progress=progress, process_group=group or False))
    diff = a.values - ll.values[:n]
    finite = torch.isfinite(diff)
    d = float(diff[finite].mean()) if bool(finite.any()) else float("nan")
    se = float(diff[finite].std() / finite.sum().sqrt()) if int(finite.sum()) > 1 else float("nan")
    if d != d:
        verdict = "AIS and IS could not be compared (non-finite values)"
    elif d > 2 * se:
        verdict = (f"IS is {d:.2f} ± {se:.2f} nats below AIS on these points: the IS figure is "
                   f"low by at least that much (AIS is a stochastic lower bound too); raise "
                   "--num-samples or use a more flexible family")
    elif d < -2 * se:
        verdict = (f"AIS is {-d:.2f} ± {se:.2f} nats below IS on these points: AIS has not "
                   "converged (raise --ais-steps); the IS figure stands")
    else:
        verdict = (f"IS and AIS agree within {abs(d):.2f} ± {se:.2f} nats on these points: "
                   "the IS figure can be trusted to about that")
    if a.converged is False:
        verdict += (f"; AIS itself has not converged at T={steps} ({a.convergence.split(': ')[0]}): "
                    "raise --ais-steps")
    start = ", from the prior" if a.start == "prior" else ""
    say(f"AIS check on the first {n} test points (T={steps}, {chains} chains{start}, acceptance "
        f"{float(a.acceptance.mean()):.2f}): AIS {a.mean:.2f}, IS {float(ll.values[:n].mean()):.2f}; "
        f"{verdict}")
    return {"num_datapoints": n, "num_intermediate": steps, "num_chains": chains,
            "ais": a.to_dict(), "is_mean_same_points": float(ll.values[:n].mean()),
            "ais_minus_is": {"mean": d, "stderr": se}, "verdict": verdict,
            "seconds": time.perf_counter() - t0}


# Options of `pyrovae train` that a resumed run may change; every other one is the run's own.
_RESUME_MAY_CHANGE = frozenset({
    "epochs", "checkpoint_every_steps", "clip_grad_norm", "device", "data_root", "num_samples",
    "eval_points", "no_progress", "resume", "out", "check_points", "ais_steps", "ais_chains",
})
# The run's data and training options saved in config.json ("cli"); the model is under "vae".
_RUN_OPTIONS = (
    "dataset", "binarize", "validation_fraction", "loss", "num_particles", "beta", "kl_warmup",
    "epochs", "batch_size", "lr", "seed", "checkpoint_every_steps", "clip_grad_norm",
)
# Run options that older runs did not save (absent means the default).
_OPTIONAL_RUN_OPTIONS = {"num_train": None, "gradient": "standard", "adam_eps": None}
# Model options and the VAEConfig field each one sets.
_MODEL_OPTIONS = {
    "latent_dim": "latent_dim", "hidden_dims": "hidden_dims", "activation": "activation",
    "prior": "prior", "family": "family", "likelihood": "likelihood", "option": "options",
    "network": "network",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _resume_run(args: argparse.Namespace, given: set[str]) -> Any:
    """Check ``--resume RUN`` and fill ``args`` with the run's saved options; return its
    :class:`~pyrovae.build.VAEConfig`."""
    from .build import PINNED_OPTIONS, VAEConfig
    from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, read_config

    run = args.resume
    if not run.is_dir():
        raise ConfigError(f"--resume {run}: no such run folder; pass the folder 'pyrovae train' "
                          "printed as 'run folder:'")
    if not (run / CONFIG_NAME).is_file():
        raise ConfigError(f"--resume {run}: the folder has no {CONFIG_NAME}, so it is not a run of "
                          "'pyrovae train'; start a new run without --resume")
    if not (run / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"--resume {run}: the run has no {CHECKPOINT_NAME} (it stopped before "
                          "its first checkpoint); start it again without --resume")
    if args.out is not None and args.out.resolve() != run.resolve():
        raise ConfigError(f"--out {args.out} conflicts with --resume {run}: a resumed run goes on "
                          "writing to its own folder; drop --out")
    saved = read_config(run)
    options = saved.get("cli")
    if not isinstance(options, dict) or any(k not in options for k in _RUN_OPTIONS):
        raise ConfigError(f"--resume {run}: {run / CONFIG_NAME} holds no 'pyrovae train' options; "
                          "resume it in Python with pyrovae.fit(..., resume=...)")
    vae_fields = dict(saved["vae"])
    for dest, field in _MODEL_OPTIONS.items():
        if dest not in given:
            continue
        value = getattr(args, dest)
        value = _parse_options(value) if dest == "option" else value
        stored = vae_fields.get(field)
        if dest == "option" and isinstance(stored, dict):
            # An option the run pinned when it was saved (its value then) is not retyped.
            value = {**{k: stored[k] for k in PINNED_OPTIONS if k in stored}, **value}
        if dest == "hidden_dims":
            value, stored = list(value), list(stored or [])
        if value != stored:
            raise ConfigError(
                f"{_flag(dest)} {value} conflicts with the run's saved {field}={stored!r} in "
                f"{run / CONFIG_NAME}; drop {_flag(dest)} to resume {run}, or start a new run"
            )
    for dest in _RUN_OPTIONS:
        if dest in given and dest not in _RESUME_MAY_CHANGE and getattr(args, dest) != options[dest]:
            raise ConfigError(
                f"{_flag(dest)} {getattr(args, dest)} conflicts with the run's saved "
                f"{dest}={options[dest]!r} in {run / CONFIG_NAME}; drop {_flag(dest)} to resume "
                f"{run}, or start a new run"
            )
        if dest not in given:
            setattr(args, dest, options[dest])
    for dest in _OPTIONAL_RUN_OPTIONS:  # saved by newer runs only
        saved_value = options.get(dest, _OPTIONAL_RUN_OPTIONS[dest])
        if dest in given and getattr(args, dest) != saved_value:
            raise ConfigError(
                f"{_flag(dest)} {getattr(args, dest)} conflicts with the run's saved "
                f"{dest}={saved_value!r} in {run / CONFIG_NAME}; drop {_flag(dest)} to "
                f"resume {run}, or start a new run"
            )
        setattr(args, dest, saved_value)
    args.out = run
    vae_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in vae_fields.items()}
    try:
        return VAEConfig(**vae_fields)
    except TypeError as e:
        raise ConfigError(f"--resume {run}: {run / CONFIG_NAME} is not a valid model "
                          f"configuration ({e}); start a new run") from None


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse impossible numbers before any data is read or any step is taken, naming the flag."""
    import math

    def bad(dest: str, need: str) -> ConfigError:
        return ConfigError(f"{_flag(dest)} must be {need}, got {getattr(args, dest)}")

    for dest in ("latent_dim", "epochs", "batch_size", "num_particles", "num_samples",
                 "ais_steps", "ais_chains", "leapfrog_steps", "points"):
        if getattr(args, dest, None) is not None and getattr(args, dest) < 1:
            raise bad(dest, "a positive integer")
    for dest in ("eval_points", "checkpoint_every_steps", "num_train"):
        if getattr(args, dest, None) is not None and getattr(args, dest) < 1:
            raise bad(dest, "a positive integer")
    if "hidden_dims" in args and any(h < 1 for h in args.hidden_dims):
        raise bad("hidden_dims", "positive integers")
    for dest in ("lr", "adam_eps", "beta", "clip_grad_norm"):
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise bad(dest, "a positive finite number")
    if "kl_warmup" in args and not (math.isfinite(args.kl_warmup) and args.kl_warmup >= 0):
        raise bad("kl_warmup", "a finite number >= 0")
    if getattr(args, "check_points", 0) < 0:
        raise bad("check_points", "an integer >= 0")
    if any(k < 1 for k in getattr(args, "is_samples", ())):
        raise bad("is_samples", "positive integers")
    if "seed" in args and args.seed < 0:
        raise bad("seed", "a non-negative integer")


def _train(args: argparse.Namespace) -> int:
    """``pyrovae train``; under ``torchrun`` every process runs it, rank 0 alone writes and
    prints."""
    return _in_process_group(_train_run, args)


def _in_process_group(run: Any, args: argparse.Namespace) -> int:
    """``run(args)``, closing at the end the process group that it started (under ``torchrun``)."""
    import torch.distributed as tdist

    started = not (tdist.is_available() and tdist.is_initialized())
    try:
        return run(args)
    finally:
        if started and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def _train_run(args: argparse.Namespace) -> int:
    from . import distributed
    from .build import VAEConfig, build_vae
    from .checkpoint import CHECKPOINT_NAME

    resuming = args.resume is not None
    saved_config = _resume_run(args, args.given) if resuming else None
    _check_numbers(args)
    if not 0 <= args.validation_fraction < 1:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if args.num_particles is None:
        args.num_particles = 5 if args.loss == "iwae" else 1
    _loss(args.loss, args.num_particles, args.gradient)
    device = distributed.local_device(_device(args.device))
    group = distributed.process_group(None, device)  # torchrun: one run, many processes
    main = distributed.is_main(group)
    train_full = _load(args.dataset, "train", args.data_root, args.binarize)
    if args.num_train is not None:
        train_full = train_full.subset(min(args.num_train, len(train_full)))
    test = _load(args.dataset, "test", args.data_root, args.binarize)
    train, valid = _split_validation(train_full, args.validation_fraction, args.seed)
    config = saved_config or VAEConfig(
        num_features=int(train.num_features),
        latent_dim=args.latent_dim,
        hidden_dims=tuple(args.hidden_dims),
        activation=args.activation,
        prior=args.prior,
        family=args.family,
        likelihood=args.likelihood,
        image_shape=tuple(train.image_shape),
        options=_parse_options(args.option),
        network=args.network,
    )
    torch.manual_seed(args.seed)
    vae = build_vae(config, num_data=len(train))
    if valid is not None and _local(vae):
        # A per-datapoint family has no parameters for held-out points, so no validation ELBO:
        # it trains on the whole training split instead (and the test estimates fit each point).
        train, valid = train_full, None
        torch.manual_seed(args.seed)
        vae = build_vae(config, num_data=len(train))
    loss = _loss(args.loss, args.num_particles, args.gradient)
    out = args.out or Path("runs") / f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if group is not None:  # rank 0's clock names the folder of all ranks
        out = distributed.broadcast_object(out, group)
    if not resuming and (out / CHECKPOINT_NAME).exists():
        raise ConfigError(f"--out {out} already holds a trained run; continue it with --resume {out} "
                          "or choose another --out")
    if group is not None:  # every rank has checked before rank 0 writes anything
        distributed.barrier(group)
    created = not out.exists()
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {out} ({e.strerror or e}); "
                              "choose a writable --out") from None
    try:
        return _train_into(args, out, config, vae, loss, train, valid, test, device, resuming,
                           group)
    except PyrovaeError:
        # A run refused before its first checkpoint leaves no folder behind.
        if main and created and not (out / CHECKPOINT_NAME).exists():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_into(args: argparse.Namespace, out: Path, config: Any, vae: VAE, loss: Any,
                train: Any, valid: Any, test: Any, device: torch.device, resuming: bool,
                group: Any = None) -> int:
    from . import distributed, plots
    from .checkpoint import CHECKPOINT_NAME, load_train_state, save_config
    from .errors import CheckpointError
    from .training import fit

    main = distributed.is_main(group) if group is not None else True
    world = distributed.world_size(group) if group is not None else 1
    say = print if main else (lambda *a, **k: None)
    cli = {k: getattr(args, k) for k in (*_RUN_OPTIONS, *_OPTIONAL_RUN_OPTIONS)}
    # Remembered so that 'pyrovae evaluate' and 'pyrovae gaps' find the same files.
    cli["data_root"] = str(Path(args.data_root).resolve()) if args.data_root else None
    if main:
        save_config(out, config, cli=cli)
    say(f"pyrovae train: {args.dataset} ({len(train)} train, "
        f"{0 if valid is None else len(valid)} validation, {len(test)} test), "
        f"prior={config.prior} family={config.family} likelihood={config.likelihood} "
        f"latent_dim={config.latent_dim} loss={args.loss} device={device}"
        + (f" processes={world}" if world > 1 else ""))
    say(f"run folder: {out}")
    if valid is None and _local(vae) and args.validation_fraction > 0:
        say(f"no validation split: the {config.family} family holds parameters only for training "
            "datapoints, so it trains on all of them (the test estimates fit each test point's own)")
    if resuming:
        state = load_train_state(out)  # the same TrainState that fit(resume=...) loads
        say(f"resuming from {out / CHECKPOINT_NAME}: epoch {state.epoch + 1}, "
            f"{state.batch} minibatch(es) into it", flush=True)

    def report(epoch: int, history: Any) -> None:
        valid_text = (
            f"  validation ELBO {history.validation_elbo[-1]:9.2f}"
            if history.validation_elbo[-1] is not None else ""
        )
        print(f"epoch {epoch:3d}/{args.epochs}  train {history.objective} "
              f"{history.train_objective[-1]:9.2f}{valid_text}  ({history.epoch_seconds[-1]:.1f} s)",
              flush=True)

    t0 = time.perf_counter()
    try:
        history = fit(
            vae, train, loss=loss, num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            adam_eps=args.adam_eps,
            validation=valid, seed=args.seed, device=device, progress=not args.no_progress,
            beta=args.beta, kl_warmup_epochs=args.kl_warmup, on_epoch_end=report,
            checkpoint_dir=out, checkpoint_every_steps=args.checkpoint_every_steps,
            resume=True if resuming else None, config=config, clip_grad_norm=args.clip_grad_norm,
            process_group=group if group is not None else False, compile=args.compile,
        )
    except CheckpointError as e:
        if str(e).startswith("cannot write checkpoint") and (out / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{e}: {_resume_command(out, world)}") from None
        raise
    train_seconds = time.perf_counter() - t0
    # Every rank scores its share of the test points; rank 0 prints and writes the results.
    # Training is done and checkpointed: a failure from here on is reported in one line, and the
    # metrics measured before it are written (with the traceback) to metrics.json.
    test = _fixed_test_set(test, args.eval_points, args.seed)
    metrics: dict[str, Any] = {}
    stage: list[str] = []
    failure = None
    try:
        _report_estimates(vae, test.to(device), args.num_samples, args.seed,
                          not args.no_progress, check_points=args.check_points,
                          ais_steps=args.ais_steps, ais_chains=args.ais_chains, group=group,
                          compile=args.compile, into=metrics, stage=stage)
    except Exception as e:  # noqa: BLE001 - reported in one line below, traceback kept
        failure = _after_training_failure(e, stage[-1] if stage else "the test estimates", out)
    if not main:
        if failure is not None:
            raise failure[0]
        return 0
    metrics.update(
        dataset=args.dataset, binarize=args.binarize, config=dataclasses.asdict(config),
        loss=args.loss, num_particles=args.num_particles, gradient=args.gradient, beta=args.beta,
        kl_warmup_epochs=args.kl_warmup, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device=str(device), train_seconds=train_seconds,
        clip_grad_norm=args.clip_grad_norm, checkpoint_every_steps=args.checkpoint_every_steps,
        history=history.to_dict(), versions=_versions(),
    )
    if failure is not None:
        metrics["failure"] = failure[1]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if failure is not None:
        raise failure[0]

    two_d = ""
    try:
        shape = config.image_shape
        x = test[torch.arange(min(32, len(test)))][0].to(device)
        plots.sample_grid(vae, shape, path=out / "samples.png", scale=3)
        plots.reconstruction_grid(vae, x, shape, path=out / "reconstructions.png", scale=3)
        plots.plot_history(history, path=out / "training_curve.png", title=f"{args.dataset}")
        if config.latent_dim == 2:
            plots.latent_manifold(vae, shape, path=out / "manifold.png")
            _latent_pictures(vae, test, shape, out, device)
            two_d = " manifold.png latent_scatter.png interpolation.png"
    except Exception as e:  # noqa: BLE001
        error, record = _after_training_failure(e, "the pictures", out)
        metrics["failure"] = record
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        raise error from None
    print(f"wrote {out}/: metrics.json config.json checkpoint.pt samples.png reconstructions.png "
          f"(odd rows: test images, even rows: their reconstructions) training_curve.png{two_d}")
    print(f"next: pyrovae evaluate {out} (K=5000, or --estimator ais) | pyrovae sample {out} | "
          f"pyrovae gaps {out} | pyrovae bdmc {out}")
    return 0


def _after_training_failure(exc: Exception, stage: str, out: Path) -> tuple[Exception, dict[str, Any]]:
    """A failure after training as ``(one-line error to raise, record for metrics.json)``.

    The error says what failed and where the trained model and the metrics are; the record keeps
    the stage, the exception and its traceback. A pyrovae error keeps its own message."""
    import traceback

    from .errors import PyrovaeError, TrainingError

    first = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    what = first if isinstance(exc, PyrovaeError) else f"{type(exc).__name__}: {first}"
    record = {"stage": stage, "error": what,
              "traceback": "".join(traceback.format_exception(exc)).splitlines()}
    message = (f"training finished and checkpoint.pt is saved, but computing {stage} failed "
               f"({what}); the metrics measured before it and the traceback are in {out}/metrics.json; "
               f"measure the run again with: pyrovae evaluate {out}")
    return TrainingError(message), record


@torch.no_grad()
def _latent_pictures(vae: VAE, test: Any, shape: Any, out: Path, device: torch.device) -> None:
    """For a 2-D latent space: the test codes coloured by label, and interpolations."""
    from . import plots

    n = min(500, len(test))
    x, idx = test[torch.arange(n)]
    x, idx = x.to(device), torch.as_tensor(idx).to(device)
    vae.eval()
    # the posterior mean of each code, by Monte Carlo (works for every family)
    z = vae.family(x, idx).sample((32,)).mean(0).cpu()
    labels = getattr(test, "labels", None)
    plots.plot_latent_scatter(z, None if labels is None else labels[:n].cpu(),
                              path=out / "latent_scatter.png", title="test codes E[z|x]")
    pairs = min(4, n // 2)
    plots.interpolation_grid(vae, x[:pairs], x[pairs:2 * pairs], shape,
                             path=out / "interpolation.png")


def _resume_command(run: Path, world: int | None = None) -> str:
    """The command line that continues ``run`` (under torchrun with as many processes)."""
    import os

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node={world} -m pyrovae" if world > 1 else "pyrovae"
    return f"{launcher} train --resume {run}"


def _run_options(run: Path, what: str) -> dict[str, Any]:
    """The ``pyrovae train`` options saved in a run folder (refusing other folders)."""
    from .checkpoint import CONFIG_NAME, read_config

    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; pass a run folder written by 'pyrovae train'")
    options = read_config(run).get("cli")
    if not isinstance(options, dict) or "dataset" not in options:
        raise ConfigError(
            f"{run / CONFIG_NAME} names no dataset (the run was not written by 'pyrovae "
            f"train'); {what} it in Python with pyrovae.load_model"
        )
    return options


def _unused_path(path: Path) -> Path:
    """``path``, or ``stem-2.ext``, ``stem-3.ext``, ... : never overwrite an earlier result."""
    k = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def _evaluate(args: argparse.Namespace) -> int:
    """``pyrovae evaluate``; under ``torchrun`` the ranks split the test points (the values equal
    one process's for the same seed), rank 0 alone prints and writes."""
    return _in_process_group(_evaluate_run, args)


def _evaluate_run(args: argparse.Namespace) -> int:
    from . import distributed
    from .checkpoint import load_model

    _check_numbers(args)
    if args.compile and args.estimator != "is":
        raise ConfigError("--compile compiles importance sampling's weights; AIS runs through "
                          "Pyro's tracing: drop --compile or use --estimator is")
    options = _run_options(args.run, "evaluate")
    device = distributed.local_device(_device(args.device))
    group = distributed.process_group(None, device)
    say = _printer(group)
    vae = load_model(args.run, device=device)
    test = _load(options["dataset"], args.split, args.data_root or options.get("data_root"),
                 options.get("binarize"))
    test = _fixed_test_set(test, args.eval_points, args.seed).to(device)
    processes = f", {distributed.world_size(group)} processes" if group is not None else ""
    say(f"pyrovae evaluate: {args.run} on {options['dataset']} {args.split} ({len(test)} points, "
        f"{args.estimator}{processes})")
    progress = not args.no_progress
    if args.estimator == "ais":
        from .ais import ais

        t0 = time.perf_counter()
        result = ais(vae, test, num_intermediate=args.ais_steps, num_chains=args.ais_chains,
                     leapfrog_steps=args.leapfrog_steps, **_ais_start(vae),
                     options=EstimateOptions(seed=args.seed, progress=progress,
                                             process_group=group or False))
        say(f"test log-likelihood  {result.mean:9.2f} ± {result.stderr:.2f} nats (AIS, "
            f"T={args.ais_steps}, {args.ais_chains} chains, {args.leapfrog_steps} leapfrog "
            f"steps, acceptance {float(result.acceptance.mean()):.2f}, n={len(result.values)})")
        why = result.why_not_finite()
        if why:
            say(f"  not finite: {why}")
        metrics = {"test_log_likelihood": result.to_dict(args.per_datapoint),
                   "evaluation_seconds": time.perf_counter() - t0}
        name = f"evaluation-{args.split}-ais-T{args.ais_steps}"
    else:
        metrics = _report_estimates(vae, test, args.num_samples, args.seed, progress,
                                    check_points=args.check_points, ais_steps=args.ais_steps,
                                    ais_chains=args.ais_chains, group=group,
                                    per_datapoint=args.per_datapoint, compile=args.compile)
        name = f"evaluation-{args.split}-is-K{args.num_samples}"
    if group is not None and not distributed.is_main(group):
        return 0
    metrics.update(estimator=args.estimator, split=args.split, seed=args.seed,
                   eval_points=len(test), versions=_versions())
    path = _unused_path(args.run / f"{name}.{args.format}")
    if args.format == "json":
        path.write_text(json.dumps(metrics, indent=2) + "\n")
    else:
        _write_csv(path, metrics)
    print(f"wrote {path}")
    return 0


def _write_csv(path: Path, metrics: dict[str, Any]) -> None:
    """One row per datapoint (``--per-datapoint``) or one summary row, with a header."""
    import csv

    ll = metrics["test_log_likelihood"]
    per = ll.get("per_datapoint")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if per:
            columns = [k for k, v in per.items() if isinstance(v, list)]
            writer.writerow(["index", *columns])
            for i in range(len(per[columns[0]])):
                writer.writerow([i, *(per[c][i] for c in columns)])
        else:
            keys = [k for k, v in ll.items() if not isinstance(v, (dict, list))]
            writer.writerow(keys)
            writer.writerow([ll[k] for k in keys])


def _sample(args: argparse.Namespace) -> int:
    from . import plots
    from .checkpoint import load_model

    _check_numbers(args)
    if args.scale < 1:
        raise ConfigError(f"--scale must be a positive integer, got {args.scale}")
    _run_options(args.run, "sample")
    vae = load_model(args.run, device=_device(args.device))
    shape = getattr(getattr(vae, "config", None), "image_shape", None)
    if not shape:
        raise ConfigError(f"{args.run}: the model has no image shape to draw; use vae.sample() in Python")
    out = args.out or _unused_path(args.run / f"samples-seed{args.seed}.png")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: write a .png file")
    torch.manual_seed(args.seed)
    plots.sample_grid(vae, shape, num_samples=args.num_samples, nrow=min(8, args.num_samples),
                      path=out, scale=args.scale)
    print(f"wrote {out} ({args.num_samples} samples, seed {args.seed})")
    return 0


def _bdmc(args: argparse.Namespace) -> int:
    from .ais import bdmc
    from .checkpoint import load_model

    _check_numbers(args)
    _run_options(args.run, "run BDMC on")
    device = _device(args.device)
    vae = load_model(args.run, device=device)
    print(f"pyrovae bdmc: {args.run}: {args.points} datapoints simulated from the model, "
          f"T={args.ais_steps}, {args.ais_chains} chains", flush=True)
    t0 = time.perf_counter()
    result = bdmc(vae, args.points, num_intermediate=args.ais_steps, num_chains=args.ais_chains,
                  leapfrog_steps=args.leapfrog_steps, is_samples=tuple(args.is_samples),
                  **_ais_start(vae), options=EstimateOptions(
                      seed=args.seed, progress=not args.no_progress, local=_local(vae)))
    print(result)
    report = {**result.to_dict(), "seconds": time.perf_counter() - t0, "seed": args.seed,
              "versions": _versions()}
    path = _unused_path(args.run / f"bdmc-T{args.ais_steps}-n{args.points}.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


def _gaps(args: argparse.Namespace) -> int:
    from .checkpoint import CONFIG_NAME, load_model, read_config
    from .diagnostics import diagnose
    from .gaps import gaps
    from .plots import plot_gaps

    device = _device(args.device)
    if args.mi_batch_size is not None and args.mi_batch_size < 2:
        raise ConfigError(f"--mi-batch-size must be >= 2 (batch_size must be >= 2), "
                          f"got {args.mi_batch_size}; omit it for the exact mixture")
    for run in args.runs:  # check every folder before the long computation
        if not run.is_dir():
            raise ConfigError(f"{run} is not a folder; pass run folders written by 'pyrovae train'")
        options = read_config(run).get("cli")
        if not isinstance(options, dict) or "dataset" not in options:
            raise ConfigError(
                f"{run / CONFIG_NAME} names no dataset (the run was not written by 'pyrovae "
                "train'); measure it in Python with pyrovae.load_model and pyrovae.gaps"
            )
        family = (read_config(run).get("vae") or {}).get("family")
        if family == "local":
            raise ConfigError(
                f"{run} was trained with --family local, which has no encoder (it fits "
                "parameters per datapoint), so there is no amortization gap to split off; "
                f"'pyrovae evaluate {run}' gives its log-likelihood"
            )
    out = args.out or (
        args.runs[0] if len(args.runs) == 1
        else Path("runs") / f"gaps-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    labels = [run.resolve().name for run in args.runs]
    results, report = [], {}
    for run, label in zip(args.runs, labels):
        options = read_config(run)["cli"]
        vae = load_model(run, device=device)
        test = _load(options["dataset"], "test", args.data_root or options.get("data_root"),
                     options.get("binarize"))
        test = _fixed_test_set(test, args.eval_points, args.seed).to(device)
        print(f"pyrovae gaps: {run} on {options['dataset']} test ({len(test)} points, "
              f"K={args.num_samples})", flush=True)
        t0 = time.perf_counter()
        result = gaps(vae, test, num_samples=args.num_samples,
                      num_elbo_samples=args.num_elbo_samples, num_steps=args.num_steps,
                      log_px=args.estimator, ais_options=_gaps_ais_options(args),
                      options=EstimateOptions(seed=args.seed, progress=not args.no_progress))
        diagnostics = diagnose(vae, test, seed=args.seed, mi_batch_size=args.mi_batch_size,
                               progress=not args.no_progress)
        results.append(result)
        report[label] = {
            "run": str(run), "dataset": options["dataset"], "gaps": result.to_dict(),
            "diagnostics": diagnostics.to_dict(), "seconds": time.perf_counter() - t0,
        }
    _print_gap_table(labels, report)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"eval_points": args.eval_points, "num_samples": args.num_samples,
                "num_elbo_samples": args.num_elbo_samples, "num_steps": args.num_steps,
                "seed": args.seed, "split": "test", "mi_batch_size": args.mi_batch_size}
    (out / "gaps.json").write_text(json.dumps(
        {"settings": settings, "runs": report, "versions": _versions()}, indent=2) + "\n")
    plot_gaps(results, path=out / "gaps.png", labels=labels)
    print(f"wrote {out}/: gaps.json gaps.png")
    return 0


def _gaps_ais_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``pyrovae gaps``'s AIS flags as :func:`pyrovae.gaps`'s ``ais_options`` (``None``: its own)."""
    options = {}
    for flag, name in (("ais_steps", "num_intermediate"), ("ais_chains", "num_chains")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, "
                                  f"got {value}")
            options[name] = value
    return options or None


def _print_gap_table(labels: list[str], report: dict[str, Any]) -> None:
    width = max(12, *(len(label) for label in labels))
    columns = (("log_px", "log p(x)"), ("elbo_optimal", "L[q*]"), ("elbo_amortized", "L[q]"),
               ("approximation_gap", "approx. gap"), ("amortization_gap", "amort. gap"))
    print(f"{'run':<{width}}" + "".join(f"{name:>17}" for _, name in columns)
          + f"{'k-hat>0.7':>11}")
    for label in labels:
        g = report[label]["gaps"]
        if g.get("estimator_failure"):  # never printed as a result
            print(f"{label:<{width}}  estimator failure: {g['estimator_failure']}")
            continue
        share = g["khat_above_0.7_share"]
        cells = "".join(f"{g[k]['mean']:>10.2f} ± {g[k]['stderr']:<4.2f}" for k, _ in columns)
        print(f"{label:<{width}}{cells}{'n/a' if share is None else f'{100 * share:.1f}%':>11}"
              f"  (log p(x) by {g.get('log_px_estimator', 'is').upper()})")
        if g.get("unresolved"):
            print(f"{label:<{width}}  unresolved: {g['unresolved']}")
    print("nats per datapoint, ± standard error over datapoints; approximation gap = log p(x) - "
          "L[q*], amortization gap = L[q*] - L[q]")
    print(f"{'run':<{width}}{'active units':>14}{'KL(q(z|x)||p(z))':>19}{'I(x;z)':>15}"
          f"{'KL(q(z)||p(z))':>17}")
    for label in labels:
        d = report[label]["diagnostics"]
        au, kl, agg = d["active_units"], d["kl"], d["aggregate_posterior"]
        mi, marginal = ((f"{agg['mutual_information']['mean']:>15.2f}",
                         f"{agg['marginal_kl']['mean']:>17.2f}") if agg is not None
                        else (f"{'n/a':>15}", f"{'n/a':>17}"))
        print(f"{label:<{width}}{au['count']:>9d} / {au['latent_dim']:<2d}{kl['total']:>19.2f}"
              f"{mi}{marginal}")
    print("I(x;z) + KL(q(z)||p(z)) = average KL (Hoffman & Johnson 2016); I(x;z) <= log N"
          + ("; n/a: the family evaluates q(z|x) only at its own samples (planar, radial)"
             if any(report[label]["diagnostics"]["aggregate_posterior"] is None
                    for label in labels) else ""))


def _versions() -> dict[str, str]:
    import pyro

    from . import __version__

    return {"pyrovae": __version__, "torch": torch.__version__, "pyro": pyro.__version__,
            "python": platform.python_version()}


#: The library's errors name Python arguments; on the command line they are flags.
_CLI_WORDS = (
    (r"\(e\.g\. binarize='dynamic' in pyrovae\.data, or torch\.bernoulli\(x\)\)",
     "(--binarize dynamic)"),
    (r"binarize='(\w+)'", r"--binarize \1"),
    (r"\(ContinuousBernoulli or Gaussian\)",
     "(--likelihood continuous_bernoulli or --likelihood gaussian)"),
    (r"binarize=None", "--binarize none"),
    (r"\broot=\.\.\.", "--data-root DIR"),
    (r"\bpass root=", "pass --data-root "),
)


def _speak_cli(message: str) -> str:
    """One line, with the library's argument names replaced by the CLI's flags."""
    import re

    message = " ".join(message.split())
    for pattern, flag in _CLI_WORDS:
        message = re.sub(pattern, flag, message)
    return message


def _show_warning(message: Any, category: Any, filename: str, lineno: int,
                  file: Any = None, line: Any = None) -> None:
    print(f"pyrovae: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the command that :func:`pyrovae.cli.build_parser` parsed into ``args``; return the exit
    status (0 done, 1 an operating-system error, 2 a pyrovae error, 75 preempted, 130 Ctrl-C)."""
    import warnings

    warnings.showwarning = _show_warning
    from .training import EXIT_PREEMPTED, Preempted

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "gaps":
            return _gaps(args)
        if args.command == "bdmc":
            return _bdmc(args)
        if args.command == "sample":
            return _sample(args)
        return _evaluate(args)
    except Preempted as e:  # SIGTERM: a checkpoint was written; exit so the scheduler requeues
        import os

        run = e.checkpoint.parent if e.checkpoint is not None else None
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"pyrovae {args.command}: preempted: {' '.join(str(e).split(';')[0].split())}; "
                  f"checkpoint written; resume with: {_resume_command(run)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except PyrovaeError as e:
        print(f"pyrovae {args.command}: error: {_speak_cli(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk, ...
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130

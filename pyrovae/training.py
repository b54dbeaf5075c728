r"""Training by stochastic variational inference (AEVB, Kingma & Welling 2014).

Each step draws a minibatch ``(x, idx)``, evaluates a Pyro loss on ``vae.model`` and ``vae.guide``
(the ``"data"`` plate scales it to the whole training set, so it is an unbiased estimate of the
full-data negative ELBO) and takes one optimizer step on its reparameterized gradient.

Reliability (see ``docs/reliability.md``): with ``checkpoint_dir`` set, :func:`fit` writes an atomic
checkpoint after every epoch (and every ``checkpoint_every_steps`` steps) and ``resume=`` continues
from it, bit-for-bit as if never interrupted: each epoch's minibatch order is drawn from a generator
seeded by ``(seed, epoch)``, and every global RNG state is saved with the checkpoint. A step whose
loss or gradient is NaN or infinite is skipped (a :class:`~pyrovae.errors.NumericalWarning`);
``max_bad_steps`` of them in a row stop training with :class:`~pyrovae.errors.TrainingError`.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from ._batching import as_dataset
from ._checks import check_positive_float, check_positive_int, to_device
from .errors import CheckpointError, ConfigError, DataError, NumericalWarning, TrainingError
from .importance import elbo as elbo_estimate

__all__ = ["History", "fit"]


@dataclass
class History:
    """What :func:`fit` measured, one entry per epoch.

    :ivar train_elbo: the training objective per datapoint (nats), averaged over the epoch's
        minibatches: the ELBO for ``Trace_ELBO`` (with ``beta=1`` and no warm-up; else the
        KL-weighted objective), the IWAE bound for ``RenyiELBO(alpha=0)``. Skipped (non-finite)
        steps are left out of the average.
    :ivar validation_elbo: the validation ELBO per datapoint (nats), or ``None`` without
        validation data.
    :ivar epoch_seconds: wall time of each epoch (validation excluded).
    :ivar num_steps: minibatch steps in all, including skipped ones.
    :ivar skipped_steps: steps whose update was skipped because the loss or a gradient was NaN
        or infinite.
    :ivar resumed_at_step: the step counts at which training was resumed from a checkpoint.
    """

    train_elbo: list[float] = field(default_factory=list)
    validation_elbo: list[float | None] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    num_steps: int = 0
    skipped_steps: int = 0
    resumed_at_step: list[int] = field(default_factory=list)

    @property
    def num_epochs(self) -> int:
        return len(self.train_elbo)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _resolve_device(vae: torch.nn.Module, device: Any) -> torch.device:
    if device is None:
        p = next(iter(vae.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for but CUDA is not available; use 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA "
            "device(s); use 'cuda:0'"
        )
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"cannot train on device {device}; use 'cpu' or 'cuda'")
    return device


def _check_dataset(vae: Any, dataset: Any, what: str, device: torch.device) -> None:
    """Run :meth:`VAE.check_data` over the whole data set before any training starts."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{what} is empty; pass at least one datapoint")
    for start in range(0, n, 8192):
        try:
            x, _ = dataset[torch.arange(start, min(start + 8192, n))]
        except (TypeError, ValueError) as e:
            raise DataError(
                f"{what} must serve (x, idx) pairs for a list of indices, but indexing it failed "
                f"({e}); use a tensor or pyrovae.data.load_dataset"
            ) from None
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        vae.check_data(to_device(x, device, what), what)


# --------------------------------------------------------------------------- reproducible order
def _epoch_order(num_data: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s minibatch order: a permutation drawn from a generator seeded by
    ``(seed, epoch)``, so that a resumed run can redraw it without any saved state."""
    g = torch.Generator()
    g.manual_seed(hash((seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(num_data, generator=g)


def _rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain data (safe for ``weights_only`` loading)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


def _minibatches(dataset: Any, order: Any) -> Any:
    """Yield ``(x, idx)`` for each index tensor in ``order``, one gather each."""
    for batch in order:
        x, idx = dataset[batch]
        yield torch.as_tensor(x), torch.as_tensor(idx)


def _settle_plate_nesting(loss: ELBO, vae: Any, dataset: Any, device: torch.device) -> None:
    """Let a vectorized loss guess ``max_plate_nesting`` now, on a forked RNG. Pyro guesses it by
    running model and guide at the first step, drawing from the global RNG; doing that inside a
    resumed run would shift every later draw."""
    guess = getattr(loss, "_guess_max_plate_nesting", None)
    if (
        guess is None
        or not getattr(loss, "vectorize_particles", False)
        or getattr(loss, "max_plate_nesting", 0) != math.inf
    ):
        return
    x, idx = dataset[torch.arange(min(2, len(dataset)))]
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        state = (random.getstate(), np.random.get_state())
        try:
            guess(vae.model, vae.guide, (torch.as_tensor(x).to(device), torch.as_tensor(idx).to(device)), {})
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


# ------------------------------------------------------------------------------ numerical faults
def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch and device have it (one kernel for all
    parameters instead of one small op per tensor: ~2 ms per step of a 784-400-400-50 VAE on a
    CPU), else the default implementation. Both compute the same update."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _needs_param_sites(loss: Any) -> bool:
    """Whether ``loss`` finds what to differentiate through the trace's "param" sites."""
    from pyro.infer import JitTraceMeanField_ELBO, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

    if isinstance(loss, (JitTrace_ELBO, JitTraceMeanField_ELBO)):
        return True
    return not isinstance(loss, (Trace_ELBO, TraceMeanField_ELBO))


def _grad_norm(params: list[torch.Tensor], clip_grad_norm: float | None) -> float:
    """The total gradient 2-norm (one fused reduction), clipping first if asked; inf/NaN if any
    gradient is not finite."""
    if clip_grad_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    return float(torch.linalg.vector_norm(torch.stack(norms)))


# ----------------------------------------------------------------------------------- checkpoints
def _resume_state(
    resume: Any, checkpoint_dir: Path | None, vae: Any, optimizer: torch.optim.Optimizer,
    settings: dict[str, Any],
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Load the checkpoint named by ``resume`` into ``vae`` and ``optimizer``; return its path,
    training state and history, after checking it can continue this run."""
    from .checkpoint import checkpoint_path, load_checkpoint

    if resume is True:
        if checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir=; or pass resume=<run folder or checkpoint file>")
        path = checkpoint_path(checkpoint_dir)
    elif isinstance(resume, (str, os.PathLike)):
        path = checkpoint_path(resume)
    else:
        raise ConfigError(
            f"resume must be True, False/None or a path to a run folder or checkpoint, got {resume!r}"
        )
    ckpt = load_checkpoint(path, vae=vae, optimizer=optimizer)
    state = ckpt.get("training_state")
    required = ("epoch", "batch", "seed", "rng", "partial", "bad_streak", "settings")
    if not isinstance(state, dict) or any(k not in state for k in required) or not isinstance(
        ckpt.get("history"), dict
    ):
        raise CheckpointError(
            f"checkpoint {path} holds no training state; resume needs a checkpoint written by "
            "pyrovae.fit(checkpoint_dir=...)"
        )
    saved = state["settings"]
    if saved.get("num_data") != settings["num_data"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on {saved.get('num_data')} datapoints but train has "
            f"{settings['num_data']}; resume with the same training data"
        )
    if state["batch"] > 0 and saved.get("batch_size") != settings["batch_size"]:
        raise CheckpointError(
            f"checkpoint {path} stopped inside an epoch trained with batch_size="
            f"{saved.get('batch_size')}; resume with batch_size={saved.get('batch_size')}"
        )
    return path, state, ckpt["history"]


def _training_state(
    epoch: int, batch: int, seed: int, partial: tuple[float, int, float], bad_streak: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    total, count, seconds = partial
    return {
        "epoch": epoch,  # the epoch in progress (0-based); == epochs completed when batch == 0
        "batch": batch,  # minibatches of that epoch already consumed
        "seed": seed,
        "rng": _rng_state(),
        "partial": {"total": float(total), "count": int(count), "seconds": float(seconds)},
        "bad_streak": bad_streak,
        "settings": settings,
    }


# ------------------------------------------------------------------------------------------- fit
def fit(
    vae: Any,
    train: Any,
    *,
    loss: ELBO | None = None,
    num_epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    validation: Any = None,
    seed: int | None = 0,
    device: Any = None,
    progress: bool = True,
    beta: float = 1.0,
    kl_warmup_epochs: float = 0.0,
    on_epoch_end: Callable[[int, History], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every_steps: int | None = None,
    resume: bool | str | os.PathLike[str] | None = None,
    config: Any = None,
    clip_grad_norm: float | None = None,
    max_bad_steps: int = 5,
) -> History:
    r"""Train ``vae`` by SVI on minibatches of ``train``.

    :param vae: a :class:`~pyrovae.VAE` built with ``num_data == len(train)``.
    :param train: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``
        pairs, such as :func:`pyrovae.data.load_dataset` returns.
    :param loss: any Pyro ELBO: ``Trace_ELBO()`` (default), ``TraceMeanField_ELBO()`` (analytic
        KL), ``RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)`` (IWAE).
    :param num_epochs: passes over ``train`` in all (a resumed run counts the epochs already done).
    :param batch_size: datapoints per minibatch (at most ``len(train)``).
    :param lr: Adam's learning rate (a resumed run keeps the checkpoint's).
    :param validation: optional held-out data; its ELBO per datapoint is measured every epoch.
    :param seed: seeds Pyro and torch (every draw) and the minibatch order (epoch ``e`` uses a
        permutation seeded by ``(seed, e)``); ``None`` draws a seed from the global RNG. A resumed
        run uses the checkpoint's seed and RNG states.
    :param device: where to train (default: where the model is). The model is moved there.
    :param progress: show a tqdm progress bar with the running ELBO per datapoint.
    :param beta: weight on the KL term, :math:`E_q[\log p(x|z)] - \beta\,KL(q\|p)` (beta-VAE;
        Higgins et al. 2017). It scales the ``"z"`` site in model and guide; the validation ELBO
        and every log-likelihood are always of the unweighted model.
    :param kl_warmup_epochs: raise the KL weight linearly from 0 to ``beta`` over this many epochs
        (Sønderby et al. 2016); 0 disables warm-up.
    :param on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each epoch (``epoch``
        counts from 1), e.g. to print progress or save pictures.
    :param checkpoint_dir: a run folder: ``checkpoint.pt`` is written there atomically after
        every epoch (after ``on_epoch_end``), and ``config.json`` once if a config is known.
    :param checkpoint_every_steps: also write a checkpoint every this many steps (mid-epoch).
    :param resume: ``True`` to continue from ``checkpoint_dir``'s checkpoint, or the path of a
        run folder or checkpoint file (checkpoints then go on being written to ``checkpoint_dir``,
        by default that folder). The model and optimizer state, the position in the epoch, the
        RNG states and the history are restored, so the run ends exactly as an uninterrupted one.
    :param config: the :class:`~pyrovae.build.VAEConfig` the model was built from (default:
        ``vae.config`` if set), saved so that :func:`pyrovae.load_model` can rebuild the model.
    :param clip_grad_norm: if set, clip the total gradient 2-norm to this value every step.
    :param max_bad_steps: a step whose loss or gradient is NaN or infinite is skipped (parameters
        unchanged, a :class:`~pyrovae.errors.NumericalWarning`); this many in a row raise
        :class:`~pyrovae.errors.TrainingError` (the last checkpoint stays as it was).
    :returns: a :class:`History`.
    :raises ConfigError, DataError, CheckpointError, TrainingError: see :mod:`pyrovae.errors`.

    The optimizer is one ``torch.optim.Adam`` over all parameters (Pyro's ``pyro.optim.Adam``
    keeps one optimizer per tensor and is slower); the loss is Pyro's.
    """
    num_epochs = check_positive_int(num_epochs, "num_epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_float(lr, "lr")
    beta = check_positive_float(beta, "beta")
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, (int, float)) or not (
        0 <= kl_warmup_epochs < math.inf
    ):
        raise ConfigError(f"kl_warmup_epochs must be a number >= 0, got {kl_warmup_epochs!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise ConfigError(f"on_epoch_end must be callable, got {type(on_epoch_end).__name__}")
    if checkpoint_every_steps is not None:
        checkpoint_every_steps = check_positive_int(checkpoint_every_steps, "checkpoint_every_steps")
    if clip_grad_norm is not None:
        clip_grad_norm = check_positive_float(clip_grad_norm, "clip_grad_norm")
    max_bad_steps = check_positive_int(max_bad_steps, "max_bad_steps")
    ckpt_dir: Path | None = None
    if checkpoint_dir is not None:
        if isinstance(checkpoint_dir, bool) or not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise ConfigError(f"checkpoint_dir must be a folder path, got {checkpoint_dir!r}")
        ckpt_dir = Path(checkpoint_dir)
        if ckpt_dir.exists() and not ckpt_dir.is_dir():
            raise ConfigError(f"checkpoint_dir {ckpt_dir} is a file; pass a folder")
    elif checkpoint_every_steps is not None:
        raise ConfigError("checkpoint_every_steps needs checkpoint_dir=<run folder>")
    if loss is None:
        loss = Trace_ELBO()
    if not isinstance(loss, ELBO):
        raise ConfigError(
            f"loss must be a Pyro ELBO such as pyro.infer.Trace_ELBO(), got {type(loss).__name__}"
        )
    if not isinstance(vae, torch.nn.Module) or not all(
        hasattr(vae, a) for a in ("model", "guide", "check_data")
    ):
        raise ConfigError(f"vae must be a pyrovae.VAE, got {type(vae).__name__}")
    num_data = getattr(vae, "num_data", None)
    train_set = as_dataset(train, "train")
    if num_data != len(train_set):
        raise ConfigError(
            f"the VAE was built with num_data={num_data} but train has {len(train_set)} "
            f"datapoints; build it with num_data={len(train_set)} so the plate scales correctly"
        )
    if batch_size > len(train_set):
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {len(train_set)} training datapoints; "
            f"use batch_size <= {len(train_set)}"
        )
    device = _resolve_device(vae, device)
    vae.to(device)
    _check_dataset(vae, train_set, "train", device)
    valid_set = None
    if validation is not None:
        valid_set = as_dataset(validation, "validation")
        _check_dataset(vae, valid_set, "validation", device)

    if seed is not None:
        pyro.set_rng_seed(seed)
    run_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed

    params = [p for p in vae.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the VAE has no trainable parameters")
    optimizer = _adam(params, lr)
    # Losses with a differentiable_loss (Trace_ELBO, TraceMeanField_ELBO, JitTrace_ELBO) give a
    # tensor to backpropagate; the rest (RenyiELBO) backpropagate inside loss_and_grads.
    differentiable = hasattr(loss, "differentiable_loss")
    if config is None:
        config = getattr(vae, "config", None)

    n = len(train_set)
    steps_per_epoch = math.ceil(n / batch_size)
    settings = {"batch_size": batch_size, "num_data": n, "loss": type(loss).__name__}
    history = History()
    start_epoch, start_batch, partial, bad_streak = 0, 0, (0.0, 0, 0.0), 0
    if resume not in (None, False):
        resume_path, state, saved_history = _resume_state(resume, ckpt_dir, vae, optimizer, settings)
        if ckpt_dir is None:
            ckpt_dir = resume_path.parent
        history = History.from_dict(saved_history)
        history.resumed_at_step.append(history.num_steps)
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        run_seed = int(state["seed"])
        p = state["partial"]
        partial = (float(p["total"]), int(p["count"]), float(p["seconds"]))
        bad_streak = int(state["bad_streak"])
        _set_rng_state(state["rng"])
    if ckpt_dir is not None:
        from .checkpoint import _remove_stale_temporaries, save_checkpoint, save_config

        ckpt_file = ckpt_dir / "checkpoint.pt"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(ckpt_file)
        if config is not None:
            save_config(ckpt_dir, config)

    def write_checkpoint(epoch: int, batch: int, partial: tuple[float, int, float]) -> None:
        if ckpt_dir is not None:
            save_checkpoint(
                ckpt_dir, vae, optimizer, history=history, config=config,
                training_state=_training_state(epoch, batch, run_seed, partial, bad_streak, settings),
            )

    vae.train()
    _settle_plate_nesting(loss, vae, train_set, device)
    # The optimizer holds the parameters, so the param store needs them only for losses that
    # look for "param" sites (loss_and_grads, the JIT): skip pyro.module's per-step cost otherwise.
    registered = vae._register
    vae._register = _needs_param_sites(loss)
    try:
        for epoch in range(start_epoch, num_epochs):
            first = start_batch if epoch == start_epoch else 0
            total, count, seconds = partial if first else (0.0, 0, 0.0)
            # Minibatches are gathered directly (a DataLoader iterator would draw a seed from the
            # global RNG at each epoch's start, which a mid-epoch resume could not replay).
            order = _epoch_order(n, run_seed, epoch).split(batch_size)[first:]
            start = time.perf_counter() - seconds
            bar = tqdm(
                _minibatches(train_set, order),
                desc=f"epoch {epoch + 1}/{num_epochs}",
                disable=not progress,
                leave=False,
                unit="batch",
                total=steps_per_epoch,
                initial=first,
            )
            with pyro.validation_enabled(False):
                for step, (x, idx) in enumerate(bar, start=first):
                    # Warm-up counts this step as done, so the first weight is > 0 (a zero scale
                    # is refused by poutine.scale).
                    progress_epochs = epoch + (step + 1) / steps_per_epoch
                    warm = min(1.0, progress_epochs / kl_warmup_epochs) if kl_warmup_epochs else 1.0
                    vae.kl_weight = beta * warm
                    x = x.to(device, non_blocking=True)
                    idx = idx.to(device, non_blocking=True)
                    if differentiable:
                        value_t = loss.differentiable_loss(vae.model, vae.guide, x, idx)
                        value = value_t.item()
                        if math.isfinite(value):
                            value_t.backward()
                    else:
                        value = loss.loss_and_grads(vae.model, vae.guide, x, idx)
                    history.num_steps += 1
                    if math.isfinite(value) and math.isfinite(_grad_norm(params, clip_grad_norm)):
                        optimizer.step()
                        bad_streak = 0
                        # The loss estimates -ELBO of the whole training set: per datapoint, / num_data.
                        total += -value / num_data * len(idx)
                        count += len(idx)
                    else:
                        bad_streak += 1
                        history.skipped_steps += 1
                        what = f"loss {value}" if not math.isfinite(value) else "a non-finite gradient"
                        warnings.warn(
                            f"step {history.num_steps} (epoch {epoch + 1}) had {what}; its update was "
                            f"skipped ({bad_streak} in a row, training stops at {max_bad_steps})",
                            NumericalWarning,
                            stacklevel=2,
                        )
                        if bad_streak >= max_bad_steps:
                            where = f"; the last checkpoint in {ckpt_dir} is intact" if ckpt_dir else ""
                            raise TrainingError(
                                f"{bad_streak} steps in a row (up to step {history.num_steps}) had a "
                                f"NaN or infinite loss or gradient{where}; lower the learning rate "
                                f"(lr={optimizer.param_groups[0]['lr']}) or set clip_grad_norm"
                            )
                    optimizer.zero_grad(set_to_none=True)
                    if progress and history.num_steps % 10 == 0 and count:
                        bar.set_postfix(elbo=f"{total / count:.2f}")
                    if (
                        checkpoint_every_steps is not None
                        and history.num_steps % checkpoint_every_steps == 0
                        and step + 1 < steps_per_epoch
                    ):
                        write_checkpoint(epoch, step + 1, (total, count, time.perf_counter() - start))
            bar.close()
            vae.kl_weight = 1.0
            history.epoch_seconds.append(time.perf_counter() - start)
            history.train_elbo.append(total / count if count else math.nan)
            if valid_set is not None:
                history.validation_elbo.append(elbo_estimate(vae, valid_set, 1).mean)
                vae.train()
            else:
                history.validation_elbo.append(None)
            if not math.isfinite(history.train_elbo[-1]):
                raise TrainingError(
                    f"the training ELBO became {history.train_elbo[-1]} in epoch {epoch + 1}; "
                    "lower the learning rate"
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, history)
            write_checkpoint(epoch + 1, 0, (0.0, 0, 0.0))
    finally:
        vae.kl_weight = 1.0
        vae._register = registered
    return history

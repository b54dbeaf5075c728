r"""Checkpoints: write them atomically, read them without ever running code.

A checkpoint is one file holding plain data only: tensors, numbers, strings, lists and dicts.

- the model's ``state_dict`` and a description of the model (parameter names and shapes, the
  class name, ``num_data`` and, when known, the :class:`~pyrovae.build.VAEConfig` as a dict), so
  that a checkpoint of another model is refused with the mismatching parameters named;
- the optimizer's ``state_dict``;
- for :func:`pyrovae.fit`, where training stands: epoch, position inside the epoch, global step,
  every random number generator's state (torch CPU and CUDA, Python's ``random``, NumPy's global
  generator and the minibatch-order generator), the :class:`~pyrovae.History` so far, and the
  options it was started with.

**Writing** goes to a temporary file in the same folder, which is flushed and ``fsync``-ed and
then renamed over the old checkpoint with :func:`os.replace` (atomic on POSIX and Windows); the
folder is ``fsync``-ed too. A crash at any moment leaves either the old checkpoint or the new one
in place, never half of one.

**Reading** uses ``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which
rebuilds tensors and builtin containers and refuses every other Python object, so a crafted file
cannot run code. Every problem (missing file, truncated or corrupted file, a file that is not a
pyrovae checkpoint, an unsafe file, a checkpoint of another model) raises
:class:`~pyrovae.errors.CheckpointError` with a one-line message.

A *run folder* (what ``fit(checkpoint_dir=...)`` and ``pyrovae train`` write) holds
``checkpoint.pt`` (the latest checkpoint) and, when the model was built from a
:class:`~pyrovae.build.VAEConfig`, ``config.json``: ``{"vae": <the VAEConfig>, ...}`` plus
whatever else describes the run (``pyrovae train`` adds its data and training options, which
``pyrovae train --resume`` reuses). :func:`load_model` rebuilds the trained model from it; it is
the one loading path, for the library and the CLI alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # for annotations only (no import cycle at run time)
    from .vae import VAE

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "load_model",
    "save_config",
    "read_config",
    "checkpoint_path",
    "save_train_state",
    "load_train_state",
]

#: File name of the latest checkpoint inside a run folder.
CHECKPOINT_NAME = "checkpoint.pt"
#: File name of the model configuration (a :class:`~pyrovae.build.VAEConfig` as JSON).
CONFIG_NAME = "config.json"
_FORMAT = "pyrovae-checkpoint"
_VERSION = 1
_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------- paths
def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file for ``path``: ``path/checkpoint.pt`` if ``path`` is a folder, else
    ``path`` itself."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(
            f"a checkpoint path must be a string or os.PathLike, got {type(path).__name__}"
        )
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def _stale_temporaries(target: Path) -> list[Path]:
    """Temporary files a crashed writer of ``target`` may have left behind."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.*{_TMP_SUFFIX}"))


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporaries that an interrupted atomic write of ``target`` left behind."""
    for tmp in _stale_temporaries(target):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, fsync it, rename it over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:
                # torch.save's zip writer reports a failed write (a full disk, a quota) as
                # "[enforce fail at inline_container.cc] ... unexpected pos": make it an OSError.
                raise OSError(errno.EIO, f"write failed ({_first_line(e)})") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _payload_bytes(obj: Any) -> int:
    """About how many bytes ``torch.save(obj)`` writes: the tensors' bytes (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_payload_bytes(v) for v in obj.values()) + 64 * len(obj)
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj) + 16 * len(obj)
    return 16


def _write_error(target: Path, e: OSError, payload: Any) -> CheckpointError:
    """One line for a failed write: for a full disk, the folder, the space needed and free."""
    needed = _payload_bytes(payload) + 64 * 1024
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < needed):
        have = f", {free / 2**20:.1f} MiB free" if free is not None else ""
        kept = " (the previous checkpoint is intact)" if target.exists() else ""
        return CheckpointError(
            f"cannot write checkpoint {target}: {e.strerror or 'No space left on device'}{kept}: "
            f"the folder {target.parent} needs about {needed / 2**20:.1f} MiB{have}; free space "
            "there, then resume the run"
        )
    return CheckpointError(
        f"cannot write checkpoint {target}: {e.strerror or e}; check the folder exists and is writable"
    )


# ---------------------------------------------------------------------------------- description
def _config_dict(config: Any) -> dict[str, Any] | None:
    """A :class:`VAEConfig` (or a dict of one) as a JSON-compatible dict, with the options whose
    default may change pinned to the value used."""
    from .build import pin_options

    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        d = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        d = dict(config)
    else:
        raise ConfigError(
            f"config must be a pyrovae.build.VAEConfig or a dict, got {type(config).__name__}"
        )
    try:
        return pin_options(json.loads(json.dumps(d)))  # tuples -> lists; fails on non-JSON values
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config cannot be stored as JSON ({e}); use plain numbers and strings") from None


def describe_model(vae: VAE, config: Any = None) -> dict[str, Any]:
    """The model description stored in a checkpoint: class, ``num_data``, parameter shapes, config."""
    if config is None:
        config = getattr(vae, "config", None)
    return {
        "class": type(vae).__name__,
        "num_data": getattr(vae, "num_data", None),
        "parameters": {k: list(v.shape) for k, v in vae.state_dict().items()},
        "config": _config_dict(config),
    }


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _mismatch(saved: Mapping[str, Any], model: Mapping[str, torch.Tensor]) -> str | None:
    """Name the parameters that differ between a saved state_dict and the model's, or None."""
    missing = [k for k in model if k not in saved]
    unexpected = [k for k in saved if k not in model]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(model[k].shape)} in the model"
        for k in model
        if k in saved
        and isinstance(saved[k], torch.Tensor)
        and tuple(saved[k].shape) != tuple(model[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing parameters {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected parameters {_short(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {_short(shapes, 2)}")
    return "; ".join(parts) or None


# -------------------------------------------------------------------------------------- writing
def save_checkpoint(
    path: str | os.PathLike[str],
    vae: VAE,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    history: Any = None,
    config: Any = None,
    training_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``vae`` (and ``optimizer``) atomically to ``path``.

    :param path: a file, or a run folder (then ``path/checkpoint.pt``); folders are created.
    :param vae: the model; its ``state_dict`` is saved.
    :param optimizer: optionally, its ``state_dict`` is saved too.
    :param history: optionally, a :class:`~pyrovae.History` (or a dict of lists and numbers).
    :param config: the :class:`~pyrovae.build.VAEConfig` the model was built from (default:
        ``vae.config`` if it has one), so that :func:`load_model` can rebuild it.
    :param training_state: where training stands (what :func:`pyrovae.fit` stores: epoch, step,
        generator states, ...); plain data and tensors only.
    :returns: the checkpoint file's path.
    :raises CheckpointError: if the folder cannot be written.
    """
    target = checkpoint_path(path)
    if not isinstance(vae, torch.nn.Module):
        raise ConfigError(f"vae must be a torch.nn.Module, got {type(vae).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if history is not None and hasattr(history, "to_dict"):
        history = history.to_dict()
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "torch_version": str(torch.__version__),
        "model": vae.state_dict(),
        "model_description": describe_model(vae, config),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "history": history,
        "training_state": dict(training_state) if training_state is not None else None,
    }
    try:
        _atomic_write(target, lambda f: torch.save(payload, f))
    except OSError as e:
        raise _write_error(target, e, payload) from None
    return target


def save_train_state(
    path: str | os.PathLike[str], state: Any, *, config: Any = None, rng: list[Any] | None = None
) -> Path:
    """Write a :class:`~pyrovae.training.TrainState` atomically: the model, the optimizer, the
    history and ``training_state`` (position, running sums, settings, RNG states), plain data
    and tensors only.

    :param path: a run folder or a checkpoint file.
    :param state: the :class:`~pyrovae.training.TrainState`.
    :param config: the :class:`~pyrovae.build.VAEConfig`, so :func:`load_model` can rebuild it.
    :param rng: every process's RNG states (rank order); default: this process's.
    """
    from .state import rng_state

    rng = list(rng) if rng is not None else [rng_state()]
    training_state: dict[str, Any] = {
        "epoch": int(state.epoch),  # the epoch in progress (0-based); == epochs done when batch == 0
        "batch": int(state.batch),  # minibatches of that epoch already consumed
        "seed": int(state.seed),
        "rng": rng[0],
        "partial": {
            "total": float(state.objective_sum),
            "count": int(state.datapoints),
            "seconds": float(state.seconds),
        },
        "bad_streak": int(state.bad_streak),
        "settings": dict(state.settings),
    }
    if len(rng) > 1:
        training_state["rng_ranks"] = rng
    return save_checkpoint(
        path, state.vae, state.optimizer, history=state.history, config=config,
        training_state=training_state,
    )


def load_train_state(
    path: str | os.PathLike[str], vae: VAE | None = None, optimizer: torch.optim.Optimizer | None = None
) -> Any:
    """Read the :class:`~pyrovae.training.TrainState` of a checkpoint written by
    :func:`pyrovae.fit` (this version's or an earlier one's), loading the model and optimizer
    state into ``vae`` and ``optimizer`` when given.

    :raises CheckpointError: as :func:`load_checkpoint`, or if the checkpoint holds no training
        state.
    """
    from .state import History, TrainState

    ckpt = load_checkpoint(path, vae=vae, optimizer=optimizer)
    target = checkpoint_path(path)
    ts = ckpt.get("training_state")
    required = ("epoch", "batch", "seed", "rng", "partial", "bad_streak", "settings")
    if not isinstance(ts, dict) or any(k not in ts for k in required) or not isinstance(
        ckpt.get("history"), dict
    ):
        raise CheckpointError(
            f"checkpoint {target} holds no training state; resume needs a checkpoint written by "
            "pyrovae.fit(checkpoint_dir=...)"
        )
    partial = ts["partial"]
    streak = int(ts["bad_streak"])
    return TrainState(
        vae=vae,
        optimizer=optimizer,
        seed=int(ts["seed"]),
        epoch=int(ts["epoch"]),
        batch=int(ts["batch"]),
        history=History.from_dict(ckpt["history"]),
        settings=dict(ts["settings"]),
        objective_sum=torch.tensor(float(partial["total"]), dtype=torch.float64),
        datapoints=torch.tensor(int(partial["count"]), dtype=torch.int64),
        seconds=float(partial["seconds"]),
        bad_streak=torch.tensor(streak, dtype=torch.int64),
        reported_streak=streak,
        rng=list(ts.get("rng_ranks") or [ts["rng"]]),
    )


def save_config(run_dir: str | os.PathLike[str], config: Any, **run_info: Any) -> Path:
    """Write ``run_dir/config.json`` atomically: ``{"vae": <config as a dict>, **run_info}``.

    ``config`` is the :class:`~pyrovae.build.VAEConfig` that rebuilds the model; ``run_info`` is
    whatever else describes the run (the CLI stores its data and training options there). Keys of
    an existing ``config.json`` that are not given again are kept, so :func:`pyrovae.fit`
    refreshing the model description never drops what the CLI wrote.
    """
    d = _config_dict(config)
    try:
        extra = json.loads(json.dumps(run_info))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"run information cannot be stored as JSON ({e}); use plain numbers and strings") from None
    target = Path(run_dir) / CONFIG_NAME
    merged: dict[str, Any] = {}
    if target.is_file():
        with contextlib.suppress(CheckpointError):
            merged = read_config(run_dir)
    merged.update(extra)
    merged["vae"] = d
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    try:
        _atomic_write(target, lambda f: f.write(text.encode()))
    except OSError as e:
        raise CheckpointError(f"cannot write {target}: {e.strerror or e}; check the folder is writable") from None
    return target


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run folder's ``config.json``: ``{"vae": <VAEConfig as a dict>, ...}``.

    :raises CheckpointError: missing, unreadable, or without a model configuration.
    """
    if isinstance(run_dir, bool) or not isinstance(run_dir, (str, os.PathLike)):
        raise CheckpointError(f"run_dir must be a path, got {type(run_dir).__name__}")
    target = Path(run_dir) / CONFIG_NAME
    if not target.is_file():
        raise CheckpointError(
            f"{target} does not exist; pass a run folder written by 'pyrovae train' or "
            "pyrovae.fit(checkpoint_dir=...)"
        )
    try:
        cfg = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{target} cannot be read as JSON ({_first_line(e)}); restore it or retrain") from None
    if isinstance(cfg, dict) and "vae" not in cfg and "num_features" in cfg:
        cfg = {"vae": cfg}  # written by pyrovae 0.1 before run information was stored beside it
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vae"), dict):
        raise CheckpointError(
            f"{target} holds no model configuration (a 'vae' entry); restore it or retrain"
        )
    from .build import upgrade_saved

    return {**cfg, "vae": upgrade_saved(cfg["vae"])}


# -------------------------------------------------------------------------------------- reading
def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _verify_crc(target: Path) -> None:
    """Check every record's CRC-32 in a zip-format checkpoint (``torch.load`` does not), so a
    flipped bit in the weights is reported instead of loaded. Non-zip files pass through to the
    safe loader, which refuses them."""
    try:
        if not zipfile.is_zipfile(target):
            return
        with zipfile.ZipFile(target) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(
            f"checkpoint {target} is corrupted ({_first_line(e)}); resume from an earlier "
            "checkpoint or retrain"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {target} is corrupted (checksum mismatch in {bad!r}); resume from an "
            "earlier checkpoint or retrain"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file safely and check it is a pyrovae checkpoint; load nothing into models.

    :param path: a checkpoint file or a run folder.
    :returns: the checkpoint as a dict of plain data and CPU tensors (keys ``model``,
        ``optimizer``, ``model_description``, ``history``, ``training_state``, ...).
    :raises CheckpointError: missing, unreadable, truncated, corrupted, unsafe, or not a pyrovae
        checkpoint.
    """
    target = checkpoint_path(path)
    if not target.exists():
        hint = (
            f"the run folder {target.parent} has no {CHECKPOINT_NAME}; train with checkpoint_dir= first"
            if Path(path).is_dir()
            else "check the path, or start training without resume"
        )
        raise CheckpointError(f"checkpoint {target} does not exist; {hint}")
    if not target.is_file():
        raise CheckpointError(f"checkpoint {target} is not a file; pass a checkpoint file or a run folder")
    _verify_crc(target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on unusual pickle protocols
            obj = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"refused to load {target}: it would import {found.group(1)}, and loading "
                "arbitrary Python objects can run code; only load checkpoints written by pyrovae"
            ) from None
        raise CheckpointError(
            f"checkpoint {target} is not a file pyrovae can load safely (corrupted, or a pickle "
            "of something other than tensors and plain data); resume from an earlier checkpoint "
            "or retrain"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile, UnicodeDecodeError, MemoryError, OverflowError) as e:
        reason = "it is empty or ends too early" if isinstance(e, EOFError) else _first_line(e)
        reason = reason.split(". This is an internal miniz error")[0]
        raise CheckpointError(
            f"checkpoint {target} is truncated or corrupted ({reason}); resume from an earlier "
            "checkpoint or retrain"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise CheckpointError(
            f"{target} is not a pyrovae checkpoint (no '{_FORMAT}' marker); pass a file written by "
            "pyrovae.fit(checkpoint_dir=...) or pyrovae.save_checkpoint"
        )
    version = obj.get("version")
    if not isinstance(version, int) or version > _VERSION:
        raise CheckpointError(
            f"checkpoint {target} has format version {version!r}, newer than this pyrovae "
            f"understands ({_VERSION}); upgrade pyrovae"
        )
    if not isinstance(obj.get("model"), dict) or not all(
        isinstance(v, torch.Tensor) for v in obj["model"].values()
    ):
        raise CheckpointError(f"checkpoint {target} has no valid model state; it is corrupted, retrain")
    return obj


def load_checkpoint(
    path: str | os.PathLike[str],
    vae: VAE | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Read a checkpoint safely and load it into ``vae`` and ``optimizer`` (each optional).

    The model must match the checkpoint's exactly (same parameter names and shapes); otherwise
    nothing is loaded and the error names the missing, unexpected and mismatched parameters.

    :param path: a checkpoint file or a run folder.
    :param vae: a model built like the saved one; its parameters are overwritten.
    :param optimizer: an optimizer over ``vae``'s parameters; its state is overwritten.
    :returns: the checkpoint dict (see :func:`read_checkpoint`).
    :raises CheckpointError: as :func:`read_checkpoint`, or if the checkpoint belongs to another
        model or optimizer.
    """
    ckpt = read_checkpoint(path)
    target = checkpoint_path(path)
    if vae is not None:
        if not isinstance(vae, torch.nn.Module):
            raise ConfigError(f"vae must be a torch.nn.Module, got {type(vae).__name__}")
        problem = _mismatch(ckpt["model"], vae.state_dict())
        if problem is not None:
            from .build import lacks_logit_rank

            cfg = (ckpt.get("model_description") or {}).get("config")
            if isinstance(cfg, dict) and lacks_logit_rank(cfg):
                fix = ("it was saved before the option logit_rank existed, with a dense "
                       "categorical256 output layer: build it with options={'logit_rank': 0} "
                       "or use pyrovae.load_model")
            elif cfg:
                fix = f"build the model from the checkpoint's config {cfg} or use pyrovae.load_model"
            else:
                fix = "build the model with the same parts and sizes as the saved one"
            raise CheckpointError(
                f"checkpoint {target} belongs to a different model: {problem}; {fix}"
            )
        saved_n = (ckpt.get("model_description") or {}).get("num_data")
        own_n = getattr(vae, "num_data", None)
        try:
            vae.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, TypeError) as e:  # dtype casts etc.
            raise CheckpointError(f"checkpoint {target} does not fit the model ({_first_line(e)})") from None
        if saved_n is not None and own_n is not None and saved_n != own_n and optimizer is not None:
            raise CheckpointError(
                f"checkpoint {target} was trained with num_data={saved_n} but the model has "
                f"num_data={own_n}; build the model with num_data={saved_n} to resume training"
            )
    if optimizer is not None:
        state = ckpt.get("optimizer")
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {target} holds no optimizer state; resume needs a checkpoint written "
                "by pyrovae.fit"
            )
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"the optimizer state in {target} does not fit this optimizer ({_first_line(e)}); "
                "resume with the same model and optimizer"
            ) from None
    return ckpt


def _read_config(run: Path, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    folder = run if run.is_dir() else run.parent
    if (folder / CONFIG_NAME).is_file():
        return read_config(folder)["vae"]
    cfg = (ckpt.get("model_description") or {}).get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{run} holds no model configuration ({CONFIG_NAME}); build the VAE yourself and "
            "call pyrovae.load_checkpoint(path, vae=...)"
        )
    from .build import upgrade_saved

    return upgrade_saved(cfg)


def load_model(run_dir: str | os.PathLike[str], *, device: Any = None) -> Any:
    """Rebuild a trained :class:`~pyrovae.VAE` from a run folder (or a checkpoint file).

    The model is built with :func:`pyrovae.build.build_vae` from the saved
    :class:`~pyrovae.build.VAEConfig` (``config.json``, else the copy inside the checkpoint) and
    the saved ``num_data``, then its weights are loaded. It is returned in eval mode.

    :param run_dir: a run folder written by ``fit(..., checkpoint_dir=run_dir)``, or a checkpoint file.
    :param device: where to put the model (default: CPU).
    :raises CheckpointError: missing/unsafe/corrupted files, or no configuration saved.
    """
    from .build import VAEConfig, build_vae

    run = Path(run_dir) if isinstance(run_dir, (str, os.PathLike)) else None
    if run is None:
        raise CheckpointError(f"run_dir must be a path, got {type(run_dir).__name__}")
    ckpt = read_checkpoint(run)
    cfg = _read_config(run, ckpt)
    names = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise CheckpointError(
            f"the saved configuration has unknown fields {unknown}; it was written by another "
            "pyrovae version: upgrade pyrovae"
        )
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # JSON lists
    try:
        config = VAEConfig(**cfg)
    except TypeError as e:
        raise CheckpointError(f"the saved configuration is incomplete ({_first_line(e)}); retrain") from None
    num_data = (ckpt.get("model_description") or {}).get("num_data") or 1
    try:
        vae = build_vae(config, num_data=int(num_data))
    except ConfigError as e:
        raise CheckpointError(f"the saved configuration cannot be built: {e}") from None
    if device is not None:
        try:
            vae.to(device)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"cannot put the model on device {device!r} ({_first_line(e)}); "
                              "use 'cpu' or an existing 'cuda:N'") from None
    load_checkpoint(run, vae=vae)
    with contextlib.suppress(AttributeError, TypeError):
        vae.config = config
    return vae.eval()

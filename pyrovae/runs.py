"""Run folders: a trained model's weights (``model.pt``) beside the configuration that rebuilds it
(``config.json``).

``model.pt`` holds only a state dict of tensors and is read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers: loading a run never executes code from it.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["save_model", "load_model", "atomic_write_bytes"]

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(run_dir: str | Path, vae: Any, run_config: dict[str, Any]) -> None:
    """Save ``vae``'s weights and ``run_config`` (JSON; must hold ``"vae"``, a
    :class:`~pyrovae.build.VAEConfig` as a dict, and ``"num_data"``) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / MODEL_FILE, buffer.getvalue())
    atomic_write_bytes(
        run_dir / CONFIG_FILE, (json.dumps(run_config, indent=2) + "\n").encode("utf-8")
    )


def load_model(run_dir: str | Path, *, device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild the VAE saved in ``run_dir``; returns ``(vae, run_config)``.

    Raises :class:`~pyrovae.errors.CheckpointError` for a missing, corrupted, unsafe or mismatched
    run folder.
    """
    from .build import VAEConfig, build_vae

    run_dir = Path(run_dir)
    config_path, model_path = run_dir / CONFIG_FILE, run_dir / MODEL_FILE
    for p in (config_path, model_path):
        if not p.is_file():
            raise CheckpointError(
                f"{p} does not exist; pass a run folder written by 'pyrovae train'"
            )
    try:
        run_config = json.loads(config_path.read_text())
        config = VAEConfig(**run_config["vae"])
        num_data = int(run_config["num_data"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a valid run configuration ({e})") from None
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{model_path} holds more than tensors and was refused (loading it could run code): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # truncated or garbled zip/pickle data
        raise CheckpointError(
            f"{model_path} is corrupted or truncated ({type(e).__name__}); re-run training"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{model_path} does not hold a state dict")
    vae = build_vae(config, num_data)
    _load_state(vae, state, model_path)
    return vae.to(device).eval(), run_config


def _load_state(vae: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    own = vae.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if names:
                parts.append(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        raise CheckpointError(
            f"{path} does not match the model configuration ({'; '.join(parts)}); "
            "load it with the configuration it was saved with"
        )
    vae.load_state_dict(state)

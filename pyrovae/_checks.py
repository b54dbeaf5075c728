"""Argument checks shared by the public functions (private)."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, DataError

if TYPE_CHECKING:  # for annotations only (no import cycle at run time)
    from .vae import VAE


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer >= 1, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a real number, finite and > 0, else raise
    :class:`ConfigError` (a string such as ``"0.1"`` is refused, not parsed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    f = float(value)
    if not math.isfinite(f) or f <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return f


def check_vae(vae: object, reads: tuple[str, ...] = (), reader: str = "") -> VAE:
    """Return ``vae`` if it is a :class:`torch.nn.Module` with ``model``, ``guide`` and
    ``check_data`` (a :class:`~pyrovae.VAE`, or anything shaped like one) and the attributes
    ``reads`` (e.g. ``("family", "prior")``, which ``reader`` reads), else raise
    :class:`ConfigError`."""
    if not isinstance(vae, torch.nn.Module) or not all(
        callable(getattr(vae, a, None)) for a in ("model", "guide", "check_data")
    ) or not all(hasattr(vae, a) for a in reads):
        if reads:
            raise ConfigError(
                f"{reader or 'this'} need a pyrovae.VAE (they read its {' and '.join(reads)}), "
                f"got {type(vae).__name__}"
            )
        raise ConfigError(
            f"vae must be a pyrovae.VAE (a torch.nn.Module with model, guide and check_data), "
            f"got {type(vae).__name__}"
        )
    return vae


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """Return ``seed`` if it is ``None`` or an integer >= 0, else raise :class:`ConfigError`."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"{name} must be a non-negative integer or None, got {seed!r}")
    return seed


def to_device(x: torch.Tensor, device: torch.device | str, what: str = "data") -> torch.Tensor:
    """``x.to(device)``, or :class:`DataError` if ``x`` cannot be moved there (e.g. a ``meta``
    tensor, which holds no values)."""
    try:
        return x.to(device)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{what} on device {x.device} cannot be moved to {device} ({reason}); pass data that "
            "holds values, on the CPU or the model's device"
        ) from None


def check_finite(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataError` if ``x`` holds NaN or inf values."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(
            f"{what} contains {bad} NaN or infinite value(s); remove or impute them before training"
        )

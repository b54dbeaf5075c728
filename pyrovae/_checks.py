"""Argument checks shared by the public functions (private)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import ConfigError, DataError


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer >= 1, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise :class:`ConfigError`."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return f


def check_finite(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataError` if ``x`` holds NaN or inf values."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(
            f"{what} contains {bad} NaN or infinite value(s); remove or impute them before training"
        )

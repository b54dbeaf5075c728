"""The exceptions pyrovae raises at its public boundary.

Every error a user can cause (bad data, a wrong option, a missing or unsafe file) is one of
these, with a one-line message that names the problem and the fix. They subclass the builtin
exception a caller would expect (``ValueError``, ``FileNotFoundError``), so existing ``except``
clauses keep working.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "PyrovaeError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "CheckpointError",
    "TrainingError",
    "PyrovaeWarning",
    "ImportanceSamplingWarning",
    "NumericalWarning",
    "FastPathWarning",
]


class PyrovaeError(Exception):
    """Base class of every error pyrovae raises on purpose."""


class ConfigError(PyrovaeError, ValueError):
    """An argument or option is invalid (an impossible size, an unknown name, ...)."""


class DataError(PyrovaeError, ValueError):
    """Data has the wrong shape, dtype, values or support, or a data file is malformed."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or data root does not exist."""


class CheckpointError(PyrovaeError, ValueError):
    """A checkpoint is missing, corrupted, unsafe, or belongs to another model."""


class TrainingError(PyrovaeError, RuntimeError):
    """Training cannot go on (for example, the loss stayed NaN for several steps)."""


class PyrovaeWarning(UserWarning):
    """Base class of the warnings pyrovae issues (a result is computed but may mislead)."""


class ImportanceSamplingWarning(PyrovaeWarning):
    """An importance-sampling estimate is not to be trusted (PSIS k-hat above 0.7 for too many
    datapoints: the proposal :math:`q(z \\mid x)` is too narrow for the posterior)."""


class NumericalWarning(PyrovaeWarning):
    """A training step had a NaN or infinite loss or gradient and its update was skipped."""


class FastPathWarning(PyrovaeWarning):
    """pyrovae evaluates a VAE's program through Pyro's tracing, not its faster direct evaluation,
    because the program is not the one the direct evaluation computes (a ``pyro.factor``, an extra
    site, a rewritten ``model``) or the direct evaluation did not equal Pyro's on it. The numbers
    are Pyro's either way; only the speed differs. Issued once per program."""


class Preempted(TrainingError):
    """Training stopped on SIGTERM after writing a checkpoint; resume to continue exactly
    (``pyrovae train`` exits with code 75).

    :ivar checkpoint: the checkpoint file written (``None`` without ``checkpoint_dir``).
    """

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint

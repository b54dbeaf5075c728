"""Where training stands, as data: :class:`History`, :class:`TrainState` and every global RNG's state.

:mod:`pyrovae.training` advances a :class:`TrainState`; :mod:`pyrovae.checkpoint` saves and reads
it (tensors and plain data, read back with ``weights_only=True``), with :func:`rng_state`. Both
import this module; neither imports the other's internals. ``pyrovae.training`` re-exports
:class:`History` and :class:`TrainState`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

__all__ = ["History", "TrainState", "rng_state", "set_rng_state"]


@dataclass
class History:
    """What :func:`fit` measured, one entry per epoch.

    :ivar objective: what ``train_objective`` holds: ``"elbo"`` for ``Trace_ELBO`` and
        ``TraceMeanField_ELBO``, ``"beta-elbo(β=0.5)"`` with ``beta=0.5``, ``"iwae(k=5)"`` for
        :class:`pyrovae.losses.IWAE` ``(5)`` (``"iwae(k=5, dreg)"`` with its DReG gradient),
        ``"renyi(α=0, k=5)"`` for Pyro's ``RenyiELBO``, with ``" + KL warm-up (E epochs)"`` appended when
        the KL weight was annealed (those epochs' numbers are of the down-weighted objective).
    :ivar train_objective: the training objective per datapoint (nats), averaged over the epoch's
        minibatches (skipped, non-finite steps left out). ``train_elbo`` is the same list.
    :ivar validation_elbo: the validation ELBO per datapoint (nats; always the plain ELBO, with
        ``β = 1``), or ``None`` without validation data.
    :ivar epoch_seconds: wall time of each epoch (validation excluded).
    :ivar num_steps: minibatch steps in all, including skipped ones.
    :ivar skipped_steps: steps whose update was skipped because the loss or a gradient was NaN
        or infinite.
    :ivar resumed_at_step: the step counts at which training was resumed from a checkpoint.
    """

    objective: str = "elbo"
    train_objective: list[float] = field(default_factory=list)
    validation_elbo: list[float | None] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    num_steps: int = 0
    skipped_steps: int = 0
    resumed_at_step: list[int] = field(default_factory=list)

    @property
    def train_elbo(self) -> list[float]:
        """The training objective per epoch (an alias of ``train_objective``; see ``objective``
        for which objective it is)."""
        return self.train_objective

    @property
    def num_epochs(self) -> int:
        return len(self.train_objective)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``train_elbo`` included as a copy of ``train_objective``)."""
        d = asdict(self)
        d["train_elbo"] = list(self.train_objective)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict`; also reads histories written before ``objective``
        existed (``train_elbo`` only). Unknown keys are ignored."""
        d = dict(d)
        if "train_objective" not in d and "train_elbo" in d:
            d["train_objective"] = d["train_elbo"]
            d.setdefault("objective", "")  # unknown: fit names it when it resumes
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainState:
    """Where training stands; :meth:`SVI.update` advances it, :mod:`pyrovae.checkpoint` saves it.

    :ivar vae: the model (its ``state_dict`` is the model state).
    :ivar optimizer: its optimizer (its ``state_dict`` is the optimizer state).
    :ivar seed: the run's seed (minibatch orders are drawn from ``(seed, epoch)``).
    :ivar epoch: the epoch in progress, from 0 (equal to the epochs done when ``batch == 0``).
    :ivar batch: minibatches of that epoch already done.
    :ivar history: per-epoch results so far.
    :ivar settings: what a resumed run must match (``num_data``, ``batch_size``, ``loss``, ...).
    :ivar objective_sum: device scalar, the epoch's sum over the datapoints of its good steps of
        the per-datapoint objective (so that ``objective_sum / datapoints`` is the epoch's mean).
    :ivar datapoints: device scalar, datapoints in the epoch's good steps.
    :ivar seconds: training time already spent in this epoch before the current session.
    :ivar bad_streak: device scalar, non-finite steps in a row.
    :ivar stopped: device scalar, set when ``bad_streak`` reached the limit: later updates are
        skipped until the host notices (at the next synchronization) and raises.
    :ivar unreported: ``(step, epoch, loss, loss_bad, bad)`` of the steps not yet checked on the
        host (the flags device tensors, or bools where the host read them at once), for warnings
        and the bad-streak error.
    :ivar reported_streak: the bad streak as of the last host check.
    :ivar rng: every process's RNG states (rank order) as read from a checkpoint; ``None`` for
        a fresh run (the live states are the generators themselves).
    """

    vae: Any
    optimizer: Any
    seed: int
    epoch: int = 0
    batch: int = 0
    history: History = field(default_factory=History)
    settings: dict[str, Any] = field(default_factory=dict)
    objective_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    datapoints: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    seconds: float = 0.0
    bad_streak: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    stopped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    unreported: list[tuple[int, int, torch.Tensor, Any, Any]] = field(
        default_factory=list, repr=False
    )
    reported_streak: int = 0
    rng: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        param = next(iter(self.vae.parameters()), None) if self.vae is not None else None
        if param is not None:
            self.to(param.device)

    def to(self, device: torch.device) -> TrainState:
        """Put the running sums on ``device`` (float64 where the device has it)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.objective_sum = self.objective_sum.to(device, dtype)
        self.datapoints = self.datapoints.to(device)
        self.bad_streak = self.bad_streak.to(device)
        self.stopped = self.stopped.to(device)
        return self

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch, self.seconds = epoch, 0, 0.0
        self.objective_sum = torch.zeros_like(self.objective_sum)
        self.datapoints = torch.zeros_like(self.datapoints)


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every global RNG from :func:`rng_state`'s record (CUDA's where the device count matches)."""
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

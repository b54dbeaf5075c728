r"""Training by stochastic variational inference (AEVB, Kingma & Welling 2014).

Three pieces, in the shape of NumPyro's ``SVIState`` / ``SVI`` / ``SVI.run``:

- :class:`TrainState`: everything training needs to go on: the model and its optimizer, where
  training stands (epoch, minibatch), the :class:`History`, the running sums of the epoch in
  progress and the seed. :mod:`pyrovae.checkpoint` alone serializes it (tensors and plain data,
  read back with ``weights_only=True``), together with every random number generator's state.
- :class:`SVI`: the :class:`Objective`, the optimizer and the rules of a step (clipping, the
  bad-step guard, the process group), held once: ``svi.init(vae, seed) -> state`` and
  ``svi.update(state, x, idx, kl_weight=w) -> (state, loss)``. A step owns the loss, the gradient
  (all-reduced across processes under ``torchrun``), clipping and the skipping of non-finite
  steps (one guard, :func:`_guard`), on an accelerator without a host synchronization.
  :func:`train_step` is the same step with the settings passed per call.
- :func:`fit`: checks its arguments, builds the :class:`SVI` and its state (fresh or resumed),
  then runs a loop of epochs and minibatches calling :meth:`SVI.update`; its other jobs are
  callbacks on that loop, in order: the learning-rate schedule, the progress bar, validation,
  the user's hooks, checkpoints, SIGTERM.

Each step draws a minibatch ``(x, idx)`` and evaluates a Pyro loss on ``vae.model`` and
``vae.guide`` (the ``"data"`` plate scales it to the whole training set, so it estimates the
negative ELBO of all :math:`N` datapoints):

.. math::

    \mathcal L_\beta(\theta, \phi) = \frac{N}{B} \sum_{i \in \text{batch}}
        \Big( E_{q_\phi(z|x_i)}[\log p_\theta(x_i|z)] - \beta\, KL(q_\phi(z|x_i) \,\|\, p(z)) \Big),

with :math:`\beta` passed to model and guide as the keyword ``kl_weight`` (it scales the ``"z"``
site), never stored on the model.

Reliability (see ``docs/reliability.md``): with ``checkpoint_dir`` set, :func:`fit` writes an atomic
checkpoint after every epoch (and every ``checkpoint_every_steps`` steps) and ``resume=`` continues
from it, bit-for-bit as if never interrupted: each epoch's minibatch order is drawn from a generator
seeded by ``(seed, epoch)``, and every global RNG state is saved with the checkpoint. A step whose
loss or gradient is NaN or infinite is skipped (a :class:`~pyrovae.errors.NumericalWarning`);
``max_bad_steps`` of them in a row stop training with :class:`~pyrovae.errors.TrainingError`.
SIGTERM (a scheduler's preemption) finishes the step in progress, writes a checkpoint and raises
:class:`Preempted`; ``pyrovae train`` then exits with :data:`EXIT_PREEMPTED` (75).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from . import distributed
from ._batching import as_dataset
from ._checks import check_positive_float, check_positive_int, to_device
from .errors import Preempted, CheckpointError, ConfigError, DataError, NumericalWarning, TrainingError
from .fastpath import TrainingLoss, check_parameters
from .importance import elbo as elbo_estimate
from .state import History, TrainState, rng_state, set_rng_state

__all__ = [
    "History",
    "TrainState",
    "Objective",
    "Callback",
    "Preempted",
    "EXIT_PREEMPTED",
    "objective",
    "SVI",
    "train_step",
    "fit",
]

#: Exit status of ``pyrovae train`` after SIGTERM: the run stopped cleanly at a checkpoint and
#: continues with ``pyrovae train --resume RUN`` (``EX_TEMPFAIL`` of sysexits.h: "try again").
EXIT_PREEMPTED = 75




# ------------------------------------------------------------------------------------ objective
@dataclass(frozen=True)
class Objective:
    r"""What a step minimizes: a Pyro loss of the VAE's public ``model`` and ``guide``, and the
    KL weight.

    The weight at a point of training, with ``progress`` counted in epochs (this step included),
    is :math:`w = \beta \min(1, \text{progress} / E_\text{warm-up})`, or :math:`\beta` without
    warm-up (Sønderby et al. 2016). Build one with :func:`objective`.

    :ivar loss: the Pyro loss (``Trace_ELBO()``, :class:`pyrovae.losses.IWAE`, ...).
    :ivar model, guide: the Pyro program the loss runs: the VAE's public ``model`` and ``guide``
        (a subclass's or an instance's own, with every Pyro statement in them).
    :ivar beta: the KL weight after warm-up.
    :ivar kl_warmup_epochs: epochs of linear warm-up, 0 for none.
    :ivar name: what the loss estimates, for :attr:`History.objective`.
    :ivar differentiable: for a loss with ``differentiable_loss``, the
        :class:`~pyrovae.fastpath.TrainingLoss` that evaluates it (Pyro's evaluation, or the
        direct one where :mod:`pyrovae.fastpath` proves it equal on this program); ``None`` for a
        loss that backpropagates itself (``loss_and_grads``, e.g. ``RenyiELBO``).
    """

    loss: Any
    model: Callable[..., Any]
    guide: Callable[..., Any]
    beta: float = 1.0
    kl_warmup_epochs: float = 0.0
    name: str = "elbo"
    differentiable: TrainingLoss | None = None

    @property
    def weighted(self) -> bool:
        """Whether some step has a KL weight other than 1 (then the programs get ``kl_weight``;
        otherwise they are called as ``model(x, idx)``)."""
        return self.beta != 1.0 or bool(self.kl_warmup_epochs)

    def kwargs(self, kl_weight: float) -> dict[str, float]:
        return {"kl_weight": kl_weight} if self.weighted else {}

    def kl_weight(self, progress: float) -> float:
        """The KL weight after ``progress`` epochs (> 0: a zero scale is refused by Pyro)."""
        if not self.kl_warmup_epochs:
            return self.beta
        return self.beta * min(1.0, progress / self.kl_warmup_epochs)


def _is_jit(loss: Any) -> bool:
    from pyro.infer import JitTraceMeanField_ELBO, JitTrace_ELBO

    return isinstance(loss, (JitTrace_ELBO, JitTraceMeanField_ELBO))


def _objective_name(loss: Any, beta: float, kl_warmup_epochs: float) -> str:
    from pyro.infer import RenyiELBO

    base = getattr(loss, "objective", None)  # a loss may declare what it estimates
    if not isinstance(base, str):
        k = getattr(loss, "num_particles", 1)
        if isinstance(loss, RenyiELBO):  # not the IWAE bound under subsampling (pyrovae.losses)
            base = f"renyi(α={loss.alpha:g}, k={k})"
        else:
            base = "elbo"
    if beta != 1.0:
        head, paren, rest = base.partition("(")
        base = f"beta-{head}({rest[:-1]}, β={beta:g})" if paren else f"beta-{base}(β={beta:g})"
    if kl_warmup_epochs:
        base += f" + KL warm-up ({kl_warmup_epochs:g} epochs)"
    return base


def _set_plate_nesting(loss: Any, data_plates: int) -> None:
    """Set an unset ``max_plate_nesting`` of a vectorized loss through its public attribute.

    Pyro's losses count the particle plate in it; a loss that counts the model's plates only
    (:mod:`pyrovae.losses`) declares ``plate_nesting_counts_particles = False``.
    """
    if not getattr(loss, "vectorize_particles", False) or loss.max_plate_nesting != math.inf:
        return
    counts_particles = getattr(loss, "plate_nesting_counts_particles", True)
    loss.max_plate_nesting = data_plates + (counts_particles and loss.num_particles > 1)


def objective(vae: Any, loss: Any = None, *, beta: float = 1.0, kl_warmup_epochs: float = 0.0,
              traced: bool = False, compile: bool = False) -> Objective:
    """The :class:`Objective` for training ``vae`` with ``loss`` (default ``Trace_ELBO()``).

    The loss runs on the VAE's public ``model`` and ``guide``: Pyro's evaluation defines it.
    For Pyro's ``Trace_ELBO()`` with one particle, :mod:`pyrovae.fastpath` evaluates the same
    loss without the tracing where it proves, on the first minibatch, that it equals Pyro's on
    this program; ``traced=True`` always runs Pyro's. ``compile=True`` compiles that direct loss
    (refused at the first minibatch where it does not apply).

    A vectorized loss whose ``max_plate_nesting`` is unset gets the VAE's (one ``"data"`` plate,
    plus one for the vectorized particles), so Pyro need not guess it by running the model,
    which would draw from the global RNG at the first step.
    """
    if loss is None:
        loss = Trace_ELBO()
    if not isinstance(loss, ELBO):
        raise ConfigError(
            f"loss must be a Pyro ELBO such as pyro.infer.Trace_ELBO(), got {type(loss).__name__}"
        )
    if _is_jit(loss) and kl_warmup_epochs:
        raise ConfigError(
            "a JIT loss compiles the KL weight as a constant, so KL warm-up would recompile it at "
            "every step; use Trace_ELBO() (or no warm-up) with kl_warmup_epochs"
        )
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True or False, got {compile!r}")
    _set_plate_nesting(loss, getattr(vae, "max_plate_nesting", 1))
    beta, kl_warmup_epochs = float(beta), float(kl_warmup_epochs)
    weighted = beta != 1.0 or bool(kl_warmup_epochs)
    differentiable = None
    if hasattr(loss, "differentiable_loss"):
        differentiable = TrainingLoss(vae, loss, weighted=weighted, fast=not traced, compile=compile)
    if compile and (differentiable is None or not differentiable.eligible):
        raise ConfigError(
            f"compile=True compiles the default loss (Trace_ELBO() with one particle); "
            f"{type(loss).__name__} runs through Pyro's tracing, which torch.compile does not "
            "take: train without compile=True (--compile)"
        )
    return Objective(loss, vae.model, vae.guide, beta, kl_warmup_epochs,
                     _objective_name(loss, beta, kl_warmup_epochs), differentiable)


# ------------------------------------------------------------------------------ data and RNGs
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
    bad, px = 0, None
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
        x = to_device(x, device, what)
        vae.check_data(x, what, support=False)
        px = vae.likelihood(vae.prior().sample((1,))) if px is None else px
        bad += vae.count_outside_support(x, px)
    if bad:  # the whole data set's count, not the first chunk's
        raise vae.support_error(bad, what, px)


# --------------------------------------------------------------------------- reproducible order
def _epoch_order(num_data: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s minibatch order: a permutation drawn from a generator seeded by
    ``(seed, epoch)``, so that a resumed run can redraw it without any saved state."""
    g = torch.Generator()
    g.manual_seed(hash((seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(num_data, generator=g)


# ------------------------------------------------------------------------------------------ step
def _adam(params: list[torch.Tensor], lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch and device have it (one kernel for all
    parameters instead of one small op per tensor: ~2 ms per step of a 784-400-400-50 VAE on a
    CPU), else the default implementation. Both compute the same update; the fused one can also
    skip an update on the device (``found_inf``), without a host synchronization."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=eps)


def _nonfinite_gradient(params: list[torch.Tensor], clip_grad_norm: float | None) -> torch.Tensor:
    """Whether a gradient holds a NaN or an infinity, as a device scalar, clipping first if
    asked (the clipped norm is not finite then). Without clipping, one sum per gradient: a sum
    is finite exactly when its terms are (or when finite terms overflow float32's 3e38, a step
    to skip as well); it reads each gradient once, ~40 % cheaper than their norms."""
    if clip_grad_norm is not None:
        return ~torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm, foreach=True))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    found = _found_nonfinite(grads)
    if found is not None:
        return found
    return ~torch.isfinite(torch.stack([g.sum() for g in grads]).sum())


def _found_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The check ``torch.amp.GradScaler`` makes before an update (its ``unscale_``, with a scale
    of 1, which leaves every gradient as it is): one foreach kernel for all the gradients
    instead of one sum each, ~35 us less per step on a CPU. ``None`` where it does not apply
    (sparse gradients, gradients on several devices, a torch without the op)."""
    device = grads[0].device
    found = torch.zeros((), dtype=torch.float32, device=device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found, torch.ones((), dtype=torch.float32, device=device)
        )
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return found.bool()


def _all_reduce_gradients(
    params: list[torch.Tensor], value: torch.Tensor, share: float, group: Any
) -> torch.Tensor:
    r"""Replace each gradient and the loss by :math:`\sum_r s_r g_r` over the ranks, with
    :math:`s_r = B_r / B` this rank's share of the global minibatch: one all-reduce of one flat
    buffer. Returns the global loss."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [value.reshape(1).to(params[0].dtype)])
    flat.mul_(share)
    distributed.all_reduce_sum(flat, group)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-1].to(value.dtype)


def _guard(bad: Any, streak: Any, stopped: Any, max_bad_steps: int) -> tuple[Any, Any, Any]:
    """The bad-step guard, the one place that decides: a step is skipped when it is bad (a
    non-finite loss or gradient) or training has stopped; the streak counts bad steps in a row;
    training stops once the streak reaches ``max_bad_steps``. Returns ``(skip, streak, stopped)``.

    The same arithmetic serves Python numbers (where the host reads the flags: a CPU, and the
    host's report) and device scalars (a GPU, with no host synchronization)."""
    skip = bad | stopped
    streak = (streak + 1) * bad  # 0 after a good step
    return skip, streak, stopped | (streak >= max_bad_steps)


def _default_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return _adam(params, 1e-3)


class SVI:
    r"""Stochastic variational inference: an :class:`Objective`, an optimizer and the rules of a
    step (clipping, the bad-step guard, the process group), in the shape of NumPyro's ``SVI``:

    .. code-block:: python

        svi = SVI(objective(vae), lambda params: torch.optim.Adam(params, lr=1e-3))
        state = svi.init(vae, seed=0)
        state, loss = svi.update(state, x, idx, kl_weight=1.0)

    A step differentiates the loss :math:`\hat{\mathcal L}` (an estimate of the whole training
    set's negative objective); under ``torchrun`` the ranks' gradients are combined into the
    gradient of the global minibatch (:func:`_all_reduce_gradients`). If the loss or a gradient
    is not finite, or ``max_bad_steps`` such steps came in a row, the update is skipped
    (:func:`_guard`): on an accelerator by the fused Adam on the device (its ``found_inf``), with
    nothing read back to the host, so a GPU never waits; on a CPU, where reading a flag costs
    nothing, by not calling the optimizer, with the running sums kept in Python numbers.
    :meth:`report` tells the host about skipped steps later, in order.

    :param objective: the :class:`Objective` (loss, model, guide, KL weight schedule).
    :param optimizer: a function of the parameter list returning a ``torch.optim.Optimizer``
        (default: Adam, ``lr=1e-3``, fused where available); :meth:`init` calls it.
    :param clip_grad_norm: clip the total gradient 2-norm to this value every step.
    :param max_bad_steps: non-finite steps in a row after which every update is skipped.
    :param process_group: the process group (``None``: one process).
    """

    def __init__(
        self,
        objective: Objective,
        optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        *,
        clip_grad_norm: float | None = None,
        max_bad_steps: int = 5,
        process_group: Any = None,
    ) -> None:
        self.objective = objective
        self.optimizer = optimizer if optimizer is not None else _default_optimizer
        self.clip_grad_norm = clip_grad_norm
        self.max_bad_steps = max_bad_steps
        self.process_group = process_group

    def init(self, vae: Any, seed: int, *, history: History | None = None,
             settings: dict[str, Any] | None = None) -> TrainState:
        """A fresh :class:`TrainState` for ``vae``: its trainable parameters in a new optimizer,
        epoch 0, an empty :class:`History` named after the objective."""
        params = [p for p in vae.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the VAE has no trainable parameters")
        history = history if history is not None else History(objective=self.objective.name)
        return TrainState(vae, self.optimizer(params), seed, history=history,
                          settings=dict(settings or {}))

    def update(
        self, state: TrainState, x: torch.Tensor, idx: torch.Tensor, *, kl_weight: float = 1.0,
        batch_rows: int | None = None,
    ) -> tuple[TrainState, torch.Tensor]:
        r"""One SVI step on the minibatch ``(x, idx)``: loss, gradient, clipping, a guarded update.

        :param state: the :class:`TrainState`; advanced in place and returned.
        :param x: this process's rows, shape ``(b, num_features)``, on the model's device.
        :param idx: their indices in the training set, shape ``(b,)``.
        :param kl_weight: :math:`\beta` for this step, passed to model and guide.
        :param batch_rows: rows of the global minibatch (default ``len(idx)``: one process).
        :returns: ``(state, loss)``, the loss a device scalar (float64), NaN/inf for a bad step.
        """
        optimizer, objective = state.optimizer, self.objective
        params = [p for group_ in optimizer.param_groups for p in group_["params"]]
        rows = len(idx) if batch_rows is None else batch_rows
        device = state.objective_sum.device
        if len(idx) > 0:  # once per program: every parameter it registers is one fit trains
            check_parameters(state.vae, x, idx, objective.kwargs(kl_weight))
        if len(idx) == 0:  # a rank with an empty shard of a tiny last minibatch
            value = torch.zeros((), dtype=torch.float64, device=device)
        elif objective.differentiable is not None:  # Pyro's loss, or its proven direct evaluation
            value_t = objective.differentiable(x, idx, kl_weight)
            value_t.backward()
            value = value_t.detach().to(torch.float64)
        else:  # e.g. RenyiELBO: backpropagates inside (and returns a float, read on the host)
            value = torch.tensor(
                objective.loss.loss_and_grads(objective.model, objective.guide, x, idx,
                                              **objective.kwargs(kl_weight)),
                dtype=torch.float64, device=device,
            )
        if self.process_group is not None:
            value = _all_reduce_gradients(params, value, len(idx) / rows, self.process_group)
        if _sync_every(device) == 1:  # a device whose flags the host reads every step (a CPU)
            loss_bad, bad = self._apply_on_host(state, params, value, rows)
        else:
            loss_bad, bad = self._apply_on_device(state, params, value, rows)
        optimizer.zero_grad(set_to_none=True)
        state.history.num_steps += 1
        state.batch += 1
        state.unreported.append((state.history.num_steps, state.epoch, value, loss_bad, bad))
        return state, value

    def _apply_on_host(self, state: TrainState, params: list[torch.Tensor], value: torch.Tensor,
                       rows: int) -> tuple[bool, bool]:
        """The guarded update with the flags read at once (a CPU, where that costs nothing): the
        guard's decisions in Python numbers, three small tensor ops per step instead of ~25."""
        v = float(value)
        loss_bad = not math.isfinite(v)
        # (a bad loss is skipped without looking at its gradient)
        bad = loss_bad or bool(_nonfinite_gradient(params, self.clip_grad_norm))
        skip, streak, stopped = _guard(bad, int(state.bad_streak), bool(state.stopped),
                                       self.max_bad_steps)
        if not skip:
            state.optimizer.step()
            # The loss estimates -objective of the whole training set: per datapoint, / num_data.
            state.objective_sum += -v / state.vae.num_data * rows
            state.datapoints += rows
        state.bad_streak.fill_(streak)
        if stopped:
            state.stopped.fill_(True)
        return loss_bad, bad

    def _apply_on_device(self, state: TrainState, params: list[torch.Tensor], value: torch.Tensor,
                         rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The guarded update with the flags left on the device (nothing read by the host)."""
        device, optimizer = value.device, state.optimizer
        loss_bad = ~torch.isfinite(value)
        bad = loss_bad | _nonfinite_gradient(params, self.clip_grad_norm).to(device)
        skip, state.bad_streak, state.stopped = _guard(bad, state.bad_streak, state.stopped,
                                                       self.max_bad_steps)
        if optimizer.defaults.get("fused"):  # the fused Adam skips the update on the device
            optimizer.found_inf = skip.to(torch.float32)
            optimizer.step()
        elif not bool(skip):  # an optimizer that cannot skip on the device: read the flag
            optimizer.step()
        # The loss estimates -objective of the whole training set: per datapoint, / num_data.
        state.objective_sum = state.objective_sum + torch.where(
            skip, 0.0, -value / state.vae.num_data * rows
        ).to(state.objective_sum.dtype)
        state.datapoints = state.datapoints + (~skip).to(torch.int64) * rows
        return loss_bad, bad

    def report(self, state: TrainState, checkpoint_dir: Path | None = None) -> None:
        """Read the unreported steps' flags back to the host (one synchronization): warn for each
        skipped step, count them, and raise :class:`TrainingError` at the step where
        ``max_bad_steps`` came in a row (later steps were not applied)."""
        if not state.unreported:
            return
        records, state.unreported = state.unreported, []
        if isinstance(records[0][4], bool):  # flags already read by the host (a CPU)
            flags = [(r[3], r[4]) for r in records]
        else:
            flags = torch.stack([torch.stack([r[3], r[4]]) for r in records]).tolist()
        streak = state.reported_streak
        for (step, epoch, value, _, _), (loss_bad, bad) in zip(records, flags):
            _, streak, stop = _guard(bool(bad), streak, False, self.max_bad_steps)
            if not bad:
                continue
            state.history.skipped_steps += 1
            what = f"loss {float(value)}" if loss_bad else "a non-finite gradient"
            warnings.warn(
                f"step {step} (epoch {epoch + 1}) had {what}; its update was skipped ({streak} in "
                f"a row, training stops at {self.max_bad_steps})",
                NumericalWarning,
                stacklevel=3,
            )
            if stop:
                state.history.num_steps = step
                where = f"; the last checkpoint in {checkpoint_dir} is intact" if checkpoint_dir else ""
                raise TrainingError(
                    f"{streak} steps in a row (up to step {step}) had a NaN or infinite loss or "
                    f"gradient{where}; lower the learning rate "
                    f"(lr={state.optimizer.param_groups[0]['lr']}) or set clip_grad_norm"
                )
        state.reported_streak = streak


def train_step(
    state: TrainState,
    x: torch.Tensor,
    idx: torch.Tensor,
    objective: Objective,
    *,
    kl_weight: float = 1.0,
    clip_grad_norm: float | None = None,
    max_bad_steps: int = 5,
    batch_rows: int | None = None,
    group: Any = None,
) -> tuple[TrainState, torch.Tensor]:
    """One SVI step: ``SVI(objective, clip_grad_norm=..., max_bad_steps=...,
    process_group=group).update(state, x, idx, kl_weight=..., batch_rows=...)`` (see
    :meth:`SVI.update`; the optimizer is the state's). Kept for code written before :class:`SVI`."""
    svi = SVI(objective, clip_grad_norm=clip_grad_norm, max_bad_steps=max_bad_steps,
              process_group=group)
    return svi.update(state, x, idx, kl_weight=kl_weight, batch_rows=batch_rows)


def _scheduled_lr(schedule: Callable[[int], float], epoch: int) -> float:
    """The schedule's learning rate for ``epoch``, checked."""
    try:
        rate = schedule(epoch)
    except Exception as e:
        raise ConfigError(f"the lr schedule failed at epoch {epoch}: {type(e).__name__}: {e}") from e
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (0 < rate < math.inf):
        raise ConfigError(
            f"the lr schedule must return a positive finite number, got {rate!r} at epoch {epoch}"
        )
    return float(rate)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` (one process and rank 0 of many draw alike); other ranks draw
    independent latent noise."""
    return seed if rank == 0 else hash((seed, rank)) % 2**32


def _gather(dataset: Any, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch ``(x, idx)`` of ``indices``, on ``device`` (one gather; a host-to-device copy
    goes through pinned memory, so it does not block the host)."""
    x, idx = dataset[indices]
    x, idx = torch.as_tensor(x), torch.as_tensor(idx)
    if device.type == "cuda" and x.device.type == "cpu":
        x, idx = x.pin_memory(), idx.pin_memory()
    return x.to(device, non_blocking=True), idx.to(device, non_blocking=True)


# ------------------------------------------------------------------------------- fit's callbacks
class Callback(Protocol):
    """A hook of :func:`fit` (both methods optional). ``on_epoch_end`` runs after the epoch's
    history entry and validation, before its checkpoint; under ``torchrun`` on rank 0 only."""

    def on_step_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...


class _Hook:
    """One of :func:`fit`'s jobs, as a callback on its loop (every method optional):
    ``on_epoch_start`` before an epoch's first step, ``on_step_end`` after each step,
    ``on_epoch_end`` once the epoch's history entry is written (the state still at that epoch),
    ``after_epoch`` once the state stands at the next epoch's start (where a checkpoint resumes).
    Entered as a context manager around the loop."""

    def __enter__(self) -> _Hook:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def on_epoch_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def after_epoch(self, state: TrainState) -> None:
        pass


class _UserHook(_Hook):
    """A user's :class:`Callback`, whichever of its two methods it has."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        if hasattr(hook, "on_step_end"):
            self.on_step_end = hook.on_step_end  # type: ignore[method-assign]
        if hasattr(hook, "on_epoch_end"):
            self.on_epoch_end = hook.on_epoch_end  # type: ignore[method-assign]


class _EpochEndFunction:
    """``on_epoch_end(epoch, history)``, :func:`fit`'s original callback form, as a hook."""

    def __init__(self, fn: Callable[[int, History], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, state: TrainState) -> None:
        self.fn(state.epoch + 1, state.history)


class _LearningRate(_Hook):
    """Sets each epoch's rate from the schedule at the epoch's start (also after a resume)."""

    def __init__(self, schedule: Callable[[int], float]) -> None:
        self.schedule = schedule

    def on_epoch_start(self, state: TrainState) -> None:
        rate = _scheduled_lr(self.schedule, state.epoch)
        for group_ in state.optimizer.param_groups:
            group_["lr"] = rate


class _Progress(_Hook):
    """A tqdm bar per epoch, with the running objective per datapoint every 10th step the host
    reads anyway."""

    def __init__(self, num_epochs: int, steps_per_epoch: int, sync_every: int) -> None:
        self.num_epochs, self.steps, self.sync_every = num_epochs, steps_per_epoch, sync_every
        self.bar: Any = None

    def on_epoch_start(self, state: TrainState) -> None:
        self.bar = tqdm(desc=f"epoch {state.epoch + 1}/{self.num_epochs}", leave=False,
                        unit="batch", total=self.steps, initial=state.batch)

    def on_step_end(self, state: TrainState) -> None:
        self.bar.update(1)
        step = state.history.num_steps
        if step % self.sync_every == 0 and step % 10 == 0:
            count = int(state.datapoints)
            if count:
                self.bar.set_postfix(objective=f"{float(state.objective_sum) / count:.2f}")

    def on_epoch_end(self, state: TrainState) -> None:
        self.__exit__()

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Validation(_Hook):
    """The validation ELBO per datapoint (``β = 1``) after each epoch, measured on rank 0."""

    def __init__(self, vae: Any, data: Any, group: Any, main: bool) -> None:
        self.vae, self.data, self.group, self.main = vae, data, group, main

    def on_epoch_end(self, state: TrainState) -> None:
        value = elbo_estimate(self.vae, self.data, 1).mean if self.main else None
        if self.group is not None:
            value = distributed.broadcast_object(value, self.group)
        state.history.validation_elbo[-1] = value
        self.vae.train()


class _Checkpoints(_Hook):
    """Writes the :class:`TrainState` atomically after every epoch and every ``every`` steps
    mid-epoch: rank 0 writes, with every rank's RNG states; every rank learns whether it worked
    (a full disk stops all of them with the same error)."""

    def __init__(self, svi: SVI, folder: Path, config: Any, every: int | None,
                 steps_per_epoch: int) -> None:
        self.svi, self.folder, self.config = svi, folder, config
        self.every, self.steps_per_epoch = every, steps_per_epoch
        self.saved_at: int | None = None

    def save(self, state: TrainState) -> None:
        """Write the checkpoint of the state as it stands (once per step)."""
        if self.saved_at == state.history.num_steps:
            return
        self.svi.report(state, self.folder)
        group = self.svi.process_group
        rngs = distributed.gather_objects(rng_state(), group) if group else [rng_state()]
        problem = None
        if group is None or distributed.is_main(group):
            from . import checkpoint

            try:
                checkpoint.save_train_state(self.folder, state, config=self.config, rng=rngs)
            except CheckpointError as e:
                problem = str(e)
        if group is not None:
            problem = distributed.broadcast_object(problem, group)
        if problem is not None:
            raise CheckpointError(problem)
        self.saved_at = state.history.num_steps

    def on_step_end(self, state: TrainState) -> None:
        mid_epoch = state.batch < self.steps_per_epoch
        if mid_epoch and self.every and state.history.num_steps % self.every == 0:
            self.save(state)

    def after_epoch(self, state: TrainState) -> None:
        self.save(state)


class _Preemption(_Hook):
    """SIGTERM (a scheduler's preemption): the step in progress finishes, a checkpoint is
    written, :class:`Preempted` is raised. Under ``torchrun`` the ranks vote at the steps where
    the host reads the device's flags, so all stop at the same step."""

    def __init__(self, checkpoints: _Checkpoints, sync_every: int, device: torch.device) -> None:
        self.checkpoints, self.sync_every, self.device = checkpoints, sync_every, device
        self.raised = self.stop = False
        self._old: Any = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def _requested(self) -> bool:
        group = self.checkpoints.svi.process_group
        if group is None:
            return self.raised
        votes = torch.tensor([float(self.raised)], device=self.device)
        distributed.all_reduce_sum(votes, group)
        return bool(votes.item())

    def on_step_end(self, state: TrainState) -> None:
        if state.history.num_steps % self.sync_every == 0:
            self.stop = self._requested()
        if self.stop and state.batch < self.checkpoints.steps_per_epoch:
            self.checkpoints.save(state)
            raise self._preempted(state)

    def after_epoch(self, state: TrainState) -> None:  # after the epoch's checkpoint
        if self.stop or self._requested():
            raise self._preempted(state)

    def _preempted(self, state: TrainState) -> Preempted:
        folder = self.checkpoints.folder
        return Preempted(
            f"stopped on SIGTERM after step {state.history.num_steps} (epoch {state.epoch + 1}, "
            f"minibatch {state.batch}); checkpoint {folder / 'checkpoint.pt'}; continue with "
            f"fit(..., resume={str(folder)!r})",
            folder / "checkpoint.pt",
        )


def _resume(
    resume: Any, ckpt_dir: Path | None, fresh: TrainState, settings: dict[str, Any], rank: int,
) -> tuple[Path, TrainState]:
    """Load the checkpoint named by ``resume`` into ``fresh``'s model and optimizer and return
    its :class:`TrainState`, after checking it can continue this run; restore this rank's RNGs."""
    from .checkpoint import checkpoint_path, load_train_state

    if resume is True:
        if ckpt_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir=; or pass resume=<run folder or checkpoint file>")
        path = checkpoint_path(ckpt_dir)
    elif isinstance(resume, (str, os.PathLike)):
        path = checkpoint_path(resume)
    else:
        raise ConfigError(
            f"resume must be True, False/None or a path to a run folder or checkpoint, got {resume!r}"
        )
    state = load_train_state(path, vae=fresh.vae, optimizer=fresh.optimizer)
    saved = state.settings
    if saved.get("num_data") != settings["num_data"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on {saved.get('num_data')} datapoints but train has "
            f"{settings['num_data']}; resume with the same training data"
        )
    if state.batch > 0 and saved.get("batch_size") != settings["batch_size"]:
        raise CheckpointError(
            f"checkpoint {path} stopped inside an epoch trained with batch_size="
            f"{saved.get('batch_size')}; resume with batch_size={saved.get('batch_size')}"
        )
    rngs = state.rng or []
    if rank < len(rngs) and saved.get("world_size", 1) == settings["world_size"]:
        set_rng_state(rngs[rank])
    else:  # another number of processes: same data order, fresh latent noise on the new ranks
        pyro.set_rng_seed(_rank_seed((state.seed + state.history.num_steps) % 2**32, rank))
    state.settings = settings
    state.history.resumed_at_step.append(state.history.num_steps)
    if not state.history.objective or not state.history.train_objective:
        state.history.objective = fresh.history.objective
    return path, state


# ------------------------------------------------------------------------------------------- fit
def fit(
    vae: Any,
    train: Any,
    *,
    loss: ELBO | None = None,
    num_epochs: int = 10,
    batch_size: int = 128,
    lr: float | Callable[[int], float] = 1e-3,
    adam_eps: float | None = None,
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
    callbacks: Iterable[Any] = (),
    process_group: Any = None,
    compile: bool = False,
) -> History:
    r"""Train ``vae`` by SVI on minibatches of ``train``.

    :param vae: a :class:`~pyrovae.VAE` built with ``num_data == len(train)``.
    :param train: a tensor ``(num_datapoints, num_features)`` or a dataset of ``(x, idx)``
        pairs, such as :func:`pyrovae.data.load_dataset` returns.
    :param loss: any Pyro ELBO: ``Trace_ELBO()`` (default), ``TraceMeanField_ELBO()`` (analytic
        KL), :class:`pyrovae.losses.IWAE` (the IWAE bound; not ``RenyiELBO(alpha=0)``, which is
        not the bound under subsampling), :class:`pyrovae.losses.ReparamELBO` (STL gradient).
    :param num_epochs: passes over ``train`` in all (a resumed run counts the epochs already done).
    :param batch_size: datapoints per minibatch (at most ``len(train)``); under ``torchrun`` the
        global minibatch, split across the processes (see :mod:`pyrovae.distributed`).
    :param lr: Adam's learning rate (a resumed run keeps the checkpoint's), or a schedule: a
        function of the epoch (0-based) giving that epoch's rate, applied at each epoch's start,
        so a resumed run follows it too (e.g. Burda et al.'s ``lambda e: 1e-3 * 10 ** (-stage(e)
        / 7)``). It must return a positive finite number for every epoch.
    :param adam_eps: Adam's :math:`\epsilon` (``None``: torch's 1e-8 for a new run, the
        checkpoint's for a resumed one; a number is applied to a resumed run too).
    :param validation: optional held-out data; its ELBO per datapoint is measured every epoch
        (refused for a family that holds parameters per training datapoint, ``LocalNormal``:
        held-out points have none).
    :param seed: seeds Pyro and torch (every draw) and the minibatch order (epoch ``e`` uses a
        permutation seeded by ``(seed, e)``); ``None`` draws a seed from the global RNG. A resumed
        run uses the checkpoint's seed and RNG states.
    :param device: where to train (default: where the model is). The model is moved there;
        ``"cuda"`` under ``torchrun`` means each process's ``cuda:LOCAL_RANK``.
    :param progress: show a tqdm progress bar with the running objective per datapoint.
    :param beta: weight on the KL term, :math:`E_q[\log p(x|z)] - \beta\,KL(q\|p)` (beta-VAE;
        Higgins et al. 2017), passed to model and guide as ``kl_weight`` (it scales the ``"z"``
        site). The validation ELBO and every log-likelihood are of the unweighted model.
    :param kl_warmup_epochs: raise the KL weight linearly from 0 to ``beta`` over this many epochs
        (Sønderby et al. 2016); 0 disables warm-up.
    :param on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each epoch (``epoch``
        counts from 1), e.g. to print progress or save pictures (rank 0 only under torchrun).
    :param checkpoint_dir: a run folder: ``checkpoint.pt`` is written there atomically after
        every epoch (after ``on_epoch_end``), and ``config.json`` once if a config is known. With
        it, SIGTERM finishes the current step, writes a checkpoint and raises :class:`Preempted`.
    :param checkpoint_every_steps: also write a checkpoint every this many steps (mid-epoch).
    :param resume: ``True`` to continue from ``checkpoint_dir``'s checkpoint, or the path of a
        run folder or checkpoint file (checkpoints then go on being written to ``checkpoint_dir``,
        by default that folder). The :class:`TrainState` (model, optimizer, position in the
        epoch, RNG states, history) is restored, so the run ends exactly as an uninterrupted one.
    :param config: the :class:`~pyrovae.build.VAEConfig` the model was built from (default:
        ``vae.config`` if set), saved so that :func:`pyrovae.load_model` can rebuild the model.
    :param clip_grad_norm: if set, clip the total gradient 2-norm to this value every step.
    :param max_bad_steps: a step whose loss or gradient is NaN or infinite is skipped (parameters
        unchanged, a :class:`~pyrovae.errors.NumericalWarning`); this many in a row raise
        :class:`~pyrovae.errors.TrainingError` (the last checkpoint stays as it was).
    :param callbacks: more hooks (:class:`Callback`): objects with ``on_step_end(state)`` and/or
        ``on_epoch_end(state)``.
    :param process_group: ``None`` (default): train data-parallel if ``torch.distributed`` is
        initialized or the environment names peers (``torchrun``); ``False``: one process; or a
        ``ProcessGroup``. See :mod:`pyrovae.distributed`.
    :param compile: compile the loss with ``torch.compile`` (the default ``Trace_ELBO()`` on a
        VAE running its own program, i.e. :meth:`~pyrovae.VAE.trace_elbo_loss`; other losses are
        refused). The compiled loss draws the same noise as the eager one (inductor's
        ``fallback_random``), so runs and resumes match eager ones to float rounding. It pays
        for long runs: compiling takes ~10-25 s, again for a new minibatch size (the last
        minibatch) and once when the KL weight first changes; then a step is ~5-8 % faster on a
        CPU (``benchmarks/train_throughput.py``). Needs a C++ compiler on a CPU.
    :returns: a :class:`History`.
    :raises ConfigError, DataError, CheckpointError, TrainingError, Preempted: see
        :mod:`pyrovae.errors`.

    The optimizer is one ``torch.optim.Adam`` over all parameters (Pyro's ``pyro.optim.Adam``
    keeps one optimizer per tensor and is slower); the loss is Pyro's.
    """
    # 1. The arguments, checked at the boundary: nothing is set up or written before they pass.
    num_epochs = check_positive_int(num_epochs, "num_epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr_schedule = lr if callable(lr) else None
    lr = _scheduled_lr(lr_schedule, 0) if lr_schedule is not None else check_positive_float(lr, "lr")
    if adam_eps is not None:
        adam_eps = check_positive_float(adam_eps, "adam_eps")
    beta = check_positive_float(beta, "beta")
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, (int, float)) or not (
        0 <= kl_warmup_epochs < math.inf
    ):
        raise ConfigError(f"kl_warmup_epochs must be a number >= 0, got {kl_warmup_epochs!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise ConfigError(f"on_epoch_end must be callable, got {type(on_epoch_end).__name__}")
    user_hooks = list(callbacks) + ([_EpochEndFunction(on_epoch_end)] if on_epoch_end else [])
    for hook in user_hooks:
        if not (hasattr(hook, "on_step_end") or hasattr(hook, "on_epoch_end")):
            raise ConfigError(
                f"callbacks must have on_step_end(state) or on_epoch_end(state), got {type(hook).__name__}"
            )
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
    if not isinstance(vae, torch.nn.Module) or not all(
        hasattr(vae, a) for a in ("model", "guide", "check_data")
    ):
        raise ConfigError(f"vae must be a pyrovae.VAE, got {type(vae).__name__}")
    obj = objective(vae, loss, beta=beta, kl_warmup_epochs=kl_warmup_epochs, compile=compile)
    train_set = as_dataset(train, "train")
    n = len(train_set)
    if getattr(vae, "num_data", None) != n:
        raise ConfigError(
            f"the VAE was built with num_data={getattr(vae, 'num_data', None)} but train has {n} "
            f"datapoints; build it with num_data={n} so the plate scales correctly"
        )
    if batch_size > n:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {n} training datapoints; "
            f"use batch_size <= {n}"
        )
    device = distributed.local_device(_resolve_device(vae, device))
    group = distributed.process_group(process_group, device)
    rank, world = (distributed.rank(group), distributed.world_size(group)) if group else (0, 1)
    main = rank == 0
    vae.to(device)
    _check_dataset(vae, train_set, "train", device)
    valid_set = None if validation is None else _validation_set(vae, validation, device)

    # 2. The SVI and its state, fresh or resumed.
    if seed is not None:
        pyro.set_rng_seed(_rank_seed(seed, rank))
    run_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
    if group is not None and seed is None:
        run_seed = distributed.broadcast_object(run_seed, group)
        pyro.set_rng_seed(_rank_seed(run_seed % 2**32, rank))
    svi = SVI(obj, functools.partial(_adam, lr=lr, eps=1e-8 if adam_eps is None else adam_eps),
              clip_grad_norm=clip_grad_norm, max_bad_steps=max_bad_steps, process_group=group)
    settings = {"batch_size": batch_size, "num_data": n, "loss": type(obj.loss).__name__,
                "world_size": world}
    state = svi.init(vae, run_seed, settings=settings)
    if resume not in (None, False):
        resume_path, state = _resume(resume, ckpt_dir, state, settings, rank)
        ckpt_dir = ckpt_dir if ckpt_dir is not None else resume_path.parent
    elif group is not None:
        distributed.broadcast_module(vae, group)
    state.to(device)
    if adam_eps is not None:  # also over a resumed optimizer's saved eps
        for group_ in state.optimizer.param_groups:
            group_["eps"] = adam_eps
    config = config if config is not None else getattr(vae, "config", None)
    if ckpt_dir is not None and main:
        from .checkpoint import remove_stale_temporaries, save_config

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ckpt_dir / "checkpoint.pt")
        if config is not None:
            save_config(ckpt_dir, config)

    # 3. The jobs, as callbacks on the loop, in the order they run. The host reads the device's
    # step flags every `sync_every` steps (at once on a CPU), and before every checkpoint.
    sync_every, steps_per_epoch = _sync_every(device), math.ceil(n / batch_size)
    hooks: list[_Hook] = []
    if lr_schedule is not None:
        hooks.append(_LearningRate(lr_schedule))
    if progress and main:
        hooks.append(_Progress(num_epochs, steps_per_epoch, sync_every))
    if valid_set is not None:
        hooks.append(_Validation(vae, valid_set, group, main))
    if main:
        hooks += [_UserHook(hook) for hook in user_hooks]
    if ckpt_dir is not None:
        checkpoints = _Checkpoints(svi, ckpt_dir, config, checkpoint_every_steps, steps_per_epoch)
        hooks += [checkpoints, _Preemption(checkpoints, sync_every, device)]

    # 4. The loop.
    return _run(svi, state, train_set, hooks, num_epochs=num_epochs, batch_size=batch_size,
                sync_every=sync_every, checkpoint_dir=ckpt_dir)


def _run(svi: SVI, state: TrainState, data: Any, hooks: list[_Hook], *, num_epochs: int,
         batch_size: int, sync_every: int, checkpoint_dir: Path | None) -> History:
    """:func:`fit`'s loop: epochs of minibatches in a reproducible order, one :meth:`SVI.update`
    each, the callbacks between them."""
    group, device = svi.process_group, state.objective_sum.device
    rank, world = (distributed.rank(group), distributed.world_size(group)) if group else (0, 1)
    n = len(data)
    steps_per_epoch = math.ceil(n / batch_size)
    state.vae.train()
    with contextlib.ExitStack() as entered:
        for hook in hooks:
            entered.enter_context(hook)
        for epoch in range(state.epoch, num_epochs):
            if state.epoch != epoch or state.batch == 0:
                state.start_epoch(epoch)
            for hook in hooks:
                hook.on_epoch_start(state)
            start = time.perf_counter() - state.seconds
            # Minibatches are gathered directly (a DataLoader iterator would draw a seed from the
            # global RNG at each epoch's start, which a mid-epoch resume could not replay).
            order = _epoch_order(n, state.seed, epoch).split(batch_size)[state.batch:]
            with pyro.validation_enabled(False), warnings.catch_warnings():
                # Pyro's own "Encountered NaN" warnings repeat the NumericalWarning of the step.
                warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
                for batch in order:
                    x, idx = _gather(data, distributed.shard(batch, rank, world), device)
                    # Warm-up counts this step as done, so the first weight is > 0.
                    w = svi.objective.kl_weight(epoch + (state.batch + 1) / steps_per_epoch)
                    svi.update(state, x, idx, kl_weight=w, batch_rows=len(batch))
                    state.seconds = time.perf_counter() - start
                    if state.history.num_steps % sync_every == 0:
                        svi.report(state, checkpoint_dir)
                    for hook in hooks:
                        hook.on_step_end(state)
            svi.report(state, checkpoint_dir)
            _close_epoch(state, time.perf_counter() - start)
            for hook in hooks:
                hook.on_epoch_end(state)
            state.start_epoch(epoch + 1)
            for hook in hooks:
                hook.after_epoch(state)
    return state.history


def _close_epoch(state: TrainState, seconds: float) -> None:
    """The epoch's :class:`History` entry (the validation ELBO ``None`` until measured)."""
    history, count = state.history, int(state.datapoints)
    history.epoch_seconds.append(seconds)
    history.train_objective.append(float(state.objective_sum) / count if count else math.nan)
    history.validation_elbo.append(None)
    if not math.isfinite(history.train_objective[-1]):
        raise TrainingError(
            f"the training objective became {history.train_objective[-1]} in epoch "
            f"{state.epoch + 1}; lower the learning rate"
        )


def _validation_set(vae: Any, validation: Any, device: torch.device) -> Any:
    """``validation=`` as a checked data set."""
    from .families import capability

    if capability(vae.family, "per_datapoint"):
        raise ConfigError(
            f"validation data cannot be scored by {type(vae.family).__name__}, which holds "
            "parameters only for the training datapoints (per_datapoint = True): a held-out "
            "point's ELBO needs its own fitted parameters; train without validation= and "
            "score held-out data afterwards with pyrovae.elbo(vae, data, local='fit')"
        )
    valid_set = as_dataset(validation, "validation")
    _check_dataset(vae, valid_set, "validation", device)
    return valid_set


#: Steps between host reads of the device's step flags, by device type.
_SYNC_EVERY = {"cpu": 1, "default": 32}


def _sync_every(device: torch.device) -> int:
    """Steps between host reads of ``device``'s step flags (1: every step, as on a CPU)."""
    return _SYNC_EVERY.get(device.type, _SYNC_EVERY["default"])

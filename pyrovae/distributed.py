r"""Data-parallel training and evaluation over ``torch.distributed`` (started by ``torchrun``).

``torchrun --standalone --nproc-per-node=N -m pyrovae train ...`` starts N copies of the program,
each with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
environment; :func:`pyrovae.fit` finds them (:func:`process_group`) and trains data-parallel:

- every rank draws the same permutation of the training set for each epoch (seeded by
  ``(seed, epoch)``) and cuts it into the same *global* minibatches of ``batch_size``;
- rank :math:`r` of :math:`W` takes the :math:`r`-th of :math:`W` contiguous, nearly equal parts
  of each global minibatch (:func:`shard`) and passes its own indices to the ``"data"`` plate, so
  its loss :math:`\mathcal L_r` is scaled by :math:`N / B_r`;
- the gradients are combined by one all-reduce of :math:`\sum_r (B_r / B)\,\nabla \mathcal L_r`
  which, for a loss that is a sum over datapoints (the ELBO, the IWAE bound with the plate scale
  outside the log-sum-exp), is exactly the single-process gradient of the global minibatch,
  :math:`\frac{N}{B} \sum_{i \in \text{batch}} \nabla \ell_i`, whatever ``B mod W``;
- every rank then takes the same optimizer step, so the replicas stay identical; only rank 0
  writes the run folder and the checkpoints (which hold every rank's RNG state).

So ``batch_size`` is the global batch: ``W`` processes with ``batch_size=128`` follow the same
trajectory (up to float rounding and the latent noise each rank draws) as one process with
``batch_size=128``, each rank computing about ``128 / W`` rows per step.

**Evaluation** splits datapoints across the ranks: :func:`pyrovae.log_likelihood`,
:func:`pyrovae.elbo`, :func:`pyrovae.iwae_bounds` and :func:`pyrovae.ais` take
``process_group=True`` (or a group); every rank calls them with the same arguments, scores its
own contiguous run of the estimator's batches and gathers the per-datapoint values
(:func:`all_gather_cat`), so every rank returns the whole result. Each batch's draws are seeded
by ``(seed, batch)`` (:func:`pyrovae.evaluation.batch_seed`), so for a fixed ``seed`` the values
are exactly those of one process, whatever the number of ranks. ``pyrovae evaluate`` and the
evaluation at the end of ``pyrovae train`` do this under ``torchrun``. For an estimator of your
own, :func:`shard_indices` and :func:`all_gather_values` split and gather by datapoint::

    from pyrovae import distributed as dist
    idx = dist.shard_indices(len(data))              # this rank's datapoints (contiguous)
    local = per_datapoint_estimate(vae, data[idx])   # shape (len(idx),) or (len(idx), ...)
    values = dist.all_gather_values(local, len(data))  # shape (len(data), ...), every rank

Outside ``torchrun`` (one process) these helpers are the identity: rank 0 of 1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist

from .errors import ConfigError

__all__ = [
    "process_group",
    "rank",
    "world_size",
    "is_main",
    "shard",
    "shard_indices",
    "all_gather_values",
    "all_gather_cat",
    "all_reduce_int",
    "local_device",
]


def _launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher) with peers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def process_group(group: Any = None, device: torch.device | None = None) -> Any:
    """The process group to train over, or ``None`` for a single process.

    :param group: ``None`` (default): the default group if ``torch.distributed`` is initialized,
        else one initialized now from the environment (``env://``: ``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets them) with the ``gloo`` backend on
        CPU and ``nccl`` on CUDA, else ``None``; ``False``: ``None`` (no data parallelism);
        a ``ProcessGroup``: that group.
    :param device: the training device, to choose the backend.
    """
    if group is False:
        return None
    if group is not None and group is not True:
        return group
    if tdist.is_available() and tdist.is_initialized():
        return tdist.group.WORLD if tdist.get_world_size() > 1 else None
    if not _launched():
        if group is True:
            raise ConfigError(
                "process_group=True but no process group is initialized and RANK/WORLD_SIZE/"
                "MASTER_ADDR are not set; start the program with torchrun --nproc-per-node=N"
            )
        return None
    if not tdist.is_available():
        raise ConfigError("this torch has no torch.distributed; run a single process")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend, init_method="env://")
    return tdist.group.WORLD


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the initialized default group), 0 if none."""
    if group is None and not (tdist.is_available() and tdist.is_initialized()):
        return 0
    return tdist.get_rank(group)


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (default: the initialized default group), 1 if none."""
    if group is None and not (tdist.is_available() and tdist.is_initialized()):
        return 1
    return tdist.get_world_size(group)


def is_main(group: Any = None) -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank(group) == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank)."""
    if device.type == "cuda" and device.index is None and _launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``indices``: the ``rank``-th of ``world_size`` contiguous parts
    whose sizes differ by at most one (``torch.tensor_split``); concatenating the parts in rank
    order gives ``indices`` back."""
    if world_size == 1:
        return indices
    return torch.tensor_split(indices, world_size)[rank]


def shard_indices(num_datapoints: int, group: Any = None) -> torch.Tensor:
    """This rank's datapoints of ``range(num_datapoints)``, for a distributed evaluation (see the
    module docstring); all of them in a single process."""
    return shard(torch.arange(num_datapoints), rank(group), world_size(group))


def all_gather_values(local: torch.Tensor, num_datapoints: int, group: Any = None) -> torch.Tensor:
    """Gather per-datapoint values computed on :func:`shard_indices` parts, in datapoint order.

    :param local: this rank's values, shape ``(len(shard_indices(num_datapoints)), ...)``.
    :param num_datapoints: the total number of datapoints.
    :returns: shape ``(num_datapoints, ...)``, the same on every rank.
    """
    w = world_size(group)
    if w == 1:
        return local
    sizes = [len(p) for p in torch.tensor_split(torch.arange(num_datapoints), w)]
    r = rank(group)
    if local.shape[0] != sizes[r]:
        raise ConfigError(
            f"rank {r} holds {local.shape[0]} values but its shard has {sizes[r]} datapoints; "
            "compute them on data[shard_indices(num_datapoints)]"
        )
    return all_gather_cat(local, group)


def _comm_device(group: Any) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(local: torch.Tensor, group: Any = None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``local`` along ``dim``, in rank order, on every rank.

    The ranks' sizes along ``dim`` may differ (even be zero); the other dimensions must agree.
    The result is on ``local``'s device. Outside a process group: ``local`` itself.
    """
    w = world_size(group)
    if w == 1:
        return local
    comm = _comm_device(group)
    moved = local.movedim(dim, 0).contiguous().to(comm)
    size = torch.tensor([moved.shape[0]], device=comm)
    sizes = [torch.zeros_like(size) for _ in range(w)]
    tdist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    padded = moved.new_zeros((max(counts), *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in range(w)]
    tdist.all_gather(parts, padded, group=group)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.movedim(0, dim).to(local.device)


def all_reduce_int(value: int, group: Any = None) -> int:
    """The sum of every rank's ``value`` (``value`` itself outside a process group)."""
    if world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(group))
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
    return int(t)


# The collectives below serve pyrovae's own training loop and CLI (rank 0 writes, the others
# wait); public so that they can cross modules, not in ``__all__``.
def all_reduce_sum(flat: torch.Tensor, group: Any) -> None:
    """Sum ``flat`` over the ranks, in place."""
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)


def broadcast_module(module: torch.nn.Module, group: Any) -> None:
    """Make every rank's parameters and buffers rank 0's."""
    for t in module.state_dict().values():
        tdist.broadcast(t, src=tdist.get_global_rank(group, 0) if group is not None else 0,
                        group=group)


def gather_objects(obj: Any, group: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""
    w = world_size(group)
    out: list[Any] | None = [None] * w if rank(group) == 0 else None
    tdist.gather_object(obj, out, dst=0, group=group)
    return out


def broadcast_object(obj: Any, group: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group: Any) -> None:
    """Wait until every rank of ``group`` gets here."""
    tdist.barrier(group=group)

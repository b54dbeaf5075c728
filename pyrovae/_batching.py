"""Minibatches of ``(x, idx)`` for training and evaluation (private)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .errors import DataError


class IndexedTensor(Dataset):
    """A tensor of shape ``(N, num_features)`` served as ``(x[index], index)``.

    ``dataset[list_of_indices]`` indexes the tensor once, so a whole minibatch costs one gather.
    """

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        if idx.dim() == 1:  # rows: index_select copies whole rows (~5x faster than data[idx])
            return torch.index_select(self.data, 0, idx.to(self.data.device)), idx
        return self.data[idx.to(self.data.device)], idx


def as_dataset(data: Any, what: str) -> Dataset:
    """Accept a tensor or a dataset returning ``(x, idx)``; raise :class:`DataError` otherwise."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise DataError(
                f"{what} must have shape (num_datapoints, num_features), got {tuple(data.shape)}; "
                "flatten images with x.reshape(len(x), -1)"
            )
        return IndexedTensor(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    raise DataError(
        f"{what} must be a torch.Tensor of shape (num_datapoints, num_features) or a Dataset "
        f"returning (x, idx) pairs (e.g. pyrovae.data.load_dataset), got {type(data).__name__}"
    )


def all_indices(dataset: Dataset) -> torch.Tensor:
    return torch.arange(len(dataset))  # type: ignore[arg-type]


def loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    sampler: Any = None,
) -> DataLoader:
    """A DataLoader yielding whole minibatches ``(x, idx)`` from one gather each."""
    if sampler is None:
        sampler = (
            RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        )
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
    )


def batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential ``(x, idx)`` minibatches covering the data set once."""
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x, idx = dataset[idx]
        yield x, torch.as_tensor(idx)


def model_batches(
    vae: Any, data: Any, batch_size: int, min_points: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential ``(x, idx)`` batches of ``data`` (a tensor or a dataset) on ``vae``'s device,
    the first checked by ``vae.check_data``; fewer than ``min_points`` datapoints are refused."""
    dataset = as_dataset(data, "data")
    n = len(dataset)  # type: ignore[arg-type]
    if n < min_points:
        raise DataError(f"data has {n} datapoint(s); this diagnostic needs at least {min_points}")
    device = next(iter(vae.parameters()), torch.empty(0)).device
    for i, (x, idx) in enumerate(batches(dataset, batch_size)):
        x, idx = x.to(device), idx.to(device)
        if i == 0:
            vae.check_data(x)
        yield x, idx

"""``TensorBatches``: batches cut from tensors already in memory, resumable mid-epoch and shardable across ranks.

A ``DataLoader`` over a resident tensor still builds a Python list of indices per batch and goes through a
sampler, a fetcher and a collate function. Here a batch is one ``index_select`` per tensor of a precomputed
index order, on whatever device the tensors live on, so a GPU-resident dataset is never copied from the host.

Order. With ``shuffle=True`` epoch ``e`` uses ``torch.randperm(N, generator=seed + e)``, the order of
:class:`torch.utils.data.DistributedSampler`, so it depends on the seed and the epoch only (not on the global RNG
or on how many runs came before). With ``num_replicas = R > 1`` the order is split the same way as
``DistributedSampler``: ``pad=True`` (training) repeats the first samples until ``R`` divides the total, so every
rank runs the same number of steps; ``pad=False`` (evaluation) gives every sample to exactly one rank, so metrics
count each sample once.

Resume. Lightning calls :meth:`set_epoch` at every epoch start and, when the object has ``state_dict`` and
``load_state_dict``, stores its state in checkpoints and restores it before iterating. Because the object has a
length, Lightning does not pre-fetch, so the number of batches served equals the number of steps taken, and a run
resumed from a mid-epoch checkpoint continues with exactly the batches it had not yet seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


class TensorBatches:
    """Iterable of batches ``tuple(tensor[index] for tensor in tensors)`` over one rank's share of the rows.

    Args:
        tensors: tensors with the same first dimension ``N`` (e.g. images, labels, sample indices); ``None``
            entries (after the first) pass through as ``None``.
        batch_size: rows per batch (> 0); the last batch may be smaller.
        shuffle: a new permutation each epoch (see the module docstring), else the rows in order.
        seed: seeds the permutations.
        num_replicas: number of ranks the rows are split over (>= 1).
        rank: this process's rank, in ``[0, num_replicas)``.
        pad: with ``num_replicas > 1``, repeat rows so that every rank gets the same number (training); otherwise
            each row goes to exactly one rank (evaluation).
        batch_type: builds each batch from the sliced tensors (e.g. a ``NamedTuple``); default: a plain tuple.
    """

    def __init__(
        self,
        tensors: tuple[Tensor | None, ...],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
        batch_type: Callable[..., tuple] | None = None,
    ) -> None:
        present = [tensor for tensor in tensors if tensor is not None]
        if not present or tensors[0] is None or any(tensor.shape[0] != present[0].shape[0] for tensor in present):
            raise ValueError("TensorBatches needs at least one tensor, all with the same first dimension")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank!r}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.batch_type = batch_type
        self.epoch = 0
        self.batches_served = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already served) from a checkpoint

    # Lightning's ``_set_sampler_epoch`` looks for ``loader.sampler.set_epoch``, and its shuffle check reads
    # ``loader.batch_sampler`` once ``loader.sampler`` exists.
    batch_sampler = None

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_rows(self) -> int:
        """Rows this rank serves per epoch."""
        total = self.tensors[0].shape[0]
        if self.num_replicas == 1:
            return total
        if self.pad:
            return math.ceil(total / self.num_replicas)
        return len(range(self.rank, total, self.num_replicas))

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def rows(self) -> Tensor:
        """The row indices this rank serves in the current epoch, in order (on the tensors' device)."""
        total = self.tensors[0].shape[0]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        if self.num_replicas > 1:
            if self.pad:
                padded_total = math.ceil(total / self.num_replicas) * self.num_replicas
                order = torch.cat([order, order[: padded_total - total]]) if padded_total > total else order
            order = order[self.rank :: self.num_replicas]
        return order.to(self.tensors[0].device)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # A generator: the order is drawn at the first ``next``, after Lightning has called ``set_epoch``.
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = self._resume_at[1]
        self._resume_at = None
        self.batches_served = start
        remaining = self.rows()[start * self.batch_size :]
        # split() of an empty tensor yields one empty chunk: a position at the epoch's end serves nothing.
        for batch_rows in remaining.split(self.batch_size) if remaining.numel() else ():
            self.batches_served += 1
            slices = tuple(None if tensor is None else tensor.index_select(0, batch_rows) for tensor in self.tensors)
            yield self.batch_type(*slices) if self.batch_type is not None else slices

    # ---- Lightning's stateful-loader protocol ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_served": self.batches_served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_served"]))

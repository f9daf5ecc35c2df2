"""Deterministic, resumable, rank-sharded batch order.

The order of samples is a property of the *global* batch, not of the number of ranks: epoch ``e`` is a
permutation of the dataset drawn from ``(seed, e)``; optimizer step ``s`` consumes the next
``global_batch = micro_batch * grad_accum * world_size`` indices of it; inside a step, micro-batch ``m``
of rank ``r`` takes the slice ``[(m * world + r) * micro, ... + micro)``. One rank with micro-batch 4 and
two ranks with micro-batch 2 therefore see the same samples at every optimizer step, which is what lets
a multi-rank run reproduce a single-rank loss curve. An epoch holds ``len(dataset) // global_batch``
steps (the remainder is dropped so every step is full).

The position is one number, the count of micro-batches this rank has consumed (the same on every
rank): ``ResumableBatchSampler(..., start=k)`` continues with exactly the micro-batches an
uninterrupted run would have seen after ``k``. The trainer counts consumption itself, because a
DataLoader with workers pulls batches from the sampler ahead of their use.

Sub-epochs (``subepoch_steps > 0``, GF's frame-skip growth): optimizer step ``s`` lies in sub-epoch
``s // subepoch_steps``, and every item then carries it, ``(index, epoch, subepoch)``; like the epoch, a
function of the position alone, so a resumed run continues in the right sub-epoch. In GF's code a
sub-epoch is a Lightning epoch of ``dataset.subdataset_size`` samples, the dataset rebuilt each epoch with
``current_epoch`` (CIntellifusion/GeometryForcing ``experiments/data_modules/resumable_data_module.py``,
``datasets/video/base_video.py`` ``_build_idx_remap``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableBatchSampler(torch.utils.data.Sampler[list[tuple[int, ...]]]):
    """Yields this rank's micro-batches as ``[(dataset index, epoch), ...]``, forever; with ``subepoch_steps``
    as ``[(dataset index, epoch, subepoch), ...]``.

    The epoch (and sub-epoch) travels with each index so that a dataset whose sampling depends on it (random
    clip start, flips, frame skip) stays deterministic inside DataLoader workers (see ``EpochIndexed``)."""

    def __init__(self, dataset_len: int, micro_batch: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, start: int = 0, subepoch_steps: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if subepoch_steps < 0:
            raise ValueError(f"subepoch_steps must be >= 0, got {subepoch_steps}")
        self.subepoch_steps = subepoch_steps
        self.dataset_len = dataset_len
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = dataset_len // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the dataset has {dataset_len} clips, fewer than one global batch of "
                             f"{self.global_batch} (micro-batch {micro_batch} x grad_accum {grad_accum} x "
                             f"{world_size} ranks)")

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_len, generator=g)

    def micro_batch_indices(self, k: int, perm: torch.Tensor | None = None) -> list[int]:
        """Dataset indices of this rank's ``k``-th micro-batch (0-based, counted over all epochs)."""
        per_epoch = self.steps_per_epoch * self.grad_accum
        epoch, within = divmod(k, per_epoch)
        step, micro = divmod(within, self.grad_accum)
        if perm is None:
            perm = self.permutation(epoch)
        start = step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        return perm[start:start + self.micro_batch].tolist()

    def epoch_of(self, k: int) -> int:
        return k // (self.steps_per_epoch * self.grad_accum)

    def subepoch_of(self, k: int) -> int:
        """The sub-epoch of this rank's ``k``-th micro-batch: its optimizer step // ``subepoch_steps``."""
        return (k // self.grad_accum) // self.subepoch_steps

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        k, epoch, perm = self.start, -1, None
        while True:
            if self.epoch_of(k) != epoch:
                epoch = self.epoch_of(k)
                perm = self.permutation(epoch)
            if self.subepoch_steps:
                sub = self.subepoch_of(k)
                yield [(i, epoch, sub) for i in self.micro_batch_indices(k, perm)]
            else:
                yield [(i, epoch) for i in self.micro_batch_indices(k, perm)]
            k += 1

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum


def select(dataset, key: tuple[int, ...]) -> int:
    """Point ``dataset`` at a sampler item's epoch (``set_epoch``) and sub-epoch (``set_subepoch``), where it
    has them; returns the item's dataset index."""
    index, epoch, *sub = key
    set_epoch = getattr(dataset, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    if sub:
        set_subepoch = getattr(dataset, "set_subepoch", None)
        if set_subepoch is not None:
            set_subepoch(sub[0])
    return index


class EpochIndexed(torch.utils.data.Dataset):
    """Adapter: ``dataset[(index, epoch)]`` calls ``dataset.set_epoch(epoch)`` (if it has one), then
    ``dataset[index]``; ``dataset[(index, epoch, subepoch)]`` also ``dataset.set_subepoch(subepoch)``
    (:func:`select`). Works inside DataLoader workers, where a set_epoch call from the main process
    would not reach the workers' copies."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]):
        return self.dataset[select(self.dataset, key)]

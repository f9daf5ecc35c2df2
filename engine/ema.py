"""Exponential moving average of the weights, sharded across ranks, for every ZeRO stage.

Each rank keeps the fp32 EMA of only its own 1/world slice of every parameter: the parameter is
flattened, padded to a multiple of the world size and cut into equal contiguous slices, rank ``r``
owning slice ``r``. That is exactly how ZeRO-3 partitions a parameter (``param.ds_tensor``), so under
ZeRO-3 the update reads the local partition and never gathers; under stages 0-2 every rank has the
full parameter and reads its slice of it.

Cost per rank: 4 bytes x parameters / world of memory, and one fused ``lerp`` over those elements per
optimizer step (``torch._foreach_lerp_``), no communication. Gathering happens only when a checkpoint
is written (one all-gather per parameter).

Warm-up (``ema.warmup``, on by default in recipes; diffusers' ``EMAModel`` decay): the decay of the update
after optimizer step ``step`` (1-based, the train loop's counter) is

    decay_t = min(decay, (1 + step) / (10 + step))

(0.18 after step 1, 0.5 after step 8, 0.9 after step 80, 0.99 after step 890), so the average forgets
the random initialisation within the first steps instead of after ~1 / (1 - decay) of them. The decay
is a function of the step alone, so a resumed run (EMA shards from the checkpoint, step from
``trainer_state.json``) continues exactly. DFoT's and Geometry Forcing's EMA has no warm-up: a constant decay
(0.9999) from the first step, the average starting at the loaded weights (CIntellifusion/GeometryForcing
``utils/lightning_utils.py``, ``EMAOptimizer.update`` / ``ema_update``); ``ema.warmup: false`` is that.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _zero3_partition(p: torch.Tensor) -> torch.Tensor | None:
    return getattr(p, "ds_tensor", None)


def warmup_decay(decay: float, step: int) -> float:
    """``min(decay, (1 + step) / (10 + step))`` for the update after optimizer step ``step`` (>= 1)."""
    if step < 1:
        raise ValueError(f"EMA warm-up: step must be >= 1 (the optimizer step just taken), got {step}")
    return min(decay, (1 + step) / (10 + step))


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float, rank: int = 0, world_size: int = 1, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.rank = rank
        self.world_size = world_size
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.shards: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.names.append(name)
            self.shapes.append(torch.Size(getattr(p, "ds_shape", p.shape)))
            self.shards.append(self._local_slice(p).detach().float().clone())
        self._params = [p for _, p in model.named_parameters() if p.requires_grad]

    def _local_slice(self, p: torch.Tensor) -> torch.Tensor:
        part = _zero3_partition(p)
        if part is not None:
            return part.view(-1)
        flat = p.detach().reshape(-1)
        size = -(-flat.numel() // self.world_size)
        start = self.rank * size
        piece = flat[start:start + size]
        if piece.numel() < size:   # the last slices are padded with zeros, as ZeRO-3 pads
            piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
        return piece

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Move the average towards the current weights; ``step``: the optimizer step just taken (1-based),
        required with warm-up."""
        if self.warmup and step is None:
            raise ValueError("ShardedEMA.update: warm-up needs the optimizer step (update(step))")
        decay = warmup_decay(self.decay, step) if self.warmup else self.decay
        current = [self._local_slice(p).float() for p in self._params]
        torch._foreach_lerp_(self.shards, current, 1.0 - decay)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA (fp32, CPU), gathered from all ranks. Collective: call on every rank."""
        out = {}
        for name, shape, shard in zip(self.names, self.shapes, self.shards):
            if self.world_size > 1:
                pieces = [torch.empty_like(shard) for _ in range(self.world_size)]
                dist.all_gather(pieces, shard.contiguous())
                flat = torch.cat(pieces)
            else:
                flat = shard
            out[name] = flat[:shape.numel()].view(shape).cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slices of a full EMA state dict (as written by ``full_state_dict``)."""
        for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
            if name not in state:
                raise KeyError(f"EMA state lacks parameter {name!r}")
            if state[name].shape != shape:
                raise ValueError(f"EMA {name!r}: shape {tuple(state[name].shape)} != model {tuple(shape)}")
            flat = state[name].reshape(-1).float()
            size = self.shards[i].numel()
            piece = flat[self.rank * size:(self.rank + 1) * size]
            self.shards[i].zero_()
            self.shards[i][:piece.numel()].copy_(piece)

"""Sequence parallelism for the video DiT (DeepSpeed-Ulysses): each clip's tokens split over N ranks.

Layout. With ``distributed.sequence_parallel: N`` the world of W ranks forms W / N groups of N
consecutive ranks; the ranks of a group see the same clips (the data-parallel rank is ``rank // N``).
Inside the DiT (training forwards only; sampling and validation run whole clips) rank r of a group keeps
the contiguous slice ``[r L / N, (r + 1) L / N)`` of the clip's L tokens in (t, h, w) order: the patch
embedding, every block's norms, MLP and adaLN, and the RoPE tables are computed on the slice only, so
activation memory per rank is ~1/N of the clip's. Attention needs every token: DeepSpeed's
``DistributedAttention`` all-to-all turns ``[B, L / N, heads, d]`` into ``[B, L, heads / N, d]`` (each
rank attends over the whole sequence with a subset of heads, any mask applies unchanged) and back.

Output and gradients. The final layer's token slices are all-gathered into the whole prediction, so the
loss code is unchanged and every rank of a group computes the same full flow-matching loss; the gather's
backward all-reduces (sums) the gradient over the group. Per-token side losses (Geometry Forcing) are
computed on the rank's slice (:class:`ShardedFeatures`) as the mean over its L / N tokens. Both ways, the
gradients summed over a group are N times the whole clip's, and DeepSpeed's average over all W ranks
(ZeRO partitions over all of them) divides by W = N x DP: the data-parallel mean of whole-clip gradients,
as with one rank per clip. Logged values averaged over all ranks are exact: the full loss is the same on
the N ranks, and slices hold equal token counts.

This module only knows process groups; the groups are made by ``engine.distributed.parallel_layout``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's sequence-parallel group: ``size`` ranks, this one at ``rank`` within it."""

    group: Any
    size: int
    rank: int

    def token_range(self, tokens: int) -> tuple[int, int]:
        if tokens % self.size:
            raise ValueError(f"sequence parallelism: {tokens} tokens do not split over {self.size} ranks")
        per = tokens // self.size
        return self.rank * per, (self.rank + 1) * per


_state: dict[str, SequenceParallel | None] = {"sp": None}


def set_sequence_parallel(sp: SequenceParallel | None) -> None:
    """Install the group the DiT's training forwards use (None or size 1: off)."""
    _state["sp"] = sp if sp is not None and sp.size > 1 else None


def sequence_parallel() -> SequenceParallel | None:
    return _state["sp"]


@dataclass
class ShardedFeatures:
    """A block's features under sequence parallelism: this rank's tokens ``[B, stop - start, D]`` of the
    clip's token grid ``grid = (T', H', W')`` flattened in (t, h, w) order."""

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    start: int
    stop: int

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """The same token slice of a full-grid tensor ``[B, T', H', W', C]`` -> ``[B, stop - start, C]``."""
        return full.flatten(1, 3)[:, self.start:self.stop]


class _GatherTokens(torch.autograd.Function):
    """All-gather token slices ``[B, L / N, ...]`` -> ``[B, L, ...]``; backward: sum over the group, slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp = ctx.sp
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=sp.group)
        per = grad.shape[1] // sp.size
        return grad[:, sp.rank * per:(sp.rank + 1) * per], None


def gather_tokens(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    return _GatherTokens.apply(x, sp)


_attention_modules: dict[int, Any] = {}


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      sp: SequenceParallel) -> torch.Tensor:
    """Attention of this rank's query slice over the whole sequence, ``[B, heads, L / N, d]`` in and out,
    through DeepSpeed's ``DistributedAttention`` (all-to-all over heads); ``mask`` is the whole ``[L, L]``."""
    from engine.models.attention import attention

    key = id(sp.group)
    module = _attention_modules.get(key)
    if module is None:
        from deepspeed.sequence.layer import DistributedAttention

        def local(qq, kk, vv, attn_mask=None):   # [B, L, heads / N, d] (DeepSpeed's layout)
            out = attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask)
            return out.transpose(1, 2)

        module = _attention_modules[key] = DistributedAttention(local, sp.group, scatter_idx=2, gather_idx=1)
    out = module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, attn_mask=mask)
    return out.transpose(1, 2)


__all__ = ["SequenceParallel", "ShardedFeatures", "gather_tokens", "sequence_parallel", "set_sequence_parallel",
           "ulysses_attention"]

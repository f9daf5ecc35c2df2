"""Sequence parallelism (DeepSpeed-Ulysses): each clip's tokens split over N ranks, for the video DiT and for
the transformer levels of DFoT's U-ViT3D.

Layout. With ``distributed.sequence_parallel: N`` the world of W ranks forms W / N groups of N
consecutive ranks; the ranks of a group see the same clips (the data-parallel rank is ``rank // N``).
Inside the DiT (training forwards only; sampling and validation run whole clips) rank r of a group keeps
the contiguous slice ``[r L / N, (r + 1) L / N)`` of the clip's L tokens in (t, h, w) order: the patch
embedding, every block's norms, MLP and adaLN, and the RoPE tables are computed on the slice only, so
activation memory per rank is ~1/N of the clip's. Attention needs every token: DeepSpeed's
``DistributedAttention`` all-to-all turns ``[B, L / N, heads, d]`` into ``[B, L, heads / N, d]`` (each
rank attends over the whole sequence with a subset of heads, any mask applies unchanged) and back.

The U-ViT3D (``engine.models.uvit3d``) splits the tokens of its transformer levels (DFoT: level 2 and the
middle blocks, where the long sequences and the memory are): each run of a transformer level's blocks takes
this rank's slice of the level's ``T h w`` tokens (a plain slice of the whole input map), runs the blocks on
it with Ulysses attention, and all-gathers the slices (:func:`gather_tokens`) into the whole map, on which
the Downsample / Upsample convolutions, the skip connections and the convolutional ResBlock levels run whole,
identically on every rank of the group. The ResBlock levels have no attention (DFoT's RE10K model: 12 of its 44
blocks, 32 are transformer blocks), and splitting them would need halo exchanges for their 3x3 convolutions and
whole-frame GroupNorm statistics; their activation memory per rank is therefore not divided by N, only the
transformer levels' is. A transformer level's slice is what a GF alignment of that map reads.

Output and gradients. The final layer's token slices are all-gathered into the whole prediction, so the
loss code is unchanged and every rank of a group computes the same full flow-matching loss; the gather's
backward all-reduces (sums) the gradient over the group. Per-token side losses (Geometry Forcing) are
computed on the rank's slice (:class:`ShardedFeatures`) as the mean over its L / N tokens. Both ways, the
gradients summed over a group are N times the whole clip's, and DeepSpeed's average over all W ranks
(ZeRO partitions over all of them) divides by W = N x DP: the data-parallel mean of whole-clip gradients,
as with one rank per clip. Logged values averaged over all ranks are exact: the full loss is the same on
the N ranks, and slices hold equal token counts.

Why this holds for any mix of sliced and whole (replicated) computation, as in the U-ViT3D: read the N ranks'
forwards as one graph whose objective is the sum of the N ranks' losses. That sum is N L for the 1-rank loss
L (a part computed whole is the same on every rank; a slice's token mean sums over the N slices to N x the
whole mean), so its gradient is N dL/dtheta. Every op's backward is the exact adjoint in that graph: a plain
slice's (gradient into the slice, zero elsewhere), the gather's (sum over the group of the whole-map
gradients, then this rank's slice), the all-to-all's. Hence the per-rank gradients of each parameter sum over
the group to N dL/dtheta, whether the parameter acted on slices (each rank: N x its slice's share) or on
replicated activations (each rank: the whole gradient, N times over the group). A loss on a replicated map
(GF aligning a ResBlock level, or GF's released form on a gathered map, :meth:`ShardedFeatures.gather`) is
computed whole on every rank and counts right the same way. Replicated computation must be identical on the
ranks of a group (same inputs, same random draws: the ranks share one RNG stream). Dropout inside the U-ViT's
split blocks draws from a per-rank stream forked off the shared one (else every slice would drop the same
positions), so a recipe with ``block_dropouts`` > 0 at a transformer level matches 1 rank in distribution
only, not bit for bit.

The same layout serves the DPO train stage (``engine.videogpa.train_dpo``): the ranks of a group train on
the same preference pairs; GeoForge's DiT policy is this DiT, and the diffusers policies (Wan, CogVideoX)
get the same token split from hooks and attention processors built on :func:`tokens_to_heads`,
:func:`heads_to_tokens` and :func:`gather_tokens` (``engine.videogpa.diffusers_sp``). The policy's output
is gathered, so the policy's and the reference's per-sample DPO errors are the whole clip's on every rank.

This module only knows process groups; the groups are made by ``engine.distributed.parallel_layout``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from geoforge.engine.distributed import on_shutdown


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
    clip's token grid ``grid = (T', H', W')`` flattened in (t, h, w) order; ``sp`` the group that holds the
    other slices."""

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    start: int
    stop: int
    sp: SequenceParallel | None = None

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """The same token slice of a full-grid tensor ``[B, T', H', W', C]`` -> ``[B, stop - start, C]``."""
        return full.flatten(1, 3)[:, self.start:self.stop]

    def gather(self) -> torch.Tensor:
        """The whole feature map ``[B, T', H', W', D]`` on every rank of the group (:func:`gather_tokens`: a
        loss of it computed on every rank gets the gradient count of the module docstring)."""
        if self.sp is None:
            raise ValueError("ShardedFeatures.gather: no sequence-parallel group (sp) was recorded")
        return gather_tokens(self.tokens, self.sp).unflatten(1, self.grid)


class _GatherTokens(torch.autograd.Function):
    """All-gather slices ``[B, L / N, ...]`` -> ``[B, L, ...]`` (along ``dim``); backward: sum over the group,
    slice (the exact adjoint of the all-gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, dim: int) -> torch.Tensor:
        ctx.sp, ctx.dim = sp, dim
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp, dim = ctx.sp, ctx.dim
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=sp.group)
        per = grad.shape[dim] // sp.size
        return grad.narrow(dim, sp.rank * per, per), None, None


def gather_tokens(x: torch.Tensor, sp: SequenceParallel, dim: int = 1) -> torch.Tensor:
    """This rank's slice of ``dim`` (tokens by default, or heads) -> the whole, on every rank of the group."""
    return _GatherTokens.apply(x, sp, dim)


def _all_to_all(x: torch.Tensor, sp: SequenceParallel, to_heads: bool) -> torch.Tensor:
    """``[B, L / N, H, d]`` -> ``[B, L, H / N, d]`` (``to_heads``) or back."""
    n = sp.size
    b, length, heads, d = x.shape
    if to_heads:   # send head chunk i to rank i; receive every rank's token slice of my head chunk
        send = x.reshape(b, length, n, heads // n, d).permute(2, 0, 1, 3, 4).contiguous()
    else:          # send token slice i to rank i; receive my token slice of every rank's head chunk
        send = x.reshape(b, n, length // n, heads, d).permute(1, 0, 2, 3, 4).contiguous()
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=sp.group)
    if to_heads:   # out[i] = rank i's tokens [B, L / N, H / N, d]
        return out.permute(1, 0, 2, 3, 4).reshape(b, n * length, heads // n, d)
    return out.permute(1, 2, 0, 3, 4).reshape(b, length // n, n * heads, d)   # out[i] = head chunk i


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, to_heads: bool) -> torch.Tensor:
        ctx.sp, ctx.to_heads = sp, to_heads
        return _all_to_all(x, sp, to_heads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):   # the all-to-all is a permutation: its adjoint is the reverse one
        return _all_to_all(grad, ctx.sp, not ctx.to_heads), None, None


def tokens_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Ulysses' first all-to-all, ``[B, L / N, H, d]`` (this rank's tokens, every head) -> ``[B, L, H / N, d]``
    (every token, this rank's heads ``[r H / N, (r + 1) H / N)``)."""
    if x.shape[2] % sp.size:
        raise ValueError(f"sequence parallelism: {x.shape[2]} heads do not split over {sp.size} ranks")
    return _SeqToHeads.apply(x, sp, True)


def heads_to_tokens(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The inverse of :func:`tokens_to_heads`: ``[B, L, H / N, d]`` -> ``[B, L / N, H, d]``."""
    return _SeqToHeads.apply(x, sp, False)


_attention_modules: dict[int, Any] = {}


def _release_groups() -> None:
    """engine.distributed.shutdown: the installed group and the attention modules built over it."""
    _state["sp"] = None
    _attention_modules.clear()


on_shutdown(_release_groups)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      sp: SequenceParallel) -> torch.Tensor:
    """Attention of this rank's query slice over the whole sequence, ``[B, heads, L / N, d]`` in and out,
    through DeepSpeed's ``DistributedAttention`` (all-to-all over heads); ``mask`` is the whole ``[L, L]``."""
    from geoforge.engine.models.attention import attention

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


__all__ = ["SequenceParallel", "ShardedFeatures", "gather_tokens", "heads_to_tokens", "sequence_parallel",
           "set_sequence_parallel", "tokens_to_heads", "ulysses_attention"]

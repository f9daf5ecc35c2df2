"""Sequence parallelism (DeepSpeed-Ulysses) for the diffusers policies: Wan2.2-TI2V and CogVideoX-I2V.

The same scheme as GeoForge's DiT (``engine.models.sequence_parallel``): in training forwards (the module
in ``train()`` mode and a group installed by ``set_sequence_parallel``) rank r of a group of N keeps the
contiguous slice ``[r L / N, (r + 1) L / N)`` of the clip's L video tokens from the first transformer
block to the output projection; every per-token layer (norms, adaLN, MLP, projections, the output
layer) runs on the slice only. Self-attention goes through Ulysses' all-to-all (every token, H / N heads
per rank) and back; the output projection's slices are all-gathered (``gather_tokens``, whose backward
sums over the group), so the policy's prediction, and with it the per-sample DPO errors of the policy and
of the reference, are the whole clip's on every rank of the group. Sampling and the implicit-accuracy
evaluation (``eval()`` mode) run whole clips.

Installed by hooks and attention processors on the diffusers transformer (:func:`install`), mirroring
where diffusers' own ``_cp_plan`` splits and gathers Wan:

- **Wan** (``WanTransformer3DModel``): the per-token timesteps of TI2V (``timestep [B, L]``) and the RoPE
  tables are sliced, ``blocks.0``'s input is sliced, ``proj_out``'s output gathered. Self-attention
  (``attn1``) is Ulysses; cross-attention to the text (``attn2``) needs no communication: its queries
  are the rank's tokens, its keys and values the (replicated) prompt.
- **CogVideoX** (``CogVideoXTransformer3DModel``, no ``_cp_plan`` in diffusers): its joint attention
  concatenates the text tokens to the video tokens. Only the video tokens are split (at
  ``transformer_blocks.0``); the text stream stays whole on every rank (it is short: 226 tokens). In
  attention the video q/k/v go through the all-to-all, the text q/k/v take this rank's heads locally,
  the two are concatenated into ``[text; every video token]`` for this rank's heads (RoPE on the video
  part, as the stock processor), and afterwards the video output goes back through the all-to-all while
  the text output's heads are all-gathered (backward: summed over the group). The attention is exactly
  the stock processor's, per head.

Why the gradients come out right: each collective's backward is the exact adjoint of its forward, and
every rank of a group computes the same whole-clip loss, so the gradients summed over a group are N times
the whole clip's (replicated text included) and DeepSpeed's average over all ranks divides by N x DP, as
for the DiT. diffusers' own context parallelism (``ContextParallelConfig(ulysses_degree=N)`` +
``enable_parallelism``) is not used: in diffusers 0.42.1 it fails on a CPU-only machine
(``rank % torch.accelerator.device_count()`` with no accelerator: ZeroDivisionError), builds its mesh over
the whole world (no data-parallel groups), and its output all-gather's backward only slices (gradients
1 / N of GeoForge's convention, which DeepSpeed's average assumes).
"""
from __future__ import annotations

import torch
from torch import nn

from geoforge.engine.models.sequence_parallel import (SequenceParallel, gather_tokens, heads_to_tokens, sequence_parallel,
                                             tokens_to_heads)


def _active(module: nn.Module) -> SequenceParallel | None:
    """The group when this forward is sequence-parallel: one is installed and the module is training."""
    sp = sequence_parallel()
    return sp if sp is not None and module.training else None


def _slice(x: torch.Tensor, sp: SequenceParallel, dim: int = 1) -> torch.Tensor:
    start, stop = sp.token_range(x.shape[dim])
    return x.narrow(dim, start, stop - start)


def _replace_arg(args: tuple, kwargs: dict, name: str, position: int, fn) -> tuple[tuple, dict]:
    if name in kwargs:
        kwargs = {**kwargs, name: fn(kwargs[name])}
    elif len(args) > position:
        args = (*args[:position], fn(args[position]), *args[position + 1:])
    return args, kwargs


def _slice_input(name: str, position: int, only_2d: bool = False):
    """A forward pre-hook slicing the tokens (dim 1) of the argument ``name`` (or positional ``position``)."""
    def hook(module, args, kwargs):
        sp = _active(module)
        if sp is None:
            return None
        return _replace_arg(args, kwargs, name, position,
                            lambda x: x if x is None or (only_2d and x.ndim != 2) else _slice(x, sp))
    return hook


def _slice_output(module, args, output):
    sp = _active(module)
    if sp is None:
        return None
    return tuple(_slice(t, sp) for t in output) if isinstance(output, tuple) else _slice(output, sp)


def _gather_output(module, args, output):
    sp = _active(module)
    return None if sp is None else gather_tokens(output, sp)


def _no_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError("sequence parallelism: the policy's self-attention takes no attention mask")


def _wan_processor():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:   # as WanAttnProcessor
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(x)

    class UlyssesWanAttnProcessor(WanAttnProcessor):
        """Wan's self-attention over a token slice: Ulysses all-to-all around the stock attention."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            sp = _active(attn)
            if sp is None or encoder_hidden_states is not None or attn.add_k_proj is not None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            _no_mask(attention_mask)
            if getattr(attn, "fused_projections", False):
                raise ValueError("sequence parallelism: fused q/k/v projections are not supported")
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))   # [B, L / N, H, d]
            k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:   # the rank's rows of the RoPE tables (sliced by the rope hook)
                q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
            q, k, v = (tokens_to_heads(t, sp) for t in (q, k, v))                   # [B, L, H / N, d]
            out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend)
            out = heads_to_tokens(out, sp).flatten(2, 3).type_as(q)               # [B, L / N, H d]
            return attn.to_out[1](attn.to_out[0](out))

    return UlyssesWanAttnProcessor()


def _cogvideox_processor():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.embeddings import apply_rotary_emb

    class UlyssesCogVideoXAttnProcessor(CogVideoXAttnProcessor2_0):
        """CogVideoX's joint attention with the video tokens split (Ulysses) and the text tokens whole."""

        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
            sp = _active(attn)
            if sp is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            _no_mask(attention_mask)
            text = encoder_hidden_states.size(1)
            x = torch.cat([encoder_hidden_states, hidden_states], dim=1)            # [B, Lt + Lv / N, D]
            b = x.shape[0]
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            d = k.shape[-1] // attn.heads
            q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))   # [B, H, L, d]
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            per = attn.heads // sp.size
            mine = slice(sp.rank * per, (sp.rank + 1) * per)

            def joint(t: torch.Tensor, rope: bool) -> torch.Tensor:   # -> [B, H / N, Lt + Lv, d]
                video = tokens_to_heads(t[:, :, text:].transpose(1, 2), sp).transpose(1, 2)
                if rope and image_rotary_emb is not None:   # every video token here: the whole RoPE table
                    video = apply_rotary_emb(video, image_rotary_emb)
                return torch.cat([t[:, mine, :text], video], dim=2)

            out = nn.functional.scaled_dot_product_attention(joint(q, True), joint(k, not attn.is_cross_attention),
                                                             joint(v, False), dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2)                                                # [B, Lt + Lv, H / N, d]
            out_text = gather_tokens(out[:, :text].contiguous(), sp, dim=2)          # [B, Lt, H, d]
            out_video = heads_to_tokens(out[:, text:].contiguous(), sp)              # [B, Lv / N, H, d]
            out = torch.cat([out_text, out_video], dim=1).flatten(2, 3)
            out = attn.to_out[1](attn.to_out[0](out))
            encoder_hidden_states, hidden_states = out.split([text, out.size(1) - text], dim=1)
            return hidden_states, encoder_hidden_states

    return UlyssesCogVideoXAttnProcessor()


def install(network: nn.Module, kind: str) -> None:
    """Make the diffusers transformer ``network`` (not yet wrapped by peft) sequence-parallel in training
    forwards when a group is installed (see the module docstring); a no-op in every other forward."""
    if getattr(network, "_geoforge_sp", False):
        return
    if kind == "wan_ti2v":
        for block in network.blocks:
            block.attn1.set_processor(_wan_processor())
        network.register_forward_pre_hook(_slice_input("timestep", 1, only_2d=True), with_kwargs=True)
        network.rope.register_forward_hook(_slice_output)
        network.blocks[0].register_forward_pre_hook(_slice_input("hidden_states", 0), with_kwargs=True)
    elif kind == "cogvideox_i2v":
        for block in network.transformer_blocks:
            block.attn1.set_processor(_cogvideox_processor())
        network.transformer_blocks[0].register_forward_pre_hook(_slice_input("hidden_states", 0), with_kwargs=True)
    else:
        raise ValueError(f"sequence parallelism: no plan for the {kind!r} policy")
    network.proj_out.register_forward_hook(_gather_output)
    network._geoforge_sp = True   # installed once (a plain flag: the reference's deepcopy copies it)


__all__ = ["install"]

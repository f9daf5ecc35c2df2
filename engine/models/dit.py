"""Video DiT for diffusion forcing: per-frame noise levels, 3D RoPE, camera / action conditioning.

Layout. ``x [B, T, C, H, W]`` (pixels or latents) is cut into patches of ``tp x p x p`` (time x
height x width) and embedded linearly, giving tokens ``[B, T', S, D]`` with ``T' = T / tp`` token
frames and ``S = (H / p) * (W / p)`` tokens per frame, in (t, h, w) row-major order.

Conditioning. Each token gets a conditioning vector ``c = e_t(frame) + [e_cam(token) + e_act(frame)]``:
the noise-level embedding of its frame (every frame has its own flow time t: diffusion forcing), the
camera map patch-embedded on the same ``tp x p x p`` grid, and the action embedding of its frame. With
``tp > 1`` the per-frame features of the tp frames in a patch are concatenated before the embedding MLPs
(see ``engine.models.conditioning``). The bracketed part is dropped (zeroed) for samples selected by
``drop_cond`` or, in training, with probability ``cond_dropout`` (classifier-free guidance).
Without a camera, c is per frame ``[B, T', 1, D]`` and modulations are broadcast over the frame.

Blocks. Pre-norm transformer blocks with adaLN-Zero: ``SiLU(c) -> Linear -> (shift, scale, gate) x 2``,
zero-initialised so every block starts as the identity; QK RMSNorm; 3D RoPE on q and k; full 3D
attention or frame-causal attention (a token sees its own and earlier token frames); GELU(tanh) MLP.
The final adaLN + linear is zero-initialised, so the untrained model outputs zeros.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from einops import rearrange

from geoforge.engine.models.attention import attention, frame_causal_mask
from geoforge.engine.models.conditioning import CAMERA_KINDS, ActionEmbedding, CameraEmbedding, NoiseLevelEmbedding
from geoforge.engine.models.rope import apply_rope, rope_axis_dims, rope_tables
from geoforge.engine.models.sequence_parallel import ShardedFeatures, gather_tokens, sequence_parallel, ulysses_attention
from geoforge.engine.schema import ConfigError

# size -> (hidden_dim, depth, num_heads)
DIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 6, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
ATTENTION_KINDS = ("full", "frame_causal")


@dataclass
class DiTConfig:
    """Architecture of ``VideoDiT``. ``hidden_dim``/``depth``/``num_heads`` = None take the ``size`` preset."""

    size: str = "tiny"
    hidden_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    in_channels: int = 3  # 3 for pixels, 4 / 16 for VAE latents
    patch_size: int = 2
    temporal_patch_size: int = 1
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    attention: str = "full"  # "full" | "frame_causal"
    camera: str = "none"  # "none" | "rays" (NeRF-encoded origin + direction) | "plucker"
    camera_freqs: int = 15  # NeRF frequencies of the "rays" encoding (15 -> 180 channels)
    camera_relative: bool = True  # express cameras relative to the first frame
    latent_downsample: int = 1  # pixels per grid cell of x (8 for an SD-VAE latent); rescales intrinsics
    action_dim: int = 0
    cond_dropout: float = 0.0  # probability of dropping camera + action conditioning of a whole sample
    rope_theta: float = 10000.0

    def resolved(self) -> DiTConfig:
        """A copy with hidden_dim / depth / num_heads filled in from the preset where None."""
        if self.size not in DIT_PRESETS:
            raise ConfigError(f"size: must be one of {tuple(DIT_PRESETS)}, got {self.size!r}")
        hidden, depth, heads = DIT_PRESETS[self.size]
        return replace(self, hidden_dim=hidden if self.hidden_dim is None else self.hidden_dim,
                       depth=depth if self.depth is None else self.depth,
                       num_heads=heads if self.num_heads is None else self.num_heads)

    def validate(self) -> None:
        """Raise ConfigError naming the field of an impossible setting (``engine.schema``'s contract); the
        checks apply to :meth:`resolved` (presets filled in)."""
        cfg = self.resolved()
        for name in ("hidden_dim", "depth", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
                     "camera_freqs", "latent_downsample"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
        if cfg.hidden_dim % cfg.num_heads:
            raise ConfigError(f"hidden_dim: {cfg.hidden_dim} must be divisible by num_heads ({cfg.num_heads})")
        try:
            rope_axis_dims(cfg.hidden_dim // cfg.num_heads)
        except ValueError as err:
            raise ConfigError(f"hidden_dim / num_heads: {err}") from None
        if cfg.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio: must be > 0, got {cfg.mlp_ratio}")
        if cfg.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention: must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")
        if cfg.camera not in CAMERA_KINDS:
            raise ConfigError(f"camera: must be one of {CAMERA_KINDS}, got {cfg.camera!r}")
        if cfg.action_dim < 0:
            raise ConfigError(f"action_dim: must be >= 0, got {cfg.action_dim}")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise ConfigError(f"cond_dropout: must be in [0, 1), got {cfg.cond_dropout}")
        if cfg.cond_dropout > 0 and cfg.camera == "none" and cfg.action_dim == 0:
            raise ConfigError("cond_dropout: > 0 needs a conditioning to drop (camera != 'none' or action_dim > 0)")
        if cfg.rope_theta <= 1.0:
            raise ConfigError(f"rope_theta: must be > 1, got {cfg.rope_theta}")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@functools.lru_cache(maxsize=16)
def _cached_frame_causal_mask(frames: int, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # usable by autograd even if first built under inference mode
        return frame_causal_mask(frames, tokens_per_frame, device=device)


class QKNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows its input's dtype: under bf16 autocast q and k arrive in bf16, and torch's
    fused kernel takes them only with a weight of the same dtype (else an unfused path and a warning per call).
    The weight stays float32 (its gradient flows back through the cast); the state dict is ``nn.RMSNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block on tokens ``[B, T', S, D]`` with conditioning ``[B, T', S or 1, D]``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = QKNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)

    def attend(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, sp=None) -> torch.Tensor:
        b, frames, s, _ = h.shape
        q, k, v = rearrange(self.qkv(h), "b t s (three n d) -> three b n (t s) d", three=3, n=self.heads)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        out = attention(q, k, v, mask) if sp is None else ulysses_attention(q, k, v, mask, sp)   # SP: all-to-all
        out = rearrange(out, "b n (t s) d -> b t s (n d)", t=frames)
        return self.proj(out)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, sp=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1 * self.attend(_modulate(self.norm1(x), shift1, scale1), cos, sin, mask, sp)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialised linear to ``tp * p * p * C`` values per token."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """The video DiT; see the module docstring for layout and conditioning."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg = cfg.resolved()
        d, p, tp = cfg.hidden_dim, cfg.patch_size, cfg.temporal_patch_size
        patch_dim = tp * p * p * cfg.in_channels
        self.patch_embed = nn.Linear(patch_dim, d)
        self.noise_embed = NoiseLevelEmbedding(d, tp)
        self.camera_embed = (CameraEmbedding(cfg.camera, d, p, tp, cfg.camera_freqs, cfg.latent_downsample,
                                             cfg.camera_relative) if cfg.camera != "none" else None)
        self.action_embed = ActionEmbedding(cfg.action_dim, d, tp) if cfg.action_dim else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(d, patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) noise MLP, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.noise_embed.mlp[0], self.noise_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [blk.ada for blk in self.blocks] + [self.final.ada, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"x must be [B, T, {cfg.in_channels}, H, W] (in_channels={cfg.in_channels}), "
                             f"got {tuple(x.shape)}")
        b, frames, _, height, width = x.shape
        if frames % cfg.temporal_patch_size:
            raise ValueError(f"x: frames ({frames}) must be divisible by temporal_patch_size "
                             f"({cfg.temporal_patch_size})")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"x: H x W ({height} x {width}) must be divisible by patch_size ({cfg.patch_size})")
        if t.shape != (b, frames):
            raise ValueError(f"t must be [B, T] = {(b, frames)} (one flow time per frame), got {tuple(t.shape)}")

    def _extra_condition(self, x: torch.Tensor, intrinsics: torch.Tensor | None, extrinsics: torch.Tensor | None,
                         actions: torch.Tensor | None, drop_cond: torch.Tensor | None) -> torch.Tensor | None:
        """Camera + action embedding ``[B, T', S or 1, D]`` with dropped samples zeroed, or None."""
        cfg, (b, frames, _, height, width) = self.cfg, x.shape
        extra = None
        if self.camera_embed is not None:
            if intrinsics is None or extrinsics is None:
                raise ValueError(f"camera={cfg.camera!r}: forward needs intrinsics [B, T, 3, 3] and extrinsics "
                                 f"[B, T, 3, 4]")
            if intrinsics.shape != (b, frames, 3, 3) or extrinsics.shape != (b, frames, 3, 4):
                raise ValueError(f"intrinsics / extrinsics must be {(b, frames, 3, 3)} / {(b, frames, 3, 4)}, "
                                 f"got {tuple(intrinsics.shape)} / {tuple(extrinsics.shape)}")
            extra = self.camera_embed(intrinsics, extrinsics, height, width)
        if self.action_embed is not None:
            if actions is None or actions.shape[:2] != (b, frames):
                raise ValueError(f"action_dim={cfg.action_dim}: forward needs actions [B, T, {cfg.action_dim}] = "
                                 f"{(b, frames, cfg.action_dim)}, got {None if actions is None else tuple(actions.shape)}")
            act = self.action_embed(actions)[:, :, None]
            extra = act if extra is None else extra + act
        if extra is None:
            return None
        if drop_cond is None and self.training and cfg.cond_dropout > 0:
            drop_cond = torch.rand(b, device=x.device) < cfg.cond_dropout
        if drop_cond is not None:
            if drop_cond.shape != (b,):
                raise ValueError(f"drop_cond must be a bool tensor [B] = [{b}], got {tuple(drop_cond.shape)}")
            extra = extra * (~drop_cond.to(device=extra.device, dtype=torch.bool)).to(extra.dtype)[:, None, None, None]
        return extra

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, intrinsics: torch.Tensor | None = None,
                extrinsics: torch.Tensor | None = None, actions: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None, return_features: Sequence[int] = ()
                ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Velocity ``[B, T, C, H, W]`` for ``x [B, T, C, H, W]`` at per-frame flow times ``t [B, T]``.

        ``return_features``: 1-based block indices; block i's output (after its residual) is returned
        as ``[B, T', H / p, W / p, D]`` in a dict next to the output.
        """
        cfg = self.cfg
        self._check_inputs(x, t)
        wanted = set(return_features)
        if any(i < 1 or i > cfg.depth for i in wanted):
            raise ValueError(f"return_features: block indices are 1-based in [1, {cfg.depth}], got {sorted(wanted)}")
        b, frames, _, height, width = x.shape
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        grid = (frames // tp, height // p, width // p)

        dtype = self.patch_embed.weight.dtype
        patches = rearrange(x.to(dtype), "b (t pt) c (h ph) (w pw) -> b t (h w) (pt ph pw c)", pt=tp, ph=p, pw=p)
        sp = sequence_parallel() if self.training else None   # sampling / validation: whole clips
        if sp is not None:
            return self._forward_sequence_parallel(patches, t, grid, wanted, sp, intrinsics=intrinsics,
                                                   extrinsics=extrinsics, actions=actions, drop_cond=drop_cond, x=x)
        tokens = self.patch_embed(patches)
        cond = self.noise_embed(t)[:, :, None]
        extra = self._extra_condition(x, intrinsics, extrinsics, actions, drop_cond)
        if extra is not None:
            cond = cond + extra
        c = nn.functional.silu(cond)
        cos, sin = rope_tables(*grid, cfg.hidden_dim // cfg.num_heads, cfg.rope_theta, x.device)
        mask = (_cached_frame_causal_mask(grid[0], grid[1] * grid[2], x.device)
                if cfg.attention == "frame_causal" else None)

        features = {}
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, cos, sin, mask)
            if index in wanted:
                features[index] = tokens.unflatten(2, grid[1:])
        out = rearrange(self.final(tokens, c), "b t (h w) (pt ph pw c) -> b (t pt) c (h ph) (w pw)",
                        h=grid[1], pt=tp, ph=p, pw=p)
        return (out, features) if wanted else out

    def _forward_sequence_parallel(self, patches: torch.Tensor, t: torch.Tensor, grid: tuple[int, int, int],
                                   wanted: set[int], sp, *, x: torch.Tensor, intrinsics, extrinsics, actions,
                                   drop_cond):
        """``forward`` on this rank's token slice (``engine.models.sequence_parallel``): same result, the
        output all-gathered, block features returned as :class:`ShardedFeatures`."""
        cfg = self.cfg
        b, frames_tok, s, _ = patches.shape
        start, stop = sp.token_range(frames_tok * s)
        tokens = self.patch_embed(patches.flatten(1, 2)[:, start:stop])   # [B, L/N, D]
        cond = self.noise_embed(t)[:, :, None]
        extra = self._extra_condition(x, intrinsics, extrinsics, actions, drop_cond)
        if extra is not None:
            cond = cond + extra
        c = nn.functional.silu(cond)   # [B, T', 1 or S, D]
        if start % s == 0 and stop % s == 0:   # whole token frames: keep [B, T'/N, S, D], c per frame broadcasts
            f0, f1 = start // s, stop // s
            tokens, c = tokens.unflatten(1, (f1 - f0, s)), c[:, f0:f1]
        else:   # [B, 1, L/N, D] with c per token
            tokens = tokens[:, None]
            c = (c[:, torch.arange(start, stop, device=c.device) // s, 0] if c.shape[2] == 1
                 else c.flatten(1, 2)[:, start:stop])[:, None]
        cos, sin = rope_tables(*grid, cfg.hidden_dim // cfg.num_heads, cfg.rope_theta, x.device)
        cos, sin = cos[start:stop], sin[start:stop]
        mask = (_cached_frame_causal_mask(grid[0], grid[1] * grid[2], x.device)
                if cfg.attention == "frame_causal" else None)
        features = {}
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, cos, sin, mask, sp)
            if index in wanted:
                features[index] = ShardedFeatures(tokens.reshape(b, stop - start, -1), grid, start, stop, sp)
        local = self.final(tokens, c).reshape(b, stop - start, -1)
        full = gather_tokens(local, sp).unflatten(1, (frames_tok, s))
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        out = rearrange(full, "b t (h w) (pt ph pw c) -> b (t pt) c (h ph) (w pw)", h=grid[1], pt=tp, ph=p, pw=p)
        return (out, features) if wanted else out


def num_params(cfg: DiTConfig) -> int:
    """Exact parameter count of ``VideoDiT(cfg)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VideoDiT(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: DiTConfig, frames: int, height: int, width: int) -> float:
    """Forward FLOPs per token (2 per multiply-add) of the blocks and in/out projections.

    For a clip ``[T, C, H, W]`` = (frames, height, width): L = T/tp * (H/p)(W/p) tokens. Per block and
    token: qkv + proj 8 D^2, MLP 4 r D^2, attention 4 D L_ctx (q k^T and A v) with L_ctx = L for full
    attention and the mean visible length S (T' + 1) / 2 for frame-causal; adaLN 12 D^2 per token with a
    camera (per-token conditioning), negligible otherwise. Embeddings other than the patch embedding
    are ignored. A training step costs about 3x (4x with activation checkpointing).
    """
    cfg.validate()
    cfg = cfg.resolved()
    d, p, tp = cfg.hidden_dim, cfg.patch_size, cfg.temporal_patch_size
    t_tok, s_tok = frames // tp, (height // p) * (width // p)
    ctx = t_tok * s_tok if cfg.attention == "full" else s_tok * (t_tok + 1) / 2
    per_block = 8 * d * d + 4 * cfg.mlp_ratio * d * d + 4 * d * ctx + (12 * d * d if cfg.camera != "none" else 0)
    patch_dim = tp * p * p * cfg.in_channels
    return cfg.depth * per_block + 2 * 2 * patch_dim * d

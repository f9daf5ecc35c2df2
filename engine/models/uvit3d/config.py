"""Architecture of DFoT's U-ViT3D (``UViT3DPose``): the fields of DFoT's backbone config, typed.

``UViT3DConfig.from_dfot_constructor(constructor)`` reads the ``constructor`` object of a resolved DFoT
config (``cfg``, ``x_shape``, ``max_tokens``, ...; see ``shared/reference/dfot_uvit3d_re10k_config.json``).
The RealEstate10K model is :data:`RE10K`. Field names follow DFoT's; ``channels[i]`` is the width of
level i (``len(channels)`` levels, the last one is the middle), ``num_updown_blocks[i]`` the blocks of
down level i (and of up level i), ``block_types[i]`` ``"ResBlock"`` or ``"TransformerBlock"``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from geoforge.engine.models.rope import dfot_axis_dims
from geoforge.engine.schema import ConfigError

BLOCK_TYPES = ("ResBlock", "TransformerBlock")
GROUPS = 32  # GroupNorm groups of the ResBlocks (DFoT's NormalizeWithBias)


@dataclass
class UViT3DConfig:
    """DFoT U-ViT3D with the ray-encoding pose condition (see the module docstring)."""

    channels: list[int] = field(default_factory=lambda: [128, 256, 576, 1152])
    emb_channels: int = 1024
    patch_size: int = 2
    block_types: list[str] = field(
        default_factory=lambda: ["ResBlock", "ResBlock", "TransformerBlock", "TransformerBlock"])
    block_dropouts: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.1, 0.1])
    num_updown_blocks: list[int] = field(default_factory=lambda: [3, 3, 6])
    num_mid_blocks: int = 20
    num_heads: int = 9
    use_checkpointing: list[bool] = field(default_factory=lambda: [False, False, False, True])
    cond_dim: int = 180               # ray encoding: 2 (origin, direction) x 3 x 2 (sin, cos) x 15 frequencies
    external_cond_dropout: float = 0.1  # whole-clip pose dropout in training (pose classifier-free guidance)
    use_fourier_noise_embedding: bool = True
    noise_freq_dim: int = 256          # DFoT's UViT3D.noise_level_dim
    in_channels: int = 3
    resolution: int = 256
    max_frames: int = 16               # DFoT's max_tokens: only the official RoPE buffers depend on it
    rope_theta: float = 10000.0

    @classmethod
    def from_dfot_constructor(cls, constructor: Mapping[str, Any]) -> UViT3DConfig:
        """The config of ``UViT3DPose(cfg, x_shape, max_tokens, external_cond_dim)`` from its arguments."""
        cfg = constructor["cfg"] if "cfg" in constructor else constructor
        name = cfg.get("name", "u_vit3d_pose")
        if name != "u_vit3d_pose":
            raise ValueError(f"constructor.cfg.name: only DFoT's 'u_vit3d_pose' is supported, got {name!r}")
        if cfg.get("pos_emb_type", "rope") != "rope":
            raise ValueError(f"constructor.cfg.pos_emb_type: only 'rope' is supported, got {cfg['pos_emb_type']!r}")
        x_shape = list(constructor.get("x_shape", [3, 256, 256]))
        if len(x_shape) != 3 or x_shape[1] != x_shape[2]:
            raise ValueError(f"constructor.x_shape: DFoT's U-ViT3D takes square [C, H, H] frames, got {x_shape}")
        config = cls(channels=list(cfg["channels"]), emb_channels=cfg["emb_channels"], patch_size=cfg["patch_size"],
                     block_types=list(cfg["block_types"]), block_dropouts=[float(d) for d in cfg["block_dropouts"]],
                     num_updown_blocks=list(cfg["num_updown_blocks"]), num_mid_blocks=cfg["num_mid_blocks"],
                     num_heads=cfg["num_heads"], use_checkpointing=[bool(c) for c in cfg["use_checkpointing"]],
                     cond_dim=cfg.get("conditioning", {}).get("dim", 180),
                     external_cond_dropout=float(cfg.get("external_cond_dropout", 0.0)),
                     use_fourier_noise_embedding=bool(cfg.get("use_fourier_noise_embedding", False)),
                     in_channels=x_shape[0], resolution=x_shape[1],
                     max_frames=constructor.get("max_tokens", 16))
        config.validate()
        return config

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    @property
    def num_feature_maps(self) -> int:
        """Per-level maps of ``return_latents``: down levels, the middle, up levels (7 for 4 levels)."""
        return 2 * self.num_levels - 1

    def is_transformer(self, level: int) -> bool:
        return self.block_types[level] == "TransformerBlock"

    def validate(self) -> None:
        """Raise ConfigError naming the field of an impossible setting (``engine.schema``'s contract)."""
        n = self.num_levels
        if n < 2:
            raise ConfigError(f"channels: at least 2 levels, got {self.channels}")
        for name, length in (("block_types", n), ("block_dropouts", n), ("use_checkpointing", n),
                             ("num_updown_blocks", n - 1)):
            if len(getattr(self, name)) != length:
                raise ConfigError(f"{name}: needs {length} entries for {n} levels, got {getattr(self, name)}")
        for t in self.block_types:
            if t not in BLOCK_TYPES:
                raise ConfigError(f"block_types: each must be one of {BLOCK_TYPES}, got {t!r}")
        for name in ("emb_channels", "patch_size", "num_heads", "cond_dim", "in_channels", "resolution",
                     "max_frames", "noise_freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if any(c < 1 for c in self.channels) or any(b < 0 for b in self.num_updown_blocks) or self.num_mid_blocks < 0:
            raise ConfigError("channels / num_updown_blocks / num_mid_blocks: must be positive")
        for level, (kind, ch, p) in enumerate(zip(self.block_types, self.channels, self.block_dropouts)):
            if kind == "ResBlock":
                if ch % GROUPS:
                    raise ConfigError(f"channels[{level}]: a ResBlock level needs a multiple of {GROUPS} "
                                     f"(GroupNorm groups), got {ch}")
                if p != 0.0:
                    raise ConfigError(f"block_dropouts[{level}]: DFoT's ResBlock has no dropout, got {p}")
            else:
                if ch % self.num_heads:
                    raise ConfigError(f"channels[{level}]: {ch} is not divisible by num_heads={self.num_heads}")
                try:
                    dfot_axis_dims(ch // self.num_heads)
                except ValueError as err:
                    raise ConfigError(f"channels[{level}] / num_heads: {err}") from None
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"block_dropouts[{level}]: must be in [0, 1), got {p}")
        if self.resolution % (self.patch_size * 2 ** (n - 1)):
            raise ConfigError(f"resolution: {self.resolution} must be divisible by patch_size * 2^(levels - 1) = "
                             f"{self.patch_size * 2 ** (n - 1)}")
        if not 0.0 <= self.external_cond_dropout < 1.0:
            raise ConfigError(f"external_cond_dropout: must be in [0, 1), got {self.external_cond_dropout}")
        if self.noise_freq_dim % 2:
            raise ConfigError(f"noise_freq_dim: must be even, got {self.noise_freq_dim}")


RE10K = UViT3DConfig()   # DFoT / Geometry Forcing RealEstate10K (458,818,051 parameters)

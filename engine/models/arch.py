"""The recipe's ``model`` section: which backbone (``arch``), its config, and pretrained weights to start from.

- ``arch: dit`` (default): GeoForge's video DiT; the DiT fields of this section (:class:`DiTConfig`) apply.
- ``arch: uvit3d``: DFoT's U-ViT3D (:mod:`engine.models.uvit3d`), configured by ``model.uvit3d`` (DFoT's field
  names; omitted = the released RealEstate10K model). It is trained with DFoT's continuous diffusion
  (recipe section ``dfot``), the pairing of the released weights. ``model.cond_dropout`` is its pose dropout
  (the trainer draws it per sample and passes it as the pose mask; the U-ViT's own
  ``external_cond_dropout`` is then not used). Its feature maps for ``gf.dit_block`` are numbered 1..7 (GF's
  ``latents_info`` + 1: 3 = the level-2 map GF aligns). The DiT fields other than ``cond_dropout`` are ignored.
- ``pretrained``: weights to load after building - a DFoT / Geometry Forcing Lightning ``*.ckpt``, a
  safetensors file or ``hf://OWNER/REPO/FILE`` (``engine.models.uvit3d.checkpoint.load_backbone_weights``);
  ``pretrained_weights``: ``auto`` (EMA when the file has it, else the raw weights), ``ema`` or ``raw``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.models.uvit3d import UViT3D, UViT3DConfig
from geoforge.engine.schema import ConfigError

ARCHS = ("dit", "uvit3d")
# per-frame conditioning each backbone takes (batch keys): the DiT's cameras / actions; the U-ViT3D's ray
# condition from DFoT's raw poses16 when a batch has them (RealEstate10K), else from the cameras
CONDITION_KEYS = {"dit": ("intrinsics", "extrinsics", "actions"), "uvit3d": ("poses16", "intrinsics", "extrinsics")}


@dataclass
class ModelConfig(DiTConfig):
    """The DiT's fields plus ``arch``, ``uvit3d``, ``pretrained``, ``pretrained_weights`` (module docstring)."""

    arch: Literal["dit", "uvit3d"] = "dit"
    uvit3d: UViT3DConfig | None = None
    pretrained: str | None = None
    pretrained_weights: Literal["auto", "ema", "raw"] = "auto"

    def uvit3d_config(self) -> UViT3DConfig:
        """The U-ViT3D config (DFoT's RealEstate10K one when ``uvit3d`` is omitted)."""
        return self.uvit3d if self.uvit3d is not None else UViT3DConfig()

    @property
    def feature_count(self) -> int:
        """Feature maps ``gf.dit_block`` may name (1-based): DiT blocks, or the U-ViT's per-level maps."""
        return self.uvit3d_config().num_feature_maps if self.arch == "uvit3d" else self.resolved().depth

    def validate(self) -> None:
        """Raise ConfigError naming the field (``engine.schema``'s contract): the DiT's checks for ``arch: dit``,
        the U-ViT3D's (prefixed ``uvit3d.``) and the fields it shares for ``arch: uvit3d``."""
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "dit":
            if self.uvit3d is not None:
                raise ConfigError("uvit3d: set only with arch: uvit3d")
            super().validate()
            return
        try:
            self.uvit3d_config().validate()
        except ConfigError as err:
            raise ConfigError(f"uvit3d.{err}") from None
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"cond_dropout: must be in [0, 1), got {self.cond_dropout}")
        if self.temporal_patch_size != 1:
            raise ConfigError("temporal_patch_size: the U-ViT3D has one token frame per frame (must be 1)")


def build_model(cfg: ModelConfig, backend: str = "auto") -> nn.Module:
    """The backbone of ``cfg.arch`` (weights not loaded; see
    ``engine.models.uvit3d.checkpoint.load_backbone_weights``). ``backend``: the recipe's fused-kernel backend
    (the U-ViT3D's RMSNorm + FiLM kernel)."""
    if getattr(cfg, "arch", "dit") == "uvit3d":
        ucfg = replace(cfg.uvit3d_config(), external_cond_dropout=0.0)   # the trainer draws model.cond_dropout
        return UViT3D(ucfg, backend=backend)
    return VideoDiT(cfg)


def condition_keys(arch: str) -> tuple[str, ...]:
    """The batch keys of per-frame conditioning the backbone of ``arch`` takes (:data:`CONDITION_KEYS`)."""
    if arch not in CONDITION_KEYS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return CONDITION_KEYS[arch]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a built backbone: what ``distributed.activation_checkpointing`` recomputes and
    ``distributed.compile`` compiles."""
    return model.blocks() if isinstance(model, UViT3D) else list(model.blocks)


def feature_channels(model: nn.Module, index: int) -> int:
    """Channels of feature ``index`` (1-based) of a built backbone: DiT width, or the U-ViT level's."""
    if isinstance(model, UViT3D):
        return model.feature_channels(index)
    return model.cfg.hidden_dim

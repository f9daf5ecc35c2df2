"""What the GF teachers compute: the recipe's ``teacher`` section, feature keys, input size, identities.

The recipe section (:class:`TeacherConfig`)::

    teacher:
      vggt:                      # the VGGT teacher's weights (TeacherSource)
        pretrained: facebook/VGGT-1B   # hub id, local directory or weights file; null: random init from config
        config: null             # engine/models/vggt/config.py overrides (random init: the whole model)
        init_seed: 0
        local_files_only: false
      layers: [4, 11, 17, 23]    # 0-based aggregator outputs; one feature key (and one GF projector) each
      resolution: 518            # input width (multiple of 14), height by the frames' aspect ratio
      frames: 0                  # the first N frames of a clip; 0: all
      cache: null                # a directory of `geoforge-teacher-cache`: read instead of running
      dino: null                 # optional DINOv2 teacher (DinoConfig) for the "GF + REPA" term

What the GF *objective* does with the features (DiT block, weights, projector sizes, losses) is the
``gf`` section's (``engine.objectives.geometry_forcing``); a recipe that still gives ``gf.teacher_layers``
and the like fails, naming the key and where it moved.

Features: per VGGT layer ``l`` the key :func:`vggt_key` (``vggt_L4``; ``vggt_Lm1`` for -1), for DINOv2
``DINO_KEY``; in a training batch they are ``BATCH_PREFIX + key`` (``teacher.vggt_L4``), each
``[B, Tt, h, w, C]`` float32 patch tokens on the teacher's own ``h x w`` grid (``Tt``:
:meth:`TeacherConfig.aligned_frames`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geoforge.engine.schema import ConfigError

PATCH = 14                      # VGGT / DINOv2 patch size: teacher resolutions are multiples of it
BATCH_PREFIX = "teacher."       # batch keys of teacher features: "teacher.vggt_L4", "teacher.dino"
DINO_KEY = "dino"


def vggt_key(layer: int) -> str:
    """Feature key of VGGT aggregator output ``layer`` (0-based; negatives as given)."""
    return f"vggt_L{layer}" if layer >= 0 else f"vggt_Lm{-layer}"


def teacher_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Teacher input ``(h, w)``: width ``resolution``, height by the frame's aspect ratio, multiples of 14."""
    if resolution % PATCH:
        raise ValueError(f"teacher resolution must be a multiple of {PATCH}, got {resolution}")
    return max(PATCH, round(height * resolution / width / PATCH) * PATCH), resolution


@dataclass
class TeacherSource:
    """Where the VGGT teacher comes from (``teacher.vggt``): pretrained weights, or a random init.

    ``pretrained``: a hub id (``facebook/VGGT-1B``), a local directory or weights file; None builds a
    random VGGT from ``config`` (``engine/models/vggt/config.py`` format) with ``init_seed`` - tiny CPU
    recipes and tests. With ``pretrained`` set, ``config`` (if given) overrides the checkpoint's.
    """

    pretrained: str | None = "facebook/VGGT-1B"
    config: dict[str, Any] | None = None
    init_seed: int = 0
    local_files_only: bool = False

    def validate(self) -> None:
        if self.pretrained is None and self.config is None:
            raise ConfigError("pretrained / config: give pretrained (hub id or local path) or config (random init)")


@dataclass
class DinoConfig:
    """The optional semantic teacher of the "GF + REPA" row (``teacher.dino``): DINOv2 with registers.

    ``pretrained``: an official DINOv2 weights file (e.g. ``dinov2_vitb14_reg4_pretrain.pth`` from the
    DINOv2 release, or a safetensors copy of it), loaded strictly; None: random init (tiny recipes).
    ``variant``: one of ``engine.models.vggt.DINOV2_VARIANTS``; ``config``: ``DinoVisionTransformer``
    keyword overrides (e.g. a tiny ``embed_dim``/``depth``). ``layer``: 0-based block whose output,
    after the final LayerNorm, is the target (-1: the last block = ``x_norm_patchtokens``, as REPA).
    ``resolution``: teacher input width (multiple of 14; height by aspect ratio), REPA: 224.
    The alignment term itself (DiT block, weights, projector) is ``gf.dino``.
    """

    pretrained: str | None = None
    variant: str = "dinov2_vitb14_reg"
    config: dict[str, Any] | None = None
    init_seed: int = 0
    layer: int = -1
    resolution: int = 224

    def validate(self) -> None:
        if self.resolution < PATCH or self.resolution % PATCH:
            raise ConfigError(f"resolution: must be a positive multiple of {PATCH}, got {self.resolution}")


@dataclass
class TeacherConfig:
    """The recipe's ``teacher`` section (module docstring): the frozen teachers GF aligns with.

    Ablation switches: ``layers``, ``resolution``, ``frames``. ``cache``: a directory written by
    ``geoforge-teacher-cache`` whose features replace the live teacher. ``kind: oracle`` replaces
    VGGT by features of the data's true depth and cameras (``engine.teacher.oracle``; synthetic data only),
    to test the alignment mechanism itself; ``oracle_freqs`` sets its Fourier frequencies. ``kind: random`` is
    its control without geometry (``engine.teacher.random_features``): fixed random features of the oracle's
    shape (``oracle_freqs`` sets the channels), a function of the clip index, frame index and token position
    only; any data set.
    """

    kind: Literal["vggt", "oracle", "random"] = "vggt"
    oracle_freqs: int = 4
    vggt: TeacherSource = field(default_factory=TeacherSource)
    layers: list[int] = field(default_factory=lambda: [4, 11, 17, 23])   # 0-based aggregator outputs
    resolution: int = 518                                                # input width (multiple of 14)
    frames: int = 0                                                      # the first N frames only; 0: all
    cache: str | None = None
    dino: DinoConfig | None = None

    def validate(self) -> None:
        if not self.layers:
            raise ConfigError("layers: name at least one aggregator layer")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: duplicates in {self.layers}")
        if self.resolution < PATCH or self.resolution % PATCH:
            raise ConfigError(f"resolution: must be a positive multiple of {PATCH}, got {self.resolution}")
        if self.frames < 0:
            raise ConfigError(f"frames: must be >= 0 (0 = all frames), got {self.frames}")
        if self.oracle_freqs < 0:
            raise ConfigError(f"oracle_freqs: must be >= 0, got {self.oracle_freqs}")

    def feature_keys(self) -> list[str]:
        """The feature keys this teacher provides (VGGT layers in order, then DINO)."""
        return [vggt_key(layer) for layer in self.layers] + ([DINO_KEY] if self.dino is not None else [])

    def aligned_frames(self, frames: int) -> int:
        """Frames of a ``frames``-frame clip the teacher sees (the first ``teacher.frames``; 0: all)."""
        return self.frames or frames


# ----------------------------------------------------------------------------- identities (cache manifests)
def digest(obj: Any) -> str:
    """A short stable hash of JSON-able ``obj`` (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vggt_identity(src: TeacherSource) -> str:
    """A stable name of the VGGT teacher's weights, recorded in (and checked against) teacher caches."""
    if src.pretrained is None:
        return f"random-vggt:{digest({'config': src.config, 'seed': src.init_seed})}"
    path = Path(src.pretrained).expanduser()
    name = str(path.resolve()) if path.exists() else src.pretrained
    return name if src.config is None else f"{name}+config:{digest(src.config)}"


def dino_identity(cfg: DinoConfig) -> str:
    base = {"variant": cfg.variant, "config": cfg.config, "layer": cfg.layer}
    if cfg.pretrained is None:
        return f"random-dino:{digest({**base, 'seed': cfg.init_seed})}"
    path = Path(cfg.pretrained).expanduser()
    return f"{path.resolve() if path.exists() else cfg.pretrained}:{digest(base)}"


def teacher_identity(teacher: TeacherConfig, frame_hw: tuple[int, int]) -> dict[str, Any]:
    """What the teacher features depend on (weights, layers, input size), as recorded in a cache manifest."""
    out: dict[str, Any] = {"vggt": {"id": vggt_identity(teacher.vggt), "layers": list(teacher.layers),
                                    "size": list(teacher_size(*frame_hw, teacher.resolution))}}
    if teacher.dino is not None:
        d = teacher.dino
        out["dino"] = {"id": dino_identity(d), "layer": d.layer, "size": list(teacher_size(*frame_hw, d.resolution))}
    return out


__all__ = ["PATCH", "BATCH_PREFIX", "DINO_KEY", "vggt_key", "teacher_size", "TeacherSource", "DinoConfig",
           "TeacherConfig", "digest", "vggt_identity", "dino_identity", "teacher_identity"]

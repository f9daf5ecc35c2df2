"""The frozen teachers of Geometry Forcing, built from the recipe's ``gf`` section.

:class:`LiveTeacher` holds VGGT (and optionally DINOv2) frozen - eval mode, ``requires_grad=False``,
run under ``torch.inference_mode`` (VGGT's ``aggregator_features``) / ``torch.no_grad``, bf16 autocast
on CUDA - and is deliberately *not* an ``nn.Module`` attribute of the trained module: the train loop
calls it on each micro-batch and puts its features into the batch (``teacher.<key>``), so the teacher
is outside the optimizer, outside ZeRO partitioning and never receives a gradient. :func:`build_teacher` returns it, or the cache reader of
``engine.data.cache_teacher`` when ``gf.teacher_cache`` is set (same call, same outputs up to bf16).

Teacher inputs: the clean frames in [0, 1]; only the first ``gf.teacher_frames`` frames (0: all).
VGGT sees each clip's frames as one multi-view sequence, resized bilinearly (antialiased when
shrinking) to width ``gf.teacher_resolution`` and the height of the frame's aspect ratio, both
multiples of 14 (:func:`teacher_size`; square frames -> square inputs). Output per requested
aggregator layer: patch tokens only (the ``patch_start_idx`` camera/register tokens dropped) on their
``H/14 x W/14`` grid, ``[B, Tt, h, w, 2C]`` float32. DINOv2 sees each frame alone (bicubic resize to
``gf.dino.resolution``, ImageNet normalisation) and returns the LayerNorm-ed patch tokens of block
``gf.dino.layer``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.models.vggt import VGGT, DINOV2_VARIANTS, DinoVisionTransformer, patch_token_grid, resize_for_vggt
from engine.models.vggt.checkpoint import read_state_dict
from engine.objectives.geometry_forcing import BATCH_PREFIX, DINO_KEY, PATCH, DinoConfig, GFConfig, TeacherSource, vggt_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = ("camera_head", "depth_head", "point_head", "track_head")


def teacher_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Teacher input ``(h, w)``: width ``resolution``, height by the frame's aspect ratio, multiples of 14."""
    if resolution % PATCH:
        raise ValueError(f"teacher resolution must be a multiple of {PATCH}, got {resolution}")
    return max(PATCH, round(height * resolution / width / PATCH) * PATCH), resolution


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vggt_identity(src: TeacherSource) -> str:
    """A stable name of the VGGT teacher's weights, recorded in (and checked against) teacher caches."""
    if src.pretrained is None:
        return f"random-vggt:{_digest({'config': src.config, 'seed': src.init_seed})}"
    path = Path(src.pretrained).expanduser()
    name = str(path.resolve()) if path.exists() else src.pretrained
    return name if src.config is None else f"{name}+config:{_digest(src.config)}"


def dino_identity(cfg: DinoConfig) -> str:
    base = {"variant": cfg.variant, "config": cfg.config, "layer": cfg.layer}
    if cfg.pretrained is None:
        return f"random-dino:{_digest({**base, 'seed': cfg.init_seed})}"
    path = Path(cfg.pretrained).expanduser()
    return f"{path.resolve() if path.exists() else cfg.pretrained}:{_digest(base)}"


def teacher_identity(gf: GFConfig, frame_hw: tuple[int, int]) -> dict[str, Any]:
    """What the teacher features depend on (weights, layers, input size), as recorded in a cache manifest."""
    out: dict[str, Any] = {"vggt": {"id": vggt_identity(gf.teacher), "layers": list(gf.teacher_layers),
                                    "size": list(teacher_size(*frame_hw, gf.teacher_resolution))}}
    if gf.dino is not None:
        d = gf.dino
        out["dino"] = {"id": dino_identity(d), "layer": d.layer, "size": list(teacher_size(*frame_hw, d.resolution))}
    return out


def _freeze(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def build_vggt(src: TeacherSource, device: torch.device | str = "cpu") -> VGGT:
    """The frozen VGGT teacher (aggregator only: the heads are dropped to save memory)."""
    if src.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(src.init_seed)
            cfg = dict(src.config or {})
            for head in HEADS:   # random heads are never used: do not build them
                cfg.setdefault(head, None)
            model = VGGT.from_config(cfg)
    else:
        model = VGGT.from_pretrained(src.pretrained, src.config, local_files_only=src.local_files_only)
    for head in HEADS:
        setattr(model, head, None)
    return _freeze(model, device)


def build_dino(cfg: DinoConfig, device: torch.device | str = "cpu") -> DinoVisionTransformer:
    """The frozen DINOv2 teacher: ``variant`` sizes, official hub flags for ``*_reg`` models, ``config``
    overrides; strict load of ``pretrained`` (official DINOv2 state dict) when given."""
    if cfg.variant not in DINOV2_VARIANTS:
        raise ValueError(f"gf.dino.variant: must be one of {sorted(DINOV2_VARIANTS)}, got {cfg.variant!r}")
    dim, depth, heads = DINOV2_VARIANTS[cfg.variant]
    kwargs: dict[str, Any] = dict(img_size=518, patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=heads,
                                  init_values=1.0, num_register_tokens=4, interpolate_antialias=True,
                                  interpolate_offset=0.0)
    kwargs.update(cfg.config or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        try:
            model = DinoVisionTransformer(**kwargs)
        except TypeError as err:
            raise ValueError(f"gf.dino.config: {err}") from err
    if not -len(model.blocks) <= cfg.layer < len(model.blocks):
        raise ValueError(f"gf.dino.layer: {cfg.layer} is not a block of a {len(model.blocks)}-block DINOv2")
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"gf.dino.pretrained: no file {path} (an official DINOv2 state dict, e.g. "
                                    f"dinov2_vitb14_reg4_pretrain.pth)")
        state = read_state_dict(path)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"gf.dino.pretrained: {path} does not match {cfg.variant}: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return _freeze(model, device)


def dino_patch_features(vit: DinoVisionTransformer, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """LayerNorm-ed patch tokens of block ``layer`` for ``images [N, 3, H, W]`` in [0, 1]: ``[N, h, w, C]``.

    Normalises with the ImageNet mean/std (as DINOv2 was trained); stops after block ``layer``."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = vit.prepare_tokens((images - mean) / std)
    last = layer % len(vit.blocks)
    for blk in vit.blocks[:last + 1]:
        x = blk(x)
    patches = vit.norm(x)[:, 1 + vit.num_register_tokens:]
    h, w = images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size
    return patches.unflatten(1, (h, w))


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class LiveTeacher:
    """Frozen VGGT (+ DINOv2) computing GF targets from a batch's clean frames. Not an nn.Module."""

    def __init__(self, gf: GFConfig, device: torch.device | str = "cpu"):
        self.gf = gf
        self.device = torch.device(device)
        self.vggt = build_vggt(gf.teacher, self.device)
        self.dino = build_dino(gf.dino, self.device) if gf.dino is not None else None
        for layer in gf.teacher_layers:
            depth = self.vggt.aggregator.depth
            if not -depth <= layer < depth:
                raise ValueError(f"gf.teacher_layers: {layer} is not an output of the {depth}-layer VGGT aggregator")
        width = 2 * self.vggt.aggregator.camera_token.shape[-1]
        self.dims = {vggt_key(layer): width for layer in gf.teacher_layers}
        if self.dino is not None:
            self.dims[DINO_KEY] = self.dino.embed_dim

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """``frames [B, T, 3, H, W]`` in [0, 1] -> ``{key: [B, Tt, h, w, C] float32}`` (Tt: teacher frames)."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"teacher: frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        gf = self.gf
        frames = frames[:, :gf.aligned_frames(frames.shape[1])].to(self.device, torch.float32)
        b, t, _, height, width = frames.shape
        size = teacher_size(height, width, gf.teacher_resolution)
        images = resize_for_vggt(frames, size)
        # inference mode inside; the clones below are ordinary tensors a loss may save for backward
        tokens = self.vggt.aggregator_features(images, gf.teacher_layers)
        grid = self.vggt.patch_grid(size)
        start = self.vggt.patch_start_idx
        out = {vggt_key(layer): patch_token_grid(tokens[layer], start, grid).float().clone(
            memory_format=torch.contiguous_format) for layer in gf.teacher_layers}
        if self.dino is not None:
            d = gf.dino
            dsize = teacher_size(height, width, d.resolution)
            flat = frames.flatten(0, 1)
            if tuple(flat.shape[-2:]) != dsize:
                flat = F.interpolate(flat, size=dsize, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            with _autocast(self.device):
                feats = dino_patch_features(self.dino, flat, d.layer)
            out[DINO_KEY] = feats.float().unflatten(0, (b, t)).contiguous()
        return out

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher entries to add to a training batch: ``{"teacher.<key>": features}``."""
        return {BATCH_PREFIX + k: v for k, v in self.features(batch["frames"]).items()}


def build_teacher(recipe: Any, device: torch.device | str = "cpu"):
    """The recipe's teacher: None (GF off), the oracle (``gf.teacher.kind: oracle``), the cache reader
    (``gf.teacher_cache``) or a LiveTeacher.

    Both return ``{"teacher.<key>": [B, Tt, h, w, C]}`` for a batch and expose ``dims`` (channels per key)."""
    gf: GFConfig = recipe.gf
    if not gf.enabled:
        return None
    if gf.teacher.kind == "oracle":
        from engine.objectives.oracle_teacher import OracleTeacher

        return OracleTeacher(gf, device)
    if gf.teacher_cache:
        from engine.data.cache_teacher import TeacherCache

        return TeacherCache(gf.teacher_cache, recipe, device)
    return LiveTeacher(gf, device)


__all__ = ["LiveTeacher", "build_teacher", "teacher_identity", "build_vggt", "build_dino", "dino_patch_features", "teacher_size",
           "vggt_identity", "dino_identity"]

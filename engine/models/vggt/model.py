"""GeoForge's VGGT: loads the official VGGT-1B checkpoint unchanged and reproduces its outputs.

``VGGT()`` is VGGT-1B; ``VGGT.from_config(cfg)`` builds any configuration of the official submodules
(see ``config.py``). ``forward`` follows ``vggt/models/vggt.py``: a 4-D input ``[S, 3, H, W]`` gets a
batch axis, the heads run with autocast disabled, track outputs appear only with ``query_points`` and a
track head, and ``images`` is returned in eval mode. One difference in memory, not in values: the
aggregator keeps only the outputs the heads read (VGGT-1B: 4, 11, 17, 23) instead of all 24.

Teacher mode (Geometry Forcing): :meth:`VGGT.aggregator_features` returns selected aggregator outputs
only, stopping after the deepest requested layer, under ``torch.inference_mode`` with the process precision's
autocast (``engine.precision``: bf16 where native, else float32).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from geoforge.engine.precision import network_dtype
from geoforge.engine.weights import check_state_dict, read_state_dict

from .aggregator import Aggregator
from .camera_head import CameraHead
from .checkpoint import CONFIG_FILE, locate, read_config
from .config import normalise_config, resolve_config
from .dpt_head import DPTHead
from .track_head import TrackHead


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer (aggregator + camera / depth / point / track heads)."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = resolve_config(config)
        cfg = self.config
        self.aggregator = Aggregator(**cfg["aggregator"])
        # Registration order = official state_dict order.
        self.camera_head = CameraHead(**cfg["camera_head"]) if cfg["camera_head"] else None
        self.point_head = DPTHead(**cfg["point_head"]) if cfg["point_head"] else None
        self.depth_head = DPTHead(**cfg["depth_head"]) if cfg["depth_head"] else None
        self.track_head = TrackHead(**cfg["track_head"]) if cfg["track_head"] else None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "VGGT":
        """Build from ``{"aggregator": {...}, "camera_head": {...} | None, ...}`` (official argument names)."""
        return cls(cfg)

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in every frame (1 camera + registers before it)."""
        return self.aggregator.patch_start_idx

    def patch_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(H / 14, W / 14)`` of the aggregator tokens for an input of size ``image_hw``."""
        return self.aggregator.patch_grid(*image_hw)

    def _head_layers(self, with_track: bool) -> set[int]:
        depth = self.aggregator.depth
        layers = set()
        if self.camera_head is not None:
            layers.add(depth - 1)
        for head in (self.depth_head, self.point_head):
            if head is not None:
                layers.update(i % depth for i in head.intermediate_layer_idx)
        if with_track:
            layers.update(i % depth for i in self.track_head.feature_extractor.intermediate_layer_idx)
        return layers

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None,
                frames_chunk_size: int | None = 8) -> dict[str, Any]:
        """``images [B, S, 3, H, W]`` (or ``[S, 3, H, W]``) in [0, 1]; ``query_points [B, N, 2]`` (or
        ``[N, 2]``) pixels of frame 0. Returns ``pose_enc [B,S,9]``, ``pose_enc_list``, ``depth
        [B,S,H,W,1]``, ``depth_conf [B,S,H,W]``, ``world_points [B,S,H,W,3]``, ``world_points_conf``,
        (``track [B,S,N,2]``, ``vis``, ``conf``), (``images`` in eval mode). ``frames_chunk_size``: frames
        per DPT-head chunk (None: all at once)."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise ValueError(f"images must be [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        with_track = self.track_head is not None and query_points is not None
        layers = sorted(self._head_layers(with_track))
        kept = self.aggregator.forward_layers(images, layers) if layers else {}
        tokens = [kept.get(i) for i in range(self.aggregator.depth)]
        start, hw = self.aggregator.patch_start_idx, tuple(images.shape[-2:])
        out: dict[str, Any] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens)
                out["pose_enc"] = pose_enc_list[-1]
                out["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                out["depth"], out["depth_conf"] = self.depth_head(tokens, hw, start, frames_chunk_size)
            if self.point_head is not None:
                out["world_points"], out["world_points_conf"] = self.point_head(tokens, hw, start,
                                                                                frames_chunk_size)
        if with_track:
            tracks, vis, conf = self.track_head(tokens, hw, start, query_points,
                                                frames_chunk_size=frames_chunk_size)
            out["track"], out["vis"], out["conf"] = tracks[-1], vis, conf
        if not self.training:
            out["images"] = images
        return out

    def aggregator_features(self, images: torch.Tensor, layers: Sequence[int], *,
                            dtype: torch.dtype | None = None, inference: bool = True) -> dict[int, torch.Tensor]:
        """Teacher features: ``{layer: tokens [B, S, P', 2C]}`` for the requested aggregator outputs.

        ``images [B, S, 3, H, W]`` (B clips of S frames each, or one clip ``[S, 3, H, W]``) in [0, 1],
        H and W multiples of 14. ``layers``: 0-based indices into the aggregator outputs (negatives count
        from the end); the dict is keyed by the indices as given. Only these outputs are kept and the
        blocks after the deepest one are not run. Tokens per frame: ``patch_start_idx`` special tokens,
        then the ``patch_grid((H, W))`` patches row-major (see :func:`patch_token_grid`).

        ``dtype``: autocast dtype; default the process precision's (``engine.precision.network_dtype``: bf16
        where native, float32 = no autocast). The residual stream, hence the returned tokens, stays float32.
        ``inference=True`` runs under ``torch.inference_mode`` (fastest); its tensors cannot be saved for
        backward by a later loss - use them through ``.clone()`` or pass ``inference=False`` (no_grad).
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if dtype is None:
            dtype = network_dtype(images.device)
        grad_ctx = torch.inference_mode() if inference else torch.no_grad()
        with grad_ctx, torch.autocast(device_type=images.device.type, dtype=dtype,
                                      enabled=dtype != torch.float32):
            return self.aggregator.forward_layers(images, layers)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, config: dict[str, Any] | None = None, *,
                        local_files_only: bool = False, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "VGGT":
        """Load ``model.safetensors`` or ``model.pt`` (weights only) from a file, a directory or a hub id
        (e.g. ``"facebook/VGGT-1B"``), strictly. ``config`` overrides the checkpoint's ``config.json``;
        with neither, VGGT-1B is assumed. The weights are cast to ``dtype`` (float32 by default, whatever
        the checkpoint stores: the heads run without autocast). Returns the model in eval mode on ``device``.
        The model is built on the meta device and takes the checkpoint tensors, so VGGT-1B needs one copy
        of its weights in memory, not two."""
        weights, config_file = locate(path_or_hub_id, local_files_only=local_files_only)
        resolved = normalise_config(config if config is not None else (read_config(config_file) or {}))
        with torch.device("meta"):
            model = cls(resolved)
        expected = model.state_dict()
        state = read_state_dict(weights)
        check_state_dict(expected, state, source=str(weights), what="the VGGT config", optional=())
        state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                 for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)  # keeps the modules' requires_grad
        return model.to(device).eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (the resolved config) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=1))
        return directory

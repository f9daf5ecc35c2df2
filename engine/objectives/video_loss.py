"""The module DeepSpeed trains: the backbone (video DiT or DFoT's U-ViT3D) plus every trainable head of the objective.

``VideoDiffusionLoss.forward(batch, noise)`` returns the loss parts of one micro-batch. The noise
(per-frame times ``t``, Gaussian ``eps``, classifier-free ``drop_cond``) is drawn outside, per sample,
from ``(seed, step, dataset index)`` by :func:`sample_noise`, so that the same sample gets the same
noise whatever the number of ranks and micro-batches: a 2-rank run reproduces a 1-rank run.

With Geometry Forcing (``gf``: :class:`engine.objectives.geometry_forcing.GFConfig`, enabled) the module
also owns the alignment projectors (:class:`GeometryForcingHead`, trained with the DiT, or frozen at their
initialisation with ``gf.freeze_projector`` as GF's released code leaves them); the frozen
teacher's features come in the batch (``teacher.<key>``, see ``engine.teacher``) and the loss is
``fm + gf.angular_weight * L_ang + gf.scale_weight * L_scale`` (+ the optional DINO term), each part logged.
"""
from __future__ import annotations

import torch
from torch import nn

from geoforge.engine import pixels
from geoforge.engine.models.arch import feature_channels
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig, dfot_diffusion_loss
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig, draw_noise, flow_matching_loss
from geoforge.engine.objectives.geometry_forcing import GeometryForcingHead, GFConfig

CONDITION_KEYS = ("intrinsics", "extrinsics", "actions")


def sample_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 * 1_000_033 + step * 1_000_033 + index) % (2**63 - 1)


def sample_noise(cfg: FlowMatchingConfig, cond_dropout: float, x_shape: torch.Size, indices: torch.Tensor,
                 seed: int, step: int) -> dict[str, torch.Tensor]:
    """Per-sample ``t [B,T]``, ``context [B,T]``, ``eps`` (shape of the clean video) and ``drop_cond [B]``,
    on the CPU, each sample's from its own generator seeded by ``(seed, step, dataset index)``."""
    parts = []
    for index in indices.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, step, index))
        noise = draw_noise((1, *x_shape[1:]), cfg, generator=g)
        noise["drop_cond"] = torch.rand((1,), generator=g) < cond_dropout
        parts.append(noise)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class VideoDiffusionLoss(nn.Module):
    """Flow matching (frames in [0, 1] mapped to [-1, 1]) or, with ``dfot``, DFoT's continuous diffusion (frames
    normalised by its mean / std), with diffusion forcing; the loss part is logged as ``fm`` either way."""

    def __init__(self, dit: nn.Module, objective: FlowMatchingConfig, gf: GFConfig | None = None,
                 teacher_dims: dict[str, int] | None = None, backend: str = "auto",
                 dfot: DFoTDiffusionConfig | None = None):
        """``dit``: the backbone (VideoDiT, or DFoT's UViT3D); ``gf`` (enabled) adds the GF head;
        ``teacher_dims``: channels per teacher feature key (the teacher's or the cache's ``dims``);
        ``backend``: the fused alignment kernels' backend; ``dfot``: train with DFoT's continuous diffusion
        instead of flow matching (frames normalised by its data mean / std; ``objective`` then supplies the
        per-frame t and the context frames)."""
        super().__init__()
        self.dit = dit
        self.objective = objective
        self.dfot = dfot
        self.gf = None
        if gf is not None and gf.enabled:
            if teacher_dims is None:
                raise ValueError("VideoDiffusionLoss: gf is enabled but no teacher_dims were given")
            self.gf = GeometryForcingHead(gf, teacher_dims, feature_channels(dit, gf.dit_block),
                                          getattr(dit.cfg, "temporal_patch_size", 1), backend,
                                          feature_channels(dit, gf.dino.dit_block) if gf.dino is not None else None)
            if gf.freeze_projector:
                # GF's released code: its optimizer takes diffusion_model.parameters() only, so the alignment head
                # keeps its random initialisation (CIntellifusion/GeometryForcing algorithms/dfot/dfot_video.py
                # configure_optimizers); the loss still reaches the backbone through it. Frozen parameters are left
                # out of the optimizer, the EMA and DeepSpeed's checkpoint (engine/trainer.py); a resumed run
                # rebuilds them from the seed, identically.
                self.gf.requires_grad_(False)

    def condition(self, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The conditioning inputs in float32 whatever the model's dtype (``dtype`` is ignored): a bf16 camera
        puts the ray map's high NeRF frequencies off by ~0.4; the embeddings cast only their outputs."""
        return {k: batch[k].float() for k in CONDITION_KEYS if k in batch}

    def forward(self, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.flow_matching(batch, noise)
        fm = out["loss"].float()
        parts = {"loss": fm, "fm": fm.detach()}
        if self.gf is not None:
            gf_parts = self.gf(out["features"], batch)
            parts.update({k: v.float() for k, v in gf_parts.items() if k != "loss"})
            parts["loss"] = fm + gf_parts["loss"].float()
        return parts

    def flow_matching(self, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor]) -> dict:
        """The flow-matching part alone (``flow_matching_loss``'s dict, with the DiT features the GF head
        reads in ``features``); ``forward`` adds the GF head on top. Separate for profiling."""
        dtype = next(self.dit.parameters()).dtype
        cond = self.condition(batch, dtype)
        cond["drop_cond"] = noise["drop_cond"]
        blocks = self.gf.dit_blocks if self.gf is not None else ()
        if self.dfot is not None:   # U-ViT3D: DFoT's raw poses16 when the data has them (re10k), else the cameras
            x0 = self.dfot.normalize(batch["frames"].to(dtype))
            cond = {k: v for k, v in cond.items() if k != "actions"}
            if "poses16" in batch:
                cond = {"poses16": batch["poses16"].float(), "drop_cond": cond["drop_cond"]}
            return dfot_diffusion_loss(self.dit, x0, self.dfot, cond=cond, noise=noise, return_features=blocks)
        x0 = pixels.to_signed(batch["frames"].to(dtype))
        return flow_matching_loss(self.dit, x0, self.objective, cond=cond, noise=noise, return_features=blocks)

"""VGGT track head: DPT feature extractor + iterative point tracker.

Reproduces ``vggt/heads/track_head.py`` and ``track_modules/base_track_predictor.py``:

- features: ``DPTHead(feature_only=True, down_ratio=2, pos_embed=False, features=F)`` ->
  ``[B, S, F, H/2, W/2]``;
- tracker (``stride`` 2): features ``LayerNorm``-ed over channels; query points (pixels of the input image,
  frame 0 is the query frame) divided by ``stride``; every frame starts at the query position with the
  query feature; per iteration: multi-level correlation around the current position (``CorrBlock``) ->
  ``corr_mlp``; flow from frame 0 embedded (sin/cos + ``flow / 518`` twice); ``[flow_emb, corr, feat]``
  + sin/cos grid embedding sampled at the query point + query/other-frame reference token ->
  ``EfficientUpdateFormer`` -> coordinate and feature deltas; features updated with
  ``ffeat_updater(ffeat_norm(delta)) + feat``; frame 0 is reset to the query; coordinates are detached
  at the start of every iteration; outputs are scaled back by ``stride``;
- visibility and confidence: linear heads on the final features, then sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn

from .dpt_head import DPTHead
from .layers import Mlp
from .track_blocks import EfficientUpdateFormer
from .track_utils import CorrBlock, flow_embedding, grid_sincos_embed, sample_features4d


class BaseTrackerPredictor(nn.Module):
    """``forward(query_points [B,N,2], fmaps [B,S,C,h,w]) -> (list of [B,S,N,2], vis [B,S,N], conf)``."""

    def __init__(self, stride: int = 1, corr_levels: int = 5, corr_radius: int = 4, latent_dim: int = 128,
                 hidden_size: int = 384, use_spaceatt: bool = True, depth: int = 6, max_scale: int = 518,
                 predict_conf: bool = True):
        super().__init__()
        self.stride, self.latent_dim = stride, latent_dim
        self.corr_levels, self.corr_radius = corr_levels, corr_radius
        self.max_scale = max_scale
        self.flows_emb_dim = latent_dim // 2
        self.transformer_dim = 3 * latent_dim + 4
        # Own parameter first (official state_dict order), then submodules.
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0, time_depth=depth, input_dim=self.transformer_dim,
            hidden_size=hidden_size, output_dim=latent_dim + 2, mlp_ratio=4.0, add_space_attn=use_spaceatt)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1)) if predict_conf else None

    def forward(self, query_points: torch.Tensor, fmaps: torch.Tensor, iters: int = 6):
        b, n, _ = query_points.shape
        _, s, c, hh, ww = fmaps.shape
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        query_points = query_points / float(self.stride)
        coords = query_points.clone().reshape(b, 1, n, 2).repeat(1, s, 1, 1)
        query_feat = sample_features4d(fmaps[:, 0], coords[:, 0])
        track_feats = query_feat.unsqueeze(1).repeat(1, s, 1, 1)  # [B, S, N, C]
        coords_query = coords[:, 0].clone()
        corr_fn = CorrBlock(fmaps, num_levels=self.corr_levels, radius=self.corr_radius)
        pos_embed = grid_sincos_embed(self.transformer_dim, hh, ww).to(query_points.device, query_points.dtype)
        pos_emb = sample_features4d(pos_embed.expand(b, -1, -1, -1), coords[:, 0]).reshape(b * n, 1, -1)
        ref = self.query_ref_token
        ref = torch.cat([ref[:, 0:1], ref[:, 1:2].expand(-1, s - 1, -1)], dim=1)
        coord_preds = []
        for _ in range(iters):
            coords = coords.detach()
            corrs = corr_fn.corr_sample(track_feats, coords)
            corrs = self.corr_mlp(corrs.permute(0, 2, 1, 3).reshape(b * n, s, corrs.shape[3]))
            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(b * n, s, 2)
            flows_emb = torch.cat([flow_embedding(flows, self.flows_emb_dim), flows / self.max_scale,
                                   flows / self.max_scale], dim=-1)
            feats = track_feats.permute(0, 2, 1, 3).reshape(b * n, s, self.latent_dim)
            x = torch.cat([flows_emb, corrs, feats], dim=2) + pos_emb
            x = (x + ref.to(x.device, x.dtype)).reshape(b, n, s, -1)
            delta = self.updateformer(x).reshape(b * n, s, -1)
            feats = feats.reshape(b * n * s, self.latent_dim)
            delta_feats = delta[:, :, 2:].reshape(b * n * s, self.latent_dim)
            feats = self.ffeat_updater(self.ffeat_norm(delta_feats)) + feats
            track_feats = feats.reshape(b, n, s, self.latent_dim).permute(0, 2, 1, 3)
            coords = coords + delta[:, :, :2].reshape(b, n, s, 2).permute(0, 2, 1, 3)
            coords[:, 0] = coords_query
            coord_preds.append(coords * self.stride)
        flat = track_feats.reshape(b * s * n, self.latent_dim)
        vis = torch.sigmoid(self.vis_predictor(flat).reshape(b, s, n))
        conf = (torch.sigmoid(self.conf_predictor(flat).reshape(b, s, n))
                if self.conf_predictor is not None else None)
        return coord_preds, vis, conf


class TrackHead(nn.Module):
    """``forward(tokens_list, image_hw, patch_start_idx, query_points [B,N,2])`` ->
    ``(tracks list of [B,S,N,2] (pixels), vis [B,S,N], conf [B,S,N])``."""

    def __init__(self, dim_in: int, patch_size: int = 14, features: int = 128, iters: int = 4,
                 predict_conf: bool = True, stride: int = 2, corr_levels: int = 7, corr_radius: int = 4,
                 hidden_size: int = 384):
        super().__init__()
        self.patch_size = patch_size
        self.iters = iters
        self.feature_extractor = DPTHead(dim_in=dim_in, patch_size=patch_size, features=features,
                                         feature_only=True, down_ratio=2, pos_embed=False)
        self.tracker = BaseTrackerPredictor(latent_dim=features, predict_conf=predict_conf, stride=stride,
                                            corr_levels=corr_levels, corr_radius=corr_radius,
                                            hidden_size=hidden_size)

    def forward(self, aggregated_tokens_list, image_hw: tuple[int, int], patch_start_idx: int,
                query_points: torch.Tensor, iters: int | None = None, frames_chunk_size: int | None = 8):
        fmaps = self.feature_extractor(aggregated_tokens_list, image_hw, patch_start_idx,
                                       frames_chunk_size=frames_chunk_size)
        return self.tracker(query_points, fmaps, iters=self.iters if iters is None else iters)

"""VGGT camera head: iterative refinement of the 9-d pose encoding from the camera tokens.

Reproduces ``vggt/heads/camera_head.py`` (parameter names ``trunk.i.*, token_norm, trunk_norm,
empty_pose_tokens, embed_pose, poseLN_modulation.1, pose_branch.fc1/fc2``):

- input: token 0 (the camera token) of the **last** aggregator output, ``LayerNorm``-ed once (``token_norm``)
  and kept fixed across iterations;
- iteration k: ``cond = embed_pose(empty_pose_tokens)`` at k=0, else ``embed_pose(prev.detach())`` where
  ``prev`` is the accumulated *pre-activation* encoding; ``shift, scale, gate = poseLN_modulation(cond)``
  (SiLU then Linear, chunked in that order); ``x = gate * (adaln_norm(tokens) * (1 + scale) + shift) +
  tokens`` (adaLN without affine, eps 1e-6); ``x = trunk(x)`` (Blocks without QK-norm/RoPE, attending
  across the frames of a sequence); ``delta = pose_branch(trunk_norm(x))``; ``prev = delta`` at k=0 else
  ``prev + delta``; the activated ``prev`` is appended to the output list.
"""
from __future__ import annotations

import torch
from torch import nn

from .activations import POSE_ACTIVATIONS, activate_pose
from .layers import Block, Mlp

POSE_ENCODING_DIMS = {"absT_quaR_FoV": 9}


class CameraHead(nn.Module):
    """``forward(aggregated_tokens_list, num_iterations=4) -> list of [B, S, 9]`` (one per iteration)."""

    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, pose_encoding_type: str = "absT_quaR_FoV",
                 num_heads: int = 16, mlp_ratio: float = 4, init_values: float = 0.01,
                 trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "relu"):
        super().__init__()
        if pose_encoding_type not in POSE_ENCODING_DIMS:
            raise ValueError(f"camera_head.pose_encoding_type must be one of {sorted(POSE_ENCODING_DIMS)}, "
                             f"got {pose_encoding_type!r}")
        for key, act in (("trans_act", trans_act), ("quat_act", quat_act), ("fl_act", fl_act)):
            if act not in POSE_ACTIVATIONS:
                raise ValueError(f"camera_head.{key} must be one of {POSE_ACTIVATIONS}, got {act!r}")
        self.target_dim = POSE_ENCODING_DIMS[pose_encoding_type]
        self.trans_act, self.quat_act, self.fl_act = trans_act, quat_act, fl_act
        # Own parameter first (official state_dict order), then submodules.
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.trunk = nn.Sequential(*[Block(dim_in, num_heads, mlp_ratio, init_values=init_values)
                                     for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, aggregated_tokens_list: list[torch.Tensor], num_iterations: int = 4) -> list[torch.Tensor]:
        tokens = self.token_norm(aggregated_tokens_list[-1][:, :, 0])  # [B, S, C]
        b, s, _ = tokens.shape
        pred = None
        preds = []
        for _ in range(num_iterations):
            if pred is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                pred = pred.detach()
                cond = self.embed_pose(pred)
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred, self.trans_act, self.quat_act, self.fl_act))
        return preds

"""Tiny random-weight metric networks for the eval tests (no downloads)."""
from __future__ import annotations

import torch

from geoforge.engine.models.vggt import VGGT

TINY_VGGT = {
    "aggregator": {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_embed": "conv",
                   "num_register_tokens": 1},
    "camera_head": {"trunk_depth": 1, "num_heads": 2},
    "depth_head": {"features": 16, "out_channels": [8, 16, 32, 32], "intermediate_layer_idx": [0, 1, 1, 1]},
    "point_head": None, "track_head": None,
}


def tiny_vggt(seed: int = 0) -> VGGT:
    """A 2-block VGGT with camera and depth heads. Its camera head's last layer is scaled down and
    biased so the 4 refinement steps sum to a near-identity rotation and a ~1 rad field of view
    (random weights can otherwise predict a zero FoV, i.e. an infinite focal length)."""
    torch.manual_seed(seed)
    model = VGGT(TINY_VGGT)
    fc2 = model.camera_head.pose_branch.fc2
    with torch.no_grad():
        fc2.weight.mul_(0.05)
        fc2.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.25]))
    return model.eval()

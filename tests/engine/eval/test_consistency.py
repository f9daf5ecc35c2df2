"""3D-consistency error with the true geometry: low for the rendered clip, high for a video that ignores the camera."""
from __future__ import annotations

import torch

from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.eval.consistency import warp_consistency_error


def test_rendered_clip_is_consistent_and_a_frozen_or_shuffled_one_is_not():
    c = render_clip(5, 1, 4, 32)
    video = torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float()[None] / 255
    depth = torch.from_numpy(c["depth"])[None]
    k = pixel_intrinsics(c["intrinsics"].float(), 32, 32)[None]
    e = relative_extrinsics(c["w2c"]).float()[None]
    truth = float(warp_consistency_error(video, depth, k, e))
    frozen = float(warp_consistency_error(video[:, :1].expand(-1, 4, -1, -1, -1), depth, k, e))
    shuffled = float(warp_consistency_error(video[:, [0, 3, 1, 2]], depth, k, e))
    assert truth < 0.5 * frozen and truth < 0.5 * shuffled, (truth, frozen, shuffled)
    assert float(warp_consistency_error(torch.full_like(video, 0.5), depth, k, e)) < 1e-12

"""The oracle GF teacher: features of the true geometry of synthetic clips, the same for the same 3D point."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.teacher.builder import build_teacher
from geoforge.engine.teacher.oracle import SCENE_SCALE, OracleTeacher, geometry_features, oracle_channels


@pytest.fixture(scope="module")
def clip():
    c = render_clip(3, 0, 3, 32)
    k = pixel_intrinsics(c["intrinsics"].float(), 32, 32)
    return (torch.from_numpy(c["depth"])[None], k[None], relative_extrinsics(c["w2c"]).float()[None])


def test_a_3d_point_has_the_same_coordinates_in_every_frame(clip):
    depth, k, e = clip
    feats = geometry_features(depth, k, e, freqs=2, grid=32)   # grid = image: one cell per pixel
    assert feats.shape == (1, 3, 32, 32, oracle_channels(2))
    world = feats[0, :, :, :, :3] * SCENE_SCALE
    errors = []
    for v in range(4, 28, 3):
        for u in range(4, 28, 3):
            x = world[0, v, u]
            cam = e[0, 1, :, :3] @ x + e[0, 1, :, 3]
            q = k[0, 1] @ cam
            uq, vq = int(round(float(q[0] / q[2]))), int(round(float(q[1] / q[2])))
            if 0 <= uq < 32 and 0 <= vq < 32 and abs(float(depth[0, 1, vq, uq]) - float(cam[2])) < 0.05 * float(cam[2]):
                errors.append(float((world[1, vq, uq] - x).norm()) / float(cam[2]))
    assert len(errors) > 20
    assert np.median(errors) < 0.05   # within a pixel's footprint (~1/focal of the depth)
    pooled = geometry_features(depth, k, e, freqs=2, grid=4)
    torch.testing.assert_close(pooled[0, 0, 0, 0], feats[0, 0, :8, :8].mean(dim=(0, 1)), atol=1e-5, rtol=1e-5)


def test_recipe_builds_the_oracle_and_it_fills_the_batch(clip, tmp_path):
    recipe = load_recipe("gf_tiny", ["teacher.kind=oracle", "teacher.layers=[0]", "teacher.resolution=112"])
    teacher = build_teacher(recipe.teacher, recipe.data, seed=recipe.seed)
    assert isinstance(teacher, OracleTeacher) and teacher.dims == {"vggt_L0": oracle_channels(4)}
    depth, k, e = clip
    out = teacher({"depth": depth, "intrinsics": k, "extrinsics": e, "frames": torch.zeros(1, 3, 3, 32, 32)})
    assert out["teacher.vggt_L0"].shape == (1, 3, 8, 8, oracle_channels(4))
    with pytest.raises(KeyError, match="depth"):
        teacher({"intrinsics": k, "extrinsics": e})

"""VGGT-based geometry metrics: reprojection consistency and camera accuracy.

The metric arithmetic is checked on a rendered synthetic scene whose depth and cameras are known
(exact geometry gives a near-zero reprojection error, frames shuffled against their cameras a large
one, true cameras a zero camera error). The VGGT path runs a tiny random-weight VGGT saved and
loaded with ``save_pretrained`` / ``from_pretrained`` (shapes, frame subsets, finiteness; ``tiny_nets``).
"""
from __future__ import annotations

import pytest
import torch

from geoforge.engine.data.re10k import pixel_intrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.eval.geometry import GeometryEstimate, VGGTGeometry, frame_subset
from tiny_nets import tiny_vggt

@pytest.fixture(scope="module")
def tiny_vggt_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vggt")
    tiny_vggt().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def scene() -> dict:
    clip = render_clip(seed=3, n=0, frames=5, resolution=32)
    frames = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 255
    return {"frames": frames, "depth": torch.from_numpy(clip["depth"]),
            "intrinsics": pixel_intrinsics(clip["intrinsics"], 32, 32).float(), "w2c": clip["w2c"].float()}


def _estimate(scene: dict, frames: torch.Tensor | None = None) -> GeometryEstimate:
    t = scene["frames"].shape[0]
    return GeometryEstimate(index=torch.arange(t), frames=scene["frames"] if frames is None else frames,
                            extrinsics=scene["w2c"], intrinsics=scene["intrinsics"], depth=scene["depth"],
                            conf=torch.ones_like(scene["depth"]) * 2)


def test_frame_subset() -> None:
    assert frame_subset(16, None).tolist() == list(range(16))
    assert frame_subset(16, 32).tolist() == list(range(16))
    assert frame_subset(256, 10).tolist() == torch.linspace(0, 255, 10).round().long().tolist()
    with pytest.raises(ValueError, match="max_frames"):
        frame_subset(8, 1)


def test_reprojection_of_exact_geometry_is_consistent(scene, tiny_vggt_dir) -> None:
    geo = VGGTGeometry.from_pretrained(tiny_vggt_dir, resolution=56, backend="reference")
    exact = geo.reprojection(_estimate(scene))
    assert exact["per_frame_mse"].shape == (5,)
    # The cloud of all frames, splatted back with the true cameras, recolours each frame almost exactly
    # (differences: pixels no point lands on, antialiased edges).
    assert exact["score"] < 0.01 and bool((exact["coverage"] > 0.7).all())
    # The same geometry coloured by frames in the wrong order is inconsistent.
    shuffled = geo.reprojection(_estimate(scene, scene["frames"].flip(0)))
    assert shuffled["score"] > 3 * exact["score"]
    # Dropping low-confidence points (percentile) leaves fewer points: coverage cannot grow.
    conf = torch.rand(scene["depth"].shape, generator=torch.Generator().manual_seed(0)) + 1
    est = _estimate(scene)
    est.conf = conf
    kept = VGGTGeometry(geo.vggt, resolution=56, conf_percentile=50.0, backend="reference").reprojection(est)
    assert bool((kept["coverage"] <= geo.reprojection(est)["coverage"] + 1e-6).all())


def test_camera_accuracy_of_true_and_perturbed_cameras(scene, tiny_vggt_dir) -> None:
    geo = VGGTGeometry.from_pretrained(tiny_vggt_dir, resolution=56, backend="reference")
    est = _estimate(scene)
    exact = geo.camera_accuracy(est, scene["w2c"])
    assert exact["rot_err"] == pytest.approx(0.0, abs=1e-3) and exact["trans_err"] == pytest.approx(0.0, abs=1e-4)
    est.index = torch.tensor([0, 1, 2, 3, 4])
    reversed_cams = geo.camera_accuracy(est, scene["w2c"].flip(0))
    assert reversed_cams["rot_err"] > 0.01 and reversed_cams["cammc"] > 0.01


def test_vggt_estimate_and_video_metrics(scene, tiny_vggt_dir) -> None:
    geo = VGGTGeometry.from_pretrained(tiny_vggt_dir, resolution=56, max_frames=3, backend="reference")
    video = (scene["frames"] * 255).round().to(torch.uint8)
    est = geo.estimate(video)
    assert est.index.tolist() == [0, 2, 4]
    assert est.frames.shape == (3, 3, 56, 56) and est.extrinsics.shape == (3, 3, 4)
    assert est.intrinsics.shape == (3, 3, 3) and est.depth.shape == (3, 56, 56) and est.conf.shape == (3, 56, 56)
    assert all(bool(torch.isfinite(t).all()) for t in (est.extrinsics, est.intrinsics, est.depth, est.conf))
    metrics = geo.video_metrics(video, scene["w2c"])
    assert set(metrics) == {"reproj", "rot_err", "trans_err", "cammc"}
    assert all(v == v and v >= 0 for v in metrics.values())
    with pytest.raises(ValueError, match="resolution"):
        VGGTGeometry(geo.vggt, resolution=50)

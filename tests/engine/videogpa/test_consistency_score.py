"""The 3D-consistency score: ranking with a fixed (true-geometry) teacher, motion, preprocessing, the VGGT
teacher path, and the standalone scorer CLI (progress, summary table, resume)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoforge.engine.data.re10k import pixel_intrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.data.video_io import encode_video
from geoforge.engine.videogpa.score import (ConsistencyScorer, build_lpips, crop_resize, main, motion_measure,
                                   sample_indices)
from geoforge.engine.videogpa.teacher import FixedGeometryTeacher, Geometry, VGGTTeacher

R = 56
TINY_VGGT = {
    "aggregator": {"img_size": R, "patch_size": 14, "embed_dim": 16, "depth": 4, "num_heads": 2, "patch_embed": "conv"},
    "camera_head": {"trunk_depth": 1, "num_heads": 2},
    "depth_head": {"features": 8, "out_channels": [4, 8, 16, 16], "intermediate_layer_idx": [0, 1, 2, 3]},
    "point_head": None, "track_head": None,
}


@pytest.fixture(scope="module")
def scene():
    """A rendered synthetic clip (10 frames, 56 px) with its true cameras and depth."""
    clip = render_clip(seed=0, n=3, frames=10, resolution=R)
    frames = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 255.0
    geometry = Geometry(clip["w2c"].float(), pixel_intrinsics(clip["intrinsics"], R, R).float(),
                        torch.from_numpy(clip["depth"]), torch.ones(10, R, R))
    return frames, geometry


def warp(frames: torch.Tensor, strength: float = 2.5) -> torch.Tensor:
    """Non-rigid warp growing with the frame index (frame 0 untouched): a sinusoidal displacement field."""
    t, _, h, w = frames.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = []
    for i in range(t):
        amp = strength * i / (t - 1) * 2 / w   # up to `strength` pixels
        grid = torch.stack([xs + amp * torch.sin(3 * math.pi * ys), ys + amp * torch.cos(2 * math.pi * xs)], -1)
        out.append(F.grid_sample(frames[i:i + 1], grid[None], mode="bilinear", padding_mode="border",
                                 align_corners=True)[0])
    return torch.stack(out)


@pytest.mark.parametrize("lpips_weight", [0.0, 1.0])
def test_consistent_video_scores_better_than_shuffled_or_warped(scene, lpips_weight):
    frames, geometry = scene
    lpips = build_lpips(random=True) if lpips_weight else None
    scorer = ConsistencyScorer(FixedGeometryTeacher(geometry), lpips, frames=10, resolution=R,
                               lpips_weight=lpips_weight, backend="reference")
    original = scorer.score_frames(frames)
    perm = torch.tensor([0, 7, 2, 9, 4, 1, 6, 3, 8, 5])
    shuffled = scorer.score_frames(frames[perm])
    warped = scorer.score_frames(warp(frames))
    assert original["coverage"] > 0.9
    assert original["score"] < 0.5 * warped["score"], (original["score"], warped["score"])
    assert original["score"] < 0.2 * shuffled["score"], (original["score"], shuffled["score"])
    assert warped["per_frame_mse"][-1] > warped["per_frame_mse"][1]   # the error grows with the warp
    # the score is MSE + λ LPIPS, and deterministic
    assert original["score"] == pytest.approx(original["mse"] + lpips_weight * original["lpips"])
    assert scorer.score_frames(frames) == original
    assert set(scorer.timer.seconds) == {"decode", "teacher", "reprojection", "lpips"}


def test_motion_measure_matches_hand_computation():
    angle = 0.3
    rot = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]])
    ext = torch.zeros(3, 3, 4)
    ext[0, :, :3] = torch.eye(3)
    ext[1, :, :3] = rot
    ext[1, :, 3] = torch.tensor([0.3, 0.0, 0.4])      # |Δt| = 0.5
    ext[2, :, :3] = rot
    ext[2, :, 3] = torch.tensor([0.3, 0.0, 0.4])      # no motion
    m = motion_measure(ext, rotation_weight=0.1)
    assert m["translation"] == pytest.approx(0.25)
    assert m["rotation"] == pytest.approx(0.15, abs=1e-6)
    assert m["motion"] == pytest.approx(0.25 + 0.1 * 0.15, abs=1e-6)
    static = motion_measure(torch.eye(3, 4).expand(4, 3, 4))
    assert static["motion"] == 0.0


def test_sampling_and_crop_resize():
    assert sample_indices(49, 10) == [0, 5, 11, 16, 21, 27, 32, 37, 43, 48]
    assert sample_indices(5, 10) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    video = np.zeros((2, 40, 60, 3), np.uint8)
    video[:, :, 10:50] = 255   # the centre 40x40 square is white, the side bands black
    out = crop_resize(video, 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones_like(out))


def test_vggt_teacher_path(scene):
    frames, _ = scene
    teacher = VGGTTeacher.load("random", TINY_VGGT, seed=0)
    geometry = teacher(frames)
    geometry.check(10, R, R, "test")
    assert torch.isfinite(geometry.depth).all() and (geometry.conf >= 1).all()
    scorer = ConsistencyScorer(teacher, None, frames=10, resolution=R, lpips_weight=0.0, backend="reference")
    row = scorer.score_frames(frames)
    assert math.isfinite(row["score"]) and row["score"] == row["mse"] > 0 and 0 <= row["coverage"] <= 1
    with pytest.raises(ValueError, match="random"):
        VGGTTeacher.load("random", None)


def test_standalone_scorer_cli(tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.mp4", "sub/b.mp4", "c.mp4"]):
        clip = render_clip(seed=1, n=i, frames=12, resolution=48)["frames"]
        if name == "c.mp4":
            clip = clip[rng.permutation(12)]
        encode_video(videos / name, clip, fps=8)
    (videos / "notes.txt").write_text("not a video")
    config = tmp_path / "vggt.json"
    config.write_text(json.dumps(TINY_VGGT))
    out = tmp_path / "scores.jsonl"
    args = ["--videos", str(videos), "--out", str(out), "--teacher", "random", "--teacher-config", str(config),
            "--resolution", str(R), "--frames", "6", "--lpips-random", "--no-progress", "--backend", "reference"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "videos/s" in printed and all(stage in printed for stage in ("decode", "teacher", "reprojection", "lpips"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["video"] for r in rows] == [str(videos / n) for n in ("a.mp4", "c.mp4", "sub/b.mp4")]
    assert rows[1]["score"] > rows[0]["score"]   # c.mp4 has its frames shuffled
    assert len(rows) == 3 and all(r["num_frames"] == 12 and len(r["per_frame_mse"]) == 6 for r in rows)
    assert not out.with_name(out.name + ".partial").exists()
    # a second run over a partial file only scores what is missing and writes the same rows
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(rows[0]) + "\n" + '{"video": "trunc')   # a kill mid-line
    first = out.read_text()
    out.unlink()
    assert main(args) == 0
    assert "(2 scored now" in capsys.readouterr().out
    assert out.read_text() == first
    assert main(["--videos", str(tmp_path / "nothing*"), "--out", str(out)]) == 2

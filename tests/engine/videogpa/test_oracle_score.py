"""``videogpa.score.kind: oracle``: the 3D-consistency score with the true geometry of a synthetic scene.

- a ground-truth clip scores lower (better) than a temporally shuffled and a frozen copy of it;
- its score equals an independent computation (a z-buffer splat written here in float64 NumPy);
- through the score stage of a run (generate -> score, the cameras the generate stage stored, the depth of the
  dataset clip): the same numbers, and a clear error for data without depth or inputs without geometry.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.data.re10k import Re10KClips, pixel_intrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.distributed import World
from geoforge.engine.errors import MissingInput
from geoforge.engine.videogpa.config import ScoreConfig
from geoforge.engine.videogpa.generate import run_generate_stage
from geoforge.engine.videogpa.policy_base import Condition, VideoPolicy, to_uint8
from geoforge.engine.videogpa.score import ConsistencyScorer, InputGeometry, OracleScorer, run_score_stage
from geoforge.engine.videogpa.teacher import Geometry

R, T = 32, 8
CPU = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def scene():
    clip = render_clip(seed=0, n=0, frames=T, resolution=R)
    frames = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 255.0
    geometry = Geometry(clip["w2c"].float(), pixel_intrinsics(clip["intrinsics"], R, R).float(),
                        torch.from_numpy(clip["depth"]), torch.ones(T, R, R))
    return frames, geometry


def oracle(frames: int = T) -> OracleScorer:
    return OracleScorer(lambda item: None, None, frames=frames, lpips_weight=0.0, backend="reference")


def numpy_score(frames: torch.Tensor, geometry: Geometry) -> float:
    """DESIGN.md §4's score written independently: every pixel of every frame unprojected with its depth and
    camera into one coloured cloud; each frame rendered by projecting every point (pixel = floor(x + 0.5)),
    the nearest point winning (ties: lower point index), background 0; the mean over frames of the MSE."""
    img = frames.double().numpy()                                    # [S, 3, H, W]
    depth = geometry.depth.double().numpy()
    k = geometry.intrinsics.double().numpy()
    e = geometry.extrinsics.double().numpy()
    s, _, h, w = img.shape
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    points, colours = [], []
    for i in range(s):
        rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3).astype(np.float64) @ np.linalg.inv(k[i]).T
        cam = rays * depth[i].reshape(-1, 1)
        points.append((cam - e[i, :, 3]) @ e[i, :, :3])               # R^T (x - t)
        colours.append(img[i].reshape(3, -1).T)
    points, colours = np.concatenate(points), np.concatenate(colours)
    order = np.arange(len(points))
    errors = []
    for j in range(s):
        cam = points @ e[j, :, :3].T + e[j, :, 3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = (k[j, 0, 0] * cam[:, 0] + k[j, 0, 1] * cam[:, 1]) / z + k[j, 0, 2]
            y = k[j, 1, 1] * cam[:, 1] / z + k[j, 1, 2]
        keep = z > 1e-6
        px, py = np.floor(x[keep] + 0.5), np.floor(y[keep] + 0.5)
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        idx = order[keep][inside]
        pixel = (py[inside] * w + px[inside]).astype(np.int64)
        best = np.lexsort((idx, z[idx], pixel))                      # by pixel, then depth, then index
        first = np.r_[True, pixel[best][1:] != pixel[best][:-1]]
        render = np.zeros((h * w, 3))
        render[pixel[best][first]] = colours[idx[best][first]]
        errors.append(np.mean((img[j].reshape(3, -1).T - render) ** 2))
    return float(np.mean(errors))


def test_ground_truth_scores_better_than_shuffled_or_frozen(scene):
    frames, geometry = scene
    scorer = oracle()
    truth = scorer.score_clip(frames, geometry)
    shuffled = scorer.score_clip(frames[torch.tensor([0, 5, 2, 7, 4, 1, 6, 3])], geometry)
    frozen = scorer.score_clip(frames[:1].expand(T, -1, -1, -1), geometry)
    assert truth["coverage"] > 0.9 and truth["score"] == truth["mse"]
    assert truth["score"] < 0.5 * shuffled["score"], (truth["score"], shuffled["score"])
    assert truth["score"] < 0.5 * frozen["score"], (truth["score"], frozen["score"])
    # frozen: frame 0 is its own ground truth, so its error is the smallest of the frozen copy's frames
    assert frozen["per_frame_mse"][0] < min(frozen["per_frame_mse"][1:])


def test_oracle_score_equals_an_independent_computation(scene):
    frames, geometry = scene
    for video in (frames, frames[torch.tensor([3, 1, 4, 0, 7, 5, 2, 6])]):
        row = oracle().score_clip(video, geometry)
        assert row["score"] == pytest.approx(numpy_score(video, geometry), rel=2e-3)
    # T sampled frames: the geometry of the same frames (sample_indices of 8 frames, 5 kept: 0 2 4 5 7)
    sub = oracle(frames=5).score_clip(frames, geometry)
    keep = torch.tensor([0, 2, 4, 5, 7])
    picked = Geometry(*(getattr(geometry, n)[keep] for n in ("extrinsics", "intrinsics", "depth", "conf")))
    assert sub["score"] == pytest.approx(numpy_score(frames[keep], picked), rel=2e-3)


def test_oracle_checks_the_geometry_fits_the_video(scene):
    frames, geometry = scene
    with pytest.raises(ValueError, match="geometry does not fit"):
        oracle().score_clip(frames[:, :, :16, :16], geometry)
    with pytest.raises(ValueError, match="InputGeometry"):
        ConsistencyScorer.from_config(ScoreConfig(kind="oracle", lpips_weight=0.0))


# ------------------------------------------------------------------------------------ through the stages
class KnownVideos(VideoPolicy):
    """A policy whose candidates are known videos of the input's dataset clip: candidate 0 the clip itself,
    candidate 1 its first frame held still (what the score stage must rank below it)."""

    kind = "known"
    default_lora_targets = ""

    def __init__(self, clips: Re10KClips):
        self.clips, self.frames, self.height, self.width = clips, clips.num_frames, R, R
        self.device = torch.device("cpu")
        self.network = torch.nn.Identity()

    def sample(self, cond: Condition, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        clip = self.clips[int(cond.key)]["frames"]
        return to_uint8(torch.stack([clip, clip[:1].expand_as(clip)]))

    # what DPO needs: not used by the generate and score stages
    batch_condition = encode = draw_noise = add_noise = target = predict = None


def tiny_recipe(data_root: Path, *overrides: str):
    return load_recipe("videogpa_tiny", [f"data.root={data_root}", f"data.frames={T}", "data.synthetic_clips=2",
                                         "data.synthetic_frames=10", "videogpa.inputs.count=2",
                                         "videogpa.generate.candidates=2", "videogpa.score.kind=oracle",
                                         f"videogpa.score.frames={T}", "videogpa.score.lpips_weight=0",
                                         "backend=reference", *overrides])


def generate(recipe, run_dir: Path) -> Re10KClips:
    from geoforge.engine.data.synthetic import ensure_synthetic_dataset

    d = recipe.data
    ensure_synthetic_dataset(d.root, clips=d.synthetic_clips, frames=d.synthetic_frames, resolution=d.resolution,
                             seed=recipe.seed, split=d.split)
    clips = Re10KClips(d.root, split=d.split, num_frames=T, resolution=R, seed=recipe.seed)
    run_generate_stage(recipe, run_dir, CPU, KnownVideos(clips), show_progress=False)
    return clips


def test_score_stage_with_the_oracle(tmp_path):
    recipe = tiny_recipe(tmp_path / "data")
    run_dir = tmp_path / "run"
    clips = generate(recipe, run_dir)
    run_score_stage(recipe, run_dir, CPU, show_progress=False)
    rows = {r["video"]: r for r in map(json.loads, (run_dir / "scores.jsonl").read_text().splitlines())}
    assert len(rows) == 4
    scorer = oracle()
    for i in range(2):
        truth, frozen = rows[f"candidates/{i:05d}/cand_00.mp4"], rows[f"candidates/{i:05d}/cand_01.mp4"]
        assert truth["score"] < 0.5 * frozen["score"], (truth["score"], frozen["score"])
        # the stage's numbers: the clip's own depth and cameras (the candidate is the clip, lossless uint8)
        sample = clips[i]
        geometry = Geometry(sample["extrinsics"], sample["intrinsics"], sample["depth"], torch.ones(T, R, R))
        frames = torch.from_numpy(to_uint8(sample["frames"][None])[0]).permute(0, 3, 1, 2).float() / 255.0
        direct = scorer.score_clip(frames, geometry)
        assert truth["score"] == pytest.approx(direct["score"], rel=1e-6)
        assert truth["score"] == pytest.approx(numpy_score(frames, geometry), rel=2e-3)
        assert truth["motion"] == frozen["motion"] > 0   # the true cameras move, whatever the frames do


def test_oracle_needs_depth_and_dataset_inputs(tmp_path):
    recipe = tiny_recipe(tmp_path / "data")
    run_dir = tmp_path / "run"
    clips = generate(recipe, run_dir)
    # the cameras stored at generation must be the clip's: a recipe seed that reads another window of clip 0
    start = clips.plan(0)["frame_indices"][0]
    seed = next(s for s in range(1, 50) if Re10KClips(clips.root, num_frames=T, resolution=R, seed=s)
                .plan(0)["frame_indices"][0] != start)
    with pytest.raises(ValueError, match="changed since the generate stage"):
        InputGeometry(tiny_recipe(tmp_path / "data", f"seed={seed}"), run_dir)({"input": "00000"})
    for path in (tmp_path / "data" / "training").glob("*.depth.npz"):
        path.unlink()
    with pytest.raises(MissingInput, match=r"depth.*score\.kind=vggt"):
        run_score_stage(recipe, run_dir, CPU, show_progress=False)
    with pytest.raises(ConfigError, match="score.kind"):
        tiny_recipe(tmp_path / "data", "videogpa.inputs.kind=images", "videogpa.inputs.root=x")


def test_score_kind_in_recipes():
    assert load_recipe("videogpa_tiny").videogpa.score.kind == "vggt"      # VGGT stays the default for real video
    assert load_recipe("videogpa_dpo").videogpa.score.kind == "vggt"
    small = load_recipe("videogpa_small").videogpa
    assert small.score.kind == "oracle" and small.inputs.kind == "dataset"
    with pytest.raises(ConfigError, match=r"score\.kind"):
        load_recipe("videogpa_tiny", ["videogpa.score.kind=truth"])
    # resolution, teacher and teacher_config do not apply to the oracle (it scores at the clips' own size)
    load_recipe("videogpa_small", ["videogpa.score.resolution=32", "videogpa.score.teacher=random"])

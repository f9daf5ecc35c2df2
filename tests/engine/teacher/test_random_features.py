"""The control GF teacher (``teacher.kind: random``): the oracle's shape, fixed per (clip, frame, token), different
between clips and frames, no geometry; built from a recipe, checked at load, and trained with in the objective
(the real ``engine/train.py`` run of it: ``tests/profiling/test_gf_vs_baseline.py``'s control variant)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.objectives.gf_released import RELEASED_KEY
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from geoforge.engine.teacher.builder import build_teacher
from geoforge.engine.teacher.oracle import OracleTeacher, oracle_channels
from geoforge.engine.teacher.random_features import RandomTeacher, random_features

ORACLE = ["teacher.layers=[0]", "teacher.resolution=112"]


def geometry_batch(clip: int = 0, frames: int = 3) -> dict[str, torch.Tensor]:
    c = render_clip(5, clip, frames, 32)
    return {"depth": torch.from_numpy(c["depth"])[None],
            "intrinsics": pixel_intrinsics(c["intrinsics"].float(), 32, 32)[None],
            "extrinsics": relative_extrinsics(c["w2c"]).float()[None],
            "frames": torch.from_numpy(c["frames"]).permute(0, 3, 1, 2)[None].float() / 255,
            "index": torch.tensor([clip]), "frame_indices": torch.arange(frames)[None]}


def test_same_clip_and_frame_same_features_else_different():
    index, frames = torch.tensor([4, 9]), torch.tensor([[0, 1, 2], [0, 1, 2]])
    a = random_features(index, frames, 8, 36)
    assert a.shape == (2, 3, 8, 8, 36) and a.dtype == torch.float32
    torch.testing.assert_close(random_features(index, frames, 8, 36), a, rtol=0, atol=0)   # fixed across epochs
    # a frame keeps its features whichever window (and batch position) it comes in
    shifted = random_features(torch.tensor([9]), torch.tensor([[2, 3, 4]]), 8, 36)
    torch.testing.assert_close(shifted[0, 0], a[1, 2], rtol=0, atol=0)
    # different clips, different frames of a clip, different tokens: different (uncorrelated) values
    assert not torch.allclose(a[0], a[1])
    corr = torch.corrcoef(torch.stack([a[0].flatten(), a[1].flatten(), a[0, [1, 2, 0]].flatten()]))
    assert corr[0, 1].abs() < 0.05 and corr[0, 2].abs() < 0.05
    tokens = a[0, 0].reshape(64, 36)
    assert torch.corrcoef(tokens[:2])[0, 1].abs() < 0.5
    # the oracle's channel RMS (1/sqrt 2: a sin / cos channel)
    assert abs(float(a.square().mean().sqrt()) - 2 ** -0.5) < 0.02


def test_shapes_match_the_oracle_and_the_recipe_builds_it():
    batch = geometry_batch()
    oracle_recipe = load_recipe("gf_tiny", ["teacher.kind=oracle", *ORACLE])
    random_recipe = load_recipe("gf_tiny", ["teacher.kind=random", *ORACLE])
    oracle = build_teacher(oracle_recipe.teacher, oracle_recipe.data, seed=0)
    control = build_teacher(random_recipe.teacher, random_recipe.data, seed=0)
    assert isinstance(oracle, OracleTeacher) and isinstance(control, RandomTeacher)
    assert control.dims == oracle.dims == {"vggt_L0": oracle_channels(4)}
    y_oracle, y_random = oracle(batch)["teacher.vggt_L0"], control(batch)["teacher.vggt_L0"]
    assert y_random.shape == y_oracle.shape == (1, 3, 8, 8, oracle_channels(4))
    # no geometry: the random features do not follow the oracle's (which are smooth over neighbouring tokens)
    assert torch.corrcoef(torch.stack([y_random.flatten(), y_oracle.flatten()]))[0, 1].abs() < 0.1
    smooth = lambda y: float(torch.corrcoef(torch.stack([y[..., :-1, :].flatten(), y[..., 1:, :].flatten()]))[0, 1])
    assert smooth(y_oracle) > 0.5 and abs(smooth(y_random)) < 0.1
    # teacher.frames: the first frames only; teacher.oracle_freqs: the channels
    few = load_recipe("gf_tiny", ["teacher.kind=random", *ORACLE, "teacher.frames=2", "teacher.oracle_freqs=1"])
    out = build_teacher(few.teacher)(batch)["teacher.vggt_L0"]
    assert out.shape == (1, 2, 8, 8, oracle_channels(1))
    with pytest.raises(KeyError, match="frame_indices"):
        control({"index": torch.tensor([0])})
    # any data set: no depth needed (the oracle's needs it)
    del batch["depth"]
    assert control(batch)["teacher.vggt_L0"].shape == y_random.shape


def test_released_form_target_from_the_oracle_and_its_control():
    batch = geometry_batch()
    recipe = load_recipe("gf_tiny", ["teacher.kind=oracle", "teacher.layers=[0, 1]", "teacher.resolution=112"])
    oracle = build_teacher(recipe.teacher, released_size=16)
    control = build_teacher(replace(recipe.teacher, kind="random"), released_size=16)
    for teacher in (oracle, control):
        assert teacher.dims == {RELEASED_KEY: 2}
        y = teacher(batch)["teacher." + RELEASED_KEY]
        assert y.shape == (1, 3, 2, 16, 16)
    # the oracle's: its 64 tokens x 36 channels resized as an image (T as channels), GF's way
    tokens = OracleTeacher(recipe.teacher)(batch)["teacher.vggt_L0"].flatten(2, 3)
    expect = torch.nn.functional.interpolate(tokens, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(oracle(batch)["teacher." + RELEASED_KEY][:, :, 0], expect)


def test_random_teacher_refuses_a_cache_or_dino():
    with pytest.raises(ConfigError, match="teacher.kind: random"):
        load_recipe("gf_tiny", ["teacher.kind=random", "teacher.cache=somewhere"])
    with pytest.raises(ConfigError, match="teacher.kind"):
        load_recipe("gf_tiny", ["teacher.kind=randomised"])


def test_a_training_step_with_the_random_teacher_learns_its_target():
    """The objective trains against the control's features: the alignment losses fall over a few steps on one
    batch, like the oracle's."""
    torch.manual_seed(0)
    recipe = load_recipe("gf_tiny", ["teacher.kind=random", "teacher.layers=[0]", "teacher.resolution=56",
                                     "model.patch_size=8", "gf.dit_block=1", "model.depth=2"])
    teacher = build_teacher(recipe.teacher)
    batch = geometry_batch(frames=4)
    batch.update(teacher(batch))
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=8, camera="rays", camera_freqs=2))
    module = VideoDiffusionLoss(dit, recipe.objective, recipe.gf, teacher.dims, "reference")
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    angular = []
    for step in range(30):
        noise = sample_noise(recipe.objective, 0.0, batch["frames"].shape, batch["index"], 0, step)
        out = module(batch, noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        angular.append(float(out["gf_angular"]))
    assert angular[-1] < angular[0] - 0.05, angular

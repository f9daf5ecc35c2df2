"""engine/data/minecraft: DFoT's action stacking, the action-driven synthetic worlds, the dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geoforge.engine.data.decode import DataError
from geoforge.engine.data.minecraft import MinecraftClips, main, stack_actions
from geoforge.engine.data.rendering import rotation
from geoforge.engine.data.voxel_render import EYE, FORWARD, LEFT, NOOP, RIGHT, STEP, TURN, render_minecraft_clip, render_world, walk


def _dfot_stack(actions, start, frames, skip, mask_first=True):
    """DFoT's processing written out by hand: frame k gets one one-hot block per source frame
    start + (k - 1) * skip + 1 ... start + k * skip (zero blocks before start), then mask_first."""
    out = np.zeros((frames, 4 * skip), np.float32)
    for k in range(frames):
        for j in range(skip):
            source = start + (k - 1) * skip + 1 + j
            if source >= start:
                out[k, 4 * j + actions[source]] = 1.0
    if mask_first:
        out[0, :4] = 0.0
    return out


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_actions_stack_over_skipped_frames_as_dfot_does(skip):
    actions = np.random.default_rng(skip).integers(0, 4, 40)
    for start in (0, 5):
        got = stack_actions(actions, start, 6, skip)
        assert got.shape == (6, 4 * skip) and got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), _dfot_stack(actions, start, 6, skip))
    np.testing.assert_array_equal(stack_actions(actions, 3, 4, skip, mask_first=False).numpy(),
                                  _dfot_stack(actions, 3, 4, skip, mask_first=False))


def test_the_camera_follows_the_actions():
    clip = render_minecraft_clip(seed=4, n=0, frames=40, resolution=32)
    actions, yaws, w2c = clip["actions"], clip["yaws"], clip["w2c"]
    assert actions[0] == NOOP and FORWARD in actions and (LEFT in actions or RIGHT in actions)
    centres = -np.einsum("tji,tj->ti", w2c[:, :, :3], w2c[:, :, 3])  # -R^T t
    for i in range(1, len(actions)):
        turn = {LEFT: -TURN, RIGHT: TURN}.get(int(actions[i]), 0.0)
        assert yaws[i] == pytest.approx(yaws[i - 1] + turn)
        moved = centres[i, [0, 2]] - centres[i - 1, [0, 2]]
        if actions[i] == FORWARD and np.linalg.norm(moved) > 0:  # (it may be blocked by a wall)
            np.testing.assert_allclose(moved, STEP * np.array([np.sin(yaws[i]), np.cos(yaws[i])]), atol=1e-9)
        else:
            np.testing.assert_allclose(moved, 0, atol=1e-9)
        if actions[i] == NOOP:
            assert np.array_equal(clip["frames"][i], clip["frames"][i - 1])
    # the eye stands EYE blocks above the column it is in (y points down)
    heights = clip["heights"]
    for c in centres:
        assert c[1] == pytest.approx(-(heights[int(c[0]), int(c[2])] + EYE))


def test_turning_left_rotates_the_image_as_the_cameras_say():
    """A pure turn is a rotation about the eye: frame i+1 is frame i warped by the homography
    K R_rel K^-1, whatever the depth. The warp with the opposite turn must be much worse."""
    heights = np.random.default_rng(0).integers(1, 5, size=(40, 40)).astype(np.int32)
    res = 48
    focal = 0.5 * res / np.tan(np.deg2rad(35.0))
    k = np.array([[focal, 0, (res - 1) / 2], [0, focal, (res - 1) / 2], [0, 0, 1.0]])
    centres, yaws = walk(heights, np.array([NOOP, LEFT]), np.array([20.5, 20.5]), 0.3)
    c2w = rotation(yaws, np.full(2, -0.3), np.zeros(2))
    frames = render_world(heights, c2w, centres, k, res, res).astype(np.float64)

    def warp_error(rot_b_from_a):
        v, u = np.mgrid[0:res, 0:res].astype(np.float64)
        rays = np.linalg.inv(k) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
        p = k @ rot_b_from_a @ rays
        x, y = np.round(p[0] / p[2]).astype(int), np.round(p[1] / p[2]).astype(int)
        ok = (p[2] > 0) & (x >= 0) & (x < res) & (y >= 0) & (y < res)
        return np.abs(frames[1][y[ok], x[ok]] - frames[0].reshape(-1, 3)[ok]).mean(), ok.mean()

    true_rel = c2w[1].T @ c2w[0]  # camera 0 -> world -> camera 1
    wrong_rel = c2w[0].T @ c2w[1]
    err, overlap = warp_error(true_rel)
    assert overlap > 0.6 and err < 8.0, (err, overlap)
    assert warp_error(wrong_rel)[0] > 3 * err
    # turning left moves the scene right in the image: a point ahead projects at a larger u
    point = centres[0] + 5 * c2w[0] @ np.array([0.0, 0.0, 1.0])
    u0 = (k @ (c2w[0].T @ (point - centres[0])))[0] / (c2w[0].T @ (point - centres[0]))[2]
    u1 = (k @ (c2w[1].T @ (point - centres[1])))[0] / (c2w[1].T @ (point - centres[1]))[2]
    assert u1 > u0


def test_cli_writes_a_set_the_dataset_reads(tmp_path, capsys):
    main(["--out", str(tmp_path), "--clips", "3", "--frames", "12", "--resolution", "32", "--seed", "2"])
    assert "3 Minecraft clips" in capsys.readouterr().out
    main(["--out", str(tmp_path), "--clips", "3", "--frames", "12", "--resolution", "32", "--seed", "2"])  # idempotent
    with pytest.raises(ValueError, match="clips=3.*clips=4"):
        main(["--out", str(tmp_path), "--clips", "4", "--frames", "12", "--resolution", "32", "--seed", "2"])
    ds = MinecraftClips(tmp_path, num_frames=4, frame_skip=2, resolution=32, seed=1)
    assert len(ds) == 3 and ds.cameras and ds.action_dim == 8
    sample = ds[1]
    assert sample["frames"].shape == (4, 3, 32, 32) and sample["actions"].shape == (4, 8)
    assert sample["intrinsics"].shape == (4, 3, 3) and sample["extrinsics"].shape == (4, 3, 4)
    assert int(sample["skipped_clips"]) == 0 and sample["clip"] == "minecraft_2_000001"
    clip = render_minecraft_clip(seed=2, n=1, frames=12, resolution=32)
    indices = sample["frame_indices"].tolist()
    assert indices == list(range(indices[0], indices[0] + 7, 2))
    rendered = torch.from_numpy(clip["frames"][indices]).permute(0, 3, 1, 2).float() / 255
    assert (sample["frames"] - rendered).abs().mean() < 2 / 255  # lossless 4:4:4 H.264
    np.testing.assert_array_equal(sample["actions"].numpy(), _dfot_stack(clip["actions"], indices[0], 4, 2))
    assert torch.allclose(sample["extrinsics"][0], torch.eye(3, 4), atol=1e-5)
    assert torch.allclose(sample["intrinsics"][0, 0, 0], torch.tensor(32 / 2 / np.tan(np.deg2rad(35.0))).float())
    # the same keys as Re10KClips, plus actions
    assert set(sample) == {"frames", "intrinsics", "extrinsics", "index", "frame_indices", "clip", "skipped_clips",
                           "actions"}


def test_bad_minecraft_files(tmp_path):
    main(["--out", str(tmp_path), "--clips", "4", "--frames", "8", "--resolution", "16", "--seed", "0"])
    folder = tmp_path / "training"
    names = sorted(p.stem for p in folder.glob("*.mp4"))
    np.savez(folder / f"{names[0]}.npz", moves=np.zeros(8, np.int64))                 # no 'actions'
    np.savez(folder / f"{names[1]}.npz", actions=np.zeros(5, np.int64))               # fewer actions than frames
    np.savez(folder / f"{names[2]}.npz", actions=np.full(8, 7, np.int64))             # not one of 4 actions
    strict = MinecraftClips(tmp_path, num_frames=3, frame_skip=2, resolution=16, cameras=False)
    for index, message in ((0, "no key 'actions'"), (1, "5 actions for the 8 frames"), (2, r"actions must lie in \[0, 4\)")):
        with pytest.raises(DataError, match=f"{names[index]}.npz: {message}"):
            strict[index]
    with pytest.raises(DataError, match="needs 9"):
        MinecraftClips(tmp_path, num_frames=5, frame_skip=2, resolution=16, cameras=False)[3]   # too short
    skip = MinecraftClips(tmp_path, num_frames=3, frame_skip=2, resolution=16, cameras=False, on_error="skip")
    sample = skip[0]
    assert sample["clip"] == names[3] and int(sample["skipped_clips"]) == 3 and sorted(skip.skipped) == [0, 1, 2]
    (folder / f"{names[3]}.npz").unlink()  # a video without its actions
    with pytest.raises(DataError, match=f"{names[3]}.mp4 has no actions"):
        MinecraftClips(tmp_path, num_frames=3, frame_skip=2, resolution=16)

"""RealEstate10K camera files: the real format, parsed independently, and the DFoT layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geoforge.engine.data.re10k import (pixel_intrinsics, read_dfot_poses, read_pose_file, relative_extrinsics,
                               write_pose_file)

POSES = Path(__file__).resolve().parents[2] / "data" / "re10k_poses"
REAL = sorted(POSES.glob("*.txt"))


def _independent_parse(path: Path):
    lines = path.read_text().splitlines()
    table = np.array([[float(v) for v in line.split()] for line in lines[1:] if line.strip()])
    return lines[0], table[:, 0].astype(np.int64), table[:, 1:5], table[:, 7:19].reshape(-1, 3, 4)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_pose_files_give_the_right_matrices(path):
    url, stamps, intr, w2c = _independent_parse(path)
    cams = read_pose_file(path)
    assert cams["url"] == url and url.startswith("https://www.youtube.com/")
    assert cams["timestamps"].dtype == torch.int64 and cams["timestamps"].tolist() == stamps.tolist()
    assert cams["intrinsics"].dtype == torch.float64 and cams["w2c"].dtype == torch.float64
    np.testing.assert_array_equal(cams["intrinsics"].numpy(), intr)
    np.testing.assert_array_equal(cams["w2c"].numpy(), w2c)
    # camera-from-world rotations of a real capture: orthonormal, right-handed (to the file's 9 digits)
    rot = cams["w2c"][:, :, :3]
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[0], dtype=torch.float64), atol=1e-6)
    assert (cams["timestamps"].diff() > 0).all()


def test_first_line_of_a_known_file():
    """Hand-copied values of 0bf152ef84195293.txt, line 2."""
    cams = read_pose_file(POSES / "0bf152ef84195293.txt")
    assert cams["timestamps"][0].item() == 158692025
    assert cams["intrinsics"][0].tolist() == [0.474812461, 0.844111024, 0.5, 0.5]
    assert cams["w2c"][0, 0].tolist() == [0.780003667, 0.059620168, -0.622928321, 0.726968666]
    assert cams["w2c"][0, 2, 3].item() == -1.002211444


def test_relative_extrinsics_put_frame_zero_at_the_origin():
    w2c = read_pose_file(REAL[0])["w2c"]
    rel = relative_extrinsics(w2c)
    assert torch.allclose(rel[0], torch.eye(3, 4, dtype=torch.float64), atol=1e-6)
    # a world point's camera coordinates are unchanged when the world is re-expressed in frame 0's camera
    point = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    cam_abs = w2c[:, :, :3] @ point + w2c[:, :, 3]
    p0 = cam_abs[0]   # the same point in frame 0's camera = the new world
    cam_rel = rel[:, :, :3] @ p0 + rel[:, :, 3]
    assert torch.allclose(cam_abs, cam_rel, atol=1e-6)


def test_pixel_intrinsics_use_integer_pixel_centres():
    k = pixel_intrinsics(torch.tensor([[0.5, 0.8, 0.5, 0.5]], dtype=torch.float64), height=90, width=160)
    assert k[0].tolist() == [[80.0, 0.0, 79.5], [0.0, 72.0, 44.5], [0.0, 0.0, 1.0]]


def test_write_then_read_round_trip_and_dfot_layout(tmp_path):
    cams = read_pose_file(REAL[1])
    out = tmp_path / "clip.txt"
    write_pose_file(out, cams["url"], cams["timestamps"], cams["intrinsics"], cams["w2c"])
    again = read_pose_file(out)
    assert again["timestamps"].tolist() == cams["timestamps"].tolist()
    assert torch.allclose(again["w2c"], cams["w2c"], atol=1e-9)
    # DFoT's processed poses: float32 [T, 18] = the txt columns without the timestamp
    _, _, intr, w2c = _independent_parse(REAL[1])
    table = np.concatenate([intr, np.zeros((len(intr), 2)), w2c.reshape(-1, 12)], axis=1)
    torch.save(torch.from_numpy(table).float(), tmp_path / "clip.pt")
    dfot = read_dfot_poses(tmp_path / "clip.pt")
    assert torch.allclose(dfot["w2c"], cams["w2c"], atol=1e-6)
    assert torch.allclose(dfot["intrinsics"], cams["intrinsics"], atol=1e-6)


def test_malformed_line_names_file_and_line(tmp_path):
    lines = REAL[0].read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-1])      # one value short
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.txt:4: expected 19 values"):
        read_pose_file(bad)

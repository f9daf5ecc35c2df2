"""Re10KClips also returns DFoT's raw condition ``poses16``: the camera file's normalised intrinsics as written
(DFoT feeds them to its released models although the frames are centre-cropped) + the sample's extrinsics."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from painted import painted_frames  # noqa: E402

from geoforge.engine.data.re10k import Re10KClips, write_pose_file  # noqa: E402
from geoforge.engine.data.video_io import encode_video  # noqa: E402


def test_poses16_keeps_the_file_intrinsics_and_the_sample_extrinsics(tmp_path):
    rows = 6
    w2c = torch.eye(3, 4, dtype=torch.float64).repeat(rows, 1, 1)
    w2c[:, 0, 3] = torch.arange(rows, dtype=torch.float64) * 0.1
    k = torch.tensor([[0.47, 0.84, 0.5, 0.5]], dtype=torch.float64).repeat(rows, 1)
    (tmp_path / "training").mkdir()
    write_pose_file(tmp_path / "training" / "c.txt", "https://www.youtube.com/watch?v=x", torch.arange(rows) * 10,
                    k, w2c)
    encode_video(tmp_path / "training" / "c.mp4", painted_frames(rows, 24, 32, 0), fps=10)
    for flip in (0.0, 1.0):
        s = Re10KClips(tmp_path, num_frames=3, frame_skip=2, resolution=16, hflip_prob=flip)[0]
        assert s["poses16"].shape == (3, 16)
        torch.testing.assert_close(s["poses16"][:, :4], k[:3].float())      # as written, not the 16x16 crop's
        torch.testing.assert_close(s["poses16"][:, 4:], s["extrinsics"].flatten(-2))
        # the crop's pixel intrinsics differ: fx of the 24x32 -> 16x16 crop is 0.47 * 32 * (16 / 24) px
        assert abs(s["intrinsics"][0, 0, 0] / 16 - 0.47) > 0.1
        if flip:   # DFoT's hflip negates r12 r13 t1 r21 r31 (16-vector columns 5 6 7 8 12)
            assert s["poses16"][1, 7] < 0

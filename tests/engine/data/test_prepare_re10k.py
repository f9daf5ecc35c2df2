"""engine/data/prepare_re10k: camera files + source videos -> DFoT's layout; the right frame per
timestamp, idempotent, resumable, parallel, and a summary of what was skipped and why."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geoforge.engine.data.prepare_re10k import main, youtube_id
from geoforge.engine.data.re10k import Re10KClips, read_dfot_poses, write_pose_file
from geoforge.engine.data.video_io import count_frames, decode_video, encode_video, open_video, write_image

SOURCE_FPS = 20


def _source_frames(count, height=36, width=48):
    """Frame i is a flat grey of level 20 + 6 i (with a dark border): its index survives resizing and
    compression and is read back as round((mean of the centre - 20) / 6)."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, 4:-4, 4:-4] = 20 + 6 * i
    return frames


def _index_of(frames):
    h, w = frames.shape[1:3]
    centre = frames[:, h // 3: 2 * h // 3, w // 3: 2 * w // 3].astype(np.float64).mean(axis=(1, 2, 3))
    return np.round((centre - 20) / 6).astype(int).tolist()


def _cameras(txt, url, stamps_us):
    n = len(stamps_us)
    w2c = torch.eye(3, 4, dtype=torch.float64).repeat(n, 1, 1)
    w2c[:, 0, 3] = torch.linspace(0, 1, n, dtype=torch.float64)
    intrinsics = torch.tensor([[0.5, 0.5 * 48 / 36, 0.5, 0.5]], dtype=torch.float64).repeat(n, 1)
    write_pose_file(txt, url, torch.tensor(stamps_us), intrinsics, w2c)


@pytest.fixture()
def source(tmp_path):
    txt, videos = tmp_path / "txt", tmp_path / "videos"
    txt.mkdir(), videos.mkdir()
    frames = _source_frames(40)
    # a: video named by the clip; timestamps every 100 ms from 0.55 s -> source frames 11, 13, ... (nearest)
    encode_video(videos / "a.mp4", frames, fps=SOURCE_FPS, pix_fmt="yuv420p", options={"crf": "4"}, gop_size=12)
    _cameras(txt / "a.txt", "https://www.youtube.com/watch?v=AbCdEf12345", [550_000 + 100_000 * i for i in range(8)])
    # b: found through the YouTube id of its URL (a webm)
    encode_video(videos / "XyZ_-987654.webm", frames, fps=SOURCE_FPS, codec="libvpx-vp9", pix_fmt="yuv420p",
                 options={"crf": "4", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}, gop_size=12)
    _cameras(txt / "b.txt", "https://www.youtube.com/watch?v=XyZ_-987654", [1_000_000 + 150_000 * i for i in range(6)])
    # c: a folder of frames named by timestamp
    (videos / "c").mkdir()
    stamps_c = [2_000_000 + 50_000 * i for i in range(5)]
    for i, stamp in enumerate(stamps_c):
        write_image(videos / "c" / f"{stamp}.png", frames[30 + i])
    _cameras(txt / "c.txt", "https://www.youtube.com/watch?v=c", stamps_c)
    # skipped: no video; a malformed line; timestamps past the end of the (2 s) video
    _cameras(txt / "d.txt", "https://www.youtube.com/watch?v=nowhere00", [0, 100_000, 200_000])
    _cameras(txt / "e.txt", "https://www.youtube.com/watch?v=AbCdEf12345", [0, 100_000, 200_000])
    lines = (txt / "e.txt").read_text().splitlines()
    (txt / "e.txt").write_text("\n".join(lines[:2] + [lines[2] + " 7"] + lines[3:]) + "\n")
    encode_video(videos / "f.mp4", frames, fps=SOURCE_FPS, pix_fmt="yuv420p", options={"crf": "4"})
    _cameras(txt / "f.txt", "https://www.youtube.com/watch?v=f", [1_500_000, 3_500_000])
    return tmp_path


def _run(root, *extra):
    return main(["--txt-dir", str(root / "txt"), "--video-dir", str(root / "videos"), "--out", str(root / "out"),
                 "--sizes", "32", "16", "--no-progress", *extra])


def test_prepares_dfot_layout_and_summarises(source, capsys):
    assert _run(source, "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "6 clips" in out and "3 prepared, 0 already there, 3 skipped" in out
    assert "no source video" in out and "malformed camera file" in out and "timestamp not in the video" in out
    skipped = {s["clip"]: s for s in json.loads((source / "out" / "training_skipped.json").read_text())}
    assert set(skipped) == {"d", "e", "f"} and "e.txt:3" in skipped["e"]["detail"]
    root = source / "out"
    expected = {"a": [11 + 2 * i for i in range(8)], "b": [20 + 3 * i for i in range(6)], "c": [30 + i for i in range(5)]}
    for clip, indices in expected.items():
        for size in (32, 16):
            video = decode_video(root / f"training_{size}" / f"{clip}.mp4")
            assert video.shape == (len(indices), size, size, 3)
            assert _index_of(video) == indices, (clip, size)
        poses = read_dfot_poses(root / "training_poses" / f"{clip}.pt")
        assert poses["w2c"].shape == (len(indices), 3, 4)
        # intrinsics re-normalised to the centre crop: 36x48 -> 32x43 -> crop 32x32 (cols 5..36)
        fx = 0.5 * 48 * (43 / 48) / 32
        cx = ((0.5 * 48 - 0.5) * 43 / 48 + 0.5 * 43 / 48 - 0.5 - 5 + 0.5) / 32
        np.testing.assert_allclose(poses["intrinsics"][0].numpy(), [fx, 0.5 * 48 / 36 * (32 / 36) * 36 / 32, cx, 0.5],
                                   rtol=1e-6, atol=1e-6)
    ds = Re10KClips(root, split="training", num_frames=4, resolution=16)  # the dataset reads the result
    assert ds.layout == "dfot" and len(ds) == 3 and ds[0]["frames"].shape == (4, 3, 16, 16)


def test_idempotent_and_resumable(source, capsys):
    assert _run(source, "--workers", "1") == 0
    capsys.readouterr()
    done = source / "out" / "training_poses" / "a.pt"
    stamp = done.stat().st_mtime_ns
    assert _run(source) == 0
    assert "0 prepared, 3 already there, 3 skipped" in capsys.readouterr().out and done.stat().st_mtime_ns == stamp
    # a run killed half-way through a clip leaves no pose file: that clip alone is redone
    (source / "out" / "training_poses" / "b.pt").unlink()
    (source / "out" / "training_16" / "c.mp4").unlink()
    assert _run(source, "--workers", "2") == 0
    assert "2 prepared, 1 already there" in capsys.readouterr().out
    assert count_frames(open_video(source / "out" / "training_16" / "c.mp4")) == 5
    assert not [p for p in (source / "out").rglob(".*tmp*")]  # no temporary files left
    assert _run(source, "--overwrite") == 0
    assert "3 prepared" in capsys.readouterr().out and done.stat().st_mtime_ns != stamp


def test_youtube_ids():
    assert youtube_id("https://www.youtube.com/watch?v=AbCdEf12345") == "AbCdEf12345"
    assert youtube_id("https://youtu.be/XyZ_-987654") == "XyZ_-987654"
    assert youtube_id("synthetic://1/2") is None

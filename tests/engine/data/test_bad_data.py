"""Bad RealEstate10K-style input: each kind of bad file raises naming the file (and line) with
``on_error="raise"``, and with ``"skip"`` is skipped, logged once and counted in ``skipped_clips``."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from geoforge.engine.data.decode import DataError
from geoforge.engine.data.re10k import Re10KClips, write_pose_file
from geoforge.engine.data.sampler import EpochIndexed, ResumableBatchSampler
from geoforge.engine.data.video_io import encode_video
from painted import painted_frames

FRAMES = 6


def _clip(folder, name, frames=FRAMES, rows=FRAMES, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    w2c = torch.eye(3, 4, dtype=torch.float64).repeat(rows, 1, 1)
    w2c[:, 2, 3] = torch.arange(rows, dtype=torch.float64)  # moving forward
    intrinsics = torch.tensor([[0.6, 0.8, 0.5, 0.5]], dtype=torch.float64).repeat(rows, 1)
    write_pose_file(folder / f"{name}.txt", "https://www.youtube.com/watch?v=test", torch.arange(rows) * 100_000,
                    intrinsics, w2c)
    if frames:
        encode_video(folder / f"{name}.mp4", painted_frames(frames, 24, 32, seed), fps=10)


@pytest.fixture()
def root(tmp_path):
    """clip_0 .. clip_3 good; clip_1 is made bad by each test."""
    for n in range(4):
        _clip(tmp_path / "training", f"clip_{n}", seed=n)
    return tmp_path


def _bad(kind, folder):
    """Spoil clip_1 in one way; returns a regex the strict error must match."""
    video, txt = folder / "clip_1.mp4", folder / "clip_1.txt"
    if kind == "truncated video":
        video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
        return "clip_1.mp4"
    if kind == "undecodable video":
        video.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return "clip_1.mp4: cannot open"
    if kind == "malformed pose line":
        lines = txt.read_text().splitlines()
        lines[3] = lines[3].replace(lines[3].split()[5], "nan?", 1)
        txt.write_text("\n".join(lines) + "\n")
        return r"clip_1.txt:4: not a number"
    if kind == "clip too short":
        _clip(folder, "clip_1", frames=3, rows=3)
        return "clip_1.txt: clip clip_1 has 3 frames; num_frames=4 with frame_skip=1 needs 4"
    if kind == "frame count mismatch":
        _clip(folder, "clip_1", frames=5, rows=FRAMES)
        return "clip_1.mp4: 5 frames but 6 camera rows"
    raise AssertionError(kind)


KINDS = ["truncated video", "undecodable video", "malformed pose line", "clip too short", "frame count mismatch"]


@pytest.mark.parametrize("kind", KINDS)
def test_strict_mode_names_the_bad_file(root, kind):
    message = _bad(kind, root / "training")
    ds = Re10KClips(root, num_frames=4, resolution=16)
    assert int(ds[0]["skipped_clips"]) == 0
    with pytest.raises(DataError, match=message):
        ds[1]


@pytest.mark.parametrize("kind", KINDS)
def test_skip_mode_skips_logs_once_and_counts(root, kind, caplog):
    _bad(kind, root / "training")
    ds = Re10KClips(root, num_frames=4, resolution=16, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="geoforge.data"):
        first, again = ds[1], ds[1]
    assert first["clip"] == "clip_2" and int(first["index"]) == 2 and int(first["skipped_clips"]) == 1
    assert torch.equal(first["frames"], again["frames"]) and list(ds.skipped) == [1]
    assert sum("clip_1" in r.message for r in caplog.records) == 1  # logged once per process
    assert int(ds[0]["skipped_clips"]) == 0 and ds[2]["clip"] == "clip_2"


def test_missing_video_fails_at_the_scan_or_is_left_out(root, caplog):
    (root / "training" / "clip_1.mp4").unlink()
    with pytest.raises(DataError, match="clip_1.txt has no video"):
        Re10KClips(root, num_frames=4, resolution=16)
    with caplog.at_level(logging.WARNING, logger="geoforge.data"):
        ds = Re10KClips(root, num_frames=4, resolution=16, on_error="skip")
    assert [c.name for c in ds.clips] == ["clip_0", "clip_2", "clip_3"]
    assert any("1 camera files have no video" in r.message for r in caplog.records)


def test_dfot_layout_bad_pose_tensor(tmp_path):
    for n in range(3):
        (tmp_path / "training_256").mkdir(parents=True, exist_ok=True)
        (tmp_path / "training_poses").mkdir(parents=True, exist_ok=True)
        encode_video(tmp_path / "training_256" / f"c{n}.mp4", painted_frames(FRAMES, 24, 32, n), fps=10)
        table = torch.zeros(FRAMES, 18)
        table[:, :4] = torch.tensor([0.6, 0.8, 0.5, 0.5])
        table[:, 6:] = torch.eye(3, 4).reshape(12)
        torch.save(table, tmp_path / "training_poses" / f"c{n}.pt")
    (tmp_path / "training_poses" / "c1.pt").write_bytes(b"not a tensor")
    with pytest.raises(DataError, match="c1.pt: cannot load the camera tensor"):
        Re10KClips(tmp_path, num_frames=4, resolution=16)[1]
    sample = Re10KClips(tmp_path, num_frames=4, resolution=16, on_error="skip")[1]
    assert sample["clip"] == "c2" and int(sample["skipped_clips"]) == 1


def test_skip_counts_reach_the_batches_through_worker_processes(root):
    _bad("truncated video", root / "training")
    ds = Re10KClips(root, num_frames=4, resolution=16, on_error="skip")
    sampler = ResumableBatchSampler(len(ds), micro_batch=2, seed=0)
    loader = torch.utils.data.DataLoader(EpochIndexed(ds), batch_sampler=sampler, num_workers=2)
    batches = [b for _, b in zip(range(4), loader)]  # two epochs of 2 batches: clip_1 is drawn twice
    assert sum(int(b["skipped_clips"].sum()) for b in batches) == 2
    for b in batches:  # every sample is a good clip, named by its index
        assert all(c == f"clip_{int(i)}" and c != "clip_1" for c, i in zip(b["clip"], b["index"]))

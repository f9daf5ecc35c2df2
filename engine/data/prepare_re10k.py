"""Prepare RealEstate10K in DFoT's layout from camera files and already-downloaded source videos.

    geoforge-prepare-re10k --txt-dir RealEstate10K/train --video-dir videos/ --out data/re10k \\
        [--split training] [--sizes 256] [--workers N] [--crf 18] [--overwrite]

For every camera file ``<clip>.txt`` of ``--txt-dir`` (line 1 the YouTube URL, then one line per frame
starting with its timestamp in microseconds; see ``engine.data.re10k``) the source is, in this order:
``<video-dir>/<clip>.{mp4,webm,mkv}``, ``<video-dir>/<youtube id>.{mp4,webm,mkv}`` (the id from the
URL), or a folder ``<video-dir>/<clip>/`` of frames, named by timestamp (``<microseconds>.png``/jpg)
or, otherwise, one image per camera line in name order. From a video, each timestamp takes the frame
whose presentation time is nearest (as ``ffmpeg -ss`` does); a timestamp more than ``--max-gap``
seconds from every frame (the video is shorter, or cut) skips the clip.

Each frame is resized (short side to the size, antialiased bicubic; DFoT used Lanczos) and centre-
cropped to a square, for every ``--sizes`` entry, and written as

- ``<out>/<split>_<size>/<clip>.mp4``: H.264 (yuv420p, ``--crf``), 10 fps nominal, as DFoT;
- ``<out>/<split>_poses/<clip>.pt``: float32 [T, 18] = the camera-file columns without the timestamp,
  with fx fy cx cy re-normalised to the square crop (so pixel intrinsics are ``fx * size`` etc. at every
  size; the file's values describe the uncropped frame).

Idempotent and resumable: every file is written to a temporary name and renamed; the pose file is
written last and marks a finished clip, so a clip with its pose file and all its videos is not redone
(``--overwrite`` redoes it) and a killed run continues where it stopped. Clips run in parallel on
``--workers`` processes with a progress bar; at the end a summary counts the clips prepared, already
there and skipped, with the reasons, and ``<out>/<split>_skipped.json`` lists every skipped clip.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from geoforge.engine.atomic import atomic_save, atomic_write_json
from geoforge.engine.data.decode import DataError
from geoforge.engine.data.re10k import IMAGE_SUFFIXES, pixel_intrinsics, read_pose_file
from geoforge.engine.data.video_io import ResizeCrop, encode_video, frame_to_rgb, open_video, read_image

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv")
_YOUTUBE_ID = re.compile(r"(?:v=|youtu\.be/|/shorts/|/embed/)([A-Za-z0-9_-]{6,})")


@dataclass(frozen=True)
class Job:
    """One clip to prepare."""

    txt: Path
    video_dir: Path
    out: Path
    split: str
    sizes: tuple[int, ...]
    crf: int
    max_gap: float
    overwrite: bool

    @property
    def name(self) -> str:
        return self.txt.stem

    def outputs(self) -> tuple[Path, list[Path]]:
        poses = self.out / f"{self.split}_poses" / f"{self.name}.pt"
        return poses, [self.out / f"{self.split}_{size}" / f"{self.name}.mp4" for size in self.sizes]


class Skip(Exception):
    """A clip that cannot be prepared: ``reason`` (a short category for the summary) and details."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def youtube_id(url: str) -> str | None:
    match = _YOUTUBE_ID.search(url)
    return match.group(1) if match else None


def find_source(video_dir: Path, clip: str, url: str) -> Path | None:
    """The clip's source video or frame folder (module docstring), or None."""
    stems = [clip] + ([vid] if (vid := youtube_id(url)) else [])
    for stem in stems:
        for suffix in VIDEO_SUFFIXES:
            if (video_dir / f"{stem}{suffix}").is_file():
                return video_dir / f"{stem}{suffix}"
    return video_dir / clip if (video_dir / clip).is_dir() else None


def frames_at_timestamps(path: Path, stamps_us: list[int], max_gap: float) -> np.ndarray:
    """uint8 [T, H, W, 3]: for each timestamp (microseconds, increasing) the video frame with the
    nearest presentation time; Skip if one is more than ``max_gap`` seconds from every frame."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        base = Fraction(stream.time_base)
        start = stream.start_time or 0
        first = Fraction(stamps_us[0], 1_000_000)
        if first > 1:  # seek to the keyframe before the first timestamp; decoding from 0 is cheaper near 0
            container.seek(start + int((first - 1) / base), stream=stream, backward=True)
        out: list[np.ndarray | None] = [None] * len(stamps_us)
        targets = [Fraction(s, 1_000_000) for s in stamps_us]
        n, previous = 0, None  # previous = (time, frame)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            when = (frame.pts - start) * base
            while n < len(targets) and when >= targets[n]:
                # the nearest of the frame before the timestamp and this one (ties: the earlier)
                if previous is not None and targets[n] - previous[0] <= when - targets[n]:
                    chosen_time, chosen = previous
                else:
                    chosen_time, chosen = when, frame
                if abs(float(chosen_time - targets[n])) > max_gap:
                    raise Skip("timestamp not in the video", f"{path}: no frame within {max_gap} s of "
                               f"{float(targets[n]):.3f} s (nearest {float(chosen_time):.3f} s)")
                out[n] = frame_to_rgb(chosen)
                n += 1
            if n == len(targets):
                break
            previous = (when, frame)
        while n < len(targets):  # timestamps after the last frame
            if previous is None or abs(float(targets[n] - previous[0])) > max_gap:
                last = "no frames" if previous is None else f"the last frame is at {float(previous[0]):.3f} s"
                raise Skip("timestamp not in the video", f"{path}: timestamp {float(targets[n]):.3f} s, {last}")
            out[n] = frame_to_rgb(previous[1])
            n += 1
    return np.stack(out)


def frames_from_folder(folder: Path, stamps_us: list[int]) -> np.ndarray:
    """Frames of an image folder: by timestamp when every file is named ``<microseconds>.<ext>``,
    else one image per camera line in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    by_stamp = {int(p.stem): p for p in files if p.stem.isdigit()}
    if len(by_stamp) == len(files) and all(s in by_stamp for s in stamps_us):
        chosen = [by_stamp[s] for s in stamps_us]
    elif len(files) == len(stamps_us):
        chosen = files
    else:
        raise Skip("frame count mismatch", f"{folder}: {len(files)} images (not named by timestamp) for "
                   f"{len(stamps_us)} camera lines")
    images = [read_image(p) for p in chosen]
    if len({im.shape for im in images}) > 1:
        raise Skip("frame sizes differ", f"{folder}: images of sizes {sorted({im.shape for im in images})}")
    return np.stack(images)


def prepare_clip(job: Job) -> tuple[str, str, str]:
    """Prepare one clip: (clip, status, detail) with status ``done``, ``exists`` or a skip reason."""
    poses_path, video_paths = job.outputs()
    if not job.overwrite and poses_path.exists() and all(p.exists() for p in video_paths):
        return job.name, "exists", ""
    try:
        try:
            cams = read_pose_file(job.txt)
        except DataError as err:
            raise Skip("malformed camera file", str(err)) from None
        source = find_source(job.video_dir, job.name, cams["url"])
        if source is None:
            vid = youtube_id(cams["url"])
            raise Skip("no source video", f"{job.txt}: none of {job.video_dir}/{job.name}"
                       f"{'' if vid is None else ' or ' + str(job.video_dir) + '/' + vid}.(mp4|webm|mkv) "
                       f"nor a folder {job.video_dir}/{job.name}/")
        stamps = cams["timestamps"].tolist()
        if any(b <= a for a, b in zip(stamps, stamps[1:])):
            raise Skip("timestamps not increasing", str(job.txt))
        try:
            frames = frames_from_folder(source, stamps) if source.is_dir() else frames_at_timestamps(source, stamps, job.max_gap)
        except (ValueError, OSError, av.error.FFmpegError) as err:
            raise Skip("undecodable source", f"{source}: {err}") from None
        images = torch.from_numpy(frames)
        height, width = frames.shape[1:3]
        for size, path in zip(job.sizes, video_paths):
            square = ResizeCrop((height, width), size).frames(images).permute(0, 2, 3, 1).cpu().numpy()
            atomic_save(path, lambda tmp, square=square: encode_video(
                tmp, np.ascontiguousarray(square), fps=10, pix_fmt="yuv420p", options={"crf": str(job.crf)}))
        # intrinsics of the square crop, normalised (pixel edges at 0 and size): the same at every size
        size = job.sizes[0]
        k = ResizeCrop((height, width), size).intrinsics(pixel_intrinsics(cams["intrinsics"], height, width))
        normalised = torch.stack([k[:, 0, 0] / size, k[:, 1, 1] / size, (k[:, 0, 2] + 0.5) / size,
                                  (k[:, 1, 2] + 0.5) / size], dim=-1)
        table = torch.cat([normalised, torch.zeros(len(stamps), 2, dtype=torch.float64),
                           cams["w2c"].reshape(-1, 12)], dim=1).float()
        atomic_save(poses_path, lambda tmp: torch.save(table, tmp))
    except Skip as skip:
        return job.name, skip.reason, skip.detail
    return job.name, "done", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--txt-dir", required=True, type=Path, help="folder of RealEstate10K camera files <clip>.txt")
    parser.add_argument("--video-dir", required=True, type=Path, help="source videos or frame folders")
    parser.add_argument("--out", required=True, type=Path, help="dataset root (DFoT layout)")
    parser.add_argument("--split", default="training", help="output split name (DFoT: training, test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")
    parser.add_argument("--max-gap", type=float, default=0.1, help="seconds a frame may lie from its timestamp")
    parser.add_argument("--overwrite", action="store_true", help="redo clips that are already prepared")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.txt_dir.is_dir():
        parser.error(f"--txt-dir {args.txt_dir} is not a folder")
    if not args.video_dir.is_dir():
        parser.error(f"--video-dir {args.video_dir} is not a folder")
    if any(s < 2 or s % 2 for s in args.sizes):
        parser.error(f"--sizes must be even and >= 2 (H.264 4:2:0), got {args.sizes}")
    jobs = [Job(txt, args.video_dir, args.out, args.split, tuple(args.sizes), args.crf, args.max_gap, args.overwrite)
            for txt in sorted(args.txt_dir.glob("*.txt"))]
    if not jobs:
        parser.error(f"no camera files (*.txt) in {args.txt_dir}")
    from tqdm import tqdm

    began = time.perf_counter()
    results: list[tuple[str, str, str]] = []
    bar = tqdm(total=len(jobs), desc=f"prepare {args.split}", unit="clip", disable=args.no_progress)
    if args.workers <= 1:
        for job in jobs:
            results.append(prepare_clip(job))
            bar.update()
    else:
        # spawn, not fork: a forked child inherits the parent's OpenMP pool state and crashes in torch ops
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(prepare_clip, jobs, chunksize=1):
                results.append(result)
                bar.update()
    bar.close()
    counts = Counter(status for _, status, _ in results)
    skipped = [dict(clip=c, reason=s, detail=d) for c, s, d in results if s not in ("done", "exists")]
    report = args.out / f"{args.split}_skipped.json"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, skipped)
    print(f"{len(jobs)} clips in {time.perf_counter() - began:.1f} s: {counts['done']} prepared, "
          f"{counts['exists']} already there, {len(skipped)} skipped")
    for reason, n in sorted(Counter(s["reason"] for s in skipped).items(), key=lambda kv: -kv[1]):
        example = next(s for s in skipped if s["reason"] == reason)
        print(f"  skipped {n} x {reason}, e.g. {example['clip']}: {example['detail']}")
    if skipped:
        print(f"  the list: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Video decoding throughput per backend (``engine/data/decode.py``): clips/s and frames/s.

Generates test videos (``--codecs`` VP9 in WebM and H.264 in MP4, ``--sizes`` 256x256 and 640x360,
a scrolling texture with fine noise, encoded by PyAV's libvpx-vp9 / libx264), then decodes training-
like requests (``--frames`` consecutive frames from a random start of a random video, the same request
list for every backend) with every backend installed that decodes the codec here, plus ``auto``:

- ``1 worker``: ``decode_clip`` in a loop in this process;
- ``N workers``: a ``torch.utils.data.DataLoader`` with ``--workers`` worker processes, each calling
  ``decode_clip`` (one request per item; the first pass is a warm-up);
- ``batched``: ``decode_clips`` on batches of ``--batch`` requests (DALI: one pipeline run per batch
  on ``--workers`` threads; PyAV/torchcodec: a pool of ``--workers`` threads).

Each configuration is timed ``--repeat`` times (default 3 with ``--quick``, else 5; p50, p20, p80 of
frames/s); every row has its ratio against PyAV in the same mode, measured in the same run. Rows are appended to
``runs/profiling/data.csv``, untracked (the committed record is ``profiling/results/data.csv``): codec, size, backend,
mode, workers, clips_per_s, frames_per_s p50/p20/p80, ratio_vs_pyav, device, commit. ``--quick`` (under 2 minutes
on 2 cores) uses fewer, shorter videos.

    OMP_NUM_THREADS=1 python profiling/bench_data.py --quick
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geoforge.engine.data.decode import choose_backend, decode_clip, decode_clips, installed, probe, supports  # noqa: E402
from geoforge.engine.data.video_io import encode_video  # noqa: E402
from profiling._harness import RESULTS, device_label, git_commit  # noqa: E402

CODECS = {"vp9": ("webm", "libvpx-vp9", {"crf": "32", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
          "h264": ("mp4", "libx264", {"crf": "23", "preset": "veryfast"})}
SIZES = {"256x256": (256, 256), "640x360": (360, 640)}
CSV_COLUMNS = ("codec", "size", "backend", "mode", "workers", "clips_per_s", "frames_per_s_p50",
               "frames_per_s_p20", "frames_per_s_p80", "ratio_vs_pyav", "device", "commit")


def make_video(path: Path, codec: str, height: int, width: int, length: int, seed: int) -> None:
    """A texture scrolling diagonally with per-frame fine noise (so inter prediction has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 3)
    frames = np.empty((length, height, width, 3), np.uint8)
    for t in range(length):
        u, v = x + 3.0 * t, y + 1.5 * t
        base = np.stack([np.sin(u / 17 + phases[0]) + np.cos(v / 23), np.sin((u + v) / 29 + phases[1]),
                         np.cos(u / 41 - v / 13 + phases[2])], -1)
        noise = rng.normal(0, 6, size=(height, width, 3))
        frames[t] = np.clip(128 + 50 * base + noise, 0, 255).astype(np.uint8)
    suffix, encoder, options = CODECS[codec]
    encode_video(path, frames, fps=10, codec=encoder, pix_fmt="yuv420p", options=dict(options), gop_size=30)


class _Requests(torch.utils.data.Dataset):
    def __init__(self, requests: list[tuple[str, list[int]]], backend: str):
        self.requests, self.backend = requests, backend

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> int:
        path, indices = self.requests[i]
        return int(decode_clip(path, indices, backend=self.backend, device="cpu").shape[0])


def make_runner(backend: str, mode: str, requests: list[tuple[str, list[int]]], workers: int, batch: int):
    """A warmed-up zero-argument callable that serves every request once in ``mode``, and its closer."""
    if mode == "1 worker":
        decode_clip(*requests[0], backend=backend, device="cpu")  # build pipelines, fill probe caches
        return (lambda: [decode_clip(p, i, backend=backend, device="cpu") for p, i in requests]), (lambda: None)
    if mode == "batched":
        decode_clips(requests[:batch], backend=backend, device="cpu", threads=workers)
        chunks = [requests[k:k + batch] for k in range(0, len(requests), batch)]
        return (lambda: [decode_clips(c, backend=backend, device="cpu", threads=workers) for c in chunks]), (lambda: None)
    loader = torch.utils.data.DataLoader(_Requests(requests, backend), batch_size=None, num_workers=workers,
                                         persistent_workers=True, prefetch_factor=4)
    sum(loader)  # warm-up pass: worker start-up, pipelines, probe caches
    return (lambda: sum(loader)), loader._iterator._shutdown_workers


def bench_mode(backends: list[str], mode: str, requests: list[tuple[str, list[int]]], workers: int, batch: int,
               repeat: int) -> dict[str, list[float]]:
    """Seconds per pass over ``requests`` for each backend; the backends take turns within each
    repetition (in reverse order every other time), so a change of load on a shared machine hits
    them alike."""
    runners = {b: make_runner(b, mode, requests, workers, batch) for b in backends}
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    for rep in range(repeat):
        order = list(runners.items())
        for backend, (run, _) in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            run()
            seconds[backend].append(time.perf_counter() - t0)
    for _, close in runners.values():
        close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter videos (under 2 minutes)")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--frames", type=int, default=16, help="frames per decoded clip")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None, help="keep the generated videos here")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    videos, length, n_requests = (2, 40, 16) if args.quick else (6, 120, 64)
    repeat = args.repeat or (3 if args.quick else 5)
    modes = ("1 worker", f"{args.workers} workers", "batched")
    device = device_label(torch.device("cpu"))
    commit = git_commit()
    rows: list[dict] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for codec in args.codecs:
            for size in args.sizes:
                height, width = SIZES[size]
                paths = []
                for v in range(videos):
                    path = folder / f"{codec}_{size}_{length}_{v}.{CODECS[codec][0]}"
                    if not path.exists():
                        make_video(path, codec, height, width, length, seed=v)
                    paths.append(str(path))
                rng = np.random.default_rng(0)
                requests = []
                for _ in range(n_requests):
                    start = int(rng.integers(0, length - args.frames + 1))
                    requests.append((paths[int(rng.integers(videos))], list(range(start, start + args.frames))))
                codec_name = probe(paths[0]).codec
                backends = [b for b in ("pyav", "torchcodec", "dali") if installed(b) and supports(b, codec_name, "cpu")]
                auto = choose_backend("auto", codec_name, "cpu")[0]
                for mode in modes:
                    workers = 1 if mode == "1 worker" else args.workers
                    seconds = bench_mode(backends + ["auto"], mode, requests, args.workers, args.batch, repeat)
                    pyav_rate = statistics.median(n_requests * args.frames / t for t in seconds["pyav"])
                    for backend, times in seconds.items():
                        rates = [n_requests * args.frames / t for t in times]
                        rate = statistics.median(rates)
                        q = np.quantile(rates, [0.2, 0.8])
                        name = backend if backend != "auto" else f"auto({auto})"
                        rows.append(dict(codec=codec, size=size, backend=name, mode=mode, workers=workers,
                                         clips_per_s=rate / args.frames, frames_per_s_p50=rate,
                                         frames_per_s_p20=float(q[0]), frames_per_s_p80=float(q[1]),
                                         ratio_vs_pyav=rate / pyav_rate, device=device, commit=commit))
                        print(f"{codec:5s} {size:8s} {mode:10s} {name:12s} {rate / args.frames:8.1f} clips/s "
                              f"{rate:8.0f} frames/s (p20 {q[0]:.0f}, p80 {q[1]:.0f})  x{rate / pyav_rate:.2f} vs pyav",
                              flush=True)
    print(f"\n{len(rows)} rows, {args.frames}-frame clips, {n_requests} requests per pass, {repeat} passes each, "
          f"{time.perf_counter() - began:.0f} s in all; device: {device} (shared machine: numbers vary with load)")
    if not args.no_csv:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / "data.csv"
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
        print(f"appended to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

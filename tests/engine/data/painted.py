"""Test videos whose frames carry their own index: ``BITS`` black/white blocks across the top third
encode the frame number in binary (read back by ``read_numbers``); below them a smooth colour field
that changes with the frame (so that codecs have real inter-frame work)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geoforge.engine.data.video_io import encode_video

BITS = 8
# name -> (suffix, PyAV encoder, pixel format, options): each an encoder independent of the decoders
# under test only in the sense that matters here (the frames' content is known exactly).
CODECS = {
    "h264": (".mp4", "libx264", "yuv420p", {"crf": "12", "preset": "veryfast"}),
    "vp9": (".webm", "libvpx-vp9", "yuv420p", {"crf": "12", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    "vp8": (".webm", "libvpx", "yuv420p", {"crf": "6", "b:v": "2M", "deadline": "realtime", "cpu-used": "8"}),
    "mjpeg": (".mkv", "mjpeg", "yuvj420p", {"q:v": "2"}),
}


def painted_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [count, height, width, 3] with frame ``t``'s index painted in binary along the top."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = np.empty((count, height, width, 3), np.uint8)
    block = width // BITS
    for t in range(count):
        field = [np.sin(x / 11 + 0.3 * t + phase[0]), np.cos(y / 9 - 0.2 * t + phase[1]),
                 np.sin((x + y) / 15 + 0.25 * t + phase[2])]
        frames[t] = np.clip(128 + 60 * np.stack(field, -1), 0, 255).astype(np.uint8)
        for b in range(BITS):
            frames[t, : height // 3, b * block:(b + 1) * block] = 255 if (t >> b) & 1 else 0
    return frames


def read_numbers(frames: np.ndarray) -> list[int]:
    """The index painted into each frame of uint8 [T, H, W, 3] (by the blocks' mean brightness)."""
    height, width = frames.shape[1:3]
    block = width // BITS
    numbers = []
    for frame in frames.astype(np.float32):
        value = 0
        for b in range(BITS):
            inner = frame[height // 12: height // 3 - height // 12, b * block + block // 4:(b + 1) * block - block // 4]
            value |= int(inner.mean() > 127) << b
        numbers.append(value)
    return numbers


def write_painted(folder: Path, codec: str, count: int = 40, height: int = 48, width: int = 64, seed: int = 0,
                  name: str | None = None) -> tuple[Path, np.ndarray]:
    """Encode ``painted_frames`` with ``codec`` (keyframe every 10 frames, so decoders must seek)."""
    suffix, encoder, pix_fmt, options = CODECS[codec]
    frames = painted_frames(count, height, width, seed)
    path = Path(folder) / f"{name or codec}{suffix}"
    encode_video(path, frames, fps=10, codec=encoder, pix_fmt=pix_fmt, options=dict(options), gop_size=10)
    return path, frames

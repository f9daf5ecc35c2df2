"""Video and image files <-> uint8 RGB arrays, on the CPU with PyAV; the resize + centre crop.

Frames are numpy uint8 ``[T, H, W, 3]`` (RGB). Frame ``i`` of a video is its ``i``-th frame in
presentation order. Seeking maps presentation timestamps to frame indices with the stream's average
frame rate, so it assumes a constant frame rate (true of RealEstate10K/DFoT clips, written at a
nominal 10 fps, and of the synthetic clips). Videos are read from a path or from the bytes of a file.
``engine.data.decode`` puts this PyAV reader beside DALI and torchcodec behind one interface.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import Interpolation, VideoReformatter

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# YUV->RGB conversion. Images: with ACCURATE_RND and full chroma interpolation a JPEG decodes within
# ~1/255 of Pillow's result (mean abs error vs the source 1.0 instead of 2.5). Video frames: the same
# flags make the conversion of 4:2:0 frames 10-20x slower than decoding them (ACCURATE_RND turns off
# swscale's SIMD paths) for a mean error of 1.5 instead of 2.2 /255, so frames use the fast path.
_IMAGE_FLAGS = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
_VIDEO_FLAGS = Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT
# Below this frame index, decoding from the start is cheaper than a seek (and needs no timestamps).
SEEK_MIN_FRAME = 16


_local = threading.local()


def frame_to_rgb(frame: av.VideoFrame, flags: Interpolation = _VIDEO_FLAGS) -> np.ndarray:
    """A decoded frame as uint8 RGB ``[H, W, 3]``; ``flags``: swscale interpolation (the fast video path by default)."""
    # One reformatter per thread keeps its swscale context between calls: setting one up costs
    # more than converting a 64x64 frame (8 frames of 32x32: 5 ms instead of 23 ms per clip); a
    # forked process (a DataLoader worker) makes its own. threads=1: with swscale's default thread
    # pool, a process forked after a conversion hangs in its first one (PyAV 18, FFmpeg 8.1).
    if getattr(_local, "pid", None) != os.getpid():
        _local.reformatter, _local.pid = VideoReformatter(), os.getpid()
    return _local.reformatter.reformat(frame, format="rgb24", interpolation=flags, threads=1).to_ndarray()


def _check_frames(frames: np.ndarray, what: str) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"{what}: expected uint8 frames [T>0, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")


def encode_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 10,
    codec: str = "libx264",
    pix_fmt: str = "yuv444p",
    options: dict[str, str] | None = None,
    gop_size: int | None = None,
) -> None:
    """Write uint8 RGB ``frames`` [T, H, W, 3] to ``path`` (container from the suffix, e.g. ``.mp4``).

    The default is H.264 with ``qp=0`` (lossless on the YUV planes) in 4:4:4: decoded frames differ
    from the input by the RGB<->YUV rounding only (mean ~0.4/255, max 2/255). ``pix_fmt="yuv420p"``
    with e.g. ``options={"crf": "4"}`` gives High-profile streams that hardware decoders (NVDEC)
    accept, at the price of chroma blur. ``gop_size`` sets the keyframe interval.
    """
    path = Path(path)
    _check_frames(frames, str(path))
    t, h, w, _ = frames.shape
    if pix_fmt in ("yuv420p", "yuvj420p") and (h % 2 or w % 2):
        raise ValueError(f"{path}: {pix_fmt} needs an even frame size, got {h}x{w}")
    if options is None:
        options = {"qp": "0"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = dict(options)
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())


def source_name(source: VideoSource) -> str:
    """How errors name a video: its path, or ``<N bytes in memory>``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return str(source)


def _open(source: VideoSource) -> av.container.InputContainer:
    name = source_name(source)
    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.exists(source):
        raise FileNotFoundError(f"{name}: no such file")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            container = av.open(io.BytesIO(bytes(source)))
        else:
            container = av.open(str(source))
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"{name}: cannot open as video/image: {err}") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name}: has no video stream")
    return container


def _decode_after_seek(container, stream, wanted: list[int]) -> dict[int, np.ndarray] | None:
    """Seek to the keyframe before ``wanted[0]`` and decode up to ``wanted[-1]``; None if not possible."""
    rate, base = stream.average_rate, stream.time_base
    if not rate or not base:
        return None
    start = stream.start_time or 0
    container.seek(start + int(Fraction(wanted[0]) / Fraction(rate) / Fraction(base)), stream=stream, backward=True)
    wanted_set, got = set(wanted), {}
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        index = round(Fraction(frame.pts - start) * Fraction(base) * Fraction(rate))
        if not got and index > wanted[0]:
            return None  # landed after the first wanted frame
        if index in wanted_set:
            got[index] = frame_to_rgb(frame)
        if index >= wanted[-1]:
            break
    return got


def _decode_from_start(name: str, container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    wanted_set, got, count = set(wanted), {}, 0
    for count, frame in enumerate(container.decode(stream), start=1):
        if count - 1 in wanted_set:
            got[count - 1] = frame_to_rgb(frame)
        if count - 1 >= wanted[-1]:
            return got
    raise ValueError(f"{name}: frame {wanted[-1]} requested but the video has only {count} frames")


def decode_video(path: VideoSource, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames ``indices`` (all when None) of the video at ``path`` (or in these bytes):
    uint8 [len(indices), H, W, 3].

    Only the frames up to the last wanted one are decoded; when the first wanted frame lies at or after
    ``SEEK_MIN_FRAME``, decoding starts at the keyframe before it. Indices may repeat and be unsorted.
    A file that cannot be opened or decoded, or holds fewer frames, raises ValueError naming it.
    """
    name = source_name(path)
    try:
        return _decode_video(path, name, indices)
    except av.error.FFmpegError as err:  # a stream that breaks off or is corrupt mid-way
        raise ValueError(f"{name}: cannot decode: {err}") from err


def open_video(path: VideoSource) -> av.container.InputContainer:
    """Open a video file (or its bytes) with PyAV; ValueError naming it if it has no video stream or
    cannot be opened, FileNotFoundError if it does not exist."""
    return _open(path)


def count_frames(container: av.container.InputContainer) -> int:
    """Frames in the first video stream of an open container: the count the container records (MP4),
    else its packets (one per shown frame in WebM/Matroska), counted by demuxing without decoding."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_video(path: VideoSource, name: str, indices: Sequence[int] | None) -> np.ndarray:
    with _open(path) as container:
        stream = container.streams.video[0]
        if indices is None:
            frames = [frame_to_rgb(frame) for frame in container.decode(stream)]
            if not frames:
                raise ValueError(f"{name}: the video has no frames")
            return np.stack(frames)
        wanted = sorted({int(i) for i in indices})
        if not wanted or wanted[0] < 0:
            raise ValueError(f"{name}: frame indices must be non-negative and non-empty, got {list(indices)}")
        got = None
        if wanted[0] >= SEEK_MIN_FRAME:
            got = _decode_after_seek(container, stream, wanted)
            if got is None or len(got) < len(wanted):
                got = None
                container.seek(0)
        if got is None:
            got = _decode_from_start(name, container, stream, wanted)
    return np.stack([got[int(i)] for i in indices])


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file (PNG, JPEG, ...) to uint8 RGB [H, W, 3]."""
    path = Path(path)
    with _open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            return frame_to_rgb(frame, _IMAGE_FLAGS)
    raise ValueError(f"{path}: the image has no frame")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write uint8 RGB ``image`` [H, W, 3] as a PNG (lossless)."""
    path = Path(path)
    _check_frames(image[None], str(path))
    h, w, _ = image.shape
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = w, h, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())


@dataclass(frozen=True)
class ResizeCrop:
    """Resize ``size`` -> ``resized`` (short side = ``resolution``), then a centre crop to a square.

    In integer-centre pixel coordinates a point maps as ``x' = (x + 0.5) * resized_w / w - 0.5 - left``.
    """

    size: tuple[int, int]  # source (H, W)
    resolution: int

    @property
    def resized(self) -> tuple[int, int]:
        h, w = self.size
        scale = self.resolution / min(h, w)
        return max(self.resolution, round(h * scale)), max(self.resolution, round(w * scale))

    @property
    def offset(self) -> tuple[int, int]:
        (h2, w2), r = self.resized, self.resolution
        return (h2 - r) // 2, (w2 - r) // 2

    def intrinsics(self, k: torch.Tensor) -> torch.Tensor:
        """Pixel intrinsics [..., 3, 3] of the source -> those of the output."""
        (h, w), (h2, w2), (top, left) = self.size, self.resized, self.offset
        out = k.clone()
        out[..., 0, :] *= w2 / w
        out[..., 1, :] *= h2 / h
        out[..., 0, 2] += 0.5 * w2 / w - 0.5 - left
        out[..., 1, 2] += 0.5 * h2 / h - 0.5 - top
        return out

    def images(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """[N, C, H, W] -> [N, C, R, R]; ``bicubic`` is antialiased, ``nearest-exact`` is for depth."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"images of size {tuple(x.shape[-2:])} given to a ResizeCrop for {self.size}")
        if self.resized != self.size:
            antialias = mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.resized, mode=mode, antialias=antialias, **({"align_corners": False} if antialias else {}))
        (top, left), r = self.offset, self.resolution
        return x[..., top : top + r, left : left + r]

    def frames(self, frames: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> uint8 [T, 3, R, R] (resized, rounded, centre-cropped), contiguous:
        the same memory layout in-process and out of a DataLoader worker (whose collate makes batches
        contiguous), so that models fed either see bit-identical float results."""
        pixels = frames.permute(0, 3, 1, 2).float()
        return self.images(pixels, mode).round_().clamp_(0, 255).to(torch.uint8).contiguous()

"""Decoding clips of video files to uint8 RGB frames: one interface over DALI, torchcodec and PyAV.

``decode_clip(source, frame_indices, size=None, backend="auto")`` returns the frames ``frame_indices``
(any order, repeats allowed; frame ``i`` is the ``i``-th frame in presentation order) of a video file
or of its bytes as a ``torch.uint8`` tensor ``[T, H, W, 3]``; ``decode_clips`` does the same for many
clips at once (one DALI pipeline run, or a thread pool for the CPU libraries): the batched loader.

Backends (``backend=``):

- ``dali``: NVIDIA DALI's ``fn.decoders.video`` with an explicit frame list per clip, fed by
  ``fn.external_source``. ``mixed`` (NVDEC, output on the GPU) decodes H.264, HEVC, AV1, MPEG-4, VP8,
  VP9 and MJPEG; its CPU variant only VP8, VP9 and MJPEG (DALI >= 2.1). Package ``nvidia-dali-cuda120``.
- ``torchcodec``: ``torchcodec.decoders.VideoDecoder`` (FFmpeg; CPU, or CUDA when torch has it).
- ``pyav``: PyAV (FFmpeg), always there (``engine.data.video_io``).

``auto`` takes DALI's NVDEC when a GPU is usable (CUDA available and not inside a DataLoader worker
process, where CUDA cannot be initialised) and DALI is installed, else the fastest installed CPU
backend that decodes the file's codec, in the order ``CPU_PREFERENCE`` (measured by
``profiling/bench_data.py``). The choice is logged once per (codec, choice). Every backend returns the
same frames for the same indices, up to the codec's YUV->RGB rounding (tested on videos with the frame
number painted into the pixels).

Errors: a missing, truncated or undecodable file, or a frame index past its end, raises ``DataError``
(a ValueError) naming the file; a backend that is not installed or cannot decode the codec raises
``BackendUnavailable``, a configuration error. ``SkipBadClips`` is how the datasets apply
``data.on_error``: ``raise``, or ``skip`` (the next good clip is used, each bad file is logged once per
process, and each sample counts the bad clips it skipped in ``skipped_clips``).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

from geoforge.engine.data.video_io import ResizeCrop, VideoSource, count_frames, decode_video, open_video, source_name

log = logging.getLogger("geoforge.data")

BACKENDS = ("auto", "dali", "torchcodec", "pyav")
ON_ERROR = ("raise", "skip")
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}
# CPU backends that ``auto`` tries, fastest first, per codec (``default`` for the others); from
# profiling/bench_data.py on 2 CPU cores: PyAV leads on every codec and size measured there.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {"default": ("pyav", "torchcodec", "dali")}


class DataError(ValueError):
    """A data file is missing, truncated, undecodable or inconsistent; the message names it (and the
    line, for text files). ``path`` is the file."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class BackendUnavailable(RuntimeError):
    """The requested decoding backend is not installed, or cannot decode this codec on this device."""


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` finds out about a video without decoding it."""

    codec: str  # FFmpeg's codec name: h264, hevc, vp9, vp8, mjpeg, av1, ...
    frames: int
    height: int
    width: int


def _is_bytes(source: VideoSource) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


@lru_cache(maxsize=65536)
def _probe_file(path: str, size: int, mtime_ns: int) -> VideoInfo:
    return _probe(path)


def _probe(source: VideoSource) -> VideoInfo:
    name = source_name(source)
    try:
        with open_video(source) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            codec, height, width = ctx.name, ctx.height, ctx.width
            frames = count_frames(container)
    except (ValueError, OSError, av.error.FFmpegError) as err:
        raise DataError(str(err) if name in str(err) else f"{name}: {err}", None if _is_bytes(source) else source) from err
    if frames < 1:
        raise DataError(f"{name}: the video has no frames", None if _is_bytes(source) else source)
    return VideoInfo(codec, frames, height, width)


def probe(source: VideoSource) -> VideoInfo:
    """Codec, frame count and size of the first video stream (cached per path, size and mtime)."""
    if _is_bytes(source):
        return _probe(source)
    try:
        stat = os.stat(source)
    except OSError as err:
        raise DataError(f"{source}: no such file ({err.strerror})", source) from None
    return _probe_file(str(source), stat.st_size, stat.st_mtime_ns)


def _gpu_usable() -> bool:
    return torch.cuda.is_available() and torch.utils.data.get_worker_info() is None


@lru_cache(maxsize=None)
def installed(backend: str) -> bool:
    """Whether the library behind ``backend`` imports."""
    try:
        if backend == "dali":
            import nvidia.dali  # noqa: F401
        elif backend == "torchcodec":
            import torchcodec.decoders  # noqa: F401
        elif backend != "pyav":
            raise ValueError(f"unknown decode backend {backend!r}; one of {BACKENDS}")
    except ImportError:
        return False
    except (OSError, RuntimeError) as err:  # e.g. torchcodec without FFmpeg libraries on the system
        log.warning("decode backend %s is installed but does not load: %s", backend, err)
        return False
    return True


def supports(backend: str, codec: str, device: str) -> bool:
    """Whether ``backend`` decodes ``codec`` on ``device`` (``cpu`` or ``cuda``)."""
    if backend == "dali":
        return codec in (DALI_CPU_CODECS if device == "cpu" else DALI_GPU_CODECS)
    if backend == "pyav":
        return device == "cpu"
    return True  # torchcodec: whatever FFmpeg (or NVDEC) decodes


_PACKAGES = {"dali": "nvidia-dali-cuda120 (or -cuda130)", "torchcodec": "torchcodec"}
_logged_choices: set[tuple] = set()
_choice_lock = threading.Lock()


def choose_backend(backend: str, codec: str, device: str | None = None) -> tuple[str, str]:
    """The (backend, device) that decodes ``codec``; ``device`` None means the GPU when usable."""
    if backend not in BACKENDS:
        raise ValueError(f"decode backend must be one of {BACKENDS}, got {backend!r}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"decode device must be None, 'cpu' or 'cuda', got {device!r}")
    gpu = _gpu_usable() if device is None else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("decode device 'cuda' asked for, but torch sees no GPU")
    if backend == "auto":
        if gpu and installed("dali") and supports("dali", codec, "cuda"):
            chosen = ("dali", "cuda")
        else:
            order = CPU_PREFERENCE.get(codec, CPU_PREFERENCE["default"])
            name = next(b for b in order if installed(b) and supports(b, codec, "cpu"))
            chosen = (name, "cpu")
    else:
        if not installed(backend):
            raise BackendUnavailable(f"decode backend {backend!r} asked for but not installed: pip install "
                                     f"{_PACKAGES[backend]}, or use backend 'auto' or 'pyav'")
        where = "cuda" if gpu and backend != "pyav" else "cpu"
        if not supports(backend, codec, where):
            extra = " (DALI's CPU decoder takes VP8, VP9 and MJPEG only)" if backend == "dali" else ""
            raise BackendUnavailable(f"decode backend {backend!r} cannot decode {codec} on {where}{extra}; "
                                     f"use backend 'auto' or 'pyav'")
        chosen = (backend, where)
    key = (backend, codec, chosen)
    with _choice_lock:
        if key not in _logged_choices:
            _logged_choices.add(key)
            log.info("video decoding: backend %s -> %s on %s for %s videos", backend, chosen[0], chosen[1], codec)
    return chosen


def _indices(frame_indices: Sequence[int], source: VideoSource, frames: int | None) -> list[int]:
    name = source_name(source)
    out = [int(i) for i in frame_indices]
    if not out:
        raise ValueError(f"{name}: no frame indices given")
    if min(out) < 0:
        raise ValueError(f"{name}: frame indices must be >= 0, got {min(out)}")
    if frames is not None and max(out) >= frames:
        raise DataError(f"{name}: frame {max(out)} requested but the video has only {frames} frames",
                        None if _is_bytes(source) else source)
    return out


def _read_bytes(source: VideoSource) -> np.ndarray:
    if _is_bytes(source):
        return np.frombuffer(bytes(source), dtype=np.uint8)
    try:
        return np.fromfile(source, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{source}: cannot read ({err})", source) from err


class _Dali:
    """DALI pipelines ``external_source(bytes, frames) -> decoders.video``, one per (process,
    device, batch size), built on first use and rebuilt after a failed run."""

    def __init__(self) -> None:
        self.pipelines: dict[tuple, object] = {}
        self.lock = threading.Lock()

    def _pipeline(self, device: str, batch: int, threads: int):
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if device == "cuda" else None
        key = (os.getpid(), device, device_id, batch, threads)
        if key not in self.pipelines:
            @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
            def clips():
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
                return fn.decoders.video(encoded, frames=frames, device="mixed" if device == "cuda" else "cpu",
                                         pad_mode="none")

            pipe = clips()
            pipe.build()
            self.pipelines[key] = pipe
        return key, self.pipelines[key]

    def decode(self, encoded: list[np.ndarray], indices: list[list[int]], device: str, threads: int) -> list[torch.Tensor]:
        batch = 1 << (len(encoded) - 1).bit_length()  # a few pipeline sizes serve every batch
        with self.lock:
            key, pipe = self._pipeline(device, batch, max(1, threads))
            try:
                pipe.feed_input("encoded", encoded)
                pipe.feed_input("frames", [np.asarray(i, dtype=np.int32) for i in indices])
                (out,) = pipe.run()
            except RuntimeError:
                del self.pipelines[key]  # a pipeline that raised is not reused
                raise
            if device == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                result = []
                for i in range(len(encoded)):
                    tensor = torch.empty(out[i].shape(), dtype=torch.uint8, device=torch.device("cuda", key[2]))
                    feed_ndarray(out[i], tensor, cuda_stream=torch.cuda.current_stream(key[2]))
                    result.append(tensor)
                # The copies are queued on torch's stream while DALI may reuse its output buffers at the next
                # run() on its own stream: wait for them before the lock is released (and before the caller
                # can hand the tensors to another stream or thread).
                torch.cuda.current_stream(key[2]).synchronize()
                return result
            return [torch.from_numpy(np.array(out[i])) for i in range(len(encoded))]


_dali = _Dali()


def _dali_message(err: Exception) -> str:
    """The operator's own words from a DALI pipeline error (between ``encountered:`` and ``C++ context``)."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("C++ context", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def _decode_dali(items: list[tuple[VideoSource, list[int]]], device: str, threads: int) -> list[torch.Tensor]:
    encoded = [_read_bytes(source) for source, _ in items]
    try:
        return _dali.decode(encoded, [idx for _, idx in items], device, threads)
    except RuntimeError as err:
        if len(items) == 1:
            source = items[0][0]
            raise DataError(f"{source_name(source)}: DALI cannot decode it: {_dali_message(err)}",
                            None if _is_bytes(source) else source) from err
    return [_decode_dali([item], device, 1)[0] for item in items]  # find the bad clip, one at a time


def _decode_torchcodec(source: VideoSource, indices: list[int], device: str) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    name = source_name(source)
    src = bytes(source) if _is_bytes(source) else str(source)
    try:
        decoder = VideoDecoder(src, seek_mode="exact", dimension_order="NHWC", device=device)
        return decoder.get_frames_at(indices=indices).data
    except (RuntimeError, ValueError, IndexError) as err:
        raise DataError(f"{name}: torchcodec cannot decode it: {err}", None if _is_bytes(source) else source) from err


def _decode_pyav(source: VideoSource, indices: list[int]) -> torch.Tensor:
    try:
        return torch.from_numpy(decode_video(source, indices))
    except (ValueError, OSError) as err:
        raise DataError(str(err), None if _is_bytes(source) else source) from err


def resize(frames: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, H', W', 3]: ``size`` (H', W') resizes (antialiased bicubic);
    an int R resizes the short side to R and centre-crops R x R (``ResizeCrop``)."""
    if isinstance(size, int):
        return ResizeCrop(tuple(frames.shape[1:3]), size).frames(frames).permute(0, 2, 3, 1).contiguous()
    if tuple(size) == tuple(frames.shape[1:3]):
        return frames
    pixels = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bicubic", antialias=True,
                           align_corners=False)
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_clips(
    items: Sequence[tuple[VideoSource, Sequence[int]]],
    size: int | tuple[int, int] | None = None,
    backend: str = "auto",
    device: str | None = None,
    threads: int | None = None,
) -> list[torch.Tensor]:
    """Decode many clips: ``[(source, frame_indices), ...]`` -> a list of uint8 [T_i, H, W, 3].

    Clips that the same backend decodes go together: one DALI pipeline run of the whole batch (DALI
    decodes the clips on its own threads, or on NVDEC), or a pool of ``threads`` threads for PyAV and
    torchcodec (default: the CPU count). ``size``: see ``resize``. A bad clip raises ``DataError``
    naming it; ``backend`` and ``device`` as in ``decode_clip``.
    """
    threads = threads or os.cpu_count() or 1
    plans: list[tuple[str, str, list[int]]] = []
    for source, frame_indices in items:
        explicit_pyav = backend == "pyav" and device in (None, "cpu")  # PyAV checks the file itself
        info = None if explicit_pyav else probe(source)
        chosen = ("pyav", "cpu") if explicit_pyav else choose_backend(backend, info.codec, device)
        plans.append((*chosen, _indices(frame_indices, source, None if info is None else info.frames)))
    out: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[tuple[str, str], list[int]] = {}
    for n, (name, where, _) in enumerate(plans):
        groups.setdefault((name, where), []).append(n)
    for (name, where), members in groups.items():
        if name == "dali":
            decoded = _decode_dali([(items[n][0], plans[n][2]) for n in members], where, threads)
        else:
            def one(n: int, name: str = name, where: str = where) -> torch.Tensor:
                if name == "torchcodec":
                    return _decode_torchcodec(items[n][0], plans[n][2], where)
                return _decode_pyav(items[n][0], plans[n][2])

            if len(members) == 1 or threads == 1:
                decoded = [one(n) for n in members]
            else:
                with ThreadPoolExecutor(min(threads, len(members))) as pool:
                    decoded = list(pool.map(one, members))
        for n, frames in zip(members, decoded):
            out[n] = frames if size is None else resize(frames, size)
    return out  # type: ignore[return-value]


def decode_clip(
    source: VideoSource,
    frame_indices: Sequence[int],
    size: int | tuple[int, int] | None = None,
    backend: str = "auto",
    device: str | None = None,
) -> torch.Tensor:
    """Frames ``frame_indices`` of the video at ``source`` (a path, or the file's bytes): uint8
    [T, H, W, 3] on the CPU, or on the GPU when DALI decodes there.

    ``size`` None keeps the native size (see ``resize`` otherwise). ``backend``: ``auto``, ``dali``,
    ``torchcodec`` or ``pyav``; ``device``: None (the GPU when usable), ``cpu`` or ``cuda``. A missing,
    truncated or undecodable file, or an index past the last frame, raises ``DataError`` naming it.
    """
    return decode_clips([(source, frame_indices)], size=size, backend=backend, device=device, threads=1)[0]


class SkipBadClips:
    """``data.on_error`` for a map-style dataset of ``length`` clips.

    ``fetch(index, load)`` returns ``load(index)`` with ``skipped_clips = 0``. When ``load`` raises
    ``DataError``: in ``raise`` mode the error propagates (it names the file, and the line for camera
    files); in ``skip`` mode the clip is remembered as bad, logged once per process, and the next
    index (cyclically) is tried, so the sample is the first good clip at or after ``index`` and its
    ``skipped_clips`` counts the bad ones passed over: deterministic whatever the worker or order.
    """

    def __init__(self, on_error: str, length: int, what: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"{what}: on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.length, self.what = on_error, length, what
        self.bad: dict[int, str] = {}

    def fetch(self, index: int, load: Callable[[int], dict]) -> dict:
        if self.on_error == "raise":
            sample = load(index)
            sample["skipped_clips"] = torch.tensor(0, dtype=torch.int64)
            return sample
        for skipped in range(self.length):
            candidate = (index + skipped) % self.length
            if candidate in self.bad:
                continue
            try:
                sample = load(candidate)
            except DataError as err:
                self.bad[candidate] = str(err)
                _warn_once(err, self.what)
                continue
            sample["skipped_clips"] = torch.tensor(skipped, dtype=torch.int64)
            return sample
        raise DataError(f"{self.what}: all {self.length} clips are bad (on_error=skip); first: "
                        f"{next(iter(self.bad.values()), '?')}")


_warned: set[str] = set()


def _warn_once(err: DataError, what: str) -> None:
    key = err.path or str(err)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: skipping a bad clip (data.on_error=skip; counted in skipped_clips): %s", what, err)

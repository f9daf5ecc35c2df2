"""engine/data/decode: every backend returns the same frames for the same indices, and bad files fail
naming themselves. Videos are encoded here (libx264, libvpx-vp9, libvpx, mjpeg through PyAV) with each
frame's index painted into its pixels, so a frame read back is identified independently of any decoder.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from geoforge.engine.data import decode
from geoforge.engine.data.decode import (BackendUnavailable, DataError, choose_backend, decode_clip, decode_clips, installed,
                                probe, supports)
from painted import CODECS, read_numbers, write_painted

INDICES = [37, 3, 3, 20, 0, 39, 38]  # unsorted, repeated, past a keyframe, the last frame
CPU_BACKENDS = ("pyav", "dali", "torchcodec", "auto")


def _cases():
    for codec in CODECS:
        for backend in CPU_BACKENDS:
            if backend == "dali" and codec not in decode.DALI_CPU_CODECS:
                continue  # DALI 2.4's CPU decoder has no H.264: see test_dali_refuses_h264_on_the_cpu
            marks = []
            if backend in ("dali", "torchcodec") and not installed(backend):
                marks = [pytest.mark.skip(reason=f"{backend} is not installed (pip install "
                                                 f"{'nvidia-dali-cuda120' if backend == 'dali' else 'torchcodec'})")]
            yield pytest.param(codec, backend, marks=marks, id=f"{codec}-{backend}")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("painted")
    return {codec: write_painted(folder, codec) for codec in CODECS}


@pytest.mark.parametrize("codec,backend", list(_cases()))
def test_backend_returns_the_painted_frames(videos, codec, backend):
    path, source = videos[codec]
    frames = decode_clip(path, INDICES, backend=backend, device="cpu")
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (len(INDICES), 48, 64, 3)
    assert read_numbers(frames.numpy()) == INDICES
    # the pixels are those encoded, up to the codec's loss and YUV->RGB rounding
    assert np.abs(frames.numpy().astype(np.int16) - source[INDICES]).mean() < 4.0
    # ... and agree with PyAV's decode of the same stream up to the colour conversion
    reference = decode_clip(path, INDICES, backend="pyav")
    assert (frames.float() - reference.float()).abs().mean() < 2.0


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("pyav", "auto") or installed(b)])
def test_bytes_in_memory_decode_like_the_file(videos, backend):
    path, _ = videos["vp9"]
    from_file = decode_clip(path, [5, 25], backend=backend, device="cpu")
    from_bytes = decode_clip(path.read_bytes(), [5, 25], backend=backend, device="cpu")
    assert torch.equal(from_file, from_bytes)


def test_size_resizes_and_centre_crops(videos):
    path, _ = videos["h264"]
    native = decode_clip(path, [1, 2])
    square = decode_clip(path, [1, 2], size=32)
    assert tuple(square.shape) == (2, 32, 32, 3)
    # short side 48 -> 32 (64 -> 43 wide), centre crop columns 5..36, antialiased bicubic
    expected = torch.nn.functional.interpolate(native.permute(0, 3, 1, 2).float(), size=(32, 43), mode="bicubic",
                                               antialias=True, align_corners=False)[..., 5:37]
    assert torch.equal(square.permute(0, 3, 1, 2), expected.round().clamp(0, 255).to(torch.uint8))
    assert tuple(decode_clip(path, [1], size=(24, 40)).shape) == (1, 24, 40, 3)


def test_batched_decode_equals_one_by_one(videos):
    items = [(videos[c][0], [i, i + 7]) for i, c in enumerate(["vp9", "h264", "vp9", "mjpeg", "vp8"])]
    batched = decode_clips(items, threads=2, device="cpu")
    for (path, indices), frames in zip(items, batched):
        assert torch.equal(frames, decode_clip(path, indices, device="cpu"))
        assert read_numbers(frames.numpy()) == indices


@pytest.mark.skipif(not installed("dali"), reason="nvidia-dali-cuda120 is not installed")
def test_dali_batch_with_a_bad_clip_names_it(videos, tmp_path):
    data = bytearray(videos["vp9"][0].read_bytes())  # the container intact, frame data corrupt
    start = int(len(data) * 0.3)
    data[start:start + 400] = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.webm"
    bad.write_bytes(bytes(data))
    items = [(videos["vp9"][0], [1, 2]), (bad, list(range(40)))]
    with pytest.raises(DataError, match="bad.webm: DALI cannot decode it: .*Invalid data"):
        decode_clips(items, backend="dali", device="cpu")
    # the pipeline is usable again after the failure
    assert read_numbers(decode_clip(videos["vp9"][0], [9], backend="dali", device="cpu").numpy()) == [9]


def test_probe_counts_frames_of_every_container(videos):
    for codec, (path, source) in videos.items():
        info = probe(path)
        assert (info.codec, info.frames, info.height, info.width) == (codec, len(source), 48, 64)


def _backends_here(codec):
    return [b for b in CPU_BACKENDS if b in ("pyav", "auto") or (installed(b) and supports(b, codec, "cpu"))]


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_bad_files_raise_data_errors_naming_them(videos, tmp_path, codec):
    path, _ = videos[codec]
    suffix = path.suffix
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for backend in _backends_here(codec):
        with pytest.raises(DataError, match="missing"):
            decode_clip(tmp_path / f"missing{suffix}", [0], backend=backend, device="cpu")
        with pytest.raises(DataError, match="garbage"):
            decode_clip(garbage, [0], backend=backend, device="cpu")
        with pytest.raises(DataError, match="truncated"):
            decode_clip(truncated, [0, 39], backend=backend, device="cpu")
        with pytest.raises(DataError, match=f"{codec}.*40 frames"):
            decode_clip(path, [3, 40], backend=backend, device="cpu")


def test_backend_choice(videos, caplog):
    assert choose_backend("auto", "h264", "cpu") == ("pyav", "cpu")
    assert choose_backend("pyav", "vp9", "cpu") == ("pyav", "cpu")
    if installed("dali"):
        assert choose_backend("dali", "vp9", "cpu") == ("dali", "cpu")
        with pytest.raises(BackendUnavailable, match="VP8, VP9 and MJPEG only"):
            choose_backend("dali", "h264", "cpu")
    if not installed("torchcodec"):
        with pytest.raises(BackendUnavailable, match="pip install torchcodec"):
            choose_backend("torchcodec", "h264", "cpu")
    with pytest.raises(ValueError, match="one of"):
        choose_backend("nvdec", "h264", "cpu")
    decode._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="geoforge.data"):
        for _ in range(3):
            decode_clip(videos["vp8"][0], [0], backend="auto", device="cpu")
    assert sum("backend auto -> pyav on cpu for vp8" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not installed("dali"), reason="nvidia-dali-cuda120 is not installed")
def test_dali_refuses_h264_on_the_cpu(videos):
    with pytest.raises(BackendUnavailable, match="cannot decode h264 on cpu"):
        decode_clip(videos["h264"][0], [0], backend="dali", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC)")
@pytest.mark.parametrize("backend", ["dali", "torchcodec"])
def test_gpu_decoders_return_the_painted_frames(videos, backend):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    for codec in ("h264", "vp9"):
        path, source = videos[codec]
        frames = decode_clip(path, INDICES, backend=backend, device="cuda")
        assert frames.is_cuda and read_numbers(frames.cpu().numpy()) == INDICES
        assert np.abs(frames.cpu().numpy().astype(np.int16) - source[INDICES]).mean() < 4.0

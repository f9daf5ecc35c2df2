"""engine/data/dali_loader.py: the main-process loader that decodes training batches with NVDEC (issue 16
item 4) makes the same batches as the DataLoader path: same sampler order and resume position, same
clip / window / flip / cameras (the dataset's ``plan``), same bad-file handling.

On CPU the loader runs with PyAV decoding injected in place of NVDEC, so everything except the decoder is
compared exactly with the DataLoader; the GPU lane compares the NVDEC batches too (pixels up to the
decoders' YUV->RGB rounding).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.data import builder
from geoforge.engine.data.dali_loader import PlannedLoader
from geoforge.engine.data.decode import DataError, decode_clips, installed
from geoforge.engine.data.re10k import Re10KClips
from geoforge.engine.data.sampler import EpochIndexed, ResumableBatchSampler
from geoforge.engine.distributed import World
from test_bad_data import _bad, _clip


def pyav(items):
    return decode_clips(items, backend="pyav")


@pytest.fixture()
def root(tmp_path):
    for n in range(6):
        _clip(tmp_path / "training", f"clip_{n}", seed=n)
    return tmp_path


def _dataset(root, **kw):
    return Re10KClips(root, num_frames=4, resolution=16, hflip_prob=0.5, seed=3, **kw)


def _dataloader_batches(root, n, start=0, **kw):
    ds = _dataset(root, **kw)
    sampler = ResumableBatchSampler(len(ds), micro_batch=2, seed=7, start=start)
    loader = torch.utils.data.DataLoader(EpochIndexed(ds), batch_sampler=sampler, num_workers=0)
    return list(itertools.islice(iter(loader), n))


def _planned_batches(root, n, start=0, decode=pyav, **kw):
    ds = _dataset(root, **kw)
    sampler = ResumableBatchSampler(len(ds), micro_batch=2, seed=7, start=start)
    return list(itertools.islice(iter(PlannedLoader(ds, sampler, decode=decode)), n))


def _assert_same(a, b, frames_atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if key == "frames" and frames_atol:
            diff = (a[key].cpu() - b[key].cpu()).abs()
            assert diff.mean() <= frames_atol, f"frames differ by {diff.mean():.4f} on average"
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key].cpu(), b[key].cpu()), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("start", [0, 5])
def test_same_batches_as_the_dataloader(root, start):
    """Order (three epochs of the sampler, resumed at 5), windows, flips and cameras: equal, bit for bit."""
    want = _dataloader_batches(root, 9 - start, start)
    got = _planned_batches(root, 9 - start, start)
    assert any(b["flip"].any() for b in want) and any((~b["flip"]).any() for b in want)
    for a, b in zip(got, want):
        _assert_same(a, b)


@pytest.mark.parametrize("kind", ["truncated video", "undecodable video", "malformed pose line", "clip too short",
                                  "frame count mismatch"])
def test_bad_files_are_skipped_and_counted_the_same_way(root, kind):
    _bad(kind, root / "training")
    want = _dataloader_batches(root, 6, on_error="skip")
    got = _planned_batches(root, 6, on_error="skip")
    assert sum(int(b["skipped_clips"].sum()) for b in want) >= 1
    for a, b in zip(got, want):
        _assert_same(a, b)


def _failing_decoder(bad_video_name):
    """PyAV, except that the decoder rejects one file (as NVDEC may reject a stream PyAV reads)."""
    calls = []

    def decode(items):
        calls.append(len(items))
        for video, _ in items:
            if video.name == bad_video_name:
                raise DataError(f"{video}: DALI cannot decode it: test", video)
        return pyav(items)

    return decode, calls


def test_a_decode_error_skips_that_clip_only(root):
    decode, calls = _failing_decoder("clip_2.mp4")
    got = _planned_batches(root, 6, decode=decode, on_error="skip")
    samples = [(int(i), c, int(s)) for b in got for i, c, s in zip(b["index"], b["clip"], b["skipped_clips"])]
    assert all(c != "clip_2" for _, c, _ in samples)
    assert any(s == 1 and i == 3 for i, _, s in samples)   # clip_2's slot is filled by clip_3, counted once
    assert max(calls) == 2 and 1 in calls                   # whole micro-batches, then the failing one alone


def test_a_decode_error_raises_naming_the_file(root):
    decode, _ = _failing_decoder("clip_2.mp4")
    with pytest.raises(DataError, match="clip_2.mp4: DALI cannot decode it"):
        _planned_batches(root, 6, decode=decode, on_error="raise")


def test_build_loader_uses_dali_only_on_a_gpu(monkeypatch, tmp_path):
    recipe = load_recipe("dfot_tiny", [f"data.root={tmp_path}"])
    cpu = World(0, 0, 1, 1, torch.device("cpu"))
    gpu = World(0, 0, 1, 1, torch.device("cuda", 0))
    assert not builder.uses_dali(recipe.data, cpu)
    monkeypatch.setattr(builder, "installed", lambda name: True)
    assert builder.uses_dali(recipe.data, gpu)  # auto on a GPU with DALI
    for backend, expected in (("dali", True), ("pyav", False), ("torchcodec", False)):
        recipe.data.decode_backend = backend
        assert builder.uses_dali(recipe.data, gpu) is expected
        assert not builder.uses_dali(recipe.data, cpu)
    monkeypatch.setattr(builder, "installed", lambda name: False)
    recipe.data.decode_backend = "dali"
    with pytest.raises(ValueError, match="DALI is not installed"):
        builder.uses_dali(recipe.data, gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not installed("dali"), reason="GPU lane: DALI (nvidia-dali-cuda120) is not installed")
def test_cuda_nvdec_batches_match_the_dataloader(root):
    """Real NVDEC through DALI: plans identical, frames on the GPU and equal up to YUV->RGB rounding."""
    _bad("truncated video", root / "training")
    want = _dataloader_batches(root, 6, on_error="skip")
    ds = _dataset(root, on_error="skip")
    loader = PlannedLoader(ds, ResumableBatchSampler(len(ds), micro_batch=2, seed=7), device=torch.device("cuda"))
    got = list(itertools.islice(iter(loader), 6))
    for a, b in zip(got, want):
        assert a["frames"].is_cuda
        _assert_same(a, b, frames_atol=0.02)

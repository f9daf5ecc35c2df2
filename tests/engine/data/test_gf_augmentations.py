"""Geometry Forcing's RealEstate10K augmentations in ``Re10KClips`` (issue 23): reverse playback, back-and-forth and
the frame-skip growth per sub-epoch, as GF's dataset code does them (CIntellifusion/GeometryForcing @ bf86144,
``datasets/video/realestate10k.py``: ``__getitem__``, ``_training_frame_skip``, ``_augment``), deterministic from
``(seed, epoch, index)`` and the sampler's position, so a resumed run draws the same.

The clips are written here in the raw RealEstate10K layout: every frame paints its own index (``painted``), carries
a depth map equal to its index + 1 and a camera of its own (random rotation and translation), so a sample says
which source frame each of its frames, depths and poses came from. The expected values are computed here from the
camera files with 4 x 4 matrices and from GF's rules written out, not from the code under test.
"""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from painted import painted_frames, read_numbers  # noqa: E402

from geoforge.engine.config import ConfigError, DataConfig, load_recipe  # noqa: E402
from geoforge.engine.data.builder import build_loader  # noqa: E402
from geoforge.engine.data.dali_loader import PlannedLoader  # noqa: E402
from geoforge.engine.data.decode import decode_clips  # noqa: E402
from geoforge.engine.data.re10k import Re10KClips, read_pose_file, write_pose_file  # noqa: E402
from geoforge.engine.data.sampler import EpochIndexed, ResumableBatchSampler  # noqa: E402
from geoforge.engine.data.video_io import encode_video  # noqa: E402
from geoforge.engine.distributed import World  # noqa: E402

SIZE = 32                    # frames are SIZE x SIZE and samples too: no resize, the painted indices survive
LENGTHS = (9, 14, 20, 27)    # frames per clip: with 4 frames x skip 2 (span 7) the grown skip is often capped
FRAMES, SKIP, SEED = 4, 2, 3


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gf_aug")
    folder = root / "training"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n, length in enumerate(LENGTHS):
        w2c = np.stack([np.concatenate([_rotation(rng), rng.normal(size=(3, 1))], axis=1) for _ in range(length)])
        k = np.tile([[0.9, 0.8, 0.5, 0.5]], (length, 1)) + rng.uniform(-0.05, 0.05, size=(length, 4))
        write_pose_file(folder / f"clip_{n}.txt", f"synthetic://{n}", torch.arange(length) * 100_000,
                        torch.tensor(k), torch.tensor(w2c))
        encode_video(folder / f"clip_{n}.mp4", painted_frames(length, SIZE, SIZE, seed=n), fps=10)
        depth = np.broadcast_to(np.arange(1, length + 1, dtype=np.float32)[:, None, None], (length, SIZE, SIZE))
        np.savez(folder / f"clip_{n}.depth.npz", depth=np.ascontiguousarray(depth))
    return root


def dataset(root: Path, **kw) -> Re10KClips:
    kw = {"num_frames": FRAMES, "frame_skip": SKIP, "resolution": SIZE, "seed": SEED, "hflip_prob": 0.5, **kw}
    return Re10KClips(root, decode_backend="pyav", **kw)


def sample(ds: Re10KClips, index: int, epoch: int = 0, subepoch: int = 0) -> dict:
    ds.set_epoch(epoch)
    ds.set_subepoch(subepoch)
    return ds[index]


def relative(w2c: torch.Tensor) -> torch.Tensor:
    """[T, 3, 4] camera-from-world -> each frame's pose in frame 0's camera, E_i E_0^-1, with 4 x 4 matrices."""
    full = torch.eye(4, dtype=torch.float64).repeat(w2c.shape[0], 1, 1)
    full[:, :3] = w2c
    return (full @ torch.linalg.inv(full[0]))[:, :3]


def mirrored(ext: torch.Tensor) -> torch.Tensor:
    """A horizontal flip of the image: diag(-1, 1, 1) [R | t] diag(-1, 1, 1, 1)."""
    return torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=ext.dtype)) @ ext @ torch.diag(
        torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=ext.dtype))


def check_cameras_follow(root: Path, s: dict) -> None:
    """The sample's extrinsics are its own frames' poses relative to its frame 0, its frames and depth those frames."""
    cams = read_pose_file(root / "training" / f"{s['clip']}.txt")
    order = s["frame_indices"].tolist()
    want = relative(cams["w2c"][order])
    if bool(s["flip"]):
        want = mirrored(want)
        assert read_numbers((s["frames"].flip(-1).permute(0, 2, 3, 1) * 255).numpy()) == order
    else:
        assert read_numbers((s["frames"].permute(0, 2, 3, 1) * 255).numpy()) == order
    torch.testing.assert_close(s["extrinsics"], want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s["poses16"][:, :4], cams["intrinsics"][order].float())
    assert s["depth"][:, 0, 0].tolist() == [i + 1.0 for i in order]


def gf_skip(length: int, start: int, subepoch: int, increase: int) -> int:
    """GF's training frame skip: min((length - start - 1) // (max_frames - 1), frame_skip + subepoch * increase)."""
    return min((length - start - 1) // (FRAMES - 1), SKIP + int(subepoch * increase))


def gf_back_and_forth(x: torch.Tensor) -> torch.Tensor:
    """GF's _augment: ``torch.cat([x[::2], x[1::2].flip(0)], dim=0)``."""
    return torch.cat([x[::2], x[1::2].flip(0)], dim=0)


# --------------------------------------------------------------------------------------------- defaults off
def test_defaults_off_draw_todays_windows_and_flips(root):
    """All three off: the start frame and the flip of every (epoch, index) are today's draws from
    default_rng([seed, epoch, index]) (start first, then the flip), at the fixed frame skip, in order; the
    sub-epoch changes nothing."""
    ds = dataset(root)
    for epoch, index in itertools.product(range(6), range(len(LENGTHS))):
        rng = np.random.default_rng([SEED, epoch, index])
        start = int(rng.integers(0, LENGTHS[index] - (FRAMES - 1) * SKIP))
        flip = bool(rng.random() < 0.5)
        for subepoch in (0, 7):
            ds.set_epoch(epoch)
            ds.set_subepoch(subepoch)
            plan = ds.plan(index)
            assert plan["frame_indices"] == [start + i * SKIP for i in range(FRAMES)]
            assert plan["flip"] == flip


def test_turning_them_on_keeps_each_samples_start_and_flip(root):
    plain = dataset(root)
    augmented = dataset(root, reverse_prob=0.5, back_and_forth_prob=0.5)
    for epoch, index in itertools.product(range(8), range(len(LENGTHS))):
        for ds in (plain, augmented):
            ds.set_epoch(epoch)
        a, b = plain.plan(index), augmented.plan(index)
        assert sorted(b["frame_indices"]) == a["frame_indices"] and b["flip"] == a["flip"]


# --------------------------------------------------------------------------------------- reverse playback
def test_reverse_yields_the_frames_and_poses_in_reverse_order(root):
    plain, reverse = dataset(root), dataset(root, reverse_prob=1.0)
    flips = set()
    for index, epoch in itertools.product(range(len(LENGTHS)), range(2)):
        a, b = sample(plain, index, epoch), sample(reverse, index, epoch)
        flips.add(bool(a["flip"]))
        assert b["frame_indices"].tolist() == a["frame_indices"].tolist()[::-1]
        assert torch.equal(b["frames"], a["frames"].flip(0))
        assert torch.equal(b["depth"], a["depth"].flip(0))
        assert torch.equal(b["intrinsics"], a["intrinsics"].flip(0))
        assert bool(b["flip"]) == bool(a["flip"])
        check_cameras_follow(root, b)
        # relative to the reversed clip's first frame, the last of the window: not the plain sample's poses reversed
        assert torch.allclose(b["extrinsics"][0], torch.eye(3, 4), atol=1e-6)
        assert not torch.allclose(b["extrinsics"], a["extrinsics"].flip(0), atol=1e-3)
    assert flips == {True, False}   # the flip composes with the reversal either way


# ---------------------------------------------------------------------------------------- back-and-forth
def test_back_and_forth_is_gfs_order(root):
    """0 1 2 3 4 5 -> 0 2 4 5 3 1 (GF: x[::2] then x[1::2] reversed), for frames, depth and cameras; with the
    reversal too, GF reverses after it."""
    kw = {"num_frames": 6, "frame_skip": 1}
    plain = dataset(root, **kw)
    bnf = dataset(root, back_and_forth_prob=1.0, **kw)
    both = dataset(root, back_and_forth_prob=1.0, reverse_prob=1.0, **kw)
    for index in range(len(LENGTHS)):
        a, b, c = sample(plain, index), sample(bnf, index), sample(both, index)
        start = a["frame_indices"][0].item()
        assert b["frame_indices"].tolist() == [start + i for i in (0, 2, 4, 5, 3, 1)]
        for key in ("frame_indices", "frames", "depth", "intrinsics"):
            assert torch.equal(b[key], gf_back_and_forth(a[key])), key
            assert torch.equal(c[key], gf_back_and_forth(a[key]).flip(0)), key
        check_cameras_follow(root, b)
        check_cameras_follow(root, c)
    odd = dataset(root, back_and_forth_prob=1.0, num_frames=5, frame_skip=1)
    assert odd.playback_order(True, False) == [0, 2, 4, 3, 1]


def test_each_sample_draws_its_augmentations_at_gfs_rates_deterministically(root):
    """reverse 0.5 and back-and-forth 0.1 (GF's), drawn per (epoch, index): rates within 4 sigma over 1,200 draws,
    independent of each other, and the same draw for the same key in a fresh dataset."""
    ds = dataset(root, reverse_prob=0.5, back_and_forth_prob=0.1)
    again = dataset(root, reverse_prob=0.5, back_and_forth_prob=0.1)
    n, rev, bnf, both = 0, 0, 0, 0
    for epoch, index in itertools.product(range(300), range(len(LENGTHS))):
        ds.set_epoch(epoch)
        order = ds.plan(index)["frame_indices"]
        window = sorted(order)
        is_bnf = order in ([window[i] for i in (0, 2, 3, 1)], [window[i] for i in (1, 3, 2, 0)])
        is_rev = order in (window[::-1], [window[i] for i in (1, 3, 2, 0)])
        assert is_rev or is_bnf or order == window
        n, rev, bnf, both = n + 1, rev + is_rev, bnf + is_bnf, both + (is_rev and is_bnf)
        if epoch % 50 == 0:
            again.set_epoch(epoch)
            assert again.plan(index)["frame_indices"] == order
    for count, p in ((rev, 0.5), (bnf, 0.1), (both, 0.05)):
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n), (count, n, p)


# ------------------------------------------------------------------------------------ frame-skip growth
@pytest.mark.parametrize("increase", [1, 2])
def test_frame_skip_at_subepoch_n_is_gfs_rule(root, increase):
    """skip = min((length - start - 1) // (frames - 1), frame_skip + n * increase), the start drawn over the
    windows of the base frame skip: grown where the clip allows, capped by the frames left after the start."""
    plain, grown = dataset(root), dataset(root, frame_skip_increase=increase)
    capped = uncapped = 0
    for epoch, index, n in itertools.product(range(3), range(len(LENGTHS)), range(8)):
        plain.set_epoch(epoch)
        grown.set_epoch(epoch)
        grown.set_subepoch(n)
        start = plain.plan(index)["frame_indices"][0]
        skip = gf_skip(LENGTHS[index], start, n, increase)
        assert grown.plan(index)["frame_indices"] == [start + i * skip for i in range(FRAMES)], (epoch, index, n)
        capped += skip < SKIP + n * increase
        uncapped += skip == SKIP + n * increase > SKIP
    assert capped and uncapped
    s = sample(grown, 3, 1, 4)   # the frames and cameras follow the grown window
    check_cameras_follow(root, s)
    assert s["frame_indices"][1] - s["frame_indices"][0] > SKIP


def test_sampler_items_carry_their_subepoch_and_resume_in_it():
    """Sub-epoch = optimizer step // subepoch_steps (grad_accum micro-batches per step), a function of the position."""
    def take(start, n):
        s = ResumableBatchSampler(12, micro_batch=2, grad_accum=2, seed=1, start=start, subepoch_steps=3)
        return list(itertools.islice(iter(s), n))

    full = take(0, 20)
    assert [{item[2] for item in b} for b in full] == [{(k // 2) // 3} for k in range(20)]
    plain = list(itertools.islice(iter(ResumableBatchSampler(12, micro_batch=2, grad_accum=2, seed=1)), 20))
    assert [[item[:2] for item in b] for b in full] == plain   # the order is the sampler's without sub-epochs
    assert take(7, 13) == full[7:]


def test_subepoch_steps_round_gfs_subepoch_up_to_whole_optimizer_steps():
    data = DataConfig(kind="re10k", frame_skip_increase=1, subepoch_samples=10_000)
    assert data.subepoch_steps(4 * 5 * 8) == 63        # GF: 10,000 samples at 160 per step, 313 batches -> 63 steps
    assert data.subepoch_steps(10_000) == 1 and data.subepoch_steps(20_000) == 1
    assert DataConfig(kind="re10k").subepoch_steps(160) == 0   # no growth: no sub-epochs


# --------------------------------------------------------------------------------- the stream, resumed
def _data(root: Path, workers: int = 0) -> DataConfig:
    data = DataConfig(kind="re10k", root=str(root), frames=FRAMES, frame_skip=SKIP, resolution=SIZE, batch_size=2,
                      num_workers=workers, hflip_prob=0.5, reverse_prob=0.5, back_and_forth_prob=0.5,
                      frame_skip_increase=1, subepoch_samples=8, decode_backend="pyav")
    data.validate()
    return data


CPU = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
KEYS = ("index", "frame_indices", "flip", "frames", "depth", "intrinsics", "extrinsics", "poses16")


def _stream(loader, n):
    return [{k: b[k] for k in KEYS} | {"clip": b["clip"]} for b in itertools.islice(iter(loader), n)]


def _assert_same_stream(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["clip"] == y["clip"]
        for k in KEYS:
            assert torch.equal(x[k], y[k]), k


def test_the_stream_after_resume_at_step_k_is_the_uninterrupted_stream(root):
    """build_loader with all three augmentations: micro-batch 2 x grad_accum 2 (4 clips = one epoch per step) and
    sub-epochs of 8 samples (2 steps). Resumed after k micro-batches, the indices, frames, depths and poses are
    the uninterrupted run's; the skip grows with the sub-epoch; a DataLoader worker changes nothing."""
    data = _data(root)
    full = _stream(build_loader(data, CPU, SEED, grad_accum=2), 16)
    for k in (3, 6, 11):
        _assert_same_stream(_stream(build_loader(data, CPU, SEED, grad_accum=2, start=k), 16 - k), full[k:])
    _assert_same_stream(_stream(build_loader(_data(root, workers=1), CPU, SEED, grad_accum=2), 16), full)
    reversed_ = back_and_forth = 0
    for k, batch in enumerate(full):
        subepoch = (k // 2) // 2
        for index, order in zip(batch["index"].tolist(), batch["frame_indices"].tolist()):
            window = sorted(order)
            step = window[1] - window[0]
            assert all(b - a == step for a, b in zip(window, window[1:]))
            assert step == gf_skip(LENGTHS[index], window[0], subepoch, 1), (k, index, window)
            reversed_ += order[0] > order[-1]
            back_and_forth += order != window and order != window[::-1]
    assert reversed_ and back_and_forth


def test_planned_loader_draws_the_same_augmented_stream(root):
    """The DALI loader's path (plan, decode, from_frames; PyAV decoding injected on CPU) with sub-epoch items
    makes the DataLoader's batches."""
    ds = dataset(root, reverse_prob=0.5, back_and_forth_prob=0.5, frame_skip_increase=1)
    sampler = lambda: ResumableBatchSampler(len(ds), micro_batch=2, seed=7, start=2, subepoch_steps=2)  # noqa: E731
    want = _stream(torch.utils.data.DataLoader(EpochIndexed(ds), batch_sampler=sampler(), num_workers=0), 8)
    got = _stream(PlannedLoader(ds, sampler(), decode=lambda items: decode_clips(items, backend="pyav")), 8)
    _assert_same_stream(got, want)


# -------------------------------------------------------------------------------------------- the keys
def test_keys_are_validated_naming_them(tmp_path):
    bad = [("data.reverse_prob=1.5", "reverse_prob: must be in"),
           ("data.back_and_forth_prob=-0.1", "back_and_forth_prob: must be in"),
           ("data.frame_skip_increase=-1", "frame_skip_increase: must be >= 0"),
           ("data.frame_skip_increase=1", "subepoch_samples: frame_skip_increase=1")]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_recipe("dfot_tiny", [override])
    with pytest.raises(ConfigError, match="reverse_prob: GF's reverse"):
        load_recipe("dfot_tiny", ["data.kind=minecraft", "model.action_dim=4", "data.reverse_prob=0.5"])
    with pytest.raises(ConfigError, match=r"teacher.cache: .*data.back_and_forth_prob"):
        load_recipe("gf_tiny", [f"teacher.cache={tmp_path}", "data.back_and_forth_prob=0.1"])


def test_the_paper_recipes_take_gfs_values():
    for name in ("gf_re10k_paper", "dfot_re10k_paper"):
        data = load_recipe(name).data
        assert (data.reverse_prob, data.back_and_forth_prob, data.frame_skip_increase, data.subepoch_samples) == (
            0.5, 0.1, 1, 10_000), name
        assert (data.frame_skip, data.hflip_prob) == (10, 0.5)

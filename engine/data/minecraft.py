"""Minecraft clips with actions: DFoT's on-disk layout, the training Dataset and a synthetic generator.

Layout (DFoT's ``minecraft`` dataset, Internet Archive ``minecraft_marsh_dataset``): under
``<root>/<split>/`` (any depth) each video ``<name>.mp4`` has a sidecar ``<name>.npz`` whose key
``actions`` holds one integer in ``[0, 4)`` per frame (entries past the last frame are ignored). DFoT
names its evaluation split ``validation``; ``split="test"`` reads it. The synthetic sets written here
add ``intrinsics`` (float64 [N, 4], normalised fx fy cx cy as in RealEstate10K files) and ``w2c``
(float64 [N, 3, 4], camera-from-world, OpenCV axes) to each npz; the real data has no cameras.

Actions as DFoT conditions on them (``external_cond_stack`` with ``frame_skip`` and
``external_cond_processing: mask_first``): a sample takes frames ``start, start + s, ...`` (s =
``frame_skip``); the one-hot actions of every source frame from ``start`` on are padded in front with
``s - 1`` zero rows and grouped by ``s``, so sampled frame ``k`` carries the actions of source frames
``start + (k - 1) s + 1 ... start + k s`` (those that led to it; zeros before ``start``), concatenated:
``actions`` [T, 4 s]. ``mask_first`` then zeroes the first 4 channels of frame 0.

Synthetic sets (``write_minecraft_clips``, ``ensure_minecraft_dataset``) are rendered by
``engine.data.voxel_render`` (a walking camera in a voxel terrain whose moves are the actions).

CLI: ``geoforge-minecraft --out DIR --clips N [--frames 64] [--resolution 64] [--seed 0]
[--split training]`` writes ``DIR/SPLIT/minecraft_<seed>_<n>.mp4`` + ``.npz`` (idempotent, atomic).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from geoforge.engine.data.decode import BACKENDS, DataError, SkipBadClips, decode_clip, probe
from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import ensure_generated
from geoforge.engine.data.video_io import ResizeCrop, encode_video
from geoforge.engine.data.voxel_render import NUM_ACTIONS, render_minecraft_clip
from geoforge.engine.errors import MissingInput

log = logging.getLogger("geoforge.data")
PREPARE_HINT = ("point data.root at a Minecraft set (<split>/<name>.mp4 + <name>.npz), or render synthetic clips with "
                "geoforge-minecraft --out DATA_ROOT --clips N and --set data.root=DATA_ROOT")

FPS = 10
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------- the dataset
def stack_actions(actions: np.ndarray, start: int, num_frames: int, frame_skip: int, mask_first: bool = True,
                  num_actions: int = NUM_ACTIONS) -> torch.Tensor:
    """DFoT's action condition of the sample starting at ``start``: float32 [T, num_actions * frame_skip]
    (module docstring)."""
    span = (num_frames - 1) * frame_skip + 1
    onehot = np.eye(num_actions, dtype=np.float32)[actions[start:start + span]]
    padded = np.concatenate([np.zeros((frame_skip - 1, num_actions), np.float32), onehot])
    stacked = torch.from_numpy(padded.reshape(num_frames, frame_skip * num_actions).copy())
    if mask_first:
        stacked[0, :num_actions] = 0
    return stacked


def find_minecraft_clips(root: str | Path, split: str, on_error: str = "raise") -> list[tuple[Path, Path]]:
    """(video, actions npz) pairs under ``<root>/<split>`` (``test`` reads ``validation``), sorted.
    A video without its npz (or the reverse) raises ``DataError`` (``raise``) or is left out (``skip``)."""
    folder = Path(root) / split
    if not folder.is_dir() and split == "test":
        folder = Path(root) / "validation"
    if not folder.is_dir():
        raise MissingInput(f"data.root: no Minecraft split {split!r}: {folder} does not exist; {PREPARE_HINT}")
    videos = {p.with_suffix(""): p for p in folder.rglob("*.mp4")}
    archives = {p.with_suffix(""): p for p in folder.rglob("*.npz")}
    lonely = sorted(str(p) + " has no " + ("actions .npz" if p.suffix == ".mp4" else "video .mp4")
                    for p in [videos[k] for k in videos.keys() - archives.keys()]
                    + [archives[k] for k in archives.keys() - videos.keys()])
    if lonely and on_error == "raise":
        more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
        raise DataError(f"{lonely[0]}{more}; data.on_error=skip leaves such clips out")
    if lonely:
        log.warning("%s: %d files without their pair are left out (data.on_error=skip), e.g. %s", folder, len(lonely),
                    lonely[0])
    pairs = [(videos[k], archives[k]) for k in sorted(videos.keys() & archives.keys())]
    if not pairs:
        raise MissingInput(f"data.root: no Minecraft clips (<name>.mp4 + <name>.npz) under {folder}; {PREPARE_HINT}")
    return pairs


def _load_npz(path: Path, cameras: bool) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as archive:
            keys = set(archive.keys())
            if "actions" not in keys:
                raise DataError(f"{path}: no key 'actions' (keys: {sorted(keys)})", path)
            out = {"actions": archive["actions"]}
            if cameras:
                if not {"intrinsics", "w2c"} <= keys:
                    raise DataError(f"{path}: no cameras (keys 'intrinsics' and 'w2c'), which the first clip of "
                                    f"this set has", path)
                out["intrinsics"], out["w2c"] = archive["intrinsics"], archive["w2c"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:  # missing, truncated or not an npz
        raise DataError(f"{path}: cannot read the actions archive ({err})", path) from err
    actions = out["actions"]
    if actions.ndim != 1 or not np.issubdtype(actions.dtype, np.integer):
        raise DataError(f"{path}: 'actions' must be integers [N], got {actions.dtype} {actions.shape}", path)
    if actions.size and (actions.min() < 0 or actions.max() >= NUM_ACTIONS):
        raise DataError(f"{path}: actions must lie in [0, {NUM_ACTIONS}), found {actions.min()}..{actions.max()}", path)
    return out


class MinecraftClips(Dataset):
    """Fixed-length action-conditioned clips of DFoT's Minecraft layout (real or synthetic).

    Args:
        root, split: see the module docstring.
        num_frames, frame_skip: T frames ``frame_skip`` apart (DFoT: 50 frames, skip 2).
        resolution: output side R: short side resized to R (nearest, as DFoT), centre crop R x R.
        seed: the start frame of sample ``index`` is drawn from ``(seed, epoch, index)``; ``set_epoch``.
        fixed_windows: draw it from epoch 0 in every epoch (one window per clip).
        mask_first: apply DFoT's ``mask_first`` to the stacked actions.
        cameras: return ``intrinsics`` / ``extrinsics`` (from the npz); None: when the first clip has them.
        decode_backend, decode_device, on_error: as in ``engine.data.re10k.Re10KClips``.

    ``__getitem__`` returns the keys of ``Re10KClips`` (frames float32 [T, 3, R, R] in [0, 1], index,
    frame_indices, clip, skipped_clips; intrinsics [T, 3, 3] and extrinsics [T, 3, 4] relative to frame 0
    when the set has cameras) plus ``actions`` float32 [T, 4 * frame_skip].
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        num_frames: int = 8,
        frame_skip: int = 2,
        resolution: int = 64,
        seed: int = 0,
        fixed_windows: bool = False,
        mask_first: bool = True,
        cameras: bool | None = None,
        decode_backend: str = "auto",
        decode_device: str | None = "cpu",
        on_error: str = "raise",
    ) -> None:
        for name, value in (("num_frames", num_frames), ("frame_skip", frame_skip), ("resolution", resolution)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MinecraftClips: {name} must be a positive int, got {value!r}")
        if decode_backend not in BACKENDS:
            raise ValueError(f"MinecraftClips: decode_backend must be one of {BACKENDS}, got {decode_backend!r}")
        self.root, self.split = Path(root), split
        self.num_frames, self.frame_skip, self.resolution = num_frames, frame_skip, resolution
        self.seed, self.mask_first, self.fixed_windows = seed, mask_first, fixed_windows
        self.decode_backend, self.decode_device = decode_backend, decode_device
        self._skip = SkipBadClips(on_error, 0, f"MinecraftClips({root}, {split})")
        self.clips = find_minecraft_clips(root, split, on_error)
        self._skip.length = len(self.clips)
        if cameras is None:
            with np.load(self.clips[0][1]) as first:
                cameras = {"intrinsics", "w2c"} <= set(first.keys())
        self.cameras = cameras
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def span(self) -> int:
        return (self.num_frames - 1) * self.frame_skip + 1

    @property
    def action_dim(self) -> int:
        """Channels of ``actions`` per frame: 4 actions x frame_skip."""
        return NUM_ACTIONS * self.frame_skip

    @property
    def skipped(self) -> dict[int, str]:
        """Clips found bad so far in this process (index -> the error), in ``skip`` mode."""
        return self._skip.bad

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        return self._skip.fetch(index, self._sample)

    def plan(self, index: int) -> dict:
        """Sample ``index`` without its pixels: actions, cameras, the window from ``(seed, epoch, index)``;
        ``DataError`` for a bad archive or a clip too short (a probe, no decoding). See ``Re10KClips.plan``."""
        video, npz = self.clips[index]
        data = _load_npz(npz, self.cameras)
        count = probe(video).frames
        if len(data["actions"]) < count:
            raise DataError(f"{npz}: {len(data['actions'])} actions for the {count} frames of {video}", npz)
        if self.cameras and (data["intrinsics"].shape != (len(data["actions"]), 4)
                             or data["w2c"].shape != (len(data["actions"]), 3, 4)):
            raise DataError(f"{npz}: cameras must be intrinsics [N, 4] and w2c [N, 3, 4] for N="
                            f"{len(data['actions'])} actions, got {data['intrinsics'].shape}, {data['w2c'].shape}", npz)
        if count < self.span:
            raise DataError(f"{video}: {count} frames; num_frames={self.num_frames} with frame_skip="
                            f"{self.frame_skip} needs {self.span}", video)
        rng = np.random.default_rng([self.seed, 0 if self.fixed_windows else self.epoch, index])
        start = int(rng.integers(0, count - self.span + 1))
        indices = [start + i * self.frame_skip for i in range(self.num_frames)]
        return {"index": index, "video": video, "data": data, "start": start, "frame_indices": indices,
                "flip": False}

    def check_decodable(self, plan: dict) -> bool:
        return True

    def from_frames(self, plan: dict, images: torch.Tensor) -> dict:
        """The sample of ``plan`` from its decoded frames uint8 [T, H, W, 3] (CPU or CUDA)."""
        data, indices, start = plan["data"], plan["frame_indices"], plan["start"]
        transform = ResizeCrop(tuple(images.shape[1:3]), self.resolution)
        sample = dict(
            frames=transform.frames(images, "nearest-exact").float().div_(255.0),
            actions=stack_actions(data["actions"], start, self.num_frames, self.frame_skip, self.mask_first),
            index=torch.tensor(plan["index"], dtype=torch.int64),
            frame_indices=torch.tensor(indices, dtype=torch.int64),
            clip=plan["video"].stem,
        )
        if self.cameras:
            k = pixel_intrinsics(torch.from_numpy(data["intrinsics"][indices]).double(), *transform.size)
            sample["intrinsics"] = transform.intrinsics(k).float()
            sample["extrinsics"] = relative_extrinsics(torch.from_numpy(data["w2c"][indices]).double()).float()
        return sample

    def _sample(self, index: int) -> dict:
        plan = self.plan(index)
        images = decode_clip(plan["video"], plan["frame_indices"], backend=self.decode_backend,
                             device=self.decode_device)
        return self.from_frames(plan, images)


# ----------------------------------------------------------------------------- synthetic sets
def write_minecraft_clips(folder: str | Path, clips: int, frames: int, resolution: int, seed: int) -> None:
    """Render clips ``0..clips-1`` of ``seed`` into ``folder`` (mp4 + npz per clip, not atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(clips):
        clip = render_minecraft_clip(seed, n, frames, resolution)
        name = f"minecraft_{seed}_{n:06d}"
        encode_video(folder / f"{name}.mp4", clip["frames"], fps=FPS)
        np.savez(folder / f"{name}.npz", actions=clip["actions"], intrinsics=clip["intrinsics"], w2c=clip["w2c"])


def ensure_minecraft_dataset(root: str | Path, clips: int, frames: int, resolution: int, seed: int,
                             split: str = "training") -> Path:
    """Create ``<root>/<split>`` with synthetic Minecraft clips unless it exists (atomic, idempotent; an
    existing split made with other parameters raises ValueError naming the parameter); returns root."""
    for name, value in (("clips", clips), ("frames", frames), ("resolution", resolution)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ensure_minecraft_dataset: {name} must be a positive int, got {value!r}")
    if resolution % 2:
        raise ValueError(f"ensure_minecraft_dataset: resolution must be even (H.264), got {resolution}")
    params = dict(generator="geoforge.minecraft", version=GENERATOR_VERSION, clips=clips, frames=frames,
                  resolution=resolution, seed=seed, split=split)
    ensure_generated(Path(root) / split, params,
                     lambda folder: write_minecraft_clips(folder, clips, frames, resolution, seed))
    return Path(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a synthetic Minecraft-layout dataset (videos + actions).")
    parser.add_argument("--out", required=True, type=Path, help="dataset root; clips go to OUT/SPLIT")
    parser.add_argument("--clips", required=True, type=int)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="training")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    ensure_minecraft_dataset(args.out, args.clips, args.frames, args.resolution, args.seed, args.split)
    print(f"{args.out / args.split}: {args.clips} Minecraft clips of {args.frames} frames at {args.resolution}px "
          f"ready in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()

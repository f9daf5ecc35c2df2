"""RealEstate10K clips: camera files, the two on-disk layouts, and the training Dataset.

Camera file (one per clip, the public RealEstate10K format): line 1 is the source URL; every other
line is ``timestamp_us fx fy cx cy k1 k2`` followed by the 12 values of a row-major 3x4
world-to-camera (camera-from-world, OpenCV axes) matrix. fx and cx are normalised by the image width,
fy and cy by its height, with pixel edges at 0 and W; in pixels with centres at integer coordinates,
``fx_px = fx * W`` and ``cx_px = cx * W - 0.5`` (same for y with H).

On-disk layouts (``Re10KClips(layout=...)``); row ``i`` of a camera file belongs to frame ``i``:

- ``raw``: ``<root>/<split>/<clip>.txt`` beside ``<clip>.mp4`` or a folder ``<clip>/`` of images
  (sorted by name), and optionally ``<clip>.depth.npz`` (key ``depth``: float32 [T, H, W], z in the
  camera, at the frames' size). The public RealEstate10K tarball names its training split ``train``;
  ``split="training"`` falls back to it.
- ``dfot`` (DFoT's processed data): ``<root>/<split>_256/<clip>.mp4`` (or ``<split>_<size>``: the
  smallest size at least the output resolution, else the largest, unless ``video_size`` is given) and
  ``<root>/<split>_poses/<clip>.pt``, a float32 [T, 18] tensor of the camera-file columns without the
  timestamp (``engine.data.prepare_re10k`` writes it from camera files and source videos).

Geometry Forcing's augmentations (all off by default; on, the samples drawn so far are unchanged: their draws
come after the start frame and the flip). GF trains on DFoT's RealEstate10K dataset class, whose training
``__getitem__`` and ``_augment`` (CIntellifusion/GeometryForcing ``datasets/video/realestate10k.py``,
``RealEstate10KAdvancedVideoDataset``; probabilities in ``configurations/dataset_experiment/
realestate10k_video_generation.yaml``, sub-epoch size ``dataset.subdataset_size=10000`` in
``scripts/train_geometry_forcing.sh``) do, in this order:

- **frame skip**: ``min((length - start - 1) // (frames - 1), frame_skip + subepoch * frame_skip_increase)``
  (``_training_frame_skip``): the skip grows by ``frame_skip_increase`` every sub-epoch, capped per sample by the
  frames left after its start frame; the start itself is drawn over the windows of the base ``frame_skip``
  (``prepare_clips``), so a late start keeps a smaller skip. ``frame_skip_increase`` 0 is ``frame_skip``;
- **horizontal flip** (``hflip_prob``), as before;
- **back-and-forth** (``back_and_forth_prob``): frames ``0 1 2 ... 2k+1`` -> ``0 2 4 ... 2k 2k+1 ... 3 1``, i.e.
  ``cat([x[::2], x[1::2].flip(0)])`` of frames and cameras together;
- **reverse** (``reverse_prob``): ``x.flip(0)`` of frames and cameras.

The cameras follow the frames: a sample's frame ``i`` keeps its own pose, and, as DFoT normalises the raw poses
by the first frame *after* the augmentation (``algorithms/dfot/dfot_video_pose.py`` ``_process_conditions``,
``normalize_by_first``), ``extrinsics`` are relative to the sample's frame 0 - the last of the window when
reversed. ``frame_indices`` lists the source frames in playback order. GF draws with Python's ``random`` in
each worker; here every draw comes from ``(seed, epoch, index)`` and the sub-epoch from the sampler's position
(``engine.data.sampler``), so a resumed run draws the same.

Bad data (``on_error``): a camera file without its video, a malformed camera line, a missing,
truncated or undecodable video, a clip shorter than a sample, or a video whose frame count differs from
its camera rows raises ``DataError`` naming the file (and line) in ``raise`` mode; in ``skip`` mode the
clip is left out (at scan time) or replaced by the next good one, logged once, and counted in the
sample's ``skipped_clips`` (see ``engine.data.decode.SkipBadClips``).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from geoforge.engine.data.decode import BACKENDS, DataError, SkipBadClips, decode_clip, probe
from geoforge.engine.data.video_io import ResizeCrop, read_image
from geoforge.engine.errors import MissingInput

__all__ = ["Re10KClips", "ResizeCrop", "find_clips", "pixel_intrinsics", "read_dfot_poses", "read_pose_file",
           "relative_extrinsics", "write_pose_file"]

log = logging.getLogger("geoforge.data")
PREPARE_HINT = ("prepare RealEstate10K with geoforge-prepare-re10k --txt-dir TXT --video-dir VIDEOS --out DATA_ROOT "
                "and --set data.root=DATA_ROOT, or train a toy recipe on synthetic scenes (--recipe gf_tiny)")

LAYOUTS = ("auto", "raw", "dfot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_ROW_VALUES = 19  # timestamp, fx fy cx cy k1 k2, 12 matrix entries


def read_pose_file(path: str | Path) -> dict:
    """Parse a RealEstate10K camera file.

    Returns dict(url str, timestamps int64 [T] (microseconds), intrinsics float64 [T, 4] (normalised
    fx fy cx cy), w2c float64 [T, 3, 4]). A missing file or a malformed line raises ``DataError`` (a
    ValueError) naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the camera file ({err})", path) from None
    if not lines:
        raise DataError(f"{path}: empty camera file (expected a URL line, then one line per frame)")
    stamps, rows = [], []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != _ROW_VALUES:
            raise DataError(
                f"{path}:{number}: expected {_ROW_VALUES} values (timestamp fx fy cx cy k1 k2 and a row-major "
                f"3x4 world-to-camera matrix), got {len(parts)}", path
            )
        try:
            stamps.append(int(parts[0]))
            rows.append([float(v) for v in parts[1:]])
        except ValueError as err:
            raise DataError(f"{path}:{number}: not a number ({err})", path) from None
        if not np.all(np.isfinite(rows[-1])):
            raise DataError(f"{path}:{number}: non-finite value", path)
    if not rows:
        raise DataError(f"{path}: no camera lines after the URL line", path)
    table = torch.tensor(rows, dtype=torch.float64)
    return dict(
        url=lines[0].strip(),
        timestamps=torch.tensor(stamps, dtype=torch.int64),
        intrinsics=table[:, :4].clone(),
        w2c=table[:, 6:].reshape(-1, 3, 4).clone(),
    )


def write_pose_file(
    path: str | Path, url: str, timestamps: torch.Tensor, intrinsics: torch.Tensor, w2c: torch.Tensor
) -> None:
    """Write a RealEstate10K camera file (inverse of ``read_pose_file``; k1 = k2 = 0, 9 decimals)."""
    timestamps, intrinsics, w2c = torch.as_tensor(timestamps), torch.as_tensor(intrinsics), torch.as_tensor(w2c)
    t = timestamps.shape[0]
    if intrinsics.shape != (t, 4) or w2c.shape != (t, 3, 4):
        raise ValueError(
            f"{path}: need timestamps [T], intrinsics [T, 4], w2c [T, 3, 4]; got {tuple(timestamps.shape)}, "
            f"{tuple(intrinsics.shape)}, {tuple(w2c.shape)}"
        )
    lines = [url]
    for stamp, k, m in zip(timestamps.tolist(), intrinsics.tolist(), w2c.reshape(t, 12).tolist()):
        lines.append(" ".join([str(int(stamp))] + [f"{v:.9f}" for v in k + [0.0, 0.0] + m]))
    Path(path).write_text("\n".join(lines) + "\n")


def read_dfot_poses(path: str | Path) -> dict:
    """Load DFoT's ``<clip>.pt`` (float32 [T, 18]): dict(intrinsics float64 [T, 4], w2c float64 [T, 3, 4]).
    A missing, unreadable or malformed file raises ``DataError`` naming it."""
    path = Path(path)
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a corrupt or truncated file
        raise DataError(f"{path}: cannot load the camera tensor ({type(err).__name__}: {err})", path) from None
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != 18 or table.shape[0] == 0:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise DataError(f"{path}: expected a tensor [T>0, 18] (fx fy cx cy k1 k2 + 3x4 w2c), got {shape}", path)
    table = table.to(torch.float64)
    if not torch.isfinite(table).all():
        raise DataError(f"{path}: non-finite camera values", path)
    return dict(intrinsics=table[:, :4].clone(), w2c=table[:, 6:].reshape(-1, 3, 4).clone())


def relative_extrinsics(w2c: torch.Tensor) -> torch.Tensor:
    """Camera-from-world [T, 3, 4] re-expressed in frame 0's camera coordinates (frame 0 -> [I|0])."""
    rot0, t0 = w2c[0, :, :3], w2c[0, :, 3]
    rot = w2c[:, :, :3] @ rot0.T  # R_i R_0^T
    trans = w2c[:, :, 3] - (rot @ t0[:, None])[..., 0]  # t_i - R_i R_0^T t_0
    return torch.cat([rot, trans[..., None]], dim=-1)


def pixel_intrinsics(normalised: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised fx fy cx cy [T, 4] -> 3x3 pixel intrinsics [T, 3, 3] (pixel centres at integers)."""
    fx, fy, cx, cy = normalised.unbind(-1)
    k = torch.zeros(normalised.shape[0], 3, 3, dtype=normalised.dtype)
    k[:, 0, 0], k[:, 1, 1] = fx * width, fy * height
    k[:, 0, 2], k[:, 1, 2] = cx * width - 0.5, cy * height - 0.5
    k[:, 2, 2] = 1.0
    return k


@dataclass(frozen=True)
class Clip:
    """One clip on disk: its cameras, its frames (an mp4 or a folder of images) and optional depth."""

    name: str
    cameras: Path
    video: Path
    depth: Path | None


def _video_for(folder: Path, name: str, entries: set[str]) -> Path | None:
    if f"{name}.mp4" in entries:
        return folder / f"{name}.mp4"
    if name in entries and (folder / name).is_dir():
        return folder / name
    return None


def _dfot_videos(root: Path, split: str, video_size: int | None, resolution: int) -> Path:
    if video_size is not None:
        return root / f"{split}_{video_size}"
    sizes = sorted(int(p.name.rsplit("_", 1)[1]) for p in root.glob(f"{split}_*")
                   if p.is_dir() and p.name.rsplit("_", 1)[1].isdigit())
    if not sizes:
        return root / f"{split}_256"
    return root / f"{split}_{next((n for n in sizes if n >= resolution), sizes[-1])}"


def find_clips(root: str | Path, split: str, layout: str = "auto", on_error: str = "raise",
               video_size: int | None = None, resolution: int = 256) -> tuple[str, list[Clip]]:
    """The resolved layout and the clips (sorted by name) of ``split`` under ``root``.

    A camera file without its video raises ``DataError`` naming both (``on_error="raise"``), or is
    left out with one warning giving the count (``"skip"``).
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = "dfot" if (root / f"{split}_poses").is_dir() else "raw"
    clips: list[Clip] = []
    missing: list[str] = []
    if layout == "dfot":
        poses, videos = root / f"{split}_poses", _dfot_videos(root, split, video_size, resolution)
        if not poses.is_dir() or not videos.is_dir():
            raise MissingInput(f"data.root: the DFoT layout needs {poses} and {videos}; {PREPARE_HINT}")
        entries = set(os.listdir(videos))
        for pt in sorted(poses.glob("*.pt")):
            if f"{pt.stem}.mp4" in entries:
                clips.append(Clip(pt.stem, pt, videos / f"{pt.stem}.mp4", None))
            else:
                missing.append(f"{pt} has no video {videos / (pt.stem + '.mp4')}")
    else:
        folder = root / split
        if not folder.is_dir() and split == "training" and (root / "train").is_dir():
            folder = root / "train"
        if not folder.is_dir():
            raise MissingInput(f"data.root: no clips for split {split!r}: neither {root / split} nor "
                               f"{root}/{split}_poses exist; {PREPARE_HINT}")
        entries = set(os.listdir(folder))
        for txt in sorted(e for e in entries if e.endswith(".txt")):
            name = txt[: -len(".txt")]
            video = _video_for(folder, name, entries)
            if video is None:
                missing.append(f"{folder / txt} has no video {folder / name}.mp4 (nor a frame folder {folder / name}/)")
                continue
            depth = folder / f"{name}.depth.npz" if f"{name}.depth.npz" in entries else None
            clips.append(Clip(name, folder / txt, video, depth))
    if missing and on_error == "raise":
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}{more}; data.on_error=skip leaves such clips out")
    if missing:
        log.warning("%s/%s: %d camera files have no video and are left out (data.on_error=skip), e.g. %s",
                    root, split, len(missing), missing[0])
    if not clips:
        raise MissingInput(f"data.root: no clips with both cameras and frames in {root} (split {split!r}, layout "
                           f"{layout}); {PREPARE_HINT}")
    return layout, clips


@dataclass
class _Loaded:
    """Frames (uint8 [N, 3, R, R]), output pixel intrinsics [T, 3, 3] for all T cameras, w2c, depth."""

    frames: torch.Tensor
    intrinsics: torch.Tensor
    w2c: torch.Tensor
    depth: torch.Tensor | None
    normalised: torch.Tensor | None = None   # the camera files' fx fy cx cy [T, 4], unchanged (DFoT's poses16)


class Re10KClips(Dataset):
    """Fixed-length clips of RealEstate10K-style data (real, DFoT-processed or synthetic).

    Args:
        root: dataset root (see the module docstring for the layouts).
        split: split name, e.g. ``training`` or ``test``.
        num_frames: frames per sample T.
        frame_skip: stride between sampled frames; a clip needs ``(num_frames - 1) * frame_skip + 1``
            frames, a shorter one is a bad clip (see ``on_error``).
        resolution: output side R; frames are resized (short side -> R, antialiased bicubic) and
            centre-cropped to R x R, intrinsics follow.
        layout: ``auto`` (``dfot`` when ``<root>/<split>_poses`` exists, else ``raw``), ``raw`` or ``dfot``.
        seed: the start frame, the flip, the back-and-forth and the reversal of sample ``index`` are drawn
            from ``(seed, epoch, index)`` only, so a resumed run sees identical data; ``set_epoch`` changes them.
        fixed_windows: draw them from epoch 0 in every epoch (one window per clip).
        hflip_prob: probability of a horizontal flip (image, intrinsics, extrinsics and depth mirrored
            consistently).
        reverse_prob: probability of playing the sample backwards (frames and cameras; module docstring).
        back_and_forth_prob: probability of GF's back-and-forth order ``0 2 4 ... 5 3 1`` (module docstring).
        frame_skip_increase: the frame skip grows by this every sub-epoch (``set_subepoch``), capped per sample
            by the frames left after its start (module docstring); 0 keeps ``frame_skip``.
        cache_clips: keep this many decoded, resized clips (all their frames, uint8) in an in-memory LRU
            per process; 0 decodes only the sampled frames each time. Outputs are identical either way.
        load_depth: return ``depth`` for clips that have a depth file.
        decode_backend: ``auto``, ``dali``, ``torchcodec`` or ``pyav`` (``engine.data.decode``).
        decode_device: ``cpu`` (default: frames stay on the CPU, as DataLoader workers and pinned memory
            need), ``cuda``, or None (the GPU when usable and DALI installed, i.e. NVDEC in the main
            process; the samples' frames are then CUDA tensors: use no pinned memory).
        on_error: ``raise`` or ``skip`` a bad clip (module docstring).
        video_size: ``dfot`` layout: read ``<split>_<video_size>/`` (None: see the module docstring).

    ``__getitem__`` returns dict(frames float32 [T, 3, R, R] in [0, 1], intrinsics float32 [T, 3, 3] in
    output pixels, extrinsics float32 [T, 3, 4] camera-from-world relative to frame 0 (frame 0 is
    [I|0]), index int64 [] (of the clip actually returned), frame_indices int64 [T] (source frames in
    playback order), clip str,
    skipped_clips int64 [] (bad clips passed over to produce it, 0 unless ``on_error="skip"``), depth
    float32 [T, R, R] when the clip has a depth file, and poses16 float32 [T, 16]: DFoT's raw condition, the
    camera file's normalised fx fy cx cy *as written* (for the uncropped frame, as DFoT feeds its released
    models) + the 12 numbers of ``extrinsics`` (flipped like DFoT's hflip when flipped)).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        num_frames: int = 8,
        frame_skip: int = 1,
        resolution: int = 64,
        layout: str = "auto",
        seed: int = 0,
        fixed_windows: bool = False,
        hflip_prob: float = 0.0,
        reverse_prob: float = 0.0,
        back_and_forth_prob: float = 0.0,
        frame_skip_increase: int = 0,
        cache_clips: int = 0,
        load_depth: bool = True,
        decode_backend: str = "auto",
        decode_device: str | None = "cpu",
        on_error: str = "raise",
        video_size: int | None = None,
    ) -> None:
        for name, value in (("num_frames", num_frames), ("frame_skip", frame_skip), ("resolution", resolution)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Re10KClips: {name} must be a positive int, got {value!r}")
        for name, value in (("hflip_prob", hflip_prob), ("reverse_prob", reverse_prob),
                            ("back_and_forth_prob", back_and_forth_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Re10KClips: {name} must lie in [0, 1], got {value}")
        if not isinstance(frame_skip_increase, int) or frame_skip_increase < 0:
            raise ValueError(f"Re10KClips: frame_skip_increase must be an int >= 0, got {frame_skip_increase!r}")
        if cache_clips < 0:
            raise ValueError(f"Re10KClips: cache_clips must be >= 0, got {cache_clips}")
        if decode_backend not in BACKENDS:
            raise ValueError(f"Re10KClips: decode_backend must be one of {BACKENDS}, got {decode_backend!r}")
        self.root, self.split = Path(root), split
        self.num_frames, self.frame_skip, self.resolution = num_frames, frame_skip, resolution
        self.seed, self.hflip_prob, self.cache_clips, self.load_depth = seed, hflip_prob, cache_clips, load_depth
        self.fixed_windows = fixed_windows
        self.reverse_prob, self.back_and_forth_prob = reverse_prob, back_and_forth_prob
        self.frame_skip_increase = frame_skip_increase
        self.decode_backend, self.decode_device = decode_backend, decode_device
        self._skip = SkipBadClips(on_error, 0, f"Re10KClips({root}, {split})")  # validates on_error first
        self.layout, self.clips = find_clips(root, split, layout, on_error, video_size, resolution)
        self._skip.length = len(self.clips)
        self.epoch = 0
        self.subepoch = 0
        self._cache: OrderedDict[int, _Loaded] = OrderedDict()

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose start frames and flips ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def set_subepoch(self, subepoch: int) -> None:
        """Select the sub-epoch whose frame skip ``__getitem__`` uses (``frame_skip_increase``)."""
        if subepoch < 0:
            raise ValueError(f"Re10KClips: sub-epoch must be >= 0, got {subepoch}")
        self.subepoch = int(subepoch)

    def skip_for(self, count: int, start: int) -> int:
        """The frame skip of a sample starting at frame ``start`` of a clip of ``count`` frames in the current
        sub-epoch: GF's ``min((count - start - 1) // (frames - 1), frame_skip + subepoch * frame_skip_increase)``
        (``datasets/video/realestate10k.py`` ``__getitem__`` / ``_training_frame_skip``)."""
        grown = self.frame_skip + self.subepoch * self.frame_skip_increase
        if self.num_frames == 1:
            return grown
        return min((count - start - 1) // (self.num_frames - 1), grown)

    def playback_order(self, back_and_forth: bool, reverse: bool) -> list[int]:
        """Positions of the window's frames in playback order: back-and-forth ``cat([x[::2], x[1::2].flip(0)])``,
        then the reversal ``flip(0)``, as GF's ``_augment`` applies them."""
        order = list(range(self.num_frames))
        if back_and_forth:
            order = order[::2] + order[1::2][::-1]
        if reverse:
            order = order[::-1]
        return order

    @property
    def span(self) -> int:
        """Frames of a clip that one sample covers."""
        return (self.num_frames - 1) * self.frame_skip + 1

    def _cameras(self, clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
        cams = read_dfot_poses(clip.cameras) if self.layout == "dfot" else read_pose_file(clip.cameras)
        return cams["intrinsics"], cams["w2c"]

    def _frames(self, clip: Clip, indices: list[int], count: int) -> torch.Tensor:
        """uint8 [len(indices), H, W, 3] of the clip's video or image folder, after checking that it
        holds exactly ``count`` frames (one per camera row)."""
        if clip.video.is_dir():
            files = sorted(p for p in clip.video.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) != count:
                raise DataError(f"{clip.video}: {len(files)} images but {count} camera rows in {clip.cameras}", clip.video)
            try:
                images = [read_image(files[i]) for i in indices]
            except (ValueError, OSError) as err:
                raise DataError(str(err), clip.video) from err
            if len({im.shape for im in images}) > 1:
                raise DataError(f"{clip.video}: images of different sizes {sorted({im.shape for im in images})}", clip.video)
            return torch.from_numpy(np.stack(images))
        self._check_video(clip, count)
        return decode_clip(clip.video, indices, backend=self.decode_backend, device=self.decode_device)

    def _check_video(self, clip: Clip, count: int) -> None:
        frames = probe(clip.video).frames
        if frames != count:
            raise DataError(f"{clip.video}: {frames} frames but {count} camera rows in {clip.cameras}", clip.video)

    def _depth(self, clip: Clip, indices: list[int], count: int, size: tuple[int, int]) -> torch.Tensor:
        try:
            with np.load(clip.depth) as archive:
                if "depth" not in archive:
                    raise DataError(f"{clip.depth}: no key 'depth' (keys: {sorted(archive.keys())})", clip.depth)
                depth = archive["depth"]
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{clip.depth}: cannot read the depth archive ({err})", clip.depth) from err
        if depth.ndim != 3 or depth.shape[0] != count or tuple(depth.shape[1:]) != size:
            raise DataError(
                f"{clip.depth}: depth must be [T={count}, H={size[0]}, W={size[1]}] like the clip's frames, "
                f"got {tuple(depth.shape)}", clip.depth
            )
        return torch.from_numpy(np.ascontiguousarray(depth[indices], dtype=np.float32))

    def _load(self, clip: Clip, intrinsics: torch.Tensor, w2c: torch.Tensor, indices: list[int]) -> _Loaded:
        """Frames ``indices`` of ``clip`` resized and cropped, with all its cameras in output pixels."""
        return self._from_images(clip, intrinsics, w2c, indices, self._frames(clip, indices, intrinsics.shape[0]))

    def _from_images(self, clip: Clip, intrinsics: torch.Tensor, w2c: torch.Tensor, indices: list[int],
                     images: torch.Tensor) -> _Loaded:
        """``_Loaded`` from decoded uint8 [N, H, W, 3] images (CPU, or CUDA from NVDEC: resized there)."""
        transform = ResizeCrop(tuple(images.shape[1:3]), self.resolution)
        frames = transform.frames(images)
        depth = None
        if self.load_depth and clip.depth is not None:
            raw = self._depth(clip, indices, intrinsics.shape[0], transform.size)
            depth = transform.images(raw[:, None], "nearest-exact")[:, 0].to(frames.device)
        k = transform.intrinsics(pixel_intrinsics(intrinsics, *transform.size))
        return _Loaded(frames, k, w2c, depth, intrinsics)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        return self._skip.fetch(index, self._sample)

    @property
    def skipped(self) -> dict[int, str]:
        """Clips found bad so far in this process (index -> the error), in ``skip`` mode."""
        return self._skip.bad

    def plan(self, index: int) -> dict:
        """Everything sample ``index`` is made of except its pixels: the clip, its cameras (all rows), the
        window (``frame_indices``) and the flip, from ``(seed, epoch, index)`` only. Raises ``DataError`` for a
        bad camera file, a clip too short, or a video whose frame count differs from its camera rows (a probe,
        no decoding). ``from_frames(plan, images)`` finishes the sample from the decoded frames; ``_sample``
        is the two with this dataset's decoder, the DALI loader (``engine.data.dali_loader``) the two with
        NVDEC in between, so both paths share the plan. The window follows GF's augmentations (module
        docstring): ``frame_indices`` in playback order, at the current sub-epoch's frame skip."""
        clip, loaded = self.clips[index], self._cache.get(index)
        if loaded is None:
            intrinsics, w2c = self._cameras(clip)
            count = intrinsics.shape[0]
            if count < self.span:
                raise DataError(
                    f"{clip.cameras}: clip {clip.name} has {count} frames; num_frames={self.num_frames} with "
                    f"frame_skip={self.frame_skip} needs {self.span}", clip.cameras
                )
        else:
            intrinsics, w2c, count = None, loaded.w2c, loaded.w2c.shape[0]
        rng = np.random.default_rng([self.seed, 0 if self.fixed_windows else self.epoch, index])
        start = int(rng.integers(0, count - self.span + 1))
        flip = bool(rng.random() < self.hflip_prob)
        # drawn after the start and the flip (which stay what they were without them), in GF's order
        back_and_forth = bool(rng.random() < self.back_and_forth_prob)
        reverse = bool(rng.random() < self.reverse_prob)
        skip = self.skip_for(count, start)
        window = [start + i * skip for i in range(self.num_frames)]
        indices = [window[i] for i in self.playback_order(back_and_forth, reverse)]
        return {"index": index, "clip": clip, "video": clip.video, "count": count, "intrinsics": intrinsics,
                "w2c": w2c, "frame_indices": indices, "flip": flip}

    def check_decodable(self, plan: dict) -> bool:
        """Whether ``plan``'s frames come from a video file (checked: its frame count); False for an image
        folder, which the DALI loader leaves to ``_frames``."""
        if plan["video"].is_dir():
            return False
        self._check_video(plan["clip"], plan["count"])
        return True

    def from_frames(self, plan: dict, images: torch.Tensor) -> dict:
        """The sample of ``plan`` from its decoded frames uint8 [T, H, W, 3] (CPU or CUDA)."""
        loaded = self._from_images(plan["clip"], plan["intrinsics"], plan["w2c"], plan["frame_indices"], images)
        return self._finish(plan, loaded, list(range(self.num_frames)))

    def _sample(self, index: int) -> dict:
        plan = self.plan(index)
        clip, count, indices, loaded = plan["clip"], plan["count"], plan["frame_indices"], self._cache.get(index)
        if loaded is not None:
            self._cache.move_to_end(index)
            return self._finish(plan, loaded, indices)
        if self.cache_clips:
            loaded = self._cache[index] = self._load(clip, plan["intrinsics"], plan["w2c"], list(range(count)))
            while len(self._cache) > self.cache_clips:
                self._cache.popitem(last=False)
            return self._finish(plan, loaded, indices)
        return self.from_frames(plan, self._frames(clip, indices, count))

    def _finish(self, plan: dict, loaded: _Loaded, positions: list[int]) -> dict:
        """The sample dict: frames ``positions`` of ``loaded`` (where the plan's frames lie in it), cameras of
        the plan's frames, the flip applied to all of them."""
        index, indices, flip = plan["index"], plan["frame_indices"], plan["flip"]
        frames = loaded.frames[positions].float().div_(255.0)
        k = loaded.intrinsics[indices].to(torch.float32)
        ext = relative_extrinsics(loaded.w2c[indices]).to(torch.float32)
        depth = loaded.depth[positions] if loaded.depth is not None else None
        if flip:
            frames, depth = frames.flip(-1), (depth.flip(-1) if depth is not None else None)
            k[:, 0, 2] = self.resolution - 1 - k[:, 0, 2]
            mirror = torch.tensor([-1.0, 1.0, 1.0])
            ext = mirror[:, None] * ext * torch.cat([mirror, torch.ones(1)])  # diag(-1,1,1) [R|t] diag(-1,1,1,1)
        sample = dict(
            frames=frames,
            intrinsics=k,
            extrinsics=ext,
            index=torch.tensor(index, dtype=torch.int64),
            frame_indices=torch.tensor(indices, dtype=torch.int64),
            flip=torch.tensor(flip),
            clip=plan["clip"].name,
        )
        if depth is not None:
            sample["depth"] = depth
        if loaded.normalised is not None:   # DFoT's condition: file intrinsics as they are (not the crop's) + w2c
            sample["poses16"] = torch.cat([loaded.normalised[indices].to(torch.float32), ext.flatten(-2)], dim=-1)
        return sample

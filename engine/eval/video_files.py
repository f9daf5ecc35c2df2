"""Generated videos on disk: ``videos/NNNNN.npz`` records written atomically, read back (also ``.mp4`` from
elsewhere), and the uint8 <-> [0, 1] conversions of their frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geoforge.engine import pixels
from geoforge.engine.atomic import atomic_write_bytes


def video_path(out: Path, index: int) -> Path:
    return out / "videos" / f"{index:05d}.npz"


def save_video(path: Path, record: dict[str, np.ndarray | int]) -> None:
    """Atomically write one video record (``generated``, optional ``gt``, cameras, ``context``)."""
    from io import BytesIO

    buf = BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in record.items() if v is not None})
    atomic_write_bytes(path, buf.getvalue())


def _as_tchw(frames: np.ndarray, what: str) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"{what}: expected uint8 [T, 3, H, W] or [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] != 3 and frames.shape[-1] == 3:
        frames = frames.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(frames)


def load_generated(path: Path) -> dict[str, np.ndarray]:
    """A stored record (``.npz``) or, for ``.mp4`` (videos from elsewhere), ``{"generated": frames}``."""
    if path.suffix == ".mp4":
        from geoforge.engine.data.video_io import decode_video

        return {"generated": _as_tchw(decode_video(path), str(path))}
    with np.load(path) as data:
        if "generated" not in data:
            raise ValueError(f"{path}: no 'generated' array (keys {sorted(data.keys())})")
        record = {k: data[k] for k in data.keys()}
    record["generated"] = _as_tchw(record["generated"], f"{path}:generated")
    return record


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [0, 1] -> uint8 numpy."""
    return pixels.to_uint8(video).cpu().numpy()


def to_unit(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frames)).float() / 255.0

"""A control GF teacher with no geometry (``teacher.kind: random``): fixed random features of the oracle's shape.

Geometry Forcing adds a second loss; an effect of aligning to :mod:`engine.teacher.oracle` (features of the true
depth and cameras) can come from the geometry in the target or merely from having a second, fixed target to
regress. This teacher separates the two: its features have the oracle's shape ``[B, T, g, g, C]`` (``g =
teacher.resolution / 14``, ``C = oracle_channels(teacher.oracle_freqs)``), every key of ``teacher.layers``, but
are a deterministic function of

    (clip index, source frame index, token position)         - the batch's ``index [B]``, ``frame_indices [B, T]``

only: i.i.d. normal values with standard deviation ``1/sqrt(2)`` (the RMS of a sin / cos channel, 32 of the
oracle's 36 channels at ``oracle_freqs: 4``, so the scale loss has the oracle's magnitude) drawn from a CPU
generator seeded by ``(clip index, frame index)``. Each clip's target is thus fixed across epochs (the same
frame of the same clip gets the same features, whichever window it appears in) and differs between clips and
frames, but it carries nothing of the scene: no depth, no camera, no spatial smoothness, nothing a 3D point keeps
between frames. It needs no depth, so it works on any data set that gives ``index`` and ``frame_indices`` (every
GeoForge data set does). A horizontal flip does not change the features (they are keyed by the token's position
in the returned frame).

``released_size`` (``gf.alignment_form: as_released``): like :class:`engine.teacher.oracle.OracleTeacher`, the
tokens ``[B, T, g*g, C]`` of each layer are resized as an image to ``S x S`` and stacked (GF's published target,
:func:`engine.objectives.gf_released.released_target`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from geoforge.engine.objectives.gf_released import RELEASED_KEY, released_target
from geoforge.engine.teacher.oracle import oracle_channels
from geoforge.engine.teacher.spec import BATCH_PREFIX, PATCH, TeacherConfig, vggt_key

SALT = 0x5EED_F00D   # mixed into every seed, so these streams differ from other generators seeded by small ints
STD = 1.0 / math.sqrt(2.0)


def frame_seed(clip: int, frame: int) -> int:
    """The generator seed of one (clip index, source frame index): a fixed injective mix (both < 2^31)."""
    return (SALT * 1_000_003 + int(clip) * 2_147_483_647 + int(frame)) % (2 ** 63 - 1)


def random_features(index: torch.Tensor, frame_indices: torch.Tensor, grid: int, channels: int) -> torch.Tensor:
    """``index [B]`` (int), ``frame_indices [B, T]`` (int) -> ``[B, T, grid, grid, channels]`` float32 on the CPU:
    per (clip, frame) normal values of standard deviation ``1/sqrt(2)``, a function of the two indices only."""
    if index.dim() != 1 or frame_indices.dim() != 2 or frame_indices.shape[0] != index.shape[0]:
        raise ValueError(f"random teacher: index must be [B] and frame_indices [B, T], got {tuple(index.shape)} and "
                         f"{tuple(frame_indices.shape)}")
    b, t = frame_indices.shape
    out = torch.empty(b, t, grid, grid, channels)
    g = torch.Generator()
    for i, clip in enumerate(index.tolist()):
        for j, frame in enumerate(frame_indices[i].tolist()):
            g.manual_seed(frame_seed(clip, frame))
            out[i, j] = torch.randn(grid, grid, channels, generator=g)
    return out.mul_(STD)


class RandomTeacher:
    """``teacher.kind: random``: the teacher call of the train loop (like ``OracleTeacher``), not an nn.Module."""

    def __init__(self, teacher: TeacherConfig, device: torch.device | str = "cpu", released_size: int | None = None):
        self.teacher = teacher
        self.device = torch.device(device)
        self.grid = teacher.resolution // PATCH
        self.channels = oracle_channels(teacher.oracle_freqs)
        self.released_size = released_size
        self.keys = [vggt_key(layer) for layer in teacher.layers]
        self.dims = ({RELEASED_KEY: len(self.keys)} if released_size is not None
                     else {k: self.channels for k in self.keys})

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in ("index", "frame_indices") if k not in batch]
        if missing:
            raise KeyError(f"teacher.kind: random keys its features by clip and frame; the batch lacks {missing}")
        frames = self.teacher.aligned_frames(batch["frame_indices"].shape[1])
        feats = random_features(batch["index"].cpu().reshape(-1), batch["frame_indices"][:, :frames].cpu(),
                                self.grid, self.channels).to(self.device)
        if self.released_size is not None:
            tokens = feats.flatten(2, 3)   # [B, T, g*g, C]: the "all tokens" GF resizes as an image
            return {BATCH_PREFIX + RELEASED_KEY: released_target([tokens] * len(self.keys), self.released_size)}
        return {BATCH_PREFIX + key: feats for key in self.keys}


__all__ = ["RandomTeacher", "random_features", "frame_seed"]

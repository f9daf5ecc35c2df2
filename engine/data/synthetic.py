"""Synthetic 3D-consistent videos: a procedurally textured room rendered by ray casting.

Each clip is a box room (textured walls, floor and ceiling) with a few boxes and spheres, seen by a
pinhole camera moving along a smooth random path (smooth translation, yaw/pitch/roll, looking roughly
along its motion) inside a central region that no object enters. Surfaces are Lambertian under a
fixed light, so a 3D point has the same colour in every frame. Colour is the mean of 4 sub-pixel rays
(antialiasing); depth is the z (in the camera) of the pixel-centre ray.

World and camera axes are OpenCV (x right, y down, z forward); the floor is at ``y = +half_y``.
Clips are written in the RealEstate10K raw layout (see ``engine.data.re10k``):
``<root>/<split>/<clip>.txt`` (URL ``synthetic://<seed>/<n>``, 10 fps timestamps, normalised
intrinsics, row-major world-to-camera), ``<clip>.mp4`` and ``<clip>.depth.npz`` (``depth`` float32
[T, H, W]). Clip ``n`` depends only on ``(seed, n)``.

CLI: ``geoforge-synthetic --out DIR --clips N --frames T --resolution R --seed S [--split training]``
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geoforge.engine import pixels
from geoforge.engine.atomic import atomic_dir
from geoforge.engine.data.re10k import write_pose_file
from geoforge.engine.data.rendering import LIGHT, NOISE_PERIOD, pixel_rays, rotation, value_noise
from geoforge.engine.data.video_io import encode_video

FPS = 10
MARKER = "synthetic.json"
GENERATOR_VERSION = 1


@dataclass
class Scene:
    """Room half-extents [3]; boxes [Nb, 2, 3] (min, max corners); spheres [Ns, 4] (centre, radius);
    one texture per surface: the 6 room faces (-x, +x, -y, +y, -z, +z), then boxes, then spheres."""

    half: np.ndarray
    boxes: np.ndarray
    spheres: np.ndarray
    textures: list[dict]
    camera_region: np.ndarray  # [2, 3] corners of the box the camera stays in


def _random_texture(rng: np.random.Generator) -> dict:
    colours = rng.uniform(0.08, 0.95, size=(2, 3))
    colours[1] = np.clip(colours[1] + rng.choice([-1, 1], 3) * 0.35, 0.03, 0.97)  # contrasting second colour
    directions = rng.normal(size=(4, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return dict(
        kind=int(rng.integers(3)),  # 0 checker, 1 stripes, 2 noise blobs
        colours=colours.astype(np.float32),
        scale=float(rng.uniform(0.25, 0.6)),
        offset=rng.uniform(0, 10, size=(3, 1)).astype(np.float32),
        # rows: stripe direction, then the three waves of the detail pattern (wavelengths 0.12-0.5 m)
        waves=(directions * (2 * np.pi / rng.uniform([1, 0.2, 0.3, 0.12], [1, 0.5, 0.6, 0.25]))[:, None]).astype(np.float32),
        phases=rng.uniform(0, 2 * np.pi, size=(3, 1)).astype(np.float32),
        table=rng.random(NOISE_PERIOD**3, dtype=np.float32),
    )


def _texture(points: np.ndarray, tex: dict) -> np.ndarray:
    """Albedo [3, N] of surface points [3, N] (a solid texture: a function of the 3D position).

    Two colours mixed by a pattern (checker, stripes or value-noise blobs of cell size ``scale``),
    modulated by a domain-warped sum of sines for fine detail.
    """
    p = points / tex["scale"] + tex["offset"]
    if tex["kind"] == 0:
        pattern = (np.floor(p).astype(np.int32).sum(axis=0) & 1).astype(np.float32)
    elif tex["kind"] == 1:
        pattern = 0.5 + 0.5 * np.sin(tex["waves"][0] @ p)
    else:
        pattern = value_noise(p * 1.5, tex["table"])
    w = tex["waves"][1:] @ points + tex["phases"]  # [3, N]
    detail = 0.5 + 0.25 * np.sin(w[0] + 1.5 * np.sin(w[1])) + 0.25 * np.sin(w[2])
    c0, c1 = tex["colours"][0][:, None], tex["colours"][1][:, None]
    return (c0 + pattern * (c1 - c0)) * (0.7 + 0.6 * detail)


def _overlaps(lo: np.ndarray, hi: np.ndarray, region: np.ndarray, margin: float) -> bool:
    return bool(np.all(lo[[0, 2]] < region[1, [0, 2]] + margin) and np.all(hi[[0, 2]] > region[0, [0, 2]] - margin))


def random_scene(rng: np.random.Generator) -> Scene:
    """A room 5-8 m wide and deep, 2.6-3.2 m high, with 2-4 boxes and 1-3 spheres outside the camera region."""
    half = np.array([rng.uniform(2.5, 4.0), rng.uniform(1.3, 1.6), rng.uniform(2.5, 4.0)])
    region = np.array([[-0.3 * half[0], -0.25 * half[1], -0.3 * half[2]], [0.3 * half[0], 0.2 * half[1], 0.3 * half[2]]])
    boxes, spheres = [], []
    n_boxes, n_spheres = rng.integers(2, 5), rng.integers(1, 4)
    while len(boxes) < n_boxes:  # rejection sampling; the free area is most of the floor
        size = np.array([rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.6), rng.uniform(0.4, 1.2)])
        centre = rng.uniform(-half + size / 2 + 0.05, half - size / 2 - 0.05)
        lo, hi = centre - size / 2, centre + size / 2
        lo[1], hi[1] = half[1] - size[1], half[1]  # resting on the floor
        if not _overlaps(lo, hi, region, 0.5):
            boxes.append(np.stack([lo, hi]))
    while len(spheres) < n_spheres:
        r = rng.uniform(0.25, 0.6)
        centre = rng.uniform(-half + r + 0.05, half - r - 0.05)
        if rng.random() < 0.6:
            centre[1] = half[1] - r  # on the floor
        if not _overlaps(centre - r, centre + r, region, 0.5):
            spheres.append(np.append(centre, r))
    textures = [_random_texture(rng) for _ in range(6 + len(boxes) + len(spheres))]
    return Scene(half, np.array(boxes).reshape(-1, 2, 3), np.array(spheres).reshape(-1, 4), textures, region)


def random_camera_path(rng: np.random.Generator, scene: Scene, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth path of ``frames`` poses: camera-to-world rotations [T, 3, 3] and centres [T, 3].

    The camera travels 0.5-1.5 m on a straight line plus a small sinusoidal sway, inside
    ``scene.camera_region``; it looks along its heading (+-35 deg) with smoothly varying yaw, pitch, roll.
    """
    s = np.linspace(0.0, 1.0, frames)
    sway = 0.08
    lo, hi = scene.camera_region[0] + sway, scene.camera_region[1] - sway
    start = rng.uniform(lo, hi)
    heading = rng.uniform(0, 2 * np.pi)
    travel = heading + rng.uniform(-0.6, 0.6)
    step = rng.uniform(0.5, 1.5) * np.array([np.sin(travel), rng.uniform(-0.1, 0.1), np.cos(travel)])
    end = np.clip(start + step, lo, hi)
    phase = rng.uniform(0, 2 * np.pi, size=6)
    wiggle = np.stack([np.sin(np.pi * s + phase[0]), 0.5 * np.sin(2 * np.pi * s + phase[1]), np.sin(1.5 * np.pi * s + phase[2])], -1)
    centres = start + s[:, None] * (end - start) + sway * wiggle
    yaw = heading + rng.uniform(0.1, 0.35) * np.sin(np.pi * s * rng.uniform(0.5, 1.5) + phase[3])
    pitch = rng.uniform(-0.15, 0.15) + 0.08 * np.sin(np.pi * s + phase[4])
    roll = rng.uniform(-0.04, 0.04) + 0.03 * np.sin(np.pi * s + phase[5])
    return rotation(yaw, pitch, roll), centres


def _cast(origins: np.ndarray, dirs: np.ndarray, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays from inside the room; ``origins`` [3, T, 1], ``dirs`` [3, T, M].

    Returns the ray parameter t [T, M] and the surface id [T, M] (see ``Scene``).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.where(dirs == 0, np.float32(1e-12), dirs)
        half = scene.half.astype(np.float32)[:, None, None]
        tx, ty, tz = (np.where(dirs > 0, half, -half) - origins) * inv  # where each slab is left
        t = np.minimum(np.minimum(tx, ty), tz)
        positive = dirs > 0
        surface = np.where(t == tx, positive[0], np.where(t == ty, 2 + positive[1], 4 + positive[2]))
        for b, corners in enumerate(scene.boxes.astype(np.float32)):
            t1, t2 = (corners[0][:, None, None] - origins) * inv, (corners[1][:, None, None] - origins) * inv
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            t_in = np.maximum(np.maximum(near[0], near[1]), near[2])
            hit = (t_in <= np.minimum(np.minimum(far[0], far[1]), far[2])) & (t_in > 1e-5) & (t_in < t)
            t = np.where(hit, t_in, t)
            surface = np.where(hit, 6 + b, surface)
        for k, sphere in enumerate(scene.spheres.astype(np.float32)):
            oc = origins - sphere[:3, None, None]  # [3, T, 1]
            a = (dirs * dirs).sum(0)
            b_half = (dirs * oc).sum(0)
            disc = b_half**2 - a * ((oc * oc).sum(0) - sphere[3] ** 2)
            t_s = (-b_half - np.sqrt(np.maximum(disc, 0))) / a
            hit = (disc > 0) & (t_s > 1e-5) & (t_s < t)
            t = np.where(hit, t_s, t)
            surface = np.where(hit, 6 + len(scene.boxes) + k, surface)
    return t, surface


def _normals(points: np.ndarray, sid: int, scene: Scene) -> np.ndarray:
    """Unit normals [3, N] (pointing at the camera side) of points [3, N] on surface ``sid``."""
    if sid < 6:  # room face: the inward normal of face (-x, +x, -y, +y, -z, +z)
        normal = np.zeros(3, np.float32)
        normal[sid // 2] = 1.0 if sid % 2 == 0 else -1.0
        return np.broadcast_to(normal[:, None], points.shape)
    if sid < 6 + len(scene.boxes):  # box: the face whose plane the point lies on
        lo, hi = scene.boxes[sid - 6].astype(np.float32)[:, :, None]
        gaps = np.concatenate([points - lo, hi - points])  # [6, N]: distances to -x, -y, -z, +x, +y, +z
        face = np.argmin(np.abs(gaps), axis=0)
        normal = np.zeros_like(points)
        normal[face % 3, np.arange(points.shape[1])] = np.where(face < 3, -1.0, 1.0)
        return normal
    sphere = scene.spheres[sid - 6 - len(scene.boxes)].astype(np.float32)
    return (points - sphere[:3, None]) / sphere[3]


def render(scene: Scene, c2w: np.ndarray, centres: np.ndarray, k: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Render T views: uint8 RGB [T, H, W, 3] and depth float32 [T, H, W] (z in each camera).

    ``c2w`` [T, 3, 3] camera-to-world rotations, ``centres`` [T, 3], ``k`` 3x3 pixel intrinsics with
    pixel centres at integer coordinates. Colour: mean of 4 rays at (+-1/4, +-1/4) px; depth: the
    pixel-centre ray.
    """
    frames = len(c2w)
    origins = centres.T[:, :, None].astype(np.float32)
    depth, _ = _cast(origins, pixel_rays(c2w, k, height, width, np.zeros((1, 2))), scene)
    dirs = pixel_rays(c2w, k, height, width, np.array([[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25]]))
    t, surface = _cast(origins, dirs, scene)
    points = origins + t * dirs
    colour = np.empty_like(points)
    light = LIGHT.astype(np.float32)
    for sid in np.unique(surface):
        sel = surface == sid
        hits = points[:, sel]
        shade = 0.45 + 0.55 * np.clip(light @ _normals(hits, int(sid), scene), 0, None)
        colour[:, sel] = _texture(hits, scene.textures[sid]) * shade
    colour = colour.reshape(3, frames, 4, height, width).mean(axis=2).transpose(1, 2, 3, 0)
    images = pixels.to_uint8(colour)
    return images, depth.reshape(frames, height, width).astype(np.float32)


def render_clip(seed: int, n: int, frames: int, resolution: int | tuple[int, int]) -> dict:
    """Clip ``n`` of ``seed``: dict(frames uint8 [T, H, W, 3], depth float32 [T, H, W], intrinsics
    float64 [T, 4] normalised fx fy cx cy, w2c float64 [T, 3, 4], timestamps int64 [T] at 10 fps)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    rng = np.random.default_rng([seed, n])
    scene = random_scene(rng)
    c2w, centres = random_camera_path(rng, scene, frames)
    hfov = np.deg2rad(rng.uniform(55.0, 75.0))
    focal = 0.5 * width / np.tan(hfov / 2)
    k = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1.0]])
    images, depth = render(scene, c2w, centres, k, height, width)
    rot = np.transpose(c2w, (0, 2, 1))
    w2c = np.concatenate([rot, -(rot @ centres[..., None])], axis=-1)
    normalised = np.array([focal / width, focal / height, (k[0, 2] + 0.5) / width, (k[1, 2] + 0.5) / height])
    return dict(
        frames=images,
        depth=depth,
        intrinsics=torch.from_numpy(np.tile(normalised, (frames, 1))),
        w2c=torch.from_numpy(w2c),
        timestamps=torch.arange(frames, dtype=torch.int64) * (1_000_000 // FPS),
    )


def write_clips(folder: str | Path, clips: int, frames: int, resolution: int, seed: int) -> None:
    """Render clips ``0..clips-1`` of ``seed`` into ``folder`` (RealEstate10K raw files, not atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(clips):
        clip = render_clip(seed, n, frames, resolution)
        name = f"synthetic_{seed}_{n:06d}"
        write_pose_file(folder / f"{name}.txt", f"synthetic://{seed}/{n}", clip["timestamps"], clip["intrinsics"], clip["w2c"])
        encode_video(folder / f"{name}.mp4", clip["frames"], fps=FPS)
        np.savez(folder / f"{name}.depth.npz", depth=clip["depth"])


def ensure_synthetic_dataset(
    root: str | Path, clips: int, frames: int, resolution: int, seed: int, split: str = "training"
) -> Path:
    """Create ``<root>/<split>`` with ``clips`` synthetic clips unless it exists; returns ``root``.

    Idempotent and atomic: clips are written into a temporary folder beside it, which is renamed into
    place once complete, with ``synthetic.json`` recording the parameters. An existing split made with
    other parameters (or not by this generator) raises ValueError naming the differing parameter.
    Several processes may call this at once; one of them wins the rename.
    """
    for name, value in (("clips", clips), ("frames", frames), ("resolution", resolution)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ensure_synthetic_dataset: {name} must be a positive int, got {value!r}")
    if resolution % 2:
        raise ValueError(f"ensure_synthetic_dataset: resolution must be even (H.264), got {resolution}")
    params = dict(generator="geoforge.synthetic", version=GENERATOR_VERSION, clips=clips, frames=frames,
                  resolution=resolution, seed=seed, split=split)
    ensure_generated(Path(root) / split, params, lambda folder: write_clips(folder, clips, frames, resolution, seed))
    return Path(root)


def ensure_generated(target: Path, params: dict, write) -> None:
    """Unless ``target`` exists, ``write(folder)`` into a temporary folder beside it, record ``params``
    in its ``synthetic.json`` and rename it into place (atomic; concurrent callers race for the
    rename). Then check that ``target`` was made with ``params`` (ValueError naming the key if not)."""
    if not target.exists():
        with atomic_dir(target, unique=True, replace=False) as tmp:   # a lost race discards ours
            write(tmp)
            (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    _check_marker(target, params)


def _check_marker(target: Path, params: dict) -> None:
    marker = target / MARKER
    if not marker.is_file():
        raise ValueError(f"{target} exists but is not a synthetic dataset (no {MARKER}); use another root")
    found = json.loads(marker.read_text())
    for key, want in params.items():
        if found.get(key) != want:
            raise ValueError(
                f"{target} holds a synthetic dataset made with {key}={found.get(key)!r}, but {key}={want!r} was "
                f"asked for; delete it or use another root"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a synthetic RealEstate10K-layout dataset.")
    parser.add_argument("--out", required=True, type=Path, help="dataset root; clips go to OUT/SPLIT")
    parser.add_argument("--clips", required=True, type=int)
    parser.add_argument("--frames", required=True, type=int)
    parser.add_argument("--resolution", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--split", default="training")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    ensure_synthetic_dataset(args.out, args.clips, args.frames, args.resolution, args.seed, args.split)
    print(f"{args.out / args.split}: {args.clips} clips of {args.frames} frames at {args.resolution}px "
          f"ready in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()

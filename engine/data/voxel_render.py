"""Voxel worlds for synthetic Minecraft-layout clips: terrain, a camera walking by the actions, and an
Amanatides-Woo voxel ray-marcher that renders it. NumPy only; the dataset and the on-disk layout are
``engine.data.minecraft``'s.

A world (``render_minecraft_clip``): a voxel terrain (unit blocks on a value-noise height map, grass /
dirt / stone / sand colours with per-block shade) seen by a walking camera whose moves are the actions: 0 = forward ``STEP`` blocks (unless the next column is more than one block higher), 1 =
turn left ``TURN`` radians, 2 = turn right, 3 = no-op. Action ``i`` moves the camera from frame
``i - 1`` to frame ``i`` (action 0 is a no-op). The eye is ``EYE`` blocks above the ground under it.
Cameras are OpenCV (x right, y down, z forward; world y down): the ground of column ``(i, k)`` lies at
``y = -height``.
"""
from __future__ import annotations

import numpy as np

from geoforge.engine import pixels
from geoforge.engine.data.rendering import LIGHT, pixel_rays, rotation, value_noise

NUM_ACTIONS = 4
FORWARD, LEFT, RIGHT, NOOP = range(NUM_ACTIONS)
STEP = 0.5  # blocks per forward action
TURN = np.deg2rad(12.0)  # radians per turn action
EYE = 1.6  # eye height above the ground (blocks)
PITCH = -0.3  # the camera looks this much down (radians)
WORLD = 40  # blocks per side
_BLOCK_COLOURS = np.array([[0.36, 0.62, 0.25], [0.52, 0.37, 0.22], [0.50, 0.50, 0.52], [0.86, 0.80, 0.55]],
                          np.float32)  # grass top, dirt, stone, sand


def random_world(rng: np.random.Generator, size: int = WORLD) -> np.ndarray:
    """Terrain heights (blocks) int32 [size, size] in [1, 7]: value noise at two scales, plus a few
    pillars so that turning reveals near and far structure."""
    table = rng.random(32**3, dtype=np.float32)
    i, k = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    offset = rng.uniform(0, 16, size=2).astype(np.float32)
    pts = np.stack([i / 7 + offset[0], k / 7 + offset[1], np.zeros_like(i)]).reshape(3, -1)
    pts2 = np.stack([i / 2.5, k / 2.5 + offset[0], np.full_like(i, 5.0)]).reshape(3, -1)
    field = 0.75 * value_noise(pts, table) + 0.25 * value_noise(pts2, table)
    heights = 1 + np.floor(field.reshape(size, size) * 6).astype(np.int32)
    for _ in range(size // 4):
        a, b = rng.integers(0, size, 2)
        heights[a, b] += int(rng.integers(2, 5))
    return heights


def walk(heights: np.ndarray, actions: np.ndarray, start: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera positions [N, 3] (OpenCV world: y down, ground of column (i, k) at y = -height) and yaws
    [N] after each action (action 0 is not applied)."""
    size = heights.shape[0]
    x, z = float(start[0]), float(start[1])
    centres, yaws = [], []
    for n, action in enumerate(actions):
        if n > 0 and action == LEFT:
            yaw -= TURN
        elif n > 0 and action == RIGHT:
            yaw += TURN
        elif n > 0 and action == FORWARD:
            nx, nz = x + STEP * np.sin(yaw), z + STEP * np.cos(yaw)
            inside = 1.0 <= nx < size - 1 and 1.0 <= nz < size - 1
            if inside and heights[int(nx), int(nz)] <= heights[int(x), int(z)] + 1:
                x, z = nx, nz
        centres.append([x, -(heights[int(x), int(z)] + EYE), z])
        yaws.append(yaw)
    return np.array(centres), np.array(yaws)


def random_actions(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Runs of one action (forward runs 2-8 frames, turns 1-5, pauses 1-3), action 0 a no-op."""
    out = [NOOP]
    while len(out) < frames:
        action = int(rng.choice(NUM_ACTIONS, p=[0.5, 0.2, 0.2, 0.1]))
        run = {FORWARD: (2, 9), LEFT: (1, 6), RIGHT: (1, 6), NOOP: (1, 4)}[action]
        out += [action] * int(rng.integers(*run))
    return np.array(out[:frames], np.int64)


def _march(heights: np.ndarray, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel ray march (Amanatides-Woo) in block coordinates (x, up, z) from ``origins`` [3, M] along
    ``dirs`` [3, M]: the ray parameter of the hit [M] (inf for sky), the axis crossed last [M], and the
    hit block's column (i, k) and level j [3, M]."""
    size, top = heights.shape[0], int(heights.max())
    m = origins.shape[1]
    cell = np.floor(origins).astype(np.int64)
    step = np.where(dirs >= 0, 1, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(dirs != 0, 1.0 / dirs, np.inf)
        t_max = np.where(dirs != 0, ((cell + (step > 0)) - origins) * inv, np.inf)
    t_delta = np.abs(inv)
    t_hit, axis_hit, block = np.full(m, np.inf), np.zeros(m, np.int64), np.zeros((3, m), np.int64)
    active = np.arange(m)
    axis = np.zeros(m, np.int64)
    for _ in range(3 * size + top + 4):
        if active.size == 0:
            break
        axis = np.argmin(t_max[:, active], axis=0)
        t_now = t_max[axis, active]
        cell[axis, active] += step[axis, active]
        t_max[axis, active] += t_delta[axis, active]
        c = cell[:, active]
        inside = (c[0] >= 0) & (c[0] < size) & (c[2] >= 0) & (c[2] < size) & (c[1] < top + 1) & (c[1] >= 0)
        solid = np.zeros(active.size, bool)
        solid[inside] = c[1, inside] < heights[c[0, inside], c[2, inside]]
        escaped = ~inside & ((c[1] >= top + 1) & (dirs[1, active] >= 0) | (c[0] < 0) | (c[0] >= size)
                             | (c[2] < 0) | (c[2] >= size) | (c[1] < 0))
        done = active[solid]
        t_hit[done], axis_hit[done], block[:, done] = t_now[solid], axis[solid], c[:, solid]
        active = active[~solid & ~escaped]
    return t_hit, axis_hit, block


def render_world(heights: np.ndarray, c2w: np.ndarray, centres: np.ndarray, k: np.ndarray, height: int,
                 width: int) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] of the terrain seen by cameras ``c2w`` [T, 3, 3] at ``centres`` [T, 3]."""
    frames = len(c2w)
    dirs = pixel_rays(c2w, k, height, width, np.zeros((1, 2))).reshape(3, -1).astype(np.float64)  # camera z = 1
    origins = np.repeat(centres.T, height * width, axis=1)
    flip = np.array([1.0, -1.0, 1.0])[:, None]  # world y (down) -> block "up" coordinate
    t, axis, block = _march(heights, origins * flip, dirs * flip)
    hit = np.isfinite(t)
    colour = np.empty((3, t.size), np.float32)
    sky_up = np.clip(-dirs[1] / np.linalg.norm(dirs, axis=0), 0, 1)
    colour[:, ~hit] = (np.array([0.62, 0.75, 0.95])[:, None] + 0.25 * sky_up[~hit]).clip(0, 1)
    i, j, kk = block[:, hit]
    depth = heights[i, kk]
    kind = np.where((axis[hit] == 1) & (j == depth - 1), np.where(depth <= 1, 3, 0),  # top face: grass / sand
                    np.where(j >= 4, 2, 1))  # sides: stone up high, dirt below
    jitter = (((i * 73856093) ^ (j * 19349663) ^ (kk * 83492791)) % 97) / 97.0  # per-block shade
    normal = np.zeros((3, hit.sum()), np.float32)
    normal[axis[hit], np.arange(hit.sum())] = -np.sign((dirs * flip)[axis[hit], hit])
    light = (LIGHT * np.array([1.0, -1.0, 1.0])).astype(np.float32)  # the light in block coordinates
    shade = 0.5 + 0.5 * np.clip(light @ normal, 0, None)
    colour[:, hit] = _BLOCK_COLOURS[kind].T * (0.8 + 0.35 * jitter) * shade
    images = pixels.to_uint8(colour)
    return images.reshape(3, frames, height, width).transpose(1, 2, 3, 0)


def render_minecraft_clip(seed: int, n: int, frames: int, resolution: int) -> dict:
    """Clip ``n`` of ``seed``: dict(frames uint8 [T, R, R, 3], actions int64 [T], intrinsics float64
    [T, 4] normalised, w2c float64 [T, 3, 4], heights int32 [WORLD, WORLD], yaws float64 [T])."""
    rng = np.random.default_rng([seed, n, 7])
    heights = random_world(rng)
    actions = random_actions(rng, frames)
    centres, yaws = walk(heights, actions, rng.uniform(WORLD * 0.35, WORLD * 0.65, 2), float(rng.uniform(0, 2 * np.pi)))
    c2w = rotation(yaws, np.full(frames, PITCH), np.zeros(frames))
    focal = 0.5 * resolution / np.tan(np.deg2rad(70.0) / 2)
    k = np.array([[focal, 0, (resolution - 1) / 2], [0, focal, (resolution - 1) / 2], [0, 0, 1.0]])
    images = render_world(heights, c2w, centres, k, resolution, resolution)
    rot = np.transpose(c2w, (0, 2, 1))
    w2c = np.concatenate([rot, -(rot @ centres[..., None])], axis=-1)
    normalised = np.array([focal / resolution, focal / resolution, 0.5, 0.5])
    return dict(frames=images, actions=actions, intrinsics=np.tile(normalised, (frames, 1)), w2c=w2c,
                heights=heights, yaws=yaws)


__all__ = ["NUM_ACTIONS", "FORWARD", "LEFT", "RIGHT", "NOOP", "STEP", "TURN", "EYE", "PITCH", "WORLD", "random_world",
           "walk", "random_actions", "render_world", "render_minecraft_clip"]

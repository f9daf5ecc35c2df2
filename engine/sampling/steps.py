"""Time grids, scheduling matrices and one Euler / DDIM step on the flow path (see :mod:`engine.sampling`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from geoforge.engine.sampling.config import METHODS, SCHEDULES, check_times


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Flow times ``[steps + 1]`` (float64) from 1 down to 0: ``shift u / (1 + (shift - 1) u)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def scheduling_matrix(steps: int, frames: int, kind: str = "full_sequence", shift: float = 1.0,
                      times: Sequence[float] | None = None) -> torch.Tensor:
    """Per-row, per-frame flow times ``[rows, frames]`` (float64) taking ``frames`` frames from 1 to 0.

    The grid is ``times`` when given (``steps + 1`` values from 1 to 0, e.g. DFoT's DDIM levels as flow
    times), else :func:`time_grid`. ``full_sequence``: ``steps + 1`` rows, all frames together.
    ``pyramid``: ``steps + frames`` rows; frame j is at grid index ``clamp(steps - row + j, 0, steps)``
    (it starts j rows after frame 0).
    """
    if times is not None:
        check_times(times, steps)
        grid = torch.tensor(list(times), dtype=torch.float64)
    else:
        grid = time_grid(steps, shift)
    if kind == "full_sequence":
        return grid[:, None].expand(steps + 1, frames).clone()
    if kind == "pyramid":
        rows = torch.arange(steps + frames)[:, None]
        level = (steps - rows + torch.arange(frames)[None, :]).clamp(0, steps)  # steps = noise
        return grid[steps - level]
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


def flow_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, method: str = "euler",
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Move every frame of ``x [B, T, ...]`` from flow time ``t`` to ``t_next`` ([B, T] each) with velocity ``v``.

    Frames with ``t_next == t`` are returned unchanged. ``ddim`` with ``eta > 0`` needs ``noise`` like x.
    """
    shape = t.shape + (1,) * (x.ndim - t.ndim)
    tt, tn = t.to(x.dtype).reshape(shape), t_next.to(x.dtype).reshape(shape)
    if method == "euler":
        out = x + (tn - tt) * v
    elif method == "ddim":
        x0_hat, eps_hat = x - tt * v, x + (1 - tt) * v
        if eta > 0:
            if noise is None:
                raise ValueError("flow_step: ddim with eta > 0 needs noise")
            ratio = ((1 - tt) * tn) / ((1 - tn) * tt).clamp_min(1e-12)
            c = eta * tn * (1 - ratio.square()).clamp_min(0).sqrt()
            out = (1 - tn) * x0_hat + (tn.square() - c.square()).clamp_min(0).sqrt() * eps_hat + c * noise
        else:
            out = (1 - tn) * x0_hat + tn * eps_hat
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return torch.where(tn != tt, out, x)

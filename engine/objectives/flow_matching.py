"""Flow-matching objective with per-frame noise levels (diffusion forcing), and a plain Euler sampler.

Path and target (rectified flow): ``x_t = (1 - t) x0 + t eps`` with flow time t in [0, 1] (t = 0
clean, t = 1 pure noise), velocity ``v = dx_t/dt = eps - x0``. Every frame has its own t
(``noise_level="independent"``) or one t is shared by the clip (``"uniform"``). The first
``context_frames`` frames (or a random number up to it per sample) are context: clean (t = 0, x_t = x0)
and excluded from the loss.

Timesteps: u ~ U(0, 1) or logit-normal ``u = sigmoid(mean + std * n)``, then shifted
``t = shift * u / (1 + (shift - 1) * u)`` (shift > 1 moves mass towards noise).

What the network outputs (``prediction``: ``velocity`` or ``x0``, the clean clip) is turned into the
velocity ``v_hat`` by :func:`engine.objectives.prediction.velocity_from_output` (x0: ``v_hat = (x_t -
x0_hat) / max(t, x0_t_clamp)``); the loss is always on the velocity. Weightings of its squared error
(averaged over (C, H, W) per frame, then over the loss frames of a sample, then over the batch):

- ``velocity``: ``|v_hat - v|^2``, plain MSE.
- ``v_sigmoid``: DFoT's SiD2 sigmoid weighting, written for this path. The logSNR of the path is
  ``lambda = log(alpha^2 / sigma^2) = 2 log((1 - t) / t)``. The implied noise prediction
  ``eps_hat = x_t + (1 - t) v_hat`` has error ``eps_hat - eps = (1 - t)(v_hat - v)``, so DFoT's
  ``sigmoid(bias - lambda) * |eps_hat - eps|^2`` (bias = -1) is, per frame,
  ``w(t) |v_hat - v|^2`` with ``w(t) = sigmoid(bias - lambda(t)) * (1 - t)^2``. As in DFoT's code there
  is no ``d lambda / dt`` Jacobian; t is sampled as configured above. w -> 0 at both ends (t = 0: the
  sigmoid vanishes; t = 1: (1 - t)^2 vanishes). ``mse`` in the result is always the unweighted one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from geoforge.engine.objectives.prediction import PREDICTIONS, velocity_from_output
from geoforge.engine.schema import ConfigError

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
NOISE_LEVELS = ("independent", "uniform")
PARAMETERIZATIONS = ("velocity", "v_sigmoid")
COND_KEYS = ("intrinsics", "extrinsics", "actions", "drop_cond")


@dataclass
class FlowMatchingConfig:
    """Training-time sampling and weighting of the flow-matching loss (see the module docstring)."""

    timestep_sampling: str = "uniform"  # "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    context_frames: int = 0  # leading clean frames, t = 0, not in the loss
    random_context: bool = False  # per sample, draw the number of context frames from 0..context_frames
    noise_level: str = "independent"  # "independent" (per frame) | "uniform" (one t per clip)
    parameterization: str = "velocity"  # "velocity" | "v_sigmoid"
    sigmoid_bias: float = -1.0  # bias of the v_sigmoid weighting sigmoid(bias - logSNR)
    prediction: Literal["velocity", "x0"] = "velocity"  # network output: "velocity" | "x0" (x-prediction, velocity loss; prediction.py)
    x0_t_clamp: float = 0.05  # x0: v_hat = (x_t - x0_hat) / max(t, x0_t_clamp) (JiT's clamp)
    allow_patch_bottleneck: bool = False  # opt out of the recipe guard on velocity prediction (engine/config.py)

    def validate(self) -> None:
        """Raise ConfigError naming the field of an invalid setting (``engine.schema``'s contract)."""
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(f"timestep_sampling: must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std: must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ConfigError(f"shift: must be > 0, got {self.shift}")
        if self.context_frames < 0:
            raise ConfigError(f"context_frames: must be >= 0, got {self.context_frames}")
        if self.noise_level not in NOISE_LEVELS:
            raise ConfigError(f"noise_level: must be one of {NOISE_LEVELS}, got {self.noise_level!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization: must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction: must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 < self.x0_t_clamp <= 1.0:
            raise ConfigError(f"x0_t_clamp: must be in (0, 1], got {self.x0_t_clamp}")


def shift_t(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``: maps [0, 1] onto itself, identity for shift = 1."""
    return shift * u / (1 + (shift - 1) * u)


def sample_t(batch: int, frames: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Flow times ``[batch, frames]`` (float32, before context frames are zeroed)."""
    n = frames if cfg.noise_level == "independent" else 1
    if cfg.timestep_sampling == "uniform":
        u = torch.rand(batch, n, generator=generator, device=device)
    else:
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, n, generator=generator, device=device))
    return shift_t(u, cfg.shift).expand(batch, frames).contiguous()


def context_mask(batch: int, frames: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[batch, frames]``, True on context frames (the first k; k random per sample if configured)."""
    if cfg.context_frames >= frames:
        raise ValueError(f"context_frames ({cfg.context_frames}) must be < the clip's frames ({frames})")
    if cfg.random_context:
        k = torch.randint(0, cfg.context_frames + 1, (batch, 1), generator=generator, device=device)
    else:
        k = torch.full((batch, 1), cfg.context_frames, device=device)
    return torch.arange(frames, device=device)[None, :] < k


def add_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` for ``x0, eps [B, T, ...]`` and per-frame ``t [B, T]``."""
    tt = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``v = eps - x0``, the time derivative of ``add_noise`` along the path."""
    return eps - x0


def loss_weight(t: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """Per-frame weight ``[B, T]`` of the velocity squared error (ones for ``velocity``)."""
    if cfg.parameterization == "velocity":
        return torch.ones_like(t, dtype=torch.float32)
    t = t.float()
    log_snr = -2 * torch.logit(t)  # 2 log((1 - t) / t)
    return torch.sigmoid(cfg.sigmoid_bias - log_snr) * (1 - t) ** 2


def _check_cond(cond: dict | None) -> dict:
    cond = dict(cond or {})
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise ValueError(f"cond: unknown keys {sorted(unknown)}; allowed {COND_KEYS}")
    return cond


def draw_noise(shape: Sequence[int], cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per-frame times ``t [B, T]`` (0 on context frames), ``context [B, T]`` (bool) and ``eps`` of ``shape``,
    drawn in this order from ``generator``."""
    b, frames = shape[:2]
    t = sample_t(b, frames, cfg, generator, device)
    ctx = context_mask(b, frames, cfg, generator, device)
    eps = torch.randn(tuple(shape), generator=generator, device=device)
    return {"t": t.masked_fill(ctx, 0.0), "context": ctx, "eps": eps}


def flow_matching_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, cfg: FlowMatchingConfig, *,
                       generator: torch.Generator | None = None, cond: dict | None = None,
                       return_features: Sequence[int] = (), noise: dict | None = None) -> dict:
    """One training loss evaluation on clean clips ``x0 [B, T, C, H, W]``.

    Draws, in this order from ``generator`` (or the global RNG): t, the context lengths (if random),
    and the noise eps, so a run resumed with the same RNG state reproduces it. ``noise`` (from
    :func:`draw_noise`: ``t [B, T]``, ``context [B, T]`` bool, ``eps`` like x0) replaces the draw, so a
    caller can draw it per sample (the training loop does, for rank-independent noise). ``model`` is called as
    ``model(x_t, t, **cond, return_features=...)``; its output is read as ``cfg.prediction`` and turned
    into the velocity (:func:`velocity_from_output`). Returns ``loss`` (weighted, scalar), ``mse``
    (unweighted, scalar), ``t [B, T]`` (0 on context frames), ``per_sample [B]`` (weighted) and
    ``features`` (the model's feature dict; empty unless ``return_features``).
    """
    cfg.validate()
    cond = _check_cond(cond)
    if noise is None:
        noise = draw_noise(x0.shape, cfg, generator, x0.device)
    t, ctx = noise["t"].to(x0.device, torch.float32), noise["context"].to(x0.device)  # fp32 times under bf16
    eps = noise["eps"].to(x0.device, x0.dtype)
    if eps.shape != x0.shape or t.shape != x0.shape[:2] or ctx.shape != x0.shape[:2]:
        raise ValueError(f"noise: expected t and context {tuple(x0.shape[:2])} and eps {tuple(x0.shape)}, got "
                         f"{tuple(t.shape)}, {tuple(ctx.shape)}, {tuple(eps.shape)}")
    x_t = add_noise(x0, t, eps)
    if return_features:
        pred, features = model(x_t, t, **cond, return_features=tuple(return_features))
    else:
        pred, features = model(x_t, t, **cond), {}
    pred = velocity_from_output(pred, x_t, t, cfg.prediction, cfg.x0_t_clamp)
    err = (pred.float() - velocity_target(x0, eps).float()).pow(2).flatten(2).mean(-1)  # [B, T]
    keep = (~ctx).float()
    count = keep.sum(1)
    per_sample = (loss_weight(t, cfg) * keep * err).sum(1) / count
    mse = ((keep * err).sum(1) / count).mean()
    return {"loss": per_sample.mean(), "mse": mse, "t": t, "per_sample": per_sample, "features": features}

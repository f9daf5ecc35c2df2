"""DFoT's continuous diffusion, exactly as the released DFoT / Geometry Forcing models were trained and sampled.

Training (DFoT ``ContinuousDiffusion.forward`` with ``CosineNoiseSchedule``), per frame ``t ~ U[0, 1]``:

- logSNR ``lambda(t) = -2 log tan(t_min + t (t_max - t_min)) + 2 log(shift)``, ``shift = 0.125`` (SiD's shifted
  cosine for 256^2 pixels), ``t_min = atan(exp(-logsnr_max / 2))``, ``t_max = atan(exp(-logsnr_min / 2))``
  with ``logsnr_min / max = -15 / 15`` (before the shift: lambda(0) = 15 - 4.16, lambda(1) = -15 - 4.16).
  :func:`logsnr` is this training logSNR (constants in float32 like DFoT's buffers).
- VP path ``x_t = alpha x + sigma eps``, ``alpha = sqrt(sigmoid(lambda))``, ``sigma = sqrt(sigmoid(-lambda))``;
  the noise ``eps ~ N(0, 1)`` clipped at ``+-clip_noise`` (20).
- the network gets ``precond_scale * lambda`` (0.125 lambda) as its per-frame noise input and predicts
  ``v``; ``eps_hat = alpha v + sigma x_t``, ``x0_hat = alpha x_t - sigma v``.
- loss: ``sigmoid(sigmoid_bias - lambda) * (eps_hat - eps)^2`` (bias -1, SiD2's sigmoid weighting),
  per element; DFoT averages over every element of the batch, with frames outside the loss (context)
  counted as zeros (``_reweight_loss``). Context frames here: ``t = 0`` and weight 0.

Data: frames in [0, 1] are normalised per channel, ``(x - data_mean) / data_std`` (RealEstate10K's
statistics by default, as the released models expect), not mapped to [-1, 1].

Sampling (DFoT ``DiscreteDiffusion`` buffers, ``cosine_simple_diffusion`` beta schedule, 1000 steps): the
discrete logSNR ``-2 log tan(t_min + s (t_max - t_min)) + 2 log(0.125)`` at ``s = linspace(0, 1, 1000)``
(float64) -> ``alphas_cumprod`` -> betas clipped to [1e-9, 1] -> re-accumulated, stored as float32
(:class:`DiscreteSchedule`). DDIM with 50 steps visits the levels ``linspace(-1, 999, 51).long()``
(-1 = clean); one step (:func:`ddim_step`) feeds the network ``0.125 * logsnr[k]``, and frames whose level
does not change are left as they are. :func:`ddim_sample` is DFoT's sampler as written, kept as the
reference: GeoForge samples the U-ViT3D with the one sampling API (:mod:`engine.sampling`) through the
v-prediction adapter (:mod:`engine.objectives.dfot_velocity`), whose Euler steps on
``dfot_flow_times`` reproduce it (tested) and add history guidance and long videos.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from geoforge.engine.schema import ConfigError


@dataclass
class DFoTDiffusionConfig:
    """The recipe's ``dfot`` section: DFoT's continuous diffusion (defaults = the released RE10K models)."""

    shift: float = 0.125            # training logSNR shift (base 32 / resolution 256)
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    precond_scale: float = 0.125    # network noise input = precond_scale * logSNR
    sigmoid_bias: float = -1.0
    clip_noise: float = 20.0
    timesteps: int = 1000           # discrete schedule of the sampler
    sampling_timesteps: int = 50    # DDIM steps
    ddim_eta: float = 0.0
    data_mean: list[float] = field(default_factory=lambda: [0.577, 0.517, 0.461])   # RE10K, frames in [0, 1]
    data_std: list[float] = field(default_factory=lambda: [0.249, 0.249, 0.268])

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[..., C, H, W]`` in [0, 1] -> the model's space ``(x - mean) / std`` (DFoT's ``_normalize_x``)."""
        mean, std = (torch.tensor(v, device=frames.device, dtype=frames.dtype)[:, None, None]
                     for v in (self.data_mean, self.data_std))
        return (frames - mean) / std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype)[:, None, None]
                     for v in (self.data_mean, self.data_std))
        return x * std + mean

    def validate(self) -> None:
        """Raise ConfigError naming the field of an invalid setting (``engine.schema``'s contract)."""
        if len(self.data_mean) != len(self.data_std) or not all(s > 0 for s in self.data_std):
            raise ConfigError(f"data_std: one positive value per channel of data_mean, got "
                              f"{self.data_mean} / {self.data_std}")
        if self.shift <= 0:
            raise ConfigError(f"shift: must be > 0, got {self.shift}")
        if not self.logsnr_min < self.logsnr_max:
            raise ConfigError(f"logsnr_min: must be < logsnr_max ({self.logsnr_max}), got {self.logsnr_min}")
        if self.clip_noise <= 0:
            raise ConfigError(f"clip_noise: must be > 0, got {self.clip_noise}")
        if not 1 <= self.sampling_timesteps <= self.timesteps:
            raise ConfigError(f"sampling_timesteps: must be in [1, timesteps={self.timesteps}], "
                              f"got {self.sampling_timesteps}")
        if self.ddim_eta < 0:
            raise ConfigError(f"ddim_eta: must be >= 0, got {self.ddim_eta}")


# ----------------------------------------------------------------------------- training
def _t_range(logsnr_min: float, logsnr_max: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    t_min = torch.atan(torch.exp(-0.5 * torch.tensor(logsnr_max, dtype=dtype)))
    t_max = torch.atan(torch.exp(-0.5 * torch.tensor(logsnr_min, dtype=dtype)))
    return t_min, t_max


def logsnr(t: torch.Tensor, shift: float = 0.125, logsnr_min: float = -15.0, logsnr_max: float = 15.0
           ) -> torch.Tensor:
    """DFoT's training logSNR of ``t`` in [0, 1] (constants computed in float32, as DFoT's buffers)."""
    t_min, t_max = (v.to(t.device, t.dtype) for v in _t_range(logsnr_min, logsnr_max, torch.float32))
    shift_term = (2 * torch.log(torch.tensor(shift, dtype=torch.float32))).to(t.device, t.dtype)
    return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min))) + shift_term


def alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda)))``: the VP path's signal and noise scales."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def _frames(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T, 1, 1, 1]`` (broadcast over a frame's channels and pixels)."""
    return v.reshape(*v.shape, *([1] * (like.ndim - v.ndim)))


def dfot_diffusion_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, cfg: DFoTDiffusionConfig, *,
                        noise: dict, cond: dict | None = None, return_features: Sequence[int] = ()) -> dict:
    """One training loss of DFoT's diffusion on clean clips ``x0 [B, T, C, H, W]`` (module docstring).

    ``noise``: ``t [B, T]`` (U[0, 1] per frame; 0 on context frames), ``context [B, T]`` bool, ``eps`` like
    x0 (clipped here) - the trainer's per-sample draw (``engine.objectives.flow_matching.draw_noise``).
    ``model(x_t, 0.125 lambda, **cond[, return_features=...])`` returns v. Returns ``loss`` (DFoT's mean),
    ``mse`` (unweighted eps MSE over loss frames), ``t``, ``logsnr``, ``x0_pred`` and ``features``.
    """
    t = noise["t"].to(x0.device, torch.float32)
    ctx = noise["context"].to(x0.device)
    eps = noise["eps"].to(x0.device, x0.dtype).clamp(-cfg.clip_noise, cfg.clip_noise)
    if eps.shape != x0.shape or t.shape != x0.shape[:2] or ctx.shape != x0.shape[:2]:
        raise ValueError(f"noise: expected t and context {tuple(x0.shape[:2])} and eps {tuple(x0.shape)}, got "
                         f"{tuple(t.shape)}, {tuple(ctx.shape)}, {tuple(eps.shape)}")
    lam = logsnr(t, cfg.shift, cfg.logsnr_min, cfg.logsnr_max)
    alpha, sigma = (_frames(v.to(x0.dtype), x0) for v in alpha_sigma(lam))
    x_t = alpha * x0 + sigma * eps
    net_in = (cfg.precond_scale * lam).to(x0.dtype)
    cond = dict(cond or {})
    if return_features:
        v, features = model(x_t, net_in, **cond, return_features=tuple(return_features))
    else:
        v, features = model(x_t, net_in, **cond), {}
    eps_pred = alpha * v + sigma * x_t
    acc = torch.promote_types(x0.dtype, torch.float32)   # float32 (bf16 training), float64 stays float64
    err = (eps_pred.to(acc) - eps.to(acc)).pow(2)
    keep = _frames((~ctx).to(acc), err)
    weight = _frames(torch.sigmoid(cfg.sigmoid_bias - lam.to(acc)), err)
    loss = (err * weight * keep).mean()
    mse = (err * keep).sum() / (keep.sum() * err[0, 0].numel()).clamp(min=1)
    return {"loss": loss, "mse": mse, "t": t, "logsnr": lam, "x0_pred": alpha * x_t - sigma * v,
            "features": features}


# ----------------------------------------------------------------------------- sampling
class DiscreteSchedule:
    """DFoT's discrete ``cosine_simple_diffusion`` tables (float32, as its buffers) and DDIM level grid."""

    def __init__(self, cfg: DFoTDiffusionConfig | None = None):
        cfg = cfg or DFoTDiffusionConfig()
        cfg.validate()
        self.cfg = cfg
        t_min, t_max = _t_range(cfg.logsnr_min, cfg.logsnr_max, torch.float64)
        s = torch.linspace(0, 1, cfg.timesteps, dtype=torch.float64)
        lam = -2 * torch.log(torch.tan(t_min + s * (t_max - t_min)))
        if cfg.shift != 1.0:
            lam = lam + 2 * math.log(cfg.shift)   # float64, like torch.log(torch.tensor(shift, float64))
        ac = 1 / (1 + torch.exp(-lam))
        betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]]).clip(1e-9, 1.0)
        ac = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = ac.float()
        self.sqrt_alphas_cumprod = ac.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt().float()
        self.logsnr = torch.log(ac / (1 - ac)).float()

    def ddim_levels(self, steps: int | None = None) -> torch.Tensor:
        """The ``steps + 1`` discrete levels DDIM visits, ``linspace(-1, T - 1, steps + 1).long()`` (index 0 = -1,
        clean; truncated toward zero like DFoT's ``ddim_idx_to_noise_level``)."""
        steps = steps or self.cfg.sampling_timesteps
        return torch.linspace(-1, self.cfg.timesteps - 1, steps + 1).long()

    def network_input(self, k: torch.Tensor) -> torch.Tensor:
        """``precond_scale * logsnr[k]`` for levels ``k >= 0``."""
        return self.cfg.precond_scale * self.logsnr.to(k.device)[k]


def ddim_step(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, curr: torch.Tensor,
              nxt: torch.Tensor, schedule: DiscreteSchedule, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """One DFoT DDIM step per frame from levels ``curr [B, T]`` to ``nxt [B, T]`` (-1 = clean).

    ``model(x, net_input [B, T])`` returns v (conditioning bound by the caller). Frames with
    ``curr == nxt`` are returned unchanged; the eta noise is drawn from ``generator`` (and clipped)."""
    dev, tables = x.device, schedule
    ac = tables.alphas_cumprod.to(dev)
    k = curr.clamp(min=0)
    alpha = ac[k]
    alpha_next = torch.where(nxt < 0, torch.ones_like(alpha), ac[nxt.clamp(min=0)])
    eta = schedule.cfg.ddim_eta
    sigma = torch.where(nxt < 0, torch.zeros_like(alpha),
                        eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt())
    c = (1 - alpha_next - sigma ** 2).sqrt()
    v = model(x, schedule.network_input(k).to(dev, x.dtype))
    sa = _frames(tables.sqrt_alphas_cumprod.to(dev)[k], x).to(x.dtype)
    s1a = _frames(tables.sqrt_one_minus_alphas_cumprod.to(dev)[k], x).to(x.dtype)
    x0 = sa * x - s1a * v
    eps = sa * v + s1a * x
    out = x0 * _frames(alpha_next.sqrt(), x).to(x.dtype) + eps * _frames(c, x).to(x.dtype)
    if eta > 0:
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else dev)
        out = out + _frames(sigma, x).to(x.dtype) * z.to(dev, x.dtype).clamp(-schedule.cfg.clip_noise,
                                                                          schedule.cfg.clip_noise)
    return torch.where(_frames(curr == nxt, x), x, out)


@torch.no_grad()
def ddim_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Sequence[int],
                schedule: DiscreteSchedule | None = None, context: torch.Tensor | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Full-sequence DDIM (every generated frame at the same level; ``context [B, k, ...]`` frames clean, level
    -1) from pure noise, ``schedule.cfg.sampling_timesteps`` steps; ``model(x, net_input)`` returns v."""
    schedule = schedule or DiscreteSchedule()
    b, frames = shape[:2]
    x = torch.randn(tuple(shape), generator=generator, device=generator.device if generator else device)
    x = x.to(device).clamp(-schedule.cfg.clip_noise, schedule.cfg.clip_noise)
    n_ctx = 0 if context is None else context.shape[1]
    if n_ctx:
        x[:, :n_ctx] = context.to(x)
    levels = schedule.ddim_levels().to(x.device)
    for i in range(len(levels) - 1, 0, -1):
        curr = levels[i].expand(b, frames).clone()
        nxt = levels[i - 1].expand(b, frames).clone()
        curr[:, :n_ctx] = nxt[:, :n_ctx] = -1
        x = ddim_step(model, x, curr, nxt, schedule, generator)
    return x


__all__ = ["DFoTDiffusionConfig", "logsnr", "alpha_sigma", "dfot_diffusion_loss", "DiscreteSchedule", "ddim_step",
           "ddim_sample"]

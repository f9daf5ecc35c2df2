"""DFoT's v-prediction U-ViT3D as the flow-matching velocity model the one sampling API calls.

A rectified-flow point ``x_rf = (1 - t) x0 + t eps`` at flow time t is DFoT's VP point ``x_vp = alpha x0 +
sigma eps`` (``alpha^2 + sigma^2 = 1``) scaled: ``t = sigma / (alpha + sigma)``, ``x_vp = (alpha + sigma) x_rf``.
Given t, the VP logSNR is ``lambda = 2 log((1 - t) / t)``, so ``alpha = sqrt(sigmoid(lambda)) = (1 - t) / r``
and ``sigma = sqrt(sigmoid(-lambda)) = t / r`` with ``r = sqrt((1 - t)^2 + t^2)`` (the same numbers, finite at
t = 0 and 1). :class:`DFoTVelocity` feeds ``x_vp`` and DFoT's noise input ``precond_scale * lambda`` to the
network, whose output is ``v_hat``, and returns

    x0_hat = alpha x_vp - sigma v_hat,  eps_hat = sigma x_vp + alpha v_hat,
    velocity = eps_hat - x0_hat = (sigma - alpha) x_vp + (alpha + sigma) v_hat.

**Noise input.** lambda is clamped to DFoT's discrete table ``[logsnr[T - 1], logsnr[0]]``
(``DiscreteSchedule``): a clean frame (t = 0: context) gets ``logsnr[0]`` with its clean pixels, exactly how
DFoT's ``ddim_sample_step`` feeds context frames (level -1 clamped to 0); pure noise (t = 1) gets
``logsnr[T - 1]``.

**Pixel space.** DFoT's diffusion lives in its normalised space ``(x - data_mean) / data_std`` of frames in
[0, 1] (``DFoTDiffusionConfig.normalize``, as training); the sampler's noise must be standard normal *there*,
so sampling runs in that space: :meth:`DFoTVelocity.encode` maps GeoForge pixels ([-1, 1]) in (context
frames), :meth:`DFoTVelocity.decode` maps samples back. :func:`to_model_space` / :func:`from_model_space`
do the same for any velocity model (identity for the DiT, which samples in [-1, 1]).

**Time grid.** :func:`dfot_flow_times` is DFoT's DDIM level grid (``linspace(-1, T - 1, steps + 1)``) as
flow times. With that grid, the sampler's Euler step (= DDIM with eta 0 on this path) is DFoT's DDIM step:
both move the frame to ``alpha' x0_hat + sigma' eps_hat`` (up to the scale ``alpha' + sigma'``), so
``sample_clip`` through the adapter reproduces ``ddim_sample`` (up to the first level, taken as t = 1
exactly, and float32 rounding), and every guidance scheme of the sampler (history guidance included) runs
on DFoT's own sampler grid. History-guidance levels given in DFoT's units (a fraction of its discrete
schedule) become flow times with :func:`dfot_level_time` (``engine.eval`` reads every architecture's levels so).
With a separate noise per guidance branch, drawn in DFoT's layout (``engine.sampling.window.history_noise``), one
guided step through the adapter is DFoT's history-guidance step to float32 rounding
(``tests/engine/objectives/test_dfot_history_guidance.py``, measured <= 1e-6 relative). The one difference left
is below that: history that guidance noises fully (the unconditional branch) is pure noise at t = 1 here, while
DFoT's ``q_sample`` at its last level ``T - 1`` keeps ``alpha = 7e-5`` of the clean frame (the network input
is the same, ``logsnr[T - 1]``).

**Cameras.** The U-ViT3D's ray condition takes DFoT's raw ``poses16`` when given (RealEstate10K batches
carry them; what training and DFoT use), else GeoForge's ``intrinsics`` / ``extrinsics``; ``actions`` are
not an input of the U-ViT3D and are ignored (as in training).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from geoforge.engine import pixels
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig, DiscreteSchedule
from geoforge.engine.objectives.prediction import velocity_model


def vp_scales(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` of the VP point at flow time ``t``: ``((1 - t) / r, t / r)``, ``r = sqrt((1 - t)^2 + t^2)``
    (= ``sqrt(sigmoid(+-lambda))`` with ``lambda = 2 log((1 - t) / t)``)."""
    r = torch.sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / r, t / r


def flow_logsnr(t: torch.Tensor) -> torch.Tensor:
    """The VP logSNR ``2 log((1 - t) / t)`` of flow time ``t`` (+inf at 0, -inf at 1)."""
    return 2 * (torch.log1p(-t) - torch.log(t))


def _frames(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(*v.shape, *([1] * (like.ndim - v.ndim))).to(like.dtype)


class DFoTVelocity(nn.Module):
    """``model`` (a VP v-prediction network called ``model(x_vp, precond_scale * logSNR, poses16= |
    intrinsics=, extrinsics=, drop_cond=)``, DFoT's U-ViT3D) as a velocity model ``forward(x_t, t, **cond)``
    (module docstring). An ``nn.Module`` holding the model, so ``eval()`` / ``parameters()`` reach it."""

    def __init__(self, model: nn.Module, cfg: DFoTDiffusionConfig):
        super().__init__()
        self.model = model
        cfg.validate()
        self.cfg = cfg
        table = DiscreteSchedule(cfg).logsnr
        self.logsnr_range = (float(table[-1]), float(table[0]))

    def network_input(self, t: torch.Tensor) -> torch.Tensor:
        """DFoT's noise input ``precond_scale * lambda(t)``, lambda clamped to its discrete table's range."""
        lam = flow_logsnr(t.double()).clamp(*self.logsnr_range)
        return (self.cfg.precond_scale * lam).to(t.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, poses16: torch.Tensor | None = None,
                intrinsics: torch.Tensor | None = None, extrinsics: torch.Tensor | None = None,
                actions: torch.Tensor | None = None, drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``eps_hat - x0_hat`` ``[B, T, C, H, W]`` at per-frame flow times ``t [B, T]``."""
        alpha, sigma = (_frames(s, x_t) for s in vp_scales(t.float()))
        x_vp = (alpha + sigma) * x_t
        cams = {"poses16": poses16} if poses16 is not None else {"intrinsics": intrinsics, "extrinsics": extrinsics}
        v = self.model(x_vp, self.network_input(t.float()).to(x_t.dtype), **cams, drop_cond=drop_cond)
        return (sigma - alpha) * x_vp + (alpha + sigma) * v.to(x_vp.dtype)

    def encode(self, signed: torch.Tensor) -> torch.Tensor:
        """GeoForge pixels ``[..., C, H, W]`` in [-1, 1] -> DFoT's normalised space (training's normalisation)."""
        return self.cfg.normalize(pixels.to_unit(signed))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """DFoT's normalised space -> GeoForge pixels in [-1, 1] (not clamped)."""
        return pixels.to_signed(self.cfg.unnormalize(x))

    def flow_times(self, steps: int) -> tuple[float, ...]:
        """DFoT's DDIM grid of ``steps`` steps as flow times (:func:`dfot_flow_times`)."""
        return dfot_flow_times(self.cfg, steps)


def dfot_flow_times(cfg: DFoTDiffusionConfig, steps: int) -> tuple[float, ...]:
    """Flow times ``[steps + 1]`` from 1 to 0 of DFoT's DDIM levels ``linspace(-1, T - 1, steps + 1).long()``
    (level k: ``sigma_k / (alpha_k + sigma_k)`` of its ``alphas_cumprod``; level -1: 0). The noisiest level
    is taken as t = 1 exactly (pure noise, DFoT's starting point; its own t is 1 - 7e-5)."""
    schedule = DiscreteSchedule(replace(cfg, sampling_timesteps=steps))
    ac = schedule.alphas_cumprod.double()
    levels = schedule.ddim_levels(steps).flip(0)
    a, s = ac[levels.clamp(min=0)].sqrt(), (1 - ac[levels.clamp(min=0)]).sqrt()
    times = torch.where(levels < 0, torch.zeros_like(a), s / (a + s))
    times[0] = 1.0
    return tuple(float(x) for x in times)


def dfot_index_time(cfg: DFoTDiffusionConfig, index: int) -> float:
    """The flow time ``sigma / (alpha + sigma)`` of DFoT's discrete level ``index`` (its ``alphas_cumprod``;
    ``index < 0``: clean, 0). Level ``T - 1`` is just short of 1 (``1 - 7e-5`` on the RE10K schedule)."""
    if index < 0:
        return 0.0
    ac = float(DiscreteSchedule(cfg).alphas_cumprod.double()[index])
    a, s = ac ** 0.5, (1 - ac) ** 0.5
    return s / (a + s)


def dfot_level_time(cfg: DFoTDiffusionConfig, level: float) -> float:
    """The flow time of a history-guidance level of DFoT's code (``stabilization_level``, ``freq_scale``: a
    fraction of its discrete schedule): DFoT noises such history to index ``(level * T - 1).long()`` (float32,
    as its ``HistoryGuidanceManager``; -1 = clean -> 0), here the flow time of that index; a level at or above
    ``T - 1`` is "fully noised", 1 (pure noise; DFoT's ``q_sample`` at ``T - 1`` keeps 7e-5 of the clean frame).

    GeoForge's guidance levels (``geoforge-eval --stabilization-level / --freq-scale``, the protocols) are
    given in these units for every architecture and become flow times here: the same level is the same
    logSNR on the DiT and on the U-ViT3D (``engine.eval.protocols.GuidanceSpec``)."""
    index = int((torch.tensor(level, dtype=torch.float32) * cfg.timesteps - 1).long())
    if index >= cfg.timesteps - 1:
        return 1.0
    return dfot_index_time(cfg, index)


# ----------------------------------------------------------------------------- one call per recipe
def recipe_velocity_model(model: nn.Module, recipe) -> nn.Module:
    """The velocity model the sampler calls for a backbone of ``recipe.model.arch``: :class:`DFoTVelocity`
    (with ``recipe.dfot``) for ``uvit3d``, else ``velocity_model(model, recipe.objective)``."""
    if getattr(recipe.model, "arch", "dit") == "uvit3d":
        return model if isinstance(model, DFoTVelocity) else DFoTVelocity(model, recipe.dfot)
    return velocity_model(model, recipe.objective)


def to_model_space(model: nn.Module, signed: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the space ``model`` samples in (DFoT's normalised space, or [-1, 1] itself)."""
    return model.encode(signed) if isinstance(model, DFoTVelocity) else signed


def from_model_space(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A sample of ``model`` -> pixels in [-1, 1] (inverse of :func:`to_model_space`)."""
    return model.decode(x) if isinstance(model, DFoTVelocity) else x


def default_times(model: nn.Module, steps: int) -> Sequence[float] | None:
    """The time grid ``model`` samples on by default: DFoT's DDIM grid for :class:`DFoTVelocity` (the paper's
    sampler), None (the sampler's ``time_grid``) otherwise."""
    return model.flow_times(steps) if isinstance(model, DFoTVelocity) else None


__all__ = ["DFoTVelocity", "vp_scales", "flow_logsnr", "dfot_flow_times", "dfot_index_time", "dfot_level_time",
           "recipe_velocity_model", "to_model_space", "from_model_space", "default_times"]

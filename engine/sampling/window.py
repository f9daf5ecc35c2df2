"""One window: the guided velocity of a window and sampling it through the scheduling matrix; and
:func:`sample_clip`, one window from noise with clean context frames (training samples, validation, the
VideoGPA policies). See :mod:`engine.sampling`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from geoforge.engine.sampling.common import (Generators, autocast_for, check_cond, device_of, eval_mode, kinds_tensor,
                                             randn_on)
from geoforge.engine.sampling.config import CONTEXT, GENERATE, GENERATED_CONTEXT, PAD, Guidance, Model, SamplerConfig
from geoforge.engine.sampling.steps import flow_step, scheduling_matrix


def history_noise(guidance: Guidance, branches: Sequence[tuple[tuple[float, ...], bool, float]],
                  shape: Sequence[int], generator: Generators, device: torch.device
                  ) -> dict[int, torch.Tensor]:
    """The noise of each branch's noised history, ``{branch index: [B, T, C, H, W]}``: a separate draw per
    branch, drawn as DFoT's history-guidance step draws it, so that a generator in the state of DFoT's RNG
    gives DFoT's noise.

    DFoT's ``HistoryGuidanceManager.prepare`` repeats the window once per branch (``b t -> (b h) t``) and
    noises the history of all of them with one ``q_sample`` call: one draw of ``[B * N, T, C, H, W]``, video
    major, branch minor, every branch drawn (N = the branches). Its ``SimpleHistoryGuidanceManager`` (HG-v or
    conditional sampling without stabilization) noises only the unconditional branch: one draw of
    ``[B, T, C, H, W]``. Nothing is drawn when no branch has noised history (a window without history, or
    conditional sampling); branches without noised history get no entry.
    """
    noised = [i for i, (levels, _, _) in enumerate(branches) if any(k > 0 for k in levels)]
    if not noised:
        return {}
    simple = guidance.history in ("conditional", "vanilla") and guidance.stabilization == 0.0
    drawn = noised if simple else list(range(len(branches)))
    eps = randn_on((shape[0], len(drawn), *shape[1:]), generator, device)
    return {i: eps[:, j] for j, i in enumerate(drawn) if i in noised}


def guided_velocity(model: Model, x: torch.Tensor, t: torch.Tensor, kinds: torch.Tensor, clean: torch.Tensor,
                    cond: dict[str, torch.Tensor], guidance: Guidance, generator: Generators = None,
                    autocast: str = "auto", max_batch: int | None = None) -> torch.Tensor:
    """Guided velocity ``[B, T, C, H, W]`` (float32) of window ``x`` at per-frame times ``t [T]``.

    ``kinds [T]`` as in the module docstring; ``clean`` holds the history frames' clean values.
    History frames of ``x`` and ``t`` are ignored and rebuilt per branch, each branch's noised history from
    its own noise draw (:func:`history_noise`).
    """
    b, frames = x.shape[:2]
    device = x.device
    is_hist = (kinds == CONTEXT) | (kinds == GENERATED_CONTEXT)
    hist_pos = torch.nonzero(is_hist).flatten().tolist()
    branches = guidance.branches(kinds[is_hist].tolist(), bool(cond))
    eps = history_noise(guidance, branches, x.shape, generator, device)
    hist_mask = is_hist.to(device)[None, :, None, None, None]
    xs, ts, drops = [], [], []
    for i, (levels, drop, _) in enumerate(branches):
        tb = t.to(device=device, dtype=torch.float32).expand(b, frames).clone()
        hist = clean
        for k in dict.fromkeys(levels):  # history frames at flow time k: (1 - k) clean + k eps (this branch's)
            if k > 0:
                at_k = torch.zeros(frames, dtype=torch.bool)
                at_k[[p for p, level in zip(hist_pos, levels) if level == k]] = True
                noised = eps[i] if k == 1 else (1 - k) * clean + k * eps[i]
                hist = torch.where(at_k.to(device)[None, :, None, None, None], noised, hist)
        xb = torch.where(hist_mask, hist, x)
        if levels:
            tb[:, hist_pos] = torch.tensor(levels, dtype=torch.float32, device=device)
        xs.append(xb)
        ts.append(tb)
        drops.append(torch.full((b,), drop, dtype=torch.bool, device=device))
    xcat, tcat, dcat = torch.cat(xs), torch.cat(ts), torch.cat(drops)
    ccat = {k: v.repeat(len(branches), *([1] * (v.ndim - 1))) for k, v in cond.items()}
    use_drop = bool(dcat.any())
    chunk = max_batch or xcat.shape[0]
    outs = []
    with autocast_for(device, autocast):
        for start in range(0, xcat.shape[0], chunk):
            part = slice(start, start + chunk)
            kwargs = {k: v[part] for k, v in ccat.items()}
            if use_drop:
                kwargs["drop_cond"] = dcat[part]
            outs.append(model(xcat[part], tcat[part], **kwargs).float())
    v_all = torch.cat(outs).reshape(len(branches), *x.shape)
    weights = torch.tensor([w for _, _, w in branches], dtype=torch.float32, device=device)
    return torch.einsum("n,n...->...", weights, v_all)


@torch.no_grad()
def sample_window(model: Model, frames: torch.Tensor, kinds: Sequence[int] | torch.Tensor,
                  cond: dict[str, torch.Tensor] | None = None, sampler: SamplerConfig | None = None,
                  guidance: Guidance | None = None, generator: Generators = None,
                  pbar: tqdm | None = None) -> torch.Tensor:
    """Denoise the ``GENERATE`` frames of one window ``frames [B, T, C, H, W]`` (float32, [-1, 1]).

    History frames (``CONTEXT`` / ``GENERATED_CONTEXT``) are taken from ``frames`` and returned as
    given; ``PAD`` frames stay noise; the values of ``GENERATE`` frames in ``frames`` are ignored (their
    initial noise is the first draw from ``generator``, of the whole window's shape; one generator per row
    draws each row alone: :func:`engine.sampling.common.randn_on`). ``cond``: per-frame
    ``intrinsics`` / ``extrinsics`` / ``actions`` [B, T, ...]. ``guidance`` defaults to
    ``sampler.guidance``. The model should be in eval mode (see :func:`generate`).
    """
    sampler = sampler or SamplerConfig()
    sampler.validate()
    guidance = guidance or sampler.guidance
    guidance.validate()
    b, t_len = frames.shape[:2]
    kinds = kinds_tensor(kinds, t_len)
    cond = check_cond(cond, b, t_len)
    device = frames.device
    gen = kinds == GENERATE
    n_gen = int(gen.sum())
    x = randn_on(frames.shape, generator, device)
    hist = ((kinds == CONTEXT) | (kinds == GENERATED_CONTEXT)).to(device)[None, :, None, None, None]
    clean = frames.float()
    x = torch.where(hist, clean, x)
    if n_gen == 0:
        return x
    schedule = scheduling_matrix(sampler.steps, n_gen, sampler.schedule, sampler.shift, sampler.times)
    rows = torch.zeros(schedule.shape[0], t_len, dtype=torch.float64)
    rows[:, gen] = schedule
    rows[:, kinds == PAD] = 1.0
    rows = rows.float()
    for r in range(rows.shape[0] - 1):
        t_now, t_next = rows[r], rows[r + 1]
        v = guided_velocity(model, x, t_now, kinds, clean, cond, guidance, generator, sampler.autocast,
                            sampler.max_batch)
        noise = randn_on(x.shape, generator, device) if sampler.eta > 0 else None
        x = flow_step(x, v, t_now.to(device).expand(b, t_len), t_next.to(device).expand(b, t_len),
                      sampler.method, sampler.eta, noise)
        if pbar is not None:
            pbar.update(1)
    return torch.where(hist, clean, x)


@torch.no_grad()
def sample_clip(model: Model, shape: Sequence[int], steps: int, cond: dict | None = None,
                generator: Generators = None, context: torch.Tensor | None = None,
                device: torch.device | str | None = None, method: str = "euler",
                times: Sequence[float] | None = None) -> torch.Tensor:
    """One window of ``shape = (B, T, C, H, W)`` with the first ``k`` frames fixed to ``context [B, k, ...]``.

    Conditional Euler (or DDIM) over ``linspace(1, 0, steps + 1)`` (or the grid ``times``), noise drawn on
    ``generator``'s device, under the process precision's autocast (``engine.precision``): what training sample
    videos, validation and the VideoGPA DiT policy call. ``cond`` may carry ``drop_cond``.
    """
    b, frames = shape[:2]
    k = 0 if context is None else context.shape[1]
    if context is not None and (context.shape[0] != b or tuple(context.shape[2:]) != tuple(shape[2:]) or k >= frames):
        raise ValueError(f"context must be [B, k < T, C, H, W] matching shape {tuple(shape)}, got {tuple(context.shape)}")
    if device is None:
        device = context.device if context is not None else device_of(model, torch.empty(0))
    device = torch.device(device)
    frames_in = torch.zeros(tuple(shape), device=device)
    if k:
        frames_in[:, :k] = context.to(device).float()
    kinds = [CONTEXT] * k + [GENERATE] * (frames - k)
    sampler = SamplerConfig(method=method, steps=steps, window=max(frames, 2), autocast="auto", progress=False,
                            times=None if times is None else tuple(times))
    cond = {key: v.to(device) for key, v in (cond or {}).items() if v is not None}
    drop = cond.pop("drop_cond", None)
    call = model if drop is None else (lambda x, t, **kw: model(x, t, drop_cond=drop, **kw))
    with eval_mode(model):
        return sample_window(call, frames_in, kinds, cond, sampler, Guidance(), generator)

"""Sampling the flow-matching video DiT: per-frame noise levels, history guidance, long videos.

Path (``engine.objectives.flow_matching``): ``x_t = (1 - t) x0 + t eps`` with a flow time t per frame
(t = 0 clean, t = 1 noise); the model predicts the velocity ``v = eps - x0``. Videos live in [-1, 1].

**Windows.** The model sees a window of frames, each with a *kind*:

- ``GENERATE`` (0): denoised from t = 1 to t = 0 by the scheduling matrix;
- ``CONTEXT`` (1): ground-truth history, clean (t = 0);
- ``GENERATED_CONTEXT`` (2): history generated earlier (stabilized guidance treats it as slightly noisy);
- ``PAD`` (3): filler keeping a short window at the trained length (pure noise at t = 1, its camera
  the last real frame's; never updated nor returned), as DFoT pads with fully-noised tokens.

**Steps** (one row of the scheduling matrix to the next, per frame; frames whose t does not change are
left alone): ``euler`` ``x' = x + (t' - t) v``; ``ddim`` predicts ``x0 = x - t v`` and
``eps = x + (1 - t) v`` and moves to ``x' = (1 - t') x0 + sqrt(t'^2 - c^2) eps + c z`` with
``c = eta * t' * sqrt(1 - ((1 - t) t' / ((1 - t') t))^2)`` (DDIM's posterior standard deviation for
this path, scaled by eta). With eta = 0 DDIM is algebraically the Euler step (the path is linear).
Scheduling matrices: ``full_sequence`` (every generated frame at the same t) or ``pyramid`` (frame j
starts j rows later, as Diffusion Forcing's autoregressive schedule). The time grid is
``shift * u / (1 + (shift - 1) u)`` of ``u = linspace(1, 0, steps + 1)``.

**Guidance** (DFoT's ``history_guidance.py``, :class:`Guidance`). The guided velocity is a weighted
sum of model evaluations, batched into one call. Each evaluation gives every history frame a *level*
k (it is fed as ``(1 - k) clean + k eps`` at flow time k; one eps draw per step, shared by all
evaluations) and keeps or drops the cameras / actions. With ``u`` = every history frame at k = 1 and,
with ``guide_cond`` (DFoT's ``use_external_cond_guidance``), no cameras / actions either, and
``v_c`` = the full history (ground truth clean; generated history, kind 2, at k = s with
stabilization s > 0, else clean) with cond, the composition is ``u + sum_i w_i (v_i - u)``:

- conditional: ``v_c``;
- vanilla (HG-v): ``u + w (v_c - u)``;
- fractional (HG-f): ``v_c + (w - 1) (v_f - u)``, ``v_f``: every history frame (generated too) at
  k = ``fraction`` (DFoT's ``freq_scale``), cond kept;
- temporal (HG-t): ``u + sum_i w_i (v_i - u)`` over ``subsets`` / ``subset_weights``, ``v_i``: the
  history frames at positions ``subsets[i]`` (counted among the window's history frames, negative
  allowed; one out of range raises when a window is sampled) as in ``v_c``, the others at k = 1,
  cond kept (DFoT's ``gen_segments`` option is not supported);
- ``cond_scale`` s_c != 1: classifier-free guidance on cameras / actions with the history kept,
  ``+ (s_c - 1) (v_c - v(full history, no cond))`` (``drop_cond`` of the DiT).

Coinciding evaluations (e.g. with no history in the window) are merged. Scheme names
(:data:`GUIDANCE_NAMES`, :meth:`Guidance.named`): a history mode, optionally ``stabilized_``.

**Long videos.** :func:`predict_sequence` rolls a window autoregressively (DFoT ``_predict_sequence``):
each window keeps the last ``sliding_context`` frames as history and generates as many new frames as
fit. With ``keyframe_density < 1`` :func:`generate` first predicts the keyframes
``round(linspace(0, N - 1, round(density N)))`` (plus the context frames) autoregressively, then fills
the gaps with :func:`interpolate` (DFoT's interpolation plan), each with its own guidance.

Every function is batched over videos, runs under ``torch.no_grad`` with the model in eval mode
(restored afterwards), uses bf16 autocast on CUDA (``autocast="auto"``), shows a tqdm bar, and is
deterministic under a ``torch.Generator``: all noise is drawn from it, on its device.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

GENERATE, CONTEXT, GENERATED_CONTEXT, PAD = 0, 1, 2, 3
FRAME_KINDS = (GENERATE, CONTEXT, GENERATED_CONTEXT, PAD)
METHODS = ("euler", "ddim")
SCHEDULES = ("full_sequence", "pyramid")
HISTORY_GUIDANCE = ("conditional", "vanilla", "fractional", "temporal")
GUIDANCE_NAMES = HISTORY_GUIDANCE + tuple(f"stabilized_{h}" for h in HISTORY_GUIDANCE)
AUTOCAST = ("auto", "bf16", "fp16", "none")
COND_KEYS = ("intrinsics", "extrinsics", "actions")

Model = Callable[..., torch.Tensor]


@dataclass
class Guidance:
    """History guidance and classifier-free guidance on cameras / actions (module docstring)."""

    history: str = "conditional"  # "conditional" | "vanilla" (HG-v) | "fractional" (HG-f) | "temporal" (HG-t)
    scale: float = 1.0  # HG-v / HG-f weight w
    stabilization: float = 0.0  # flow time of generated history in the conditional branch (0: clean)
    cond_scale: float = 1.0  # CFG on cameras / actions with the history kept
    guide_cond: bool = True  # the unconditional branch (all history noised) also drops cameras / actions
    fraction: float = 0.5  # HG-f: flow time of every history frame in the fractional branch (DFoT's freq_scale)
    subsets: Sequence[Sequence[int]] = ()  # HG-t: history-frame positions (negative allowed) per segment
    subset_weights: Sequence[float] = ()  # HG-t: one weight per subset

    def validate(self) -> Guidance:
        """Raise ValueError naming the field of an invalid setting; returns self."""
        if self.history not in HISTORY_GUIDANCE:
            raise ValueError(f"guidance.history must be one of {HISTORY_GUIDANCE}, got {self.history!r}")
        if not 0.0 <= self.stabilization < 1.0:
            raise ValueError(f"guidance.stabilization must be in [0, 1), got {self.stabilization}")
        for name in ("scale", "cond_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"guidance.{name} must be finite, got {getattr(self, name)}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"guidance.fraction must be in (0, 1), got {self.fraction}")
        if self.history == "temporal":
            if len(self.subsets) < 1:
                raise ValueError("guidance.subsets: temporal guidance needs at least one subset of history frames")
            if len(self.subset_weights) != len(self.subsets):
                raise ValueError(f"guidance.subset_weights must have one weight per subset ({len(self.subsets)}), "
                                 f"got {len(self.subset_weights)}")
            for i, (subset, weight) in enumerate(zip(self.subsets, self.subset_weights)):
                if len(subset) == 0 or not all(isinstance(j, int) and not isinstance(j, bool) for j in subset):
                    raise ValueError(f"guidance.subsets[{i}] must be a non-empty list of int frame positions, "
                                     f"got {subset!r}")
                if not math.isfinite(weight):
                    raise ValueError(f"guidance.subset_weights[{i}] must be finite, got {weight}")
        return self

    @classmethod
    def named(cls, name: str, scale: float = 1.0, stabilization: float = 0.0, cond_scale: float = 1.0,
              guide_cond: bool = True, fraction: float = 0.5, subsets: Sequence[Sequence[int]] = (),
              subset_weights: Sequence[float] = ()) -> Guidance:
        """DFoT's scheme names (:data:`GUIDANCE_NAMES`): a history mode, optionally ``stabilized_``."""
        if name not in GUIDANCE_NAMES:
            raise ValueError(f"guidance name must be one of {GUIDANCE_NAMES}, got {name!r}")
        stabilized = name.startswith("stabilized_")
        history = name.removeprefix("stabilized_")
        return cls(history=history, scale=scale if history in ("vanilla", "fractional") else 1.0,
                   stabilization=stabilization if stabilized else 0.0, cond_scale=cond_scale,
                   guide_cond=guide_cond, fraction=fraction, subsets=subsets if history == "temporal" else (),
                   subset_weights=subset_weights if history == "temporal" else ()).validate()

    def branches(self, hist_kinds: Sequence[int], has_cond: bool) -> list[tuple[tuple[float, ...], bool, float]]:
        """``(levels, drop_cond, weight)`` of the evaluations whose weighted sum is the velocity.

        ``hist_kinds``: the kinds of the window's history frames, in order; ``levels`` gives each of them
        its flow time in that evaluation. Evaluations that coincide (same levels and drop, e.g. with no
        history in the window or no conditioning to drop) are merged and zero weights dropped.
        """
        self.validate()
        if self.cond_scale != 1.0 and not has_cond:
            raise ValueError("guidance.cond_scale != 1 needs cameras or actions to drop (cond is empty)")
        n = len(hist_kinds)
        full = tuple(float(self.stabilization) if k == GENERATED_CONTEXT else 0.0 for k in hist_kinds)
        if self.history == "temporal":
            segments = []
            for i, (subset, weight) in enumerate(zip(self.subsets, self.subset_weights)):
                for j in subset:
                    if n and not -n <= j < n:
                        raise ValueError(f"guidance.subsets[{i}]: history frame index {j} is out of range for "
                                         f"{n} history frames")
                picked = {j % n for j in subset} if n else set()
                segments.append((tuple(f if p in picked else 1.0 for p, f in enumerate(full)), weight))
        elif self.history == "fractional":
            segments = [(full, 1.0), ((float(self.fraction),) * n, self.scale - 1.0)]
        else:
            segments = [(full, self.scale if self.history == "vanilla" else 1.0)]
        weights: dict[tuple[tuple[float, ...], bool], float] = defaultdict(float)

        def add(levels: tuple[float, ...], drop: bool, weight: float) -> None:
            weights[(levels, drop and has_cond)] += weight

        if self.history != "conditional":  # u + sum_i w_i (v_i - u), u: all history at t = 1
            add((1.0,) * n, self.guide_cond, 1.0 - sum(w for _, w in segments))
        for levels, weight in segments:
            add(levels, False, weight)
        if self.cond_scale != 1.0:
            add(full, False, self.cond_scale - 1.0)
            add(full, True, 1.0 - self.cond_scale)
        return [(levels, drop, w) for (levels, drop), w in weights.items() if w != 0.0]


@dataclass
class SamplerConfig:
    """How :func:`generate` samples (module docstring)."""

    method: str = "euler"  # "euler" | "ddim"
    steps: int = 50
    eta: float = 0.0  # DDIM stochasticity (0: deterministic, equal to Euler)
    shift: float = 1.0  # time-grid shift (> 1 spends more steps near noise)
    schedule: str = "full_sequence"  # "full_sequence" | "pyramid"
    window: int = 16  # frames per model call (the trained clip length)
    sliding_context: int | None = None  # history frames kept when sliding; None: window // 2
    pad_windows: bool = True  # pad short windows to ``window`` frames with PAD frames
    keyframe_density: float | None = None  # < 1: keyframes first, then interpolation
    guidance: Guidance = field(default_factory=Guidance)
    interpolation_guidance: Guidance = field(default_factory=Guidance)
    autocast: str = "auto"  # "auto" (bf16 on CUDA) | "bf16" | "fp16" | "none"
    max_batch: int | None = None  # cap on videos x guidance branches per model call
    progress: bool = True

    def validate(self) -> SamplerConfig:
        """Raise ValueError naming the field of an invalid setting; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"sampler.method must be one of {METHODS}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"sampler.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"sampler.autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")
        if self.method == "euler" and self.eta != 0:
            raise ValueError("sampler.eta > 0 needs method='ddim' (Euler is deterministic)")
        if self.shift <= 0:
            raise ValueError(f"sampler.shift must be > 0, got {self.shift}")
        if self.window < 2:
            raise ValueError(f"sampler.window must be >= 2, got {self.window}")
        if self.sliding_context is not None and not 1 <= self.sliding_context < self.window:
            raise ValueError(f"sampler.sliding_context must be in [1, window={self.window}), "
                             f"got {self.sliding_context}")
        if self.keyframe_density is not None and not 0 < self.keyframe_density <= 1:
            raise ValueError(f"sampler.keyframe_density must be in (0, 1], got {self.keyframe_density}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"sampler.max_batch must be >= 1, got {self.max_batch}")
        self.guidance.validate()
        self.interpolation_guidance.validate()
        return self

    @property
    def history_frames(self) -> int:
        return self.sliding_context if self.sliding_context is not None else self.window // 2


# --------------------------------------------------------------------------------------- time grids
def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Flow times ``[steps + 1]`` (float64) from 1 down to 0: ``shift u / (1 + (shift - 1) u)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def scheduling_matrix(steps: int, frames: int, kind: str = "full_sequence", shift: float = 1.0) -> torch.Tensor:
    """Per-row, per-frame flow times ``[rows, frames]`` (float64) taking ``frames`` frames from 1 to 0.

    ``full_sequence``: ``steps + 1`` rows, all frames together. ``pyramid``: ``steps + frames`` rows;
    frame j is at grid index ``clamp(steps - row + j, 0, steps)`` (it starts j rows after frame 0).
    """
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


# --------------------------------------------------------------------------------------- helpers
def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)


def _autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: Model) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode (no conditioning dropout) and restore its mode afterwards."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


def _check_cond(cond: dict | None, batch: int, frames: int) -> dict[str, torch.Tensor]:
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise ValueError(f"cond: unknown keys {sorted(unknown)}; allowed {COND_KEYS} (drop_cond is set by the "
                         f"guidance)")
    for key, value in cond.items():
        if value.shape[:2] != (batch, frames):
            raise ValueError(f"cond[{key!r}] must be per frame [B={batch}, T={frames}, ...], got {tuple(value.shape)}")
    return cond


def _take(cond: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[:, index.to(v.device)] for k, v in cond.items()}


def _kinds_tensor(kinds: Sequence[int] | torch.Tensor, frames: int) -> torch.Tensor:
    kinds = torch.as_tensor(kinds, dtype=torch.long).cpu()
    if kinds.shape != (frames,):
        raise ValueError(f"kinds must be [T={frames}] (one kind per frame, shared by the batch), got "
                         f"{tuple(kinds.shape)}")
    if not bool(torch.isin(kinds, torch.tensor(FRAME_KINDS)).all()):
        raise ValueError(f"kinds must be in {FRAME_KINDS} (generate, context, generated context, pad)")
    return kinds


def _device_of(model: Model, fallback: torch.Tensor) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return fallback.device


# --------------------------------------------------------------------------------------- one window
def guided_velocity(model: Model, x: torch.Tensor, t: torch.Tensor, kinds: torch.Tensor, clean: torch.Tensor,
                    cond: dict[str, torch.Tensor], guidance: Guidance, generator: torch.Generator | None = None,
                    autocast: str = "auto", max_batch: int | None = None) -> torch.Tensor:
    """Guided velocity ``[B, T, C, H, W]`` (float32) of window ``x`` at per-frame times ``t [T]``.

    ``kinds [T]`` as in the module docstring; ``clean`` holds the history frames' clean values.
    History frames of ``x`` and ``t`` are ignored and rebuilt per branch.
    """
    b, frames = x.shape[:2]
    device = x.device
    is_hist = (kinds == CONTEXT) | (kinds == GENERATED_CONTEXT)
    hist_pos = torch.nonzero(is_hist).flatten().tolist()
    branches = guidance.branches(kinds[is_hist].tolist(), bool(cond))
    needs_noise = any(k > 0 for levels, _, _ in branches for k in levels)
    eps = _randn(x.shape, generator, device) if needs_noise else None
    hist_mask = is_hist.to(device)[None, :, None, None, None]
    xs, ts, drops = [], [], []
    for levels, drop, _ in branches:
        tb = t.to(device=device, dtype=torch.float32).expand(b, frames).clone()
        hist = clean
        for k in dict.fromkeys(levels):  # history frames at flow time k: (1 - k) clean + k eps
            if k > 0:
                at_k = torch.zeros(frames, dtype=torch.bool)
                at_k[[p for p, level in zip(hist_pos, levels) if level == k]] = True
                noised = eps if k == 1 else (1 - k) * clean + k * eps
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
    with _autocast(device, autocast):
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
                  guidance: Guidance | None = None, generator: torch.Generator | None = None,
                  pbar: tqdm | None = None) -> torch.Tensor:
    """Denoise the ``GENERATE`` frames of one window ``frames [B, T, C, H, W]`` (float32, [-1, 1]).

    History frames (``CONTEXT`` / ``GENERATED_CONTEXT``) are taken from ``frames`` and returned as
    given; ``PAD`` frames stay noise; the values of ``GENERATE`` frames in ``frames`` are ignored (their
    initial noise is the first draw from ``generator``, of the whole window's shape). ``cond``: per-frame
    ``intrinsics`` / ``extrinsics`` / ``actions`` [B, T, ...]. ``guidance`` defaults to
    ``sampler.guidance``. The model should be in eval mode (see :func:`generate`).
    """
    sampler = (sampler or SamplerConfig()).validate()
    guidance = (guidance or sampler.guidance).validate()
    b, t_len = frames.shape[:2]
    kinds = _kinds_tensor(kinds, t_len)
    cond = _check_cond(cond, b, t_len)
    device = frames.device
    gen = kinds == GENERATE
    n_gen = int(gen.sum())
    x = _randn(frames.shape, generator, device)
    hist = ((kinds == CONTEXT) | (kinds == GENERATED_CONTEXT)).to(device)[None, :, None, None, None]
    clean = frames.float()
    x = torch.where(hist, clean, x)
    if n_gen == 0:
        return x
    schedule = scheduling_matrix(sampler.steps, n_gen, sampler.schedule, sampler.shift)
    rows = torch.zeros(schedule.shape[0], t_len, dtype=torch.float64)
    rows[:, gen] = schedule
    rows[:, kinds == PAD] = 1.0
    rows = rows.float()
    for r in range(rows.shape[0] - 1):
        t_now, t_next = rows[r], rows[r + 1]
        v = guided_velocity(model, x, t_now, kinds, clean, cond, guidance, generator, sampler.autocast,
                            sampler.max_batch)
        noise = _randn(x.shape, generator, device) if sampler.eta > 0 else None
        x = flow_step(x, v, t_now.to(device).expand(b, t_len), t_next.to(device).expand(b, t_len),
                      sampler.method, sampler.eta, noise)
        if pbar is not None:
            pbar.update(1)
    return torch.where(hist, clean, x)


# --------------------------------------------------------------------------------------- long videos
@dataclass(frozen=True)
class Window:
    """One autoregressive window: frames ``[start, start + history)`` are history, the next ``new`` are generated."""

    start: int
    history: int
    new: int


def sliding_windows(context: int, length: int, window: int, history: int) -> list[Window]:
    """The windows :func:`predict_sequence` runs to extend ``context`` frames to ``length`` (DFoT's loop)."""
    if not 0 <= context <= length:
        raise ValueError(f"need 0 <= context ({context}) <= length ({length})")
    if not 1 <= history < window:
        raise ValueError(f"need 1 <= history ({history}) < window ({window})")
    plan, cur = [], context
    while cur < length:
        c = min(history, cur)
        h = min(length - cur, window - c)
        plan.append(Window(cur - c, c, h))
        cur += h
    return plan


def interpolation_plan(known: torch.Tensor | Sequence[bool], window: int) -> list[list[torch.Tensor]]:
    """DFoT's frame-interpolation plan: rounds of chunks (sorted frame indices, ``<= window`` each).

    Between adjacent known frames l < r: if ``r - l >= window - 1`` the chunk is ``window`` frames evenly
    spaced from l to r; otherwise consecutive gaps are merged into chunks ``l..r`` while they fit in
    ``window`` frames. The chunk's end frames (and any known frame inside) are its history. Rounds repeat
    until every frame is known. The first and last frames must be known.
    """
    mask = torch.as_tensor(known, dtype=torch.bool).clone().cpu()
    if mask.ndim != 1 or not (bool(mask[0]) and bool(mask[-1])):
        raise ValueError("interpolation needs a 1-D known mask whose first and last frames are known")
    if window < 3:
        raise ValueError(f"interpolation needs window >= 3, got {window}")
    rounds = []
    while not bool(mask.all()):
        keys = torch.nonzero(mask).flatten().tolist()
        chunks, current = [], None
        for left, right in zip(keys[:-1], keys[1:]):
            if current is not None:
                if len(current) + right - left <= window:
                    current = torch.cat([current, torch.arange(left + 1, right + 1)])
                    continue
                chunks.append(current)
                current = None
            if right - left == 1:
                continue
            if right - left >= window - 1:
                chunks.append(torch.linspace(left, right, window).round().long())
            else:
                current = torch.arange(left, right + 1)
        if current is not None:
            chunks.append(current)
        for chunk in chunks:
            mask[chunk] = True
        rounds.append(chunks)
    return rounds


def keyframe_indices(length: int, density: float, context: int) -> torch.Tensor:
    """DFoT's keyframes: ``round(linspace(0, length - 1, round(density * length)))`` plus the context frames."""
    count = max(2, round(density * length))
    keys = torch.linspace(0, length - 1, count).round().long()
    return torch.cat([torch.arange(context), keys]).unique()


def _padded(index: torch.Tensor, kinds: torch.Tensor, window: int, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Window frame indices and kinds padded to ``window`` with PAD frames (index of the last frame)."""
    extra = window - index.numel() if pad else 0
    if extra <= 0:
        return index, kinds
    return (torch.cat([index, index[-1:].expand(extra)]),
            torch.cat([kinds, torch.full((extra,), PAD, dtype=torch.long)]))


def predict_sequence(model: Model, context: torch.Tensor, length: int, cond: dict[str, torch.Tensor] | None = None,
                     sampler: SamplerConfig | None = None, guidance: Guidance | None = None,
                     generator: torch.Generator | None = None, pbar: tqdm | None = None,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
    """Extend ``context [B, k, C, H, W]`` to ``length`` frames with sliding windows (see :func:`sliding_windows`).

    ``cond``: per-frame conditioning for all ``length`` frames. Generated history is marked
    ``GENERATED_CONTEXT``. ``reference [B, length, ...]``: teacher forcing, every window's history is
    taken from it (as ground truth) instead of from the generated frames.
    """
    sampler = (sampler or SamplerConfig()).validate()
    b, k = context.shape[:2]
    cond = _check_cond(cond, b, length)
    if reference is not None and reference.shape[:2] != (b, length):
        raise ValueError(f"reference must be [B={b}, length={length}, ...], got {tuple(reference.shape)}")
    video = torch.zeros(b, length, *context.shape[2:], device=context.device, dtype=torch.float32)
    video[:, :k] = context.float()
    for win in sliding_windows(k, length, sampler.window, sampler.history_frames):
        index = torch.arange(win.start, win.start + win.history + win.new)
        generated = max(0, win.start + win.history - max(win.start, k))  # generated frames among the history
        kinds = torch.tensor([CONTEXT] * (win.history - generated) + [GENERATED_CONTEXT] * generated
                             + [GENERATE] * win.new)
        if reference is not None:
            kinds[:win.history] = CONTEXT
        index, kinds = _padded(index, kinds, sampler.window, sampler.pad_windows)
        source = reference.float() if reference is not None else video
        frames = source[:, index.to(source.device)].to(context.device)
        out = sample_window(model, frames, kinds, _take(cond, index), sampler, guidance, generator, pbar)
        new = slice(win.start + win.history, win.start + win.history + win.new)
        video[:, new] = out[:, win.history:win.history + win.new]
    return video


def _interpolation_rounds(known: torch.Tensor, generated: torch.Tensor, window: int, pad: bool
                          ) -> Iterator[list[tuple[torch.Tensor, list[torch.Tensor]]]]:
    """Per round of :func:`interpolation_plan`: ``(kinds, [window frame indices])`` groups of chunks that
    share one kinds pattern (sampled as one batch). Updates ``known`` / ``generated`` after each round."""
    for chunks in interpolation_plan(known, window):
        groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for chunk in chunks:
            kinds = torch.where(known[chunk], torch.where(generated[chunk], GENERATED_CONTEXT, CONTEXT), GENERATE)
            index, kinds = _padded(chunk, kinds, window, pad)
            groups[tuple(kinds.tolist())].append(index)
        yield [(torch.tensor(kinds), indices) for kinds, indices in groups.items()]
        for chunk in chunks:
            generated[chunk[~known[chunk]]] = True
            known[chunk] = True


def interpolate(model: Model, video: torch.Tensor, known: torch.Tensor | Sequence[bool],
                cond: dict[str, torch.Tensor] | None = None, sampler: SamplerConfig | None = None,
                guidance: Guidance | None = None, generator: torch.Generator | None = None,
                pbar: tqdm | None = None, generated: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
    """Fill the unknown frames of ``video [B, N, C, H, W]`` between known ones (:func:`interpolation_plan`).

    ``generated [N]`` marks known frames that were themselves generated (history kind 2); frames filled
    in one round are generated history in the next. Chunks of a round with the same kinds pattern are
    sampled as one batch. ``guidance`` defaults to ``sampler.interpolation_guidance``. Returns a new tensor.
    """
    sampler = (sampler or SamplerConfig()).validate()
    guidance = guidance or sampler.interpolation_guidance
    b, n = video.shape[:2]
    cond = _check_cond(cond, b, n)
    known = torch.as_tensor(known, dtype=torch.bool).cpu().clone()
    gen_mask = (torch.zeros(n, dtype=torch.bool) if generated is None
                else torch.as_tensor(generated, dtype=torch.bool).cpu().clone())
    if known.shape != (n,) or gen_mask.shape != (n,):
        raise ValueError(f"known and generated must be [N={n}] masks, got {tuple(known.shape)}, {tuple(gen_mask.shape)}")
    out = video.float().clone()
    for groups in _interpolation_rounds(known, gen_mask, sampler.window, sampler.pad_windows):
        for kinds, indices in groups:
            frames = torch.cat([out[:, idx.to(out.device)] for idx in indices])
            chunk_cond = {k: torch.cat([v[:, idx.to(v.device)] for idx in indices]) for k, v in cond.items()}
            result = sample_window(model, frames, kinds, chunk_cond, sampler, guidance, generator, pbar)
            fill = kinds == GENERATE
            for j, idx in enumerate(indices):
                out[:, idx[fill].to(out.device)] = result[j * b:(j + 1) * b][:, fill.to(out.device)]
    return out


def _rows_per_window(sampler: SamplerConfig, new_frames: int) -> int:
    return sampler.steps + (new_frames - 1 if sampler.schedule == "pyramid" else 0)


def count_model_steps(context: int, length: int, sampler: SamplerConfig) -> int:
    """Sampling steps (progress-bar units: one guided model call each) :func:`generate` will run."""
    sampler.validate()
    history = sampler.history_frames
    if sampler.keyframe_density is None or sampler.keyframe_density >= 1:
        return sum(_rows_per_window(sampler, w.new) for w in sliding_windows(context, length, sampler.window, history))
    keys = keyframe_indices(length, sampler.keyframe_density, context)
    total = sum(_rows_per_window(sampler, w.new) for w in sliding_windows(context, len(keys), sampler.window, history))
    known = torch.zeros(length, dtype=torch.bool)
    known[keys] = True
    generated = known & (torch.arange(length) >= context)
    for groups in _interpolation_rounds(known, generated, sampler.window, sampler.pad_windows):
        total += sum(_rows_per_window(sampler, int((kinds == GENERATE).sum())) for kinds, _ in groups)
    return total


@torch.no_grad()
def generate(model: Model, context: torch.Tensor, length: int, cond: dict[str, torch.Tensor] | None = None,
             sampler: SamplerConfig | None = None, generator: torch.Generator | None = None,
             reference: torch.Tensor | None = None, desc: str = "sampling") -> torch.Tensor:
    """A video ``[B, length, C, H, W]`` (float32, [-1, 1]) continuing ``context [B, k, C, H, W]``.

    Autoregressive sliding windows, or keyframes then interpolation when ``sampler.keyframe_density < 1``
    (prediction with ``sampler.guidance``, interpolation with ``sampler.interpolation_guidance``).
    ``cond``: per-frame conditioning [B, length, ...]. ``reference``: teacher-forced history (no
    keyframes). The first k frames of the result are the context.
    """
    sampler = (sampler or SamplerConfig()).validate()
    b, k = context.shape[:2]
    if not 0 < k < length:
        raise ValueError(f"need 0 < context frames ({k}) < length ({length})")
    cond = _check_cond(cond, b, length)
    device = _device_of(model, context)
    context = context.to(device)
    cond = {key: v.to(device) for key, v in cond.items()}
    keyframes = sampler.keyframe_density is not None and sampler.keyframe_density < 1 and reference is None
    total = count_model_steps(k, length, sampler if keyframes else replace(sampler, keyframe_density=None))
    with eval_mode(model), tqdm(total=total, desc=desc, unit="step", disable=not sampler.progress,
                                leave=False) as pbar:
        if not keyframes:
            ref = reference.to(device) if reference is not None else None
            return predict_sequence(model, context, length, cond, sampler, sampler.guidance, generator, pbar, ref)
        keys = keyframe_indices(length, sampler.keyframe_density, k)
        key_video = predict_sequence(model, context, len(keys), _take(cond, keys), sampler, sampler.guidance,
                                     generator, pbar)
        video = torch.zeros(b, length, *context.shape[2:], device=device)
        video[:, keys.to(device)] = key_video
        known = torch.zeros(length, dtype=torch.bool)
        known[keys] = True
        generated = known & (torch.arange(length) >= k)
        return interpolate(model, video, known, cond, sampler, sampler.interpolation_guidance, generator, pbar,
                           generated)


@torch.no_grad()
def sample_clip(model: Model, shape: Sequence[int], steps: int, cond: dict | None = None,
                generator: torch.Generator | None = None, context: torch.Tensor | None = None,
                device: torch.device | str | None = None, method: str = "euler") -> torch.Tensor:
    """One window of ``shape = (B, T, C, H, W)`` with the first ``k`` frames fixed to ``context [B, k, ...]``.

    Signature-compatible with ``engine.objectives.flow_matching.euler_sample`` (conditional Euler over
    ``linspace(1, 0, steps + 1)``, noise drawn on ``generator``'s device), so that function can call it.
    """
    b, frames = shape[:2]
    k = 0 if context is None else context.shape[1]
    if context is not None and (context.shape[0] != b or tuple(context.shape[2:]) != tuple(shape[2:]) or k >= frames):
        raise ValueError(f"context must be [B, k < T, C, H, W] matching shape {tuple(shape)}, got {tuple(context.shape)}")
    if device is None:
        device = context.device if context is not None else _device_of(model, torch.empty(0))
    device = torch.device(device)
    frames_in = torch.zeros(tuple(shape), device=device)
    if k:
        frames_in[:, :k] = context.to(device).float()
    kinds = [CONTEXT] * k + [GENERATE] * (frames - k)
    sampler = SamplerConfig(method=method, steps=steps, window=max(frames, 2), autocast="none", progress=False)
    cond = {key: v.to(device) for key, v in (cond or {}).items() if v is not None}
    drop = cond.pop("drop_cond", None)
    call = model if drop is None else (lambda x, t, **kw: model(x, t, drop_cond=drop, **kw))
    with eval_mode(model):
        return sample_window(call, frames_in, kinds, cond, sampler, Guidance(), generator)

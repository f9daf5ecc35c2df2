"""Long videos: sliding windows, keyframes then interpolation, and :func:`generate` (see
:mod:`engine.sampling`)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from geoforge.engine.sampling.common import check_cond, device_of, eval_mode, take_frames
from geoforge.engine.sampling.config import CONTEXT, GENERATE, GENERATED_CONTEXT, PAD, Guidance, Model, SamplerConfig
from geoforge.engine.sampling.window import sample_window


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
    sampler = sampler or SamplerConfig()
    sampler.validate()
    b, k = context.shape[:2]
    cond = check_cond(cond, b, length)
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
        out = sample_window(model, frames, kinds, take_frames(cond, index), sampler, guidance, generator, pbar)
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
    sampler = sampler or SamplerConfig()
    sampler.validate()
    guidance = guidance or sampler.interpolation_guidance
    b, n = video.shape[:2]
    cond = check_cond(cond, b, n)
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
    sampler = sampler or SamplerConfig()
    sampler.validate()
    b, k = context.shape[:2]
    if not 0 < k < length:
        raise ValueError(f"need 0 < context frames ({k}) < length ({length})")
    cond = check_cond(cond, b, length)
    device = device_of(model, context)
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
        key_video = predict_sequence(model, context, len(keys), take_frames(cond, keys), sampler, sampler.guidance,
                                     generator, pbar)
        video = torch.zeros(b, length, *context.shape[2:], device=device)
        video[:, keys.to(device)] = key_video
        known = torch.zeros(length, dtype=torch.bool)
        known[keys] = True
        generated = known & (torch.arange(length) >= k)
        return interpolate(model, video, known, cond, sampler, sampler.interpolation_guidance, generator, pbar,
                           generated)

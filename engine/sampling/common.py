"""Helpers shared by the samplers: reproducible noise, autocast, eval mode, condition checks."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from geoforge.engine.precision import autocast
from geoforge.engine.sampling.config import COND_KEYS, FRAME_KINDS, Model


Generators = torch.Generator | Sequence[torch.Generator] | None   # one, one per batch row, or the global RNG


def randn_on(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), moved to ``device``.

    ``generator`` may be a sequence with one generator per row of ``shape[0]``: row i is then drawn from the
    i-th generator alone, as a batch of one would draw it, so that a sample of a batch is the sample its
    generator gives alone (batched sampling of independently seeded videos, e.g. VideoGPA's candidates)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"randn_on: {len(generator)} generators for a batch of {shape[0]} rows")
        return torch.cat([randn_on((1, *shape[1:]), g, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)


def autocast_for(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """``SamplerConfig.autocast``: ``auto`` = the process precision's (``engine.precision``), or as named."""
    if mode == "auto":
        return autocast(device)
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


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


def check_cond(cond: dict | None, batch: int, frames: int) -> dict[str, torch.Tensor]:
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise ValueError(f"cond: unknown keys {sorted(unknown)}; allowed {COND_KEYS} (drop_cond is set by the "
                         f"guidance)")
    for key, value in cond.items():
        if value.shape[:2] != (batch, frames):
            raise ValueError(f"cond[{key!r}] must be per frame [B={batch}, T={frames}, ...], got {tuple(value.shape)}")
    return cond


def take_frames(cond: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[:, index.to(v.device)] for k, v in cond.items()}


def kinds_tensor(kinds: Sequence[int] | torch.Tensor, frames: int) -> torch.Tensor:
    kinds = torch.as_tensor(kinds, dtype=torch.long).cpu()
    if kinds.shape != (frames,):
        raise ValueError(f"kinds must be [T={frames}] (one kind per frame, shared by the batch), got "
                         f"{tuple(kinds.shape)}")
    if not bool(torch.isin(kinds, torch.tensor(FRAME_KINDS)).all()):
        raise ValueError(f"kinds must be in {FRAME_KINDS} (generate, context, generated context, pad)")
    return kinds


def device_of(model: Model, fallback: torch.Tensor) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return fallback.device

"""What a sampler is asked to do: frame kinds, methods, schedules, the guidance and the sampler config
(see :mod:`engine.sampling`)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from geoforge.engine.schema import ConfigError

GENERATE, CONTEXT, GENERATED_CONTEXT, PAD = 0, 1, 2, 3
FRAME_KINDS = (GENERATE, CONTEXT, GENERATED_CONTEXT, PAD)
METHODS = ("euler", "ddim")
SCHEDULES = ("full_sequence", "pyramid")
HISTORY_GUIDANCE = ("conditional", "vanilla", "fractional", "temporal")
GUIDANCE_NAMES = HISTORY_GUIDANCE + tuple(f"stabilized_{h}" for h in HISTORY_GUIDANCE)
AUTOCAST = ("auto", "bf16", "fp16", "none")
COND_KEYS = ("intrinsics", "extrinsics", "actions", "poses16")   # poses16: DFoT's raw RE10K poses (U-ViT3D)

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

    def validate(self) -> None:
        """Raise ConfigError naming the field of an invalid setting (``engine.schema``'s contract)."""
        if self.history not in HISTORY_GUIDANCE:
            raise ConfigError(f"guidance.history must be one of {HISTORY_GUIDANCE}, got {self.history!r}")
        if not 0.0 <= self.stabilization < 1.0:
            raise ConfigError(f"guidance.stabilization must be in [0, 1), got {self.stabilization}")
        for name in ("scale", "cond_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"guidance.{name} must be finite, got {getattr(self, name)}")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"guidance.fraction must be in (0, 1), got {self.fraction}")
        if self.history == "temporal":
            if len(self.subsets) < 1:
                raise ConfigError("guidance.subsets: temporal guidance needs at least one subset of history frames")
            if len(self.subset_weights) != len(self.subsets):
                raise ConfigError(f"guidance.subset_weights must have one weight per subset ({len(self.subsets)}), "
                                  f"got {len(self.subset_weights)}")
            for i, (subset, weight) in enumerate(zip(self.subsets, self.subset_weights)):
                if len(subset) == 0 or not all(isinstance(j, int) and not isinstance(j, bool) for j in subset):
                    raise ConfigError(f"guidance.subsets[{i}] must be a non-empty list of int frame positions, "
                                      f"got {subset!r}")
                if not math.isfinite(weight):
                    raise ConfigError(f"guidance.subset_weights[{i}] must be finite, got {weight}")

    @classmethod
    def named(cls, name: str, scale: float = 1.0, stabilization: float = 0.0, cond_scale: float = 1.0,
              guide_cond: bool = True, fraction: float = 0.5, subsets: Sequence[Sequence[int]] = (),
              subset_weights: Sequence[float] = ()) -> Guidance:
        """DFoT's scheme names (:data:`GUIDANCE_NAMES`): a history mode, optionally ``stabilized_``."""
        if name not in GUIDANCE_NAMES:
            raise ValueError(f"guidance name must be one of {GUIDANCE_NAMES}, got {name!r}")
        stabilized = name.startswith("stabilized_")
        history = name.removeprefix("stabilized_")
        guidance = cls(history=history, scale=scale if history in ("vanilla", "fractional") else 1.0,
                       stabilization=stabilization if stabilized else 0.0, cond_scale=cond_scale,
                       guide_cond=guide_cond, fraction=fraction, subsets=subsets if history == "temporal" else (),
                       subset_weights=subset_weights if history == "temporal" else ())
        guidance.validate()
        return guidance

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


def check_times(times: Sequence[float], steps: int) -> None:
    """Raise ValueError unless ``times`` is a flow-time grid of ``steps + 1`` values falling from 1 to 0."""
    if len(times) != steps + 1:
        raise ConfigError(f"sampler.times must have steps + 1 = {steps + 1} values, got {len(times)}")
    if times[0] != 1.0 or times[-1] != 0.0 or any(a <= b for a, b in zip(times[:-1], times[1:])):
        raise ConfigError("sampler.times must fall strictly from 1.0 to 0.0")


@dataclass
class SamplerConfig:
    """How :func:`generate` samples (module docstring)."""

    method: str = "euler"  # "euler" | "ddim"
    steps: int = 50
    eta: float = 0.0  # DDIM stochasticity (0: deterministic, equal to Euler)
    shift: float = 1.0  # time-grid shift (> 1 spends more steps near noise)
    times: tuple[float, ...] | None = None  # explicit flow-time grid 1 -> 0 (steps + 1 values); overrides shift
    schedule: str = "full_sequence"  # "full_sequence" | "pyramid"
    window: int = 16  # frames per model call (the trained clip length)
    sliding_context: int | None = None  # history frames kept when sliding; None: window // 2
    pad_windows: bool = True  # pad short windows to ``window`` frames with PAD frames
    keyframe_density: float | None = None  # < 1: keyframes first, then interpolation
    guidance: Guidance = field(default_factory=Guidance)
    interpolation_guidance: Guidance = field(default_factory=Guidance)
    autocast: str = "auto"  # "auto" (the process precision: engine.precision) | "bf16" | "fp16" | "none"
    max_batch: int | None = None  # cap on videos x guidance branches per model call
    progress: bool = True

    def validate(self) -> None:
        """Raise ConfigError naming the field of an invalid setting (``engine.schema``'s contract)."""
        if self.method not in METHODS:
            raise ConfigError(f"sampler.method must be one of {METHODS}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"sampler.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"sampler.autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.steps < 1:
            raise ConfigError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ConfigError(f"sampler.eta must be >= 0, got {self.eta}")
        if self.method == "euler" and self.eta != 0:
            raise ConfigError("sampler.eta > 0 needs method='ddim' (Euler is deterministic)")
        if self.shift <= 0:
            raise ConfigError(f"sampler.shift must be > 0, got {self.shift}")
        if self.times is not None:
            check_times(self.times, self.steps)
        if self.window < 2:
            raise ConfigError(f"sampler.window must be >= 2, got {self.window}")
        if self.sliding_context is not None and not 1 <= self.sliding_context < self.window:
            raise ConfigError(f"sampler.sliding_context must be in [1, window={self.window}), "
                              f"got {self.sliding_context}")
        if self.keyframe_density is not None and not 0 < self.keyframe_density <= 1:
            raise ConfigError(f"sampler.keyframe_density must be in (0, 1], got {self.keyframe_density}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"sampler.max_batch must be >= 1, got {self.max_batch}")
        self.guidance.validate()
        self.interpolation_guidance.validate()

    @property
    def history_frames(self) -> int:
        return self.sliding_context if self.sliding_context is not None else self.window // 2

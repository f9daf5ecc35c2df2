"""The policy interface of VideoGPA: one conditioning input (:class:`Condition`) and what every policy
implements (:class:`VideoPolicy`), plus the recorded candidate seeds and the uint8 video layout.

Both implementations import this module: ``engine.videogpa.policy`` (GeoForge's own DiT, and
``build_policy``, which picks an implementation) and ``engine.videogpa.diffusers_policy`` (the diffusers
base models), so neither imports the other's module for the interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from geoforge.engine.objectives.dpo import per_sample_error
from geoforge.engine.schema import ConfigError


@dataclass
class Condition:
    """One conditioning input: a first frame, optionally a camera path and a prompt.

    ``first_frame [3, H, W]`` float in [0, 1]; ``intrinsics [T, 3, 3]`` (pixels of the output video,
    pixel centres at integers) and ``extrinsics [T, 3, 4]`` (camera-from-world) for camera-conditioned
    policies; ``prompt_embeds [L, D]`` / ``negative_embeds`` for text-conditioned ones (filled by
    :meth:`VideoPolicy.prepare_condition`).
    """

    key: str
    first_frame: Tensor
    intrinsics: Tensor | None = None
    extrinsics: Tensor | None = None
    prompt: str = ""
    prompt_embeds: Tensor | None = None
    negative_embeds: Tensor | None = None

    _TENSORS = ("first_frame", "intrinsics", "extrinsics", "prompt_embeds", "negative_embeds")

    def tensors(self) -> dict[str, Tensor]:
        """The tensors (contiguous, CPU) for a safetensors file."""
        return {k: getattr(self, k).detach().contiguous().cpu() for k in self._TENSORS if getattr(self, k) is not None}

    @classmethod
    def from_tensors(cls, key: str, tensors: dict[str, Tensor], prompt: str = "") -> Condition:
        unknown = set(tensors) - set(cls._TENSORS)
        if unknown or "first_frame" not in tensors:
            raise ValueError(f"condition {key}: expected tensors {cls._TENSORS} (first_frame required), got {sorted(tensors)}")
        return cls(key=key, prompt=prompt, **tensors)


class VideoPolicy(ABC):
    """Interface of a policy; see the module docstring. Subclasses set the attributes below."""

    kind: str
    network: nn.Module            # the denoiser that DPO trains (the LoRA target)
    frames: int                   # output video geometry
    height: int
    width: int
    default_lora_targets: str | list[str]   # peft target_modules of attention q/k/v/out
    device: torch.device
    # a LoRA adapter loaded from a file (videogpa.policy.adapter): engine.videogpa.adapters.LoadedAdapter
    adapter = None

    def prepare_condition(self, cond: Condition) -> Condition:
        """Fill what the policy derives from an input once (e.g. prompt embeddings). Default: unchanged."""
        return cond

    def drop_text_encoder(self) -> None:
        """Free modules only generation needs (default: none)."""

    def enable_activation_checkpointing(self) -> None:
        """Recompute the network's activations in backward (``distributed.activation_checkpointing``)."""
        raise NotImplementedError(f"{type(self).__name__}: no activation checkpointing")

    def sequence_parallel_split(self) -> tuple[int, str, int, str]:
        """What ``distributed.sequence_parallel`` splits in training forwards: (attention heads, the key they
        come from, video tokens of a training clip, the keys they come from)."""
        raise NotImplementedError(f"{type(self).__name__}: no sequence parallelism")

    def enable_sequence_parallel(self) -> None:
        """Make the network's training forwards sequence-parallel while a group is installed
        (``engine.models.sequence_parallel.set_sequence_parallel``). Default: the network does it itself."""

    @abstractmethod
    def batch_condition(self, conds: list[Condition]) -> dict[str, Tensor]:
        """Stack a batch of conditions into the tensors :meth:`predict` takes (on ``self.device``)."""

    @abstractmethod
    def encode(self, frames: Tensor) -> Tensor:
        """Videos ``[B, T, 3, H, W]`` in [0, 1] -> clean samples ``x0`` in the network's space (no grad)."""

    @abstractmethod
    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """Noise and timesteps for clean samples of ``shape`` (CPU tensors, drawn from ``generator``)."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """The noisy input ``x_t``."""

    @abstractmethod
    def target(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """What the network's output is compared with."""

    @abstractmethod
    def predict(self, network: nn.Module, x_t: Tensor, noise: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        """The network's output for ``x_t`` (same layout as :meth:`target`)."""

    def loss_mask(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor | None:
        """``[B, F]`` frames that count in the error (None: all)."""
        return None

    def per_sample_error(self, network: nn.Module, x0: Tensor, cond: dict[str, Tensor],
                         noise: dict[str, Tensor]) -> Tensor:
        """``e [B]``: mean squared error of ``network``'s prediction against the target (float32)."""
        noise = {k: v.to(self.device) for k, v in noise.items()}
        x_t = self.add_noise(x0, noise)
        pred = self.predict(network, x_t, noise, cond)
        return per_sample_error(pred, self.target(x0, noise), self.loss_mask(x0, noise))

    @abstractmethod
    def sample(self, cond: Condition, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """``len(seeds)`` videos for one input, uint8 ``[K, T, H, W, 3]``; video k depends only on
        ``(cond, seeds[k], steps, guidance)`` and the weights."""


def check_sequence_parallel(policy: VideoPolicy, n: int) -> None:
    """Raise ConfigError naming the keys unless ``n`` ranks split the policy's heads and clip tokens evenly."""
    if n == 1:
        return
    heads, heads_key, tokens, tokens_key = policy.sequence_parallel_split()
    key = f"distributed.sequence_parallel: {n}"
    if heads % n:
        raise ConfigError(f"{key} does not divide the {heads} attention heads of the {policy.kind} policy "
                          f"({heads_key}; Ulysses splits the heads)")
    if tokens % n:
        raise ConfigError(f"{key} does not divide the {tokens} video tokens of a training clip of the {policy.kind} "
                          f"policy ({tokens_key})")


def seed_for(base: int, input_index: int, candidate: int) -> int:
    """The recorded seed of candidate ``candidate`` of input ``input_index`` (63-bit, deterministic)."""
    return (base * 1_000_003 * 1_000_033 + input_index * 1_000_033 + candidate * 7919 + 1) % (2**63 - 1)


def to_uint8(frames: Tensor) -> np.ndarray:
    """``[K, T, 3, H, W]`` in [0, 1] -> uint8 ``[K, T, H, W, 3]``."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


__all__ = ["Condition", "VideoPolicy", "check_sequence_parallel", "seed_for", "to_uint8"]

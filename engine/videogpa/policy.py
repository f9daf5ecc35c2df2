"""The video generator being aligned ("policy"), behind one interface.

A policy says how to noise a clean sample, what the network's target is, how the network predicts, and
how to sample K candidate videos with recorded seeds. DPO (``engine.videogpa.train_dpo``) only uses

    x0 = policy.encode(frames)                       # clean sample in the model's space (no grad)
    noise = policy.draw_noise(x0.shape, generator)   # shared by the winner and the loser
    err = policy.per_sample_error(network, x0, cond, noise)   # [B], mean over (F, C, H, W)

where ``network`` is the trained module (``policy.network``, possibly wrapped by peft) or the reference.

Implementations: :class:`DiTPolicy` (GeoForge's own video DiT, flow matching, image-to-video with the
first frame as a clean context frame, camera-conditioned) here, and the diffusers base models of the
paper (CogVideoX-I2V, Wan2.2-TI2V) in ``engine.videogpa.diffusers_policy`` (optional extra).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from engine.objectives.dpo import per_sample_error
from engine.objectives.flow_matching import FlowMatchingConfig, add_noise, euler_sample, sample_t, velocity_target

log = logging.getLogger("geoforge.videogpa")


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

    def prepare_condition(self, cond: Condition) -> Condition:
        """Fill what the policy derives from an input once (e.g. prompt embeddings). Default: unchanged."""
        return cond

    def drop_text_encoder(self) -> None:
        """Free modules only generation needs (default: none)."""

    def enable_activation_checkpointing(self) -> None:
        """Recompute the network's activations in backward (``distributed.activation_checkpointing``)."""
        raise NotImplementedError(f"{type(self).__name__}: no activation checkpointing")

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


def seed_for(base: int, input_index: int, candidate: int) -> int:
    """The recorded seed of candidate ``candidate`` of input ``input_index`` (63-bit, deterministic)."""
    return (base * 1_000_003 * 1_000_033 + input_index * 1_000_033 + candidate * 7919 + 1) % (2**63 - 1)


def to_uint8(frames: Tensor) -> np.ndarray:
    """``[K, T, 3, H, W]`` in [0, 1] -> uint8 ``[K, T, H, W, 3]``."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


# --------------------------------------------------------------------------------------------- own DiT
def load_dit_weights(dit: nn.Module, checkpoint: str | Path, use_ema: bool = True) -> str:
    """Load a DiT from ``checkpoint``: a checkpoint directory of ``engine/train.py`` (its ``ema.safetensors``
    when ``use_ema`` and present, else ``model.safetensors``; keys ``dit.*``) or a ``.safetensors`` file
    (keys with or without the ``dit.`` prefix). Strict; returns the file used."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if path.is_dir():
        ema = path / "ema.safetensors"
        path = ema if use_ema and ema.is_file() else path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"videogpa.policy.checkpoint: no weights at {path} (give a checkpoints/step_N "
                                f"directory or a .safetensors file)")
    from engine.checkpoint import verify_file

    verify_file(path)   # against the checkpoint's manifest: names a truncated or damaged file
    state = load_file(str(path))
    if any(k.startswith("dit.") for k in state):
        state = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    own = dit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"videogpa.policy.checkpoint {path} does not fit the recipe's model section: "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}, wrong shapes {shapes[:4]}")
    dit.load_state_dict(state)
    return str(path)


def randomise_zero_init(dit: nn.Module, std: float) -> None:
    """Re-draw the DiT's zero-initialised layers (adaLN modulations, output layer) from N(0, std), in place.

    A freshly initialised DiT outputs 0 and its attention branches are gated by 0, so a random policy
    would produce pure noise and give LoRA adapters no gradient; this makes a random policy whose every
    layer matters (CPU smoke tests). Draws from the global RNG.
    """
    layers = [blk.ada for blk in dit.blocks] + [dit.final.ada, dit.final.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, std)
            layer.bias.normal_(0.0, std)


class DiTPolicy(VideoPolicy):
    """GeoForge's video DiT as an image-to-video policy.

    Pixels in [-1, 1]; flow matching ``x_t = (1 - t) x0 + t eps``, target ``eps - x0`` (velocity). Frame 0
    is the conditioning image, kept clean (t = 0) and excluded from the error; the other frames get the
    recipe's ``objective`` timestep sampling (per frame or per clip, shift, logit-normal). With
    ``model.camera`` set, the input's camera path conditions every frame. Sampling: Euler from t = 1 with
    the first frame as clean context; ``guidance > 1`` mixes camera-conditioned and camera-dropped
    velocities (classifier-free guidance, for models trained with ``cond_dropout``).
    """

    kind = "dit"
    default_lora_targets = r".*blocks\.\d+\.(qkv|proj)"   # fused q/k/v and the attention output

    def __init__(self, dit: nn.Module, objective: FlowMatchingConfig, frames: int, resolution: int,
                 device: torch.device | str = "cpu"):
        cfg = dit.cfg
        if cfg.action_dim:
            raise ValueError("videogpa: DiT policies with actions (model.action_dim > 0) are not supported")
        if frames % cfg.temporal_patch_size or frames < 2:
            raise ValueError(f"videogpa: frames={frames} must be >= 2 and divisible by model.temporal_patch_size")
        self.network = dit
        self.objective = replace(objective, context_frames=1, random_context=False).validate()
        self.frames, self.height, self.width = frames, resolution, resolution
        self.device = torch.device(device)
        self.camera = cfg.camera != "none"

    def enable_activation_checkpointing(self) -> None:
        self.network.cfg.activation_checkpointing = True

    def batch_condition(self, conds: list[Condition]) -> dict[str, Tensor]:
        out = {"first_frame": torch.stack([c.first_frame for c in conds]).to(self.device)}
        if self.camera:
            for name in ("intrinsics", "extrinsics"):
                values = [getattr(c, name) for c in conds]
                if any(v is None for v in values):
                    raise ValueError(f"videogpa: the DiT policy is camera-conditioned (model.camera="
                                     f"{self.network.cfg.camera!r}) but an input has no {name}")
                out[name] = torch.stack(values).to(self.device, torch.float32)
        return out

    def encode(self, frames: Tensor) -> Tensor:
        return frames.to(self.device, torch.float32) * 2 - 1

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        b, frames = shape[:2]
        t = sample_t(b, frames, self.objective, generator)
        t[:, 0] = 0.0
        return {"t": t, "eps": torch.randn(tuple(shape), generator=generator)}

    def add_noise(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return add_noise(x0, noise["t"], noise["eps"])

    def target(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return velocity_target(x0, noise["eps"])

    def _kwargs(self, cond: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
        if not self.camera:
            return {}
        reps = batch // cond["intrinsics"].shape[0]
        return {"intrinsics": cond["intrinsics"].repeat(reps, 1, 1, 1),
                "extrinsics": cond["extrinsics"].repeat(reps, 1, 1, 1),
                "drop_cond": torch.zeros(batch, dtype=torch.bool, device=self.device)}

    def predict(self, network: nn.Module, x_t: Tensor, noise: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        first = cond["first_frame"].to(x_t.dtype) * 2 - 1
        reps = x_t.shape[0] // first.shape[0]
        x_t = torch.cat([first.repeat(reps, 1, 1, 1)[:, None], x_t[:, 1:]], dim=1)   # the clean context frame
        return network(x_t, noise["t"], **self._kwargs(cond, x_t.shape[0]))

    def loss_mask(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        mask = torch.ones(x0.shape[:2], dtype=torch.bool, device=x0.device)
        mask[:, 0] = False
        return mask

    @torch.no_grad()
    def sample(self, cond: Condition, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        batch = self.batch_condition([cond])
        network = self.network
        was_training = network.training
        network.eval()

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if guidance == 1.0 or not self.camera:
                return network(x, t, **self._kwargs(batch, x.shape[0]))
            kwargs = self._kwargs(batch, 2 * x.shape[0])
            kwargs["drop_cond"][x.shape[0]:] = True   # second half: camera dropped
            cond_v, uncond_v = network(torch.cat([x, x]), torch.cat([t, t]), **kwargs).chunk(2)
            return uncond_v + guidance * (cond_v - uncond_v)

        videos = []
        context = (batch["first_frame"] * 2 - 1)[:, None]
        try:
            for seed in seeds:
                g = torch.Generator(device=self.device).manual_seed(seed)
                x = euler_sample(velocity, (1, self.frames, 3, self.height, self.width), steps,
                                 generator=g, context=context, device=self.device)
                videos.append((x + 1) / 2)
        finally:
            network.train(was_training)
        return to_uint8(torch.cat(videos))


def build_dit_policy(recipe, device: torch.device | str = "cpu") -> DiTPolicy:
    """The own-DiT policy of a recipe: ``model`` architecture, weights from ``videogpa.policy.checkpoint``
    (or random from the recipe seed), video geometry from ``videogpa.generate`` or ``data``."""
    from engine.models.dit import VideoDiT

    gen = recipe.videogpa.generate
    frames = gen.frames or recipe.data.frames
    size = gen.height or recipe.data.resolution
    if (gen.width or size) != size:
        raise ValueError(f"videogpa.generate: the DiT policy makes square videos, got {gen.height}x{gen.width}")
    torch.manual_seed(recipe.seed)
    dit = VideoDiT(recipe.model)
    pol = recipe.videogpa.policy
    if pol.checkpoint:
        used = load_dit_weights(dit, pol.checkpoint, pol.use_ema)
        log.info(f"videogpa: DiT policy weights from {used}")
    else:
        if pol.random_init_std > 0:
            randomise_zero_init(dit, pol.random_init_std)
        log.info(f"videogpa: DiT policy with random weights (videogpa.policy.checkpoint is empty; "
                 f"random_init_std {pol.random_init_std})")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pol.dtype]
    return DiTPolicy(dit.to(device=device, dtype=dtype), recipe.objective, frames, size, device)


def build_policy(recipe, device: torch.device | str = "cpu") -> VideoPolicy:
    """The policy named by ``videogpa.policy.kind``."""
    kind = recipe.videogpa.policy.kind
    if kind == "dit":
        return build_dit_policy(recipe, device)
    from engine.videogpa.diffusers_policy import build_diffusers_policy

    return build_diffusers_policy(recipe, device)


__all__ = ["Condition", "VideoPolicy", "DiTPolicy", "build_policy", "build_dit_policy", "load_dit_weights",
           "randomise_zero_init", "seed_for", "to_uint8"]

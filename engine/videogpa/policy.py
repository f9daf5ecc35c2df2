"""The video generator being aligned ("policy"), behind one interface.

A policy says how to noise a clean sample, what the network's target is, how the network predicts, and
how to sample K candidate videos with recorded seeds. DPO (``engine.videogpa.train_dpo``) only uses

    x0 = policy.encode(frames)                       # clean sample in the model's space (no grad)
    noise = policy.draw_noise(x0.shape, generator)   # shared by the winner and the loser
    err = policy.per_sample_error(network, x0, cond, noise)   # [B], mean over (F, C, H, W)

where ``network`` is the trained module (``policy.network``, possibly wrapped by peft) or the reference.

Implementations: :class:`DiTPolicy` (GeoForge's own video DiT, flow matching, image-to-video with the
first frame as a clean context frame, camera-conditioned) here, and the diffusers base models of the
paper (CogVideoX-I2V, Wan2.2-TI2V) in ``engine.videogpa.diffusers_policy`` (optional extra). The
interface (:class:`Condition`, :class:`VideoPolicy`) lives in ``engine.videogpa.policy_base``, which both
import; it is re-exported here.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from geoforge.engine import pixels
from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig, add_noise, sample_t, velocity_target
from geoforge.engine.objectives.prediction import velocity_from_output
from geoforge.engine.sampling import sample_clip
from geoforge.engine.videogpa.policy_base import Condition, VideoPolicy, seed_for, to_uint8

log = logging.getLogger("geoforge.videogpa")


# --------------------------------------------------------------------------------------------- own DiT
def load_dit_weights(dit: nn.Module, checkpoint: str | Path, use_ema: bool = True) -> str:
    """Load a DiT from ``checkpoint``: a checkpoint directory of ``engine/train.py`` (its ``ema.safetensors``
    when ``use_ema`` and present, else ``model.safetensors``; keys ``dit.*``) or a ``.safetensors`` file
    (keys with or without the ``dit.`` prefix). Strict; returns the file used."""
    from geoforge.engine.weights import load_into, read_state_dict, strip_prefix

    path = Path(checkpoint)
    if path.is_dir():
        ema = path / "ema.safetensors"
        path = ema if use_ema and ema.is_file() else path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"videogpa.policy.checkpoint: no weights at {path} (give a checkpoints/step_N "
                                f"directory or a .safetensors file)")
    load_into(dit, strip_prefix(read_state_dict(path), "dit."), source=f"videogpa.policy.checkpoint {path}",
              what="the recipe's model section")
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

    Pixels in [-1, 1]; flow matching ``x_t = (1 - t) x0 + t eps``, target ``eps - x0`` (velocity); the
    network's output is read as ``objective.prediction`` (velocity or the clean clip, x0) and turned into
    the velocity (``engine.objectives.prediction``) for the DPO errors and for sampling. Frame 0
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
        self.objective = replace(objective, context_frames=1, random_context=False)
        self.objective.validate()
        self.frames, self.height, self.width = frames, resolution, resolution
        self.device = torch.device(device)
        self.camera = cfg.camera != "none"

    def enable_activation_checkpointing(self) -> None:
        enable_activation_checkpointing(self.network.blocks)

    def sequence_parallel_split(self) -> tuple[int, str, int, str]:
        cfg = self.network.cfg
        p = cfg.patch_size
        tokens = (self.frames // cfg.temporal_patch_size) * (self.height // p) * (self.width // p)
        return (cfg.num_heads, "model.num_heads", tokens,
                "videogpa.generate.frames / height or data.frames / resolution, model.patch_size")

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
        return pixels.to_signed(frames.to(self.device, torch.float32))

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
        first = pixels.to_signed(cond["first_frame"].to(x_t.dtype))
        reps = x_t.shape[0] // first.shape[0]
        x_t = torch.cat([first.repeat(reps, 1, 1, 1)[:, None], x_t[:, 1:]], dim=1)   # the clean context frame
        return self._velocity(network(x_t, noise["t"], **self._kwargs(cond, x_t.shape[0])), x_t, noise["t"])

    def _velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return velocity_from_output(out, x_t, t, self.objective.prediction, self.objective.x0_t_clamp)

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
                return self._velocity(network(x, t, **self._kwargs(batch, x.shape[0])), x, t)
            kwargs = self._kwargs(batch, 2 * x.shape[0])
            kwargs["drop_cond"][x.shape[0]:] = True   # second half: camera dropped
            xx, tt = torch.cat([x, x]), torch.cat([t, t])
            cond_v, uncond_v = self._velocity(network(xx, tt, **kwargs), xx, tt).chunk(2)
            return uncond_v + guidance * (cond_v - uncond_v)

        k = len(seeds)   # the K candidates in one batch, each from its own seed's generator (as alone)
        context = pixels.to_signed(batch["first_frame"])[:, None].expand(k, -1, -1, -1, -1)
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        try:
            x = sample_clip(velocity, (k, self.frames, 3, self.height, self.width), steps,
                            generator=generators, context=context, device=self.device)
        finally:
            network.train(was_training)
        return to_uint8(pixels.to_unit(x))   # to_uint8 clamps to [0, 1] anyway


def build_dit_policy(recipe, device: torch.device | str = "cpu") -> DiTPolicy:
    """The own-DiT policy of a recipe: ``model`` architecture, weights from ``videogpa.policy.checkpoint``
    (or random from the recipe seed), video geometry from ``videogpa.generate`` or ``data``."""
    from geoforge.engine.models.dit import VideoDiT

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
    """The policy named by ``videogpa.policy.kind``, with the LoRA adapter of ``videogpa.policy.adapter``
    loaded onto its network when one is given (:mod:`engine.videogpa.adapters`)."""
    pol = recipe.videogpa.policy
    if pol.kind == "dit":
        policy = build_dit_policy(recipe, device)
    else:
        from geoforge.engine.videogpa.diffusers_policy import build_diffusers_policy

        policy = build_diffusers_policy(recipe, device)
    if pol.adapter:
        from geoforge.engine.videogpa.adapters import load_policy_adapter

        load_policy_adapter(policy, pol.adapter, pol.adapter_scale, pol.adapter_alpha)
    return policy


__all__ = ["Condition", "VideoPolicy", "DiTPolicy", "build_policy", "build_dit_policy", "load_dit_weights",
           "randomise_zero_init", "seed_for", "to_uint8"]

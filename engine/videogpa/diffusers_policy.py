"""The paper's base models as policies, through diffusers (optional extra: ``pip install diffusers``).

Both keep samples in the layout ``[B, F, C, h, w]`` (latent frames first), like the own DiT.

:class:`CogVideoXI2VPolicy` (``THUDM/CogVideoX-5B-I2V``): VAE latents × ``scaling_factor``; DDPM timesteps
``t ~ U{0..999}`` (one per sample); ``x_t = scheduler.add_noise(x0, ε, t)``; v-prediction target
``scheduler.get_velocity(x0, ε, t)``; image-to-video by concatenating the first frame's latent (zero-padded
over the later latent frames) to ``x_t`` on the channel axis; 3D RoPE as the diffusers pipeline builds it.
Sampling: diffusers' ``CogVideoXImageToVideoPipeline`` (its scheduler, CFG, seeds per candidate).

:class:`WanTI2VPolicy` (Wan2.2-TI2V-5B, diffusers layout, e.g. ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``):
latents normalised by the VAE's ``latents_mean``/``latents_std``; flow matching ``x_t = (1 − σ) x0 + σ ε``,
target ``ε − x0``, ``σ = shift·s / (1 + (shift − 1)·s)`` with ``s = t / 1000``, ``t ~ U{0..999}``, shift 5;
image-to-video as in Wan2.2 TI2V: the first latent frame is the clean image latent with timestep 0 on its
tokens (``expand_timesteps``), and it is left out of the error. Sampling: ``WanImageToVideoPipeline``.

Prompts are embedded once per input by the pipeline's T5 encoder (``policy.text_encoder: true``); without
a text encoder the prompt embedding is zeros (unconditional; tests with tiny random configs).
Real checkpoints load by hub id or local directory (``from_pretrained``); tiny random models come from
``policy.tiny_config = {transformer: {...}, vae: {...}, scheduler: {...}}`` (``from_config``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from geoforge.engine import pixels
from geoforge.engine.precision import autocast
from geoforge.engine.videogpa.policy_base import Condition, VideoPolicy, to_uint8

log = logging.getLogger("geoforge.videogpa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def require_diffusers():
    """Import diffusers or fail with the install hint."""
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the CogVideoX / Wan policies need diffusers: pip install diffusers "
                          "(the own DiT policy, videogpa.policy.kind: dit, does not)") from err
    return diffusers


class _DiffusersPolicy(VideoPolicy):
    """Shared parts: prompt embedding, pipeline sampling, dtype/device handling."""

    pipeline_class_name: str
    default_lora_targets = ATTENTION_TARGETS

    def __init__(self, pipe, frames: int, height: int, width: int, device, max_text_tokens: int,
                 negative_prompt: str):
        self.pipe = pipe.to(device)
        self.network = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False).eval()
        if getattr(pipe, "text_encoder", None) is not None:
            pipe.text_encoder.requires_grad_(False).eval()
        self.scheduler = pipe.scheduler
        self.frames, self.height, self.width = frames, height, width
        self.device = torch.device(device)
        self.max_text_tokens, self.negative_prompt = max_text_tokens, negative_prompt
        self._warned = False

    def drop_text_encoder(self) -> None:
        """Free the T5 encoder once every prompt is embedded (the train stage reads stored embeddings)."""
        if getattr(self.pipe, "text_encoder", None) is not None:
            self.pipe.text_encoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def enable_activation_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing()

    def enable_sequence_parallel(self) -> None:
        from geoforge.engine.videogpa.diffusers_sp import install

        install(self.network, self.kind)

    def _latent_grid(self) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) of a clip."""
        return ((self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1,
                self.height // self.pipe.vae_scale_factor_spatial, self.width // self.pipe.vae_scale_factor_spatial)

    def sequence_parallel_split(self) -> tuple[int, str, int, str]:
        cfg = self.network.config
        f, h, w = self._latent_grid()
        pt, ph, pw = self._patch()
        tokens = -(-f // pt) * (h // ph) * (w // pw)
        return (cfg.num_attention_heads, "num_attention_heads of the transformer of videogpa.policy.checkpoint / "
                "tiny_config", tokens, "videogpa.generate.frames / height / width")

    def _patch(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def diffusers_pipeline_class(self) -> type:
        return type(self.pipe)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def _text_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def prepare_condition(self, cond: Condition) -> Condition:
        if cond.prompt_embeds is not None:
            return cond
        if getattr(self.pipe, "text_encoder", None) is None:
            if cond.prompt and not self._warned:
                log.warning("videogpa: the policy has no text encoder (policy.text_encoder: false); prompts are "
                            "replaced by a zero embedding")
                self._warned = True
            zeros = torch.zeros(self._text_shape())
            cond.prompt_embeds, cond.negative_embeds = zeros, zeros.clone()
            return cond
        with torch.no_grad():
            pos, neg = self.pipe.encode_prompt(prompt=cond.prompt, negative_prompt=self.negative_prompt,
                                               do_classifier_free_guidance=True, num_videos_per_prompt=1,
                                               max_sequence_length=self.max_text_tokens, device=self.device)
        cond.prompt_embeds, cond.negative_embeds = pos[0].float().cpu(), neg[0].float().cpu()
        return cond

    def _prompts(self, conds: list[Condition]) -> Tensor:
        missing = [c.key for c in conds if c.prompt_embeds is None]
        if missing:
            raise ValueError(f"videogpa: inputs {missing[:3]} have no prompt embedding (prepare_condition first)")
        return torch.stack([c.prompt_embeds for c in conds]).to(self.device, self.dtype)

    def _encode_video(self, video: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1] -> VAE posterior mode ``[B, C, F, h, w]`` (float32)."""
        with torch.no_grad():
            return self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist.mode().float()

    @torch.no_grad()
    def sample(self, cond: Condition, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        cond = self.prepare_condition(cond)
        videos = []
        for seed in seeds:
            g = torch.Generator(device=self.device).manual_seed(seed)
            with autocast(self.device):   # the process precision (engine/precision.py)
                    out = self.pipe(image=cond.first_frame[None].to(self.device),
                                prompt_embeds=cond.prompt_embeds[None].to(self.device, self.dtype),
                                negative_prompt_embeds=cond.negative_embeds[None].to(self.device, self.dtype),
                                height=self.height, width=self.width, num_frames=self.frames,
                                num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt",
                                **self._sample_kwargs())
            videos.append(out.frames.float().cpu())
        return to_uint8(torch.cat(videos))

    def _sample_kwargs(self) -> dict[str, Any]:
        return {}


class CogVideoXI2VPolicy(_DiffusersPolicy):
    """CogVideoX image-to-video (v-prediction, DDPM timesteps, image latent concatenated on channels)."""

    kind = "cogvideox_i2v"

    def __init__(self, pipe, frames: int, height: int, width: int, device="cpu", max_text_tokens: int = 226,
                 negative_prompt: str = ""):
        super().__init__(pipe, frames, height, width, device, max_text_tokens, negative_prompt)
        if (frames - 1) % pipe.vae_scale_factor_temporal:
            raise ValueError(f"videogpa.generate.frames: CogVideoX makes 4k + 1 frames, got {frames}")
        cfg = pipe.transformer.config
        if cfg.in_channels != 2 * pipe.vae.config.latent_channels:
            raise ValueError(f"CogVideoX-I2V: transformer in_channels ({cfg.in_channels}) must be 2 x the VAE's "
                             f"latent_channels ({pipe.vae.config.latent_channels}): noisy + image latents")

    def _text_shape(self) -> tuple[int, int]:
        cfg = self.network.config
        return (min(self.max_text_tokens, cfg.max_text_seq_length), cfg.text_embed_dim)

    def _patch(self) -> tuple[int, int, int]:
        cfg = self.network.config
        return (cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size)

    def _sample_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self._text_shape()[0]}

    def _image_latents(self, first_frames: Tensor, latent_frames: int) -> Tensor:
        """The pipeline's image conditioning: ``[B, F, C, h, w]`` (first latent frame, zeros after)."""
        cfg, vae_cfg = self.network.config, self.vae.config
        lat = self._encode_video(pixels.to_signed(first_frames[:, :, None])).permute(0, 2, 1, 3, 4)   # [B, 1, C, h, w]
        factor = self.pipe.vae_scaling_factor_image
        lat = lat / factor if vae_cfg.invert_scale_latents else lat * factor
        pad = lat.new_zeros(lat.shape[0], latent_frames - 1, *lat.shape[2:])
        lat = torch.cat([lat, pad], dim=1)
        if cfg.patch_size_t is not None:   # CogVideoX1.5: the pipeline prepends first frames to fill a patch
            lat = torch.cat([lat[:, : lat.shape[1] % cfg.patch_size_t], lat], dim=1)
        return lat

    def batch_condition(self, conds: list[Condition]) -> dict[str, Tensor]:
        first = torch.stack([c.first_frame for c in conds]).to(self.device)
        latent_frames = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        out = {"prompt_embeds": self._prompts(conds), "image_latents": self._image_latents(first, latent_frames)}
        return out

    def encode(self, frames: Tensor) -> Tensor:
        lat = self._encode_video(pixels.to_signed(frames.to(self.device)).permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        return lat * self.vae.config.scaling_factor

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (shape[0],), generator=generator)
        return {"t": t, "eps": torch.randn(tuple(shape), generator=generator)}

    def add_noise(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return self.scheduler.add_noise(x0, noise["eps"].to(x0.dtype), noise["t"])

    def target(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return self.scheduler.get_velocity(x0, noise["eps"].to(x0.dtype), noise["t"])

    def predict(self, network: nn.Module, x_t: Tensor, noise: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        reps = x_t.shape[0] // cond["image_latents"].shape[0]
        image = cond["image_latents"].repeat(reps, 1, 1, 1, 1)
        if image.shape[1] != x_t.shape[1]:   # CogVideoX1.5 padding frames
            x_t = torch.cat([x_t[:, : image.shape[1] - x_t.shape[1]], x_t], dim=1)
        inp = torch.cat([x_t, image], dim=2).to(self.dtype)
        cfg = self.network.config
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = self.pipe._prepare_rotary_positional_embeddings(self.height, self.width, inp.shape[1], self.device)
        ofs = None if cfg.ofs_embed_dim is None else inp.new_full((inp.shape[0],), 2.0)
        out = network(hidden_states=inp, encoder_hidden_states=cond["prompt_embeds"].repeat(reps, 1, 1),
                      timestep=noise["t"], image_rotary_emb=rope, ofs=ofs, return_dict=False)[0]
        return out[:, -noise["eps"].shape[1]:].float()


class WanTI2VPolicy(_DiffusersPolicy):
    """Wan2.2 TI2V (flow matching, shift 5; first latent frame = clean image latent with timestep 0)."""

    kind = "wan_ti2v"

    def __init__(self, pipe, frames: int, height: int, width: int, device="cpu", max_text_tokens: int = 512,
                 negative_prompt: str = "", shift: float = 5.0):
        super().__init__(pipe, frames, height, width, device, max_text_tokens, negative_prompt)
        if (frames - 1) % pipe.vae_scale_factor_temporal:
            raise ValueError(f"videogpa.generate.frames: Wan makes 4k + 1 frames, got {frames}")
        if not pipe.config.expand_timesteps:
            raise ValueError("WanTI2VPolicy needs a WanImageToVideoPipeline with expand_timesteps=True (Wan2.2 TI2V)")
        self.shift = shift
        vae_cfg = self.vae.config
        self.mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32).view(1, 1, -1, 1, 1).to(self.device)
        self.inv_std = 1.0 / torch.tensor(vae_cfg.latents_std, dtype=torch.float32).view(1, 1, -1, 1, 1).to(self.device)

    def _text_shape(self) -> tuple[int, int]:
        return (self.max_text_tokens, self.network.config.text_dim)

    def _patch(self) -> tuple[int, int, int]:
        return tuple(self.network.config.patch_size)

    def _sample_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_text_tokens}

    def _latents(self, video: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` in [0, 1] -> normalised latents ``[B, F, C, h, w]``."""
        lat = self._encode_video(pixels.to_signed(video)).permute(0, 2, 1, 3, 4)
        return (lat - self.mean) * self.inv_std

    def batch_condition(self, conds: list[Condition]) -> dict[str, Tensor]:
        first = torch.stack([c.first_frame for c in conds]).to(self.device)
        return {"prompt_embeds": self._prompts(conds), "image_latents": self._latents(first[:, :, None])}

    def encode(self, frames: Tensor) -> Tensor:
        return self._latents(frames.to(self.device).permute(0, 2, 1, 3, 4))

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        s = torch.randint(0, 1000, (shape[0],), generator=generator).float() / 1000.0
        sigma = self.shift * s / (1 + (self.shift - 1) * s)
        return {"sigma": sigma, "eps": torch.randn(tuple(shape), generator=generator)}

    def add_noise(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        sigma = noise["sigma"].to(x0.dtype).view(-1, 1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise["eps"].to(x0.dtype)

    def target(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return noise["eps"].to(x0.dtype) - x0

    def loss_mask(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        mask = torch.ones(x0.shape[:2], dtype=torch.bool, device=x0.device)
        mask[:, 0] = False
        return mask

    def predict(self, network: nn.Module, x_t: Tensor, noise: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        reps = x_t.shape[0] // cond["image_latents"].shape[0]
        x_t = torch.cat([cond["image_latents"].repeat(reps, 1, 1, 1, 1), x_t[:, 1:]], dim=1)
        b, f, _, h, w = x_t.shape
        p = self.network.config.patch_size
        per_frame = torch.ones(f, h // p[1], w // p[2], device=self.device)
        per_frame[0] = 0.0   # the clean image frame has timestep 0 on its tokens
        timestep = per_frame.flatten()[None] * (noise["sigma"].to(self.device) * 1000.0)[:, None]
        out = network(hidden_states=x_t.permute(0, 2, 1, 3, 4).to(self.dtype), timestep=timestep,
                      encoder_hidden_states=cond["prompt_embeds"].repeat(reps, 1, 1), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4).float()


def _from_config(kind: str, tiny: dict[str, Any], dtype: torch.dtype):
    diffusers = require_diffusers()
    unknown = set(tiny) - {"transformer", "vae", "scheduler"}
    if unknown or not {"transformer", "vae"} <= set(tiny):
        raise ValueError(f"videogpa.policy.tiny_config: needs 'transformer' and 'vae' (and optionally 'scheduler') "
                         f"sections, got {sorted(tiny)}")
    if kind == "cogvideox_i2v":
        transformer = diffusers.CogVideoXTransformer3DModel(**tiny["transformer"])
        vae = diffusers.AutoencoderKLCogVideoX(**tiny["vae"])
        scheduler = diffusers.CogVideoXDPMScheduler(**tiny.get("scheduler", {}))
        if dtype != torch.float32:
            vae, transformer = vae.to(dtype), transformer.to(dtype)
        return diffusers.CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                                      transformer=transformer, scheduler=scheduler)
    transformer = diffusers.WanTransformer3DModel(**tiny["transformer"])
    vae = diffusers.AutoencoderKLWan(**tiny["vae"])
    scheduler = diffusers.UniPCMultistepScheduler(**{"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                     "flow_shift": 5.0, **tiny.get("scheduler", {})})
    if dtype != torch.float32:
        transformer = transformer.to(dtype)   # the Wan VAE stays float32, as in diffusers' examples
    return diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None,
                                             image_processor=None, transformer=transformer, vae=vae,
                                             scheduler=scheduler, expand_timesteps=True)


def _from_pretrained(kind: str, source: str, dtype: torch.dtype, text_encoder: bool):
    diffusers = require_diffusers()
    extra = {} if text_encoder else {"text_encoder": None, "tokenizer": None}
    if kind == "cogvideox_i2v":
        return diffusers.CogVideoXImageToVideoPipeline.from_pretrained(source, torch_dtype=dtype, **extra)
    vae = diffusers.AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    return diffusers.WanImageToVideoPipeline.from_pretrained(source, vae=vae, torch_dtype=dtype, **extra)


def build_diffusers_policy(recipe, device: torch.device | str = "cpu") -> VideoPolicy:
    """The CogVideoX-I2V / Wan2.2-TI2V policy of a recipe (``videogpa.policy``, ``videogpa.generate``)."""
    pol, gen = recipe.videogpa.policy, recipe.videogpa.generate
    dtype = DTYPES[pol.dtype]
    if pol.checkpoint:
        pipe = _from_pretrained(pol.kind, pol.checkpoint, dtype, pol.text_encoder)
    else:
        torch.manual_seed(recipe.seed)
        pipe = _from_config(pol.kind, pol.tiny_config, dtype)
    frames, height, width = gen.frames or 49, gen.height or 480, gen.width or 720
    cls = CogVideoXI2VPolicy if pol.kind == "cogvideox_i2v" else WanTI2VPolicy
    return cls(pipe, frames, height, width, device, pol.max_text_tokens, pol.negative_prompt)


__all__ = ["CogVideoXI2VPolicy", "WanTI2VPolicy", "build_diffusers_policy", "require_diffusers"]

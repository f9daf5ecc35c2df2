"""The ``videogpa`` section of a recipe: policy, conditioning inputs and the four stages.

A recipe with a ``videogpa`` section is a VideoGPA post-training run (``engine/train.py`` hands it to
:func:`engine.videogpa.pipeline.run_pipeline`). The other sections keep their meaning where they apply:
``model`` is the own-DiT policy's architecture and ``objective`` its noise-level sampling, ``data`` the
dataset the conditioning inputs come from (``inputs.kind: dataset``), and ``optimizer`` / ``schedule`` /
``distributed`` / ``logging`` drive the DPO ``train`` stage.

Sub-sections (all optional, defaults = the paper's setting where it has one):

- ``policy``   which generator is aligned (own DiT, or diffusers CogVideoX-I2V / Wan2.2-TI2V)
- ``inputs``   where the conditioning inputs (first frame, cameras, prompt) come from
- ``generate`` K candidates per input, sampler steps, guidance, seeds
- ``score``    the 3D-consistency scorer: geometry from VGGT or the true geometry (oracle), T frames, LPIPS, motion
- ``pairs``    winner/loser selection, min gap, min motion, train/val split
- ``lora``     peft LoRA adapters (r 64, α 128 on attention q/k/v/out)
- ``dpo``      β, the reference model, pairs per micro-batch, latent cache
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from geoforge.engine.schema import ConfigError

STAGES = ("generate", "score", "pairs", "train")
POLICY_KINDS = ("dit", "cogvideox_i2v", "wan_ti2v")


@dataclass
class PolicyConfig:
    kind: Literal["dit", "cogvideox_i2v", "wan_ti2v"] = "dit"
    # dit: a checkpoint directory of engine/train.py (checkpoints/step_N) or a model.safetensors file;
    #      "" = the DiT of the ``model`` section, randomly initialised from the recipe seed.
    # diffusers kinds: a hub id (e.g. THUDM/CogVideoX-5B-I2V) or a local diffusers directory;
    #      "" = random weights from ``tiny_config`` (tests).
    checkpoint: str = ""
    use_ema: bool = True                  # dit: load ema.safetensors of a checkpoint directory when present
    # dit without a checkpoint: std of a normal re-draw of the zero-initialised adaLN and output layers
    # (0 keeps the DiT init, whose output is 0 and on which LoRA on attention has no gradient).
    random_init_std: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # weights of the policy (diffusers: bf16)
    tiny_config: dict[str, Any] | None = None   # diffusers: {transformer: {...}, vae: {...}, scheduler: {...}}
    text_encoder: bool = True             # diffusers: load the T5 text encoder to embed prompts
    max_text_tokens: int = 226            # diffusers: prompt length in tokens
    negative_prompt: str = ""             # diffusers: negative prompt of classifier-free guidance
    # A LoRA adapter loaded onto the policy's network (engine/videogpa/adapters.py, docs/videogpa_adapters.md):
    # a peft adapter folder (adapter_model.safetensors [+ adapter_config.json]), its .safetensors file, or
    # hf://OWNER/REPO[@REV][/FOLDER | /FILE.safetensors]. VideoGPA's released adapters (official key names)
    # and GeoForge's own (train stage's final/) both load. It is used for generation and, when the train
    # stage runs with lora.enabled, it is the adapter DPO continues (the reference: the base without it).
    adapter: str = ""
    adapter_scale: float = 1.0            # x the adapter's alpha / r (VideoGPA's Wan2.2 script: --lora_weight 0.2)
    adapter_alpha: float | None = None    # lora_alpha when the adapter has no adapter_config.json

    def validate(self) -> None:
        if self.kind != "dit" and not self.checkpoint and self.tiny_config is None:
            raise ConfigError(f"checkpoint: the {self.kind!r} policy needs a hub id or local path "
                              f"(or policy.tiny_config for random test weights)")
        if not self.adapter_scale > 0:
            raise ConfigError(f"adapter_scale: must be > 0, got {self.adapter_scale}")
        if self.adapter_alpha is not None and not self.adapter_alpha > 0:
            raise ConfigError(f"adapter_alpha: must be > 0, got {self.adapter_alpha}")
        if not self.adapter and (self.adapter_scale != 1.0 or self.adapter_alpha is not None):
            key = "adapter_scale" if self.adapter_scale != 1.0 else "adapter_alpha"
            raise ConfigError(f"{key}: set without adapter (no adapter to scale)")
        if self.random_init_std < 0:
            raise ConfigError(f"random_init_std: must be >= 0, got {self.random_init_std}")
        if self.max_text_tokens < 1:
            raise ConfigError(f"max_text_tokens: must be >= 1, got {self.max_text_tokens}")


@dataclass
class InputsConfig:
    # dataset: clip i of the recipe's ``data`` section gives input i (its first frame and its cameras);
    # images: the images in ``root`` (sorted by name), prompts from ``prompts`` (JSON lines
    #         {"image": file name, "prompt": text}) when given.
    kind: Literal["dataset", "images"] = "dataset"
    root: str = ""
    prompts: str = ""
    count: int = 8                        # conditioning inputs (the first ``count``)

    def validate(self) -> None:
        if self.count < 1:
            raise ConfigError(f"count: must be >= 1, got {self.count}")
        if self.kind == "images" and not self.root:
            raise ConfigError("root: kind 'images' needs the image folder")


@dataclass
class GenerateConfig:
    candidates: int = 4                   # K videos per input
    steps: int = 50                       # sampler steps
    guidance: float = 1.0                 # classifier-free guidance scale (1 = off)
    frames: int = 0                       # frames per video; 0 = data.frames (dit) / 49 (diffusers)
    height: int = 0                       # 0 = data.resolution (dit) / 480 (diffusers)
    width: int = 0                        # 0 = data.resolution (dit) / 720 (diffusers)
    fps: int = 8
    seed: int = 0                         # candidate k of input i uses seed hash(seed, i, k), recorded

    def validate(self) -> None:
        for name in ("candidates", "steps", "fps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.candidates < 2:
            raise ConfigError(f"candidates: a preference pair needs >= 2 candidates, got {self.candidates}")
        if self.guidance < 1.0:
            raise ConfigError(f"guidance: must be >= 1, got {self.guidance}")
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class ScoreConfig:
    # Where each video's geometry (cameras, depth) comes from:
    # vggt:   the teacher VGGT estimates it from the frames (real video; the paper's scorer);
    # oracle: the true depth of the input's dataset clip and the cameras the video was generated along (the
    #         stored condition), for data with known geometry (synthetic scenes; a VGGT with random weights
    #         carries none). Needs inputs.kind 'dataset' and clips with depth; frames are scored at the
    #         clips' own resolution (``resolution``, ``teacher`` and ``teacher_config`` do not apply).
    kind: Literal["vggt", "oracle"] = "vggt"
    teacher: str = "facebook/VGGT-1B"     # VGGT hub id or local path; "random": VGGT.from_config(teacher_config)
    teacher_config: dict[str, Any] | None = None
    frames: int = 10                      # T frames sampled uniformly from each video
    resolution: int = 518                 # vggt: square teacher input (centre crop + resize), multiple of 14
    conf_threshold: float = 0.0           # pixels with depth_conf above it become points
    lpips_weight: float = 1.0             # score = MSE + lpips_weight * LPIPS(VGG)
    lpips_backbone: str = ""              # torchvision VGG16 weights (path or hf://...)
    lpips_lin: str = ""                   # LPIPS v0.1 vgg lin layers (path or hf://...)
    lpips_random: bool = False            # seeded random VGG + non-negative lin layers (CPU smoke tests only)
    rotation_weight: float = 0.1          # motion = mean |Δt| + rotation_weight * mean rotation step (rad)

    def validate(self) -> None:
        if self.kind == "vggt" and self.teacher == "random" and self.teacher_config is None:
            raise ConfigError("teacher_config: teacher 'random' needs a VGGT config")
        if self.frames < 2:
            raise ConfigError(f"frames: must be >= 2, got {self.frames}")
        if self.kind == "vggt" and (self.resolution < 14 or self.resolution % 14):
            raise ConfigError(f"resolution: must be a positive multiple of 14, got {self.resolution}")
        if self.lpips_weight < 0 or self.rotation_weight < 0:
            raise ConfigError("lpips_weight / rotation_weight: must be >= 0")
        if self.lpips_weight > 0 and not self.lpips_random and not (self.lpips_backbone and self.lpips_lin):
            raise ConfigError("lpips_backbone / lpips_lin: LPIPS weights are needed when "
                              "score.lpips_weight > 0 (or set score.lpips_random for smoke tests)")


@dataclass
class PairsConfig:
    min_gap: float = 0.05                 # keep a pair when score(loser) - score(winner) >= min_gap
    min_motion: float = 0.001             # candidates moving less are dropped
    val_fraction: float = 0.02            # share of pairs held out (98/2)
    seed: int = 42                        # of the train/val split

    def validate(self) -> None:
        if self.min_gap < 0 or self.min_motion < 0:
            raise ConfigError("min_gap / min_motion: must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass
class LoraConfig:
    enabled: bool = True                  # false: full fine-tuning (the reference is a frozen copy)
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    targets: list[str] | None = None      # module names (peft suffix match); None = the policy's attention q/k/v/out

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"rank / alpha: must be >= 1 / > 0, got {self.rank} / {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ConfigError("targets: an empty list targets nothing; leave it out for the default")


@dataclass
class DPOConfig:
    beta: float = 1.0
    # adapters_disabled: the reference is the policy with its LoRA adapters switched off (no second copy);
    # frozen_copy: a separate frozen copy of the base weights; auto: the first with LoRA, else the second.
    reference: Literal["auto", "adapters_disabled", "frozen_copy"] = "auto"
    cache_latents: bool = True            # encode the pair videos once into <run>/latents/
    eval_pairs: int = 64                  # train pairs whose implicit accuracy is measured before/after
    eval_draws: int = 2                   # noise draws per pair in that measurement

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.eval_pairs < 0 or self.eval_draws < 1:
            raise ConfigError("eval_pairs / eval_draws: must be >= 0 / >= 1")


@dataclass
class VideoGPAConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))   # run in this order when pending
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"stages: must be a non-empty subset of {list(STAGES)}, got {self.stages}")
        if [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ConfigError(f"stages: must keep the order {list(STAGES)}, got {self.stages}")
        if self.score.kind == "oracle" and self.inputs.kind != "dataset":
            raise ConfigError(f"score.kind: 'oracle' scores with the true geometry of dataset clips; inputs.kind "
                              f"{self.inputs.kind!r} has none (use inputs.kind 'dataset' with clips that have "
                              f"depth, or score.kind 'vggt')")
        if self.dpo.reference == "adapters_disabled" and not self.lora.enabled:
            raise ConfigError("dpo.reference: 'adapters_disabled' needs lora.enabled (a fully fine-tuned "
                              "policy has no adapters to switch off); use 'frozen_copy' or 'auto'")

    def reference_mode(self) -> str:
        """The resolved ``dpo.reference``: ``adapters_disabled`` or ``frozen_copy``."""
        if self.dpo.reference != "auto":
            return self.dpo.reference
        return "adapters_disabled" if self.lora.enabled else "frozen_copy"


__all__ = ["VideoGPAConfig", "PolicyConfig", "InputsConfig", "GenerateConfig", "ScoreConfig", "PairsConfig",
           "LoraConfig", "DPOConfig", "STAGES", "POLICY_KINDS"]

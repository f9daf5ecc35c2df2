"""The recipe: typed, validated configuration of a training run, loaded from YAML.

A recipe is ``recipes/NAME.yaml`` (``--recipe NAME``) or any YAML file (``--recipe path.yaml``), with
``--set a.b=c`` overrides (repeatable; the value is parsed as YAML, then type-checked like the file).
Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` naming the key,
before anything is computed. Sections:

- ``model``        the backbone: ``arch: dit`` (the video DiT, :class:`engine.models.dit.DiTConfig`) or ``uvit3d``
                   (DFoT's U-ViT3D), optional ``pretrained`` weights (:class:`engine.models.arch.ModelConfig`)
- ``dfot``         DFoT's continuous diffusion, the objective of ``arch: uvit3d``
                   (:class:`engine.objectives.dfot_diffusion.DFoTDiffusionConfig`; with it ``objective`` only
                   supplies the per-frame t draw and the context frames)
- ``objective``    flow matching with diffusion forcing (:class:`engine.objectives.flow_matching.FlowMatchingConfig`)
- ``data``         dataset, clip shape, per-rank micro-batch
- ``optimizer``    AdamW and gradient clipping
- ``schedule``     number of steps, warmup, constant or cosine decay
- ``distributed``  ZeRO stage, bf16, gradient accumulation, activation checkpointing
- ``ema``          exponential moving average of the weights
- ``logging``      console / tensorboard / checkpoint / sample cadence
- ``videogpa``     optional: VideoGPA post-training stages (:class:`engine.videogpa.config.VideoGPAConfig`)
- ``gf``           Geometry Forcing alignment (:class:`engine.objectives.geometry_forcing.GFConfig`)
- ``teacher``      GF's frozen teachers: weights, layers, input size, frames, cache (:class:`engine.teacher.spec.TeacherConfig`)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from geoforge.engine.models.arch import ModelConfig
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig
from geoforge.engine.objectives.geometry_forcing import GFConfig, check_gf_recipe
from geoforge.engine.schema import ConfigError, build, to_dict
from geoforge.engine.teacher.spec import TeacherConfig
from geoforge.engine.videogpa.config import VideoGPAConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class DataConfig:
    kind: Literal["synthetic", "re10k", "minecraft"] = "synthetic"
    root: str = "data/synthetic"          # dataset root; the synthetic set is generated here on first use
    split: str = "training"
    frames: int = 8                       # frames per clip
    frame_skip: int = 1                   # stride between sampled source frames
    resolution: int = 64                  # square frames after resize + centre crop
    batch_size: int = 4                   # micro-batch per rank
    num_workers: int = 0                  # DataLoader worker processes per rank
    hflip_prob: float = 0.0
    synthetic_clips: int = 64             # size of the generated synthetic set (kind: synthetic)
    synthetic_frames: int = 16            # frames rendered per synthetic clip
    synthetic_seed: int | None = None     # the scenes of the synthetic set (its held-out split: + 1); null: the run's
                                          # seed. Fixed, one rendered set serves runs of every seed
    decode_backend: Literal["auto", "dali", "torchcodec", "pyav"] = "auto"   # video decoding (engine/data/decode.py)
    on_error: Literal["raise", "skip"] = "raise"   # bad clip: raise naming the file, or skip it (logged once, counted)
    fixed_windows: bool = False           # every epoch draws epoch 0's start frame (and flip) per clip: one teacher-
                                          # cache window per clip serves any run length (less augmentation)
    # Geometry Forcing's / DFoT's RealEstate10K augmentations (engine/data/re10k.py; GF's
    # configurations/dataset_experiment/realestate10k_video_generation.yaml, datasets/video/realestate10k.py):
    reverse_prob: float = 0.0             # play the clip backwards, frames and cameras (GF: 0.5)
    back_and_forth_prob: float = 0.0      # GF's back-and-forth order 0 2 4 ... 5 3 1, frames and cameras (GF: 0.1)
    frame_skip_increase: int = 0          # frame_skip grows by this every sub-epoch, capped per clip by the frames
                                          # left after its start frame (GF: 1)
    subepoch_samples: int = 0             # samples (all ranks) per sub-epoch for frame_skip_increase, counted in
                                          # whole optimizer steps (GF's dataset.subdataset_size: 10000)

    AUGMENTATIONS = ("reverse_prob", "back_and_forth_prob", "frame_skip_increase")

    def validate(self) -> None:
        for name in ("frames", "frame_skip", "resolution", "batch_size", "synthetic_clips", "synthetic_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        for name in ("hflip_prob", "reverse_prob", "back_and_forth_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("frame_skip_increase", "subepoch_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.frame_skip_increase and not self.subepoch_samples:
            raise ConfigError(f"subepoch_samples: frame_skip_increase={self.frame_skip_increase} grows the frame skip "
                              f"every sub-epoch; set its size in samples (GF: 10000)")
        if self.kind == "minecraft" and self.augmented():
            raise ConfigError(f"{self.augmented()[0]}: GF's reverse / back-and-forth / frame-skip growth are "
                              f"RealEstate10K augmentations (data.kind re10k or synthetic); Minecraft clips carry "
                              f"actions and are not augmented")
        if self.kind == "synthetic" and self.synthetic_frames < (self.frames - 1) * self.frame_skip + 1:
            raise ConfigError(f"synthetic_frames: {self.synthetic_frames} frames cannot hold a clip of "
                              f"data.frames={self.frames} with data.frame_skip={self.frame_skip}")

    def augmented(self) -> list[str]:
        """The keys of GF's augmentations that are on (reverse, back-and-forth, frame-skip growth)."""
        return [name for name in self.AUGMENTATIONS if getattr(self, name)]

    def subepoch_steps(self, global_batch: int) -> int:
        """Optimizer steps per sub-epoch: ``ceil(subepoch_samples / global_batch)`` (a sub-epoch ends on a whole step,
        as Lightning's epoch ends on the last, partial accumulation: GF's 10,000 samples at 4 x 5 x 8 = 160 per step
        are 63 steps); 0 without frame-skip growth."""
        if not self.frame_skip_increase:
            return 0
        return -(-self.subepoch_samples // global_batch)

    def scene_seed(self, run_seed: int) -> int:
        """The seed the synthetic set's scenes are rendered from (``synthetic_seed``, else the run's)."""
        return run_seed if self.synthetic_seed is None else self.synthetic_seed


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0                # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: each must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    steps: int = 300                      # optimizer steps
    warmup: int = 0                       # linear warmup steps; may exceed steps (the lr then never peaks, as in GF)
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0             # cosine floor as a fraction of optimizer.lr

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ConfigError(f"warmup: must be >= 0, got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based): ``(step + 1) / warmup``
        during the warm-up, then constant or cosine. A warm-up longer than the run (``warmup > steps``, Geometry
        Forcing's published run: 10k warm-up steps, ~1,500 optimizer steps) is allowed: the rate then rises
        linearly to ``steps / warmup`` of its peak at the last step and the decay never starts."""
        import math

        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def never_peaks(self, lr: float) -> str | None:
        """The warning of a warm-up longer than the run (None otherwise): the peak ``lr`` is never reached."""
        if self.warmup <= self.steps:
            return None
        return (f"the learning rate never reaches its peak: warm-up {self.warmup} > steps {self.steps}, last LR = "
                f"{lr * self.lr_factor(self.steps - 1):.4g} (schedule.warmup; peak optimizer.lr = {lr:g})")


@dataclass
class DistributedConfig:
    MOVED_KEYS = {"bf16": "distributed.precision (auto | bf16 | fp16 | fp32; 'bf16: true' is 'precision: bf16')"}

    zero_stage: int = 0                   # DeepSpeed ZeRO stage 0-3
    # auto: bf16 mixed precision where the device computes bf16 natively (CUDA sm_80+, CPUs with AMX-BF16 or
    # AVX512-BF16), else fp32 (engine/precision.py); bf16 / fp32: as given; fp16: fp16 mixed precision with dynamic
    # loss scaling (DeepSpeed's fp16 mode), CUDA only, as GF / DFoT trained
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_accum: int = 1                   # micro-batches per optimizer step
    activation_checkpointing: bool = False
    compile: bool = False                 # torch.compile each repeated block in place (engine/models/compiled.py)
    sequence_parallel: int = 1            # ranks that split each clip's tokens (DeepSpeed-Ulysses); DP = world / this
    threads: int = 0                      # CPU intra-op threads per rank; 0: OMP_NUM_THREADS, else free cores / local ranks

    def validate(self) -> None:
        if self.sequence_parallel < 1:
            raise ConfigError(f"sequence_parallel: must be >= 1, got {self.sequence_parallel}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0 (0: automatic), got {self.threads}")
        if self.compile and (self.zero_stage == 3 or self.sequence_parallel > 1):
            raise ConfigError(f"compile: not with zero_stage 3 (its parameter hooks) or sequence_parallel > 1 (its "
                              f"all-to-alls): got zero_stage {self.zero_stage}, sequence_parallel "
                              f"{self.sequence_parallel}")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True                   # decay_t = min(decay, (1 + step) / (10 + step)) (engine/ema.py)

    def validate(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay: must be in (0, 1), got {self.decay}")


@dataclass
class LoggingConfig:
    every: int = 10                       # steps between metrics.jsonl / tensorboard rows
    checkpoint_every: int = 100           # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2             # newest complete checkpoints kept; 0 keeps all
    sample_every: int = 0                 # steps between sample videos; 0 = only at the end
    sample_steps: int = 16                # Euler steps of a sample
    max_nonfinite: int = 5                # consecutive non-finite losses that stop the run
    validate_every: int = 0               # steps between validations (PSNR/SSIM of samples, tensorboard); 0 = off
    validate_videos: int = 4              # clips sampled per validation
    report_videos: int = 4                # clips per split in the end-of-run report.md (engine/eval/run_report.py); 0 = none

    def validate(self) -> None:
        for name in ("every", "checkpoint_every", "sample_steps", "max_nonfinite", "validate_videos"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("keep_checkpoints", "sample_every", "validate_every", "report_videos"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class Recipe:
    name: str = "unnamed"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "triton", "cpu", "reference"] = "auto"   # fused kernels
    attention: Literal["auto", "flash_attn", "xformers", "sdpa"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)   # arch dit | uvit3d (engine/models/arch.py)
    objective: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    dfot: DFoTDiffusionConfig = field(default_factory=DFoTDiffusionConfig)   # model.arch uvit3d: DFoT's diffusion
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    gf: GFConfig = field(default_factory=GFConfig)   # Geometry Forcing (engine/objectives/geometry_forcing.py)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)   # GF's frozen teachers (engine/teacher)
    videogpa: VideoGPAConfig | None = None   # VideoGPA post-training (engine/videogpa); None = plain training
    # what a full run needs (GPUs and memory, data layout, weights it downloads): said in the banner and in an
    # error about a missing device or input, beside the toy twin to try instead (toy_twin)
    needs: str = ""

    def validate(self) -> None:
        """Checks that span sections (each section validated its own fields already)."""
        tp = self.model.temporal_patch_size
        if self.data.frames % tp:
            raise ConfigError(f"data.frames: {self.data.frames} is not divisible by "
                              f"model.temporal_patch_size={tp}")
        if self.data.resolution % self.model.patch_size:
            raise ConfigError(f"data.resolution: {self.data.resolution} is not divisible by "
                              f"model.patch_size={self.model.patch_size}")
        if self.objective.context_frames >= self.data.frames:
            raise ConfigError(f"objective.context_frames: {self.objective.context_frames} leaves no frame to "
                              f"denoise in clips of data.frames={self.data.frames}")
        if self.model.arch == "uvit3d":
            u = self.model.uvit3d_config()
            size = u.patch_size * 2 ** (u.num_levels - 1)
            if self.data.resolution % size:
                raise ConfigError(f"data.resolution: {self.data.resolution} is not divisible by the U-ViT3D's "
                                  f"patch_size * 2^(levels - 1) = {size}")
            if self.logging.sample_steps > self.dfot.timesteps:
                raise ConfigError(f"logging.sample_steps: the U-ViT3D samples on DFoT's DDIM grid, at most "
                                  f"dfot.timesteps={self.dfot.timesteps} steps, got {self.logging.sample_steps}")
            if self.distributed.compile:
                raise ConfigError("distributed.compile: the U-ViT3D's blocks are not compiled yet (torch 2.13's "
                                  "inductor emits C++ that does not build for them under CPU bf16: 'conflicting "
                                  "declaration at_BFloat16_tmp_acc0_vec'); compile is for model.arch dit")
            if u.in_channels != 3 or len(self.dfot.data_mean) != u.in_channels:
                raise ConfigError(f"model.uvit3d.in_channels / dfot.data_mean: RGB pixels need 3 channels, got "
                                  f"{u.in_channels} / {len(self.dfot.data_mean)}")
        if self.model.in_channels != 3:
            raise ConfigError(f"model.in_channels: the {self.data.kind} data is RGB pixels (3 channels), "
                              f"got {self.model.in_channels}")
        check_patch_bottleneck(self.model, self.objective)
        if self.data.kind == "minecraft" and self.model.action_dim != 4 * self.data.frame_skip:
            raise ConfigError(f"model.action_dim: Minecraft clips carry 4 one-hot actions per skipped frame, so "
                              f"data.frame_skip={self.data.frame_skip} needs action_dim={4 * self.data.frame_skip}, "
                              f"got {self.model.action_dim}")
        check_gf_recipe(self)
        self._check_augmentations()
        self._check_fp16()
        self._check_sequence_parallel()

    def _check_augmentations(self) -> None:
        """GF's reverse / back-and-forth / frame-skip growth change a sample's frames beyond (start, flip), the key of a
        teacher-cache window: refused with ``teacher.cache``."""
        on = self.data.augmented()
        if on and self.gf.enabled and self.teacher.cache:
            raise ConfigError(f"teacher.cache: a cached window is keyed by (clip, start frame, flip), and data.{on[0]} "
                              f"changes the frames beyond it; drop teacher.cache (the live teacher) or data.{on[0]}")

    def _check_fp16(self) -> None:
        """``distributed.precision: fp16`` runs on CUDA only (``engine.precision``), and GeoForge's fused kernels take
        float32 / bfloat16 only (``kernels.film_norm``: the U-ViT3D's FiLM norms; ``kernels.align``: GF's per-token
        alignment): with them, fp16 needs ``backend: reference`` (plain autograd, whose gradients carry the loss
        scale)."""
        if self.distributed.precision != "fp16":
            return
        if self.device == "cpu":
            raise ConfigError("distributed.precision: fp16 needs a CUDA device (fp16 mixed precision with dynamic loss "
                              "scaling), and device is cpu; use bf16 or auto (--set distributed.precision=auto)")
        fused = [what for what, used in (
            ("the U-ViT3D's FiLM norms (kernels/film_norm.py)", self.model.arch == "uvit3d"),
            ("GF's per-token alignment (kernels/align.py)",
             self.gf.enabled and (self.gf.alignment_form == "per_token" or self.gf.dino is not None))) if used]
        if fused and self.backend != "reference":
            raise ConfigError(f"backend: {self.backend} runs {' and '.join(fused)} on fused kernels, which take float32 "
                              f"/ bfloat16 only; distributed.precision fp16 needs backend: reference "
                              f"(--set backend=reference)")

    def _check_sequence_parallel(self) -> None:
        """distributed.sequence_parallel N: heads and the split tokens divide evenly over N ranks (the world size
        is checked at start-up, :func:`engine.distributed.parallel_layout`). The DiT splits every clip's tokens;
        DFoT's U-ViT3D the tokens of its transformer levels (``engine.models.sequence_parallel``); for VideoGPA
        recipes, those of the policy that the DPO train stage splits."""
        n = self.distributed.sequence_parallel
        if n == 1:
            return
        key = f"distributed.sequence_parallel: {n}"
        if self.videogpa is not None:
            self._check_policy_sequence_parallel(n, key)
            return
        if self.model.arch == "uvit3d":
            sharded_maps = self._check_sequence_parallel_uvit3d(n, key)
        else:
            model = self.model.resolved()
            if model.num_heads % n:
                raise ConfigError(f"{key} does not divide model.num_heads={model.num_heads} (Ulysses splits the heads)")
            grid = self.data.resolution // model.patch_size
            tokens = (self.data.frames // model.temporal_patch_size) * grid * grid
            if tokens % n:
                raise ConfigError(f"{key} does not divide the {tokens} tokens of a clip (data.frames, "
                                  f"data.resolution, model.patch_size)")
            sharded_maps = None   # every block
        if not self.gf.enabled or self.teacher.aligned_frames(self.data.frames) == self.data.frames:
            return
        per_shard = ([self.gf.dit_block] if self.gf.alignment_form == "per_token" else []) + (
            [self.gf.dino.dit_block] if self.gf.dino is not None else [])   # as_released: gathers the whole map
        if per_shard and (sharded_maps is None or any(i in sharded_maps for i in per_shard)):
            raise ConfigError(f"teacher.frames: {self.teacher.frames} aligns part of the clip; with {key} "
                              f"the alignment is computed per token shard and needs every frame (0)")

    def _check_sequence_parallel_uvit3d(self, n: int, key: str) -> set[int]:
        """The U-ViT3D's part of :meth:`_check_sequence_parallel`: heads and each transformer level's tokens
        (``data.frames x (data.resolution / (patch_size 2^level))^2``) split over N ranks. Returns the 1-based
        feature maps computed on token shards (those of the transformer levels)."""
        u = self.model.uvit3d_config()
        levels = [i for i in range(u.num_levels) if u.is_transformer(i)]
        if not levels:
            raise ConfigError(f"{key}: model.uvit3d.block_types has no TransformerBlock level; sequence "
                              f"parallelism splits the tokens of the U-ViT3D's transformer levels (use 1)")
        if u.num_heads % n:
            raise ConfigError(f"{key} does not divide model.uvit3d.num_heads={u.num_heads} (Ulysses splits the heads)")
        for level in levels:
            side = self.data.resolution // (u.patch_size * 2 ** level)
            tokens = self.data.frames * side * side
            if tokens % n:
                raise ConfigError(f"{key} does not divide the {tokens} tokens of the U-ViT3D's transformer level "
                                  f"{level} (data.frames x (data.resolution / (model.uvit3d.patch_size x "
                                  f"2^{level}))^2 = {self.data.frames} x {side}^2)")
        maps, blocks = u.num_feature_maps, [*u.num_updown_blocks, u.num_mid_blocks]
        level_of = {i: i - 1 if i <= u.num_levels else maps - i for i in range(1, maps + 1)}
        return {i for i, level in level_of.items() if u.is_transformer(level) and blocks[level]}

    def _check_policy_sequence_parallel(self, n: int, key: str) -> None:
        """VideoGPA (the DPO train stage): what the recipe fixes of the policy's heads and clip tokens. The own
        DiT's are all in the recipe; a diffusers policy's heads are when ``policy.tiny_config`` gives them,
        and its tokens depend on the VAE: both are checked again on the built policy, before any stage runs
        (``engine.videogpa.policy_base.check_sequence_parallel``)."""
        vg = self.videogpa
        if vg.policy.kind != "dit":
            if not vg.policy.checkpoint and vg.policy.tiny_config:
                heads = (vg.policy.tiny_config.get("transformer") or {}).get("num_attention_heads")
                if isinstance(heads, int) and heads % n:
                    raise ConfigError(f"{key} does not divide videogpa.policy.tiny_config.transformer."
                                      f"num_attention_heads={heads} (Ulysses splits the heads)")
            return
        model = self.model.resolved()
        if model.num_heads % n:
            raise ConfigError(f"{key} does not divide model.num_heads={model.num_heads} (Ulysses splits the heads)")
        gen = vg.generate
        frames, height = gen.frames or self.data.frames, gen.height or self.data.resolution
        width = gen.width or height
        tokens = ((frames // model.temporal_patch_size) * (height // model.patch_size) * (width // model.patch_size))
        if tokens % n:
            raise ConfigError(f"{key} does not divide the {tokens} tokens of a policy clip (videogpa.generate."
                              f"frames / height or data.frames / data.resolution, model.patch_size)")


# A pixel-space model predicting velocity (or noise) must carry a full-dimensional patch of it through its
# width: require hidden_dim >= PATCH_WIDTH_FACTOR x the values per patch (p * p * tp * C). Evidence: JiT
# (Li & He 2025) trains 48-value patches under a 768-d ViT (16x) with every target, while 768-value patches
# under 768-d (1x) fail for noise / velocity; here, 8x8x3 = 192 values failed to generate under widths 128,
# 192 and 256 (0.67-1.33x) while x-prediction trained at 0.67x. 4x keeps DiT-L/8 on 256^2 RE10K (1024 vs
# 192 = 5.3x) and rejects the pixel recipes that produced noise.
PATCH_WIDTH_FACTOR = 4


def check_patch_bottleneck(model: ModelConfig, objective: FlowMatchingConfig) -> None:
    """Refuse a pixel-space velocity-predicting DiT whose width is not >= 4x its patch's values (see above),
    unless ``objective.allow_patch_bottleneck``. Latent models (``model.latent_downsample > 1``) and DFoT's
    U-ViT3D (``model.arch: uvit3d``, convolutional levels around its transformer) pass."""
    if model.arch != "dit":
        return
    cfg = model.resolved()
    values = cfg.patch_size ** 2 * cfg.temporal_patch_size * cfg.in_channels
    if (objective.prediction == "x0" or objective.allow_patch_bottleneck or cfg.latent_downsample > 1
            or cfg.hidden_dim >= PATCH_WIDTH_FACTOR * values):
        return
    raise ConfigError(
        f"model.hidden_dim={cfg.hidden_dim} with model.patch_size={cfg.patch_size} (x temporal "
        f"{cfg.temporal_patch_size} x {cfg.in_channels} channels = {values} pixel values per patch) and "
        f"objective.prediction={objective.prediction!r}: a pixel-space transformer predicting the velocity "
        f"needs hidden_dim >= {PATCH_WIDTH_FACTOR} x {values} = {PATCH_WIDTH_FACTOR * values} to carry a "
        f"full-dimensional patch of it, else its samples are noise; set objective.prediction: x0 "
        f"(x-prediction), widen the model or shrink the patch, or set objective.allow_patch_bottleneck: true")


def find_recipe(name_or_path: str) -> Path:
    """``recipes/NAME.yaml`` for a bare name, else the given path. Errors list what exists."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {name_or_path!r}: no {candidate}; known recipes: {known}")
    return candidate


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)   # YAML 1.1 reads "1e-4" as a string
    return keys, value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _set_nested(data: dict, keys: list[str], value: Any, origin: str) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _fix_yaml_floats(node: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; recipes mean a number."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and any(c in node.lower() for c in "e."):
        return float(node)
    return node


def toy_twin(recipe: Recipe) -> str:
    """The tiny recipe that runs the same method on a CPU in minutes: VideoGPA -> ``videogpa_tiny``, DFoT's U-ViT3D ->
    ``uvit3d_tiny``, Geometry Forcing -> ``gf_tiny``, plain diffusion -> ``dfot_tiny``."""
    if recipe.videogpa is not None:
        return "videogpa_tiny"
    if recipe.model.arch == "uvit3d":
        return "uvit3d_tiny"
    return "gf_tiny" if recipe.gf.enabled else "dfot_tiny"


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe. Raises ConfigError naming the bad key."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of sections")
    data = _fix_yaml_floats(data)
    data.setdefault("name", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        _set_nested(data, keys, value, f"--set {text}")
    try:
        return build(Recipe, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


__all__ = ["ConfigError", "Recipe", "DataConfig", "OptimizerConfig", "ScheduleConfig", "DistributedConfig",
           "EMAConfig", "LoggingConfig", "load_recipe", "find_recipe", "parse_override", "recipe_to_yaml"]

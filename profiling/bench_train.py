"""Training-step benchmark: time, tokens/s and peak memory of a recipe's step, broken into phases.

    python profiling/bench_train.py --recipe gf_tiny                  # one configuration, phase table
    python profiling/bench_train.py --recipe gf_tiny --compare        # baseline vs GF live vs GF cache
    python profiling/bench_train.py --recipe gf_re10k --model --gpus 8 --gpu h100   # FLOPs / memory model
    python profiling/bench_train.py --curves RUN_GF RUN_BASE          # loss curves of two runs -> PNG
    python profiling/bench_train.py --recipe gf_tiny --dump-batch snap.safetensors  # one batch's GF inputs

**What a step is.** The trainer's own step (``engine.trainer.Trainer.train_step`` on the recipe's
``engine.diffusion_task.DiffusionTask``) in one process: DeepSpeed on a single rank with the recipe's ZeRO
stage and precision, fed by the recipe's data loader, i.e. the work of one rank in ``engine/train.py``
without communication. Phases are the trainer's and the task's own ``timer.mark`` points, each timed with
``time.perf_counter`` (CUDA: synchronised at every phase boundary, which serialises the step slightly):

- ``data``: next micro-batch from the loader, copy to the device, per-sample noise;
- ``teacher``: the frozen teacher's features (live VGGT, or rows read from the teacher cache);
- ``dit_fwd``: DiT forward + flow-matching loss (up to the GF head: a forward pre-hook on it);
- ``align``: the GF head's forward. Its fused kernels compute the projector gradients during this
  forward (``kernels/align``), so ``align`` holds almost all of the alignment's cost;
- ``backward``: ``engine.backward`` (DiT backward; the alignment only hands over its gradients);
- ``optimizer``: ``engine.step`` (AdamW, clipping, zero_grad) and the EMA update.

**--compare** builds the recipe three times with the same initial DiT weights - ``baseline``
(``gf.enabled=false``), ``gf-live`` and ``gf-cache`` (a teacher cache of the measured windows, built into
a temporary directory unless ``--cache DIR`` is given) - and runs their steps interleaved (baseline,
live, cache, baseline, ...) so that load from other processes hits all three alike. Reported: the median
(p50) of each phase over the timed steps, and overhead = p50(step) / p50(baseline step) - 1. Peak memory:
CUDA ``max_memory_allocated`` during a step; CPU: the torch profiler's c10 allocator peak of one extra,
untimed step (``profiling/_harness.cpu_peak_bytes``). Rows are appended to ``profiling/results/train.csv``.

**--model** is analytic (no run): FLOPs per optimizer step and GPU, the step time at an assumed model
FLOP utilisation, and the memory per GPU, with every assumption printed (see :func:`flops_model`); then a
table of per-GPU activation memory, all-to-all traffic and step time with sequence parallelism (``--sp``
sizes, :func:`sp_model`; for VideoGPA recipes with a diffusers policy, of the policy's transformer).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.config import Recipe, load_recipe  # noqa: E402

PHASES = ("data", "teacher", "dit_fwd", "align", "backward", "optimizer")
RESULTS = ROOT / "profiling" / "results"
# dense bf16 tensor-core peak (TFLOP/s) and memory (GiB) per GPU kind
GPUS = {"h100": (989.0, 80.0), "h200": (989.0, 141.0), "a100": (312.0, 80.0)}
LINK_GBS = {"h100": 450.0, "h200": 450.0, "a100": 300.0}   # NVLink GB/s per GPU and direction (all-to-all)
# Diffusers policies' transformers (published configs): parameters, width, depth, heads, VAE compression
# (time, space), patch (t, h, w), text tokens joined to the video tokens in self-attention (CogVideoX).
POLICY_ARCH = {
    "cogvideox_i2v": {"params": 5.57e9, "dim": 3072, "depth": 42, "heads": 48, "vae": (4, 8), "patch": (1, 2, 2),
                      "joint_text": 226},
    "wan_ti2v": {"params": 5.0e9, "dim": 3072, "depth": 30, "heads": 24, "vae": (4, 16), "patch": (1, 2, 2),
                 "joint_text": 0},
}


# ----------------------------------------------------------------------------- measured steps
class PhaseTimer:
    """``mark(phase)`` adds the time since the previous mark to ``phase`` (the trainer's timer protocol)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.phases = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class Config:
    """One benchmarked configuration: the trainer of its recipe and the timer wired into it."""

    name: str
    recipe: Recipe
    trainer: Any
    timer: PhaseTimer
    device: torch.device
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in (*PHASES, "step")})
    peak_bytes: int | None = None


def _device(recipe: Recipe) -> torch.device:
    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _world(device: torch.device):
    from engine.distributed import init_world

    return init_world(device.type)   # a single-rank process group (DeepSpeed wants one)


def build_config(name: str, recipe: Recipe, device: torch.device) -> Config:
    """The trainer (same initial weights as engine/train.py) of ``recipe`` with a phase timer."""
    from engine.diffusion_task import DiffusionTask
    from engine.trainer import Trainer

    world = _world(device)
    timer = PhaseTimer(device)
    task = DiffusionTask(recipe, world)
    if task.module.gf is not None:   # end of the DiT forward = start of the GF head's forward
        task.module.gf.register_forward_pre_hook(lambda module, args: timer.mark("dit_fwd"))
    run_dir = Path(tempfile.mkdtemp(prefix=f"geoforge-bench-{name}-"))
    return Config(name, recipe, Trainer(recipe, task, run_dir, world, timer=timer), timer, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(cfg: Config, record: bool = True) -> dict[str, float]:
    """One ``Trainer.train_step`` of ``cfg``; returns (and records) seconds per phase."""
    cfg.timer.start()
    began = time.perf_counter()
    cfg.trainer.train_step()
    cfg.timer.mark("optimizer")   # the EMA update after the last engine.step
    total = time.perf_counter() - began
    raw = cfg.timer.phases
    gf = "dit_fwd" in raw
    phases = {"data": raw.get("data", 0.0), "teacher": raw.get("teacher", 0.0),
              "dit_fwd": raw["dit_fwd"] if gf else raw.get("forward", 0.0),
              "align": raw.get("forward", 0.0) if gf else 0.0,
              "backward": raw.get("backward", 0.0), "optimizer": raw.get("optimizer", 0.0), "step": total}
    if record:
        for k, v in phases.items():
            cfg.times[k].append(v)
    return phases


def measure_peak(cfg: Config) -> None:
    """Peak memory of one untimed step (CUDA allocator peak, or the CPU allocator peak via the profiler)."""
    if cfg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
        run_step(cfg, record=False)
        cfg.peak_bytes = torch.cuda.max_memory_allocated(cfg.device) - base
    else:
        from profiling._harness import cpu_peak_bytes

        cfg.peak_bytes = cpu_peak_bytes(lambda: run_step(cfg, record=False))


def tokens_per_step(recipe: Recipe) -> int:
    m, d = recipe.model.resolved(), recipe.data
    return d.batch_size * (d.frames // m.temporal_patch_size) * (d.resolution // m.patch_size) ** 2


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(cfg: Config, base: Config) -> float:
    """Median over rounds of cfg's step time / the baseline's in the same round (robust to load drift)."""
    return statistics.median(a / b for a, b in zip(cfg.times["step"], base.times["step"]))


def data_wait(cfg: Config) -> float:
    """Median over steps of the ``data`` phase's share of the step: the time the step waits for its batch."""
    return statistics.median(d / s for d, s in zip(cfg.times["data"], cfg.times["step"]))


def report(configs: list[Config], csv_path: Path | None = None) -> str:
    from profiling._harness import MB, device_label, git_commit

    base = configs[0]
    head = ["config", *[f"{p} ms" for p in PHASES], "step ms", "data wait", "tokens/s", "peak MB", "overhead"]
    rows = []
    for c in configs:
        step = _p50(c.times["step"])
        over = "" if c is base else f"{100 * (paired_ratio(c, base) - 1):+.1f}%"
        rows.append([c.name, *[f"{1e3 * _p50(c.times[p]):.1f}" for p in PHASES], f"{1e3 * step:.1f}",
                     f"{100 * data_wait(c):.1f}%",
                     f"{tokens_per_step(c.recipe) / step:.0f}",
                     "-" if c.peak_bytes is None else f"{c.peak_bytes / MB:.1f}", over])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = len(base.times["step"])
    text = (f"device: {device_label(base.device)}   commit: {git_commit()}   torch {torch.__version__}\n"
            f"recipe {base.recipe.name}: micro-batch {base.recipe.data.batch_size}, {tokens_per_step(base.recipe)} DiT "
            f"tokens/step; p50 over {n} timed steps per config (interleaved); overhead = median over rounds of "
            f"step / baseline step of the same round, minus 1; data wait = median of data / step, target < 5% "
            f"(data.num_workers={base.recipe.data.num_workers})\n" + "\n".join(lines))
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        with csv_path.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(("recipe", "config", "phase", "unit", "p50", "p20", "p80", "steps", "device", "commit"))
            for c in configs:
                for p in (*PHASES, "step"):
                    v = sorted(c.times[p])
                    q = (lambda f: 1e3 * v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]) if v else (lambda f: float("nan"))
                    w.writerow((c.recipe.name, c.name, p, "ms", f"{q(.5):.4g}", f"{q(.2):.4g}", f"{q(.8):.4g}", len(v),
                                device_label(c.device), git_commit()))
                wait = f"{100 * data_wait(c):.4g}"
                w.writerow((c.recipe.name, c.name, "data_wait", "%", wait, wait, wait, len(c.times["step"]),
                            device_label(c.device), git_commit()))
                if c.peak_bytes is not None:
                    mb = f"{c.peak_bytes / MB:.4g}"
                    w.writerow((c.recipe.name, c.name, "peak_memory", "MB", mb, mb, mb, 1, device_label(c.device),
                                git_commit()))
    return text


def _cache_for(recipe: Recipe, steps: int, directory: Path) -> Path:
    """A teacher cache holding every window the first ``steps`` micro-batches of ``recipe`` draw."""
    from engine.data.builder import build_dataset
    from engine.teacher.cache import build_cache
    from engine.distributed import World

    n = len(build_dataset(recipe.data, World(0, 0, 1, 1, torch.device("cpu")), recipe.seed))
    epochs = math.ceil(steps / max(1, n // recipe.data.batch_size))
    build_cache(recipe, directory, epochs=epochs, device=str(_device(recipe)), overwrite=True,
                log=lambda s: print(s, flush=True))
    return directory


def compare(recipe_arg: str, overrides: list[str], warmup: int, steps: int, cache: str | None,
            csv_path: Path | None) -> list[Config]:
    """Baseline, GF with the live teacher and GF with the teacher cache, steps interleaved (module docstring)."""
    recipe = load_recipe(recipe_arg, overrides)
    device = _device(recipe)
    names = [("baseline", ["gf.enabled=false", "teacher.cache=null", "gf.dino=null", "teacher.dino=null"])]
    if recipe.gf.enabled:
        names.append(("gf-live", ["teacher.cache=null"]))
    tmp = None
    if recipe.gf.enabled:
        if cache is None:
            tmp = Path(tempfile.mkdtemp(prefix="geoforge-bench-cache-"))
            live = load_recipe(recipe_arg, [*overrides, "teacher.cache=null"])
            cache = str(_cache_for(live, warmup + steps + 2, tmp))
        names.append(("gf-cache", [f"teacher.cache={cache}"]))
    try:
        configs = [build_config(n, load_recipe(recipe_arg, [*overrides, *extra]), device) for n, extra in names]
        for _ in range(warmup):
            for c in configs:
                run_step(c, record=False)
        for i in range(steps):
            for c in configs:
                phases = run_step(c)
                print(f"  step {i + 1}/{steps} {c.name:<9} {1e3 * phases['step']:8.1f} ms", flush=True)
        for c in configs:
            measure_peak(c)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(configs, csv_path))
    if len(configs) > 1:
        ratios = {c.name: paired_ratio(c, configs[0]) for c in configs[1:]}
        targets = {"gf-live": 1.35, "gf-cache": 1.10}
        print("GF overhead over the baseline step: " + ", ".join(
            f"{k} {100 * (v - 1):+.1f}% (target <= {100 * (targets[k] - 1):.0f}%)" for k, v in ratios.items()))
    return configs


# ----------------------------------------------------------------------------- analytic model
def vit_block_flops(dim: float, tokens: float, ctx: float, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2 per multiply-add) of a pre-norm ViT block on ``tokens`` tokens attending to ``ctx``:
    qkv 6D^2 + proj 2D^2 + MLP 4 r D^2 per token, plus q k^T and A v, 4 D ctx per token."""
    return tokens * ((8 + 4 * mlp_ratio) * dim * dim + 4 * dim * ctx)


def teacher_flops(recipe: Recipe) -> dict[str, float]:
    """Forward FLOPs per clip of the VGGT aggregator up to the deepest requested layer, and of DINOv2.

    VGGT-1B sizes unless ``teacher.vggt.config`` says otherwise: DINOv2-L patch embedding (24 blocks, 1024-d)
    on the P + 5 tokens of each frame, then per layer a frame block (context P + 5) and a global block
    (context S (P + 5)), 1024-d. Norms, RoPE and the 14x14 patch convolution are ignored (< 1%)."""
    from engine.models.vggt.config import resolve_config
    from engine.teacher.spec import teacher_size

    gf, t, d = recipe.gf, recipe.teacher, recipe.data
    out = {"vggt": 0.0, "dino": 0.0}
    if not gf.enabled:
        return out
    agg = resolve_config(t.vggt.config)["aggregator"]
    frames = t.aligned_frames(d.frames)
    h, w = teacher_size(d.resolution, d.resolution, t.resolution)
    patches = (h // agg["patch_size"]) * (w // agg["patch_size"])
    special = 1 + agg["num_register_tokens"]
    dim = agg["embed_dim"]
    if agg["patch_embed"] != "conv":
        from engine.models.vggt import DINOV2_VARIANTS

        pd, pdepth, _ = DINOV2_VARIANTS[agg["patch_embed"]]
        out["vggt"] += pdepth * frames * vit_block_flops(pd, patches + special, patches + special)
    layers = max(layer % agg["depth"] for layer in t.layers) + 1
    tokens = frames * (patches + special)
    out["vggt"] += layers * (vit_block_flops(dim, tokens, patches + special) + vit_block_flops(dim, tokens, tokens))
    if t.dino is not None:
        from engine.models.vggt import DINOV2_VARIANTS

        dd, ddepth, _ = DINOV2_VARIANTS[t.dino.variant]
        dh, dw = teacher_size(d.resolution, d.resolution, t.dino.resolution)
        n = (dh // 14) * (dw // 14) + 5
        blocks = t.dino.layer % ddepth + 1
        out["dino"] = blocks * frames * vit_block_flops(dd, n, n)
    return out


def flops_model(recipe: Recipe, gpus: int, gpu: str, mfu: float) -> dict[str, float]:
    """Per-GPU FLOPs, time and memory of one optimizer step. Assumptions (printed by ``--model``):

    - DiT: ``engine.models.dit.flops_per_token`` x tokens; training = 3x forward (4x with activation
      checkpointing: the forward is recomputed); projector + scale head: 2 FLOPs per MAC, 3x forward;
    - teacher: forward only (no_grad), :func:`teacher_flops`; no teacher FLOPs with a teacher cache;
    - time = FLOPs / (peak bf16 dense FLOP/s x ``mfu``); data loading, the optimizer update and ZeRO
      communication are assumed hidden (workers, overlap) - add 5-10% in practice;
    - memory (bytes): bf16 weights 2P and grads 2P, fp32 master + Adam moments 12P / N (ZeRO >= 1; grads
      2P / N at ZeRO >= 2), sharded fp32 EMA 4P / N; activations per clip: with checkpointing the block
      inputs (depth x L x D x 2) + one block's working set (34 L D bytes, flash attention: no L^2 term),
      without depth x 34 L D; teacher: fp32 aggregator weights + a working set of 34 x (tokens x dim) and
      the kept layer outputs (fp32, tokens x 2 dim each) per clip; alignment chunks are negligible.
    """
    from engine.models.dit import flops_per_token, num_params

    d, m, dist = recipe.data, recipe.model.resolved(), recipe.distributed
    micro = d.batch_size * dist.grad_accum
    tokens = (d.frames // m.temporal_patch_size) * (d.resolution // m.patch_size) ** 2  # per clip
    dit_fwd = flops_per_token(recipe.model, d.frames, d.resolution, d.resolution) * tokens
    train_mult = 4 if dist.activation_checkpointing else 3
    p_dit = num_params(recipe.model)
    gf, t = recipe.gf, recipe.teacher
    proj, p_head, teacher = 0.0, 0, {"vggt": 0.0, "dino": 0.0}
    teacher_mem = 0.0
    if gf.enabled:
        from engine.models.vggt.config import resolve_config

        agg = resolve_config(t.vggt.config)["aggregator"]
        c = 2 * agg["embed_dim"]
        aligned = tokens * t.aligned_frames(d.frames) // d.frames
        per_layer = m.hidden_dim * gf.projector_hidden + gf.projector_hidden ** 2 + gf.projector_hidden * c \
            + 2 * c * gf.scale_hidden
        proj = 3 * 2 * aligned * per_layer * len(t.layers)
        p_head = per_layer * len(t.layers)
        if gf.dino is not None:
            from engine.models.vggt import DINOV2_VARIANTS

            cd = DINOV2_VARIANTS[t.dino.variant][0]
            pl = m.hidden_dim * gf.dino.projector_hidden + gf.dino.projector_hidden ** 2 \
                + gf.dino.projector_hidden * cd + 2 * cd * gf.dino.scale_hidden
            proj += 3 * 2 * aligned * pl
            p_head += pl
        if not t.cache:
            teacher = teacher_flops(recipe)
            from engine.teacher.spec import teacher_size

            h, w = teacher_size(d.resolution, d.resolution, t.resolution)
            t_tokens = t.aligned_frames(d.frames) * ((h // 14) * (w // 14) + 5)
            agg_params = 909.1e6 if t.vggt.config is None else 0.0
            dino_params = 86.6e6 if t.dino is not None and t.dino.config is None else 0.0
            teacher_mem = 4 * (agg_params + dino_params) + d.batch_size * (
                34 * t_tokens * agg["embed_dim"] + len(t.layers) * t_tokens * c * 4)
    per_gpu = micro * (train_mult * dit_fwd + proj + teacher["vggt"] + teacher["dino"])
    peak, hbm = GPUS[gpu]
    seconds = per_gpu / (peak * 1e12 * mfu)
    p = p_dit + p_head
    n = max(1, gpus)
    grads = 2 * p / n if dist.zero_stage >= 2 else 2 * p
    states = 12 * p / n if dist.zero_stage >= 1 else 12 * p
    weights = 2 * p / n if dist.zero_stage == 3 else 2 * p
    ema = 4 * p / n if recipe.ema.enabled else 0
    block_io = m.depth * tokens * m.hidden_dim * 2
    acts = d.batch_size * ((block_io + 34 * tokens * m.hidden_dim) if dist.activation_checkpointing
                           else m.depth * 34 * tokens * m.hidden_dim)
    memory = weights + grads + states + ema + acts + teacher_mem
    return {"dit_params": p_dit, "head_params": p_head, "tokens_per_clip": tokens, "dit_tflop": micro * train_mult
            * dit_fwd / 1e12, "align_tflop": micro * proj / 1e12, "teacher_tflop": micro * (teacher["vggt"]
            + teacher["dino"]) / 1e12, "tflop_per_gpu_step": per_gpu / 1e12, "step_s": seconds,
            "memory_gib": memory / 2 ** 30, "hbm_gib": hbm, "acts_gib": acts / 2 ** 30,
            "teacher_gib": teacher_mem / 2 ** 30, "states_gib": (weights + grads + states + ema) / 2 ** 30,
            "global_batch": micro * n}


def sp_model(recipe: Recipe, gpus: int, gpu: str, mfu: float, sp: int) -> dict[str, float]:
    """Per-GPU activation memory, all-to-all traffic and step time of one optimizer step with ``sp``-way
    sequence parallelism (DeepSpeed-Ulysses, ``distributed.sequence_parallel``) at a fixed micro-batch
    per data-parallel group, so the global batch is gpus / sp x micro. Assumptions (printed):

    - a GPU holds L / sp tokens of each clip: the DiT's (or policy transformer's) FLOPs, activations and the
      GF alignment divide by sp (Ulysses attention: full sequence, heads / sp); the GF teacher runs whole
      clips on every rank of a group (not divided), as do weights and optimizer states (ZeRO shards them
      over all gpus, unchanged by sp);
    - all-to-all per block and pass: q, k, v and the attention output, each L / sp x D bf16 elements,
      (sp - 1) / sp of them leave the GPU; passes: forward, backward (2x), recompute with checkpointing;
      time = bytes / NVLink bandwidth (``LINK_GBS``), not overlapped; 1 for sp = 1;
    - VideoGPA DPO (diffusers policy): per pair, policy forward + backward on winner and loser and a reference
      forward on both (adapters off), all on the rank's token slice; bf16 frozen weights 2P (ZeRO-3 shards
      them), LoRA states negligible; activations as for the DiT (34 L D bytes per block working set, block
      inputs kept with checkpointing). CogVideoX's joint text tokens (226) are not split: every rank of a
      group keeps them and runs their per-token layers (only attention divides by sp), the all-to-all moves
      video tokens only and the text attention output is all-gathered over heads; sp must divide the video
      tokens (rows that do not are left out, as the recipe check refuses them).
    """
    dist_cfg = recipe.distributed
    ckpt = dist_cfg.activation_checkpointing
    n = max(1, gpus)
    vg = recipe.videogpa
    if vg is not None and vg.policy.kind in POLICY_ARCH:
        a = POLICY_ARCH[vg.policy.kind]
        g = vg.generate
        (tc, sc), (pt, ph, pw) = a["vae"], a["patch"]
        video = ((g.frames - 1) // tc + 1) // pt * (g.height // sc // ph) * (g.width // sc // pw)
        text = a["joint_text"]
        tokens = video + text
        dim, depth, heads, params = a["dim"], a["depth"], a["heads"], a["params"]
        clips_train, clips_ref = 2 * recipe.data.batch_size, 2 * recipe.data.batch_size
        # per GPU: the whole block / sp, plus the replicated text tokens' per-token layers on the other ranks
        fwd = depth * (vit_block_flops(dim, tokens, tokens) / sp + text * 24 * dim * dim * (1 - 1 / sp))
        flops = dist_cfg.grad_accum * (clips_train * (4 if ckpt else 3) * fwd + clips_ref * fwd)
        states = 2 * params / (n if dist_cfg.zero_stage == 3 else 1)
        teacher_s, name = 0.0, vg.policy.kind
    else:
        r = flops_model(recipe, gpus, gpu, mfu)
        m = recipe.model.resolved()
        tokens, dim, depth, heads = r["tokens_per_clip"], m.hidden_dim, m.depth, m.num_heads
        video, text = tokens, 0
        clips_train = recipe.data.batch_size
        peak = GPUS[gpu][0] * 1e12 * mfu
        teacher_s = r["teacher_tflop"] * 1e12 / peak   # already per optimizer step
        flops = (r["dit_tflop"] + r["align_tflop"]) * 1e12 / sp
        states = r["states_gib"] * 2 ** 30 + r["teacher_gib"] * 2 ** 30
        name = "DiT"
    local = video / sp + text
    block_io = depth * local * dim * 2
    a2a_buffers = 8 * video / sp * dim * 2 if sp > 1 else 0   # q, k, v, out: send + receive, one block at a time
    acts = clips_train * ((block_io + 34 * local * dim + a2a_buffers) if ckpt else depth * 34 * local * dim)
    passes = 4 if ckpt else 3
    # q, k, v, out of the video tokens through the all-to-all; the text output's heads all-gathered
    a2a = dist_cfg.grad_accum * clips_train * depth * passes * (4 * video / sp + text) * dim * 2 * (sp - 1) / sp
    a2a_s = a2a / (LINK_GBS[gpu] * 1e9)
    compute_s = flops / (GPUS[gpu][0] * 1e12 * mfu) + teacher_s
    return {"sp": sp, "dp": n // sp, "name": name, "tokens": tokens, "video_tokens": video, "text_tokens": text,
            "heads": heads, "tokens_per_gpu": local,
            "acts_gib": acts / 2 ** 30, "memory_gib": (acts + states) / 2 ** 30, "a2a_gb": a2a / 1e9,
            "a2a_s": a2a_s, "step_s": compute_s + a2a_s, "global_batch": recipe.data.batch_size
            * dist_cfg.grad_accum * n // sp}


def print_sp_table(recipe: Recipe, gpus: int, gpu: str, mfu: float, sps: list[int]) -> list[dict[str, float]]:
    rows = []
    for sp in sps:
        r = sp_model(recipe, gpus, gpu, mfu, sp)
        if gpus % sp or r["heads"] % sp or r["video_tokens"] % sp:
            continue
        rows.append(r)
    if not rows:
        return rows
    first = rows[0]
    text = (f" ({first['video_tokens']:.0f} video, split; {first['text_tokens']:.0f} text, on every rank)"
            if first["text_tokens"] else "")
    print(f"sequence parallelism (DeepSpeed-Ulysses), {first['name']}: {first['tokens']:.0f} tokens/clip{text}, "
          f"{first['heads']} heads, {gpus} x {gpu.upper()}, micro-batch {recipe.data.batch_size} per DP group")
    left_out = [sp for sp in sps if sp not in {r["sp"] for r in rows}]
    if left_out:
        print(f"  SP {', '.join(map(str, left_out))}: left out (not dividing the GPUs, the heads or the video tokens)")
    print(f"  {'DP x SP':>8} {'tokens/GPU':>11} {'acts GiB/GPU':>13} {'total GiB/GPU':>14} {'a2a GB/GPU':>11} "
          f"{'a2a s':>7} {'step s':>8} {'global batch':>13}")
    for r in rows:
        print(f"  {r['dp']:>3} x {r['sp']:<3} {r['tokens_per_gpu']:>11.0f} {r['acts_gib']:>13.2f} "
              f"{r['memory_gib']:>14.1f} {r['a2a_gb']:>11.1f} {r['a2a_s']:>7.2f} {r['step_s']:>8.2f} "
              f"{r['global_batch']:>13}")
    print("  sp assumptions: " + " ".join((sp_model.__doc__ or "").split("Assumptions (printed):")[1].split()))
    return rows


def print_model(recipe_arg: str, overrides: list[str], gpus: int, gpu: str, mfu: float,
                sps: list[int] | None = None) -> dict[str, float]:
    recipe = load_recipe(recipe_arg, overrides)
    r = flops_model(recipe, gpus, gpu, mfu)
    base = flops_model(load_recipe(recipe_arg, [*overrides, "gf.enabled=false", "gf.dino=null", "teacher.dino=null",
                                                "teacher.cache=null"]), gpus, gpu, mfu)
    print(f"recipe {recipe.name} on {gpus} x {gpu.upper()} (bf16 dense peak {GPUS[gpu][0]:.0f} TFLOP/s, assumed MFU "
          f"{mfu:.0%}), ZeRO-{recipe.distributed.zero_stage}, activation checkpointing "
          f"{recipe.distributed.activation_checkpointing}")
    print(f"  DiT {r['dit_params'] / 1e6:.0f}M params + GF heads {r['head_params'] / 1e6:.1f}M; "
          f"{r['tokens_per_clip']} tokens/clip; global batch {r['global_batch']} clips")
    print(f"  per GPU and optimizer step: DiT {r['dit_tflop']:.1f} + alignment {r['align_tflop']:.1f} + teacher "
          f"{r['teacher_tflop']:.1f} = {r['tflop_per_gpu_step']:.1f} TFLOP -> {r['step_s']:.2f} s/step "
          f"(no GF: {base['step_s']:.2f} s; GF overhead {100 * (r['step_s'] / base['step_s'] - 1):+.0f}%)")
    print(f"  memory per GPU ~ {r['memory_gib']:.1f} GiB of {r['hbm_gib']:.0f}: weights/grads/optimizer/EMA "
          f"{r['states_gib']:.1f}, activations {r['acts_gib']:.1f}, teacher {r['teacher_gib']:.1f}")
    print("  assumptions: " + " ".join((flops_model.__doc__ or "").split("Assumptions (printed by ``--model``):")[1]
                                      .split()))
    print_sp_table(recipe, gpus, gpu, mfu, sps or [1, 2, 4, 8])
    return r


# ----------------------------------------------------------------------------- curves and dumps
def _metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(gf_run: Path, base_run: Path, out: Path | None = None, window: int = 20) -> Path:
    """Flow-matching loss of both runs and the GF run's alignment losses against the step -> PNG (thin: the
    logged values, bold: their ``window``-row moving average). Prints the last-50-step means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gf_rows, base_rows = _metrics(gf_run), _metrics(base_run)
    fig, (ax_fm, ax_al) = plt.subplots(1, 2, figsize=(12, 4.5))

    def draw(ax, rows, key, label, colour):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            return
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(list(ys), window), color=colour, linewidth=2, label=label)

    draw(ax_fm, base_rows, "fm", f"baseline ({Path(base_run).name})", "tab:blue")
    draw(ax_fm, gf_rows, "fm", f"GF ({Path(gf_run).name})", "tab:orange")
    for key, colour in (("gf_angular", "tab:green"), ("gf_scale", "tab:red"), ("dino_angular", "tab:purple"),
                        ("dino_scale", "tab:brown")):
        draw(ax_al, gf_rows, key, key, colour)
    ax_fm.set_title(f"flow-matching loss (bold: {window}-point moving average)")
    ax_al.set_title("GF alignment losses (unweighted)")
    for ax in (ax_fm, ax_al):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_al.set_yscale("log")
    fig.tight_layout()
    out = Path(out or Path(gf_run) / "gf_vs_baseline.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)

    def mean(rows: list[dict], key: str, lo: int, hi: int) -> float:
        vals = [r[key] for r in rows if key in r and lo <= r["step"] <= hi]
        return sum(vals) / len(vals) if vals else float("nan")

    last = max(r["step"] for r in gf_rows)
    print(f"curves: {out}")
    for lo in range(1, last + 1, 50):
        hi = min(last, lo + 49)
        print(f"  steps {lo:4d}-{hi:4d} mean: fm GF {mean(gf_rows, 'fm', lo, hi):.4f} baseline "
              f"{mean(base_rows, 'fm', lo, hi):.4f} | gf_angular {mean(gf_rows, 'gf_angular', lo, hi):.4f} "
              f"gf_scale {mean(gf_rows, 'gf_scale', lo, hi):.4f}")
    return out


def dump_batch(recipe: Recipe, path: Path) -> Path:
    """One batch through the recipe's module: save what recomputes its GF losses (``alignment_snapshot``)."""
    from safetensors.torch import save_file

    from engine.diffusion_task import DiffusionTask
    from engine.objectives.geometry_forcing import alignment_snapshot

    if not recipe.gf.enabled:
        raise ValueError("--dump-batch needs a recipe with gf.enabled: true")
    device = _device(recipe)
    task = DiffusionTask(recipe, _world(device))
    module = task.module.to(device)
    batch, noise = task.prepare(next(task.micro_batches(0)), 0, PhaseTimer(device)).args
    out = module.flow_matching(batch, noise)
    parts = module.gf(out["features"], batch)
    save_file(alignment_snapshot(module.gf, out["features"], batch, parts), str(path),
              metadata={"recipe": recipe.name, "dit_block": str(recipe.gf.dit_block),
                        "teacher_layers": json.dumps(recipe.teacher.layers),
                        "temporal_patch_size": str(recipe.model.temporal_patch_size),
                        "angular_weight,scale_weight": json.dumps(recipe.gf.weights())})
    print(f"dump: {path} (GF term {float(parts['loss'].detach()):.6g}, "
          + ", ".join(f"{k} {float(v):.6g}" for k, v in parts.items() if k != "loss") + ")")
    return path


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gf_tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compare", action="store_true", help="baseline vs GF live vs GF cache, interleaved")
    p.add_argument("--cache", default=None, help="teacher cache for --compare (default: built in a temp dir)")
    p.add_argument("--steps", type=int, default=16, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--csv", default=str(RESULTS / "train.csv"), help="CSV to append to ('' to skip)")
    p.add_argument("--model", action="store_true", help="analytic FLOPs / time / memory model, no run")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation for --model")
    p.add_argument("--sp", default="1,2,4,8", help="--model: sequence-parallel sizes of the SP table")
    p.add_argument("--curves", nargs=2, metavar=("GF_RUN", "BASE_RUN"), help="plot two runs' loss curves")
    p.add_argument("--dump-batch", default=None, metavar="PATH", help="save one batch's GF inputs and losses")
    args = p.parse_args(argv)
    if args.curves:
        plot_curves(Path(args.curves[0]), Path(args.curves[1]))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if args.model:
        print_model(args.recipe, args.overrides, args.gpus, args.gpu, args.mfu, [int(v) for v in args.sp.split(",")])
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dump_batch:
        dump_batch(recipe, Path(args.dump_batch))
        return 0
    csv_path = Path(args.csv) if args.csv else None
    started = time.perf_counter()
    if args.compare:
        compare(args.recipe, args.overrides, args.warmup, args.steps, args.cache, csv_path)
    else:
        cfg = build_config(recipe.name, recipe, _device(recipe))
        for _ in range(args.warmup):
            run_step(cfg, record=False)
        for _ in range(args.steps):
            run_step(cfg)
        measure_peak(cfg)
        print(report([cfg], csv_path))
    print(f"bench_train: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())

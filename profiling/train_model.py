"""The analytic model behind ``python profiling/bench_train.py --model``: FLOPs, step time and memory per GPU of
one optimizer step of a recipe, and the same with sequence parallelism (no run; every assumption printed).

- DiT and VideoGPA policies: formulas (:func:`flops_model`, :func:`sp_model`, :data:`POLICY_ARCH`);
- DFoT's U-ViT3D (``model.arch: uvit3d``): counted, not formulas - the real module built on the meta device at
  the recipe's full size (:func:`uvit3d_counts`: FlopCounterMode, saved-tensor hooks; nothing is allocated),
  and its SP table splits only the transformer levels (:func:`uvit3d_sp_model`).

Measured steps (``bench_train.py`` without ``--model``) live in ``bench_train.py``.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from geoforge.engine.config import Recipe, load_recipe  # noqa: E402

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
    from geoforge.engine.models.vggt.config import resolve_config
    from geoforge.engine.teacher.spec import teacher_size

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
        from geoforge.engine.models.vggt import DINOV2_VARIANTS

        pd, pdepth, _ = DINOV2_VARIANTS[agg["patch_embed"]]
        out["vggt"] += pdepth * frames * vit_block_flops(pd, patches + special, patches + special)
    layers = max(layer % agg["depth"] for layer in t.layers) + 1
    tokens = frames * (patches + special)
    out["vggt"] += layers * (vit_block_flops(dim, tokens, patches + special) + vit_block_flops(dim, tokens, tokens))
    if t.dino is not None:
        from geoforge.engine.models.vggt import DINOV2_VARIANTS

        dd, ddepth, _ = DINOV2_VARIANTS[t.dino.variant]
        dh, dw = teacher_size(d.resolution, d.resolution, t.dino.resolution)
        n = (dh // 14) * (dw // 14) + 5
        blocks = t.dino.layer % ddepth + 1
        out["dino"] = blocks * frames * vit_block_flops(dd, n, n)
    return out


# ----------------------------------------------------------------------------- U-ViT3D: counted on the meta device
_UVIT_COUNTS: dict[str, dict[str, Any]] = {}


def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, site=None) -> torch.Tensor:
    """The fused flash kernel a GPU step runs (aten's op, with its autograd formula): it saves q, k, v, the output
    and the log-sum-exp (no L x L matrix), and FlopCounterMode counts it with its flash formulas."""
    if mask is not None:
        raise ValueError("the U-ViT3D's attention has no mask")
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q.device.type == "cpu":   # same saved tensors; FlopCounterMode has no formula for it (tests of the bytes)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


@contextlib.contextmanager
def _uvit_flash_attention():
    from geoforge.engine.models.uvit3d import blocks as uvit_blocks

    original = uvit_blocks.attention
    uvit_blocks.attention = _flash_attention_op
    try:
        yield
    finally:
        uvit_blocks.attention = original


def uvit3d_level_tokens(ucfg, frames: int, resolution: int) -> list[tuple[int, int, int]]:
    """Per transformer level: (tokens per clip, channels, blocks: down + up, or the middle's)."""
    n, grid = ucfg.num_levels, resolution // ucfg.patch_size
    return [(frames * (grid >> i) ** 2, ucfg.channels[i], ucfg.num_mid_blocks if i == n - 1
             else 2 * ucfg.num_updown_blocks[i]) for i in range(n) if ucfg.is_transformer(i)]


def uvit3d_counts(ucfg, batch: int, frames: int, resolution: int, checkpoint_all: bool,
                  device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """FLOPs and saved-activation bytes of one training forward + backward of the real ``UViT3D`` (the module
    ``engine.models.arch.build_model`` builds) on ``batch`` clips of ``frames`` x ``resolution``^2, counted on the
    ``meta`` device: shapes only, nothing allocated, so the recipe's full size is counted as it is (no scaling).
    Called as the trainer calls it, bf16 weights and inputs as under DeepSpeed bf16, train mode, the pose drop mask
    passed, but through ``dfot_forward`` with the ray map given (``forward(poses16=...)`` computes the same rays
    first: elementwise, uncounted); loss = mean(out^2) (the diffusion loss's elementwise work and its few
    [B, T, 3, H, W] fp32 tensors are not counted).

    - FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add of every convolution, linear,
      matmul and attention; elementwise ops, norms and softmax are not counted) over forward + backward, and
      per block (hooks around each ResBlock / TransformerBlock forward and backward). Attention runs as aten's
      flash kernel (:func:`_flash_attention_op`; its backward counts 2.5 x the forward: it recomputes q k^T).
      Checkpointing (DFoT's ``use_checkpointing`` levels, every block with ``checkpoint_all``) adds each
      checkpointed block's forward FLOPs once more (the recompute in backward) up to the op that saves the
      block's last tensor: ``torch.utils.checkpoint`` (non-reentrant) stops recomputing there, so e.g. a
      transformer block's ``mlp_out`` matmul is not rerun (tested against a real checkpointed count).
    - Activations: every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``), deduplicated by
      storage, parameters excluded, attributed to the block running when it was saved (else ``outside``).
      Kept with checkpointing = outside + the checkpointed blocks' inputs (what ``torch.utils.checkpoint``
      holds) + the saved tensors of the other blocks; peak = kept + the largest checkpointed block's own saved
      tensors (recomputed one block at a time in backward). No checkpointing: everything saved.
    Cached per configuration."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from geoforge.engine.models.uvit3d import UViT3D
    from geoforge.engine.models.uvit3d.blocks import TransformerBlock
    from geoforge.engine.models.uvit3d.folded import FoldedEmb

    key = repr((ucfg, batch, frames, resolution, checkpoint_all, device, dtype))
    if key in _UVIT_COUNTS:
        return _UVIT_COUNTS[key]
    n = ucfg.num_levels
    ckpt_levels = [True] * n if checkpoint_all else list(ucfg.use_checkpointing)
    # build_model's module; checkpointing is accounted for below instead of run
    cfg = replace(ucfg, external_cond_dropout=0.0, use_checkpointing=[False] * n)
    with torch.device(device):
        model = UViT3D(cfg).to(dtype).train()
    params = sum(p.numel() for p in model.parameters())
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    names = {m: name for name, m in model.named_modules()}
    blocks: dict[str, dict[str, Any]] = {}
    for level in range(n):
        for up in (False, True):
            for blk in model._level_blocks(level, up):
                blocks.setdefault(names[blk], {"module": blk, "level": level, "ckpt": ckpt_levels[level],
                                               "transformer": isinstance(blk, TransformerBlock),
                                               "inputs": set(), "saved": set(), "fwd": 0, "bwd": 0,
                                               "upto_last_save": 0})
    nbytes: dict[int, int] = {}
    outside: set[int] = set()
    stack: list[str] = []
    alive: list[torch.Tensor] = []   # every recorded tensor stays referenced: no storage address is reused
    counter = FlopCounterMode(display=False)

    def storage(t: torch.Tensor) -> int | None:
        s = t.untyped_storage()
        if s._cdata in param_storages:
            return None
        nbytes[s._cdata] = s.nbytes()
        alive.append(t)
        return s._cdata

    def pack(t: torch.Tensor) -> torch.Tensor:
        sid = storage(t)
        if stack:   # autograd saves an op's inputs before the op runs: FLOPs so far = a recompute that stops here
            blocks[stack[-1]]["upto_last_save"] = counter.get_total_flops() - blocks[stack[-1]]["start"]
        if sid is not None:
            (blocks[stack[-1]]["saved"] if stack else outside).add(sid)
        return t

    def fwd_pre(name):
        def hook(module, args) -> None:
            for a in args:
                ts = [a] if isinstance(a, torch.Tensor) else (
                    [v for v in vars(a).values() if isinstance(v, torch.Tensor)] if isinstance(a, FoldedEmb) else [])
                for t in ts:
                    sid = storage(t)
                    if sid is not None:
                        blocks[name]["inputs"].add(sid)
            stack.append(name)
            blocks[name]["start"] = counter.get_total_flops()
            blocks[name]["fwd"] -= blocks[name]["start"]
        return hook

    def fwd_post(module, args, out) -> None:
        blocks[stack.pop()]["fwd"] += counter.get_total_flops()

    def bwd_pre(name):
        def hook(module, grad_output) -> None:
            blocks[name]["bwd"] -= counter.get_total_flops()
        return hook

    def bwd_post(name):
        def hook(module, grad_input, grad_output) -> None:
            blocks[name]["bwd"] += counter.get_total_flops()
        return hook

    handles = []
    for name, b in blocks.items():
        m = b["module"]
        handles += [m.register_forward_pre_hook(fwd_pre(name)), m.register_forward_hook(fwd_post),
                    m.register_full_backward_pre_hook(bwd_pre(name)), m.register_full_backward_hook(bwd_post(name))]
    r = resolution
    x = torch.zeros(batch, frames, cfg.in_channels, r, r, device=device, dtype=dtype)
    noise = torch.zeros(batch, frames, device=device)
    rays = torch.zeros(batch, frames, cfg.cond_dim, r, r, device=device)
    drop = torch.zeros(batch, dtype=torch.bool, device=device)
    try:
        with _uvit_flash_attention(), counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model.dfot_forward(x, noise, rays, drop)
            fwd = counter.get_total_flops()
            out.float().square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    train = counter.get_total_flops()
    by_op: dict[str, int] = {}
    for op, c in counter.get_flop_counts()["Global"].items():
        kind = "attention" if "attention" in str(op) else "conv" if "convolution" in str(op) else "matmul"
        by_op[kind] = by_op.get(kind, 0) + c
    recompute = sum(b["upto_last_save"] for b in blocks.values() if b["ckpt"])
    t_train = sum(b["fwd"] + b["bwd"] + (b["upto_last_save"] if b["ckpt"] else 0)
                  for b in blocks.values() if b["transformer"])

    def size(ids) -> int:
        return sum(nbytes[i] for i in ids)

    everything = set(outside).union(*(b["saved"] for b in blocks.values()))
    kept = set(outside).union(*(b["inputs"] if b["ckpt"] else b["saved"] | b["inputs"] for b in blocks.values()))
    transformer_ids = set().union(*(b["saved"] | b["inputs"] for b in blocks.values() if b["transformer"])) - outside
    peak = {True: 0, False: 0}
    for b in blocks.values():
        if b["ckpt"]:
            peak[b["transformer"]] = max(peak[b["transformer"]], size(b["saved"] - kept))
    result = {
        "params": params, "fwd_flops": fwd, "train_flops": train + recompute, "recompute_flops": recompute,
        "flops_by_op": by_op,   # forward + backward, without the recompute
        "block_flops": {name: (b["fwd"], b["bwd"]) for name, b in blocks.items()},
        "transformer_train_flops": t_train,   # the share SP divides (transformer blocks, recompute included)
        "acts_bytes": size(kept) + max(peak.values()), "acts_nockpt_bytes": size(everything),
        # for SP: the transformer blocks' tensors (token layout: divided) vs the rest (not)
        "acts_kept_transformer_bytes": size(kept & transformer_ids),
        "acts_kept_other_bytes": size(kept - transformer_ids),
        "acts_peak_transformer_block_bytes": peak[True], "acts_peak_other_block_bytes": peak[False],
        "transformer_blocks": sum(b["transformer"] for b in blocks.values()),
        "res_blocks": sum(not b["transformer"] for b in blocks.values()),
        "checkpointed_blocks": sum(b["ckpt"] for b in blocks.values()),
    }
    _UVIT_COUNTS[key] = result
    return result


def flops_model(recipe: Recipe, gpus: int, gpu: str, mfu: float) -> dict[str, Any]:
    """Per-GPU FLOPs, time and memory of one optimizer step. Assumptions (printed by ``--model``):

    - DiT: ``engine.models.dit.flops_per_token`` x tokens; training = 3x forward (4x with activation
      checkpointing: the forward is recomputed);
    - U-ViT3D (``model.arch: uvit3d``): counted, not formulas - the real module on the meta device at the
      recipe's micro-batch, frames and resolution (:func:`uvit3d_counts`: FlopCounterMode over forward +
      backward, flash attention, + the checkpointed blocks' forward again; activations = the saved tensors);
    - projector + scale head: 2 FLOPs per MAC, 3x forward, on the tokens of the aligned feature map;
    - teacher: forward only (no_grad), :func:`teacher_flops`; no teacher FLOPs with a teacher cache;
    - time = FLOPs / (peak bf16 dense FLOP/s x ``mfu``); data loading, the optimizer update and ZeRO
      communication are assumed hidden (workers, overlap) - add 5-10% in practice;
    - memory (bytes): bf16 weights 2P and grads 2P, fp32 master + Adam moments 12P / N (ZeRO >= 1; grads
      2P / N at ZeRO >= 2; weights 2P / N at ZeRO-3), sharded fp32 EMA 4P / N; DiT activations per clip: with
      checkpointing the block inputs (depth x L x D x 2) + one block's working set (34 L D bytes, flash
      attention: no L^2 term), without depth x 34 L D; U-ViT3D activations: the counted saved tensors of a
      micro-batch; teacher: fp32 aggregator weights + a working set of 34 x (tokens x dim) and the kept layer
      outputs (fp32, tokens x 2 dim each) per clip; alignment chunks are negligible.
    """
    d, dist = recipe.data, recipe.distributed
    micro = d.batch_size * dist.grad_accum
    gf, t = recipe.gf, recipe.teacher
    uvit = None
    if recipe.model.arch == "uvit3d":
        u = recipe.model.uvit3d_config()
        uvit = uvit3d_counts(u, d.batch_size, d.frames, d.resolution, dist.activation_checkpointing)
        p_dit = uvit["params"]
        train_per_clip = uvit["train_flops"] / d.batch_size
        tokens = d.frames * (d.resolution // u.patch_size) ** 2   # level-0 pixels per clip
        n_levels, index = u.num_levels, gf.dit_block
        # the level of the aligned map (1-based latent index: down levels, middle, up levels)
        level = (index - 1 if index <= n_levels else 2 * n_levels - 1 - index) if gf.enabled else 0
        width = u.channels[level]
        feature_tokens = d.frames * (d.resolution // u.patch_size >> level) ** 2
        acts = uvit["acts_bytes"]
        name = "U-ViT3D"
    else:
        from geoforge.engine.models.dit import flops_per_token, num_params

        m = recipe.model.resolved()
        tokens = (d.frames // m.temporal_patch_size) * (d.resolution // m.patch_size) ** 2  # per clip
        dit_fwd = flops_per_token(recipe.model, d.frames, d.resolution, d.resolution) * tokens
        train_per_clip = (4 if dist.activation_checkpointing else 3) * dit_fwd
        p_dit = num_params(recipe.model)
        width, feature_tokens = m.hidden_dim, tokens
        block_io = m.depth * tokens * m.hidden_dim * 2
        acts = d.batch_size * ((block_io + 34 * tokens * m.hidden_dim) if dist.activation_checkpointing
                               else m.depth * 34 * tokens * m.hidden_dim)
        name = "DiT"
    proj, p_head, teacher = 0.0, 0, {"vggt": 0.0, "dino": 0.0}
    teacher_mem = 0.0
    if gf.enabled:
        from geoforge.engine.models.vggt.config import resolve_config

        agg = resolve_config(t.vggt.config)["aggregator"]
        c = 2 * agg["embed_dim"]
        aligned = feature_tokens * t.aligned_frames(d.frames) // d.frames
        per_layer = width * gf.projector_hidden + gf.projector_hidden ** 2 + gf.projector_hidden * c \
            + 2 * c * gf.scale_hidden
        proj = 3 * 2 * aligned * per_layer * len(t.layers)
        p_head = per_layer * len(t.layers)
        if gf.dino is not None:
            from geoforge.engine.models.vggt import DINOV2_VARIANTS

            cd = DINOV2_VARIANTS[t.dino.variant][0]
            pl = width * gf.dino.projector_hidden + gf.dino.projector_hidden ** 2 \
                + gf.dino.projector_hidden * cd + 2 * cd * gf.dino.scale_hidden
            proj += 3 * 2 * aligned * pl
            p_head += pl
        if not t.cache:
            teacher = teacher_flops(recipe)
            from geoforge.engine.teacher.spec import teacher_size

            h, w = teacher_size(d.resolution, d.resolution, t.resolution)
            t_tokens = t.aligned_frames(d.frames) * ((h // 14) * (w // 14) + 5)
            agg_params = 909.1e6 if t.vggt.config is None else 0.0
            dino_params = 86.6e6 if t.dino is not None and t.dino.config is None else 0.0
            teacher_mem = 4 * (agg_params + dino_params) + d.batch_size * (
                34 * t_tokens * agg["embed_dim"] + len(t.layers) * t_tokens * c * 4)
    per_gpu = micro * (train_per_clip + proj + teacher["vggt"] + teacher["dino"])
    peak, hbm = GPUS[gpu]
    seconds = per_gpu / (peak * 1e12 * mfu)
    p = p_dit + p_head
    n = max(1, gpus)
    grads = 2 * p / n if dist.zero_stage >= 2 else 2 * p
    states = 12 * p / n if dist.zero_stage >= 1 else 12 * p
    weights = 2 * p / n if dist.zero_stage == 3 else 2 * p
    ema = 4 * p / n if recipe.ema.enabled else 0
    memory = weights + grads + states + ema + acts + teacher_mem
    return {"name": name, "dit_params": p_dit, "head_params": p_head, "tokens_per_clip": tokens,
            "feature_tokens": feature_tokens, "dit_tflop": micro * train_per_clip / 1e12,
            "align_tflop": micro * proj / 1e12, "teacher_tflop": micro * (teacher["vggt"] + teacher["dino"]) / 1e12,
            "tflop_per_gpu_step": per_gpu / 1e12, "step_s": seconds,
            "memory_gib": memory / 2 ** 30, "hbm_gib": hbm, "acts_gib": acts / 2 ** 30,
            "teacher_gib": teacher_mem / 2 ** 30, "states_gib": (weights + grads + states + ema) / 2 ** 30,
            "global_batch": micro * n, "uvit3d": uvit}


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
    - U-ViT3D (``model.arch: uvit3d``, :func:`uvit3d_sp_model`): only the transformer levels are split (tokens
      and heads / sp, Ulysses); the ResBlock levels, the down/up-sampling and the input/output convolutions
      run whole clips on every rank of a group. So the counted FLOPs and saved tensors of the transformer
      blocks divide by sp, the rest does not; the GF alignment (level-2 map, a transformer level) divides by
      sp; all-to-all per transformer block as above with that level's L and C.
    """
    dist_cfg = recipe.distributed
    ckpt = dist_cfg.activation_checkpointing
    n = max(1, gpus)
    vg = recipe.videogpa
    if recipe.model.arch == "uvit3d" and vg is None:
        return uvit3d_sp_model(recipe, gpus, gpu, mfu, sp)
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


def uvit3d_sp_model(recipe: Recipe, gpus: int, gpu: str, mfu: float, sp: int) -> dict[str, Any]:
    """:func:`sp_model` for the U-ViT3D (its docstring: transformer levels split over sp, ResBlock levels not)."""
    d, dist_cfg = recipe.data, recipe.distributed
    ckpt = dist_cfg.activation_checkpointing
    n = max(1, gpus)
    u = recipe.model.uvit3d_config()
    r = flops_model(recipe, gpus, gpu, mfu)
    c = r["uvit3d"]
    peak = GPUS[gpu][0] * 1e12 * mfu
    micro = d.batch_size * dist_cfg.grad_accum
    transformer = micro * c["transformer_train_flops"] / d.batch_size
    rest = r["dit_tflop"] * 1e12 - transformer
    flops = rest + transformer / sp + r["align_tflop"] * 1e12 / sp
    levels = uvit3d_level_tokens(u, d.frames, d.resolution)
    biggest = max(tok * ch for tok, ch, _ in levels)
    a2a_buffers = 8 * d.batch_size * biggest / sp * 2 if sp > 1 else 0   # q, k, v, out: send + receive
    acts = (c["acts_kept_other_bytes"] + c["acts_kept_transformer_bytes"] / sp
            + max(c["acts_peak_other_block_bytes"], c["acts_peak_transformer_block_bytes"] / sp) + a2a_buffers)
    passes = 4 if ckpt else 3
    a2a = dist_cfg.grad_accum * d.batch_size * passes * sum(
        blocks * 4 * tok / sp * ch * 2 for tok, ch, blocks in levels) * (sp - 1) / sp
    a2a_s = a2a / (LINK_GBS[gpu] * 1e9)
    compute_s = flops / peak + r["teacher_tflop"] * 1e12 / peak
    states = (r["states_gib"] + r["teacher_gib"]) * 2 ** 30
    even = u.num_heads % sp == 0 and all(tok % sp == 0 for tok, _, _ in levels)
    return {"sp": sp, "dp": n // sp, "name": "U-ViT3D transformer levels", "tokens": levels[0][0] if levels else 0,
            "heads": u.num_heads, "tokens_per_gpu": (levels[0][0] if levels else 0) / sp,
            "acts_gib": acts / 2 ** 30, "memory_gib": (acts + states) / 2 ** 30, "a2a_gb": a2a / 1e9,
            "a2a_s": a2a_s, "step_s": compute_s + a2a_s, "global_batch": micro * n // sp, "even": even,
            "levels": levels}


def print_sp_table(recipe: Recipe, gpus: int, gpu: str, mfu: float, sps: list[int]) -> list[dict[str, float]]:
    rows = []
    for sp in sps:
        r = sp_model(recipe, gpus, gpu, mfu, sp)
        if gpus % sp or (r["heads"] % sp and "even" not in r) or r.get("video_tokens", 0) % sp:
            continue
        rows.append(r)
    if not rows:
        return rows
    first = rows[0]
    if "levels" in first:
        what = ", ".join(f"{tok} tokens x {ch} ch ({blocks} blocks)" for tok, ch, blocks in first["levels"])
        print(f"sequence parallelism (DeepSpeed-Ulysses) of the {first['name']} ({what}; ResBlock levels not "
              f"split), {first['heads']} heads, {gpus} x {gpu.upper()}, micro-batch {recipe.data.batch_size} per DP "
              f"group")
    else:
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
              f"{r['global_batch']:>13}{'' if r.get('even', True) else '  *'}")
    if any(not r.get("even", True) for r in rows):
        print(f"  * {first['heads']} heads / level tokens not divisible by this SP size: Ulysses' all-to-all needs an "
              f"uneven head / token split or padding there (modelled as an even split)")
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
    name = r["name"]
    if r["uvit3d"] is not None:
        c, d = r["uvit3d"], recipe.data
        ops = c["flops_by_op"]
        print(f"  {name} {r['dit_params']:,} params (counted from the module) + GF heads "
              f"{r['head_params'] / 1e6:.1f}M; "
              f"{d.frames} x {d.resolution}^2 clips, {r['tokens_per_clip']:,} level-0 pixels/clip"
              + (f", aligned map {r['feature_tokens']:,} tokens/clip" if recipe.gf.enabled else "")
              + f"; {c['res_blocks']} ResBlocks + {c['transformer_blocks']} "
              f"transformer blocks, {c['checkpointed_blocks']} checkpointed; global batch {r['global_batch']} clips")
        print(f"  {name} counted per micro-batch of {d.batch_size} (FlopCounterMode, meta device, flash attention): "
              f"forward {c['fwd_flops'] / 1e12:.1f} TFLOP; forward + backward {sum(ops.values()) / 1e12:.1f} "
              f"(conv {ops.get('conv', 0) / 1e12:.1f}, linear/matmul {ops.get('matmul', 0) / 1e12:.1f}, attention "
              f"{ops.get('attention', 0) / 1e12:.1f}) + checkpoint recompute {c['recompute_flops'] / 1e12:.1f} = "
              f"{c['train_flops'] / 1e12:.1f} TFLOP ({c['transformer_train_flops'] / c['train_flops']:.0%} in the "
              f"transformer blocks)")
        print(f"  {name} activations per micro-batch (saved tensors, counted at full size): "
              f"{c['acts_bytes'] / 2 ** 30:.2f} GiB with checkpointing as configured (kept "
              f"{(c['acts_kept_other_bytes'] + c['acts_kept_transformer_bytes']) / 2 ** 30:.2f} + largest recomputed "
              f"block {max(c['acts_peak_other_block_bytes'], c['acts_peak_transformer_block_bytes']) / 2 ** 30:.2f}); "
              f"{c['acts_nockpt_bytes'] / 2 ** 30:.1f} GiB with nothing checkpointed")
        print("  U-ViT3D counting: " + " ".join((uvit3d_counts.__doc__ or "").split()))
    else:
        print(f"  DiT {r['dit_params'] / 1e6:.0f}M params + GF heads {r['head_params'] / 1e6:.1f}M; "
              f"{r['tokens_per_clip']} tokens/clip; global batch {r['global_batch']} clips")
    print(f"  per GPU and optimizer step: {name} {r['dit_tflop']:.1f} + alignment {r['align_tflop']:.1f} + teacher "
          f"{r['teacher_tflop']:.1f} = {r['tflop_per_gpu_step']:.1f} TFLOP -> {r['step_s']:.2f} s/step "
          f"(no GF: {base['step_s']:.2f} s; GF overhead {100 * (r['step_s'] / base['step_s'] - 1):+.0f}%)")
    print(f"  memory per GPU ~ {r['memory_gib']:.1f} GiB of {r['hbm_gib']:.0f}: weights/grads/optimizer/EMA "
          f"{r['states_gib']:.1f}, activations {r['acts_gib']:.1f}, teacher {r['teacher_gib']:.1f}")
    print("  assumptions: " + " ".join((flops_model.__doc__ or "").split("Assumptions (printed by ``--model``):")[1]
                                      .split()))
    print_sp_table(recipe, gpus, gpu, mfu, sps or [1, 2, 4, 8])
    return r

"""``profiling/bench_train.py --model`` for the U-ViT3D: the counted FLOPs and activation bytes against independent
counts on a toy U-ViT3D, and the analytic model of the paper recipes (meta device: nothing allocated)."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch

from geoforge.engine.models.uvit3d import RE10K, UViT3DConfig

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # profiling/ is not an installed package
    sys.path.insert(0, str(ROOT))

from profiling import train_model  # noqa: E402
from profiling.train_model import _uvit_flash_attention, print_model, uvit3d_counts  # noqa: E402

# 2 levels: a ResBlock level (32 ch, 8x8 after the 2x2 patch) and a transformer middle (64 ch, 2 heads, 4x4)
TOY = UViT3DConfig(channels=[32, 64], emb_channels=64, block_types=["ResBlock", "TransformerBlock"],
                   block_dropouts=[0.0, 0.0], num_updown_blocks=[1], num_mid_blocks=1, num_heads=2,
                   use_checkpointing=[False, False], resolution=16, max_frames=2)


def UViT3D_meta(cfg: UViT3DConfig):
    from geoforge.engine.models.uvit3d import UViT3D

    with torch.device("meta"):
        return UViT3D(cfg)


def hand_flops(cfg: UViT3DConfig, b: int, t: int) -> dict[str, int]:
    """Forward FLOPs (2 per MAC) of TOY's layers written out by hand; E < 180 p^2, so nothing is folded."""
    c0, c1, e, p, r = *cfg.channels, cfg.emb_channels, cfg.patch_size, cfg.resolution
    n, h0 = b * t, r // p
    h1, length = h0 // 2, t * (h0 // 2) ** 2
    layers = {
        "embed_input": 2 * n * h0 ** 2 * c0 * 3 * p * p,
        "pose_conv": 2 * n * h0 ** 2 * e * cfg.cond_dim * p * p,
        "noise_linear_1": 2 * n * cfg.noise_freq_dim * e,
        "noise_linear_2": 2 * n * e * e,
        "resblocks": 2 * (2 * 2 * n * h0 ** 2 * c0 * c0 * 9 + 2 * n * h0 ** 2 * e * 2 * c0),   # down + up
        "downsample": 2 * n * h1 ** 2 * c1 * c0 * 9,
        "upsample": 2 * n * h1 ** 2 * c0 * c1 * 9,
        "transformer_linear": 2 * b * length * (e * 2 * c1 + c1 * 7 * c1 + c1 * c1 + 4 * c1 * c1),
        "attention": 4 * b * length * length * c1,
        "project_output": 2 * n * h0 ** 2 * c0 * 3 * p * p,
    }
    return layers


def test_counted_flops_match_a_hand_count_of_a_toy_uvit3d():
    b, t = 2, 2
    f = hand_flops(TOY, b, t)
    plain = uvit3d_counts(TOY, b, t, TOY.resolution, checkpoint_all=False)
    assert plain["params"] == sum(p.numel() for p in UViT3D_meta(TOY).parameters())
    assert plain["fwd_flops"] == sum(f.values())
    # backward: 2x forward, except the layers whose input needs no gradient (frames, rays, Fourier features:
    # weight gradient only, 1x) and flash attention (2.5x)
    no_input_grad = f["embed_input"] + f["pose_conv"] + f["noise_linear_1"]
    assert plain["train_flops"] == 3 * sum(f.values()) - no_input_grad + f["attention"] // 2
    assert plain["recompute_flops"] == 0 and plain["flops_by_op"]["attention"] == 3.5 * f["attention"]
    assert plain["transformer_train_flops"] == 3 * f["transformer_linear"] + 3.5 * f["attention"]
    # checkpointing every block: each block's forward once more, up to its last saved tensor (checkpoint's
    # early stop: the output convolution of a ResBlock and mlp_out of a transformer block are not rerun)
    ckpt = uvit3d_counts(TOY, b, t, TOY.resolution, checkpoint_all=True)
    c0, c1, n, h0 = *TOY.channels, b * t, TOY.resolution // TOY.patch_size
    length = t * (h0 // 2) ** 2
    blocks = (f["resblocks"] - 2 * 2 * n * h0 ** 2 * c0 * c0 * 9 + f["transformer_linear"]
              - 2 * b * length * 4 * c1 * c1 + f["attention"])
    assert ckpt["recompute_flops"] == blocks
    assert ckpt["train_flops"] == plain["train_flops"] + blocks


@pytest.mark.parametrize("every_block", [False, True], ids=["dfot-levels", "trainer-all-blocks"])
def test_counted_flops_of_a_real_checkpointed_run_agree(every_block):
    """The recompute the count adds = what FlopCounterMode counts when torch.utils.checkpoint really runs: DFoT's
    per-level use_checkpointing (the toy's middle level), or every block as the trainer applies it."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from geoforge.engine.models.checkpointing import enable_activation_checkpointing
    from geoforge.engine.models.uvit3d import UViT3D

    cfg = replace(TOY, use_checkpointing=[False, True])
    b, t, r = 2, 2, TOY.resolution
    with torch.device("meta"):
        model = UViT3D(cfg).train()   # checkpoints its middle blocks (cfg.use_checkpointing)
    if every_block:
        enable_activation_checkpointing(model.blocks())
    x = torch.zeros(b, t, 3, r, r, device="meta")
    rays = torch.zeros(b, t, cfg.cond_dim, r, r, device="meta")
    with _uvit_flash_attention(), FlopCounterMode(display=False) as counter:
        model.dfot_forward(x, torch.zeros(b, t, device="meta"), rays,
                           torch.zeros(b, dtype=torch.bool, device="meta")).float().square().mean().backward()
    counted = uvit3d_counts(cfg, b, t, r, checkpoint_all=every_block, dtype=torch.float32)
    assert counted["recompute_flops"] > 0
    assert counted["train_flops"] == counter.get_total_flops()


def test_saved_activation_bytes_match_the_cpu_allocator():
    """The saved-tensor bytes counted on the meta device = what the c10 CPU allocator still holds after a real
    forward of the toy with the graph alive (inputs made inside the measured region: the frames and rays are
    saved), less the output, within 1%."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    from geoforge.engine.models.uvit3d import UViT3D

    b, t, r = 2, 2, TOY.resolution
    counted = uvit3d_counts(TOY, b, t, r, checkpoint_all=False, dtype=torch.float32)["acts_nockpt_bytes"]
    on_cpu = uvit3d_counts(TOY, b, t, r, checkpoint_all=False, device="cpu", dtype=torch.float32)
    assert counted - on_cpu["acts_nockpt_bytes"] == 24   # the CUDA flash kernel's RNG state (philox seed, offset)
    model = UViT3D(replace(TOY, external_cond_dropout=0.0)).train()
    keep = []
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _uvit_flash_attention():
        prof.start()
        x, noise, rays = torch.randn(b, t, 3, r, r), torch.randn(b, t), torch.randn(b, t, TOY.cond_dim, r, r)
        keep.append(model.dfot_forward(x, noise, rays, torch.zeros(b, dtype=torch.bool)))
        prof.stop()
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held -= keep[0].numel() * keep[0].element_size()
    assert held == pytest.approx(counted, rel=0.01)


@pytest.mark.timeout(120)
def test_model_runs_for_the_paper_recipes():
    """``--model`` of gf_re10k_paper and dfot_re10k_paper: the real 458.8M U-ViT3D counted on the meta device."""
    outs = {}
    for name in ("gf_re10k_paper", "dfot_re10k_paper"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            outs[name] = print_model(name, [], 8, "h100", 0.4, [1, 2])
        text = buf.getvalue()
        assert "U-ViT3D 458,818,051 params" in text and "sequence parallelism" in text
    gf, dfot = outs["gf_re10k_paper"], outs["dfot_re10k_paper"]
    assert gf["dit_params"] == dfot["dit_params"] == 458_818_051
    assert gf["dit_tflop"] == pytest.approx(dfot["dit_tflop"]) and dfot["teacher_tflop"] == 0
    assert gf["teacher_tflop"] > 0 and gf["memory_gib"] > dfot["memory_gib"] + 8   # VGGT-1B
    c = gf["uvit3d"]
    assert c["transformer_blocks"] == 32 and c["res_blocks"] == 12 and c["checkpointed_blocks"] == 44
    # the attention of the transformer levels, exactly: 4 L^2 C per clip and block, flash: 1 + 2.5 passes
    attn = sum(blocks * 4 * tok * tok * ch for tok, ch, blocks in train_model.uvit3d_level_tokens(RE10K, 16, 256))
    assert c["flops_by_op"]["attention"] == 4 * 3.5 * attn
    sp1 = train_model.sp_model(train_model.load_recipe("gf_re10k_paper"), 8, "h100", 0.4, 1)
    sp2 = train_model.sp_model(train_model.load_recipe("gf_re10k_paper"), 8, "h100", 0.4, 2)
    assert sp1["acts_gib"] == pytest.approx(gf["acts_gib"]) and sp1["step_s"] == pytest.approx(gf["step_s"])
    assert sp2["acts_gib"] < sp1["acts_gib"] and sp2["acts_gib"] > sp1["acts_gib"] / 2   # ResBlock levels whole


def test_bench_train_configs_parse_labels_and_overrides():
    """``bench_train.py --configs``: a bare label has no overrides; a value may hold commas; no label is refused."""
    from profiling.bench_train import parse_configs

    assert parse_configs(["eager", "c:distributed.compile=true,teacher.layers=[0,1],seed=2"]) == [
        ("eager", []), ("c", ["distributed.compile=true", "teacher.layers=[0,1]", "seed=2"])]
    with pytest.raises(SystemExit, match="give LABEL"):
        parse_configs([":seed=1"])

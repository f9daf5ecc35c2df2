"""The diffusers policies (CogVideoX-I2V, Wan2.2-TI2V) on tiny random configs: seeded sampling, the
noising / target / conditioning formulas, and LoRA adapters that load back with peft and with diffusers'
``load_lora_weights``. Nothing is downloaded."""
import copy
import math

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers policies are an optional extra (pip install diffusers)")

from geoforge.engine.config import load_recipe  # noqa: E402
from geoforge.engine.videogpa.config import LoraConfig, PolicyConfig  # noqa: E402
from geoforge.engine.videogpa.lora import add_lora, load_adapter, save_adapter  # noqa: E402
from geoforge.engine.videogpa.policy import Condition, build_policy  # noqa: E402

TINY = {
    "cogvideox_i2v": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=8,
                            text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9,
                            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
                            use_rotary_positional_embeddings=True),
        "vae": dict(down_block_types=["CogVideoXDownBlock3D"] * 4, up_block_types=["CogVideoXUpBlock3D"] * 4,
                    block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=2,
                    temporal_compression_ratio=4),
    },
    "wan_ti2v": {
        "transformer": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4,
                            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32),
        "vae": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                    latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0]),
    },
}
KINDS = list(TINY)


def make_policy(kind):
    rec = load_recipe("videogpa_tiny", ["videogpa.generate.frames=9", "videogpa.generate.height=32",
                                        "videogpa.generate.width=32"])
    rec.videogpa.policy = PolicyConfig(kind=kind, tiny_config=TINY[kind], text_encoder=False, max_text_tokens=8)
    return build_policy(rec)


def condition(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    return policy.prepare_condition(Condition(key="x", first_frame=torch.rand(3, 32, 32, generator=g)))


def capture_inputs(network):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
    return seen, network.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_candidates(kind):
    policy = make_policy(kind)
    videos = policy.sample(condition(policy), seeds=[11, 12, 11], steps=2, guidance=3.0)
    assert videos.shape == (3, 9, 32, 32, 3) and videos.dtype.name == "uint8"
    assert (videos[0] == videos[2]).all() and (videos[0] != videos[1]).any()


def test_cogvideox_terms():
    policy = make_policy("cogvideox_i2v")
    cond = policy.batch_condition([condition(policy)])
    x0 = policy.encode(torch.rand(1, 9, 3, 32, 32))
    assert x0.shape == (1, 3, 4, 4, 4)   # [B, F = (9 - 1) / 4 + 1, C, h, w]
    noise = policy.draw_noise(tuple(x0.shape), torch.Generator().manual_seed(3))
    assert noise["t"].dtype == torch.int64 and 0 <= int(noise["t"]) < 1000
    abar = policy.scheduler.alphas_cumprod[noise["t"]].float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(policy.add_noise(x0, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise["eps"])
    torch.testing.assert_close(policy.target(x0, noise), abar.sqrt() * noise["eps"] - (1 - abar).sqrt() * x0)
    seen, handle = capture_inputs(policy.network)
    err = policy.per_sample_error(policy.network, x0, cond, noise)
    handle.remove()
    inp = seen["hidden_states"]
    assert inp.shape == (1, 3, 8, 4, 4)   # noisy latents and the image latent on the channel axis
    torch.testing.assert_close(inp[:, :, :4], policy.add_noise(x0, noise))
    torch.testing.assert_close(inp[:, :1, 4:], cond["image_latents"][:, :1])
    assert (inp[:, 1:, 4:] == 0).all() and seen["image_rotary_emb"] is not None
    first = condition(policy).first_frame[None, :, None]   # [1, 3, 1, H, W]
    expected = policy._encode_video(first * 2 - 1).permute(0, 2, 1, 3, 4) * policy.vae.config.scaling_factor
    torch.testing.assert_close(cond["image_latents"][:, :1], expected)
    assert err.shape == (1,) and torch.isfinite(err).all()


def test_wan_terms():
    policy = make_policy("wan_ti2v")
    cond = policy.batch_condition([condition(policy)])
    x0 = policy.encode(torch.rand(2, 9, 3, 32, 32))
    noise = policy.draw_noise(tuple(x0.shape), torch.Generator().manual_seed(5))
    assert policy.shift == 5.0 and noise["sigma"].shape == (2,)
    assert ((noise["sigma"] >= 0) & (noise["sigma"] < 1)).all()
    # σ = 5s / (1 + 4s) maps s = t / 1000 with t integer: invert and check it lands on the grid
    t = noise["sigma"] / (policy.shift - (policy.shift - 1) * noise["sigma"]) * 1000
    torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
    sig = noise["sigma"].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(policy.add_noise(x0, noise), (1 - sig) * x0 + sig * noise["eps"])
    torch.testing.assert_close(policy.target(x0, noise), noise["eps"] - x0)
    # latents are normalised with the VAE's latents_mean / latents_std
    raw = policy._encode_video(torch.zeros(1, 3, 1, 32, 32) * 2 - 1).permute(0, 2, 1, 3, 4)
    mean = torch.tensor([0.1, -0.2, 0.0, 0.3]).view(1, 1, 4, 1, 1)
    std = torch.tensor([1.5, 0.5, 1.0, 2.0]).view(1, 1, 4, 1, 1)
    torch.testing.assert_close(policy._latents(torch.zeros(1, 3, 1, 32, 32)), (raw - mean) / std)
    both = {k: torch.cat([v, v]) for k, v in noise.items()}
    seen, handle = capture_inputs(policy.network)
    policy.per_sample_error(policy.network, torch.cat([x0, x0]), cond, both)
    handle.remove()
    inp, ts = seen["hidden_states"], seen["timestep"]
    assert inp.shape == (4, 4, 3, 4, 4)   # Wan layout [B, C, F, h, w]
    torch.testing.assert_close(inp[:, :, 0], cond["image_latents"][:, 0].expand(4, -1, -1, -1))
    tokens = (4 // 2) * (4 // 2)   # latent tokens per frame (patch 2 x 2)
    assert ts.shape == (4, 3 * tokens) and (ts[:, :tokens] == 0).all()
    torch.testing.assert_close(ts[:, tokens:], (both["sigma"] * 1000)[:, None].expand(4, 2 * tokens))
    assert policy.loss_mask(x0, noise)[:, 0].logical_not().all()


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_loads_with_peft_and_diffusers(kind, tmp_path):
    torch.manual_seed(0)
    policy = make_policy(kind)
    cond = policy.batch_condition([condition(policy)])
    x0 = policy.encode(torch.rand(1, 9, 3, 32, 32))
    noise = policy.draw_noise(tuple(x0.shape), torch.Generator().manual_seed(1))
    base_transformer = copy.deepcopy(policy.network)
    network = add_lora(policy.network, LoraConfig(rank=4, alpha=8.0), policy.default_lora_targets)
    names = {n for n, p in network.named_parameters() if p.requires_grad}
    assert names and all(any(f".{t}.lora_" in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    with torch.no_grad():   # stands in for training: non-zero adapters
        for n, p in network.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        x_t = policy.add_noise(x0, noise)
        trained = policy.predict(network, x_t, noise, cond)
        base = policy.predict(base_transformer, x_t, noise, cond)
    assert (trained - base).abs().max() > 1e-3
    folder = save_adapter(network, tmp_path / "adapter", diffusers_pipeline=policy.diffusers_pipeline_class)
    assert {"adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"} <= {
        p.name for p in folder.iterdir()}
    with torch.no_grad():
        via_peft = policy.predict(load_adapter(copy.deepcopy(base_transformer), folder), x_t, noise, cond)
        fresh = make_policy(kind)
        fresh.pipe.transformer.load_state_dict(base_transformer.state_dict())
        fresh.pipe.load_lora_weights(str(folder))
        via_diffusers = fresh.predict(fresh.pipe.transformer, x_t, noise, cond)
    torch.testing.assert_close(via_peft, trained)
    torch.testing.assert_close(via_diffusers, trained, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(policy.per_sample_error(network, x0, cond, noise).detach()))

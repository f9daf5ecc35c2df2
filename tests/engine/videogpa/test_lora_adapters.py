"""LoRA on the own-DiT policy: targets, the two reference modes (and what they hold in memory), and a
trained adapter saved in peft format that loads with peft into a fresh model and reproduces its output
(also through ``videogpa.policy.adapter``, as the start of the next DPO run)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from geoforge.engine.config import load_recipe
from geoforge.engine.videogpa.lora import adapters_disabled, load_adapter, parameter_bytes, save_adapter
from geoforge.engine.videogpa.policy import Condition, build_dit_policy, build_policy
from geoforge.engine.videogpa.train_dpo import build_dpo_module

T, R = 4, 32


def recipe(*overrides):
    return load_recipe("videogpa_tiny", [f"data.frames={T}", *overrides])


def probe(policy, seed=0):
    """A fixed batch: two clean videos, their conditions and shared noise."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(2, T, 3, R, R, generator=g)
    k = torch.tensor([[28.0, 0, 15.5], [0, 28.0, 15.5], [0, 0, 1]]).expand(T, 3, 3)
    ext = torch.eye(3, 4).expand(T, 3, 4).clone()
    ext[:, 0, 3] = torch.linspace(0, 0.3, T)
    conds = [Condition(key=str(i), first_frame=frames[i, 0], intrinsics=k, extrinsics=ext) for i in range(2)]
    x0 = policy.encode(frames)
    return x0, policy.batch_condition(conds), policy.draw_noise(tuple(x0.shape), g)


def outputs(policy, network, x0, cond, noise):
    with torch.no_grad():
        return policy.predict(network, policy.add_noise(x0, noise), noise, cond)


def test_default_targets_are_the_attention_projections():
    module = build_dpo_module(recipe(), build_dit_policy(recipe()))
    lora_modules = {n.split(".lora_A")[0] for n, _ in module.network.named_parameters() if ".lora_A" in n}
    depth = recipe().model.depth
    assert lora_modules == {f"base_model.model.blocks.{i}.{m}" for i in range(depth) for m in ("qkv", "proj")}
    assert all(("lora_" in n) == p.requires_grad for n, p in module.network.named_parameters())


def test_reference_modes_and_memory():
    policy = build_dit_policy(recipe())
    shared = build_dpo_module(recipe(), policy)
    copied = build_dpo_module(recipe("videogpa.dpo.reference=frozen_copy"), build_dit_policy(recipe()))
    full = build_dpo_module(recipe("videogpa.lora.enabled=false"), build_dit_policy(recipe()))
    assert shared.reference is None and copied.reference is not None and full.reference is not None
    base = parameter_bytes(full.network)
    lora = sum(p.numel() * 4 for p in shared.network.parameters() if p.requires_grad)
    assert parameter_bytes(shared.network, shared.reference) == base + lora   # no second copy of the base
    assert parameter_bytes(copied.network, copied.reference) == 2 * base + lora
    assert parameter_bytes(full.network, full.reference) == 2 * base
    assert all(p.requires_grad for p in full.network.parameters())
    assert not any(p.requires_grad for p in full.reference.parameters())
    # both references compute the base model: same errors at initialisation (B = 0)
    x0, cond, noise = probe(policy)
    x_w, x_l = x0[:1], x0[1:]
    one = {k: v[:1] for k, v in noise.items()}
    cond1 = {k: v[:1] for k, v in cond.items()}
    e_shared = shared.errors(x_w, x_l, cond1, one)
    e_copied = copied.errors(x_w, x_l, cond1, one)
    for a, b in zip(e_shared, e_copied):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(e_shared[0], e_shared[2])   # θ = ref at init


def test_trained_adapter_reloads_with_peft_and_reproduces_outputs(tmp_path):
    rec = recipe()
    policy = build_dit_policy(rec)
    module = build_dpo_module(rec, policy)
    x0, cond, noise = probe(policy)
    base_out = outputs(policy, module.network, x0, cond, noise)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    one = {k: v[:1] for k, v in noise.items()}
    cond1 = {k: v[:1] for k, v in cond.items()}
    for _ in range(5):
        out = module(x0[:1], x0[1:], cond1, one)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    trained = outputs(policy, module.network, x0, cond, noise)
    assert (trained - base_out).abs().max() > 1e-4   # the adapters changed the model
    with adapters_disabled(module.network):
        torch.testing.assert_close(outputs(policy, module.network, x0, cond, noise), base_out)

    folder = save_adapter(module.network, tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert all(".lora_" in k for k in load_file(str(folder / "adapter_model.safetensors")))

    fresh_policy = build_dit_policy(rec)   # same recipe seed: the same base weights, no adapters
    fresh = load_adapter(fresh_policy.network, folder)
    torch.testing.assert_close(outputs(fresh_policy, fresh, x0, cond, noise), trained, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(build_dit_policy(rec).network, tmp_path)


def test_bad_targets_name_the_setting():
    with pytest.raises(ValueError, match="videogpa.lora.targets"):
        build_dpo_module(recipe("videogpa.lora.targets=[nonexistent]"), build_dit_policy(recipe()))


def test_saved_adapter_loads_through_the_recipe(tmp_path):
    """GeoForge's own adapter (peft folder, regex targets) loads with ``videogpa.policy.adapter`` and is
    what the next DPO run continues."""
    rec = recipe()
    policy = build_dit_policy(rec)
    module = build_dpo_module(rec, policy)
    with torch.no_grad():
        for name, p in module.network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x0, cond, noise = probe(policy)
    tuned = outputs(policy, module.network, x0, cond, noise)
    folder = save_adapter(module.network, tmp_path / "adapter")
    again = recipe(f"videogpa.policy.adapter={folder}")
    loaded = build_policy(again)
    assert loaded.adapter.rank == 8 and loaded.adapter.targets == [r".*blocks\.\d+\.(qkv|proj)"]
    torch.testing.assert_close(outputs(loaded, loaded.network, x0, cond, noise), tuned, rtol=0, atol=0)
    continued = build_dpo_module(again, loaded)
    assert continued.network is loaded.adapter.network and continued.reference is None
    with adapters_disabled(continued.network):
        base = build_dit_policy(rec)
        torch.testing.assert_close(outputs(loaded, continued.network, x0, cond, noise),
                                   outputs(base, base.network, x0, cond, noise))

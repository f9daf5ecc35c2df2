"""VideoGPA's released LoRA adapters (Hongyang-Du/VideoGPA @ fb86241f) load into the diffusers policies.

Files shaped like the release are written with random tensors: peft's ``save_pretrained`` layout
(``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_{A,B}.weight``) with the official
module names - diffusers' CogVideoX names for CogVideoX-5B-I2V (and the repository's
``checkpoints/VideoGPA-I2V-lora/adapter_config.json``), the original Wan2.2 ``WanModel`` names
(``blocks.N.self_attn.q`` ...) for Wan2.2-TI2V-5B, whose release has no adapter_config.json. The loaded
policy must equal the base with the LoRA merged by hand (W + scale * alpha / r * B A), in the network's
prediction and in generation; bad files fail naming the key and the file; DPO continues the adapter with
the base as reference; GeoForge's saved adapter loads back to the same network. Nothing is downloaded."""
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers", reason="the diffusers policies are an optional extra (pip install diffusers)")

from geoforge.engine.config import ConfigError, load_recipe  # noqa: E402
from geoforge.engine.videogpa.config import PolicyConfig  # noqa: E402
from geoforge.engine.videogpa.lora import adapters_disabled, save_adapter  # noqa: E402
from geoforge.engine.videogpa.policy import Condition, build_policy  # noqa: E402
from geoforge.engine.videogpa.train_dpo import build_dpo_module  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_diffusers_policies import TINY as ONE_LAYER  # noqa: E402

LAYERS = 2   # the tiny policies of test_diffusers_policies with two layers (the key mapping numbers blocks)
TINY = {kind: {**cfg, "transformer": {**cfg["transformer"], "num_layers": LAYERS}} for kind, cfg in ONE_LAYER.items()}
KINDS = list(TINY)
RANK, ALPHA = 64, 128.0        # the release's LoRA (adapter_config.json; train/*/03_train.py defaults)

# checkpoints/VideoGPA-I2V-lora/adapter_config.json of Hongyang-Du/VideoGPA @ fb86241f, verbatim
COGVIDEOX_CONFIG = {
    "alpha_pattern": {}, "auto_mapping": {"base_model_class": "CogVideoXTransformer3DModel",
                                          "parent_library": "diffusers.models.transformers.cogvideox_transformer_3d"},
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 128.0, "lora_bias": False,
    "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "peft_type": "LORA", "r": 64, "rank_pattern": {}, "revision": None, "target_modules": ["to_v", "to_k", "to_q", "to_out.0"],
    "task_type": None, "trainable_token_indices": None, "use_dora": False, "use_rslora": False,
}
# what peft's save_pretrained would write for train/Wan2.2-TI2V-5B/03_train.py (not in the repository)
WAN_CONFIG = {**COGVIDEOX_CONFIG, "auto_mapping": {"base_model_class": "WanModel", "parent_library": "wan.modules.model"},
              "target_modules": ["q", "k", "v", "o"]}

# official module -> GeoForge (diffusers) module, written out independently of engine/videogpa/adapters.py
COGVIDEOX_MODULES = {f"transformer_blocks.{i}.attn1.{p}": f"transformer_blocks.{i}.attn1.{p}"
                     for i in range(LAYERS) for p in ("to_q", "to_k", "to_v", "to_out.0")}
WAN_MODULES = {f"blocks.{i}.{a}.{o}": f"blocks.{i}.{b}.{d}" for i in range(LAYERS)
               for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
               for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))}
MODULES = {"cogvideox_i2v": COGVIDEOX_MODULES, "wan_ti2v": WAN_MODULES}


def recipe(kind, **policy):
    rec = load_recipe("videogpa_tiny", ["videogpa.generate.frames=9", "videogpa.generate.height=32",
                                        "videogpa.generate.width=32"])
    rec.videogpa.policy = PolicyConfig(kind=kind, tiny_config=TINY[kind], text_encoder=False, max_text_tokens=8, **policy)
    return rec


def release_tensors(kind, seed=0):
    """Random LoRA tensors with the official keys: {official module: (A [r, in], B [out, r])}."""
    base = build_policy(recipe(kind)).network
    modules = dict(base.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for official, ours in MODULES[kind].items():
        linear = modules[ours]
        out[official] = (torch.randn(RANK, linear.in_features, generator=g) * 0.1,
                         torch.randn(linear.out_features, RANK, generator=g) * 0.1)
    return out


def write_release(folder, kind, lora, config=True, drop=None, rename=None):
    """An adapter folder as the release has it (peft save_pretrained keys; config as published)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, (a, b) in lora.items():
        state[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
        state[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
    if drop:
        del state[drop]
    if rename:
        state[rename[1]] = state.pop(rename[0])
    save_file(state, str(folder / "adapter_model.safetensors"))
    if config:
        (folder / "adapter_config.json").write_text(json.dumps(COGVIDEOX_CONFIG if kind == "cogvideox_i2v" else WAN_CONFIG))
    return folder


def merged_by_hand(kind, lora, scale):
    """A fresh base policy whose weights are W + scale * alpha / r * B A (no peft)."""
    policy = build_policy(recipe(kind))
    modules = dict(policy.network.named_modules())
    with torch.no_grad():
        for official, (a, b) in lora.items():
            w = modules[MODULES[kind][official]].weight
            w += scale * ALPHA / RANK * (b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float())
    return policy


def probe(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = policy.batch_condition([policy.prepare_condition(Condition(key="x", first_frame=torch.rand(3, 32, 32, generator=g)))])
    x0 = policy.encode(torch.rand(2, 9, 3, 32, 32, generator=g))
    cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    return x0, cond, policy.draw_noise(tuple(x0.shape), g)


def prediction(policy, network, x0, cond, noise):
    with torch.no_grad():
        return policy.predict(network, policy.add_noise(x0, noise), noise, cond)


@pytest.mark.parametrize("kind, scale", [("cogvideox_i2v", 1.0), ("wan_ti2v", 0.2)])
def test_release_equals_the_hand_merged_lora(kind, scale, tmp_path):
    lora = release_tensors(kind)
    folder = write_release(tmp_path / "release", kind, lora, config=kind == "cogvideox_i2v")
    extra = {} if kind == "cogvideox_i2v" else {"adapter_alpha": ALPHA}   # the Wan release has no config
    policy = build_policy(recipe(kind, adapter=str(folder), adapter_scale=scale, **extra))
    loaded = policy.adapter
    assert (loaded.rank, loaded.alpha, loaded.scale) == (RANK, ALPHA, scale)
    assert loaded.layout == ("wan_official" if kind == "wan_ti2v" else "identity")
    assert policy.pipe.transformer is policy.network   # generation goes through the adapted network
    expected = merged_by_hand(kind, lora, scale)
    base = build_policy(recipe(kind))
    x0, cond, noise = probe(policy)
    got = prediction(policy, policy.network, x0, cond, noise)
    want = prediction(expected, expected.network, x0, cond, noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - prediction(base, base.network, x0, cond, noise)).abs().max() > 1e-3   # the adapter matters
    with adapters_disabled(loaded.network):
        torch.testing.assert_close(prediction(policy, policy.network, x0, cond, noise),
                                   prediction(base, base.network, x0, cond, noise))
    # generation: the pipeline samples with the adapter (same videos as the hand-merged weights)
    cond1 = policy.prepare_condition(Condition(key="y", first_frame=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))))
    videos = policy.sample(cond1, seeds=[3], steps=2, guidance=3.0)
    reference = expected.sample(cond1, seeds=[3], steps=2, guidance=3.0)
    assert int(abs(videos.astype(int) - reference.astype(int)).max()) <= 1


def test_wan_release_with_its_peft_config(tmp_path):
    """With an adapter_config.json as peft writes it for WanModel (targets q/k/v/o), the same network."""
    lora = release_tensors("wan_ti2v")
    with_config = build_policy(recipe("wan_ti2v", adapter=str(write_release(tmp_path / "a", "wan_ti2v", lora))))
    assert with_config.adapter.targets == ["to_k", "to_out.0", "to_q", "to_v"]
    bare = build_policy(recipe("wan_ti2v", adapter=str(write_release(tmp_path / "b", "wan_ti2v", lora, config=False)
                                                        / "adapter_model.safetensors"), adapter_alpha=ALPHA))
    x0, cond, noise = probe(bare)
    torch.testing.assert_close(prediction(bare, bare.network, x0, cond, noise),
                               prediction(with_config, with_config.network, x0, cond, noise))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_files_name_the_key_and_the_file(kind, tmp_path):
    lora = release_tensors(kind)
    first = next(iter(MODULES[kind]))
    key = f"base_model.model.{first}.lora_B.weight"
    folder = write_release(tmp_path / "missing", kind, lora, drop=key)
    extra = {"adapter_alpha": ALPHA} if kind == "wan_ti2v" else {}
    with pytest.raises(ValueError, match=rf"adapter {folder}/adapter_model\.safetensors.*missing keys: {re.escape(key)}"):
        build_policy(recipe(kind, adapter=str(folder)))
    wrong = key.replace("lora_B", "lora_up")
    folder = write_release(tmp_path / "renamed", kind, lora, rename=(key, wrong))
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors.*unexpected keys: {re.escape(wrong)}"):
        build_policy(recipe(kind, adapter=str(folder)))
    other = dict(lora)
    a, b = other[first]
    other[first] = (a[:8], b[:, :8])   # rank 8 in one module, 64 elsewhere
    folder = write_release(tmp_path / "shape", kind, other)
    with pytest.raises(ValueError, match=rf"wrong shape keys: {re.escape(key.replace('lora_B', 'lora_A'))}"):
        build_policy(recipe(kind, adapter=str(folder), **extra))


def test_missing_alpha_and_recipe_keys(tmp_path):
    folder = write_release(tmp_path / "wan", "wan_ti2v", release_tensors("wan_ti2v"), config=False)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*videogpa\.policy\.adapter_alpha"):
        build_policy(recipe("wan_ti2v", adapter=str(folder)))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        build_policy(recipe("wan_ti2v", adapter=str(tmp_path)))
    with pytest.raises(ValueError, match=r"contradicts lora_alpha=128\.0 of .*adapter_config\.json"):
        build_policy(recipe("cogvideox_i2v", adapter=str(write_release(tmp_path / "cog", "cogvideox_i2v", release_tensors(
            "cogvideox_i2v"))), adapter_alpha=64.0))
    (tmp_path / "cog" / "adapter_config.json").write_text(json.dumps({**COGVIDEOX_CONFIG, "use_dora": True}))
    with pytest.raises(ValueError, match=r"cog/adapter_config\.json: use_dora=True is not supported"):
        build_policy(recipe("cogvideox_i2v", adapter=str(tmp_path / "cog")))
    with pytest.raises(ConfigError, match=r"policy\.adapter_scale"):
        load_recipe("videogpa_tiny", ["videogpa.policy.adapter=x", "videogpa.policy.adapter_scale=0"])
    with pytest.raises(ConfigError, match=r"policy\.adapter_scale"):
        load_recipe("videogpa_tiny", ["videogpa.policy.adapter_scale=0.2"])   # no adapter to scale
    rec = load_recipe("videogpa_tiny", ["videogpa.policy.adapter=hf://owner/repo/lora", "videogpa.policy.adapter_scale=0.2",
                                        "videogpa.policy.adapter_alpha=128"])
    assert (rec.videogpa.policy.adapter_scale, rec.videogpa.policy.adapter_alpha) == (0.2, 128.0)


def test_hub_reference_goes_through_engine_weights(tmp_path, monkeypatch):
    import geoforge.engine.videogpa.adapters as adapters

    lora = release_tensors("cogvideox_i2v")
    folder = write_release(tmp_path / "repo" / "VideoGPA-I2V-lora", "cogvideox_i2v", lora)
    asked = []

    def fake_hub_file(repo_id, filename, revision=None, local_files_only=False):
        asked.append((repo_id, filename, revision))
        path = tmp_path / "repo" / filename
        return path if path.is_file() else None
    monkeypatch.setattr(adapters, "hub_file", fake_hub_file)
    policy = build_policy(recipe("cogvideox_i2v", adapter="hf://someone/videogpa@v1/VideoGPA-I2V-lora"))
    assert asked == [("someone/videogpa", "VideoGPA-I2V-lora/adapter_model.safetensors", "v1"),
                     ("someone/videogpa", "VideoGPA-I2V-lora/adapter_config.json", "v1")]
    assert policy.adapter.files.weights == folder / "adapter_model.safetensors"


@pytest.mark.parametrize("kind", KINDS)
def test_dpo_continues_the_adapter_and_saved_adapter_round_trips(kind, tmp_path):
    lora = release_tensors(kind)
    folder = write_release(tmp_path / "release", kind, lora, config=kind == "cogvideox_i2v")
    extra = {} if kind == "cogvideox_i2v" else {"adapter_alpha": ALPHA}
    rec = recipe(kind, adapter=str(folder), adapter_scale=0.2, **extra)
    policy = build_policy(rec)
    module = build_dpo_module(rec, policy)
    assert module.reference is None and module.network is policy.adapter.network
    trainable = {n for n, p in module.network.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.network.named_parameters()}
    base = build_policy(recipe(kind))
    x0, cond, noise = probe(policy)
    x_w, x_l = x0[:1], x0[1:]
    one = {k: v[:1] for k, v in noise.items()}
    cond1 = {k: v[:1] for k, v in cond.items()}
    e_w, e_l, r_w, r_l = module.errors(x_w, x_l, cond1, one)
    torch.testing.assert_close(r_w, base.per_sample_error(base.network, x_w, cond1, one))   # ref = base, no adapter
    assert float((e_w - r_w).detach().abs()) > 0                                               # θ starts at the adapter
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    out = module(x_w, x_l, cond1, one)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    changed = {n for n, p in module.network.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable   # only adapter weights moved
    trained = prediction(policy, module.network, x0, cond, noise)

    saved = save_adapter(module.network, tmp_path / "ours", diffusers_pipeline=policy.diffusers_pipeline_class)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, pytest.approx(ALPHA * 0.2))   # the scale is kept
    again = build_policy(recipe(kind, adapter=str(saved)))
    assert again.adapter.layout == "identity"
    torch.testing.assert_close(prediction(again, again.network, x0, cond, noise), trained, rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_from_the_adapter_merges_it(tmp_path):
    kind = "cogvideox_i2v"
    lora = release_tensors(kind)
    rec = recipe(kind, adapter=str(write_release(tmp_path / "release", kind, lora)))
    rec.videogpa.lora.enabled = False
    policy = build_policy(rec)
    x0, cond, noise = probe(policy)
    adapted = prediction(policy, policy.network, x0, cond, noise)
    module = build_dpo_module(rec, policy)
    assert policy.adapter is None and module.reference is not None
    assert not any("lora_" in n for n, _ in module.network.named_parameters())
    assert all(p.requires_grad for p in module.network.parameters())
    torch.testing.assert_close(prediction(policy, module.network, x0, cond, noise), adapted, rtol=1e-4, atol=1e-5)
    base = build_policy(recipe(kind))
    torch.testing.assert_close(prediction(policy, module.reference, x0, cond, noise),
                               prediction(base, base.network, x0, cond, noise))


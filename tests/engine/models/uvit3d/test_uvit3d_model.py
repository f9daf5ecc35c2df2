"""U-ViT3D structure: the full RealEstate10K key list, strict loading, checkpointing, features, config errors."""
import json
from pathlib import Path

import pytest
import torch

from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.uvit3d import RE10K, UViT3D, UViT3DConfig, num_params

DATA = Path(__file__).resolve().parents[3] / "data" / "uvit3d"
SMALL = UViT3DConfig(channels=[32, 32, 16, 32], emb_channels=32, num_updown_blocks=[1, 1, 2], num_mid_blocks=1,
                     num_heads=1, resolution=32, max_frames=2)


def _tsv():
    rows = [line.split("\t") for line in (DATA / "dfot_uvit3d_re10k_state_dict.tsv").read_text().splitlines()[1:]]
    return [(k, [int(v) for v in s.strip("[]").split(",")]) for k, s in rows]


def test_re10k_keys_and_shapes_match_the_reference_on_meta():
    ref = json.loads((DATA / "dfot_uvit3d_re10k_config.json").read_text())
    with torch.device("meta"):   # no 458M-parameter allocation
        model = UViT3D.from_dfot_config(ref["constructor"])
    state = model.state_dict()
    rows = _tsv()
    assert len(rows) == ref["state_dict_num_keys"] == 496
    assert [(k, list(v.shape)) for k, v in state.items()] == rows   # same keys, shapes and order
    assert sum(p.numel() for p in model.parameters()) == ref["parameter_count"] == 458_818_051
    assert sum(v.numel() for v in state.values()) == ref["state_dict_num_elements"]
    buffers = {k for k, _ in model.named_buffers()}
    assert buffers == set(ref["state_dict_non_parameter_keys"])
    assert model.cfg == RE10K and num_params(RE10K) == 458_818_051


def test_strict_load_of_official_keys_and_mismatch_errors():
    model = UViT3D(SMALL)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    other = UViT3D(SMALL)
    other.load_state_dict(state, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**state, "diffusion_model.model.embed_input.proj.bias": state["embed_input.proj.bias"]})
    del state["noise_level_pos_embedding.timesteps.freqs"]   # the Fourier buffers are persistent
    with pytest.raises(RuntimeError, match="freqs"):
        other.load_state_dict(state)


def _inputs(batch=2, frames=2, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 3, res, res, generator=g)
    noise = torch.randn(batch, frames, generator=g)
    k = torch.tensor([0.5, 0.6, 0.55, 0.45]).expand(batch, frames, 4)   # fx fy cx cy, normalised
    rt = torch.cat([torch.eye(3), torch.zeros(3, 1)], -1).repeat(batch, frames, 1, 1)
    rt[:, 1:, 0, 3] = 0.3   # later frames translated
    poses = torch.cat([k, rt.flatten(-2)], -1)
    return x, noise, poses


def _randomized(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    model = UViT3D(cfg, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return model


def test_activation_checkpointing_and_folding_give_the_same_gradients():
    """Gradients of every parameter agree: plain, checkpointed, pose folded into FiLM (+ checkpointed), with a
    pose-dropped clip in the batch."""
    x, noise, poses = _inputs()
    grads = []
    for ckpt, fold in ((False, "never"), (True, "never"), (False, "always"), (True, "always")):
        model = _randomized(SMALL, fold_pose=fold)
        if ckpt:
            assert enable_activation_checkpointing(model.blocks()) == len(model.blocks()) > 0
        for m in model.modules():   # dropout off, checkpointing on (it runs in training mode only)
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.external_cond_embedding.dropout = 0.0
        model.train()
        out, feats = model(x, noise, poses16=poses, drop_cond=torch.tensor([False, True]), return_features=(3,))
        (out.square().mean() + feats[3].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_features_cameras_and_intrinsics_form_agree():
    """``intrinsics`` / ``extrinsics`` in GeoForge's pixel convention give the same rays as the raw poses."""
    from geoforge.engine.models.uvit3d import poses16_from_cameras
    x, noise, poses = _inputs(batch=1)
    model = _randomized(SMALL).eval()
    k = torch.zeros(1, 2, 3, 3)
    k[..., 0, 0], k[..., 1, 1] = poses[..., 0] * 32, poses[..., 1] * 32
    k[..., 0, 2], k[..., 1, 2] = poses[..., 2] * 32 - 0.5, poses[..., 3] * 32 - 0.5
    k[..., 2, 2] = 1
    ext = poses[..., 4:].unflatten(-1, (3, 4))
    torch.testing.assert_close(poses16_from_cameras(k, ext, 32, 32), poses)
    with torch.no_grad():
        a, fa = model(x, noise, poses16=poses, return_features=(1, 4, 7))
        b = model(x, noise, intrinsics=k, extrinsics=ext)
    torch.testing.assert_close(a, b)
    assert [tuple(f.shape) for f in fa.values()] == [(1, 2, 16, 16, 32), (1, 2, 2, 2, 32), (1, 2, 16, 16, 32)]
    with pytest.raises(ValueError, match="return_features"):
        model(x, noise, poses16=poses, return_features=(0,))
    with pytest.raises(ValueError, match="cameras"):
        model(x, noise)


def test_zero_init_like_dfot_outputs_zero():
    x, noise, poses = _inputs(batch=1)
    out = UViT3D(SMALL).eval()(x, noise, poses16=poses)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("change, key", [
    ({"channels": [30, 32, 16, 32]}, "channels\\[0\\]"),
    ({"num_heads": 3}, "channels\\[2\\]"),
    ({"block_types": ["ResBlock", "Conv", "TransformerBlock", "TransformerBlock"]}, "block_types"),
    ({"num_updown_blocks": [1, 1]}, "num_updown_blocks"),
    ({"resolution": 36}, "resolution"),
    ({"block_dropouts": [0.1, 0.0, 0.1, 0.1]}, "block_dropouts\\[0\\]"),
])
def test_config_errors_name_the_field(change, key):
    from dataclasses import replace
    with pytest.raises(ValueError, match=key):
        replace(SMALL, **change).validate()

"""VGGT structure and forward: the 1B key list, configs from official constructor arguments, output shapes,
DPT frame chunking, the track head, and the head activations' exact official expressions."""
import copy
from pathlib import Path

import pytest
import torch

from geoforge.engine.models.vggt import VGGT, config_from_hub, resolve_config
from geoforge.engine.models.vggt.activations import activate_head, inverse_log_transform
from geoforge.engine.models.vggt.config import normalise_config

# Copy of shared/reference/vggt_1b_state_dict.tsv (official VGGT() at upstream commit 44b3afbd).
REFERENCE = Path(__file__).resolve().parents[3] / "data" / "vggt" / "vggt_1b_state_dict.tsv"

# Official constructor arguments (argument names of Aggregator / CameraHead / DPTHead / TrackHead).
TINY = {
    "aggregator": dict(img_size=28, patch_size=14, embed_dim=16, depth=4, num_heads=2, mlp_ratio=4.0,
                       num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True, patch_embed="conv",
                       aa_order=["frame", "global"], aa_block_size=1, qk_norm=True, rope_freq=100,
                       init_values=0.01),
    "camera_head": dict(dim_in=32, trunk_depth=1, pose_encoding_type="absT_quaR_FoV", num_heads=2, mlp_ratio=4,
                        init_values=0.01, trans_act="linear", quat_act="linear", fl_act="relu"),
    "depth_head": dict(dim_in=32, patch_size=14, features=8, out_channels=[4, 8, 16, 16],
                       intermediate_layer_idx=[0, 1, 2, 3], pos_embed=True, feature_only=False, down_ratio=1,
                       output_dim=2, activation="exp", conf_activation="expp1"),
    "point_head": dict(dim_in=32, patch_size=14, features=8, out_channels=[4, 8, 16, 16],
                       intermediate_layer_idx=[0, 1, 2, 3], pos_embed=True, feature_only=False, down_ratio=1,
                       output_dim=4, activation="inv_log", conf_activation="expp1"),
    "track_head": None,
}


def read_reference():
    rows = REFERENCE.read_text().splitlines()
    assert rows[0].split("\t") == ["key", "shape", "dtype"]
    out = []
    for row in rows[1:]:
        key, shape, dtype = row.split("\t")
        assert dtype == "float32"
        out.append((key, [int(x) for x in shape.strip("[]").split(",")]))
    return out


def test_vggt_1b_state_dict_equals_the_official_key_list():
    with torch.device("meta"):
        model = VGGT()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    ref = read_reference()
    assert len(ref) == 1797
    assert [k for k, _ in ours] == [k for k, _ in ref]  # same keys, same order
    assert ours == ref  # and the same shapes
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert sum(v.numel() for v in model.state_dict().values()) == 1_256_537_516
    assert not list(model.buffers())  # the ImageNet mean/std are not state
    assert model.aggregator.patch_start_idx == 5
    assert model.depth_head.intermediate_layer_idx == [4, 11, 17, 23]


def test_hub_config_json_translates_to_the_same_model():
    hub = {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_camera": True, "enable_point": False,
           "enable_depth": True, "enable_track": False}
    cfg = normalise_config(hub)
    assert cfg == resolve_config(config_from_hub(hub))
    assert cfg["point_head"] is None and cfg["track_head"] is None
    assert cfg["camera_head"]["dim_in"] == 2048 and cfg["depth_head"]["patch_size"] == 14
    assert resolve_config(None) == resolve_config({})  # VGGT-1B


@pytest.mark.parametrize("head", ["camera_head", "depth_head", "point_head", "track_head"])
def test_from_config_with_a_head_set_to_none(head):
    cfg = copy.deepcopy(TINY)
    cfg["track_head"] = None
    cfg[head] = None
    model = VGGT.from_config(cfg).eval()
    assert getattr(model, head) is None
    assert not any(k.startswith(head + ".") for k in model.state_dict())
    out = model(torch.rand(1, 2, 3, 28, 42))
    produced = {"camera_head": "pose_enc", "depth_head": "depth", "point_head": "world_points"}
    for name, key in produced.items():
        assert (key in out) == (getattr(model, name) is not None)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown VGGT config key"):
        resolve_config({"aggregatr": {}})
    with pytest.raises(ValueError, match=r"camera_head.*unknown argument.*depth"):
        resolve_config({"camera_head": {"depth": 3}})
    with pytest.raises(ValueError, match="aggregator.*cannot be None"):
        resolve_config({"aggregator": None})
    with pytest.raises(ValueError, match="patch_embed"):
        VGGT.from_config({"aggregator": dict(embed_dim=16, depth=1, num_heads=2, patch_embed="vit")})
    with pytest.raises(ValueError, match="outputs 384-d tokens"):
        VGGT.from_config({"aggregator": dict(embed_dim=16, depth=1, num_heads=2, patch_embed="dinov2_vits14_reg")})
    with pytest.raises(ValueError, match="divisible by aa_block_size"):
        VGGT.from_config({"aggregator": dict(embed_dim=16, depth=3, num_heads=2, patch_embed="conv",
                                             aa_block_size=2)})


def test_forward_output_shapes_and_conventions():
    model = VGGT.from_config(TINY).eval()
    b, s, h, w = 2, 3, 28, 42
    images = torch.rand(b, s, 3, h, w)
    with torch.no_grad():
        out = model(images)
        tokens, start = model.aggregator(images)
    assert list(out) == ["pose_enc", "pose_enc_list", "depth", "depth_conf", "world_points",
                         "world_points_conf", "images"]
    assert out["pose_enc"].shape == (b, s, 9)
    assert len(out["pose_enc_list"]) == 4 and out["pose_enc"] is out["pose_enc_list"][-1]
    assert out["depth"].shape == (b, s, h, w, 1) and out["depth_conf"].shape == (b, s, h, w)
    assert out["world_points"].shape == (b, s, h, w, 3) and out["world_points_conf"].shape == (b, s, h, w)
    assert out["images"] is images
    assert bool((out["depth"] > 0).all()) and bool((out["depth_conf"] >= 1).all())  # exp, 1 + exp
    assert bool((out["pose_enc"][..., 7:] >= 0).all())  # ReLU fields of view
    assert start == 5 and len(tokens) == 4
    assert all(t.shape == (b, s, 5 + (h // 14) * (w // 14), 32) for t in tokens)
    # a 4-D input is one clip; training mode drops "images"
    with torch.no_grad():
        one = model(images[0])
    torch.testing.assert_close(one["depth"][0], out["depth"][0])
    model.train()
    assert "images" not in model(images[:1, :2])


def test_dpt_frame_chunks_equal_one_pass():
    model = VGGT.from_config(TINY).eval()
    images = torch.rand(1, 5, 3, 28, 28)
    with torch.no_grad():
        whole = model(images, frames_chunk_size=None)
        chunked = model(images, frames_chunk_size=2)
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frames_chunk_size"):
        model(images, frames_chunk_size=0)


def test_track_head_outputs_only_with_query_points():
    # The track head's feature extractor reads aggregator layers [4, 11, 17, 23]: depth 24 is needed.
    cfg = {"aggregator": dict(img_size=28, patch_size=14, embed_dim=8, depth=24, num_heads=2, patch_embed="conv"),
           "camera_head": None, "depth_head": None, "point_head": None,
           "track_head": dict(features=8, iters=2, corr_levels=2, corr_radius=1, hidden_size=8)}
    model = VGGT.from_config(cfg).eval()
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        assert "track" not in model(images)
        out = model(images, query_points=torch.tensor([[3.0, 5.0], [20.0, 10.0], [41.0, 27.0]]))
    assert out["track"].shape == (1, 2, 3, 2) and out["vis"].shape == (1, 2, 3) and out["conf"].shape == (1, 2, 3)
    torch.testing.assert_close(out["track"][0, 0], torch.tensor([[3.0, 5.0], [20.0, 10.0], [41.0, 27.0]]))
    assert bool(((out["vis"] >= 0) & (out["vis"] <= 1)).all())


def test_dense_activations_use_the_official_expressions():
    y = torch.tensor([-3.0, -1e-4, 0.0, 2e-5, 0.5, 4.0])
    expected = torch.sign(y) * (torch.exp(torch.abs(y)) - 1.0)  # not expm1: bit-exact with the official
    assert torch.equal(inverse_log_transform(y), expected)
    out = torch.randn(2, 4, 3, 5)
    pts, conf = activate_head(out, "norm_exp", "expp1")
    xyz = out.permute(0, 2, 3, 1)[..., :3]
    d = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    assert torch.equal(pts, xyz / d * (torch.exp(d) - 1.0))
    assert torch.equal(conf, 1 + out[:, 3].exp())
    with pytest.raises(ValueError, match="conf_activation"):
        activate_head(out, "exp", "linear")

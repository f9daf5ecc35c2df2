"""``VGGT.from_pretrained``: local ``model.safetensors`` / ``model.pt`` (weights only), config.json in both
formats, strict key checks and clear errors; the hub path is only exercised offline."""
import json

import pytest
import torch
from safetensors.torch import save_file

from geoforge.engine.models.vggt import VGGT

CFG = {"aggregator": dict(img_size=28, patch_size=14, embed_dim=16, depth=2, num_heads=2, patch_embed="conv"),
       "camera_head": dict(trunk_depth=1, num_heads=2),
       "depth_head": dict(features=8, out_channels=[4, 8, 16, 16], intermediate_layer_idx=[0, 1, 1, 1]),
       "point_head": None, "track_head": None}


@pytest.fixture(scope="module")
def model():
    return VGGT.from_config(CFG).eval()


def same_outputs(a, b):
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        out_a, out_b = a(images), b(images)
    for key in ("pose_enc", "depth", "depth_conf"):
        assert torch.equal(out_a[key], out_b[key])


def test_save_and_load_safetensors_directory(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VGGT.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == model.config
    assert next(loaded.parameters()).device.type == "cpu"
    assert all(p.requires_grad for p in loaded.parameters())
    same_outputs(model, loaded)
    same_outputs(model, VGGT.from_pretrained(tmp_path / "model.safetensors"))  # a file works too


def test_load_weights_only_model_pt(model, tmp_path):
    # The official torch.hub layout: model.pt holding a plain state dict.
    torch.save(model.state_dict(), tmp_path / "model.pt")
    same_outputs(model, VGGT.from_pretrained(tmp_path, config=CFG))
    (tmp_path / "config.json").write_text(json.dumps(model.config))  # GeoForge's per-submodule format
    same_outputs(model, VGGT.from_pretrained(tmp_path))
    # the hub's config.json holds VGGT.__init__ arguments, translated (here: a DINOv2-L patch embed that
    # cannot give 16-d tokens, as in the official constructor); `config=` overrides it
    (tmp_path / "config.json").write_text(json.dumps(
        {"img_size": 28, "patch_size": 14, "embed_dim": 16, "enable_camera": True, "enable_point": False,
         "enable_depth": True, "enable_track": False}))
    with pytest.raises(ValueError, match="dinov2_vitl14_reg"):
        VGGT.from_pretrained(tmp_path)
    same_outputs(model, VGGT.from_pretrained(tmp_path, config=CFG))


def test_model_pt_is_read_weights_only(model, tmp_path):
    torch.save({"state_dict": model.state_dict(), "step": 3}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="plain state dict"):
        VGGT.from_pretrained(tmp_path, config=CFG)


def test_half_precision_checkpoint_is_cast_to_float32(model, tmp_path):
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = VGGT.from_pretrained(tmp_path, config=CFG)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        loaded(torch.rand(1, 2, 3, 28, 28))
    assert {p.dtype for p in VGGT.from_pretrained(tmp_path, config=CFG, dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16}


def test_errors_name_what_is_missing(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.pt in directory"):
        VGGT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing file/directory nor a hub id"):
        VGGT.from_pretrained(tmp_path / "nowhere" / "at" / "all")
    state = model.state_dict()
    state.pop("camera_head.trunk_norm.weight")
    state["camera_head.extra"] = torch.zeros(1)
    state["aggregator.camera_token"] = torch.zeros(1, 2, 1, 8)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        VGGT.from_pretrained(tmp_path, config=CFG)
    message = str(err.value)
    assert "camera_head.trunk_norm.weight" in message and "camera_head.extra" in message
    assert "aggregator.camera_token: file (1, 2, 1, 8) vs model (1, 2, 1, 16)" in message


def test_hub_id_offline_error_names_the_repo():
    pytest.importorskip("huggingface_hub")
    with pytest.raises(FileNotFoundError, match=r"facebook/VGGT-1B.*local directory"):
        VGGT.from_pretrained("facebook/VGGT-1B", local_files_only=True)

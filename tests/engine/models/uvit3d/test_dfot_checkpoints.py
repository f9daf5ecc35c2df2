"""Released-format DFoT / Geometry Forcing checkpoints: Lightning layout, EMA vs raw, strict errors naming the
file, refusal of code-executing pickles, conversion to safetensors.

The files here are shaped like the released ones (``torch.save`` of a Lightning dict whose ``state_dict`` holds
the backbone under ``diffusion_model.model.``; EMA either in ``optimizer_states[0]["ema"]`` in parameter order
or, for DFoT's lightweight releases, already in ``state_dict`` with ``pretrained_ema: True``) at a small
U-ViT3D config, with random tensors under the real keys."""
import os

import pytest
import torch
from safetensors.torch import load_file

from geoforge.engine.models.uvit3d.checkpoint import load_backbone_weights, main as weights_cli
from geoforge.engine.weights import save_safetensors
from geoforge.engine.models.uvit3d import UViT3D, UViT3DConfig

SMALL = UViT3DConfig(channels=[32, 32, 16, 32], emb_channels=32, num_updown_blocks=[1, 1, 2], num_mid_blocks=1,
                     num_heads=1, resolution=32, max_frames=2)
PREFIX = "diffusion_model.model."


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in UViT3D(SMALL).state_dict().items()}


def _lightning(raw, ema=None, pretrained_ema=False, prefix=PREFIX):
    names = [n for n, _ in UViT3D(SMALL).named_parameters()]
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.0",
            "state_dict": {prefix + k: v for k, v in raw.items()},
            "optimizer_states": [] if ema is None else [{"opt": {"state": {}, "param_groups": []},
                                                          "ema": [ema[n] for n in names], "current_step": 1000,
                                                          "decay": 0.9999, "every_n_steps": 1}],
            "lr_schedulers": [], "pretrained_ema": pretrained_ema}


def _assert_loaded(model, expected):
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_ema_in_optimizer_states_auto_ema_and_raw(tmp_path):
    raw, ema = _random_state(0), _random_state(1)
    path = tmp_path / "DFoT_16f_state_dict.ckpt"
    torch.save(_lightning(raw, ema), path)
    model = UViT3D(SMALL)
    assert load_backbone_weights(path, model, "auto").startswith("ema")
    # EMA covers parameters only: the Fourier buffers (freqs, phases) come from state_dict
    expected = {k: (ema[k] if "timesteps." not in k else raw[k]) for k in raw}
    _assert_loaded(model, expected)
    assert load_backbone_weights(path, model, "raw").startswith("raw")
    _assert_loaded(model, raw)


def test_pretrained_ema_release_format_and_compiled_prefix(tmp_path):
    raw = _random_state(2)
    path = tmp_path / "geometry_forcing_state_dict.ckpt"
    torch.save(_lightning(raw, pretrained_ema=True, prefix="diffusion_model._orig_mod.model."), path)
    model = UViT3D(SMALL)
    assert "pretrained_ema" in load_backbone_weights(path, model, "ema")
    _assert_loaded(model, raw)
    path2 = tmp_path / "raw_only.ckpt"
    torch.save(_lightning(raw), path2)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_backbone_weights(path2, model, "ema")


def test_mismatch_lists_missing_and_unexpected_keys_naming_the_file(tmp_path):
    raw = _random_state(3)
    del raw["mid_blocks.0.q_norm.weight"]
    raw["mid_blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.ckpt"
    torch.save(_lightning(raw), path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(path, UViT3D(SMALL))
    msg = str(err.value)
    assert str(path) in msg and "missing keys: mid_blocks.0.q_norm.weight" in msg
    assert "unexpected keys: mid_blocks.0.extra.weight" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {PREFIX + "embed_input.proj.bias": torch.zeros(32)}, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="refused"):
        load_backbone_weights(path, UViT3D(SMALL))
    assert not _Evil.marker.exists()


def test_convert_to_safetensors_and_load_it(tmp_path):
    raw, ema = _random_state(4), _random_state(5)
    src = tmp_path / "DFoT.ckpt"
    torch.save(_lightning(raw, ema), src)
    model = UViT3D(SMALL)
    load_backbone_weights(src, model, "ema")
    out = save_safetensors(model.state_dict(), tmp_path / "converted.safetensors")
    assert set(load_file(str(out))) == set(raw)
    again = UViT3D(SMALL)
    assert load_backbone_weights(out, again) == "the file's tensors"
    _assert_loaded(again, model.state_dict())
    assert weights_cli(["inspect", str(src)]) == 0


def test_cli_convert_needs_the_re10k_parameter_order_for_ema(tmp_path, capsys):
    raw = _random_state(6)
    src = tmp_path / "small_raw.ckpt"
    torch.save(_lightning(raw), src)
    assert weights_cli(["convert", str(src), str(tmp_path / "o.safetensors"), "--weights", "raw"]) == 0
    assert set(load_file(str(tmp_path / "o.safetensors"))) == set(raw)

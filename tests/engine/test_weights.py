"""engine.weights: local files, hf:// references (Hub call faked, never downloaded), strict loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from geoforge.engine.weights import load_into, load_state_dict, resolve_weights


def _state() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}


def test_loads_pth_and_safetensors(tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        for key in state:
            torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict(tmp_path / "nope.pth")


def test_rejects_non_state_dicts(tmp_path: Path) -> None:
    torch.save({"step": 3}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="meta.pt.*flat"):
        load_state_dict(tmp_path / "meta.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object: refused by weights_only
    with pytest.raises(ValueError, match="module.pt.*weights_only"):
        load_state_dict(tmp_path / "module.pt")


def test_hf_reference_goes_through_hf_hub_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(_state(), tmp_path / "file.pth")
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str | None, local_files_only: bool = False) -> str:
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "file.pth")

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_weights("hf://owner/repo/sub/dir/w.pth") == tmp_path / "file.pth"
    assert load_state_dict("hf://owner/repo@v1.0/w.pth").keys() == _state().keys()
    assert calls == [("owner/repo", "sub/dir/w.pth", None), ("owner/repo", "w.pth", "v1.0")]
    with pytest.raises(ValueError, match="hf://OWNER/REPO"):
        resolve_weights("hf://owner/repo")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_load_into_is_strict_and_names_the_keys() -> None:
    net = _Net()
    good = {k: torch.randn_like(v.float()) for k, v in net.state_dict().items() if "num_batches" not in k}
    load_into(net, good, source="good.pth")  # num_batches_tracked may be absent (TF ports)
    torch.testing.assert_close(net.conv.weight, good["conv.weight"])
    torch.testing.assert_close(net.bn.running_var, good["bn.running_var"])

    missing = {k: v for k, v in good.items() if k != "bn.bias"}
    with pytest.raises(ValueError, match=r"bad.pth.*missing keys: bn\.bias"):
        load_into(net, missing, source="bad.pth")
    extra = dict(good, **{"fc.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys: fc\.weight"):
        load_into(net, extra, source="bad.pth")
    load_into(net, extra, source="ok.pth", ignore=lambda k: k.startswith("fc."))
    shaped = dict(good, **{"conv.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"wrong shape keys: conv\.bias: file \(5,\) vs model \(4,\)"):
        load_into(net, shaped, source="bad.pth")

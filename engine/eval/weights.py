"""Loading pretrained metric networks' weights from a local file or the Hugging Face Hub.

A weights *source* is either

- a local path to a ``.safetensors`` file (read with safetensors) or a ``.pt`` / ``.pth`` / ``.bin``
  file holding a plain ``{name: tensor}`` state dict (read with ``torch.load(weights_only=True)``;
  nothing else is ever unpickled), or
- a Hub reference ``hf://OWNER/REPO/PATH/IN/REPO`` or ``hf://OWNER/REPO@REVISION/PATH/IN/REPO``,
  fetched (and cached) by ``huggingface_hub.hf_hub_download``.

``load_into`` copies a state dict into a module and fails with one message that names the source
and every missing, unexpected or mis-shaped key, instead of PyTorch's generic error.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

HF_PREFIX = "hf://"
# BatchNorm's step counter: absent from older/ported files, never used at inference.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def resolve_weights(source: str | os.PathLike) -> Path:
    """The local file behind ``source`` (a path, or ``hf://owner/repo[@rev]/file`` downloaded once)."""
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise ValueError(f"weights source {text!r}: expected hf://OWNER/REPO[@REVISION]/PATH/IN/REPO")
        repo, _, revision = parts[1].partition("@")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=f"{parts[0]}/{repo}", filename="/".join(parts[2:]),
                                    revision=revision or None))
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {text!r} does not exist (give a local .safetensors/.pt/.pth "
                                f"file or hf://OWNER/REPO/PATH/IN/REPO)")
    return path


def load_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict on CPU from ``source`` (see the module docstring)."""
    from engine.checkpoint import verify_file

    path = resolve_weights(source)
    verify_file(path)   # a file of a GeoForge checkpoint must match its manifest (names the file if not)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or corrupt file: say which file
            raise ValueError(f"weights file {path}: cannot be read as a tensor state dict with "
                             f"torch.load(weights_only=True) ({err})") from err
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {path}: expected a flat {{name: tensor}} state dict, "
                         f"got {type(state).__name__}")
    return dict(state)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
              ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Copy ``state`` into ``module`` strictly; keys for which ``ignore(key)`` is true are skipped.

    Raises ``ValueError`` naming ``source`` and the offending keys when keys are missing,
    unexpected, or have the wrong shape.
    """
    state = {k: v for k, v in state.items() if not ignore(k)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    problems = _describe("missing", missing) + _describe("unexpected", unexpected) + _describe(
        "wrong shape", shapes)
    if problems:
        raise ValueError(f"weights {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)


def _describe(what: str, keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    if not keys:
        return []
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return [f"{what} keys: {shown}"]

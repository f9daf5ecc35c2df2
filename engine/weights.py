"""Loading pretrained weights: the one module every loader goes through (models, eval networks, policies).

A weights *source* is

- a local ``.safetensors`` file (read with safetensors), or a ``.pt`` / ``.pth`` / ``.bin`` file holding a
  plain ``{name: tensor}`` state dict, read with ``torch.load(weights_only=True)``: nothing else is ever
  unpickled, and a file holding anything else is refused with a message naming it;
- a Hugging Face Hub file ``hf://OWNER/REPO/PATH/IN/REPO`` or ``hf://OWNER/REPO@REVISION/PATH/IN/REPO``,
  fetched (and cached) by ``huggingface_hub.hf_hub_download`` (:func:`hub_file` for a repo's file by name).

Then :func:`strip_prefix` / :func:`rename_keys` map the keys, and :func:`load_into` (or
:func:`check_state_dict` for a model built on the meta device) checks them strictly: one message names the
source and every missing, unexpected or mis-shaped key, instead of PyTorch's generic error.

Imports only the foundations ``engine.atomic`` and ``engine.checkpoint`` (its manifest check): any layer may use it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoforge.engine.errors import MissingInput

HF_PREFIX = "hf://"
# BatchNorm's step counter: absent from older/ported files, never used at inference.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def hub_file(repo_id: str, filename: str, revision: str | None = None,
             local_files_only: bool = False) -> Path | None:
    """A file of a Hub repo (downloaded once, then cached), or None when the repo has no such file.
    Raises when the Hub cannot be reached (or, with ``local_files_only``, the file is not cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                                    local_files_only=local_files_only))
    except EntryNotFoundError as err:
        if isinstance(err, LocalEntryNotFoundError):  # not cached and no download allowed: unreachable
            raise
        return None


def split_hub_ref(text: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/REPO[@REVISION][/PATH]`` -> ``(OWNER/REPO, REVISION or None, PATH)`` (PATH may be ""
    for the repo's root). ValueError naming ``text`` for anything else."""
    if not text.startswith(HF_PREFIX):
        raise ValueError(f"{text!r} is not a Hub reference (hf://OWNER/REPO[@REVISION]/PATH/IN/REPO)")
    parts = text[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"Hub reference {text!r}: expected hf://OWNER/REPO[@REVISION]/PATH/IN/REPO")
    repo, _, revision = parts[1].partition("@")
    if not repo:
        raise ValueError(f"Hub reference {text!r}: expected hf://OWNER/REPO[@REVISION]/PATH/IN/REPO")
    return f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:])


def resolve_weights(source: str | os.PathLike, local_files_only: bool = False) -> Path:
    """The local file behind ``source`` (a path, or ``hf://owner/repo[@rev]/file`` downloaded once)."""
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        repo_id, revision, file = split_hub_ref(text)
        if not file:
            raise ValueError(f"weights source {text!r}: expected hf://OWNER/REPO[@REVISION]/PATH/IN/REPO")
        path = hub_file(repo_id, file, revision, local_files_only)
        if path is None:
            raise MissingInput(f"weights source {text!r}: the Hub repo has no such file")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise MissingInput(f"weights file {text!r} does not exist (give a local .safetensors/.pt/.pth "
                           f"file or hf://OWNER/REPO/PATH/IN/REPO)")
    return path


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU (any structure of tensors and plain containers, e.g. a
    Lightning checkpoint); anything that needs arbitrary unpickling is refused naming the file, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or corrupt file: say which file, execute nothing
        raise ValueError(
            f"weights file {path}: refused - torch.load(weights_only=True) cannot read it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). GeoForge never unpickles arbitrary objects. If the "
            f"file is a checkpoint you trust, extract its tensors elsewhere, e.g. torch.save(torch.load(FILE, "
            f"weights_only=False)['state_dict'], OUT), and load OUT.") from err


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` as safetensors (contiguous CPU tensors), atomically."""
    from safetensors.torch import save_file

    from geoforge.engine.atomic import atomic_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return atomic_save(path, lambda tmp: save_file(tensors, str(tmp)))


def read_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict (on CPU) of a local ``.safetensors`` file or weights-only
    torch pickle; ValueError naming the file for anything else. A file of a GeoForge checkpoint is first
    checked against the checkpoint's manifest (``CheckpointError`` naming it if truncated or damaged)."""
    from geoforge.engine.checkpoint import verify_file

    path = Path(file)
    verify_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = read_torch_file(path)
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {path}: expected a plain state dict (a flat {{name: tensor}} mapping), "
                         f"got {type(state).__name__}")
    return dict(state)


def load_state_dict(source: str | os.PathLike, local_files_only: bool = False) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` of :func:`resolve_weights` (see the module docstring)."""
    return read_state_dict(resolve_weights(source, local_files_only))


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """When any key starts with ``prefix``, only those keys, without it (e.g. a wrapper's ``dit.``);
    otherwise ``state`` unchanged."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def rename_keys(state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """``{rename(k): v}``; keys that ``rename`` maps to None are dropped."""
    out = {}
    for k, v in state.items():
        new = rename(k)
        if new is not None:
            out[new] = v
    return out


def check_state_dict(expected: Mapping[str, torch.Size | torch.Tensor], state: Mapping[str, torch.Tensor], *,
                     source: str, what: str, optional: tuple[str, ...] = OPTIONAL_SUFFIXES) -> None:
    """Raise ValueError naming ``source``, ``what`` it should fit and every missing, unexpected or mis-shaped
    key, unless ``state`` has exactly the keys and shapes of ``expected`` (keys ending in ``optional`` may
    be absent)."""
    shape = {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in expected.items()}
    missing = [k for k in shape if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in shape]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {shape[k]}"
              for k in shape if k in state and tuple(state[k].shape) != shape[k]]
    problems = _describe("missing", missing) + _describe("unexpected", unexpected) + _describe(
        "wrong shape", shapes)
    if problems:
        raise ValueError(f"weights {source} do not fit {what}: " + "; ".join(problems))


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, what: str | None = None,
              ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Copy ``state`` into ``module`` strictly (:func:`check_state_dict`); keys for which ``ignore(key)`` is
    true are skipped. ``what`` names the module in errors (default: its class name)."""
    state = {k: v for k, v in state.items() if not ignore(k)}
    check_state_dict(module.state_dict(), state, source=source, what=what or type(module).__name__)
    module.load_state_dict(state, strict=False)


def _describe(what: str, keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    if not keys:
        return []
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return [f"{what} keys: {shown}"]


__all__ = ["HF_PREFIX", "OPTIONAL_SUFFIXES", "hub_file", "split_hub_ref", "resolve_weights", "read_torch_file", "read_state_dict",
           "load_state_dict", "save_safetensors",
           "strip_prefix", "rename_keys", "check_state_dict", "load_into"]

"""Finding and reading VGGT checkpoints: local files / directories or the Hugging Face hub.

Weights are read with safetensors (``model.safetensors``) or ``torch.load(weights_only=True)``
(``model.pt`` / ``*.pth`` / ``*.bin``); nothing is unpickled beyond tensors. A directory or hub repo may
also hold ``config.json`` (hub-style ``VGGT.__init__`` arguments or a GeoForge per-submodule config).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

WEIGHT_FILES = ("model.safetensors", "model.pt")
CONFIG_FILE = "config.json"


def _hub_download(repo_id: str, filename: str, local_files_only: bool) -> Path | None:
    """A file of a hub repo, or None when the repo has no such file. Raises if the hub is unreachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_files_only))
    except EntryNotFoundError as err:
        if isinstance(err, LocalEntryNotFoundError):  # not cached and no download allowed: unreachable
            raise
        return None


def locate(path_or_hub_id: str | Path, local_files_only: bool = False) -> tuple[Path, Path | None]:
    """``(weights file, config.json or None)`` for a local file, a local directory or a hub id."""
    path = Path(path_or_hub_id)
    if path.is_file():
        config = path.parent / CONFIG_FILE
        return path, config if config.is_file() else None
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / CONFIG_FILE
                return path / name, config if config.is_file() else None
        raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in directory {path}")
    repo_id = str(path_or_hub_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing file/directory nor a hub id (owner/name)")
    try:
        weights = None
        for name in WEIGHT_FILES:
            weights = _hub_download(repo_id, name, local_files_only)
            if weights is not None:
                break
        config = _hub_download(repo_id, CONFIG_FILE, local_files_only)
    except Exception as err:  # network, auth, offline mode, unknown repo
        raise FileNotFoundError(f"could not fetch VGGT weights from the Hugging Face hub repo {repo_id!r} "
                                f"({type(err).__name__}: {err}); pass a local directory holding "
                                f"{' or '.join(WEIGHT_FILES)} instead") from err
    if weights is None:
        raise FileNotFoundError(f"hub repo {repo_id!r} has none of {WEIGHT_FILES}")
    return weights, config


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only torch pickle (plain state dict)."""
    if file.suffix == ".safetensors":
        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a plain state dict (name -> tensor)")
    return state


def read_config(file: Path | None) -> dict[str, Any] | None:
    if file is None:
        return None
    with open(file) as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return cfg


def check_keys(model_keys: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a readable error listing missing / unexpected / mis-shaped keys (first few of each)."""
    missing = [k for k in model_keys if k not in state]
    unexpected = [k for k in state if k not in model_keys]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_keys[k])}"
              for k in model_keys if k in state and state[k].shape != model_keys[k]]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        raise ValueError(f"checkpoint {source} does not match the VGGT config: "
                         f"{len(missing)} missing [{head(missing)}], {len(unexpected)} unexpected "
                         f"[{head(unexpected)}], {len(shapes)} shape mismatches [{head(shapes)}]")

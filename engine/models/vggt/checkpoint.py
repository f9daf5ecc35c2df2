"""Finding VGGT checkpoints: local files / directories or the Hugging Face hub.

Weights are read by :mod:`engine.weights` (safetensors, or ``torch.load(weights_only=True)`` for
``model.pt`` / ``*.pth`` / ``*.bin``). A directory or hub repo may also hold ``config.json`` (hub-style
``VGGT.__init__`` arguments or a GeoForge per-submodule config).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geoforge.engine.weights import hub_file

WEIGHT_FILES = ("model.safetensors", "model.pt")
CONFIG_FILE = "config.json"


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
            weights = hub_file(repo_id, name, local_files_only=local_files_only)
            if weights is not None:
                break
        config = hub_file(repo_id, CONFIG_FILE, local_files_only=local_files_only)
    except Exception as err:  # network, auth, offline mode, unknown repo
        raise FileNotFoundError(f"could not fetch VGGT weights from the Hugging Face hub repo {repo_id!r} "
                                f"({type(err).__name__}: {err}); pass a local directory holding "
                                f"{' or '.join(WEIGHT_FILES)} instead") from err
    if weights is None:
        raise FileNotFoundError(f"hub repo {repo_id!r} has none of {WEIGHT_FILES}")
    return weights, config


def read_config(file: Path | None) -> dict[str, Any] | None:
    if file is None:
        return None
    with open(file) as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return cfg

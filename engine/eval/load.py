"""The model ``geoforge-eval`` samples: a recipe's backbone with a checkpoint's weights (GeoForge checkpoints, and
for DFoT's U-ViT3D the released DFoT / Geometry Forcing files)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

DFOT_WEIGHTS = {"ema": "auto", "model": "raw"}   # --weights -> load_backbone_weights' choice for DFoT / GF files


def resolve_checkpoint(path: str | Path, weights: str) -> Path:
    """The safetensors file behind ``path``: a file, ``step_N/{ema,model}.safetensors`` or a run's newest
    checkpoint whose file verifies (newer damaged ones are named in a warning). A file of a checkpoint
    must match the checkpoint's manifest (``engine.checkpoint.verify_file``; CheckpointError naming it)."""
    from geoforge.engine.checkpoint import CheckpointError, checkpoint_dirs, verify_file

    path = Path(path)
    if path.is_file():
        verify_file(path)
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / "checkpoints").is_dir():
        candidates = list(reversed(checkpoint_dirs(path)))
        if not candidates:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint in {path / 'checkpoints'}")
        for candidate in candidates:
            try:
                verify_file(candidate / f"{weights}.safetensors")
            except CheckpointError as err:
                warnings.warn(f"{err}; trying the previous checkpoint", stacklevel=2)
                continue
            path = candidate
            break
        else:
            raise CheckpointError(f"run directory {path}: no checkpoint has a {weights}.safetensors that verifies")
    file = path / f"{weights}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (--weights {weights}); the directory holds "
                                f"{sorted(p.name for p in path.iterdir())}")
    verify_file(file)
    return file


def load_model(recipe, checkpoint: str | Path, weights: str = "ema", device: torch.device | str = "cpu"
               ) -> torch.nn.Module:
    """The backbone of ``recipe.model.arch`` (``engine.models.arch.build_model``) with the weights of ``checkpoint``:
    a GeoForge checkpoint (directory, run directory or ``.safetensors`` file; keys with or without the
    ``dit.`` prefix), or, for ``uvit3d``, any other file or ``hf://`` reference (released DFoT / GF Lightning
    ``.ckpt``, ``.pt``) through ``engine.models.uvit3d.checkpoint.load_backbone_weights``."""
    from geoforge.engine.models.arch import build_model
    from geoforge.engine.weights import load_into, read_state_dict, strip_prefix

    model = build_model(recipe.model)
    text = str(checkpoint)
    released = text.startswith("hf://") or not (Path(text).is_dir() or text.endswith(".safetensors"))
    if recipe.model.arch == "uvit3d" and released:
        from geoforge.engine.models.uvit3d.checkpoint import load_backbone_weights

        chosen = load_backbone_weights(text, model, DFOT_WEIGHTS[weights])
        print(f"[eval] loaded {text}: {chosen}", file=sys.stderr, flush=True)
    else:
        file = resolve_checkpoint(checkpoint, weights)
        state = with_buffers(strip_prefix(read_state_dict(file), "dit."), file, model)
        load_into(model, state, source=str(file), what="the recipe's model (check --recipe / --set model.*)")
    return model.to(device).eval()


def with_buffers(state: dict[str, torch.Tensor], file: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus the persistent buffers it lacks, from ``model.safetensors`` beside an ``ema.safetensors``
    (the EMA tracks parameters only; e.g. the U-ViT3D's random Fourier noise-embedding buffers)."""
    from geoforge.engine.checkpoint import verify_file
    from geoforge.engine.weights import read_state_dict, strip_prefix

    missing = [k for k in model.state_dict() if k not in state and k not in dict(model.named_parameters())]
    sibling = Path(file).with_name("model.safetensors")
    if not missing or Path(file).name != "ema.safetensors" or not sibling.is_file():
        return state
    verify_file(sibling)
    raw = strip_prefix(read_state_dict(sibling), "dit.")
    return {**state, **{k: raw[k] for k in missing if k in raw}}

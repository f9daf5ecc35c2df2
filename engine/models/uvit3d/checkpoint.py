"""DFoT / Geometry Forcing checkpoints of the U-ViT3D: their key layout and weight choice, on top of the one
weights module (:mod:`engine.weights`: hub references, local files, ``weights_only`` reads, strict loads).

**Backbone weights** (``model.pretrained``, eval ``--checkpoint``): :func:`load_backbone_weights` also reads
the released DFoT / Geometry Forcing files (``DFoT_RE10K.ckpt``, ``DFoT_16f_state_dict.ckpt``,
``geometry_forcing*_state_dict.ckpt``), PyTorch Lightning checkpoints whose ``state_dict`` holds the
backbone under ``diffusion_model.model.`` (``diffusion_model._orig_mod.model.`` when saved compiled; DFoT
keeps only these keys when saving - the GF alignment projector is never in these files). Weight choice
(``pretrained_weights``), as DFoT's ``_load_ema_weights_to_state_dict``:

- ``pretrained_ema: True`` with empty ``optimizer_states``: the ``state_dict`` already holds the EMA weights
  (DFoT's "lightweight EMA-only" release format) - ``auto`` / ``ema`` / ``raw`` all read it;
- ``optimizer_states[0]["ema"]``: DFoT's EMA optimizer's list of EMA tensors, in the order of the backbone's
  ``named_parameters()`` (no buffers) - ``auto`` and ``ema`` use it, ``raw`` takes ``state_dict``;
- neither: ``auto`` / ``raw`` take ``state_dict``, ``ema`` fails.

To see which a file holds: ``geoforge-uvit3d-checkpoint inspect FILE`` (prints the top-level keys, the
``pretrained_ema`` flag, whether ``optimizer_states[0]`` has ``ema``, and the backbone key count);
``geoforge-uvit3d-checkpoint convert FILE OUT.safetensors [--weights ema|raw|auto]`` writes the chosen
backbone weights (prefix stripped) as safetensors. Files are only read with ``torch.load(weights_only=True)``:
one that needs arbitrary unpickling (e.g. Lightning ``hyper_parameters`` holding OmegaConf objects, or a
malicious pickle) is refused with a message, never executed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from geoforge.engine.models.uvit3d.config import RE10K
from geoforge.engine.models.uvit3d.model import UViT3D
from geoforge.engine.weights import load_into, read_state_dict, read_torch_file, resolve_weights, save_safetensors

DFOT_PREFIXES = ("diffusion_model._orig_mod.model.", "diffusion_model.model.")
WEIGHT_CHOICES = ("auto", "ema", "raw")


def strip_backbone_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys of a DFoT state dict without ``diffusion_model[._orig_mod].model.``; a state dict that has
    no such keys is returned as it is (already stripped)."""
    out = {}
    for k, v in state.items():
        for prefix in DFOT_PREFIXES:
            if k.startswith(prefix):
                out[k[len(prefix):]] = v
                break
    return out if out else dict(state)


def lightning_backbone_state(ckpt: Mapping[str, Any], param_names: list[str], weights: str = "auto",
                             source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The backbone state dict of a loaded DFoT Lightning checkpoint and which weights it is (module docstring).

    ``param_names``: the backbone's ``named_parameters()`` names in order (EMA tensors are matched by order)."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"model.pretrained_weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{source}: not a Lightning checkpoint (no 'state_dict' mapping; top-level keys "
                         f"{sorted(map(str, ckpt))[:10]})")
    state = strip_backbone_prefix(ckpt["state_dict"])
    opt_states = ckpt.get("optimizer_states") or []
    if ckpt.get("pretrained_ema", False) and len(opt_states) == 0:
        return state, "ema (the file's state_dict, pretrained_ema: true)"
    ema = opt_states[0].get("ema") if opt_states and isinstance(opt_states[0], Mapping) else None
    if weights == "raw" or (weights == "auto" and ema is None):
        return state, "raw (the file's state_dict" + (", which also has EMA weights)" if ema is not None else ")")
    if ema is None:
        raise ValueError(f"{source}: model.pretrained_weights=ema but the file has no EMA weights (no "
                         f"pretrained_ema flag, no optimizer_states[0]['ema']); use raw or auto")
    ema = list(ema)
    if len(ema) != len(param_names):
        raise ValueError(f"{source}: {len(ema)} EMA tensors for the backbone's {len(param_names)} parameters "
                         f"(DFoT matches them by order); use model.pretrained_weights=raw")
    state = dict(state)
    state.update(zip(param_names, ema))
    return state, "ema (optimizer_states[0]['ema'], matched by parameter order)"


def load_backbone_weights(source: str | os.PathLike, module: nn.Module, weights: str = "auto") -> str:
    """Load a backbone strictly from ``source`` (DFoT / GF Lightning ``.ckpt``, safetensors, a flat
    ``.pt``, or ``hf://``); returns which weights were used. Errors name the file and the keys."""
    path = resolve_weights(source)
    if path.suffix == ".safetensors":
        state, chosen = strip_backbone_prefix(read_state_dict(path)), "the file's tensors"
    else:
        obj = read_torch_file(path)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            names = [n for n, _ in module.named_parameters()]
            state, chosen = lightning_backbone_state(obj, names, weights, str(path))
        elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state, chosen = strip_backbone_prefix(obj), "the file's tensors"
        else:
            raise ValueError(f"weights file {path}: neither a Lightning checkpoint nor a flat state dict")
    load_into(module, state, source=str(path))
    return chosen


def _inspect(path: str) -> None:
    obj = read_torch_file(resolve_weights(path))
    if not isinstance(obj, Mapping):
        print(f"{path}: {type(obj).__name__}")
        return
    print(f"{path}: top-level keys {sorted(map(str, obj))}")
    if "state_dict" in obj:
        state = obj["state_dict"]
        back = [k for k in state if k.startswith(DFOT_PREFIXES)]
        opt = obj.get("optimizer_states") or []
        has_ema = bool(opt) and isinstance(opt[0], Mapping) and "ema" in opt[0]
        print(f"  state_dict: {len(state)} keys, {len(back)} backbone keys (diffusion_model[._orig_mod].model.*)")
        print(f"  pretrained_ema: {obj.get('pretrained_ema', False)}; optimizer_states: {len(opt)}; "
              f"optimizer_states[0]['ema']: {len(opt[0]['ema']) if has_ema else 'absent'}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="geoforge-uvit3d-checkpoint", description="Inspect or convert DFoT / GF "
                                 "checkpoints (torch.load weights_only=True only).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="what a checkpoint holds (EMA? prefixes?)")
    ins.add_argument("file")
    conv = sub.add_parser("convert", help="backbone weights -> safetensors (DFoT's RE10K U-ViT3D config)")
    conv.add_argument("file")
    conv.add_argument("out")
    conv.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            _inspect(args.file)
            return 0
        with torch.device("meta"):   # parameter order, for matching EMA tensors
            names = [n for n, _ in UViT3D(RE10K).named_parameters()]
        obj = read_torch_file(resolve_weights(args.file))
        state, chosen = (lightning_backbone_state(obj, names, args.weights, args.file)
                         if isinstance(obj, Mapping) and "state_dict" in obj else (strip_backbone_prefix(obj), "tensors"))
        save_safetensors(state, args.out)
        print(f"wrote {len(state)} tensors ({chosen}) to {args.out}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

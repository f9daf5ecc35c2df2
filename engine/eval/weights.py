"""Loading pretrained metric networks' weights from a local file or the Hugging Face Hub.

A weights *source* is either

- a local path to a ``.safetensors`` file (read with safetensors) or a ``.pt`` / ``.pth`` / ``.bin``
  file holding a plain ``{name: tensor}`` state dict (read with ``torch.load(weights_only=True)``;
  nothing else is ever unpickled), or
- a Hub reference ``hf://OWNER/REPO/PATH/IN/REPO`` or ``hf://OWNER/REPO@REVISION/PATH/IN/REPO``,
  fetched (and cached) by ``huggingface_hub.hf_hub_download``.

``load_into`` copies a state dict into a module and fails with one message that names the source
and every missing, unexpected or mis-shaped key, instead of PyTorch's generic error.

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

To see which a file holds: ``python -m engine.eval.weights inspect FILE`` (prints the top-level keys, the
``pretrained_ema`` flag, whether ``optimizer_states[0]`` has ``ema``, and the backbone key count);
``python -m engine.eval.weights convert FILE OUT.safetensors [--weights ema|raw|auto]`` writes the chosen
backbone weights (prefix stripped) as safetensors. Files are only read with ``torch.load(weights_only=True)``:
one that needs arbitrary unpickling (e.g. Lightning ``hyper_parameters`` holding OmegaConf objects, or a
malicious pickle) is refused with a message, never executed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_PREFIX = "hf://"
DFOT_PREFIXES = ("diffusion_model._orig_mod.model.", "diffusion_model.model.")
WEIGHT_CHOICES = ("auto", "ema", "raw")
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
    path = resolve_weights(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = read_torch_file(path)
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {path}: expected a flat {{name: tensor}} state dict, "
                         f"got {type(state).__name__}")
    return dict(state)


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; anything that needs arbitrary unpickling is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or corrupt file: say which file, execute nothing
        raise ValueError(
            f"weights file {path}: refused - torch.load(weights_only=True) cannot read it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). GeoForge never unpickles arbitrary objects. If the "
            f"file is a checkpoint you trust, extract its tensors elsewhere, e.g. torch.save(torch.load(FILE, "
            f"weights_only=False)['state_dict'], OUT), and load OUT.") from err


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
        state, chosen = strip_backbone_prefix(load_state_dict(path)), "the file's tensors"
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


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` as safetensors (contiguous CPU tensors), via a temporary file renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    return path


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

    ap = argparse.ArgumentParser(prog="python -m engine.eval.weights", description="Inspect or convert DFoT / GF "
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
        from engine.models.uvit3d import RE10K, UViT3D

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

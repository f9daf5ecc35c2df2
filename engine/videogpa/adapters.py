"""LoRA adapters from files onto a policy: VideoGPA's released adapters and GeoForge's own.

``videogpa.policy.adapter`` names a peft adapter: a folder with ``adapter_model.safetensors`` (and usually
``adapter_config.json``), that ``.safetensors`` file itself (its folder's ``adapter_config.json`` is read
when present), or ``hf://OWNER/REPO[@REVISION][/FOLDER | /FILE.safetensors]`` (downloaded through
:mod:`engine.weights`, the one weights path). :func:`load_policy_adapter` wraps the policy's network with
peft LoRA of the adapter's rank / alpha / targets, maps the file's keys onto the network's module names,
loads them strictly (one error naming the file and every missing, unexpected or mis-shaped key, in the
file's own naming) and scales the adapter by ``videogpa.policy.adapter_scale``:
``W x + scale * (alpha / r) * B A x``.

The scale is stored in peft's ``lora_alpha`` (``alpha * scale``), so the network's every LoRA layer has
``scaling = scale * alpha / r`` and an adapter saved after further training (:func:`engine.videogpa.lora.
save_adapter`) records the scaling it was trained with: it loads back (scale 1) to the same network.

peft injects the LoRA layers into the policy's network in place, so the policy's own ``network`` (for the
diffusers policies also ``pipe.transformer``, which generation calls) computes with the adapter; the peft
wrapper is ``policy.adapter.network``. The DPO stage (``engine.videogpa.train_dpo.build_dpo_module``)
continues training that wrapper's adapters; its reference is the base network without them.

What VideoGPA's code writes (``Hongyang-Du/VideoGPA`` @ fb86241f, read for this module; the released
safetensors files themselves were not inspected): every ``train/*/03_train.py`` wraps the transformer with
``peft.get_peft_model(transformer, LoraConfig(r=64, lora_alpha=128.0, lora_dropout=0.0,
target_modules=...))`` and ends with ``model.transformer.save_pretrained(out / "final_lora")``: peft's
folder format, keys ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``.

- CogVideoX (``train/CogVideoX-I2V-5B/03_train.py``): the transformer is diffusers'
  ``CogVideoXTransformer3DModel`` with targets ``to_q, to_k, to_v, to_out.0``; the module paths
  (``transformer_blocks.N.attn1.to_q`` ...) are those of GeoForge's ``cogvideox_i2v`` policy: keys map 1:1.
  ``checkpoints/VideoGPA-I2V-lora/adapter_config.json`` is in the repository (r 64, lora_alpha 128.0).
- Wan2.2-TI2V-5B (``train/Wan2.2-TI2V-5B/03_train.py``): the transformer is the *original* Wan2.2
  ``WanModel`` (``wan.modules.model``), targets ``q, k, v, o``, so the keys name
  ``blocks.N.self_attn.{q,k,v,o}`` and ``blocks.N.cross_attn.{q,k,v,o}``; GeoForge's ``wan_ti2v`` policy is
  diffusers' ``WanTransformer3DModel``, whose modules are ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}`` and
  ``blocks.N.attn2.{...}`` (:data:`WAN_ATTENTION`, :data:`WAN_PROJECTION`; the same renaming as diffusers'
  ``_convert_non_diffusers_wan_lora_to_diffusers``). The repository has no ``adapter_config.json`` for this
  adapter (``download_ckpt.py ti2v`` fetches only the safetensors; ``.gitignore`` has ``*.json``): the rank
  is read from the tensors, the targets from the keys, and alpha must be given
  (``videogpa.policy.adapter_alpha``; the training script's default is 128.0).
- Strength: ``generate/Wan2.2-TI2V-5B.py`` multiplies peft's scaling by ``--lora_weight`` (default 0.2)
  before merging (``adapter_scale: 0.2``); ``generate/CogVideoX-5B-I2V.py`` uses the adapter as trained
  (``adapter_scale: 1``). ``generate/CogVideoX1.5-5B.py`` instead *sets* the scaling to 0.2 (absolute: 0.1
  of alpha / r = 2); its adapter is text-to-video, not a GeoForge policy.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoforge.engine.weights import HF_PREFIX, check_state_dict, hub_file, read_state_dict, split_hub_ref

log = logging.getLogger("geoforge.videogpa")

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."      # peft's wrapper prefix in saved adapter keys

# Wan2.2's WanModel (Wan-Video/Wan2.2 wan/modules/model.py) -> diffusers' WanTransformer3DModel
WAN_ATTENTION = {"self_attn": "attn1", "cross_attn": "attn2"}
WAN_PROJECTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_WAN_OFFICIAL = re.compile(r"^blocks\.(\d+)\.(self_attn|cross_attn)\.([qkvo])\.(lora_[AB]\.weight)$")
_WAN_DIFFUSERS = re.compile(r"^blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.(lora_[AB]\.weight)$")
_ATTENTION_BACK = {v: k for k, v in WAN_ATTENTION.items()}
_PROJECTION_BACK = {v: k for k, v in WAN_PROJECTION.items()}

# adapter_config.json fields GeoForge reproduces; any other value than these defaults is refused
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
                "exclude_modules": None, "layer_replication": None, "trainable_token_indices": None,
                "target_parameters": None, "use_qalora": False}


@dataclass
class AdapterFiles:
    """Where an adapter's tensors and (optional) config are on this machine, and the name it was given."""

    source: str
    weights: Path
    config: Path | None


@dataclass
class LoadedAdapter:
    """An adapter loaded onto a policy: the peft wrapper of the policy's network and where it came from."""

    network: nn.Module            # peft.PeftModel around policy.network (LoRA layers injected in place)
    files: AdapterFiles
    layout: str                   # "wan_official" (WanModel names, mapped) or "identity"
    rank: int
    alpha: float                  # the adapter's lora_alpha (before adapter_scale)
    scale: float
    targets: list[str]


# ------------------------------------------------------------------------------------------- files
def locate_adapter(source: str | os.PathLike, local_files_only: bool = False) -> AdapterFiles:
    """The adapter files of ``source`` (see the module docstring); FileNotFoundError naming what is missing."""
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        repo_id, revision, path = split_hub_ref(text)
        if path.endswith(".safetensors"):
            weights_name, folder = path, path.rpartition("/")[0]
        else:
            folder = path
            weights_name = f"{folder}/{ADAPTER_FILE}" if folder else ADAPTER_FILE
        weights = hub_file(repo_id, weights_name, revision, local_files_only)
        if weights is None:
            raise FileNotFoundError(f"adapter {text!r}: the Hub repo {repo_id} has no {weights_name}")
        config = hub_file(repo_id, f"{folder}/{CONFIG_FILE}" if folder else CONFIG_FILE, revision, local_files_only)
        return AdapterFiles(text, weights, config)
    path = Path(text).expanduser()
    if path.is_dir():
        weights = path / ADAPTER_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"adapter {text!r}: the folder has no {ADAPTER_FILE} (a peft adapter folder, "
                                    f"e.g. VideoGPA's checkpoints/VideoGPA-I2V-lora after download_ckpt.py)")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"adapter {text!r} does not exist (give a peft adapter folder, its "
                                f"{ADAPTER_FILE}, or hf://OWNER/REPO[@REVISION][/FOLDER])")
    config = weights.parent / CONFIG_FILE
    return AdapterFiles(text, weights, config if config.is_file() else None)


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; ValueError naming the file for what GeoForge cannot reproduce."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"adapter config {path}: unreadable ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"adapter config {path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter config {path}: peft_type {config.get('peft_type')!r}, only LORA adapters load")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"adapter config {path}: no {key!r}")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key)
        if (value not in (None, "none")) if key == "bias" else bool(value):
            raise ValueError(f"adapter config {path}: {key}={value!r} is not supported (GeoForge loads plain LoRA: "
                             f"{key}={default!r})")
    return config


# --------------------------------------------------------------------------------------------- keys
def detect_layout(keys: list[str], kind: str) -> str:
    """``wan_official`` when a Wan policy's adapter names Wan2.2's WanModel modules, else ``identity``."""
    if kind == "wan_ti2v" and any(_WAN_OFFICIAL.match(k.removeprefix(PEFT_PREFIX)) for k in keys):
        return "wan_official"
    return "identity"


def to_geoforge(key: str, layout: str) -> str:
    """A file key (with peft's prefix) -> the key of the same tensor on GeoForge's peft-wrapped network."""
    if layout != "wan_official" or not key.startswith(PEFT_PREFIX):
        return key
    m = _WAN_OFFICIAL.match(key[len(PEFT_PREFIX):])
    if m is None:
        return key
    block, attn, proj, tail = m.groups()
    return f"{PEFT_PREFIX}blocks.{block}.{WAN_ATTENTION[attn]}.{WAN_PROJECTION[proj]}.{tail}"


def to_file(key: str, layout: str) -> str:
    """The inverse of :func:`to_geoforge`: a network key in the file's naming (for messages and checks)."""
    if layout != "wan_official" or not key.startswith(PEFT_PREFIX):
        return key
    m = _WAN_DIFFUSERS.match(key[len(PEFT_PREFIX):])
    if m is None:
        return key
    block, attn, proj, tail = m.groups()
    return f"{PEFT_PREFIX}blocks.{block}.{_ATTENTION_BACK[attn]}.{_PROJECTION_BACK[proj]}.{tail}"


def _module_targets(keys: list[str]) -> list[str]:
    """peft target names from adapter keys: each LoRA module's last name (``to_out.0`` kept whole)."""
    names = set()
    for key in keys:
        path = key.removeprefix(PEFT_PREFIX).split(".lora_")[0].split(".")
        names.add(".".join(path[-2:]) if path[-1].isdigit() and len(path) > 1 else path[-1])
    return sorted(names)


def _map_targets(targets: Any, layout: str) -> Any:
    if layout != "wan_official" or isinstance(targets, str):
        return targets
    return sorted({WAN_PROJECTION.get(t, t) for t in targets})


def _rank_from_tensors(state: Mapping[str, torch.Tensor], source: str) -> int:
    ranks = {tuple(v.shape)[0] for k, v in state.items() if k.endswith("lora_A.weight") and v.ndim == 2}
    if len(ranks) != 1:
        raise ValueError(f"adapter {source}: cannot read one LoRA rank from the lora_A tensors (ranks {sorted(ranks)}); "
                         f"add its {CONFIG_FILE}")
    return ranks.pop()


# --------------------------------------------------------------------------------------------- load
def load_policy_adapter(policy, source: str | os.PathLike, scale: float = 1.0, alpha: float | None = None,
                        local_files_only: bool = False) -> LoadedAdapter:
    """Load the adapter ``source`` onto ``policy.network`` (see the module docstring); sets and returns
    ``policy.adapter``. Raises ValueError naming the file for keys or shapes that do not fit."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if getattr(policy, "adapter", None) is not None:
        raise ValueError(f"the {policy.kind} policy already has the adapter {policy.adapter.files.source}")
    if not scale > 0:
        raise ValueError(f"videogpa.policy.adapter_scale: must be > 0, got {scale}")
    files = locate_adapter(source, local_files_only)
    where = f"{files.weights}" + (f" (from {files.source})" if os.fspath(files.weights) != files.source else "")
    state = read_state_dict(files.weights)
    layout = detect_layout(list(state), policy.kind)
    if files.config is not None:
        config = read_adapter_config(files.config)
        rank, file_alpha = int(config["r"]), float(config["lora_alpha"])
        if alpha is not None and float(alpha) != file_alpha:
            raise ValueError(f"videogpa.policy.adapter_alpha={alpha} contradicts lora_alpha={file_alpha} of "
                             f"{files.config}; leave adapter_alpha out (it is for adapters without {CONFIG_FILE})")
        targets = _map_targets(config["target_modules"], layout)
        dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    else:
        if alpha is None:
            raise ValueError(f"adapter {where}: no {CONFIG_FILE} next to it, so its lora_alpha is unknown; set "
                             f"videogpa.policy.adapter_alpha (VideoGPA's train/*/03_train.py default: 128.0)")
        rank, file_alpha, dropout = _rank_from_tensors(state, where), float(alpha), 0.0
        targets = _module_targets([to_geoforge(k, layout) for k in state])
    peft_config = LoraConfig(r=rank, lora_alpha=file_alpha * scale, lora_dropout=dropout, target_modules=targets,
                             init_lora_weights=True)
    try:
        network = get_peft_model(policy.network, peft_config)
    except ValueError as err:
        raise ValueError(f"adapter {where}: its target modules {targets!r} match no module of the {policy.kind} "
                         f"policy network ({type(policy.network).__name__}): {err}") from err
    expected = {to_file(k, layout): v.shape for k, v in get_peft_model_state_dict(network).items()}
    try:
        check_state_dict(expected, state, source=f"adapter {where}",
                         what=f"the {policy.kind} policy's LoRA modules (r {rank}, targets {targets})")
    except ValueError:
        network.unload()   # leave the policy's network as it was (no LoRA layers)
        raise
    mapped = {to_geoforge(k, layout): v for k, v in state.items()}
    result = set_peft_model_state_dict(network, mapped)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:  # pragma: no cover - check_state_dict caught them
        raise ValueError(f"adapter {where}: keys not loaded: {unexpected[:8]}")
    loaded = LoadedAdapter(network, files, layout, rank, file_alpha, float(scale),
                           list(targets) if not isinstance(targets, str) else [targets])
    policy.adapter = loaded
    log.info(f"videogpa: adapter {files.source} on the {policy.kind} policy: {len(state)} tensors, r {rank}, "
             f"alpha {file_alpha:g}, scale {scale:g} (scaling {file_alpha * scale / rank:g}), keys {layout}")
    return loaded


__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "PEFT_PREFIX", "WAN_ATTENTION", "WAN_PROJECTION", "AdapterFiles",
           "LoadedAdapter", "locate_adapter", "read_adapter_config", "detect_layout", "to_geoforge", "to_file",
           "load_policy_adapter"]

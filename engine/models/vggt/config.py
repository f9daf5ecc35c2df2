"""VGGT configuration: the official constructor arguments of every submodule, defaults and validation.

A config is ``{"aggregator": {...}, "camera_head": {...} | None, "depth_head": ..., "point_head": ...,
"track_head": ...}``. Each sub-dict uses the argument names of the official class (``Aggregator``,
``CameraHead``, ``DPTHead``, ``TrackHead``); missing arguments take the values ``VGGT()`` uses (VGGT-1B),
a head set to ``None`` is left out. ``dim_in`` defaults to ``2 * aggregator.embed_dim`` and the heads'
``patch_size`` to the aggregator's (VGGT-1B: 14 everywhere, as in the official constructor).

The Hugging Face ``config.json`` of ``facebook/VGGT-1B`` holds the ``VGGT.__init__`` arguments instead
(``img_size, patch_size, embed_dim, enable_camera, enable_point, enable_depth, enable_track``);
:func:`config_from_hub` translates it.
"""
from __future__ import annotations

import copy
from typing import Any

AGGREGATOR: dict[str, Any] = {
    "img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0,
    "num_register_tokens": 4, "qkv_bias": True, "proj_bias": True, "ffn_bias": True,
    "patch_embed": "dinov2_vitl14_reg", "aa_order": ["frame", "global"], "aa_block_size": 1,
    "qk_norm": True, "rope_freq": 100, "init_values": 0.01,
}
CAMERA_HEAD: dict[str, Any] = {
    "dim_in": None, "trunk_depth": 4, "pose_encoding_type": "absT_quaR_FoV", "num_heads": 16,
    "mlp_ratio": 4, "init_values": 0.01, "trans_act": "linear", "quat_act": "linear", "fl_act": "relu",
}
_DPT: dict[str, Any] = {
    "dim_in": None, "patch_size": None, "features": 256, "out_channels": [256, 512, 1024, 1024],
    "intermediate_layer_idx": [4, 11, 17, 23], "pos_embed": True, "feature_only": False, "down_ratio": 1,
    "conf_activation": "expp1",
}
DEPTH_HEAD: dict[str, Any] = {**_DPT, "output_dim": 2, "activation": "exp"}
POINT_HEAD: dict[str, Any] = {**_DPT, "output_dim": 4, "activation": "inv_log"}
TRACK_HEAD: dict[str, Any] = {
    "dim_in": None, "patch_size": None, "features": 128, "iters": 4, "predict_conf": True, "stride": 2,
    "corr_levels": 7, "corr_radius": 4, "hidden_size": 384,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "aggregator": AGGREGATOR, "camera_head": CAMERA_HEAD, "depth_head": DEPTH_HEAD,
    "point_head": POINT_HEAD, "track_head": TRACK_HEAD,
}
HEADS = ("camera_head", "depth_head", "point_head", "track_head")
HUB_KEYS = ("img_size", "patch_size", "embed_dim", "enable_camera", "enable_point", "enable_depth",
            "enable_track")


def resolve_config(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill defaults, derive ``dim_in``/``patch_size`` and validate names. ``None`` -> VGGT-1B."""
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise TypeError(f"VGGT config must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown VGGT config key(s) {unknown}; expected {sorted(DEFAULTS)}")
    out: dict[str, Any] = {}
    for part, defaults in DEFAULTS.items():
        given = cfg.get(part, {})
        if given is None:
            if part == "aggregator":
                raise ValueError("config['aggregator'] cannot be None")
            out[part] = None
            continue
        if not isinstance(given, dict):
            raise TypeError(f"config[{part!r}] must be a dict or None, got {type(given).__name__}")
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise ValueError(f"config[{part!r}] has unknown argument(s) {bad}; allowed: {sorted(defaults)}")
        out[part] = {**copy.deepcopy(defaults), **copy.deepcopy(given)}
    agg = out["aggregator"]
    for part in HEADS:
        head = out[part]
        if head is None:
            continue
        if head["dim_in"] is None:
            head["dim_in"] = 2 * agg["embed_dim"]
        if "patch_size" in head and head["patch_size"] is None:
            head["patch_size"] = agg["patch_size"]
    for part in ("depth_head", "point_head"):
        if out[part] is not None and out[part]["feature_only"]:
            raise ValueError(f"config[{part!r}]['feature_only'] must be False (VGGT reads its predictions)")
    return out


def config_from_hub(hub_cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate ``VGGT.__init__`` arguments (the HF ``config.json``) into a :func:`resolve_config` dict."""
    bad = sorted(set(hub_cfg) - set(HUB_KEYS))
    if bad:
        raise ValueError(f"unknown VGGT hub config key(s) {bad}; allowed: {list(HUB_KEYS)}")
    agg = {k: hub_cfg[k] for k in ("img_size", "patch_size", "embed_dim") if k in hub_cfg}
    cfg: dict[str, Any] = {"aggregator": agg}
    for flag, part in (("enable_camera", "camera_head"), ("enable_point", "point_head"),
                       ("enable_depth", "depth_head"), ("enable_track", "track_head")):
        cfg[part] = {} if hub_cfg.get(flag, True) else None
    return cfg


def normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Accept either format: hub-style ``VGGT.__init__`` arguments or per-submodule dicts."""
    if cfg and set(cfg) <= set(HUB_KEYS):
        return resolve_config(config_from_hub(cfg))
    return resolve_config(cfg)

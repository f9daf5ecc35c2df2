"""Output activations of the VGGT heads (``vggt/heads/head_act.py``).

- pose: translation / quaternion / field-of-view parts of the 9-d encoding, each ``linear``, ``inv_log``,
  ``exp`` or ``relu`` (VGGT-1B: linear, linear, relu);
- dense heads: the last channel is the confidence, the others the prediction; ``inv_log`` is
  ``sign(y) * (exp(|y|) - 1)`` and ``expp1`` is ``1 + exp(c)``. The confidence loses its channel axis
  (``[N, H, W]``) while the prediction keeps it (``[N, H, W, C-1]``), as in the official code.

``exp(|y|) - 1`` is kept as written officially rather than ``expm1``: ``expm1`` is more accurate near 0
but then differs from the official float32 output by up to ~5e-4 relative there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POSE_ACTIVATIONS = ("linear", "inv_log", "exp", "relu")
DENSE_ACTIVATIONS = ("norm_exp", "norm", "exp", "relu", "inv_log", "xy_inv_log", "sigmoid", "linear")
CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")


def inverse_log_transform(y: torch.Tensor) -> torch.Tensor:
    """``sign(y) * (exp(|y|) - 1)`` (the official expression, see the module docstring)."""
    return torch.sign(y) * (torch.exp(torch.abs(y)) - 1.0)


def _pose_act(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "inv_log":
        return inverse_log_transform(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown pose activation {kind!r}; expected one of {POSE_ACTIVATIONS}")


def activate_pose(enc: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear",
                  fl_act: str = "linear") -> torch.Tensor:
    """Activate ``[..., 9]`` = ``[T (3), quat xyzw (4), fov_h, fov_w]`` part by part."""
    return torch.cat([_pose_act(enc[..., :3], trans_act), _pose_act(enc[..., 3:7], quat_act),
                      _pose_act(enc[..., 7:], fl_act)], dim=-1)


def activate_head(out: torch.Tensor, activation: str = "norm_exp",
                  conf_activation: str = "expp1") -> tuple[torch.Tensor, torch.Tensor]:
    """``out [N, C, H, W]`` -> ``(pred [N, H, W, C-1], conf [N, H, W])``."""
    fmap = out.permute(0, 2, 3, 1)
    xyz, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "norm_exp":
        d = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        pred = xyz / d * (torch.exp(d) - 1.0)
    elif activation == "norm":
        pred = xyz / xyz.norm(dim=-1, keepdim=True)
    elif activation == "exp":
        pred = torch.exp(xyz)
    elif activation == "relu":
        pred = F.relu(xyz)
    elif activation == "inv_log":
        pred = inverse_log_transform(xyz)
    elif activation == "xy_inv_log":
        xy, z = xyz.split([2, 1], dim=-1)
        z = inverse_log_transform(z)
        pred = torch.cat([xy * z, z], dim=-1)
    elif activation == "sigmoid":
        pred = torch.sigmoid(xyz)
    elif activation == "linear":
        pred = xyz
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {DENSE_ACTIVATIONS}")
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ValueError(f"unknown conf_activation {conf_activation!r}; expected one of {CONF_ACTIVATIONS}")
    return pred, conf

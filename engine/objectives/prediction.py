"""What the network outputs, and the one conversion of that output to the velocity.

On the path ``x_t = (1 - t) x0 + t eps`` (``engine.objectives.flow_matching``) the velocity is
``v = eps - x0 = (x_t - x0) / t``. ``objective.prediction`` says what the network's output is:

- ``velocity``: the output is ``v_hat`` itself.
- ``x0`` (x-prediction, Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise", JiT):
  the output is the clean clip ``x0_hat`` and

      v_hat = (x_t - x0_hat) / max(t, t_clamp)        (t_clamp = objective.x0_t_clamp, default 0.05)

  per frame. The clamp is JiT's (their ``t_eps = 5e-2`` on ``1 - t`` in their time convention): near
  t = 0 the division would amplify the x0 error without bound; for t < t_clamp the velocity is
  underestimated by the factor t / t_clamp, which the sampler only meets on its last step (where
  ``x_t`` is already almost clean) and which clean context frames (t = 0) never feed back (they are not
  updated and not in the loss). The training loss stays the velocity loss ``|v_hat - v|^2``, i.e.
  ``|x0_hat - x0|^2 / max(t, t_clamp)^2`` per frame, and the ``v_sigmoid`` weighting multiplies it
  as before.

In pixel space with large patches only x-prediction trains well: a patch of ``p x p x 3`` noise or
velocity values is full-dimensional and a transformer of width ``hidden_dim`` near or below that count
cannot carry it through, while the clean image lies on a low-dimensional manifold (JiT §3). Recipe
validation (``engine.config``) refuses the other case.

Every consumer goes through :func:`velocity_from_output` or :class:`VelocityModel`: the training loss
(``flow_matching_loss``), the samplers and every guidance scheme (they are handed a ``VelocityModel``,
so guidance combines velocities; for the generated frames, which share ``x_t`` and ``t`` across the
guidance branches and whose branch weights sum to one, that is the same combination of the x0
predictions), validation, eval, the sample videos, VideoGPA generation and the DPO errors. DFoT's
v-prediction U-ViT3D (a VP model, not on this path) reaches the samplers through its own adapter,
:mod:`engine.objectives.dfot_velocity`.
"""
from __future__ import annotations

import torch
from torch import nn

PREDICTIONS = ("velocity", "x0")


def velocity_from_output(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str,
                         t_clamp: float) -> torch.Tensor:
    """The velocity ``v_hat`` implied by the network output ``out`` (like ``x_t [B, T, ...]``) at
    per-frame flow times ``t [B, T]`` (module docstring). ``velocity``: ``out`` itself."""
    if prediction == "velocity":
        return out
    if prediction != "x0":
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    tt = t.to(out.dtype).clamp_min(t_clamp).reshape(*t.shape, *([1] * (out.ndim - t.ndim)))
    return (x_t.to(out.dtype) - out) / tt


class VelocityModel(nn.Module):
    """``model`` whose output is converted to the velocity: ``forward(x_t, t, **kw)`` returns ``v_hat``
    (and the feature dict unchanged when the model returns ``(out, features)``). An ``nn.Module`` holding
    the model, so ``eval()`` / ``train()`` / ``parameters()`` reach it."""

    def __init__(self, model: nn.Module, prediction: str, t_clamp: float):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.prediction = prediction
        self.t_clamp = t_clamp

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs):
        out = self.model(x_t, t, **kwargs)
        if isinstance(out, tuple):
            return velocity_from_output(out[0], x_t, t, self.prediction, self.t_clamp), out[1]
        return velocity_from_output(out, x_t, t, self.prediction, self.t_clamp)


def velocity_model(model: nn.Module, objective) -> nn.Module:
    """``model`` as a velocity predictor for the recipe's ``objective`` (a ``FlowMatchingConfig``):
    the model itself for ``velocity``, a :class:`VelocityModel` for ``x0``. Idempotent."""
    if objective.prediction == "velocity" or isinstance(model, VelocityModel):
        return model
    return VelocityModel(model, objective.prediction, objective.x0_t_clamp)


__all__ = ["PREDICTIONS", "VelocityModel", "velocity_from_output", "velocity_model"]

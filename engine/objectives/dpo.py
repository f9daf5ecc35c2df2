"""Diffusion-DPO on denoising errors (Wallace et al.; VideoGPA's convention).

For a preference pair (winner w, loser l) noised with the *same* noise and timestep, let ``e`` be the
per-sample mean squared error of a network's prediction against its target (over frames, channels,
height and width: :func:`per_sample_error`), for the trained model (θ) and the frozen reference (ref).
The implicit reward of a sample is ``β·(e_ref − e_θ)``: how much the model lowered the denoising error
relative to the reference. With

    logit = −β·[(e_θ,w − e_θ,l) − (e_ref,w − e_ref,l)]  =  β·(e_ref,w − e_θ,w) − β·(e_ref,l − e_θ,l)

the loss is ``−log σ(logit)`` (VideoGPA, β = 1; Diffusion-DPO writes the same thing as
``−log σ(−½·β_dd·[...])``, so ``β = ½·β_dd``). ``logit`` is the reward margin (winner's implicit reward
minus the loser's); the implicit accuracy is the fraction of pairs with a positive margin (a pair with a
margin of exactly 0, e.g. at initialisation where θ = ref, is not counted as correct).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_error(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per sample ``[B]`` of ``pred``/``target`` ``[B, F, ...]`` over all but the batch dim.

    ``mask [B, F]`` (bool or 0/1) restricts the mean to the frames where it is set (e.g. excluding clean
    context frames); every frame counts equally, so the result equals the plain mean when all are set.
    Computed in float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"per_sample_error: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        return err.flatten(1).mean(1)
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"per_sample_error: mask must be [B, F] = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    frame_err = err.flatten(2).mean(2)  # [B, F]
    keep = mask.to(frame_err.dtype)
    count = keep.sum(1)
    if bool((count == 0).any()):
        raise ValueError("per_sample_error: a sample has no frame in the mask")
    return (frame_err * keep).sum(1) / count


def dpo_loss(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-DPO loss from per-sample errors ``[B]`` (see the module docstring).

    Returns ``(loss [B], implicit accuracy (scalar, fraction of pairs with margin > 0), reward margin
    (scalar, mean over the batch of β·[(e_ref,w − e_θ,w) − (e_ref,l − e_θ,l)]))``. Gradients flow
    through the model errors only; the reference errors are detached. Computed in float32.
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    shapes = {t.shape for t in (model_err_w, model_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or next(iter(shapes)).__len__() != 1:
        raise ValueError(f"dpo_loss: the four errors must be [B] tensors of one shape, got "
                         f"{[tuple(t.shape) for t in (model_err_w, model_err_l, ref_err_w, ref_err_l)]}")
    model_diff = model_err_w.float() - model_err_l.float()
    ref_diff = ref_err_w.detach().float() - ref_err_l.detach().float()
    logit = -beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(logit)
    accuracy = (logit > 0).float().mean()
    return loss, accuracy.detach(), logit.detach().mean()


ErrorFn = Callable[[nn.Module, Tensor, dict[str, Tensor], dict[str, Tensor]], Tensor]


class DPOModule(nn.Module):
    """What the trainer trains for Diffusion-DPO: the policy ``network`` (LoRA-wrapped or fully trained), an
    optional frozen ``reference`` copy, and :func:`dpo_loss` on their per-sample errors.

    ``error(network, x0, cond, noise) -> [B]`` is the policy's denoising error (its prediction against its
    target for the given noise and timesteps). With ``reference=None`` the reference is ``network`` with its
    LoRA adapters switched off (peft's ``disable_adapter``): no second copy of the base weights.
    """

    def __init__(self, network: nn.Module, reference: nn.Module | None, error: ErrorFn, beta: float):
        super().__init__()
        self.network = network
        self.reference = reference
        self.beta = beta
        object.__setattr__(self, "error", error)   # a bound method of the policy, not a submodule

    def errors(self, x_w: Tensor, x_l: Tensor, cond: dict[str, Tensor], noise: dict[str, Tensor]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(e_θ,w, e_θ,l, e_ref,w, e_ref,l), each [B]; winner and loser share ``noise``, in one batch of 2B."""
        x0 = torch.cat([x_w, x_l])
        both = {k: torch.cat([v, v]) for k, v in noise.items()}
        model_err = self.error(self.network, x0, cond, both)
        with torch.no_grad():
            if self.reference is not None:
                ref_err = self.error(self.reference, x0, cond, both)
            else:
                disable = getattr(self.network, "disable_adapter", None)
                if disable is None:
                    raise TypeError(f"{type(self.network).__name__} has no LoRA adapters to disable: give a "
                                    f"frozen reference copy")
                with disable():
                    ref_err = self.error(self.network, x0, cond, both)
        return (*model_err.chunk(2), *ref_err.chunk(2))

    def forward(self, x_w: Tensor, x_l: Tensor, cond: dict[str, Tensor], noise: dict[str, Tensor]) -> dict[str, Tensor]:
        e_w, e_l, r_w, r_l = self.errors(x_w, x_l, cond, noise)
        loss, accuracy, margin = dpo_loss(e_w, e_l, r_w, r_l, self.beta)
        return {"loss": loss.mean(), "implicit_acc": accuracy, "reward_margin": margin,
                "err_w": e_w.detach().mean(), "err_l": e_l.detach().mean(),
                "ref_err_w": r_w.mean(), "ref_err_l": r_l.mean()}


__all__ = ["DPOModule", "dpo_loss", "per_sample_error"]

"""A third GF alignment form, iREPA-style (``gf.alignment_form: irepa``): a convolutional projector and a spatially
normalised target, with GF's angular + scale losses.

iREPA (Singh, Leng, Wu, Zheng, Zhang, Shechtman, Xie 2025, "What matters for Representation Alignment: Global
Information or Spatial Structure?", arXiv 2512.10794) finds that the *spatial structure* of an alignment target
(the pairwise similarity of its patch tokens), not its global information, drives representation alignment's
gains, and makes two changes to REPA to transfer more of it. What its official code does
(``End2End-Diffusion/iREPA`` @ 99ad4ac, read for this module: ``jit/projectors.py`` / ``ldm/models/sit.py``
``ProjectionLayer``, ``jit/spnorm.py`` / ``ldm/utils.py`` ``spatial_zscore``, ``ldm/configs/irepa.yaml``):

- **projector**: REPA's per-token MLP (Linear, SiLU, Linear, SiLU, Linear) replaced by ONE ``nn.Conv2d(D, C,
  kernel_size=3, padding=1)`` over the token grid (tokens ``[B, N, D]`` reshaped to ``[B, D, h, w]``; kernel 3 is
  the default of ``--proj_kwargs_kernel_size``) - no hidden layer, no activation;
- **spatial normalisation** of the encoder's patch tokens ``x [B, N, D]`` (``spnorm_method: zscore``):
  ``(x - alpha * x.mean(dim=1)) / (x.std(dim=1) + 1e-6)``, the mean and the (unbiased, ``torch.std``) standard
  deviation over the N tokens of the image, per channel. The README writes ``alpha`` as ``gamma``; the code's
  defaults are ``--zscore-alpha 0.6`` (latent diffusion, ``ldm/train.py``) and ``0.8`` (JiT, ``jit/main_jit.py``);
  ``alpha = 1`` is the plain per-channel z-score over tokens.

Here (GF, video): per frame of the DiT token grid (the teacher features first mapped onto it by
:func:`engine.objectives.geometry_forcing.teacher_to_dit_grid`, so the normalisation is over the tokens that are
aligned), the target ``y [BT', h, w, C]`` becomes ``(y - alpha * mean_hw(y)) / (std_hw(y) + 1e-6)`` per channel
(:func:`spatial_normalise`; ``gf.irepa_alpha``, default 1: each channel minus its mean over the frame's tokens,
divided by its standard deviation over them); the projector is the 3x3 convolution ``D -> C`` over the frame's
``h x w`` tokens (zero padding at the border, as ``padding=1``), and the losses stay GF's (DESIGN §4):
``p_hat = p / |p|``, ``L_ang = mean_tokens(1 - <p_hat, y_hat>)``, ``L_scale = mean((g(p_hat) - y)^2)`` with GF's
scale head ``g`` (Linear C -> ``gf.scale_hidden``, SiLU, Linear -> C) against the normalised ``y``
(``kernels.align.alignment_losses_reference``, plain autograd). iREPA itself uses REPA's negative cosine only;
the scale term is GF's.
"""
from __future__ import annotations

import torch
from torch import nn

from geoforge.kernels.align import alignment_losses_reference

EPS = 1e-6   # iREPA's spatial_zscore eps, added to the standard deviation


def spatial_normalise(target: torch.Tensor, alpha: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """iREPA's spatial z-score of ``target [N, h, w, C]`` (N frames of token features): per frame and channel,
    ``(y - alpha * mean over the h*w tokens) / (unbiased std over them + eps)``."""
    if target.dim() != 4:
        raise ValueError(f"spatial_normalise: expected [N, h, w, C], got {tuple(target.shape)}")
    y = target.float()
    mean = y.mean(dim=(1, 2), keepdim=True)
    std = y.flatten(1, 2).std(dim=1)[:, None, None] if y.shape[1] * y.shape[2] > 1 else torch.zeros_like(mean)
    return (y - alpha * mean) / (std + eps)


class IrepaAlignment(nn.Module):
    """The trained part of one teacher key: the 3x3 conv projector and GF's scale head.

    ``forward(features [N, h, w, D], target [N, h, w, C])`` (the target already spatially normalised) returns
    GF's ``(angular, scale)``, unweighted."""

    def __init__(self, in_dim: int, target_dim: int, scale_hidden: int, kernel_size: int = 3):
        super().__init__()
        self.projector = nn.Conv2d(in_dim, target_dim, kernel_size, padding=kernel_size // 2)
        self.scale_head = nn.Sequential(nn.Linear(target_dim, scale_hidden), nn.SiLU(),
                                        nn.Linear(scale_hidden, target_dim))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, h, w, D]`` -> ``[N, h, w, C]``: the convolution over each frame's token grid."""
        return self.projector(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.project(features)
        if p.shape != target.shape:
            raise ValueError(f"irepa: projection {tuple(p.shape)} vs target {tuple(target.shape)}")
        c = p.shape[-1]
        out = alignment_losses_reference(p.reshape(-1, c).float(), target.reshape(-1, c).float(), nn.Identity(),
                                         self._scale_float)
        return out["angular"], out["scale"]

    def _scale_float(self, p_hat: torch.Tensor) -> torch.Tensor:
        return self.scale_head(p_hat.to(self.scale_head[0].weight.dtype)).float()


__all__ = ["spatial_normalise", "IrepaAlignment"]

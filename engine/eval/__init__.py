"""Evaluation of generated videos: metrics, protocols and the ``geoforge-eval`` entry point.

- ``frechet``: Fréchet distance (robust PSD square root), FID / FVD wrappers;
- ``i3d`` (FVD features), ``inception`` (FID features), ``lpips``: the metric networks, loaded from
  local files or hub references (``weights``);
- ``image_metrics``: PSNR, SSIM; ``camera_metrics``: RotErr / TransErr / CamMC, revisit error;
- ``geometry``: VGGT reprojection consistency and camera accuracy;
- ``protocols``: short16 / long256 / rotation360; ``run`` (+ ``__main__``): the CLI; ``report``: its output;
- ``validate``: cheap periodic validation for the training loop;
- ``probe``: a closed-form ridge probe of per-token depth and world points in a DiT block's tokens (R^2 on
  held-out clips), for data with known geometry.
"""

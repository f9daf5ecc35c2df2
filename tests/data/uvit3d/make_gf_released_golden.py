"""Produce ``gf_released.safetensors``: GF's released alignment loss (``VGGTAlignmentLoss.forward``) on tiny inputs.

Not run by the tests. Reads ``external/vggt_alignment_loss.py`` and ``external/alignment_projector.py`` of
``CIntellifusion/GeometryForcing`` @ bf86144 with ``git show`` into a scratch package (default /tmp/dfot_ref/gfext)
and replaces only ``external.vggt.VGGT`` by a stand-in whose ``from_pretrained`` returns a module whose
``shortcut_forward`` hands back fixed "aggregator outputs" (24 layers of ``[B=2, T=3, N=10, 12]``) - the loss code
itself is the official one:

    python tests/data/uvit3d/make_gf_released_golden.py --git-dir /work/.mirror/CIntellifusion+GeometryForcing/repo

Recorded: the inputs (``latent [2, 3, 16, 4, 4]``, the 24 token tensors; the official ``ConvProjector`` always has 24 outputs), the official projector / scale-head
weights (random init, keys as in the official module), and ``loss_ang`` (``unormalize_lambda=0``) and
``loss_total`` (``unormalize_lambda=1``) with ``encoder_info=[24, 8, 8]``, ``mid_channels=8``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

COMMIT = "bf86144a25edc0ba9a50fbc521c5dd66ed06039f"
HERE = Path(__file__).resolve().parent
STUB = '''import torch
from torch import nn
TOKENS = []

class _Aggregator(nn.Module):
    def shortcut_forward(self, images):
        return list(TOKENS), 5

class VGGT:
    @staticmethod
    def from_pretrained(name):
        return _Aggregator()
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--git-dir", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/dfot_ref/gfext"))
    args = ap.parse_args()
    ext = args.scratch / "external"
    (ext / "vggt").mkdir(parents=True, exist_ok=True)
    for name in ("vggt_alignment_loss.py", "alignment_projector.py"):
        text = subprocess.run(["git", "--git-dir", str(args.git_dir), "show", f"{COMMIT}:external/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (ext / name).write_text(text)
    (ext / "__init__.py").write_text("")
    (ext / "vggt" / "__init__.py").write_text(STUB)
    sys.path.insert(0, str(args.scratch))
    import external.vggt as stub
    from external.vggt_alignment_loss import VGGTAlignmentLoss

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 3, 16, 4, 4, generator=g)
    tokens = [torch.randn(2, 3, 10, 12, generator=g) * (1 + i / 8) for i in range(24)]   # the projector has 24 outputs (hard-coded)
    images = torch.rand(2, 3, 3, 14, 14, generator=g)
    stub.TOKENS[:] = tokens
    torch.manual_seed(0)
    loss_mod = VGGTAlignmentLoss(alignment_context_length=3, apply_unnormalize_recon=True, unormalize_lambda=0.0,
                                 latents_info=[[16, 4, 4]], encoder_info=[24, 8, 8], mid_channels=8)
    with torch.no_grad():
        ang = loss_mod([latent], images)
        loss_mod.unormalize_lambda = 1.0
        total = loss_mod([latent], images)
    out = {"in.latent": latent, "out.loss_ang": ang.reshape(()), "out.loss_total": total.reshape(())}
    out.update({f"in.tokens{i}": t for i, t in enumerate(tokens)})
    out.update({f"w.{k}": v for k, v in loss_mod.state_dict().items()})
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "gf_released.safetensors"))
    print({k: tuple(v.shape) for k, v in out.items()}, float(ang), float(total))


if __name__ == "__main__":
    main()

"""Produce ``golden.safetensors`` / ``golden.json``: outputs of the official DFoT / Geometry Forcing code.

Not run by the tests. Needs a git copy of ``CIntellifusion/GeometryForcing`` (its DFoT backbone, embedding,
geometry and diffusion files are identical to upstream DFoT cc614cc except GF's ``return_latents``; see
``shared/reference/dfot_uvit3d_re10k_config.json``) and ``diffusers`` (for ``TimestepEmbedding``):

    python tests/data/uvit3d/make_golden.py --git-dir /work/.mirror/CIntellifusion+GeometryForcing/repo

The official files listed in ``OFFICIAL`` are read with ``git show COMMIT:PATH`` into a scratch package
outside this repository (``--scratch``, default /tmp/dfot_ref). Their heavy imports are replaced by the
small stand-ins written below (``STUBS``): ``omegaconf.DictConfig`` (a type hint only), ``timm``'s
``PatchEmbed`` (its conv ``proj`` with ``flatten=False``: NCHW out, norm = identity), ``rotary_embedding_torch``'s
``rotate_half`` (interleaved pairs), ``roma`` (unused on this path) and the DiT/U-Net backbones (not built).
Nothing of the official code itself is changed.

What is recorded (all official results, CPU):
- ``model.*``: a tiny ``UViT3DPose`` (config ``TINY``: 4 levels, ResBlock x2 + Transformer x2, head dims 16 and
  32 so both non-zero remainders of DFoT's RoPE split occur) with every parameter drawn at random (zero-init
  layers too) and rounded to float16-representable values, stored as float16 (exact in float32/64);
- ``in.*``: ``x [1, 2, 3, 32, 32]``, ``noise_levels [1, 2]`` (float16-exact), the raw 16-number RE10K poses
  of ``tests/data/re10k_poses/0bf152ef84195293.txt`` rows 0, 10 (float64, as read; the float32 run uses them rounded);
- ``fp32.out`` / ``fp32.latent{i}``: the official forward (``return_latents=True``, eval mode) in float32, the
  ray condition computed by the official ``CameraPose`` code at 32x32;
- ``fp64res.*``: the same with ``model.double()`` and float64 poses, stored as the float16 residual against
  the float32 result (float64 = ``fp32.x + fp64res.x`` to ~1e-9 relative; ``golden.json`` records both);
- ``rays.*``: the official ray condition of both pose files (rows 0, 7) at 4x4 in float32;
- ``diff.*``: the official ``ContinuousDiffusion`` (the RE10K ``diffusion_cfg``): the training logSNR at
  ``diff.k``, the discrete ``alphas_cumprod`` / ``logsnr`` buffers, ``ddim_idx_to_noise_level(0..50)``, a
  training ``forward`` (float64; its ``randn_like`` noise replaced by a recorded float16-exact draw) and
  two DDIM steps (eta 0; frames whose level does not change, and the last step to the clean level -1).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

COMMIT = "bf86144a25edc0ba9a50fbc521c5dd66ed06039f"
HERE = Path(__file__).resolve().parent
POSES = HERE.parent / "re10k_poses"
OFFICIAL = {
    "algorithms/dfot/backbones/base_backbone.py": "dfot/backbones/base_backbone.py",
    "algorithms/dfot/backbones/modules/embeddings.py": "dfot/backbones/modules/embeddings.py",
    "algorithms/dfot/backbones/modules/normalization.py": "dfot/backbones/modules/normalization.py",
    "algorithms/dfot/backbones/modules/zero_module.py": "dfot/backbones/modules/zero_module.py",
    "algorithms/dfot/backbones/u_vit/u_vit3d.py": "dfot/backbones/u_vit/u_vit3d.py",
    "algorithms/dfot/backbones/u_vit/u_vit3d_pose.py": "dfot/backbones/u_vit/u_vit3d_pose.py",
    "algorithms/dfot/backbones/u_vit/u_vit_blocks.py": "dfot/backbones/u_vit/u_vit_blocks.py",
    "algorithms/dfot/backbones/u_vit/__init__.py": "dfot/backbones/u_vit/__init__.py",
    "algorithms/dfot/diffusion/noise_schedule.py": "dfot/diffusion/noise_schedule.py",
    "algorithms/dfot/diffusion/discrete_diffusion.py": "dfot/diffusion/discrete_diffusion.py",
    "algorithms/dfot/diffusion/continuous_diffusion.py": "dfot/diffusion/continuous_diffusion.py",
    "utils/geometry_utils.py": "geometry_utils.py",
}
STUBS = {
    "omegaconf/__init__.py": "DictConfig = dict\n",
    "roma/__init__.py": "",
    "rotary_embedding_torch/__init__.py": "",
    "rotary_embedding_torch/rotary_embedding_torch.py": (
        "import torch\nfrom einops import rearrange\n\n"
        "def rotate_half(x):\n"
        "    x = rearrange(x, '... (d r) -> ... d r', r=2)\n"
        "    x1, x2 = x.unbind(dim=-1)\n"
        "    x = torch.stack((-x2, x1), dim=-1)\n"
        "    return rearrange(x, '... d r -> ... (d r)')\n"),
    "timm/__init__.py": "", "timm/models/__init__.py": "",
    "timm/models/vision_transformer.py": (
        "from torch import nn\n\n"
        "class PatchEmbed(nn.Module):\n"
        "    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, flatten=True):\n"
        "        super().__init__()\n"
        "        self.img_size, self.flatten = img_size, flatten\n"
        "        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)\n"
        "        self.norm = nn.Identity()\n\n"
        "    def forward(self, x):\n"
        "        assert x.shape[-2] == self.img_size and x.shape[-1] == self.img_size\n"
        "        x = self.proj(x)\n"
        "        if self.flatten:\n"
        "            x = x.flatten(2).transpose(1, 2)\n"
        "        return self.norm(x)\n"),
    "dfot/__init__.py": "", "dfot/diffusion/__init__.py": "", "dfot/backbones/modules/__init__.py": "",
    "dfot/backbones/__init__.py": ("from .u_vit import UViT3D, UViT3DPose\n"
                                   "Unet3D = DiT3D = DiT3DPose = None  # not built here\n"),
    "dfot/backbones/dit/__init__.py": "",
    "dfot/backbones/dit/dit_base.py": "SinusoidalPositionalEmbedding = None  # learned_1d only; RoPE here\n",
}
TINY = {
    "name": "u_vit3d_pose", "channels": [32, 32, 16, 32], "emb_channels": 32, "patch_size": 2,
    "block_types": ["ResBlock", "ResBlock", "TransformerBlock", "TransformerBlock"],
    "block_dropouts": [0.0, 0.0, 0.1, 0.1], "num_updown_blocks": [1, 1, 2], "num_mid_blocks": 1,
    "num_heads": 1, "pos_emb_type": "rope", "use_checkpointing": [False, False, False, True],
    "conditioning": {"dim": 180}, "external_cond_dropout": 0.1, "use_fourier_noise_embedding": True,
}
X_SHAPE, FRAMES = [3, 32, 32], 2
# diffusion_cfg of shared/reference/dfot_uvit3d_re10k_config.json (RealEstate10K, continuous)
DIFFUSION = {
    "is_continuous": True, "timesteps": 1000, "beta_schedule": "cosine_simple_diffusion",
    "schedule_fn_kwargs": {"shift": 1.0, "shifted": 0.125, "interpolated": False}, "use_causal_mask": False,
    "clip_noise": 20.0, "objective": "pred_v",
    "loss_weighting": {"strategy": "sigmoid", "snr_clip": 5.0, "cum_snr_decay": 0.9, "sigmoid_bias": -1.0},
    "sampling_timesteps": 50, "ddim_sampling_eta": 0.0, "reconstruction_guidance": 0.0,
    "training_schedule": {"name": "cosine", "shift": 0.125}, "precond_scale": 0.125,
}


class Cfg(dict):
    """Attribute access + ``get`` over nested dicts, enough for DFoT's use of DictConfig."""

    def __getattr__(self, key):
        try:
            value = self[key]
        except KeyError as err:
            raise AttributeError(key) from err
        return Cfg(value) if isinstance(value, dict) else value


def write_scratch(git_dir: Path, scratch: Path) -> None:
    for src, dst in OFFICIAL.items():
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{COMMIT}:{src}"], check=True,
                              capture_output=True, text=True).stdout
        if dst == "geometry_utils.py":
            text = text.replace("import roma\n", "roma = None\n")
        path = scratch / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for dst, text in STUBS.items():
        path = scratch / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def read_poses(name: str, rows: list[int]) -> torch.Tensor:
    lines = (POSES / name).read_text().splitlines()[1:]
    vals = [[float(v) for v in lines[r].split()[1:]] for r in rows]
    t = torch.tensor(vals, dtype=torch.float64)
    return torch.cat([t[:, :4], t[:, 6:]], dim=-1)  # drop k1, k2 -> 16 numbers


def half_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def randomize(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                v = 1 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:
                v = 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            p.copy_(half_exact(v))
        for name, b in model.named_buffers():
            b.copy_(half_exact(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--git-dir", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/dfot_ref"))
    args = ap.parse_args()
    write_scratch(args.git_dir, args.scratch)
    sys.path.insert(0, str(args.scratch))
    from dfot.backbones.u_vit.u_vit3d_pose import UViT3DPose
    from dfot.diffusion.continuous_diffusion import ContinuousDiffusion
    from geometry_utils import CameraPose

    def official_rays(poses16: torch.Tensor, resolution: int) -> torch.Tensor:
        cams = CameraPose.from_vectors(poses16)
        cams.normalize_by_first()
        rays = cams.rays(resolution=resolution).to_pos_encoding()[0]
        return rays.permute(0, 1, 4, 2, 3)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    model = UViT3DPose(Cfg(TINY), torch.Size(X_SHAPE), FRAMES, 16, use_causal_mask=False).eval()
    randomize(model, g)
    out = {f"model.{k}": v.to(torch.float16) for k, v in model.state_dict().items()}

    x = half_exact(torch.randn(1, FRAMES, *X_SHAPE, generator=g))
    noise_levels = half_exact(torch.tensor([[1.7, -0.4]]))
    poses = read_poses("0bf152ef84195293.txt", [0, 10])[None]
    out.update({"in.x": x, "in.noise_levels": noise_levels, "in.poses16": poses})
    meta = {"commit": COMMIT, "torch": torch.__version__, "tiny_cfg": TINY, "x_shape": X_SHAPE,
            "max_tokens": FRAMES, "cpu": torch.backends.cpu.get_cpu_capability()}
    with torch.no_grad():
        for tag, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
            m = model.to(dtype)
            cond = official_rays(poses.to(dtype), X_SHAPE[1])
            y, latents = m(x.to(dtype), noise_levels.to(dtype), cond, return_latents=True)
            for i, t in enumerate([y] + list(latents)):
                name = "out" if i == 0 else f"latent{i - 1}"
                if tag == "fp32":
                    out[f"fp32.{name}"] = t.float()
                else:   # float64 result = fp32 result + residual (stored as float16: ~1e-3 of a ~1e-6 residual)
                    out[f"fp64res.{name}"] = (t - out[f"fp32.{name}"].double()).to(torch.float16)
                    meta.setdefault("fp64_vs_fp32_max_rel", {})[name] = float(
                        (t - out[f"fp32.{name}"].double()).abs().max() / t.abs().max())
                    meta.setdefault("fp64_residual_storage_max_rel", {})[name] = float(
                        (t - out[f"fp32.{name}"].double() - out[f"fp64res.{name}"].double()).abs().max()
                        / t.abs().max())
        model.float()
        both = torch.cat([read_poses("0bf152ef84195293.txt", [0, 7])[None],
                          read_poses("2f25826f0d0ef09a.txt", [0, 7])[None]]).float()
        out["rays.poses16"] = both
        out["rays.res4"] = official_rays(both, 4)

        # ---- DFoT continuous diffusion (the RE10K diffusion_cfg of shared/reference)
        dcfg = DIFFUSION
        meta["diffusion_cfg"] = dcfg
        diffusion = ContinuousDiffusion(Cfg(dcfg), Cfg(TINY), torch.Size(X_SHAPE), FRAMES, 16).eval()
        diffusion.model.load_state_dict(model.state_dict())
        k = torch.tensor([0.0, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.9999, 1.0])
        out["diff.k"] = k
        out["diff.train_logsnr"] = diffusion.training_schedule(k)
        out["diff.alphas_cumprod"] = diffusion.alphas_cumprod
        out["diff.logsnr"] = diffusion.logsnr
        out["diff.ddim_levels"] = diffusion.ddim_idx_to_noise_level(torch.arange(51))
        diffusion.double()
        kt = torch.tensor([[0.05, 0.97]], dtype=torch.float64)
        cond = official_rays(poses, X_SHAPE[1])
        x0 = x.double().clamp(-1, 1)
        noise = half_exact(2.5 * torch.randn(x0.shape, generator=g)).double()   # some |noise| > 5: the clip
        randn_like = torch.randn_like
        torch.randn_like = lambda t, **kw: noise.to(t.dtype)   # the noise the official forward draws
        try:
            x_pred, loss = diffusion(x0, cond, kt)
        finally:
            torch.randn_like = randn_like
        out.update({"diff.train_k": kt, "diff.train_noise": noise.to(torch.float16),
                    "diff.train_x_pred": x_pred.float(), "diff.train_loss": loss.float()})
        for curr, nxt, tag in (([[999, 419]], [[979, 419]], "a"), ([[19, -1]], [[-1, -1]], "b")):
            c, n_ = torch.tensor(curr), torch.tensor(nxt)
            step = diffusion.ddim_sample_step(x.double(), c, n_, cond)
            out.update({f"diff.ddim_{tag}_curr": c, f"diff.ddim_{tag}_next": n_, f"diff.ddim_{tag}_out": step.float()})
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "golden.safetensors"))
    (HERE / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(out)} tensors, {sum(v.numel() * v.element_size() for v in out.values()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

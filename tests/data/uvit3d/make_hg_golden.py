"""Produce ``hg_golden.safetensors`` / ``hg_golden.json``: one history-guidance sampling step of the official
DFoT / Geometry Forcing code, per guidance scheme.

Not run by the tests. Needs what ``make_golden.py`` needs (a git copy of ``CIntellifusion/GeometryForcing``) and
``golden.safetensors`` (its tiny ``UViT3DPose`` weights, ``model.*``, are reused; not stored again):

    python tests/data/uvit3d/make_hg_golden.py --git-dir /work/.mirror/CIntellifusion+GeometryForcing/repo

The official files of ``make_golden.py`` plus ``algorithms/dfot/history_guidance.py`` are read with ``git show``
into the scratch package (``--scratch``); the history-guidance file's logging imports get stand-ins
(``lightning``'s ``Logger``, ``wandb``, ``omegaconf.OmegaConf``, ``utils.print_utils.cyan``: unused with
``visualize=False``). Nothing of the official code itself is changed.

The step is the body of the sampling loop of ``DFoTVideo._sample_sequence`` (``algorithms/dfot/dfot_video.py``,
transcribed in :func:`official_step`: ``history_guidance(context_mask)`` -> ``prepare`` with
``replacement_fn = q_sample`` (the history noise, drawn from the global RNG seeded with ``SEED`` right before the
step) -> ``ContinuousDiffusion.sample_step`` (DDIM, eta 0) on the rays of ``DFoTVideoPose._process_conditions``
(normalised by the first frame, ``ray_encoding``) -> ``compose`` -> generated frames kept), with
``replacement_only = False`` (the RE10K models are not ``is_full_sequence``: ``noise_level: random_independent``).

What is recorded (CPU, float32):
- ``in.x [2, 5, 3, 32, 32]`` (float16-exact): the window in DFoT's VP space: frame 0 ground-truth context
  (mask 1), frame 1 generated history (mask 2), frames 2-3 to generate, at DDIM index ``FROM_IDX`` (mask 0),
  frame 4 padding (mask -1, level T - 1); ``in.mask``, ``in.from_levels`` / ``in.to_levels`` (DFoT's discrete
  levels: the DDIM step ``FROM_IDX -> FROM_IDX - 1``), ``in.poses16``: the raw RE10K poses of the two videos;
- ``out.<scheme>``: the step's result on the generated frames ``[2, 2, 3, 32, 32]``, for each scheme of ``SCHEMES``
  (DFoT's ``HistoryGuidance`` class methods and arguments; ``vanilla`` goes through DFoT's
  ``SimpleHistoryGuidanceManager``, the others through ``HistoryGuidanceManager``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_golden as mg  # (its constants, scratch writer and helpers)

SEED = 2024
FRAMES = 5
MASK = [1, 2, 0, 0, -1]
FROM_IDX = 25                      # DDIM index of the generated frames before the step (50 steps)
SCHEMES = {
    "vanilla": ("vanilla", {"guidance_scale": 1.5}),
    "stabilized_conditional": ("stabilized_conditional", {"stabilization_level": 0.02}),
    "stabilized_vanilla": ("stabilized_vanilla", {"guidance_scale": 4.0, "stabilization_level": 0.02}),
    "stabilized_fractional": ("stabilized_fractional", {"guidance_scale": 3.0, "freq_scale": 0.4,
                                                        "stabilization_level": 0.02}),
}
EXTRA_OFFICIAL = {"algorithms/dfot/history_guidance.py": "dfot/history_guidance.py"}
EXTRA_STUBS = {
    "omegaconf/__init__.py": "DictConfig = dict\nOmegaConf = None  # from_config only\n",
    "lightning/__init__.py": "", "lightning/pytorch/__init__.py": "", "lightning/pytorch/loggers/__init__.py": "",
    "lightning/pytorch/loggers/logger.py": "Logger = object  # a type hint only\n",
    "wandb/__init__.py": "",
    "utils/__init__.py": "", "utils/print_utils.py": "def cyan(text):\n    return text\n",
}


def write_scratch(git_dir: Path, scratch: Path) -> None:
    mg.write_scratch(git_dir, scratch)
    for src, dst in EXTRA_OFFICIAL.items():
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{mg.COMMIT}:{src}"], check=True,
                              capture_output=True, text=True).stdout
        (scratch / dst).write_text(text)
    for dst, text in EXTRA_STUBS.items():
        path = scratch / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--git-dir", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/dfot_ref"))
    args = ap.parse_args()
    write_scratch(args.git_dir, args.scratch)
    sys.path.insert(0, str(args.scratch))
    from einops import repeat
    from safetensors.torch import load_file, save_file

    from dfot.diffusion.continuous_diffusion import ContinuousDiffusion
    from dfot.history_guidance import HistoryGuidance
    from geometry_utils import CameraPose

    def process_conditions(poses16: torch.Tensor) -> torch.Tensor:   # DFoTVideoPose._process_conditions
        cams = CameraPose.from_vectors(poses16)
        cams.normalize_by_first()
        rays = cams.rays(resolution=mg.X_SHAPE[1]).to_pos_encoding()[0]
        return rays.permute(0, 1, 4, 2, 3)

    def official_step(diffusion, history_guidance, xs_pred, context_mask, from_levels, to_levels, conditions):
        """The loop body of DFoTVideo._sample_sequence (reconstruction_guidance 0, guidance_fn None)."""
        xs_pred_prev = xs_pred.clone()
        with history_guidance(context_mask) as manager:
            nfe = manager.nfe
            xs_pred, from_levels, to_levels, conditions_mask = manager.prepare(
                xs_pred, from_levels, to_levels, replacement_fn=diffusion.q_sample, replacement_only=False)
            cond = process_conditions(repeat(conditions, "b ... -> (b nfe) ...", nfe=nfe).clone())
            xs_pred = diffusion.sample_step(xs_pred, from_levels, to_levels, cond, conditions_mask, guidance_fn=None)
            xs_pred = manager.compose(xs_pred)
        keep = (context_mask == 0)[:, :, None, None, None]
        return torch.where(keep, xs_pred, xs_pred_prev), nfe

    golden = load_file(str(HERE / "golden.safetensors"))
    state = {k[len("model."):]: v.float() for k, v in golden.items() if k.startswith("model.")}
    diffusion = ContinuousDiffusion(mg.Cfg(mg.DIFFUSION), mg.Cfg(mg.TINY), torch.Size(mg.X_SHAPE), FRAMES, 16).eval()
    diffusion.model.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(77)
    b = 2
    x = mg.half_exact(torch.randn(b, FRAMES, *mg.X_SHAPE, generator=g))
    x[:, :2] = x[:, :2].clamp(-2, 2)   # the history: clean frames in DFoT's normalised space
    mask = torch.tensor([MASK] * b)
    levels = diffusion.ddim_idx_to_noise_level(torch.tensor([FROM_IDX, FROM_IDX - 1]))
    pad = mg.DIFFUSION["timesteps"] - 1

    def row(level: int) -> list[int]:
        return [-1 if m >= 1 else (pad if m < 0 else level) for m in MASK]

    from_levels = torch.tensor([row(int(levels[0]))] * b)
    to_levels = torch.tensor([row(int(levels[1]))] * b)
    rows = list(range(0, 3 * FRAMES, 3))
    poses = torch.cat([mg.read_poses("0bf152ef84195293.txt", rows)[None],
                       mg.read_poses("2f25826f0d0ef09a.txt", rows)[None]]).float()
    out = {"in.x": x.to(torch.float16), "in.mask": mask, "in.from_levels": from_levels, "in.to_levels": to_levels,
           "in.poses16": poses}
    meta = {"commit": mg.COMMIT, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "tiny_cfg": mg.TINY, "x_shape": mg.X_SHAPE, "max_tokens": FRAMES, "diffusion_cfg": mg.DIFFUSION,
            "seed": SEED, "mask": MASK, "from_idx": FROM_IDX, "schemes": {}}
    with torch.no_grad():
        for name, (method, kwargs) in SCHEMES.items():
            hg = getattr(HistoryGuidance, method)(**kwargs, timesteps=mg.DIFFUSION["timesteps"], visualize=False)
            torch.manual_seed(SEED)   # q_sample's randn_like: the global RNG
            result, nfe = official_step(diffusion, hg, x.clone(), mask, from_levels, to_levels, poses)
            out[f"out.{name}"] = result[:, 2:4].float().contiguous()
            meta["schemes"][name] = {"method": method, "kwargs": kwargs, "nfe": nfe,
                                     "manager": type(hg(mask)).__name__}
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "hg_golden.safetensors"))
    (HERE / "hg_golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(out)} tensors, {sum(v.numel() * v.element_size() for v in out.values()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

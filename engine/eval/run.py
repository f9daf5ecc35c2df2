"""``geoforge-eval``: generate videos for a protocol, compute the metrics, write the report.

    geoforge-eval --recipe dfot_tiny --checkpoint runs/x/checkpoints/step_300 --protocol short16 \\
        --num-videos 8 --i3d i3d_pretrained_400.pt --inception pt_inception-2015-12-05-6726825d.pth \\
        --lpips-backbone vgg16.pth --lpips-lin lpips_vgg.pth --vggt facebook/VGGT-1B

Output directory (``--out``, default ``<checkpoint>/eval/<protocol>``):

- ``videos/NNNNN.npz``: per video, ``generated`` (uint8 [T, 3, H, W]), ``gt`` (uint8, absent for the
  rotation protocol), ``intrinsics`` / ``extrinsics`` (the conditioning cameras) and ``context``;
- ``per_video/NNNNN.json``: that video's metrics;
- ``metrics.json``, ``report.md``, ``per_frame.png`` (metric vs frame index), ``samples.png``.

Resumable per video: every file is written atomically (temporary name, then a rename), and a rerun
(also with a larger ``--num-videos``) reuses the videos and per-video metrics already there. Videos
are generated in aligned batches (``--batch-size``) from ``(seed, first index of the batch)``, so the
result does not depend on where a run was interrupted. ``--videos-dir`` evaluates videos generated
elsewhere (same ``NNNNN.npz`` layout, or ``NNNNN.mp4``) instead of sampling.

Models: the recipe's ``model.arch``. For DFoT's U-ViT3D (``uvit3d``, e.g. ``--recipe gf_re10k_paper``)
``--checkpoint`` may also be a released DFoT / Geometry Forcing file (Lightning ``.ckpt``, ``hf://``)::

    geoforge-eval --recipe gf_re10k_paper --checkpoint hf://Haoyuwu/GeometryForcing/FILE.ckpt \
        --protocol long256 --set data.root=/data/re10k

and it is sampled through the v-prediction adapter (``engine.objectives.dfot_velocity``) on DFoT's DDIM
grid by default (``--grid auto``: Euler on it is DFoT's own 50-step DDIM, the paper's sampler), with the
protocol's history guidance (or ``--guidance ...``) on top.

History-guidance levels (``--stabilization-level``, ``--freq-scale``, and the protocols') are DFoT's noise levels
on every architecture, as GF's / DFoT's scripts give them (``stabilization_level=0.02``: a fraction of DFoT's
discrete schedule), converted to the sampler's flow times inside (``engine.eval.protocols.GuidanceSpec``).
The old flags ``--stabilization`` / ``--fraction`` (flow times for the DiT, DFoT's levels for the U-ViT3D) are
refused, naming the new ones.

Metric networks come from local files or hub references (``--i3d``, ``--inception``,
``--lpips-backbone`` + ``--lpips-lin``, ``--vggt``); a metric whose network is not given is skipped
and named, with the reason, on the console, in ``metrics.json`` (``skipped``) and in the report.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from geoforge.engine import pixels
from geoforge.engine.atomic import TEMP_PREFIX, atomic_write_bytes, atomic_write_json
from geoforge.engine.distributed import resolve_device
from geoforge.engine.eval.frechet import extract_features, frechet_distance_from_features
from geoforge.engine.eval.image_metrics import psnr, ssim
from geoforge.engine.eval.protocols import PROTOCOLS, GuidanceSpec, Protocol, get_protocol, rotation_extrinsics
from geoforge.engine.eval.report import frame_grid, write_report
from geoforge.engine.models.arch import condition_keys
from geoforge.engine.objectives.dfot_velocity import from_model_space, recipe_velocity_model, to_model_space
from geoforge.engine.precision import PRECISIONS, Precision, resolve_precision, use_precision
from geoforge.engine.sampling import GUIDANCE_NAMES, SamplerConfig, generate

if TYPE_CHECKING:
    from geoforge.engine.eval.geometry import VGGTGeometry

WEIGHT_CHOICES = ("ema", "model")
GRIDS = ("auto", "dfot", "uniform")
DFOT_WEIGHTS = {"ema": "auto", "model": "raw"}   # --weights -> load_backbone_weights' choice for DFoT / GF files


# ------------------------------------------------------------------------------------------- options
@dataclass
class EvalOptions:
    """Everything a run needs (the CLI flags, see :func:`parse_args`)."""

    recipe: str
    checkpoint: str | None
    protocol: str
    overrides: list[str] = field(default_factory=list)
    weights: str = "ema"
    num_videos: int | None = None
    out: str | None = None
    frames: int | None = None
    context: int | None = None
    steps: int = 50
    method: str = "euler"
    grid: str = "auto"
    window: int | None = None
    sliding_context: int | None = None
    batch_size: int = 4
    seed: int = 0
    data_root: str | None = None
    split: str = "test"
    device: str = "auto"
    precision: str | None = None
    videos_dir: str | None = None
    i3d: str | None = None
    inception: str | None = None
    lpips_backbone: str | None = None
    lpips_lin: str | None = None
    vggt: str | None = None
    vggt_resolution: int = 518
    vggt_frames: int | None = None
    conf_percentile: float = 0.0
    camera_scale: str = "own"
    guidance: str | None = None
    guidance_scale: float = 1.0
    stabilization_level: float = 0.0
    cond_scale: float = 1.0
    freq_scale: float = 0.5
    subsets: str | None = None
    subset_weights: str | None = None
    progress: bool = True


RENAMED_FLAGS = {   # old spelling -> (new flag, what changed)
    "--stabilization": ("--stabilization-level", ("DFoT's noise level on every architecture (was a flow time for "
                                                  "the DiT); GF's scripts' stabilization_level=0.02 is "
                                                  "--stabilization-level 0.02")),
    "--fraction": ("--freq-scale", "DFoT's freq_scale noise level on every architecture (was a flow time for the DiT)"),
}


class _Renamed(argparse.Action):
    """A flag that was renamed: refused, naming its new spelling (argparse would otherwise take an old spelling
    that is a prefix of the new one as its abbreviation)."""

    def __call__(self, parser, namespace, values, option_string=None):
        new, why = RENAMED_FLAGS[option_string]
        parser.error(f"{option_string} was renamed {new}: {why}")


def parse_args(argv: list[str] | None = None) -> EvalOptions:
    p = argparse.ArgumentParser(prog="geoforge-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe name in recipes/ or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set data.root=/data/re10k (repeatable)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint dir (checkpoints/step_N), a run dir (newest checkpoint) or a .safetensors "
                        "file; for model.arch uvit3d also a released DFoT / GF Lightning .ckpt, .pt or hf:// "
                        "reference; not needed with --videos-dir")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="ema",
                   help="EMA or raw model weights (DFoT / GF files: ema = the file's EMA weights if it has any)")
    p.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    p.add_argument("--num-videos", type=int, default=None, help="videos to evaluate (default: the protocol's)")
    p.add_argument("--out", default=None, help="output dir (default <checkpoint>/eval/<protocol>)")
    p.add_argument("--frames", type=int, default=None, help="override the protocol's frames per video (smoke tests)")
    p.add_argument("--context", type=int, default=None, help="override the protocol's context frames")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per window")
    p.add_argument("--method", choices=("euler", "ddim"), default="euler")
    p.add_argument("--grid", choices=GRIDS, default="auto",
                   help="time grid: dfot = DFoT's DDIM levels (the U-ViT3D's paper sampler: Euler on it is DFoT's "
                        "DDIM), uniform = linspace(1, 0); auto = dfot for model.arch uvit3d, uniform for the DiT")
    p.add_argument("--window", type=int, default=None, help="frames per model call (default data.frames)")
    p.add_argument("--sliding-context", type=int, default=None, help="history frames of a sliding window")
    p.add_argument("--batch-size", type=int, default=4, help="videos sampled together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="dataset root (default the recipe's data.root)")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="networks' precision (default: the recipe's distributed.precision; engine/precision.py)")
    p.add_argument("--videos-dir", default=None, help="evaluate these generated videos instead of sampling")
    p.add_argument("--i3d", default=None, help="I3D weights for FVD (i3d_pretrained_400.pt; path or hf://)")
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--lpips-backbone", default=None, help="VGG16 weights for LPIPS (torchvision vgg16 state dict)")
    p.add_argument("--lpips-lin", default=None, help="LPIPS v0.1 lin layers (vgg.pth)")
    p.add_argument("--vggt", default=None, help="VGGT weights: directory, file or hub id (facebook/VGGT-1B)")
    p.add_argument("--vggt-resolution", type=int, default=518, help="VGGT input width (multiple of 14)")
    p.add_argument("--vggt-frames", type=int, default=None, help="frames per video given to VGGT (default all)")
    p.add_argument("--conf-percentile", type=float, default=0.0, help="drop points below this depth-conf percentile")
    p.add_argument("--camera-scale", choices=("own", "lstsq", "gt", "none"), default="own")
    g = p.add_argument_group("history guidance (default: the protocol's; see engine/sampling)")
    g.add_argument("--guidance", choices=GUIDANCE_NAMES, default=None, help="scheme of the prediction windows")
    g.add_argument("--guidance-scale", type=float, default=1.0, help="HG-v / HG-f weight w")
    g.add_argument("--stabilization-level", type=float, default=0.0,
                   help="stabilized_*: noise level of generated history, DFoT's stabilization_level on every "
                        "architecture (a fraction of DFoT's schedule: 0.02 = level 19, flow time 0.196)")
    g.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance on cameras / actions")
    g.add_argument("--freq-scale", type=float, default=0.5,
                   help="HG-f: noise level of the fractional history, DFoT's freq_scale on every architecture")
    for old in RENAMED_FLAGS:
        g.add_argument(old, action=_Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--subsets", default=None, metavar="0,1;-1", help="HG-t: history-frame positions per subset")
    g.add_argument("--subset-weights", default=None, metavar="2,1.5", help="HG-t: one weight per subset")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return EvalOptions(**vars(p.parse_args(argv)))


def guidance_option(opts: EvalOptions, default: GuidanceSpec) -> GuidanceSpec:
    """The guidance of ``--guidance ...`` in the user's units (ValueError naming the flag if malformed), else
    ``default``."""
    if opts.guidance is None:
        return default

    def numbers(flag: str, text: str | None, kind: type) -> list:
        try:
            return [kind(x) for x in text.split(",")] if text else []
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}") from None

    subsets = [numbers("--subsets", part, int) for part in opts.subsets.split(";")] if opts.subsets else []
    return GuidanceSpec(opts.guidance, scale=opts.guidance_scale, stabilization_level=opts.stabilization_level,
                        freq_scale=opts.freq_scale, cond_scale=opts.cond_scale,
                        subsets=tuple(tuple(s) for s in subsets),
                        subset_weights=tuple(numbers("--subset-weights", opts.subset_weights, float)))


def log(text: str) -> None:
    print(f"[eval] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- model
def resolve_checkpoint(path: str | Path, weights: str) -> Path:
    """The safetensors file behind ``path``: a file, ``step_N/{ema,model}.safetensors`` or a run's newest
    checkpoint whose file verifies (newer damaged ones are named in a warning). A file of a checkpoint
    must match the checkpoint's manifest (``engine.checkpoint.verify_file``; CheckpointError naming it)."""
    from geoforge.engine.checkpoint import CheckpointError, checkpoint_dirs, verify_file

    path = Path(path)
    if path.is_file():
        verify_file(path)
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / "checkpoints").is_dir():
        candidates = list(reversed(checkpoint_dirs(path)))
        if not candidates:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint in {path / 'checkpoints'}")
        for candidate in candidates:
            try:
                verify_file(candidate / f"{weights}.safetensors")
            except CheckpointError as err:
                log(f"warning: {err}; trying the previous checkpoint")
                continue
            path = candidate
            break
        else:
            raise CheckpointError(f"run directory {path}: no checkpoint has a {weights}.safetensors that verifies")
    file = path / f"{weights}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (--weights {weights}); the directory holds "
                                f"{sorted(p.name for p in path.iterdir())}")
    verify_file(file)
    return file


def load_model(recipe, checkpoint: str | Path, weights: str = "ema", device: torch.device | str = "cpu"
               ) -> torch.nn.Module:
    """The backbone of ``recipe.model.arch`` (``engine.models.arch.build_model``) with the weights of ``checkpoint``:
    a GeoForge checkpoint (directory, run directory or ``.safetensors`` file; keys with or without the
    ``dit.`` prefix), or, for ``uvit3d``, any other file or ``hf://`` reference (released DFoT / GF Lightning
    ``.ckpt``, ``.pt``) through ``engine.models.uvit3d.checkpoint.load_backbone_weights``."""
    from geoforge.engine.models.arch import build_model
    from geoforge.engine.weights import load_into, read_state_dict, strip_prefix

    model = build_model(recipe.model)
    text = str(checkpoint)
    released = text.startswith("hf://") or not (Path(text).is_dir() or text.endswith(".safetensors"))
    if recipe.model.arch == "uvit3d" and released:
        from geoforge.engine.models.uvit3d.checkpoint import load_backbone_weights

        chosen = load_backbone_weights(text, model, DFOT_WEIGHTS[weights])
        log(f"loaded {text}: {chosen}")
    else:
        file = resolve_checkpoint(checkpoint, weights)
        state = with_buffers(strip_prefix(read_state_dict(file), "dit."), file, model)
        load_into(model, state, source=str(file), what="the recipe's model (check --recipe / --set model.*)")
    return model.to(device).eval()


def with_buffers(state: dict[str, torch.Tensor], file: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus the persistent buffers it lacks, from ``model.safetensors`` beside an ``ema.safetensors``
    (the EMA tracks parameters only; e.g. the U-ViT3D's random Fourier noise-embedding buffers)."""
    from geoforge.engine.checkpoint import verify_file
    from geoforge.engine.weights import read_state_dict, strip_prefix

    missing = [k for k in model.state_dict() if k not in state and k not in dict(model.named_parameters())]
    sibling = Path(file).with_name("model.safetensors")
    if not missing or Path(file).name != "ema.safetensors" or not sibling.is_file():
        return state
    verify_file(sibling)
    raw = strip_prefix(read_state_dict(sibling), "dit.")
    return {**state, **{k: raw[k] for k in missing if k in raw}}


# ------------------------------------------------------------------------------------------- networks
@dataclass
class Networks:
    """The metric networks of a run; None where not given (``skipped`` says why)."""

    fvd: torch.nn.Module | None = None
    fid: torch.nn.Module | None = None
    lpips: torch.nn.Module | None = None
    geometry: VGGTGeometry | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> list[str]:
        """Names of the networks present (per-video metrics cached without one of them are recomputed)."""
        return [name for name in ("fvd", "fid", "lpips", "geometry") if getattr(self, name) is not None]

    @classmethod
    def from_options(cls, opts: EvalOptions, device: torch.device, backend: str = "auto") -> Networks:
        """Networks from the weight options; ``backend`` is the reprojection kernel's (the recipe's ``backend``)."""
        from geoforge.engine.eval.geometry import VGGTGeometry
        from geoforge.engine.eval.i3d import FVDExtractor
        from geoforge.engine.eval.inception import FIDInceptionV3
        from geoforge.engine.eval.lpips import LPIPS

        nets = cls()
        if opts.i3d:
            nets.fvd = FVDExtractor.from_pretrained(opts.i3d, num_frames=None).to(device)
        else:
            nets.skipped["fvd"] = "no I3D weights given (--i3d PATH or hf://OWNER/REPO/i3d_pretrained_400.pt)"
        if opts.inception:
            nets.fid = FIDInceptionV3.from_pretrained(opts.inception).to(device)
        else:
            nets.skipped["fid"] = ("no Inception weights given (--inception PATH or "
                                   "hf://OWNER/REPO/pt_inception-2015-12-05-6726825d.pth)")
        if opts.lpips_backbone and opts.lpips_lin:
            nets.lpips = LPIPS.from_pretrained(opts.lpips_backbone, opts.lpips_lin).to(device)
        else:
            missing = [f for f, v in (("--lpips-backbone", opts.lpips_backbone), ("--lpips-lin", opts.lpips_lin))
                       if not v]
            nets.skipped["lpips"] = f"no LPIPS weights given ({' and '.join(missing)})"
        if opts.vggt:
            nets.geometry = VGGTGeometry.from_pretrained(
                opts.vggt, device=device, resolution=opts.vggt_resolution, max_frames=opts.vggt_frames,
                conf_percentile=opts.conf_percentile, camera_scale=opts.camera_scale, backend=backend)
        else:
            nets.skipped["reproj/camera"] = "no VGGT weights given (--vggt DIR|FILE|facebook/VGGT-1B)"
        return nets


# ------------------------------------------------------------------------------------------- storage
def video_path(out: Path, index: int) -> Path:
    return out / "videos" / f"{index:05d}.npz"


def save_video(path: Path, record: dict[str, np.ndarray | int]) -> None:
    """Atomically write one video record (``generated``, optional ``gt``, cameras, ``context``)."""
    from io import BytesIO

    buf = BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in record.items() if v is not None})
    atomic_write_bytes(path, buf.getvalue())


def _as_tchw(frames: np.ndarray, what: str) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"{what}: expected uint8 [T, 3, H, W] or [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] != 3 and frames.shape[-1] == 3:
        frames = frames.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(frames)


def load_generated(path: Path) -> dict[str, np.ndarray]:
    """A stored record (``.npz``) or, for ``.mp4`` (videos from elsewhere), ``{"generated": frames}``."""
    if path.suffix == ".mp4":
        from geoforge.engine.data.video_io import decode_video

        return {"generated": _as_tchw(decode_video(path), str(path))}
    with np.load(path) as data:
        if "generated" not in data:
            raise ValueError(f"{path}: no 'generated' array (keys {sorted(data.keys())})")
        record = {k: data[k] for k in data.keys()}
    record["generated"] = _as_tchw(record["generated"], f"{path}:generated")
    return record


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [0, 1] -> uint8 numpy."""
    return pixels.to_uint8(video).cpu().numpy()


def to_unit(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frames)).float() / 255.0


# ------------------------------------------------------------------------------------------- data
def build_eval_dataset(recipe, opts: EvalOptions, frames: int, num_videos: int):
    """The clips of the evaluation split (the synthetic one is rendered on first use from the training scenes' seed
    + 1: ``data.synthetic_seed``, else the recipe's seed)."""
    from geoforge.engine.data.re10k import Re10KClips
    from geoforge.engine.data.synthetic import ensure_synthetic_dataset

    data = recipe.data
    root = Path(opts.data_root or data.root)
    span = (frames - 1) * 1 + 1
    if data.kind == "synthetic" and not (root / opts.split).exists():
        clips = max(data.synthetic_clips, num_videos)
        log(f"rendering the synthetic {opts.split!r} split: {clips} clips of {max(data.synthetic_frames, span)} "
            f"frames into {root / opts.split}")
        ensure_synthetic_dataset(root, clips=clips, frames=max(data.synthetic_frames, span),
                                 resolution=data.resolution, seed=data.scene_seed(recipe.seed) + 1,
                                 split=opts.split)
    dataset = Re10KClips(root, split=opts.split, num_frames=frames, frame_skip=1, resolution=data.resolution,
                         seed=opts.seed, load_depth=False)
    if len(dataset) < num_videos:
        raise ValueError(f"--num-videos {num_videos}: the {opts.split!r} split of {root} has only {len(dataset)} clips")
    return dataset


def protocol_item(dataset, index: int, protocol: Protocol, frames: int, keys: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]:
    """Ground truth and the conditioning ``keys`` of video ``index`` (rotation: the first camera turned 360
    degrees; DFoT's ``poses16`` follow: the first frame's normalised intrinsics + the turned extrinsics)."""
    item = dataset[index]
    cond = {k: item[k] for k in keys if k in item}
    if protocol.rotation:
        cond["extrinsics"] = rotation_extrinsics(item["extrinsics"][0], frames)
        cond["intrinsics"] = item["intrinsics"][:1].expand(frames, 3, 3).clone()
        cond.pop("actions", None)
        if "poses16" in cond:
            cond["poses16"] = torch.cat([cond["poses16"][:1, :4].expand(frames, 4), cond["extrinsics"].flatten(-2)], -1)
    return {"frames": item["frames"], **cond}


# ------------------------------------------------------------------------------------------- metrics
def _nan_list(values: torch.Tensor, context: int) -> list[float | None]:
    return [None if i < context else float(v) for i, v in enumerate(values.tolist())]


def per_video_metrics(record: dict[str, np.ndarray], nets: Networks, context: int) -> dict:
    """One video's metrics: per-frame PSNR / SSIM / LPIPS vs ground truth (context frames are None),
    VGGT reprojection and camera errors (generated and ground truth), revisit error (no ground truth)."""
    gen = to_unit(record["generated"])
    out: dict = {}
    if "gt" in record:
        gt = to_unit(record["gt"])
        if gt.shape != gen.shape:
            raise ValueError(f"generated {tuple(gen.shape)} and ground-truth {tuple(gt.shape)} videos differ in shape")
        out["psnr"] = _nan_list(psnr(gen, gt), context)
        out["ssim"] = _nan_list(ssim(gen, gt), context)
        if nets.lpips is not None:
            device = next(nets.lpips.parameters()).device
            out["lpips"] = _nan_list(nets.lpips(gen.to(device), gt.to(device)).cpu(), context)
    else:
        from geoforge.engine.eval.camera_metrics import revisit_error

        device = next(nets.lpips.parameters()).device if nets.lpips is not None else torch.device("cpu")
        revisit = revisit_error(gen[0].to(device), gen[-1].to(device), nets.lpips)
        out.update({f"revisit_{k}": float(v) for k, v in revisit.items()})
    if nets.geometry is not None:
        ext = torch.from_numpy(record["extrinsics"]).float() if "extrinsics" in record else None
        for name, video in (("gen", record["generated"]), ("gt", record.get("gt"))):
            if video is None:
                continue
            geo = nets.geometry.video_metrics(torch.from_numpy(video), ext)
            out[f"reproj_{name}"] = geo["reproj"]
            suffix = "" if name == "gen" else "_gt"
            for key in ("rot_err", "trans_err", "cammc"):
                if key in geo:
                    out[key + suffix] = geo[key]
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(per_video: list[dict], context: int) -> tuple[dict[str, float], dict[str, list[float | None]]]:
    """Means over videos (frame metrics: over all non-context frames) and per-frame-index curves."""
    metrics: dict[str, float] = {}
    curves: dict[str, list[float | None]] = {}
    for key in ("psnr", "ssim", "lpips"):
        rows = [v[key] for v in per_video if key in v]
        if not rows:
            continue
        arr = np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=float)
        finite = np.where(np.isfinite(arr), arr, np.nan)  # identical frames give PSNR inf: left out of means
        metrics[key] = float(np.nanmean(finite))
        curves[key] = [None if i < context or np.all(np.isnan(finite[:, i])) else float(np.nanmean(finite[:, i]))
                       for i in range(arr.shape[1])]
    scalar_keys = sorted({k for v in per_video for k, x in v.items() if isinstance(x, float)})
    for key in scalar_keys:
        metrics[key] = _mean([v.get(key) for v in per_video])
    if "reproj_gen" in metrics and "reproj_gt" in metrics:
        metrics["reproj_ratio"] = metrics["reproj_gen"] / max(metrics["reproj_gt"], 1e-12)
    return metrics, curves


def set_metrics(load: Callable[[int], dict[str, np.ndarray]], count: int, nets: Networks, context: int,
                skipped: dict[str, str]) -> dict[str, float]:
    """FVD (whole videos), FID (non-context frames) and, without ground truth, the revisit FID.

    ``load(i)`` reads video record i of ``count``; videos are streamed from disk, one at a time.
    """
    out: dict[str, float] = {}
    has_gt = "gt" in load(0)

    def videos(key: str) -> Iterator[torch.Tensor]:
        for i in range(count):
            record = load(i)
            video = to_unit(record[key])[None]
            if key == "generated":
                video[:, :context] = to_unit(record["gt"][:context])  # DFoT: context frames are the GT's
            yield video

    def frames(key: str, pick: slice, chunk: int = 32) -> Iterator[torch.Tensor]:
        for i in range(count):
            yield from to_unit(load(i)[key][pick]).split(chunk)

    if count < 2:
        for name in (("fvd", "fid") if has_gt else ("revisit_fid",)):
            skipped.setdefault(name, "needs at least 2 videos")
        return out
    if has_gt:
        if nets.fvd is not None:
            out["fvd"] = frechet_distance_from_features(extract_features(videos("generated"), nets.fvd),
                                                        extract_features(videos("gt"), nets.fvd))
        if nets.fid is not None:
            rest = slice(context, None)
            out["fid"] = frechet_distance_from_features(extract_features(frames("generated", rest), nets.fid),
                                                        extract_features(frames("gt", rest), nets.fid))
    elif nets.fid is not None:
        out["revisit_fid"] = frechet_distance_from_features(
            extract_features(frames("generated", slice(-1, None)), nets.fid),
            extract_features(frames("generated", slice(0, 1)), nets.fid))
    else:
        skipped["revisit_fid"] = skipped.get("fid", "no Inception weights given (--inception)")
    return out


# ------------------------------------------------------------------------------------------- the run
def time_grid_option(opts: EvalOptions, recipe) -> tuple[float, ...] | None:
    """The flow-time grid of ``--grid`` (None: the sampler's uniform ``time_grid``); ``dfot`` (``auto`` for the
    U-ViT3D): DFoT's DDIM levels of ``--steps`` steps, on which Euler is DFoT's DDIM sampler."""
    if opts.grid not in GRIDS:
        raise ValueError(f"--grid must be one of {GRIDS}, got {opts.grid!r}")
    if opts.grid == "uniform" or (opts.grid == "auto" and recipe.model.arch != "uvit3d"):
        return None
    from geoforge.engine.objectives.dfot_velocity import dfot_flow_times

    return dfot_flow_times(recipe.dfot, opts.steps)


def sampler_config(protocol: Protocol, opts: EvalOptions, window: int, frames: int,
                   times: tuple[float, ...] | None = None, recipe=None) -> SamplerConfig:
    """The sampler of a run: the guidance (``--guidance ...`` or the protocol's) with its levels, DFoT's units
    on every architecture, as flow times on ``recipe.dfot``'s schedule (:meth:`GuidanceSpec.to_guidance`;
    DFoT's RE10K schedule without a recipe)."""
    dfot = recipe.dfot if recipe is not None else None
    guidance = guidance_option(opts, protocol.guidance).to_guidance(dfot)
    interpolation = protocol.interpolation_guidance.to_guidance(dfot)
    return SamplerConfig(method=opts.method, steps=opts.steps, times=times, window=window,
                         sliding_context=opts.sliding_context,
                         keyframe_density=protocol.keyframe_density if frames > window else None,
                         guidance=guidance, interpolation_guidance=interpolation,
                         progress=opts.progress)


def generate_videos(opts: EvalOptions, recipe, protocol: Protocol, dataset, out: Path, num_videos: int,
                    frames: int, context: int, sampler: SamplerConfig, device: torch.device) -> None:
    """Write ``videos/NNNNN.npz`` for every video not there yet (sampled, or read from ``--videos-dir``).

    Videos go in aligned batches ``[k B, (k + 1) B)`` with noise from ``(seed, k B)``; a batch with a
    missing video is regenerated whole (same result) and only the missing files are written.
    """
    for stale in [*out.glob(f"videos/{TEMP_PREFIX}*"), *out.glob(f"per_video/{TEMP_PREFIX}*")]:  # left by a killed run
        stale.unlink()
    done = {i for i in range(num_videos) if video_path(out, i).is_file()}
    pending = [i for i in range(num_videos) if i not in done]
    if done:
        log(f"resuming: {len(done)} of {num_videos} videos already in {out / 'videos'}")
    model = None
    keys = condition_keys(recipe.model.arch)
    for batch_id in sorted({i // opts.batch_size for i in pending}):
        indices = [i for i in range(batch_id * opts.batch_size, (batch_id + 1) * opts.batch_size) if i < num_videos]
        items = [protocol_item(dataset, i, protocol, frames, keys) for i in indices]
        gt = torch.stack([it["frames"] for it in items])
        cond = {k: torch.stack([it[k] for it in items]) for k in keys if k in items[0]}
        if opts.videos_dir:
            generated = torch.stack([to_unit(load_generated(_external_video(Path(opts.videos_dir), i))["generated"])
                                     for i in indices])
            if generated.shape != gt.shape:
                raise ValueError(f"--videos-dir videos are {tuple(generated.shape[1:])}, the protocol needs "
                                 f"{tuple(gt.shape[1:])}")
        else:
            if model is None:
                model = recipe_velocity_model(load_model(recipe, opts.checkpoint, opts.weights, device), recipe)
            g = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + indices[0])
            sample = generate(model, to_model_space(model, pixels.to_signed(gt[:, :context])), frames, cond, sampler,
                              generator=g, desc=f"videos {indices[0]}-{indices[-1]}")
            generated = pixels.to_unit(from_model_space(model, sample).cpu())
            generated[:, :context] = gt[:, :context]
        for j, i in enumerate(indices):
            if i not in done:
                record = {"generated": to_uint8(generated[j]), "context": context,
                          **{k: v[j].cpu().numpy() for k, v in cond.items()}}
                if not protocol.rotation:
                    record["gt"] = to_uint8(gt[j])
                save_video(video_path(out, i), record)
        log(f"videos {indices[0]}-{indices[-1]} written")


def _external_video(folder: Path, index: int) -> Path:
    for suffix in (".npz", ".mp4"):
        if (folder / f"{index:05d}{suffix}").is_file():
            return folder / f"{index:05d}{suffix}"
    raise FileNotFoundError(f"--videos-dir {folder}: no {index:05d}.npz or {index:05d}.mp4")


def video_metrics(out: Path, index: int, nets: Networks, context: int) -> dict:
    """Video ``index``'s metrics, from ``per_video/NNNNN.json`` when it was computed with these networks."""
    path = out / "per_video" / f"{index:05d}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached.get("networks", [])) >= set(nets.available):
            return cached
    metrics = {**per_video_metrics(load_generated(video_path(out, index)), nets, context), "networks": nets.available}
    atomic_write_json(path, metrics)
    return metrics


def output_dir(opts: EvalOptions, protocol: Protocol) -> Path:
    """``--out``, else ``<checkpoint or videos dir>/eval/<protocol>`` (a file's folder; for an ``hf://``
    reference ``eval/<file stem>/<protocol>`` in the working directory)."""
    if opts.out:
        return Path(opts.out)
    source = str(opts.checkpoint or opts.videos_dir)
    if source.startswith("hf://"):
        return Path("eval") / Path(source).stem / protocol.name
    base = Path(source)
    return (base.parent if base.is_file() else base) / "eval" / protocol.name


def run(opts: EvalOptions, networks: Networks | None = None) -> dict:
    """Evaluate (see the module docstring); ``networks`` replaces the ones built from the options (tests)."""
    from geoforge.engine.config import load_recipe

    recipe = load_recipe(opts.recipe, opts.overrides)
    protocol = get_protocol(opts.protocol)
    frames = opts.frames or protocol.frames
    context = opts.context if opts.context is not None else protocol.context
    num_videos = opts.num_videos or protocol.num_videos
    if num_videos < 1 or opts.batch_size < 1 or not 0 < context < frames:
        raise ValueError(f"need --num-videos >= 1, --batch-size >= 1 and 0 < context ({context}) < frames ({frames})")
    if opts.checkpoint is None and opts.videos_dir is None:
        raise ValueError("give --checkpoint (to sample) or --videos-dir (to evaluate existing videos)")
    out = output_dir(opts, protocol)
    device = resolve_device(opts.device)
    with use_precision(resolve_precision(opts.precision or recipe.distributed.precision, device)) as precision:
        log(f"precision: {precision.describe()}")
        return _run(opts, networks, recipe, protocol, frames, context, num_videos, out, device, precision)


def _run(opts: EvalOptions, networks: Networks | None, recipe, protocol, frames: int, context: int, num_videos: int,
         out: Path, device: torch.device, precision: Precision) -> dict:
    window = min(opts.window or recipe.data.frames, frames)
    sampler = sampler_config(protocol, opts, window, frames, time_grid_option(opts, recipe), recipe)
    dataset = build_eval_dataset(recipe, opts, frames, num_videos)
    log(f"{protocol.name}: {num_videos} videos of {frames} frames ({context} context), window {window}, "
        f"{opts.steps} {opts.method} steps on the {'dfot' if sampler.times else 'uniform'} grid, output {out}")

    generate_videos(opts, recipe, protocol, dataset, out, num_videos, frames, context, sampler, device)
    nets = networks if networks is not None else Networks.from_options(opts, device, recipe.backend)
    skipped = dict(nets.skipped)
    for name, reason in skipped.items():
        log(f"skipped {name}: {reason}")
    per_video = [video_metrics(out, i, nets, context) for i in range(num_videos)]
    metrics, curves = aggregate(per_video, context)
    metrics.update(set_metrics(lambda i: load_generated(video_path(out, i)), num_videos, nets, context, skipped))
    rows = []
    for i in range(min(4, num_videos)):
        record = load_generated(video_path(out, i))
        rows += [record["gt"], record["generated"]] if "gt" in record else [record["generated"]]
    has_gt = not protocol.rotation
    summary = {
        "protocol": protocol.name, "recipe": recipe.name, "checkpoint": str(opts.checkpoint or opts.videos_dir),
        "weights": opts.weights, "num_videos": num_videos, "frames": frames, "context": context,
        "precision": precision.describe(),
        "sampler": {k: v for k, v in asdict(sampler).items() if k not in ("progress",)},
        "guidance": {"prediction": asdict(guidance_option(opts, protocol.guidance)),   # the user's units
                     "interpolation": asdict(protocol.interpolation_guidance)},
        "metrics": dict(sorted(metrics.items())), "skipped": skipped,
        "grid_caption": ("Rows alternate ground truth / generated" if has_gt else "Generated rotation videos")
                        + f" (first {min(4, num_videos)} videos, evenly spaced frames).",
    }
    report = write_report(out, summary, curves if frames > 1 else None, frame_grid(rows))
    log(f"report: {report}")
    for name, value in summary["metrics"].items():
        log(f"  {name:>14s}: {value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"  {name:>14s}: {value}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from geoforge.engine.checkpoint import CheckpointError
    from geoforge.engine.errors import UserError

    opts = parse_args(argv)
    try:
        run(opts)
    except (UserError, ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

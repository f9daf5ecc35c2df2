"""``geoforge-eval``'s options: generate videos for a protocol, compute the metrics, write the report.

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
from dataclasses import dataclass, field

from geoforge.engine.eval.protocols import PROTOCOLS, GuidanceSpec
from geoforge.engine.precision import PRECISIONS
from geoforge.engine.sampling import GUIDANCE_NAMES

WEIGHT_CHOICES = ("ema", "model")
GRIDS = ("auto", "dfot", "uniform")


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

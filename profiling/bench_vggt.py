"""VGGT teacher mode vs the full forward: time and peak memory on CPU (or CUDA).

For each model configuration (random weights, built once) and ``--frames`` frames of ``--size`` x ``--size``
(one clip, ``B = 1``), four calls are measured with ``profiling/_harness.py``:

- ``full``: ``VGGT.forward`` (camera, depth and point heads; no track head), under ``torch.inference_mode``
  (the reference of the ratios);
- ``agg-all``: ``aggregator_features`` of all aggregator layers (what Geometry Forcing aligns with:
  ``CIntellifusion/GeometryForcing`` stacks all 24 VGGT-1B layers);
- ``agg-dpt``: ``aggregator_features`` of the DPT layers (VGGT-1B: 4, 11, 17, 23);
- ``agg-mid``: ``aggregator_features`` of the middle layer only (VGGT-1B: 11): the blocks after it do not run.

Time: p50 of the timed calls (``--repeat``; the 1B configuration runs 1 warm-up-free call by default). On a
shared machine the wall-clock time depends on the other load, so the process CPU time of each call
(``time.process_time``, all threads; minimum over the calls) is printed as well.
Peak memory: what the call allocates above what was allocated before it (the weights are not counted): on
CPU the torch profiler's accounting of the c10 allocator (oneDNN scratch space outside c10 is not seen), on
CUDA ``max_memory_allocated``. ``--score`` adds VideoGPA's 3D-consistency score of the same clip
(``ConsistencyScorer.score_frames``: VGGT, reprojection, LPIPS). Every call runs under the process precision (``engine.precision``) of each
``--precisions`` value: ``fp32``, and ``bf16`` (autocast; providers named ``...@bf16``).

Configurations: ``small`` = DINOv2 ViT-S/14 patch embed + 12 frame/global blocks of 384 (heads: camera 768-d
trunk of 2, DPT on layers 2/5/8/11), ``1b`` = ``VGGT()`` (VGGT-1B's architecture).

    OMP_NUM_THREADS=2 python profiling/bench_vggt.py --configs small 1b --frames 4 --size 224
    OMP_NUM_THREADS=2 python profiling/bench_vggt.py --configs small --precisions fp32,bf16
    OMP_NUM_THREADS=2 python profiling/bench_vggt.py --configs 1b --frames 10 --size 518 --precisions fp32,bf16 \
        --score                              # + VideoGPA's score of one clip (its default: 10 frames at 518)
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geoforge.engine.models.vggt import VGGT  # noqa: E402
from geoforge.engine.precision import Precision, autocast, use_precision  # noqa: E402
from profiling._harness import Case, append_csv, device_label, format_table, run_case  # noqa: E402

CONFIGS = {
    "small": {
        "aggregator": dict(embed_dim=384, depth=12, num_heads=6, patch_embed="dinov2_vits14_reg"),
        "camera_head": dict(trunk_depth=2, num_heads=12),
        "depth_head": dict(intermediate_layer_idx=[2, 5, 8, 11]),
        "point_head": dict(intermediate_layer_idx=[2, 5, 8, 11]),
        "track_head": None,
    },
    "1b": {"track_head": None},  # VGGT-1B without the track head (it only runs with query points)
}


def build(name: str, device: torch.device) -> tuple[VGGT, float]:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = VGGT.from_config(CONFIGS[name]).eval().to(device)
    model.requires_grad_(False)
    return model, time.perf_counter() - t0


CPU_SECONDS: dict[str, list[float]] = {}


def cpu_timed(label: str, fn):
    """``fn`` recording the process CPU seconds of every call under ``label``."""
    def wrapped():
        t0 = time.process_time()
        out = fn()
        CPU_SECONDS.setdefault(label, []).append(time.process_time() - t0)
        return out
    return wrapped


def cases(name: str, model: VGGT, images: torch.Tensor, repeat: int, warmup: int,
          precision: str = "fp32") -> list[Case]:
    depth = model.aggregator.depth
    dpt = sorted({i % depth for i in model.depth_head.intermediate_layer_idx})
    mid = dpt[len(dpt) // 2 - 1] if len(dpt) > 1 else dpt[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    agg_bytes = sum(p.numel() * p.element_size() for p in model.aggregator.parameters())
    frames = images.shape[1]

    installed = Precision(precision, "bench")
    at = "" if precision == "fp32" else f"@{precision}"

    def full():
        with torch.inference_mode(), use_precision(installed), autocast(images.device):
            return model(images)

    def teacher(layers):
        def call():
            with use_precision(installed):   # aggregator_features autocasts to the installed precision
                return model.aggregator_features(images, layers=layers)
        return call

    out = []
    for provider, fn, wbytes in (("full", full, weight_bytes),
                                 ("agg-all", teacher(list(range(depth))), agg_bytes),
                                 ("agg-dpt", teacher(dpt), agg_bytes),
                                 ("agg-mid", teacher([mid]), agg_bytes)):
        out.append(Case(kernel=f"vggt-{name}", provider=provider + at, mode="fwd", x_name="frames", x=frames,
                        fn=cpu_timed(f"vggt-{name} {provider}{at}", fn),
                        bytes_moved=wbytes, bytes_formula="weight bytes of the modules that run (all blocks)",
                        warmup=warmup, repeat=repeat, reference="full",
                        note=f"vggt-{name}: agg-dpt = layers {dpt}, agg-mid = layer {mid}, "
                             f"images [1, {frames}, 3, {images.shape[-2]}, {images.shape[-1]}]"))
    return out


def score_case(name: str, model: VGGT, images: torch.Tensor, repeat: int, warmup: int,
               precision: str = "fp32") -> Case:
    """VideoGPA's score of one clip (``engine.videogpa.score.ConsistencyScorer.score_frames``): VGGT's cameras and
    depth, the z-buffer reprojection of the point cloud into every frame, LPIPS of each frame against its
    reprojection (a seeded random VGG: the same network cost as LPIPS-VGG) - every network in ``precision``."""
    from geoforge.engine.videogpa.score import ConsistencyScorer, build_lpips
    from geoforge.engine.videogpa.teacher import VGGTTeacher

    installed = Precision(precision, "bench")
    with use_precision(installed):   # the teacher's dtype is the precision it is built under
        scorer = ConsistencyScorer(VGGTTeacher(model), build_lpips(random=True, device=images.device),
                                   frames=images.shape[1], resolution=images.shape[-1])
    clip = images[0]

    def call():
        with use_precision(installed):
            return scorer.score_frames(clip)

    at = "" if precision == "fp32" else f"@{precision}"
    return Case(kernel=f"videogpa-score-{name}", provider="score" + at, mode="fwd", x_name="frames",
                x=clip.shape[0], fn=cpu_timed(f"score-{name}{at}", call),
                bytes_moved=sum(p.numel() * p.element_size() for p in model.parameters()),
                bytes_formula="VGGT weight bytes", warmup=warmup, repeat=repeat, reference="score",
                note=f"videogpa-score-{name}: one clip of {clip.shape[0]} frames at {clip.shape[-1]}x{clip.shape[-1]} "
                     "(VGGT + reprojection + LPIPS)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small", "1b"], choices=sorted(CONFIGS))
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=224, help="image height = width (multiple of 14)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls for the small configuration")
    parser.add_argument("--repeat-1b", type=int, default=1, help="timed calls for the 1B configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV (harness format)")
    parser.add_argument("--precisions", default="fp32", help="fp32 and/or bf16 (autocast), e.g. fp32,bf16")
    parser.add_argument("--score", action="store_true",
                        help="also VideoGPA's 3D-consistency score of the clip (VGGT + reprojection + LPIPS)")
    args = parser.parse_args(argv)
    if args.size % 14:
        parser.error("--size must be a multiple of 14")
    device = torch.device(args.device)
    print(f"device: {device_label(device)}; torch {torch.__version__}", flush=True)
    results = []
    for name in args.configs:
        model, secs = build(name, device)
        params = sum(p.numel() for p in model.parameters())
        print(f"vggt-{name}: {params / 1e6:.1f} M parameters, built in {secs:.1f} s", flush=True)
        images = torch.rand(1, args.frames, 3, args.size, args.size, device=device)
        big = name == "1b"
        for precision in args.precisions.split(","):
            for case in cases(name, model, images, repeat=args.repeat_1b if big else args.repeat,
                              warmup=0 if big else 1, precision=precision):
                results.append(run_case(case, device))
            if args.score:
                results.append(run_case(score_case(name, model, images, repeat=args.repeat_1b if big else args.repeat,
                                                   warmup=0 if big else 1, precision=precision), device))
        del model
        gc.collect()
    print()
    print(format_table(results))
    print("\nprocess CPU seconds per call (min over calls, incl. the memory-profiled one):")
    for label, secs in CPU_SECONDS.items():
        print(f"  {label:<22} {min(secs):9.1f} s   ({len(secs)} calls)")
    if args.csv is not None:
        print("rows appended to", append_csv(results, args.csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

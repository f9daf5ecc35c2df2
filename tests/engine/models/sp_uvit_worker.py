"""Worker of test_sequence_parallel's U-ViT3D cases (run under torchrun, 2 CPU ranks, gloo): one
VideoDiffusionLoss (DFoT's U-ViT3D under DFoT's diffusion + GF head, fake teacher features) evaluated on whole
clips (sequence parallelism off) and with the transformer levels' tokens split over the ranks (on); prints the
largest relative differences of the loss parts and of the gradients (each rank's gradients summed over the
group / 2: what DeepSpeed's average over the ranks applies), and whether the GF map came sharded.

With ``"dropout": p`` (transformer levels' dropout; no 1-rank match is possible) it checks instead that the two
ranks' slices draw different dropout masks, and that activation checkpointing replays them (the same gradients
with and without it)."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from geoforge.engine.distributed import shutdown
from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.sequence_parallel import SequenceParallel, ShardedFeatures, set_sequence_parallel
from geoforge.engine.models.uvit3d import UViT3D, UViT3DConfig
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig
from geoforge.engine.objectives.geometry_forcing import DinoTermConfig, GFConfig
from geoforge.engine.objectives.gf_released import RELEASED_KEY
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from sp_compare import grad_error, init_gloo, part_error
from geoforge.engine.teacher.spec import BATCH_PREFIX, DINO_KEY, vggt_key


def main() -> None:
    case = json.loads(sys.argv[1])
    rank, n = init_gloo()
    torch.manual_seed(0)
    frames, res = case["frames"], case["resolution"]
    drop = case.get("dropout", 0.0)
    cfg = UViT3DConfig(channels=[32, 32, 32, 64], emb_channels=32, patch_size=2, num_heads=2,
                       block_dropouts=[0.0, 0.0, drop, drop], num_updown_blocks=[1, 1, 2], num_mid_blocks=2,
                       use_checkpointing=[False] * 4, resolution=res, max_frames=8, external_cond_dropout=0.0)
    released = case.get("released", False)
    dino = case.get("dino_map")
    gf = GFConfig(enabled=True, dit_block=case["gf_map"], projector_hidden=32, scale_hidden=16, angular_weight=0.5,
                  scale_weight=0.05, dino=DinoTermConfig(dit_block=dino, projector_hidden=32, scale_hidden=16,
                                                         angular_weight=0.3, scale_weight=0.1) if dino else None,
                  **({"alignment_form": "as_released", "released_size": 8, "released_mid_channels": 8}
                     if released else {}))
    dims = {RELEASED_KEY: 2} if released else {vggt_key(0): 24, vggt_key(1): 24}
    if dino:
        dims[DINO_KEY] = 12
    objective = FlowMatchingConfig(context_frames=1)
    module = VideoDiffusionLoss(UViT3D(cfg, fold_pose=case.get("fold", "never")), objective, gf, dims, "reference",
                                DFoTDiffusionConfig())
    if case.get("ckpt", False):
        enable_activation_checkpointing(module.dit.blocks())
    for p in module.parameters():   # zero-initialised layers would hide gradient paths
        torch.nn.init.normal_(p, std=0.05)
    module.train()
    b = 2
    g = torch.Generator().manual_seed(1)
    batch = {"frames": torch.rand(b, frames, 3, res, res, generator=g), "index": torch.arange(b)}
    for k, c in dims.items():
        shape = (b, frames, 2, 8, 8) if k == RELEASED_KEY else (b, frames, 3, 3, c)
        batch[BATCH_PREFIX + k] = torch.randn(*shape, generator=g)
    batch["intrinsics"] = torch.tensor([[30.0, 0, res / 2], [0, 30.0, res / 2], [0, 0, 1]]).expand(b, frames, 3, 3)
    ext = torch.eye(3, 4).repeat(b, frames, 1, 1)
    ext[..., 0, 3] = 0.3 * torch.arange(frames, dtype=torch.float32)
    batch["extrinsics"] = ext
    noise = sample_noise(objective, 0.0, batch["frames"].shape, batch["index"], 0, 3)
    noise["drop_cond"] = torch.tensor([False, True])   # one clip with, one without its pose

    sharded = {}

    def run():
        module.zero_grad()
        out = module(batch, noise)
        out["loss"].backward()
        return ({k: float(v) for k, v in out.items()},
                {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None})

    def spy(fn):   # records whether the GF head got this rank's slice of each map it reads
        def wrapped(features, batch):
            sharded.update({i: isinstance(f, ShardedFeatures) for i, f in features.items()})
            return fn(features, batch)
        return wrapped

    module.gf.forward = spy(module.gf.forward)
    if drop:
        return dropout_check(module, run, rank, n)
    set_sequence_parallel(None)
    full_parts, full_grads = run()
    set_sequence_parallel(SequenceParallel(dist.new_group(list(range(n))), n, rank))
    parts, grads = run()
    part_err = part_error(full_parts, parts, n, mean_over_ranks=True)
    # relative to the parameter's gradient, floored at 1e-3 of the whole gradient's norm: the conv bias before a
    # ResBlock's GroupNorm has a gradient that is 0 but for rounding (~1e-10), which no relative test can compare
    floor = 1e-3 * float(torch.stack([g.norm() for g in full_grads.values()]).norm())
    grad_err, worst, missing = grad_error(full_grads, grads, n, floor)
    if rank == 0:
        print("RESULT " + json.dumps({"part_err": part_err, "grad_err": grad_err, "worst": worst, "missing": missing,
                                      "parts": full_parts, "params": len(full_grads), "sharded": sharded}),
              flush=True)
    shutdown()


def dropout_check(module, run, rank: int, n: int) -> None:
    set_sequence_parallel(SequenceParallel(dist.new_group(list(range(n))), n, rank))
    masks = []
    dropout = module.dit.down_blocks[2][0].mlp_out[1]   # the first block of level 2
    dropout.register_forward_hook(lambda mod, args, out: masks.append(out == 0))
    torch.manual_seed(5)
    _, plain = run()
    enable_activation_checkpointing(module.dit.blocks())
    torch.manual_seed(5)
    _, ckpt = run()   # masks: plain forward, checkpointed forward, its recomputation in backward
    replay = all(torch.equal(masks[0], m) for m in masks[1:]) and len(masks) == 3
    grad_err = max(float((ckpt[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in plain.items())
    both = [torch.empty_like(masks[0]) for _ in range(n)]
    dist.all_gather(both, masks[0].contiguous())
    if rank == 0:
        print("RESULT " + json.dumps({"masks_differ": not torch.equal(both[0], both[1]), "replay": replay,
                                      "drop_fraction": float(masks[0].float().mean()), "ckpt_grad_err": grad_err}),
              flush=True)
    shutdown()


if __name__ == "__main__":
    main()

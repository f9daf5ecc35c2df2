"""Worker of test_sequence_parallel (run under torchrun, 2 CPU ranks, gloo): one VideoDiffusionLoss (DiT +
GF head, fake teacher features) evaluated on whole clips (sequence parallelism off) and on token slices
(on, 2 ranks); prints the largest relative differences of the loss parts and of the gradients (the
slices' gradients summed over the group / 2: what DeepSpeed's average over the ranks applies)."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from geoforge.engine.distributed import shutdown
from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig
from geoforge.engine.objectives.geometry_forcing import GFConfig
from geoforge.engine.objectives.gf_released import RELEASED_KEY
from geoforge.engine.teacher.spec import BATCH_PREFIX, vggt_key
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from sp_compare import grad_error, init_gloo, part_error


def main() -> None:
    case = json.loads(sys.argv[1])
    rank, n = init_gloo()
    torch.manual_seed(0)
    frames, res, patch = case["frames"], case["resolution"], case["patch"]
    cfg = DiTConfig(hidden_dim=64, depth=3, num_heads=4, patch_size=patch, camera=case.get("camera", "none"),
                    camera_freqs=2, attention=case.get("attention", "full"))
    released = case.get("released", False)   # GF's published form: the block's tokens gathered whole
    gf = GFConfig(enabled=True, dit_block=2, projector_hidden=32, scale_hidden=16, angular_weight=0.5,
                  scale_weight=0.05, **({"alignment_form": "as_released", "released_size": 8,
                                         "released_mid_channels": 8} if released else {}))
    dims = {RELEASED_KEY: 2} if released else {vggt_key(0): 24, vggt_key(1): 24}
    module = VideoDiffusionLoss(VideoDiT(cfg), FlowMatchingConfig(context_frames=1), gf, dims, "reference")
    if case.get("ckpt", False):
        enable_activation_checkpointing(module.dit.blocks)
    for p in module.parameters():   # zero-initialised layers would hide gradient paths
        torch.nn.init.normal_(p, std=0.05)
    module.train()
    b = 2
    g = torch.Generator().manual_seed(1)
    batch = {"frames": torch.rand(b, frames, 3, res, res, generator=g), "index": torch.arange(b),
             **{BATCH_PREFIX + k: torch.randn(*((b, frames, 2, 8, 8) if released else (b, frames, 3, 3, 24)),
                                              generator=g) for k in dims}}
    if cfg.camera != "none":
        batch["intrinsics"] = torch.tensor([[60.0, 0, res / 2], [0, 60.0, res / 2], [0, 0, 1]]).expand(b, frames, 3, 3)
        ext = torch.eye(3, 4).repeat(b, frames, 1, 1)
        ext[..., 2, 3] = torch.arange(frames, dtype=torch.float32)
        batch["extrinsics"] = ext
    noise = sample_noise(FlowMatchingConfig(context_frames=1), 0.0, batch["frames"].shape, batch["index"], 0, 3)

    def run():
        module.zero_grad()
        out = module(batch, noise)
        out["loss"].backward()
        return ({k: float(v) for k, v in out.items()},
                {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None})

    set_sequence_parallel(None)
    full_parts, full_grads = run()
    set_sequence_parallel(SequenceParallel(dist.new_group(list(range(n))), n, rank))
    parts, grads = run()
    # what the logs see: the mean over the ranks; what the optimizer sees: DeepSpeed's mean of the gradients
    part_err = part_error(full_parts, parts, n, mean_over_ranks=True)
    grad_err, worst, missing = grad_error(full_grads, grads, n)
    if rank == 0:
        print("RESULT " + json.dumps({"part_err": part_err, "grad_err": grad_err, "worst": worst, "missing": missing,
                                      "parts": full_parts, "params": len(full_grads)}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()

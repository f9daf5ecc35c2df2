"""Worker of test_dp_stream (2 CPU ranks under torchrun, gloo): the per-data-parallel-rank RNG stream that the
trainer seeds once the model is built (``engine.trainer.seed_data_parallel_stream``), on the real
:class:`~engine.diffusion_task.DiffusionTask` (a small U-ViT3D under DFoT's diffusion) through the one trainer.

Each case builds the task and the trainer the way ``engine/train.py`` does, either as the code now runs or as it
ran before the per-rank stream ("old": ``seed_data_parallel_stream`` replaced by a no-op, so the ranks go on
drawing from the stream every rank seeded to build the model):

- ``dropout``: DP 2, ``block_dropouts`` 0.3 at the transformer levels: the weights of each rank's module as built
  (before DeepSpeed, which would broadcast rank 0's) and after one step's masks of every ``nn.Dropout``;
- ``no_dropout``: DP 2, no dropout, a warm-up longer than the run: per-step loss parts, the learning rate each step
  ran with, and the weights after the run;
- ``sp``: DP 1 x SP 2: the RNG state of each rank after the build (the ranks of a group must share one stream);
- ``resume``: DP 2 with dropout, 4 steps with a checkpoint after step 2, and a fresh trainer resumed from it.

``argv``: the synthetic data root and a scratch directory. Rank 0 prints ``RESULT <json>``."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from geoforge.engine import trainer as trainer_module
from geoforge.engine.config import load_recipe
from geoforge.engine.diffusion_task import DiffusionTask
from geoforge.engine.distributed import init_world, parallel_layout, shutdown
from geoforge.engine.trainer import Trainer

STEPS, WARMUP = 3, 10   # a warm-up longer than the run: the learning rate never peaks
SMALL = ["gf.enabled=false", "data.frames=4", "data.synthetic_clips=8", "data.synthetic_frames=6",
         "data.batch_size=1", "data.num_workers=0", "distributed.grad_accum=1", "distributed.zero_stage=1",
         "distributed.precision=fp32", "model.uvit3d.num_updown_blocks=[1, 1, 1]", "model.uvit3d.num_mid_blocks=1",
         f"schedule.steps={STEPS}", f"schedule.warmup={WARMUP}", "schedule.decay=cosine", "logging.every=1",
         "logging.checkpoint_every=1000", "optimizer.lr=1e-3"]


@contextmanager
def old_seeding(old: bool):
    """As before the per-rank stream: no reseed after the build."""
    if not old:
        yield
        return
    keep = trainer_module.seed_data_parallel_stream
    trainer_module.seed_data_parallel_stream = lambda seed, dp_rank: None
    try:
        yield
    finally:
        trainer_module.seed_data_parallel_stream = keep


def build(world, data_root: str, run_dir: Path, dropout: float, sp: int = 1, old: bool = False, steps: int = STEPS):
    recipe = load_recipe("uvit3d_tiny", [*SMALL, f"data.root={data_root}", f"distributed.sequence_parallel={sp}",
                                         f"model.uvit3d.block_dropouts=[0.0, 0.0, {dropout}, {dropout}]",
                                         f"schedule.steps={steps}"])
    task = DiffusionTask(recipe, world, parallel_layout(world, sp))
    built = flat(task.module)   # as built, before DeepSpeed (which broadcasts rank 0's weights)
    with old_seeding(old):
        trainer = Trainer(recipe, task, run_dir, world)
    return trainer, built


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def record_dropout_masks(module: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Every dropping ``nn.Dropout``'s mask in training forwards: the positions zeroed that were not zero."""
    masks: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        if mod.training:
            masks.append(((output == 0) & (inputs[0] != 0)).flatten())

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return masks, handles


def case_dropout(world, data_root, scratch, old: bool) -> dict:
    trainer, built = build(world, data_root, scratch / f"dropout_old{int(old)}", 0.3, old=old)
    rng_after_build = torch.get_rng_state()
    masks, handles = record_dropout_masks(trainer.engine.module)
    trainer.train_step()
    for h in handles:
        h.remove()
    all_built, all_masks, all_rng = gather(built), gather(masks), gather(rng_after_build)
    trainer.release()
    return {"weights_equal": torch.equal(all_built[0], all_built[1]),
            "mask_count": [len(m) for m in all_masks],
            "masks_differ": any(not torch.equal(a, b) for a, b in zip(*all_masks)),
            "drop_fraction": float(torch.cat(all_masks[0]).float().mean()) if all_masks[0] else -1.0,
            "rng_equal": torch.equal(all_rng[0], all_rng[1]),
            "built_weights_sum": float(all_built[0].double().sum())}


def case_no_dropout(world, data_root, scratch, old: bool) -> dict:
    trainer, built = build(world, data_root, scratch / f"nodrop_old{int(old)}", 0.0, old=old)
    steps, lrs = [], []
    for _ in range(STEPS):
        lrs.append(trainer.engine.get_lr()[0])   # the rate this step runs with
        parts = trainer.train_step()
        steps.append({k: v for k, v in parts.items() if k != "step_seconds"})
    weights = flat(trainer.engine.module)
    trainer.release()
    all_weights = gather(weights)
    return {"losses": steps, "lrs": lrs, "weights": all_weights[0].tolist(),
            "ranks_weights_equal": torch.equal(all_weights[0], all_weights[1])}


def case_sp(world, data_root, scratch) -> dict:
    trainer, _ = build(world, data_root, scratch / "sp", 0.3, sp=2)
    states, dp_ranks = gather(torch.get_rng_state()), gather(trainer.dp_rank)
    trainer.release()
    return {"rng_equal": torch.equal(states[0], states[1]), "dp_ranks": dp_ranks}


def case_resume(world, data_root, scratch) -> dict:
    """Steps 3-4 of an uninterrupted run and of a fresh trainer resumed from its step-2 checkpoint: losses and
    dropout masks (the zero-initialised U-ViT3D feels its dropout only slightly in its first steps: the masks
    themselves are compared)."""
    full, _ = build(world, data_root, scratch / "resume_full", 0.3, steps=4)
    losses = []
    for step in range(4):
        if step == 2:
            masks, handles = record_dropout_masks(full.engine.module)
        losses.append(full.train_step()["loss"])
        if step == 1:
            checkpoint = full.save()
    for h in handles:
        h.remove()
    full.release()
    resumed, _ = build(world, data_root, scratch / "resume_again", 0.3, steps=4)
    resumed.resume(str(checkpoint))
    start = resumed.step
    masks_again, handles = record_dropout_masks(resumed.engine.module)
    again = [resumed.train_step()["loss"] for _ in range(2)]
    for h in handles:
        h.remove()
    resumed.release()
    same_masks = len(masks) == len(masks_again) > 0 and all(torch.equal(a, b) for a, b in zip(masks, masks_again))
    return {"full": losses, "resumed_from": start, "resumed": again, "masks_equal": all(gather(same_masks))}


def main() -> None:
    data_root, scratch = sys.argv[1], Path(sys.argv[2])
    world = init_world("cpu")
    result = {
        "dropout": {"new": case_dropout(world, data_root, scratch, False),
                    "old": case_dropout(world, data_root, scratch, True)},
        "no_dropout": {"new": case_no_dropout(world, data_root, scratch, False),
                       "old": case_no_dropout(world, data_root, scratch, True)},
        "sp": case_sp(world, data_root, scratch),
        "resume": case_resume(world, data_root, scratch),
        "threads": torch.get_num_threads(),
    }
    if world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()

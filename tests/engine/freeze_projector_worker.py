"""Worker of test_freeze_projector (one CPU process, gloo): ``gf.freeze_projector`` through the real
:class:`~engine.diffusion_task.DiffusionTask` and the one trainer, on gf_tiny shrunk to seconds.

Cases (each a fresh task and trainer from the same seed, so the same initial weights):

- ``frozen`` / ``trained``: ZeRO 0 (DeepSpeed keeps the client AdamW, whose ``param_groups`` and ``state`` are
  readable): the GF head's weights as built and after 3 steps, whether any of them is in the optimizer's groups or
  has optimizer state, whether any got a gradient, and whether the backbone's weights moved;
- ``frozen_zero2``: ZeRO 2 (the paper recipe's stage): the head's weights after 3 steps and whether any head
  parameter is in the ZeRO optimizer's groups; then a checkpoint and a fresh trainer resumed from it (DeepSpeed
  leaves frozen parameters out of the checkpoint): its step and its head after one more step.

``argv``: the synthetic data root and a scratch directory. Prints ``RESULT <json>``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.diffusion_task import DiffusionTask
from geoforge.engine.distributed import init_world, shutdown
from geoforge.engine.trainer import Trainer

STEPS = 3
SMALL = ["model.hidden_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "data.resolution=32",
         "data.frames=4", "data.synthetic_clips=8", "data.synthetic_frames=6", "data.batch_size=2",
         "data.num_workers=0", "gf.dit_block=1", "gf.projector_hidden=32", "gf.scale_hidden=16",
         "teacher.resolution=28", "teacher.vggt.config.aggregator.embed_dim=32",
         "teacher.vggt.config.aggregator.img_size=28", "schedule.warmup=1", f"schedule.steps={STEPS + 1}",
         "optimizer.lr=1e-2", "distributed.precision=fp32", "logging.checkpoint_every=1000", "ema.decay=0.9"]


def head(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.gf.named_parameters()}


def backbone(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.engine.module.dit.parameters()])


def build(world, data_root: str, run_dir: Path, freeze: bool, stage: int) -> Trainer:
    recipe = load_recipe("gf_tiny", [*SMALL, f"data.root={data_root}", f"gf.freeze_projector={str(freeze).lower()}",
                                     f"distributed.zero_stage={stage}"])
    return Trainer(recipe, DiffusionTask(recipe, world), run_dir, world)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def case_zero0(world, data_root: str, scratch: Path, freeze: bool) -> dict:
    trainer = build(world, data_root, scratch / f"zero0_{freeze}", freeze, 0)
    built, built_backbone = head(trainer), backbone(trainer)
    head_ids = {id(p) for p in trainer.engine.module.gf.parameters()}
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    after = head(trainer)
    opt = trainer.engine.optimizer
    in_groups = sum(id(p) in head_ids for g in opt.param_groups for p in g["params"])
    with_state = sum(id(p) in head_ids and bool(s) for p, s in opt.state.items())
    backbone_state = sum(id(p) not in head_ids and bool(s) for p, s in opt.state.items())
    out = {"losses": losses, "head_tensors": len(built), "head_equal_init": same(built, after),
           "head_changed": sum(not torch.equal(built[k], after[k]) for k in built),
           "head_in_optimizer_groups": in_groups, "head_with_optimizer_state": with_state,
           "backbone_with_optimizer_state": backbone_state,
           "head_grads": sum(p.grad is not None for p in trainer.engine.module.gf.parameters()),
           "backbone_moved": not torch.equal(built_backbone, backbone(trainer)),
           "ema_names_with_gf": sum(n.startswith("gf.") for n in trainer.ema.names)}
    trainer.release()
    return out


def case_zero2_resume(world, data_root: str, scratch: Path) -> dict:
    trainer = build(world, data_root, scratch / "zero2", True, 2)
    built = head(trainer)
    head_ids = {id(p) for p in trainer.engine.module.gf.parameters()}
    groups = trainer.engine.optimizer.bit16_groups
    in_groups = sum(id(p) in head_ids for g in groups for p in g)
    for _ in range(STEPS):
        trainer.train_step()
    after = head(trainer)
    checkpoint = trainer.save()
    loss_next = trainer.train_step()["loss"]
    trainer.release()
    resumed = build(world, data_root, scratch / "zero2", True, 2)
    resumed.resume(str(checkpoint))
    step = resumed.step
    loss_resumed = resumed.train_step()["loss"]
    out = {"head_equal_init": same(built, after), "head_in_optimizer_groups": in_groups, "resumed_step": step,
           "resumed_head_equal_init": same(built, head(resumed)), "loss_next": loss_next,
           "loss_resumed": loss_resumed}
    resumed.release()
    return out


def main() -> None:
    data_root, scratch = sys.argv[1], Path(sys.argv[2])
    world = init_world("cpu")
    result = {"frozen": case_zero0(world, data_root, scratch, True),
              "trained": case_zero0(world, data_root, scratch, False),
              "frozen_zero2": case_zero2_resume(world, data_root, scratch),
              "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()

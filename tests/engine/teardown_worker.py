"""Worker of test_teardown (one process, or 2 CPU ranks under torchrun; gloo): the conditions under which a rank
aborted at interpreter exit ("terminate called without an active exception", SIGABRT) after its work was done:
process groups still referenced at exit - the world group bound as a default argument by
``torch.distributed.nn.functional`` (imported after the process group, as ``torch.utils.checkpoint`` does), a
sequence-parallel subgroup, DeepSpeed's cached groups and the trainer's engine (its hooks live in C++) - and a
collective finished just before the exit. It trains two steps of a tiny module through the one trainer.

``argv[1]``: ``shutdown`` (``Trainer.release`` + ``engine.distributed.shutdown``, what the entry points do) or
``destroy`` (``dist.destroy_process_group()`` only: the old teardown, which aborted about every other run).
Prints ``GLOO_THREADS <n> ALIVE <m>``: gloo threads left after the teardown, groups still referenced."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from geoforge.engine.distributed import init_world, shutdown
from geoforge.engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel


def train_two_steps(world):
    """A tiny regression through the one trainer (ZeRO-2); imported here so the plain case stays lean (a
    short interpreter finalisation is what exposed the race)."""
    from geoforge.engine.config import load_recipe
    from geoforge.engine.trainer import MicroBatch, Task, Trainer

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 1))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": (self.net(x).squeeze(-1) - x.sum(-1)).square().mean()}

    class RegressionTask(Task):
        def __init__(self):
            self.module = Regression()

        def micro_batches(self, start: int):
            g = torch.Generator().manual_seed(start)
            while True:
                yield torch.randn(4, 8, generator=g)

        def prepare(self, raw, step: int, timer) -> MicroBatch:
            return MicroBatch(args=(raw,))

    recipe = load_recipe("dfot_tiny", ["distributed.zero_stage=2", "schedule.steps=2", "schedule.warmup=1"])
    trainer = Trainer(recipe, RegressionTask(), tempfile.mkdtemp(prefix="teardown-"), world)
    for _ in range(2):
        trainer.train_step()
    return trainer


def gloo_threads() -> int:
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum("gloo" in n for n in names)


def main() -> None:
    world = init_world("cpu")
    importlib.import_module("torch.distributed.nn.functional")   # after init: binds the world group
    set_sequence_parallel(SequenceParallel(dist.new_group(list(range(world.size))), world.size, world.rank))
    trainer = train_two_steps(world) if "trainer" in sys.argv[2:] else None
    for i in range(20):   # the last collective finishes just before the exit
        t = torch.full((1000,), float(i))
        dist.all_reduce(t)
    if sys.argv[1] == "shutdown":
        if trainer is not None:
            trainer.release()
            del trainer
        alive = shutdown()
    else:
        dist.destroy_process_group()
        alive = -1
    print(f"GLOO_THREADS {gloo_threads()} ALIVE {alive}", flush=True)


if __name__ == "__main__":
    main()

"""engine/distributed.py: on CUDA each rank selects its device before the process group exists (issue 16
item 4). NCCL binds a rank's communicator to the current device when the group is created; a rank that
calls ``set_device`` afterwards has its first collectives on cuda:0 with every other rank. A CPU cannot run
NCCL, so the order of the calls is recorded with CUDA and DeepSpeed stubbed out."""
from __future__ import annotations

import sys
import types

import torch

import geoforge.engine.distributed as distributed


def test_set_device_comes_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    fake_ds = types.SimpleNamespace(init_distributed=lambda dist_backend, **kw: calls.append(("init", dist_backend)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    world = distributed.init_world("auto")
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert world.device == torch.device("cuda", 1) and world.rank == 1 and world.size == 2


def test_cpu_threads_split_the_free_cores_over_the_local_ranks():
    """The engine picks each rank's intra-op threads (the README's old warning: two OpenMP threads on busy cores
    wait on each other); the recipe and OMP_NUM_THREADS override, and the reason is said."""
    pick = distributed.cpu_threads
    assert pick(0, 1, env={}, cores=2, load=0.1)[0] == 2            # idle 2-core machine, one rank
    assert pick(0, 2, env={}, cores=2, load=0.1)[0] == 1            # two ranks share the cores
    assert pick(0, 1, env={}, cores=2, load=1.8)[0] == 1            # another job keeps one core busy
    assert pick(0, 1, env={}, cores=2, load=9.0)[0] == 1            # never fewer than one
    assert pick(0, 4, env={}, cores=16, load=0.0)[0] == 4
    n, why = pick(0, 1, env={"OMP_NUM_THREADS": "3"}, cores=2, load=0.0)
    assert n == 3 and "OMP_NUM_THREADS" in why
    n, why = pick(2, 1, env={"OMP_NUM_THREADS": "3"}, cores=8, load=5.0)
    assert n == 2 and "distributed.threads" in why
    n, why = pick(0, 2, env={}, cores=8, load=2.0)
    assert n == 3 and "8 core(s)" in why and "2.0 busy" in why and "override" in why

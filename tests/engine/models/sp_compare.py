"""What the SP workers (``sp_worker.py``, ``sp_uvit_worker.py``, ``tests/engine/videogpa/sp_dpo_worker.py``)
share: the gloo process group, and the one comparison of a sequence-parallel run against the whole-clip run."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_gloo() -> tuple[int, int]:
    """Join the launcher's process group over gloo (CPU); returns (rank, world size)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size()


def part_error(full: dict[str, float], sharded: dict[str, float], n: int, mean_over_ranks: bool) -> float:
    """Largest relative error of the logged values: their mean over the ranks (what the logs see) when
    ``mean_over_ranks``, else each rank's own values (each must hold the whole-clip values; worst rank)."""
    keys = sorted(full)
    t = torch.tensor([sharded[k] for k in keys], dtype=torch.float64)
    if mean_over_ranks:
        dist.all_reduce(t)
        t /= n
    errs = torch.tensor([abs(float(t[i]) - full[k]) / max(abs(full[k]), 1e-12) for i, k in enumerate(keys)],
                        dtype=torch.float64)
    err = errs.max().reshape(1)
    if not mean_over_ranks:
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err)


def grad_error(full: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor], n: int,
               floor: float = 0.0) -> tuple[float, str, list[str]]:
    """(largest relative error, its parameter, parameters without a sharded gradient) of DeepSpeed's view: the
    mean over the ranks of the sharded gradients against the whole-clip gradient; the denominator is floored
    at ``floor`` (for gradients that are zero but for rounding)."""
    worst_err, worst = 0.0, ""
    for k, g_full in full.items():
        g_sp = sharded[k].clone()
        dist.all_reduce(g_sp)
        err = float((g_sp / n - g_full).norm()) / max(float(g_full.norm()), floor, 1e-30)
        if err > worst_err:
            worst_err, worst = err, k
    return worst_err, worst, sorted(set(full) - set(sharded))

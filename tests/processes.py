"""What the tests that start processes share: their environment and their thread count.

Every process a test starts (training runs, torchrun / deepspeed workers, the eval CLI) gets
``SUBPROCESS_THREADS`` intra-op threads, no CUDA device, unbuffered output and no Triton interpreter (the
entry points pick their CPU paths). Reductions are split by thread, so one and two threads can differ in the
last bits of a float (and so in a uint8 pixel): a test that compares what a process wrote with what the test
process computes computes its side under ``torch_threads(SUBPROCESS_THREADS)``, and the comparison then holds
on any machine and under any ``OMP_NUM_THREADS``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# one thread: on a shared, oversubscribed machine two OpenMP threads wait on each other (~10x slower)
SUBPROCESS_THREADS = 1


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a process a test starts (see the module docstring), plus ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(SUBPROCESS_THREADS), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

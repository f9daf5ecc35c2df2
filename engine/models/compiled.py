"""``torch.compile`` of a model's repeated blocks, applied from outside (``distributed.compile``; the trainer
applies it).

Each block is compiled in place (``nn.Module.compile``): its parameters, state-dict keys and hooks are
unchanged, so checkpoints, EMA, GF's feature taps and activation checkpointing (compile after it: the
checkpointed forward is traced as one region) work as before. Inductor fuses what eager PyTorch runs as
separate kernels between the matrix products - adaLN modulation, norms, GELU, RoPE, residual gates, dtype
casts under autocast - which on a CPU is a large share of a small model's step (``profiling/bench_train.py
--configs``: gf_small's step 1.12x on a 2-core CPU). Blocks are compiled lazily, at their first call: the
training step's forward and backward once (~40 s for gf_small on 2 CPU cores), each new sampling shape once more.

Inductor's parallel compile workers are turned off (``compile_threads = 1``): on a 2-core CPU they gain
nothing, and the worker pool once hung a whole training run at start-up.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """Compile each of ``blocks`` in place; returns how many."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    count = 0
    for block in blocks:
        block.compile()
        count += 1
    return count


__all__ = ["compile_blocks"]

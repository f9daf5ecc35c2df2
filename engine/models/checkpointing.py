"""Activation checkpointing applied to a model from outside: its blocks recompute their activations in
backward instead of keeping them (``distributed.activation_checkpointing``; the trainer applies it).

Each block's ``forward`` is replaced, on the instance, by a bound method that runs the class's forward
under ``torch.utils.checkpoint`` (non-reentrant, so ZeRO-3's parameter hooks and keyword arguments work)
while training with gradients, and plainly otherwise. Parameter names and state-dict keys are unchanged
(no wrapper module), and a ``copy.deepcopy`` of the model rebinds the method to the copy.
"""
from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def enable_activation_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each of ``blocks``; returns how many. Idempotent."""
    count = 0
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
        count += 1
    return count


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


__all__ = ["enable_activation_checkpointing", "is_checkpointed"]

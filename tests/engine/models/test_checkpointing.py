"""Activation checkpointing applied from outside a model: recomputation happens, names and copies hold."""
import copy

import torch
from torch import nn

from geoforge.engine.models.checkpointing import enable_activation_checkpointing, is_checkpointed


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return torch.tanh(self.lin(x)) * scale


def test_blocks_recompute_in_backward_with_the_same_gradients():
    plain = nn.Sequential(Block(), Block())
    ckpt = copy.deepcopy(plain)
    names = [n for n, _ in ckpt.named_parameters()]
    enable_activation_checkpointing(list(ckpt))
    assert [n for n, _ in ckpt.named_parameters()] == names and all(is_checkpointed(b) for b in ckpt)
    x = torch.randn(3, 4)
    grads = []
    for model in (plain, ckpt):
        for b in model:
            b.calls = 0
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert [b.calls for b in plain] == [1, 1]
    assert [b.calls for b in ckpt] == [2, 2]   # forward, then the recomputation in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_eval_and_no_grad_run_once_and_keyword_arguments_pass():
    block = Block()
    enable_activation_checkpointing([block])
    with torch.no_grad():
        block(torch.randn(2, 4), scale=2.0)
    block.eval()
    block(torch.randn(2, 4))
    assert block.calls == 2


def test_a_deep_copy_runs_its_own_weights():
    block = Block()
    enable_activation_checkpointing([block])
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.lin.weight.zero_()
        twin.lin.bias.zero_()
    x = torch.randn(2, 4)
    assert torch.equal(twin(x), torch.zeros(2, 4))
    assert not torch.equal(block(x), torch.zeros(2, 4))

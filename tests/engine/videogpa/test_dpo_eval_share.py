"""The implicit-accuracy evaluation of the DPO stage splits its pairs over the ranks so that every rank runs the
same number of forwards (under ZeRO-3 each forward gathers the partitioned parameters collectively: a rank with
fewer forwards would leave the others waiting), and counts each pair once."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from geoforge.engine.videogpa import train_dpo
from geoforge.engine.videogpa.train_dpo import eval_share, implicit_accuracy


@pytest.mark.parametrize("pairs", [0, 1, 3, 8, 9, 17])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_rank_runs_the_same_batches_and_each_pair_once(pairs, size):
    indices = list(range(pairs))
    shares = [eval_share(indices, rank, size) for rank in range(size)]
    assert len({batches for _, batches in shares}) == 1   # the same forwards on every rank
    batches = shares[0][1]
    assert all(len(mine) <= 4 * batches for mine, _ in shares)
    assert sorted(i for mine, _ in shares for i in mine) == indices


class CountingModule(nn.Module):
    """errors() of a fake DPO module: the winner's error is the pair index, so every logit is known."""

    beta = 1.0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def errors(self, x_w, x_l, cond, noise):
        self.calls += 1
        e = x_w.float()
        return e, torch.zeros_like(e), torch.zeros_like(e), torch.zeros_like(e)


def test_padded_batches_run_but_count_nothing(monkeypatch):
    monkeypatch.setattr(train_dpo, "collate", lambda items: {"i": torch.tensor(items)})
    monkeypatch.setattr(train_dpo, "prepare_batch", lambda policy, batch, cached, seed, step: (batch["i"],) * 4)
    dataset = [-1.0, -2.0, 3.0, -4.0, -5.0]   # pair i's logit is -dataset[i]: 4 of 5 positive
    mine, batches = eval_share(list(range(5)), rank=1, size=2, batch_size=2)   # rank 1 holds pairs 1 and 3
    assert mine == [1, 3] and batches == 2
    module = CountingModule()
    out = implicit_accuracy(module, None, dataset, mine, draws=2, seed=0, cached=True, batch_size=2, batches=batches)
    assert module.calls == 2 * 2                          # one padded forward per draw
    assert out == {"correct": 4.0, "margin": 2 * (2.0 + 4.0), "count": 4.0}

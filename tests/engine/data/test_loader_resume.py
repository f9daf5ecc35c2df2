"""The training loader (engine/data/builder.build_loader): a loader resumed after k micro-batches yields
exactly the batches an uninterrupted one yields after k, with worker processes and across epochs; the
batches do not depend on the number of workers; two ranks split what one rank sees."""
from __future__ import annotations

import itertools

import pytest
import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.data.builder import build_loader
from geoforge.engine.distributed import World


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return lambda *extra: load_recipe("dfot_tiny", [f"data.root={root}", "data.synthetic_clips=8",
                                                    "data.synthetic_frames=6", "data.frames=4", "data.resolution=16",
                                                    "data.batch_size=2", "data.hflip_prob=0.5", "seed=5", *extra])


def _take(loader, n):
    return [b for b in itertools.islice(iter(loader), n)]


def _loader(rec, world, start=0):
    return build_loader(rec.data, world, rec.seed, rec.distributed.grad_accum, start=start)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_resumed_loader_yields_the_same_next_batches(recipe):
    world = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
    full = _take(_loader(recipe("data.num_workers=2"), world), 10)  # 4 micro-batches per epoch
    assert len({tuple(b["index"].tolist()) for b in full[:4]}) == 4
    assert sorted(i for b in full[:4] for i in b["index"].tolist()) == list(range(8))  # one epoch = a permutation
    for start in (3, 6):
        resumed = _take(_loader(recipe("data.num_workers=2"), world, start=start), 10 - start)
        for a, b in zip(full[start:], resumed):
            _assert_same(a, b)
    no_workers = _take(_loader(recipe("data.num_workers=0"), world), 10)
    for a, b in zip(full, no_workers):
        _assert_same(a, b)
    # epochs differ: new start frames / flips for the same clip (index) in the next epoch
    first = {i: f for b in full[:4] for i, f in zip(b["index"].tolist(), b["frames"])}
    second = {i: f for b in full[4:8] for i, f in zip(b["index"].tolist(), b["frames"])}
    assert any(not torch.equal(first[i], second[i]) for i in first)


def test_two_ranks_split_the_batches_of_one(recipe):
    one = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
    single = _take(_loader(recipe("data.batch_size=4"), one), 4)
    halves = [_take(_loader(recipe("data.batch_size=2"), World(r, r, 2, 2, torch.device("cpu"))), 4)
              for r in (0, 1)]
    for step, batch in enumerate(single):
        merged = torch.cat([halves[0][step]["frames"], halves[1][step]["frames"]])
        assert torch.equal(batch["frames"], merged)

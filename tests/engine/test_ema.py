"""The sharded EMA equals a plain full-model EMA, whatever the number of shards."""
import pytest
import torch
from torch import nn

from geoforge.engine.ema import ShardedEMA


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))


def test_shards_reassemble_to_the_plain_ema():
    m = model()
    plain = {k: v.detach().clone() for k, v in m.named_parameters()}
    shards = [ShardedEMA(m, 0.9, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        for k, p in m.named_parameters():
            plain[k].lerp_(p.detach(), 0.1)
        for s in shards:
            s.update()
    for i, (name, shape) in enumerate(zip(shards[0].names, shards[0].shapes)):
        flat = torch.cat([s.shards[i] for s in shards])[:shape.numel()].view(shape)
        torch.testing.assert_close(flat, plain[name])


def test_full_state_round_trip_across_world_sizes():
    m = model()
    single = ShardedEMA(m, 0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2)
    single.update()
    full = single.full_state_dict()
    parts = [ShardedEMA(model(), 0.5, rank=r, world_size=2) for r in range(2)]
    for p in parts:
        p.load_full_state_dict(full)
    for i, (name, shape) in enumerate(zip(parts[0].names, parts[0].shapes)):
        flat = torch.cat([p.shards[i] for p in parts])[:shape.numel()].view(shape)
        torch.testing.assert_close(flat, full[name])


def test_warmup_decay_by_hand_and_capped():
    from geoforge.engine.ema import warmup_decay

    assert warmup_decay(0.99, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.99, 8) == pytest.approx(0.5)
    assert warmup_decay(0.99, 80) == pytest.approx(0.9)
    assert warmup_decay(0.99, 10_000) == 0.99
    m = model()
    ema = ShardedEMA(m, 0.99, warmup=True)
    start = {k: v.detach().clone() for k, v in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(1)
    for i, name in enumerate(ema.names):   # lerp by 1 - 2/11 towards start + 1
        torch.testing.assert_close(ema.shards[i].view(ema.shapes[i]), start[name] + 9 / 11)
    with pytest.raises(ValueError, match="step"):
        ema.update()


def test_warmup_resumes_exactly_from_the_full_state():
    """Steps 1-3, save, load into a fresh EMA (2 shards), steps 4-6 == six uninterrupted steps."""
    def drift(m, step):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))

    m = model()
    ref = ShardedEMA(m, 0.95, warmup=True)
    for step in range(1, 7):
        drift(m, step)
        ref.update(step)
    m = model()
    first = ShardedEMA(m, 0.95, warmup=True)
    for step in range(1, 4):
        drift(m, step)
        first.update(step)
    saved = first.full_state_dict()
    resumed = [ShardedEMA(m, 0.95, rank=r, world_size=2, warmup=True) for r in range(2)]
    for part in resumed:
        part.load_full_state_dict(saved)
    for step in range(4, 7):
        drift(m, step)
        for part in resumed:
            part.update(step)
    for i, shape in enumerate(ref.shapes):
        flat = torch.cat([p.shards[i] for p in resumed])[:shape.numel()].view(shape)
        assert torch.equal(flat, ref.shards[i].view(shape))

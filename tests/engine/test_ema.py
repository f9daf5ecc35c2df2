"""The sharded EMA equals a plain full-model EMA, whatever the number of shards."""
import torch
from torch import nn

from engine.ema import ShardedEMA


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

"""engine.pixels: the [0, 1] <-> [-1, 1] conversions and uint8, for tensors and numpy arrays alike."""
from __future__ import annotations

import numpy as np
import torch

from geoforge.engine.pixels import to_signed, to_uint8, to_unit


def test_ranges_round_trip_and_clamp():
    x = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(to_signed(x), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.equal(to_unit(to_signed(x)), x)
    assert torch.equal(to_unit(torch.tensor([-3.0, 3.0])), torch.tensor([0.0, 1.0]))


def test_uint8_for_tensors_and_arrays():
    values = [-0.1, 0.0, 0.5, 1.0, 1.2]
    assert to_uint8(torch.tensor(values)).tolist() == [0, 0, 128, 255, 255]
    out = to_uint8(np.array(values))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]

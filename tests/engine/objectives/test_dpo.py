"""Diffusion-DPO loss: against an independent (Diffusion-DPO-style, float64) implementation, gradients,
edge cases, and the per-sample error with context masks."""
import math

import pytest
import torch

from geoforge.engine.objectives.dpo import dpo_loss, per_sample_error


def reference_dpo(model_w, model_l, ref_w, ref_l, beta):
    """Written the way Diffusion-DPO's train.py does it (−½·β_dd with β_dd = 2β), scalar by scalar."""
    losses, correct, margins = [], [], []
    for mw, ml, rw, rl in zip(model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        model_diff, ref_diff = mw - ml, rw - rl
        inside = -0.5 * (2 * beta) * (model_diff - ref_diff)
        losses.append(math.log1p(math.exp(-inside)) if inside > -30 else -inside)  # -log sigmoid(inside)
        correct.append(1.0 if inside > 0 else 0.0)
        margins.append(beta * (rw - mw) - beta * (rl - ml))  # reward_w - reward_l
    return torch.tensor(losses, dtype=torch.float64), sum(correct) / len(correct), sum(margins) / len(margins)


@pytest.mark.parametrize("beta", [1.0, 0.1, 500.0])
def test_matches_independent_implementation(beta):
    g = torch.Generator().manual_seed(3)
    errs = [torch.rand(37, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]
    loss, acc, margin = dpo_loss(*[e.float() for e in errs], beta=beta)
    ref_loss, ref_acc, ref_margin = reference_dpo(*errs, beta=beta)
    assert loss.shape == (37,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-6)
    assert acc.item() == pytest.approx(ref_acc)
    assert margin.item() == pytest.approx(ref_margin, rel=1e-4, abs=1e-5)


def test_known_values_and_tie():
    zero = torch.zeros(2)
    loss, acc, margin = dpo_loss(zero, zero, zero, zero, beta=1.0)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)))  # θ = ref: log 2, not "correct"
    assert acc.item() == 0.0 and margin.item() == 0.0
    # the model lowered the winner's error by 0.3 relative to the reference: margin = 0.3
    loss, acc, margin = dpo_loss(torch.tensor([0.1]), torch.tensor([0.5]), torch.tensor([0.4]),
                                 torch.tensor([0.5]), beta=2.0)
    assert margin.item() == pytest.approx(0.6) and acc.item() == 1.0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.6))))


def test_gradient_direction_and_detached_reference():
    mw = torch.tensor([0.3, 0.2], requires_grad=True)
    ml = torch.tensor([0.3, 0.1], requires_grad=True)
    rw = torch.tensor([0.3, 0.2], requires_grad=True)
    rl = torch.tensor([0.3, 0.1], requires_grad=True)
    loss, _, _ = dpo_loss(mw, ml, rw, rl, beta=1.0)
    loss.sum().backward()
    # lowering the winner's error and raising the loser's lowers the loss; at a tie dL/de_w = β/2
    assert (mw.grad > 0).all() and (ml.grad < 0).all()
    torch.testing.assert_close(mw.grad, torch.full((2,), 0.5))
    assert rw.grad is None and rl.grad is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


def test_per_sample_error_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    full = per_sample_error(pred, target)
    torch.testing.assert_close(full, ((pred - target) ** 2).mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(per_sample_error(pred, target, torch.ones(3, 4, dtype=torch.bool)), full)
    mask = torch.tensor([[False, True, True, True]] * 3)
    torch.testing.assert_close(per_sample_error(pred, target, mask), ((pred - target) ** 2)[:, 1:].mean(dim=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="no frame"):
        per_sample_error(pred, target, torch.zeros(3, 4, dtype=torch.bool))

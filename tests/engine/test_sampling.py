"""engine.sampling: steps against closed forms, guidance composition, long-video plans, and real samples.

Oracle models know the data exactly: for a point mass at x0* the optimal velocity is
``v = (x_t - x0*) / t``, with which Euler lands on x0* exactly. A per-frame oracle reads the frame's
absolute index from the ``actions`` conditioning, so sliding windows, keyframes and interpolation must
slice the conditioning correctly to reproduce the target video.
"""
from __future__ import annotations

import math

import pytest
import torch

from geoforge.engine.eval.image_metrics import psnr
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss
from geoforge.engine.sampling import (CONTEXT, GENERATE, GENERATED_CONTEXT, PAD, Guidance, SamplerConfig, count_model_steps,
                             flow_step, generate, guided_velocity, interpolation_plan, keyframe_indices,
                             sample_window, scheduling_matrix, sliding_windows, time_grid)

C, H, W = 3, 4, 4


def target_video(frames: int) -> torch.Tensor:
    """[1, frames, C, H, W] in [-1, 1]: frame i is a distinct smooth pattern."""
    i = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.sin(0.7 * i + 1.3 * c + 0.5 * y + 0.3 * x)[None] * 0.9


class FrameOracle(torch.nn.Module):
    """Optimal velocity towards ``target[actions]`` per frame; records the calls it receives."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.calls: list[dict] = []

    def forward(self, x, t, actions=None, drop_cond=None, **_):
        self.calls.append({"t": t.clone(), "batch": x.shape[0], "drop": drop_cond})
        idx = actions[..., 0].round().long().clamp(0, self.target.shape[1] - 1)
        x0 = self.target[0][idx]
        tt = t.clamp_min(1e-6)[..., None, None, None]
        return torch.where(t[..., None, None, None] > 0, (x - x0) / tt, torch.zeros_like(x))


def frame_actions(frames: int, batch: int = 1) -> dict[str, torch.Tensor]:
    return {"actions": torch.arange(frames, dtype=torch.float32)[None, :, None].expand(batch, frames, 1).clone()}


# ------------------------------------------------------------------------------------------- steps
def test_time_grid_and_schedules() -> None:
    grid = time_grid(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:-1] > grid[1:-1]).all())
    full = scheduling_matrix(4, 3)
    assert full.shape == (5, 3) and bool((full == grid[:, None]).all())
    pyr = scheduling_matrix(4, 3, "pyramid")
    assert pyr.shape == (7, 3)
    for j in range(3):  # frame j waits j rows at t = 1, then follows the grid
        torch.testing.assert_close(pyr[j:j + 5, j], grid)
        assert bool((pyr[:j, j] == 1).all()) and bool((pyr[j + 5:, j] == 0).all())
    assert bool((pyr[:, :-1] <= pyr[:, 1:]).all())  # earlier frames are never noisier


def test_euler_and_ddim_follow_the_linear_path_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, C, H, W, generator=g), torch.randn(2, 3, C, H, W, generator=g)
    t = torch.tensor([[0.9, 0.5, 0.0], [1.0, 0.3, 0.7]])
    t_next = torch.tensor([[0.4, 0.2, 0.0], [0.6, 0.0, 0.7]])
    x_t = (1 - t)[..., None, None, None] * x0 + t[..., None, None, None] * eps
    expected = (1 - t_next)[..., None, None, None] * x0 + t_next[..., None, None, None] * eps
    v = eps - x0
    for method in ("euler", "ddim"):
        out = flow_step(x_t, v, t, t_next, method)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    same = t == t_next  # frames whose time does not change are returned bit-identical
    assert torch.equal(flow_step(x_t, v + 1, t, t_next)[same], x_t[same])


def test_ddim_eta_noise_is_the_ddpm_posterior_std() -> None:
    # Markov forward x_t = (a/a') x_t' + sqrt(s^2 - (a/a')^2 s'^2) n, with (a, s) = (1 - t, t):
    # Var(x_t' | x_t, x0) = s'^2 - ((a/a') s'^2)^2 / s^2.
    t, tn = torch.tensor([[0.8]]), torch.tensor([[0.3]])
    a, s, an, sn = 1 - 0.8, 0.8, 1 - 0.3, 0.3
    posterior_var = sn ** 2 - ((a / an) * sn ** 2) ** 2 / s ** 2
    zeros, ones = torch.zeros(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1)
    # With x0 = eps = 0 (x_t = 0, v = 0) the step is c z: read c off with z = 1.
    c = flow_step(zeros, zeros, t, tn, "ddim", eta=1.0, noise=ones).item()
    assert c ** 2 == pytest.approx(posterior_var, rel=1e-5)
    half = flow_step(zeros, zeros, t, tn, "ddim", eta=0.5, noise=ones).item()
    assert half == pytest.approx(0.5 * c, rel=1e-5)
    # With x0 = 0, eps = 1, z = 0 the eps coefficient is sqrt(s'^2 - c^2): total variance stays s'^2.
    x_t, v = 0.8 * ones, ones
    coef = flow_step(x_t, v, t, tn, "ddim", eta=1.0, noise=zeros).item()
    assert coef ** 2 + c ** 2 == pytest.approx(sn ** 2, rel=1e-5)


# ------------------------------------------------------------------------------------------- guidance
class BranchProbe(torch.nn.Module):
    """Velocity = 1 + 10 * (history noised) + 100 * (cond dropped), constant over the frame; records t."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, t, actions=None, drop_cond=None, **_):
        self.seen.append((x.clone(), t.clone(), drop_cond))
        noised = (t[:, 0] == 1).float()  # frame 0 is history in these tests
        dropped = drop_cond.float() if drop_cond is not None else torch.zeros_like(noised)
        value = 1 + 10 * noised + 100 * dropped
        return value[:, None, None, None, None].expand_as(x).clone()


def _probe_velocity(guidance: Guidance, kinds, cond: dict | None = None) -> tuple[torch.Tensor, BranchProbe]:
    probe = BranchProbe()
    x = torch.zeros(2, len(kinds), C, H, W)
    t = torch.tensor([0.0 if k in (CONTEXT, GENERATED_CONTEXT) else 0.6 for k in kinds])
    clean = torch.full_like(x, 0.5)
    v = guided_velocity(probe, x, t, torch.tensor(kinds), clean, cond or {}, guidance, torch.Generator().manual_seed(0))
    return v, probe


def test_history_guidance_weights() -> None:
    kinds = [CONTEXT, GENERATE, GENERATE]
    cond = frame_actions(3, 2)
    v, probe = _probe_velocity(Guidance(), kinds, cond)
    assert torch.allclose(v, torch.ones_like(v)) and len(probe.seen) == 1 and probe.seen[0][0].shape[0] == 2
    # HG-v, w = 3, guide_cond: v_u (noised history, cond dropped) = 111, v_c = 1 -> -2 * 111 + 3 * 1.
    v, probe = _probe_velocity(Guidance.named("vanilla", 3.0), kinds, cond)
    assert torch.allclose(v, torch.full_like(v, -2 * 111 + 3 * 1.0))
    assert len(probe.seen) == 1 and probe.seen[0][0].shape[0] == 4  # both branches in one batched call
    x_seen, t_seen, _ = probe.seen[0]
    noised_rows = t_seen[:, 0] == 1
    assert int(noised_rows.sum()) == 2 and bool((t_seen[~noised_rows, 0] == 0).all())
    assert torch.equal(x_seen[~noised_rows][:, 0], torch.full((2, C, H, W), 0.5))  # clean history
    assert not torch.equal(x_seen[noised_rows][:, 0], torch.full((2, C, H, W), 0.5))  # replaced by noise
    # Without guide_cond the unconditional branch keeps the cameras: -2 * 11 + 3.
    v, _ = _probe_velocity(Guidance("vanilla", 3.0, guide_cond=False), kinds, cond)
    assert torch.allclose(v, torch.full_like(v, -2 * 11 + 3 * 1.0))
    # CFG on cond with history kept: 1 + (s - 1) (1 - 101) for s = 2.5.
    v, _ = _probe_velocity(Guidance(cond_scale=2.5), kinds, cond)
    assert torch.allclose(v, torch.full_like(v, 1 + 1.5 * (1 - 101)))
    # No history in the window: HG-v degenerates to CFG on cond with weight w.
    v, _ = _probe_velocity(Guidance.named("vanilla", 3.0), [GENERATE, GENERATE], cond)
    assert torch.allclose(v, torch.full_like(v, -2 * 101 + 3 * 1.0))
    with pytest.raises(ValueError, match="cond_scale"):
        _probe_velocity(Guidance(cond_scale=2.0), kinds, None)


def test_stabilization_noises_only_generated_history() -> None:
    kinds = [CONTEXT, GENERATED_CONTEXT, GENERATE]
    _, probe = _probe_velocity(Guidance.named("stabilized_conditional", stabilization=0.02), kinds)
    x_seen, t_seen, _ = probe.seen[0]
    assert bool((t_seen[:, 0] == 0).all())
    torch.testing.assert_close(t_seen[:, 1], torch.full((2,), 0.02))
    assert torch.equal(x_seen[:, 0], torch.full((2, C, H, W), 0.5))
    eps = torch.randn(2, 1, *x_seen.shape[1:], generator=torch.Generator().manual_seed(0))  # [B, branches, ...]
    torch.testing.assert_close(x_seen[:, 1], 0.98 * 0.5 + 0.02 * eps[:, 0, 1])
    _, probe = _probe_velocity(Guidance.named("conditional"), kinds)
    assert bool((probe.seen[0][1][:, :2] == 0).all())  # unstabilized: all history clean


class MixProbe(torch.nn.Module):
    """A deterministic velocity depending on x (history leaks into every frame), t and drop_cond."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, t, actions=None, drop_cond=None, **_):
        self.batches.append(x.shape[0])
        tt = t[..., None, None, None]
        dropped = (drop_cond.float() if drop_cond is not None else torch.zeros(x.shape[0]))[:, None, None, None, None]
        return 0.5 * x + x.mean(1, keepdim=True) * (1 + tt) + torch.sin(3 * tt) + dropped * (1 + x.square())


def _mix_setup(kinds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(7)
    x, clean = torch.randn(2, len(kinds), C, H, W, generator=g), torch.randn(2, len(kinds), C, H, W, generator=g)
    t = torch.tensor([0.0 if k in (CONTEXT, GENERATED_CONTEXT) else 0.6 for k in kinds])
    return x, t, clean, frame_actions(len(kinds), 2)


def _draws(x: torch.Tensor, branches: int) -> torch.Tensor:
    """guided_velocity's history noise with DFoT's history-guidance manager: one draw of ``[B, branches, T, ...]``
    (DFoT's ``(b h)`` batch: video-major), from the generator of :func:`_guided`; branch i's noise is ``[:, i]``."""
    return torch.randn(x.shape[0], branches, *x.shape[1:], generator=torch.Generator().manual_seed(0))


def _by_hand(model, x, t, clean, cond, eps, levels: dict[int, float], drop: bool) -> torch.Tensor:
    """One model call with history frame p (window position) at level ``levels[p]``, noised with ``eps`` (that
    branch's draw)."""
    xb, tb = x.clone(), t.expand(x.shape[0], -1).clone()
    for p, k in levels.items():
        xb[:, p] = (1 - k) * clean[:, p] + k * eps[:, p]
        tb[:, p] = k
    return model(xb, tb, **cond, drop_cond=torch.full((x.shape[0],), drop))


def _guided(model, guidance: Guidance, kinds, x, t, clean, cond) -> torch.Tensor:
    return guided_velocity(model, x, t, torch.tensor(kinds), clean, cond, guidance, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("stabilization", [0.0, 0.1])
def test_fractional_history_guidance_matches_the_composition(stabilization: float) -> None:
    kinds = [CONTEXT, GENERATED_CONTEXT, GENERATE, GENERATE]
    x, t, clean, cond = _mix_setup(kinds)
    eps = _draws(x, 3)  # a separate noise per branch, in DFoT's order: u, c, fractional
    model = MixProbe()
    name = "stabilized_fractional" if stabilization else "fractional"
    v = _guided(model, Guidance.named(name, 3.0, stabilization, fraction=0.4), kinds, x, t, clean, cond)
    assert model.batches == [6]  # c, fractional and u in one batched call
    c = _by_hand(model, x, t, clean, cond, eps[:, 1], {0: 0.0, 1: stabilization}, False)
    f = _by_hand(model, x, t, clean, cond, eps[:, 2], {0: 0.4, 1: 0.4}, False)
    u = _by_hand(model, x, t, clean, cond, eps[:, 0], {0: 1.0, 1: 1.0}, True)
    torch.testing.assert_close(v, c + (3.0 - 1) * (f - u), atol=1e-5, rtol=1e-5)
    shared = _by_hand(model, x, t, clean, cond, eps[:, 0], {0: 0.4, 1: 0.4}, False)   # f with u's noise
    assert not torch.allclose(v, c + (3.0 - 1) * (shared - u), atol=1e-3)
    # Without guide_cond the unconditional branch keeps the cameras / actions.
    no_guide_cond = Guidance.named(name, 3.0, stabilization, fraction=0.4, guide_cond=False)
    v = _guided(model, no_guide_cond, kinds, x, t, clean, cond)
    u = _by_hand(model, x, t, clean, cond, eps[:, 0], {0: 1.0, 1: 1.0}, False)
    torch.testing.assert_close(v, c + 2 * (f - u), atol=1e-5, rtol=1e-5)


def test_temporal_history_guidance_matches_the_composition() -> None:
    kinds = [CONTEXT, CONTEXT, GENERATE, GENERATED_CONTEXT, GENERATE]  # history positions 0, 1, 2 = frames 0, 1, 3
    x, t, clean, cond = _mix_setup(kinds)
    eps = _draws(x, 5)  # one noise per branch, in this order: u, the two subsets, the full history +- cond
    model = MixProbe()
    guidance = Guidance.named("stabilized_temporal", stabilization=0.05, subsets=[[0, -1], [1]],
                              subset_weights=[2.0, 0.5], cond_scale=1.5)
    v = _guided(model, guidance, kinds, x, t, clean, cond)
    assert model.batches == [2 * 5]  # u, the two subsets, the full history with and without cond (CFG)
    u = _by_hand(model, x, t, clean, cond, eps[:, 0], {0: 1.0, 1: 1.0, 3: 1.0}, True)
    v1 = _by_hand(model, x, t, clean, cond, eps[:, 1], {0: 0.0, 1: 1.0, 3: 0.05}, False)
    v2 = _by_hand(model, x, t, clean, cond, eps[:, 2], {0: 1.0, 1: 0.0, 3: 1.0}, False)
    full = _by_hand(model, x, t, clean, cond, eps[:, 3], {0: 0.0, 1: 0.0, 3: 0.05}, False)
    full_nc = _by_hand(model, x, t, clean, cond, eps[:, 4], {0: 0.0, 1: 0.0, 3: 0.05}, True)
    expected = u + 2.0 * (v1 - u) + 0.5 * (v2 - u) + 0.5 * (full - full_nc)
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5)
    for bad in ([3], [0, -4]):
        with pytest.raises(ValueError, match=rf"guidance.subsets\[0\].*index {bad[-1]}.*3 history frames"):
            _guided(model, Guidance.named("temporal", subsets=[bad], subset_weights=[2.0]), kinds, x, t, clean, cond)


def test_new_history_guidance_reduces_to_the_old_schemes() -> None:
    kinds = [CONTEXT, GENERATED_CONTEXT, GENERATE, PAD]
    x, t, clean, cond = _mix_setup(kinds)
    model = MixProbe()
    run = lambda g: _guided(model, g, kinds, x, t, clean, cond)  # noqa: E731
    for stab, cs in ((0.0, 1.0), (0.1, 2.0)):
        ref = run(Guidance(stabilization=stab, cond_scale=cs))
        assert torch.equal(run(Guidance("fractional", 1.0, stab, cs, fraction=0.3)), ref)
        vanilla = Guidance("vanilla", 2.5, stab, cs)
        temporal = Guidance("temporal", stabilization=stab, cond_scale=cs, subsets=[[0, 1]], subset_weights=[2.5])
        assert temporal.branches([CONTEXT, GENERATED_CONTEXT], True) == vanilla.branches([CONTEXT, GENERATED_CONTEXT],
                                                                                          True)
        if stab:   # both through DFoT's HistoryGuidanceManager: the same draws too
            assert torch.equal(run(temporal), run(vanilla))
        else:   # HG-v is DFoT's SimpleHistoryGuidanceManager: only u's noise is drawn, [B, T, ...] not [B, 2, T, ...]
            a, b = run(temporal), run(vanilla)   # video 0's u noise is the same numbers, video 1's is not
            assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    # The same branches, merged: history frames are identified by their kinds only.
    assert (Guidance.named("fractional", 1.0).branches([CONTEXT, GENERATED_CONTEXT], True)
            == Guidance().branches([CONTEXT, GENERATED_CONTEXT], True) == [((0.0, 0.0), False, 1.0)])
    # No history in the window: HG-f and HG-t collapse onto CFG on cond, like HG-v.
    for g in (Guidance.named("fractional", 3.0), Guidance.named("temporal", subsets=[[0]], subset_weights=[3.0])):
        assert g.branches([], True) == Guidance.named("vanilla", 3.0).branches([], True) == [((), True, -2.0),
                                                                                           ((), False, 3.0)]


def test_new_history_guidance_validation_names_the_field() -> None:
    for kwargs, field_name in (({"history": "fractional", "fraction": 0.0}, "guidance.fraction"),
                               ({"history": "fractional", "fraction": 1.0}, "guidance.fraction"),
                               ({"history": "temporal"}, "guidance.subsets"),
                               ({"history": "temporal", "subsets": [[0], [1]], "subset_weights": [1.0]},
                                "guidance.subset_weights"),
                               ({"history": "temporal", "subsets": [[0]], "subset_weights": [math.inf]},
                                r"guidance.subset_weights\[0\]"),
                               ({"history": "temporal", "subsets": [[0], []], "subset_weights": [1.0, 2.0]},
                                r"guidance.subsets\[1\]"),
                               ({"history": "temporal", "subsets": [[0.5]], "subset_weights": [1.0]},
                                r"guidance.subsets\[0\]"),
                               ({"history": "frequency"}, "guidance.history")):
        with pytest.raises(ValueError, match=field_name):
            Guidance(**kwargs).validate()
    with pytest.raises(ValueError, match="guidance.fraction"):
        Guidance.named("stabilized_fractional", 2.0, 0.02, fraction=1.5)
    with pytest.raises(ValueError, match="guidance name"):
        Guidance.named("stabilized_frequency")
    g = Guidance.named("stabilized_temporal", 9.0, 0.02, subsets=[[-1]], subset_weights=[2.0])
    assert (g.history, g.scale, g.stabilization, list(g.subsets)) == ("temporal", 1.0, 0.02, [[-1]])


@pytest.mark.parametrize("guidance", [Guidance.named("stabilized_fractional", 3.0, 0.02, fraction=0.4),
                                      Guidance.named("stabilized_temporal", stabilization=0.02,
                                                     subsets=[[-1], [0, 1]], subset_weights=[1.5, 1.0])])
def test_generate_with_fractional_and_temporal_guidance_stays_exact(guidance: Guidance) -> None:
    length = 9
    target = target_video(length)
    oracle = FrameOracle(target)
    sampler = SamplerConfig(steps=3, window=5, sliding_context=3, guidance=guidance, progress=False)
    out = generate(oracle, target[:, :2], length, frame_actions(length), sampler, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)  # history-independent oracle: weights sum to 1


def test_sample_window_with_oracle_reproduces_the_target_and_keeps_context() -> None:
    target = target_video(6)
    oracle = FrameOracle(target)
    frames = target.clone()
    kinds = [CONTEXT, CONTEXT, GENERATE, GENERATE, GENERATE, PAD]
    for schedule, method in (("full_sequence", "euler"), ("pyramid", "ddim")):
        sampler = SamplerConfig(steps=5, window=6, schedule=schedule, method=method, progress=False)
        out = sample_window(oracle, frames, kinds, frame_actions(6), sampler, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out[:, :5], target[:, :5], atol=1e-5, rtol=0)
        assert torch.equal(out[:, :2], frames[:, :2])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 5], noise[:, 5])  # the pad frame stays the initial noise


# ------------------------------------------------------------------------------------------- long videos
def test_sliding_windows_cover_any_length() -> None:
    plan = sliding_windows(1, 256, 16, 8)
    assert plan[0].start == 0 and plan[0].history == 1 and plan[0].new == 15
    assert all(w.history + w.new <= 16 for w in plan)
    assert 1 + sum(w.new for w in plan) == 256
    assert len(plan) == 1 + math.ceil((256 - 16) / 8)
    covered = [w.start + w.history + k for w in plan for k in range(w.new)]
    assert covered == list(range(1, 256))
    assert all(w.start + w.history == 1 + sum(p.new for p in plan[:i]) for i, w in enumerate(plan))


def test_keyframes_and_interpolation_plan_cover_every_frame() -> None:
    keys = keyframe_indices(256, 1 / 16, context=1)
    assert keys.tolist() == torch.linspace(0, 255, 16).round().long().tolist()
    known = torch.zeros(256, dtype=torch.bool)
    known[keys] = True
    seen = known.clone()
    for chunks in interpolation_plan(known, 16):
        for chunk in chunks:
            assert len(chunk) <= 16 and bool(seen[chunk[0]]) and bool(seen[chunk[-1]])
            assert bool((chunk[1:] > chunk[:-1]).all())
        for chunk in chunks:
            seen[chunk] = True
    assert bool(seen.all())
    with pytest.raises(ValueError, match="first and last"):
        interpolation_plan(torch.tensor([True, False, False]), 8)


@pytest.mark.parametrize("density", [None, 0.25])
def test_generate_long_video_with_oracle(density: float | None) -> None:
    length, window = 27, 6
    target = target_video(length).repeat(2, 1, 1, 1, 1)
    oracle = FrameOracle(target[:1])
    sampler = SamplerConfig(steps=3, window=window, sliding_context=3, keyframe_density=density,
                            guidance=Guidance.named("stabilized_vanilla", 2.0, 0.02),
                            interpolation_guidance=Guidance.named("vanilla", 1.5), progress=False)
    out = generate(oracle, target[:, :2], length, frame_actions(length, 2), sampler, torch.Generator().manual_seed(0))
    assert out.shape == target.shape
    assert torch.equal(out[:, :2], target[:, :2])
    # Every frame was generated from the right conditioning; guidance of an exact oracle stays exact.
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    steps = sum(1 for call in oracle.calls)
    assert steps == count_model_steps(2, length, sampler)
    assert all(call["t"].shape[1] == window for call in oracle.calls)  # short windows are padded


def test_generate_validates_inputs() -> None:
    oracle = FrameOracle(target_video(4))
    with pytest.raises(ValueError, match="context frames"):
        generate(oracle, target_video(4), 4, frame_actions(4), SamplerConfig(progress=False))
    with pytest.raises(ValueError, match="per frame"):
        generate(oracle, target_video(1), 4, frame_actions(3), SamplerConfig(window=4, progress=False))
    with pytest.raises(ValueError, match="drop_cond"):
        generate(oracle, target_video(1), 4, {"drop_cond": torch.zeros(1, 4)}, SamplerConfig(window=4, progress=False))
    with pytest.raises(ValueError, match="sampler.eta"):
        SamplerConfig(eta=0.5).validate()


# ------------------------------------------------------------------------------------------- a real DiT
CLIP_T, CLIP_HW = 4, 16


def _clip() -> torch.Tensor:
    """A fixed clip [1, 4, 3, 16, 16] in [-1, 1]: a coloured pattern drifting right."""
    y, x = torch.meshgrid(torch.linspace(0, 1, CLIP_HW), torch.linspace(0, 1, CLIP_HW), indexing="ij")
    frames = [torch.stack([torch.sin(6 * (x - 0.1 * i)), torch.cos(5 * y + 2 * x), torch.sin(4 * (x + y) - 0.2 * i)])
              for i in range(CLIP_T)]
    return torch.stack(frames)[None] * 0.8


@pytest.fixture(scope="session")
def trained_dit() -> tuple[VideoDiT, torch.Tensor]:
    """A tiny DiT that memorised one clip: 250 AdamW steps of diffusion-forcing flow matching (~10 s quiet)."""
    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(hidden_dim=64, depth=2, num_heads=2, patch_size=4))
    clip = _clip()
    cfg = FlowMatchingConfig(context_frames=1, random_context=True)
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        loss = flow_matching_loss(dit, clip.expand(8, -1, -1, -1, -1), cfg, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dit.eval(), clip


def test_trained_model_samples_are_closer_to_the_data_than_noise(trained_dit) -> None:
    dit, clip = trained_dit
    sampler = SamplerConfig(steps=20, window=CLIP_T, progress=False)
    unit = lambda v: (v.clamp(-1, 1) + 1) / 2  # noqa: E731
    g = torch.Generator().manual_seed(3)
    sample = generate(dit, clip[:, :1].expand(2, -1, -1, -1, -1), CLIP_T, None, sampler, g)
    teacher = generate(dit, clip[:, :1].expand(2, -1, -1, -1, -1), CLIP_T, None, sampler, g,
                       reference=clip.expand(2, -1, -1, -1, -1))
    noise = torch.randn(sample.shape, generator=g)
    ref = unit(clip[:, 1:]).expand(2, -1, -1, -1, -1)
    p_sample, p_teacher = psnr(unit(sample[:, 1:]), ref).mean(), psnr(unit(teacher[:, 1:]), ref).mean()
    p_noise = psnr(unit(noise[:, 1:]), ref).mean()
    untrained = generate(VideoDiT(dit.cfg), clip[:, :1].expand(2, -1, -1, -1, -1), CLIP_T, None, sampler, g)
    p_untrained = psnr(unit(untrained[:, 1:]), ref).mean()
    assert p_sample > p_noise + 8 and p_teacher > p_noise + 8, (p_sample, p_teacher, p_noise)
    assert p_sample > p_untrained + 8


def test_sampling_is_deterministic_under_a_seed(trained_dit) -> None:
    dit, clip = trained_dit
    ctx = clip[:, :1].expand(2, -1, -1, -1, -1)
    sampler = SamplerConfig(steps=4, window=CLIP_T, sliding_context=2, method="ddim", eta=0.5,
                            guidance=Guidance.named("stabilized_vanilla", 2.0, 0.1), progress=False)
    a = generate(dit, ctx, 7, None, sampler, torch.Generator().manual_seed(5))
    b = generate(dit, ctx, 7, None, sampler, torch.Generator().manual_seed(5))
    c = generate(dit, ctx, 7, None, sampler, torch.Generator().manual_seed(6))
    assert a.shape == (2, 7, 3, CLIP_HW, CLIP_HW)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 1:], a[1, 1:])  # videos of a batch get their own noise
    assert dit.training is False
    dit.train()
    generate(dit, ctx, 5, None, SamplerConfig(steps=1, window=CLIP_T, progress=False), torch.Generator())
    assert dit.training is True  # the mode is restored
    dit.eval()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm under CPU autocast
def test_batch_cap_and_bf16_autocast_give_the_same_samples(trained_dit) -> None:
    dit, clip = trained_dit
    ctx = clip[:, :1].expand(3, -1, -1, -1, -1)
    base = SamplerConfig(steps=3, window=CLIP_T, guidance=Guidance.named("vanilla", 2.0), progress=False)
    ref = generate(dit, ctx, CLIP_T, None, base, torch.Generator().manual_seed(0))
    capped = generate(dit, ctx, CLIP_T, None, SamplerConfig(**{**base.__dict__, "max_batch": 2}),
                      torch.Generator().manual_seed(0))
    torch.testing.assert_close(capped, ref, atol=1e-5, rtol=0)  # 3 videos x 2 branches in chunks of 2
    bf16 = generate(dit, ctx, CLIP_T, None, SamplerConfig(**{**base.__dict__, "autocast": "bf16"}),
                    torch.Generator().manual_seed(0))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)  # bf16 matmuls ran
    assert (bf16 - ref).abs().mean() < 0.05


def test_one_generator_per_row_draws_each_row_as_alone() -> None:
    from geoforge.engine.sampling.common import randn_on

    shape = (3, 2, 3, 4, 4)
    rows = randn_on(shape, [torch.Generator().manual_seed(s) for s in (5, 6, 5)], torch.device("cpu"))
    alone = randn_on((1, *shape[1:]), torch.Generator().manual_seed(6), torch.device("cpu"))
    assert torch.equal(rows[1:2], alone) and torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_on(shape, [torch.Generator(), torch.Generator()], torch.device("cpu"))

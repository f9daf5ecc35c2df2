"""kernels/align.py: every backend of the geometry alignment loss against an independent oracle.

The oracle below re-implements DESIGN §4 from the formulas (float64 autograd, its own SiLU, norm and
clamp; it does not import the module's reference). Every backend (reference, cpu, triton under
TRITON_INTERPRET=1 on CPU tensors) is compared with it, and the fused backends with ``reference`` too:
both loss values and the gradients of x and of every weight and bias, fp32 and bf16, regular and odd
shapes, every combination of the two losses in backward.

Tolerances follow Liger-Kernel (means: fp32 atol 1e-5 / rtol 5e-4, bf16 atol 5e-3 / rtol 5e-2), and a
relative Frobenius error bound on every gradient (fp32 1e-4, bf16 5e-2) so that small gradients
cannot hide behind the absolute tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from geoforge.kernels import _backend, align

EPS = 1e-6
TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4, rel=1e-4), torch.bfloat16: dict(atol=5e-3, rtol=5e-2, rel=5e-2)}
NAMES = ["x", "W1", "b1", "W2", "b2", "W3", "b3", "V1", "c1", "V2", "c2"]

needs_triton = pytest.mark.skipif(not _backend.triton_usable(torch.device("cpu")),
                                  reason="triton not importable or TRITON_INTERPRET!=1 at import")
BACKENDS = ["reference", "cpu", pytest.param("triton", marks=needs_triton)]
FUSED = ["cpu", pytest.param("triton", marks=needs_triton)]

# (N, in_dim, hidden, target_dim, scale_hidden, chunk): regular, then odd (N=1, N=37, in_dim=33, ragged chunks)
SHAPES = [(64, 32, 64, 48, 40, 16), (1, 33, 20, 17, 9, 4), (37, 33, 50, 29, 31, 8), (37, 33, 24, 40, 16, 64)]


# ----------------------------------------------------------------------------- oracle
def _linear(h, w, b):
    return h @ w.transpose(0, 1) + b


def _silu(z):
    return z / (1 + torch.exp(-z))


def _row_norm(v):
    """sqrt(sum v^2) over the last dim, with gradient 0 (not NaN) at v = 0."""
    ss = (v * v).sum(dim=-1, keepdim=True)
    pos = ss > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, ss, torch.ones_like(ss))), torch.zeros_like(ss))


def _normalise(v):
    r = _row_norm(v)
    return v / torch.where(r >= EPS, r, torch.full_like(r, EPS))  # v / max(|v|, eps)


def oracle_losses(x, y, params):
    """(angular, scale) from the formulas; params = [W1, b1, W2, b2, W3, b3, V1, c1, V2, c2]."""
    w1, b1, w2, b2, w3, b3, v1, c1, v2, c2 = params
    p = _linear(_silu(_linear(_silu(_linear(x, w1, b1)), w2, b2)), w3, b3)
    p_hat, y_hat = _normalise(p), _normalise(y)
    angular = (1 - (p_hat * y_hat).sum(dim=-1)).sum() / x.shape[0]
    s = _linear(_silu(_linear(p_hat, v1, c1)), v2, c2)
    scale = ((s - y) ** 2).sum() / y.numel()
    return angular, scale


def params_of(m: align.GeometryAlignment) -> list[torch.Tensor]:
    layers = [m.projector[0], m.projector[2], m.projector[4], m.scale_head[0], m.scale_head[2]]
    return [t for layer in layers for t in (layer.weight, layer.bias)]


def oracle(x, y, m, w_ang, w_scale):
    """Float64 (angular, scale, [grad x, grad of each param]) of w_ang * angular + w_scale * scale."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, *params_of(m))]
    angular, scale = oracle_losses(leaves[0], y.detach().double(), leaves[1:])
    grads = torch.autograd.grad(w_ang * angular + w_scale * scale, leaves)
    return angular.detach(), scale.detach(), list(grads)


# ----------------------------------------------------------------------------- helpers
def make(shape, dtype, backend, loss_weights=(1.0, 1.0), seed=0):
    n, d_in, hid, t, shid, chunk = shape
    torch.manual_seed(seed)
    m = align.GeometryAlignment(d_in, hid, t, shid, backend=backend, loss_weights=loss_weights, chunk_size=chunk)
    m = m.to(dtype)
    x = torch.randn(n, d_in, dtype=dtype).requires_grad_(True)
    y = (torch.randn(n, t) * 2 + 0.5).to(dtype)
    return m, x, y


def run(m, x, y, w_ang, w_scale):
    """Module losses and gradients [x, *params] of w_ang * angular + w_scale * scale (fresh .grad)."""
    m.zero_grad(set_to_none=True)
    x.grad = None
    out = m(x, y)
    (w_ang * out["angular"] + w_scale * out["scale"]).backward()
    return out["angular"].detach(), out["scale"].detach(), [x.grad, *(p.grad for p in params_of(m))]


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    assert actual is not None, f"{what}: no gradient"
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    torch.testing.assert_close(a, e, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")
    denom = e.norm()
    if denom > 0:
        rel = ((a - e).norm() / denom).item()
        assert rel <= tol["rel"], f"{what}: relative Frobenius error {rel:.3g} > {tol['rel']:.3g}"


def assert_all(got, want, dtype, tag):
    ang, sc, grads = got
    ang_o, sc_o, grads_o = want
    assert_close(ang, ang_o, dtype, f"{tag} angular")
    assert_close(sc, sc_o, dtype, f"{tag} scale")
    for name, g, go in zip(NAMES, grads, grads_o):
        assert_close(g, go, dtype, f"{tag} grad {name}")


# ----------------------------------------------------------------------------- module structure
def test_module_structure():
    m = align.GeometryAlignment(8, 16, 12, 10)
    kinds = [type(layer) for layer in (*m.projector, *m.scale_head)]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear, nn.Linear, nn.SiLU, nn.Linear]
    dims = [(layer.in_features, layer.out_features) for layer in (*m.projector[::2], *m.scale_head[::2])]
    assert dims == [(8, 16), (16, 16), (16, 12), (12, 10), (10, 12)]
    assert len(list(m.parameters())) == 10


# ----------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_in{}_h{}_t{}_s{}_c{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_oracle(backend, shape, dtype):
    weights = (0.5, 0.05)
    m, x, y = make(shape, dtype, backend, loss_weights=weights)
    assert_all(run(m, x, y, *weights), oracle(x, y, m, *weights), dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "N{}_in{}".format(*s))
@pytest.mark.parametrize("backend", FUSED)
def test_against_reference(backend, shape, dtype):
    m, x, y = make(shape, dtype, "reference")
    ref = run(m, x, y, 1.0, 1.0)
    m.backend = backend
    assert_all(run(m, x, y, 1.0, 1.0), ref, dtype, f"{backend} vs reference")


@pytest.mark.parametrize("combo", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0), (1.5, 0.15), (-1.0, 1.0)],
                         ids=["angular_alone", "scale_alone", "other_ratio", "same_ratio_scaled", "negative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_combinations(backend, combo):
    """Backward of angular alone, scale alone, any weighted sum: exact whatever loss_weights says."""
    shape = (37, 33, 24, 20, 16, 8)
    m, x, y = make(shape, torch.float32, backend, loss_weights=(0.5, 0.05))
    assert_all(run(m, x, y, *combo), oracle(x, y, m, *combo), torch.float32, f"{backend} {combo}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_loss_backward(backend):
    """out['angular'].backward() alone (scale unused in the graph), then out['scale'] alone."""
    shape = (20, 12, 16, 10, 8, 6)
    m, x, y = make(shape, torch.float32, backend)
    for key, combo in (("angular", (1.0, 0.0)), ("scale", (0.0, 1.0))):
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x, y)[key].backward()
        want = oracle(x, y, m, *combo)
        for name, g, go in zip(NAMES, [x.grad, *(p.grad for p in params_of(m))], want[2]):
            if key == "angular" and name in ("V1", "c1", "V2", "c2"):
                assert g is None or not g.any(), f"{backend}: angular alone moved the scale head ({name})"
                continue
            assert_close(g, go, torch.float32, f"{backend} {key} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_twice(backend):
    """A second backward through the same graph (the stored gradients are gone) recomputes them."""
    shape = (24, 12, 16, 10, 8, 5)
    m, x, y = make(shape, torch.float32, backend, loss_weights=(1.0, 1.0))
    out = m(x, y)
    loss = out["angular"] + out["scale"]
    loss.backward(retain_graph=True)
    loss.backward()
    want = oracle(x, y, m, 2.0, 2.0)
    for name, g, go in zip(NAMES, [x.grad, *(p.grad for p in params_of(m))], want[2]):
        assert_close(g, go, torch.float32, f"{backend} twice {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_gets_no_gradient(backend):
    shape = (16, 8, 12, 10, 6, 4)
    m, x, y = make(shape, torch.float32, backend)
    y = y.clone().requires_grad_(True)
    out = m(x, y)
    (out["angular"] + out["scale"]).backward()
    assert y.grad is None
    assert x.grad is not None and all(p.grad is not None for p in params_of(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Frozen projector / x without grad: only what requires grad gets a gradient, and it is right."""
    shape = (21, 9, 14, 11, 7, 5)
    m, x, y = make(shape, torch.float32, backend)
    x = x.detach()
    for p in m.projector.parameters():
        p.requires_grad_(False)
    out = m(x, y)
    (out["angular"] + out["scale"]).backward()
    want = oracle(x, y, m, 1.0, 1.0)
    assert all(p.grad is None for p in m.projector.parameters())
    for name, p, go in zip(NAMES[7:], params_of(m)[6:], want[2][7:]):
        assert_close(p.grad, go, torch.float32, f"{backend} {name}")
    # x only (every parameter frozen)
    for p in m.parameters():
        p.requires_grad_(False)
        p.grad = None
    x.requires_grad_(True)
    out = m(x, y)
    (out["angular"] + out["scale"]).backward()
    assert_close(x.grad, want[2][0], torch.float32, f"{backend} x only")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward(backend):
    shape = (37, 33, 24, 20, 16, 8)
    m, x, y = make(shape, torch.float32, backend)
    with torch.no_grad():
        out = m(x, y)
    ang, sc, _ = oracle(x, y, m, 1.0, 1.0)
    assert_close(out["angular"], ang, torch.float32, "angular")
    assert_close(out["scale"], sc, torch.float32, "scale")
    assert out["angular"].dtype == torch.float32 and out["angular"].dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_zero_norms(backend):
    """p = 0 on every token (|p| < eps: the clamp's branch) and a target row of zeros."""
    shape = (12, 8, 10, 9, 7, 5)
    m, x, y = make(shape, torch.float32, backend)
    with torch.no_grad():
        m.projector[4].weight.zero_()
        m.projector[4].bias.zero_()
        y[3] = 0
    assert_all(run(m, x, y, 1.0, 1.0), oracle(x, y, m, 1.0, 1.0), torch.float32, f"{backend} zero norms")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_huge_norms(backend):
    """Rows of p just above eps, and very large rows (normalisation must not overflow or lose the gradient)."""
    shape = (10, 6, 8, 7, 5, 3)
    m, x, y = make(shape, torch.float32, backend)
    with torch.no_grad():
        m.projector[4].weight.mul_(1e-5)
        m.projector[4].bias.fill_(3e-6)
        y.mul_(1e4)
    assert_all(run(m, x, y, 1.0, 1e-8), oracle(x, y, m, 1.0, 1e-8), torch.float32, f"{backend} scales")


# ----------------------------------------------------------------------------- the tail alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nt", [(1, 5), (37, 33), (64, 256), (-6, 40)],
                         ids=lambda s: "N{}_T{}".format(*s) if s[0] > 0 else "zero_rows")
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_tail(backend, nt, dtype):
    n, t = abs(nt[0]), nt[1]
    p32 = torch.randn(n, t)
    y = p32 + 0.7 * torch.randn(n, t)  # correlated: cos ~ 0.8, so the tangential term matters
    if nt[0] < 0:  # adversarial (kept apart: a clamped row's gradient is ~1/eps and would dominate the norm)
        p32[0] = 0  # |p| = 0 < eps: the clamp's branch
        p32[1] = 1e-7  # 0 < |p| < eps
        y[2] = 0
    p, y = p32.to(dtype), y.to(dtype)
    s = torch.randn(n, t).to(dtype)
    ang, sc, gp, gs = align.loss_tail(p, s, y, backend=backend)
    leaves = [p.double().requires_grad_(True), s.double().requires_grad_(True)]
    yd = y.double()
    ang_o = (1 - (_normalise(leaves[0]) * _normalise(yd)).sum(dim=-1)).sum() / n
    sc_o = ((leaves[1] - yd) ** 2).sum() / (n * t)
    gp_o, = torch.autograd.grad(ang_o, leaves[0])
    gs_o, = torch.autograd.grad(sc_o, leaves[1])
    for what, a, e in (("angular", ang, ang_o), ("scale", sc, sc_o), ("grad p", gp, gp_o), ("grad s", gs, gs_o)):
        assert_close(a, e, dtype, f"tail {backend} {what}")
    assert gp.dtype == dtype and gs.dtype == dtype
    ang2, sc2, none_p, none_s = align.loss_tail(p, s, y, backend=backend, grad=False)
    assert none_p is None and none_s is None
    assert_close(ang2, ang_o, dtype, "tail no-grad angular")
    assert_close(sc2, sc_o, dtype, "tail no-grad scale")


# ----------------------------------------------------------------------------- memory and build
def _cpu_peak_bytes(fn) -> int:
    """Peak bytes above the start held on c10's CPU allocator during fn() (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def test_fused_never_holds_full_projection():
    """The cpu backend's forward+backward holds the gradients it returns plus chunk buffers, never an
    [N, target_dim] tensor; the reference (checked too, so the probe can see such tensors) holds several."""
    n, d_in, hid, t, shid, chunk = 2048, 16, 128, 256, 128, 64
    m = align.GeometryAlignment(d_in, hid, t, shid, backend="cpu", chunk_size=chunk)
    x = torch.randn(n, d_in, requires_grad=True)
    y = torch.randn(n, t)
    full = n * t * 4  # one [N, target_dim] fp32 tensor: 2 MiB
    grads = sum(p.numel() for p in m.parameters()) * 4 + x.numel() * 4

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        out = m(x, y)
        (out["angular"] + out["scale"]).backward()

    step()  # builds the extension, warms the allocator
    m.zero_grad(set_to_none=True)
    x.grad = None
    fused = _cpu_peak_bytes(step)
    m.backend = "reference"
    m.zero_grad(set_to_none=True)
    x.grad = None
    ref = _cpu_peak_bytes(step)
    assert ref > grads + 3 * full, f"probe sees too little: reference peak {ref} B"
    chunk_buffers = 8 * chunk * max(hid, t, shid) * 4
    assert fused - grads <= chunk_buffers + full // 4, (
        f"fused peak {fused} B = gradients {grads} B + {fused - grads} B of buffers "
        f"(limit {chunk_buffers + full // 4} B; one [N, T] tensor is {full} B)")


def test_cpu_extension_builds():
    ext = align._load_cpp_extension()
    for name in ("norm_fwd", "scale_err", "norm_bwd", "tail"):
        assert hasattr(ext, name), name
    assert isinstance(align.tail_ops("cpu"), align._CppTail)


def test_auto_resolves_to_cpu_on_cpu_tensors():
    assert _backend.resolve("align", "auto", torch.device("cpu")) == "cpu"


def test_bad_inputs():
    m = align.GeometryAlignment(4, 8, 6, 5, backend="reference")
    with pytest.raises(ValueError):
        m(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(ValueError):
        m(torch.randn(3, 4), torch.randn(2, 6))
    with pytest.raises(ValueError):
        align.GeometryAlignment(4, 8, 6, 5, backend="bogus")
    with pytest.raises(ValueError):
        align.GeometryAlignment(4, 8, 6, 5, loss_weights=(0.0, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradients_made_in_forward(backend, dtype, monkeypatch):
    """With grad_outputs in the ratio of loss_weights, backward only rescales (one chunked pass in all);
    another ratio costs exactly one more pass."""
    calls = []
    real = align._fused_pass
    monkeypatch.setattr(align, "_fused_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, x, y = make((20, 12, 16, 10, 8, 6), dtype, backend, loss_weights=(0.5, 0.05))
    out = m(x, y)
    (2.0 * (0.5 * out["angular"] + 0.05 * out["scale"])).backward()
    assert len(calls) == 1
    out = m(x, y)
    (out["angular"] + out["scale"]).backward()
    assert len(calls) == 3


# ----------------------------------------------------------------------------- GPU-readiness (issue 16)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_paths_refuse_fp16(backend):
    """fp16 gradients of the fused paths underflow (coefficients 2/(N*T) below fp16's subnormals): refused."""
    m, x, y = make(SHAPES[0], torch.float16, backend)
    with pytest.raises(TypeError, match="float16 is not supported on the fused"):
        m(x, y)
    p = torch.randn(8, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 is not supported on the fused"):
        align.loss_tail(p, p.clone(), p.clone(), backend=backend)
    ref = align.GeometryAlignment(32, 64, 48, 40, backend="reference").half()  # the reference still takes fp16
    assert torch.isfinite(ref(torch.randn(4, 32).half(), torch.randn(4, 48).half())["angular"].float())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weight_gradients_accumulate_in_fp32(device):
    """bf16 chunk products go into the float32 accumulator without a bf16 temporary (issue 16 item 5)."""
    torch.manual_seed(0)
    chunks, rows, out_dim, in_dim = 16, 64, 48, 40
    ws = align._Workspace(rows, 64, 48, 40, 2 * rows * 64 if device == "cpu" else 0, torch.bfloat16,
                          torch.device(device))
    acc = torch.zeros(out_dim, in_dim, device=device)
    exact = torch.zeros(out_dim, in_dim, dtype=torch.float64)
    for _ in range(chunks):
        g = torch.randn(rows, out_dim).bfloat16()
        h = torch.randn(rows, in_dim).bfloat16()
        align._accumulate(acc, g.t().to(device), h.to(device), ws)
        exact += g.double().t() @ h.double()
    if device == "cuda":
        assert align._MIXED_GEMM["ok"], "addmm(out_dtype=float32) is not available: the fallback ran"
    acc = acc.cpu()
    rel = ((acc.double() - exact).norm() / exact.norm()).item()
    assert rel < 1e-6, f"relative error {rel:.2e}: the chunk products were rounded below float32"


@needs_triton
def test_triton_tail_refuses_partial_rows(monkeypatch):
    """The in-place tail needs one program per whole row (BLOCK_T >= T); a config breaking that is refused."""
    ops = align.tail_ops("triton")
    monkeypatch.setattr(type(ops), "config", staticmethod(lambda rows, cols, tiles=2: (1, 16, 8)))
    p, y = torch.randn(4, 40), torch.randn(4, 40)
    with pytest.raises(ValueError, match="BLOCK_T=16 < T=40"):
        ops.norm_fwd(p, y, p)


def test_launch_config_warps_and_width(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: False)  # the GPU configuration
    for cols in (17, 1024, 2048, 4096, 8192, 16384):
        for tiles in (2, 3) if cols <= 8192 else (2,):
            block_r, block_t, warps = align.launch_config(8192, cols, tiles)
            assert block_t >= cols and 8 <= warps <= 32
            assert block_r * block_t // (32 * warps) <= 16, "more than 16 values per thread: register spills"
    assert align.launch_config(8192, 2048)[2] == 8  # _norm_bwd at VGGT width: 8 warps (74 registers, sm_90)
    with pytest.raises(ValueError, match="at most 16384"):
        align.launch_config(8, 16385)
    with pytest.raises(ValueError, match="at most 8192 fit without register spills in the one-pass tail"):
        align.launch_config(8, 8193, tiles=3)


# ----------------------------------------------------------------------------- GPU lane (compiled Triton)
# Realistic: a 2048-token chunk boundary crossed, DiT-L width 1024 into VGGT's 2048 channels.
CUDA_SHAPES = SHAPES + [(4099, 1024, 1024, 2048, 512, 2048)]


def _to_cuda(m, x, y):
    import copy

    mc = copy.deepcopy(m).cuda()
    return mc, x.detach().cuda().requires_grad_(True), y.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_triton_against_oracle_and_reference(shape, dtype):
    """Compiled Triton on CUDA: losses and every gradient against the float64 oracle and the reference."""
    m, x, y = make(shape, dtype, "triton")
    mc, xc, yc = _to_cuda(m, x, y)
    got = run(mc, xc, yc, 0.5, 0.05)
    assert_all(got, oracle(x, y, m, 0.5, 0.05), dtype, "cuda triton vs oracle")
    ref = copy_backend(mc, "reference")
    assert_all(got, run(ref, xc, yc, 0.5, 0.05), dtype, "cuda triton vs reference")


def copy_backend(m, backend):
    import copy

    other = copy.deepcopy(m)
    other.backend = backend
    return other


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nt", [(37, 29), (4096, 2048)])
def test_cuda_loss_tail_against_reference(nt, dtype):
    n, t = nt
    p, s, y = (torch.randn(n, t, device="cuda").to(dtype) for _ in range(3))
    ang, sc, gp, gs = align.loss_tail(p, s, y, backend="triton")
    ang_r, sc_r, gp_r, gs_r = align.loss_tail(p.float(), s.float(), y.float(), backend="reference")
    for what, a, e in (("angular", ang, ang_r), ("scale", sc, sc_r), ("grad p", gp, gp_r), ("grad s", gs, gs_r)):
        assert_close(a, e, dtype, f"cuda loss_tail {what}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="GPU lane: needs two CUDA devices")
def test_cuda_triton_on_the_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launch must follow the tensors (device_guard)."""
    m, x, y = make(SHAPES[2], torch.float32, "triton")
    torch.cuda.set_device(0)
    mc = __import__("copy").deepcopy(m).to("cuda:1")
    got = run(mc, x.detach().to("cuda:1").requires_grad_(True), y.to("cuda:1"), 0.5, 0.05)
    assert_all(got, oracle(x, y, m, 0.5, 0.05), torch.float32, "cuda:1 triton vs oracle")

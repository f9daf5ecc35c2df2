"""kernels/film_norm.py: fused RMSNorm + FiLM, every backend against an independent float64 oracle and the reference.

The oracle below writes the formula out (``x / sqrt(mean(x^2) + eps) * w * (1 + scale) + shift`` in float64
autograd; it does not use ``F.rms_norm``). Every backend (reference, cpu, triton under TRITON_INTERPRET=1 on CPU
tensors) is compared with it - output and the gradients of x, weight, scale and shift - and the fused backends
with ``reference`` too: float32 and bfloat16, odd widths (D = 5, 24, 192, 1152: the U-ViT3D's level widths and
non-powers of two, so every tile has a masked tail), per-token, packed (scale | shift) and per-sample broadcast
modulation, the autocast mix (float32 x, bfloat16 FiLM), partial gradients and non-contiguous inputs. The
reference itself is checked with ``torch.autograd.gradcheck`` in float64.

Tolerances: float32 atol 1e-5 / rtol 1e-5 against the float64 oracle and atol 1e-6 / rtol 1e-5 fused vs
reference (plus a relative Frobenius bound of 1e-6 on every tensor); bfloat16 rtol 2e-2, atol 1e-2 times the
tensor's largest magnitude (the eager bf16 reference rounds every intermediate, so its summed dw is off by a few
bf16 ulps of its largest entry) and relative Frobenius 1e-2 (one bf16 rounding is 2^-9 relative).
"""
from __future__ import annotations

import logging

import pytest
import torch

from processes import torch_threads
from geoforge.kernels import _backend, film_norm

EPS = 1e-6
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5, rel=1e-6),
       torch.bfloat16: dict(atol=1e-2, rtol=2e-2, rel=1e-2, scaled=True)}
TOL_VS_REF = {torch.float32: dict(atol=1e-6, rtol=1e-5, rel=1e-6), torch.bfloat16: TOL[torch.bfloat16]}

needs_triton = pytest.mark.skipif(not _backend.triton_usable(torch.device("cpu")),
                                  reason="triton not importable or TRITON_INTERPRET!=1 at import")
BACKENDS = ["reference", "cpu", pytest.param("triton", marks=needs_triton)]
FUSED = ["cpu", pytest.param("triton", marks=needs_triton)]

# (leading shape of x, D, modulation): "token" scale / shift [..., D]; "packed" one [..., 2D]; "sample" one row
# per sample [B, 1, D] broadcast over the tokens; "packed_sample" both
CASES = [((6,), 8, "token"), ((37,), 192, "token"), ((2, 5), 1152, "packed"), ((3, 7), 24, "sample"),
         ((2, 3, 4), 5, "packed_sample"), ((1,), 33, "packed")]


def case_id(c):
    return f"{'x'.join(map(str, c[0]))}_D{c[1]}_{c[2]}"


# ----------------------------------------------------------------------------- oracle
def oracle_forward(x, w, scale, shift):
    rstd = 1.0 / torch.sqrt((x * x).sum(dim=-1, keepdim=True) / x.shape[-1] + EPS)
    return x * rstd * w * (1 + scale) + shift


def oracle(x, w, mods, packed, grad_out):
    """float64 (y, [dx, dw, dmod...]) of sum(y * grad_out)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, *mods)]
    scale, shift = leaves[2].chunk(2, dim=-1) if packed else leaves[2:]
    y = oracle_forward(leaves[0], leaves[1], scale, shift)
    grads = torch.autograd.grad(y, leaves, grad_out.double())
    return y.detach(), list(grads)


# ----------------------------------------------------------------------------- helpers
def make(case, x_dtype, mod_dtype=None, seed=0):
    lead, d, kind = case
    mod_dtype = mod_dtype or x_dtype
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, d, generator=g) * 3 + 0.5).to(x_dtype).requires_grad_(True)
    w = (1 + 0.5 * torch.randn(d, generator=g)).requires_grad_(True)  # float32, as nn.RMSNorm keeps it
    mod_lead = (lead[0], *([1] * (len(lead) - 1))) if "sample" in kind else lead
    if kind.startswith("packed"):
        mods = [(0.5 * torch.randn(*mod_lead, 2 * d, generator=g)).to(mod_dtype).requires_grad_(True)]
    else:
        mods = [(0.5 * torch.randn(*mod_lead, d, generator=g)).to(mod_dtype).requires_grad_(True) for _ in range(2)]
    grad_out = torch.randn(*lead, d, generator=g)
    return x, w, mods, kind.startswith("packed"), grad_out


def run(backend, x, w, mods, packed, grad_out):
    leaves = [x, w, *mods]
    for t in leaves:
        t.grad = None
    y = film_norm.film_rms_norm(x, w, mods[0], None if packed else mods[1], backend=backend)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, tol, what):
    assert actual is not None, f"{what}: no gradient"
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    atol = tol["atol"] * max(1.0, e.abs().max().item()) if tol.get("scaled") else tol["atol"]
    torch.testing.assert_close(a, e, atol=atol, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")
    denom = e.norm()
    if denom > 0:
        rel = ((a - e).norm() / denom).item()
        assert rel <= max(tol["rel"], 1e-7), f"{what}: relative Frobenius error {rel:.3g} > {tol['rel']:.3g}"


NAMES = ["x", "weight", "scale", "shift"]


def assert_all(got, want, tol, tag):
    y, grads = got
    y_o, grads_o = want
    assert_close(y, y_o, tol, f"{tag} y")
    for name, g, go in zip(NAMES, grads, grads_o):
        assert_close(g, go, tol, f"{tag} grad {name}")


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reference_gradcheck(packed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    if packed:
        mods = (torch.randn(2, 3, 14, dtype=torch.float64, generator=g, requires_grad=True), None)
    else:
        mods = (torch.randn(2, 1, 7, dtype=torch.float64, generator=g, requires_grad=True),
                torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True))
    leaves = [t for t in (x, w, *mods) if t is not None]
    def f(*t):
        return film_norm.film_rms_norm_reference(t[0], t[1], *t[2:], *([None] if packed else []))

    assert torch.autograd.gradcheck(f, leaves)


def test_reference_is_the_eager_module_math():
    """The reference is nn.RMSNorm + addcmul, bit for bit (the U-ViT3D's float64 golden test runs it)."""
    x, w, mods, _, _ = make(((4, 3), 24, "token"), torch.float32)
    norm = torch.nn.RMSNorm(24, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = torch.addcmul(mods[1], norm(x), 1 + mods[0])
        assert torch.equal(film_norm.film_rms_norm_reference(x, w, *mods), want)


# ----------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_oracle(backend, case, dtype):
    x, w, mods, packed, grad_out = make(case, dtype)
    if dtype == torch.bfloat16:
        grad_out = grad_out.to(dtype)  # the oracle sees the same bf16 grad the backends get
    assert_all(run(backend, x, w, mods, packed, grad_out), oracle(x, w, mods, packed, grad_out), TOL[dtype],
               backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
@pytest.mark.parametrize("backend", FUSED)
def test_against_reference(backend, case, dtype):
    x, w, mods, packed, grad_out = make(case, dtype)
    ref = run("reference", x, w, mods, packed, grad_out)
    got = run(backend, x, w, mods, packed, grad_out)
    assert got[0].dtype == ref[0].dtype and all(
        g.dtype == r.dtype for g, r in zip(got[1], ref[1])), f"{backend}: dtypes differ from the reference"
    assert_all(got, ref, TOL_VS_REF[dtype], f"{backend} vs reference")


@pytest.mark.parametrize("case", [((3, 4), 192, "packed"), ((5,), 24, "token")], ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_mix(backend, case):
    """float32 x (the residual stream) with a bfloat16 FiLM (an autocast linear's output): float32 output,
    bf16 modulation gradients, float32 dx and dw."""
    x, w, mods, packed, grad_out = make(case, torch.float32, torch.bfloat16)
    y, grads = run(backend, x, w, mods, packed, grad_out)
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads[2:])
    assert_all((y, grads), oracle(x, w, mods, packed, grad_out), TOL[torch.bfloat16], f"{backend} autocast mix")
    if backend != "reference":   # eager rounds 1 + scale to bf16; the fused paths compute it in float32
        assert_close(y, oracle(x, w, mods, packed, grad_out)[0], TOL[torch.float32], f"{backend} y (float32 math)")


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True)], ids=["x", "weight", "mod", "x+mod"])
@pytest.mark.parametrize("backend", FUSED)
def test_partial_gradients(backend, wants):
    """Only some inputs require grad (frozen weight, a constant FiLM, ...): the others get None, the rest exact."""
    case = ((9,), 40, "packed")
    x, w, mods, packed, grad_out = make(case, torch.float32)
    want = oracle(x, w, mods, packed, grad_out)
    x.requires_grad_(wants[0])
    w.requires_grad_(wants[1])
    mods[0].requires_grad_(wants[2])
    y = film_norm.film_rms_norm(x, w, mods[0], backend=backend)
    y.backward(grad_out)
    for t, name, go, wanted in zip((x, w, mods[0]), NAMES[:3], want[1], wants):
        if wanted:
            assert_close(t.grad, go, TOL[torch.float32], f"{backend} {name}")
        else:
            assert t.grad is None


@pytest.mark.parametrize("backend", FUSED)
def test_no_weight_noncontiguous_and_twice(backend):
    """weight None; x a transposed view; scale / shift strided views; backward twice through one graph."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 10, generator=g, requires_grad=True)
    x = base.t()                         # [10, 24], not contiguous
    ss = torch.randn(10, 3, 48, generator=g, requires_grad=True)
    scale, shift = ss[:, 1, :24], ss[:, 2, 24:]
    grad_out = torch.randn(10, 24, generator=g)
    y = film_norm.film_rms_norm(x, None, scale, shift, backend=backend)
    y.backward(grad_out, retain_graph=True)
    y.backward(grad_out)
    leaves = [base, ss]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y = film_norm.film_rms_norm_reference(x, None, scale, shift)
    (2 * y).backward(grad_out)
    for name, a, e in zip(("x", "ss"), got, (t.grad for t in leaves)):
        assert_close(a, e, TOL_VS_REF[torch.float32], f"{backend} {name}")


def test_cpu_threads_reduce_dw():
    """Several intra-op threads (rows split over at::parallel_for, one float32 dw partial per thread): same
    result as the reference, for the float32 fast path and the generic (bf16 modulation) one."""
    with torch_threads(2):
        for mod_dtype in (torch.float32, torch.bfloat16):
            x, w, mods, packed, grad_out = make(((2048,), 64, "packed"), torch.float32, mod_dtype)
            got = run("cpu", x, w, mods, packed, grad_out)
            assert_all(got, oracle(x, w, mods, packed, grad_out),
                       TOL[mod_dtype] | ({"atol": 1e-4, "rtol": 1e-4} if mod_dtype == torch.float32 else {}),
                       f"cpu 2 threads {mod_dtype}")


@pytest.mark.parametrize("backend", ["cpu"])
def test_bf16_stores_round_like_torch(backend):
    """bf16 outputs are the float32 results rounded to nearest even, as ``.to(torch.bfloat16)`` rounds them (the
    C++ path converts with its own vectorised bit operations), NaN and infinities included. (Not Triton here: the
    interpreter truncates float32 -> bf16, where compiled Triton rounds to nearest even.)"""
    x, w, mods, _, _ = make(((3, 17), 40, "packed"), torch.bfloat16)
    ss = mods[0].detach().clone()
    ss[0, 0, 40] = float("nan")   # shift NaN -> y NaN there
    ss[0, 1, 41] = float("inf")
    ss[1, 2, 42] = -float("inf")
    with torch.no_grad():
        got = film_norm.film_rms_norm(x, w, ss, backend=backend)
        want = film_norm.film_rms_norm(x.float(), w, ss.float(), backend=backend).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
        torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()]))
    assert got[0, 0, 0].isnan() and got[0, 1, 1] == float("inf") and got[1, 2, 2] == -float("inf")


# ----------------------------------------------------------------------------- dtypes and the resolver
@pytest.mark.parametrize("backend", FUSED)
def test_fp16_refused_on_fused_paths(backend):
    x = torch.randn(4, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        film_norm.film_rms_norm(x, None, torch.zeros(4, 16, dtype=torch.float16), backend=backend)
    with pytest.raises(TypeError, match="float64"):
        film_norm.film_rms_norm(x.double(), None, torch.zeros(4, 16, dtype=torch.float64), backend=backend)


def test_auto_takes_the_reference_for_float64(caplog):
    x, w, mods, packed, grad_out = make(((5,), 12, "packed"), torch.float64)
    with caplog.at_level(logging.INFO, logger="geoforge.kernels"):
        assert film_norm.resolve("auto", x, w, mods[0]) == "reference"
        y = film_norm.film_rms_norm(x, w.double(), mods[0])
    assert torch.equal(y, film_norm.film_rms_norm_reference(x, w.double(), mods[0]))
    assert film_norm.resolve("auto", x.float()) == "cpu"


def test_bad_shapes():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="2 D = 16"):
        film_norm.film_rms_norm(x, None, torch.zeros(2, 3, 8), backend="cpu")
    with pytest.raises(ValueError, match="does not broadcast"):
        film_norm.film_rms_norm(x, None, torch.zeros(3, 3, 8), torch.zeros(2, 3, 8), backend="cpu")
    with pytest.raises(ValueError, match="weight"):
        film_norm.film_rms_norm(x, torch.ones(7), torch.zeros(2, 3, 16), backend="cpu")


# ----------------------------------------------------------------------------- launch configuration
def test_launch_config_holds_whole_rows():
    pytest.importorskip("triton")
    for rows, cols in ((1, 5), (37, 192), (8192, 1152), (8192, 576), (4096, 4096)):
        block_r, block_d, warps = film_norm.launch_config(rows, cols, interpreting=False)
        assert block_d >= cols and block_r * block_d <= max(4096, block_d) and 4 <= warps <= 32
    with pytest.raises(ValueError, match=str(film_norm.MAX_TRITON_COLS)):
        film_norm.launch_config(4, film_norm.MAX_TRITON_COLS + 1, interpreting=False)


def test_compile_specs_cover_both_kernels():
    pytest.importorskip("triton")
    from geoforge.kernels import _aot

    specs = film_norm.compile_specs()
    assert {s["kernel"] for s in specs} == {"_film_norm_fwd_kernel", "_film_norm_bwd_kernel"}
    assert film_norm in _aot.modules()


# ----------------------------------------------------------------------------- GPU lane
def _to(t, device):
    return t.detach().to(device).requires_grad_(t.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("mix", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "fp32_x_bf16_mod"])
@pytest.mark.parametrize("case", [((2, 4096), 576, "packed"), ((8, 256), 1152, "packed"), ((3, 50), 192, "sample")],
                         ids=case_id)
def test_cuda_triton_against_oracle_and_reference(case, mix):
    """Compiled Triton on CUDA at U-ViT3D sizes (many programs reduce dw): against the float64 oracle and the
    reference on the same CUDA tensors."""
    x, w, mods, packed, grad_out = make(case, *mix)
    if mix[0] == torch.bfloat16:
        grad_out = grad_out.to(torch.bfloat16)
    want = oracle(x, w, mods, packed, grad_out)
    xc, wc, gc = _to(x, "cuda"), _to(w, "cuda"), grad_out.cuda()
    mc = [_to(m, "cuda") for m in mods]
    got = run("triton", xc, wc, mc, packed, gc)
    tol = TOL[torch.bfloat16] if torch.bfloat16 in mix else TOL[torch.float32] | {"atol": 1e-4, "rtol": 1e-4}
    assert_all(got, want, tol, "cuda triton vs oracle")
    assert_all(got, run("reference", xc, wc, mc, packed, gc), tol | {"atol": 2 * tol["atol"]},
               "cuda triton vs reference")


@pytest.mark.gpu
def test_cuda_auto_takes_the_reference_for_rows_wider_than_a_program():
    x = torch.randn(4, film_norm.MAX_TRITON_COLS + 8, device="cuda")
    assert film_norm.resolve("auto", x) == "reference"
    assert film_norm.resolve("auto", x[:, :film_norm.MAX_TRITON_COLS]) == "triton"


def _saved(x: torch.Tensor, w: torch.Tensor, ss: torch.Tensor, backend: str) -> list[tuple]:
    """(shape, dtype) of every tensor the autograd graph of one call saves."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        film_norm.film_rms_norm(x, w, ss, backend=backend)
    return saved


def test_meta_tensors_save_what_the_fused_path_saves():
    """Memory accounting on the meta device (bench_train --model) sees the fused path's saved tensors (x, w,
    the modulation view, rstd), not the reference's intermediates; backward runs shape-only."""
    rows, cols = 6, 24
    args = {dev: (torch.randn(rows, cols, device=dev, requires_grad=True),
                  torch.randn(cols, device=dev, requires_grad=True),
                  torch.randn(rows, 2 * cols, device=dev, requires_grad=True)) for dev in ("cpu", "meta")}
    assert _saved(*args["meta"], backend="auto") == _saved(*args["cpu"], backend="cpu")
    assert _saved(*args["meta"], backend="auto") != _saved(*args["cpu"], backend="reference")
    x, w, ss = args["meta"]
    film_norm.film_rms_norm(x, w, ss).sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and ss.grad.shape == ss.shape

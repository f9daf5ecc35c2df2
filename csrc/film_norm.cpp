// RMSNorm + FiLM rows (CPU fast path of kernels/film_norm.py).
//
//   y = x * rstd * w * (1 + scale) + shift,   rstd = 1 / sqrt(mean(x^2) + eps),   over the last dim D.
//
// x / y / dx / g are contiguous [N, D] rows; w is float32 [D]; scale and shift are read through 3-D views
// [G, R, D] (row r of x uses (r / R, r % R); any strides, last one 1): a per-token modulation (R = N), the two
// halves of one packed [N, 2D] tensor, or one row per sample broadcast over its R tokens (stride 0).
// dscale / dshift are written per row of x with their own row stride (the packed case writes one [N, 2D]
// buffer). Storage dtypes: float32 or bfloat16, independently for x, the modulation and y; arithmetic is
// float32. Rows run in parallel through at::parallel_for (torch's intra-op pool); the loops over a row are
// `omp simd` loops that GCC vectorises at -O3 (multi-versioned for AVX-512 / AVX2, GF_ROW_CLONES).
//
//   fwd: writes y and rstd (float32 [N]), the only thing backward needs besides x.
//   bwd: one pass per row (two sweeps over it, the second re-reads the row from L1):
//        dshift = g, dscale = g * xhat * w, dx = rstd * (gw - xhat * mean(gw * xhat)) with gw = g (1 + scale) w,
//        and dw partial sums of g (1 + scale) xhat in float32 per worker thread ([threads, D], summed by the caller).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// The row loops are compiled three times (AVX-512, AVX2 + FMA, baseline x86-64) and the widest one the CPU
// runs is picked at load time (GCC function multi-versioning): cpp_extension builds without -march=native,
// which would leave them at SSE2 width, and -march=native would tie the cached build to the build machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GF_ROW_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define GF_ROW_CLONES
#endif

namespace {

constexpr int64_t kGrainElements = 1 << 14;  // elements per parallel task

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// Loads and stores of the storage types. bfloat16 by bit operations (round to nearest even, NaN kept NaN) that
// GCC vectorises; c10::BFloat16's own conversion does not vectorise, which left the bf16 rows scalar.
inline float ld(float v) { return v; }
inline float ld(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T>
inline T st(float v) {
  return v;
}
template <>
inline c10::BFloat16 st<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

struct Mod {  // a [G, R, D] modulation view
  int64_t sg, sr, r;
  explicit Mod(const at::Tensor& t) : sg(t.stride(0)), sr(t.stride(1)), r(t.size(1)) {}
  int64_t offset(int64_t row) const { return (row / r) * sg + (row % r) * sr; }
};

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "film_norm: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "film_norm: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_mod(const at::Tensor& m, const char* name, int64_t rows, int64_t cols) {
  check(m, name);
  TORCH_CHECK(m.dim() == 3 && m.size(2) == cols && m.stride(2) == 1 && m.size(0) * m.size(1) == rows,
              "film_norm: ", name, " must be a [G, R, ", cols, "] view with G R = ", rows,
              " and a unit last stride, got ", m.sizes(), " strides ", m.strides());
}

template <typename XT, typename MT, typename OT>
GF_ROW_CLONES void fwd_range(const XT* x, const float* w, const MT* scale, const MT* shift, Mod ms, Mod mh, OT* y,
                             float* rstd, int64_t begin, int64_t end, int64_t cols, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const XT* xr = x + r * cols;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = ld(xr[c]);
      ss += v * v;
    }
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(cols) + eps);
    rstd[r] = rs;
    const MT* sr = scale + ms.offset(r);
    const MT* hr = shift + mh.offset(r);
    OT* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float n = ld(xr[c]) * rs * w[c];
      yr[c] = st<OT>(n * (1.f + ld(sr[c])) + ld(hr[c]));
    }
  }
}

template <typename XT, typename MT, typename OT>
void fwd_rows(const XT* x, const float* w, const MT* scale, const MT* shift, Mod ms, Mod mh, OT* y, float* rstd,
              int64_t rows, int64_t cols, float eps) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    fwd_range<XT, MT, OT>(x, w, scale, shift, ms, mh, y, rstd, begin, end, cols, eps);
  });
}

template <typename XT, typename MT, typename OT>
GF_ROW_CLONES void bwd_range(const OT* g, const XT* x, const float* w, const MT* scale, Mod ms, const float* rstd,
                             XT* dx, MT* dscale, int64_t ds_stride, MT* dshift, int64_t dh_stride, float* dw,
                             int64_t begin, int64_t end, int64_t cols) {
  const float inv_cols = 1.f / static_cast<float>(cols);
  for (int64_t r = begin; r < end; ++r) {
    const OT* gr = g + r * cols;
    const XT* xr = x + r * cols;
    const MT* sr = scale + ms.offset(r);
    const float rs = rstd[r];
    float dot = 0.f;
    if (dscale != nullptr || dshift != nullptr || dw != nullptr) {
      MT* dsr = dscale == nullptr ? nullptr : dscale + r * ds_stride;
      MT* dhr = dshift == nullptr ? nullptr : dshift + r * dh_stride;
      for (int64_t c = 0; c < cols; ++c) {  // partial gradients (rare): the optional outputs are branches
        const float gv = ld(gr[c]);
        const float xh = ld(xr[c]) * rs;
        const float gs = gv * (1.f + ld(sr[c]));
        dot += gs * w[c] * xh;
        if (dsr != nullptr) dsr[c] = st<MT>(gv * xh * w[c]);
        if (dhr != nullptr) dhr[c] = st<MT>(gv);
        if (dw != nullptr) dw[c] += gs * xh;
      }
    } else {
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < cols; ++c)
        dot += ld(gr[c]) * (1.f + ld(sr[c])) * w[c] * ld(xr[c]);
      dot *= rs;
    }
    if (dx == nullptr) continue;
    const float k = dot * inv_cols * rs;  // dx = rs (gw - xhat mean(gw xhat)) = rs (gw - x k)
    XT* dxr = dx + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float xv = ld(xr[c]);
      const float gw = ld(gr[c]) * (1.f + ld(sr[c])) * w[c];
      dxr[c] = st<XT>(rs * (gw - xv * k));
    }
  }
}

template <typename XT, typename MT, typename OT>
void bwd_rows(const OT* g, const XT* x, const float* w, const MT* scale, Mod ms, const float* rstd, XT* dx,
              MT* dscale, int64_t ds_stride, MT* dshift, int64_t dh_stride, float* dw_part, int64_t rows,
              int64_t cols) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    float* dw = dw_part == nullptr ? nullptr : dw_part + at::get_thread_num() * cols;
    bwd_range<XT, MT, OT>(g, x, w, scale, ms, rstd, dx, dscale, ds_stride, dshift, dh_stride, dw, begin, end, cols);
  });
}

// The training case (dx, dscale, dshift and dw all wanted), any dtypes, without branches in the inner loops.
template <typename XT, typename MT, typename OT>
GF_ROW_CLONES void bwd_range_all(const OT* g, const XT* x, const float* w, const MT* scale, Mod ms, const float* rstd,
                                 XT* dx, MT* dscale, int64_t ds_stride, MT* dshift, int64_t dh_stride, float* dw,
                                 int64_t begin, int64_t end, int64_t cols) {
  const float inv_cols = 1.f / static_cast<float>(cols);
  for (int64_t r = begin; r < end; ++r) {
    const OT* gr = g + r * cols;
    const XT* xr = x + r * cols;
    const MT* sr = scale + ms.offset(r);
    MT* dsr = dscale + r * ds_stride;
    MT* dhr = dshift + r * dh_stride;
    const float rs = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < cols; ++c) {
      const float gv = ld(gr[c]);
      const float xh = ld(xr[c]) * rs;
      const float gs = gv * (1.f + ld(sr[c]));
      dot += gs * w[c] * xh;
      dsr[c] = st<MT>(gv * xh * w[c]);
      dhr[c] = st<MT>(gv);
      dw[c] += gs * xh;
    }
    const float k = dot * inv_cols * rs;
    XT* dxr = dx + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float gw = ld(gr[c]) * (1.f + ld(sr[c])) * w[c];
      dxr[c] = st<XT>(rs * (gw - ld(xr[c]) * k));
    }
  }
}

template <typename XT, typename MT, typename OT>
void bwd_rows_all(const OT* g, const XT* x, const float* w, const MT* scale, Mod ms, const float* rstd, XT* dx,
                  MT* dscale, int64_t ds_stride, MT* dshift, int64_t dh_stride, float* dw_part, int64_t rows,
                  int64_t cols) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    bwd_range_all<XT, MT, OT>(g, x, w, scale, ms, rstd, dx, dscale, ds_stride, dshift, dh_stride,
                              dw_part + at::get_thread_num() * cols, begin, end, cols);
  });
}

template <typename F>
void dispatch(at::ScalarType xt, at::ScalarType mt, at::ScalarType ot, F&& f) {
  using BF = c10::BFloat16;
  auto is_f = [](at::ScalarType t) { return t == at::kFloat; };
  if (is_f(xt) && is_f(mt) && is_f(ot)) return f(float(), float(), float());
  if (is_f(xt) && !is_f(mt) && is_f(ot)) return f(float(), BF(), float());
  if (!is_f(xt) && is_f(mt) && is_f(ot)) return f(BF(), float(), float());
  if (!is_f(xt) && !is_f(mt) && is_f(ot)) return f(BF(), BF(), float());
  if (!is_f(xt) && !is_f(mt) && !is_f(ot)) return f(BF(), BF(), BF());
  TORCH_CHECK(false, "film_norm: unsupported dtypes x ", xt, ", modulation ", mt, ", out ", ot,
              " (out must be float32 unless x and the modulation are bfloat16)");
}

// y [N, D] (written), returns rstd float32 [N].
at::Tensor fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& shift,
               at::Tensor y, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "film_norm.fwd: x must be contiguous [N, D], got ", x.sizes());
  const int64_t rows = x.size(0), cols = x.size(1);
  check(x, "x");
  check(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous(), "film_norm.fwd: y must be contiguous like x");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == cols && w.is_contiguous(),
              "film_norm.fwd: w must be contiguous float32 [", cols, "]");
  check_mod(scale, "scale", rows, cols);
  check_mod(shift, "shift", rows, cols);
  TORCH_CHECK(scale.scalar_type() == shift.scalar_type(), "film_norm: scale and shift must share a dtype");
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), scale.scalar_type(), y.scalar_type(), [&](auto xv, auto mv, auto ov) {
    using XT = decltype(xv);
    using MT = decltype(mv);
    using OT = decltype(ov);
    fwd_rows<XT, MT, OT>(x.data_ptr<XT>(), w.data_ptr<float>(), scale.data_ptr<MT>(), shift.data_ptr<MT>(),
                         Mod(scale), Mod(shift), y.data_ptr<OT>(), rstd.data_ptr<float>(), rows, cols,
                         static_cast<float>(eps));
  });
  return rstd;
}

// Writes dx [N, D], dscale / dshift (per row of x, row strides of their own; may be None), returns the
// float32 dw partial sums [threads, D] (empty [0, D] when want_dw is false).
at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
               const at::Tensor& rstd, c10::optional<at::Tensor> dx, c10::optional<at::Tensor> dscale,
               c10::optional<at::Tensor> dshift, bool want_dw) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "film_norm.bwd: x must be contiguous [N, D], got ", x.sizes());
  const int64_t rows = x.size(0), cols = x.size(1);
  check(x, "x");
  check(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.is_contiguous(), "film_norm.bwd: grad must be contiguous like x");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == cols && w.is_contiguous(),
              "film_norm.bwd: w must be contiguous float32 [", cols, "]");
  check_mod(scale, "scale", rows, cols);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows && rstd.is_contiguous(),
              "film_norm.bwd: rstd must be float32 [N]");
  auto check_out = [&](const c10::optional<at::Tensor>& t, const char* name, at::ScalarType dtype) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols && t->stride(1) == 1 &&
                    t->scalar_type() == dtype,
                "film_norm.bwd: ", name, " must be [", rows, ", ", cols, "] rows of ", dtype,
                " with a unit last stride");
  };
  check_out(dx, "dx", x.scalar_type());
  check_out(dscale, "dscale", scale.scalar_type());
  check_out(dshift, "dshift", scale.scalar_type());
  const int64_t threads = want_dw ? at::get_num_threads() : 0;
  at::Tensor dw = at::zeros({threads, cols}, x.options().dtype(at::kFloat));
  float* dw_ptr = want_dw ? dw.data_ptr<float>() : nullptr;
  const int64_t ds_stride = dscale.has_value() ? dscale->stride(0) : 0;
  const int64_t dh_stride = dshift.has_value() ? dshift->stride(0) : 0;
  const bool all = dx.has_value() && dscale.has_value() && dshift.has_value() && want_dw;
  dispatch(x.scalar_type(), scale.scalar_type(), g.scalar_type(), [&](auto xv, auto mv, auto ov) {
    using XT = decltype(xv);
    using MT = decltype(mv);
    using OT = decltype(ov);
    if (all) {
      bwd_rows_all<XT, MT, OT>(g.data_ptr<OT>(), x.data_ptr<XT>(), w.data_ptr<float>(), scale.data_ptr<MT>(),
                               Mod(scale), rstd.data_ptr<float>(), dx->data_ptr<XT>(), dscale->data_ptr<MT>(),
                               ds_stride, dshift->data_ptr<MT>(), dh_stride, dw_ptr, rows, cols);
      return;
    }
    bwd_rows<XT, MT, OT>(g.data_ptr<OT>(), x.data_ptr<XT>(), w.data_ptr<float>(), scale.data_ptr<MT>(), Mod(scale),
                         rstd.data_ptr<float>(), dx.has_value() ? dx->data_ptr<XT>() : nullptr,
                         dscale.has_value() ? dscale->data_ptr<MT>() : nullptr, ds_stride,
                         dshift.has_value() ? dshift->data_ptr<MT>() : nullptr, dh_stride, dw_ptr, rows, cols);
  });
  return dw;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "RMSNorm + FiLM forward (x, w, scale, shift, y, eps) -> rstd [N]");
  m.def("bwd", &bwd, "RMSNorm + FiLM backward (g, x, w, scale, rstd, dx|None, dscale|None, dshift|None, want_dw) "
                     "-> dw partials [threads, D]");
}

// Row kernels of the geometry-alignment loss tail (CPU fast path of kernels/align.py).
//
// Every tensor is a contiguous [R, T] row-major matrix (one row per token, T channels) of the
// same dtype (float32, bfloat16 or float16); arithmetic is float32. Rows run in parallel through
// at::parallel_for (torch's intra-op OpenMP pool); the loops over a row are `omp simd` loops that
// GCC vectorises at -O3.
//
//   norm_fwd:  out = p / max(|p|, eps) and per-row stats (|p|, max(|y|, eps), cos(p, y)).
//   scale_err: per-row sum of (s - y)^2, and optionally out = coef * (s - y)   (d scale / d s).
//   norm_bwd:  out = d loss / d p for   d loss / d p_hat = g - ang_coef * y_hat,
//              i.e. (I - p_hat p_hat^T) (.) / |p|  where |p| >= eps, and (.) / eps where clamped.
//   tail:      the whole tail for p and s taken as independent inputs (kernels/align.py loss_tail):
//              per row cos(p, y) and sum (s - y)^2, and optionally grad_p = ang_coef * d(1 - cos)/dp and
//              grad_s = scale_coef * (s - y), in one pass over the rows (the second sweep of a row
//              re-reads it from L1).
// Outputs may alias inputs of the same shape (each row is read completely before it is written).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, about 128 KiB of fp32

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "align_tail: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "align_tail: ", name, " must have shape [",
              rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "align_tail: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "align_tail: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

template <typename scalar_t>
void norm_fwd_rows(const scalar_t* p, const scalar_t* y, scalar_t* out, float* stats, int64_t rows, int64_t cols,
                   float eps) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = p + r * cols;
      const scalar_t* yr = y + r * cols;
      float pp = 0.f, yy = 0.f, py = 0.f;
#pragma omp simd reduction(+ : pp, yy, py)
      for (int64_t c = 0; c < cols; ++c) {
        const float pv = static_cast<float>(pr[c]);
        const float yv = static_cast<float>(yr[c]);
        pp += pv * pv;
        yy += yv * yv;
        py += pv * yv;
      }
      const float norm_p = std::sqrt(pp);
      const float rp = std::max(norm_p, eps);
      const float ry = std::max(std::sqrt(yy), eps);
      const float inv = 1.f / rp;
      scalar_t* outr = out + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) outr[c] = static_cast<scalar_t>(static_cast<float>(pr[c]) * inv);
      stats[3 * r + 0] = norm_p;
      stats[3 * r + 1] = ry;
      stats[3 * r + 2] = py / (rp * ry);
    }
  });
}

template <typename scalar_t>
void scale_err_rows(const scalar_t* s, const scalar_t* y, scalar_t* out, float* sq, int64_t rows, int64_t cols,
                    float coef) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* sr = s + r * cols;
      const scalar_t* yr = y + r * cols;
      float acc = 0.f;
      if (out == nullptr) {
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < cols; ++c) {
          const float e = static_cast<float>(sr[c]) - static_cast<float>(yr[c]);
          acc += e * e;
        }
      } else {
        scalar_t* outr = out + r * cols;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < cols; ++c) {
          const float e = static_cast<float>(sr[c]) - static_cast<float>(yr[c]);
          acc += e * e;
          outr[c] = static_cast<scalar_t>(coef * e);
        }
      }
      sq[r] = acc;
    }
  });
}

template <typename scalar_t>
void norm_bwd_rows(const scalar_t* g, const scalar_t* phat, const scalar_t* y, const float* stats, scalar_t* out,
                   int64_t rows, int64_t cols, float ang_coef, float eps) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = g == nullptr ? nullptr : g + r * cols;
      const scalar_t* hr = phat + r * cols;
      const scalar_t* yr = y + r * cols;
      const float norm_p = stats[3 * r + 0];
      const float k = ang_coef / stats[3 * r + 1];  // d loss / d p_hat = g - k * y
      float hg = 0.f, hy = 0.f;
      if (gr != nullptr) {
#pragma omp simd reduction(+ : hg, hy)
        for (int64_t c = 0; c < cols; ++c) {
          const float h = static_cast<float>(hr[c]);
          hg += h * static_cast<float>(gr[c]);
          hy += h * static_cast<float>(yr[c]);
        }
      } else {
#pragma omp simd reduction(+ : hy)
        for (int64_t c = 0; c < cols; ++c) hy += static_cast<float>(hr[c]) * static_cast<float>(yr[c]);
      }
      const bool clamped = norm_p < eps;  // clamp_min passes the gradient where |p| >= eps
      const float proj = clamped ? 0.f : hg - k * hy;
      const float inv = 1.f / (clamped ? eps : norm_p);
      scalar_t* outr = out + r * cols;
      if (gr != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const float d = static_cast<float>(gr[c]) - k * static_cast<float>(yr[c]) - proj * static_cast<float>(hr[c]);
          outr[c] = static_cast<scalar_t>(d * inv);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const float d = -k * static_cast<float>(yr[c]) - proj * static_cast<float>(hr[c]);
          outr[c] = static_cast<scalar_t>(d * inv);
        }
      }
    }
  });
}

template <typename scalar_t>
void tail_rows(const scalar_t* p, const scalar_t* s, const scalar_t* y, scalar_t* gp, scalar_t* gs, float* stats,
               int64_t rows, int64_t cols, float ang_coef, float scale_coef, float eps) {
  at::parallel_for(0, rows, grain_rows(3 * cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = p + r * cols;
      const scalar_t* sr = s + r * cols;
      const scalar_t* yr = y + r * cols;
      float pp = 0.f, yy = 0.f, py = 0.f, ee = 0.f;
#pragma omp simd reduction(+ : pp, yy, py, ee)
      for (int64_t c = 0; c < cols; ++c) {
        const float pv = static_cast<float>(pr[c]);
        const float yv = static_cast<float>(yr[c]);
        const float e = static_cast<float>(sr[c]) - yv;
        pp += pv * pv;
        yy += yv * yv;
        py += pv * yv;
        ee += e * e;
      }
      const float norm_p = std::sqrt(pp);
      const float rp = std::max(norm_p, eps);
      const float ry = std::max(std::sqrt(yy), eps);
      stats[2 * r + 0] = py / (rp * ry);
      stats[2 * r + 1] = ee;
      if (gp != nullptr) {
        // d/dp_hat = -k y with k = ang_coef / ry; through p_hat = p / max(|p|, eps):
        // grad_p = (-k y + k <p_hat, y> p_hat) / |p|, or -k y / eps where |p| < eps (clamped).
        const float k = ang_coef / ry;
        const bool clamped = norm_p < eps;
        const float a = -k / (clamped ? eps : norm_p);                        // coefficient of y
        const float b = clamped ? 0.f : k * (py / (rp * rp)) / norm_p;        // coefficient of p
        scalar_t* gr = gp + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
          gr[c] = static_cast<scalar_t>(a * static_cast<float>(yr[c]) + b * static_cast<float>(pr[c]));
      }
      if (gs != nullptr) {
        scalar_t* gr = gs + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
          gr[c] = static_cast<scalar_t>(scale_coef * (static_cast<float>(sr[c]) - static_cast<float>(yr[c])));
      }
    }
  });
}

// Returns stats float32 [R, 3]: (|p|, max(|y|, eps), cos). `out` receives p / max(|p|, eps).
at::Tensor norm_fwd(const at::Tensor& p, const at::Tensor& y, at::Tensor out, double eps) {
  TORCH_CHECK(p.dim() == 2, "align_tail.norm_fwd: p must be 2-D [R, T], got ", p.sizes());
  const int64_t rows = p.size(0), cols = p.size(1);
  check_rows(p, "p", rows, cols, p.scalar_type());
  check_rows(y, "y", rows, cols, p.scalar_type());
  check_rows(out, "out", rows, cols, p.scalar_type());
  at::Tensor stats = at::empty({rows, 3}, p.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "align_norm_fwd", [&] {
    norm_fwd_rows<scalar_t>(p.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            stats.data_ptr<float>(), rows, cols, static_cast<float>(eps));
  });
  return stats;
}

// Returns float32 [R]: per-row sum of (s - y)^2. When `out` is given it receives coef * (s - y).
at::Tensor scale_err(const at::Tensor& s, const at::Tensor& y, c10::optional<at::Tensor> out, double coef) {
  TORCH_CHECK(s.dim() == 2, "align_tail.scale_err: s must be 2-D [R, T], got ", s.sizes());
  const int64_t rows = s.size(0), cols = s.size(1);
  check_rows(s, "s", rows, cols, s.scalar_type());
  check_rows(y, "y", rows, cols, s.scalar_type());
  if (out.has_value()) check_rows(*out, "out", rows, cols, s.scalar_type());
  at::Tensor sq = at::empty({rows}, s.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "align_scale_err", [&] {
    scalar_t* out_ptr = out.has_value() ? out->data_ptr<scalar_t>() : nullptr;
    scale_err_rows<scalar_t>(s.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out_ptr, sq.data_ptr<float>(), rows,
                             cols, static_cast<float>(coef));
  });
  return sq;
}

// Writes d loss / d p into `out` (which may alias g) given g = d loss / d p_hat from the scale head
// (None: zero), p_hat and y, the stats of norm_fwd and the angular coefficient (weight / N).
void norm_bwd(c10::optional<at::Tensor> g, const at::Tensor& phat, const at::Tensor& y, const at::Tensor& stats,
              double ang_coef, double eps, at::Tensor out) {
  TORCH_CHECK(phat.dim() == 2, "align_tail.norm_bwd: phat must be 2-D [R, T], got ", phat.sizes());
  const int64_t rows = phat.size(0), cols = phat.size(1);
  check_rows(phat, "phat", rows, cols, phat.scalar_type());
  check_rows(y, "y", rows, cols, phat.scalar_type());
  check_rows(out, "out", rows, cols, phat.scalar_type());
  if (g.has_value()) check_rows(*g, "g", rows, cols, phat.scalar_type());
  check_rows(stats, "stats", rows, 3, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, phat.scalar_type(), "align_norm_bwd", [&] {
    const scalar_t* g_ptr = g.has_value() ? g->data_ptr<scalar_t>() : nullptr;
    norm_bwd_rows<scalar_t>(g_ptr, phat.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), stats.data_ptr<float>(),
                            out.data_ptr<scalar_t>(), rows, cols, static_cast<float>(ang_coef), static_cast<float>(eps));
  });
}

// Returns float32 [R, 2]: per row (cos(p, y), sum (s - y)^2). grad_p / grad_s (optional, may alias p / s)
// receive ang_coef * d(1 - cos)/dp and scale_coef * (s - y).
at::Tensor tail(const at::Tensor& p, const at::Tensor& s, const at::Tensor& y, c10::optional<at::Tensor> grad_p,
                c10::optional<at::Tensor> grad_s, double ang_coef, double scale_coef, double eps) {
  TORCH_CHECK(p.dim() == 2, "align_tail.tail: p must be 2-D [R, T], got ", p.sizes());
  const int64_t rows = p.size(0), cols = p.size(1);
  check_rows(p, "p", rows, cols, p.scalar_type());
  check_rows(s, "s", rows, cols, p.scalar_type());
  check_rows(y, "y", rows, cols, p.scalar_type());
  if (grad_p.has_value()) check_rows(*grad_p, "grad_p", rows, cols, p.scalar_type());
  if (grad_s.has_value()) check_rows(*grad_s, "grad_s", rows, cols, p.scalar_type());
  at::Tensor stats = at::empty({rows, 2}, p.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "align_tail", [&] {
    scalar_t* gp = grad_p.has_value() ? grad_p->data_ptr<scalar_t>() : nullptr;
    scalar_t* gs = grad_s.has_value() ? grad_s->data_ptr<scalar_t>() : nullptr;
    tail_rows<scalar_t>(p.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gp, gs,
                        stats.data_ptr<float>(), rows, cols, static_cast<float>(ang_coef),
                        static_cast<float>(scale_coef), static_cast<float>(eps));
  });
  return stats;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_fwd", &norm_fwd, "row normalisation + cosine (p, y, out, eps) -> stats [R, 3]");
  m.def("scale_err", &scale_err, "row squared error (s, y, out|None, coef) -> [R]");
  m.def("tail", &tail, "whole loss tail (p, s, y, grad_p|None, grad_s|None, ang_coef, scale_coef, eps) -> [R, 2]");
  m.def("norm_bwd", &norm_bwd, "gradient through the row normalisation (g|None, phat, y, stats, ang_coef, eps, out)");
}

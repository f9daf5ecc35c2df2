// CPU fast path of kernels/reproject.py: unproject depth, z-buffer splat, resolve (+ per-frame error), and the
// fused reprojection error (all three in one call, no Python-side intermediates).
//
// Conventions (shared with the Triton and reference paths, which must agree bit for bit):
// - cameras: extrinsic [S,3,4] camera-from-world [R|t], intrinsic [S,3,3] = [[fx,s,cx],[0,fy,cy],[0,0,1]];
// - every floating-point expression is evaluated left to right, one rounding per operation (built with
//   -ffp-contract=off and without -ffast-math, so no fused multiply-add and no reassociation; vectorised
//   IEEE single-precision mul/add/div round exactly like the scalar ones), in the same order as the reference;
// - a z-buffer entry is the int64 key (float bits of z) << 32 | point index; the smallest key wins, so the
//   nearest point wins and an exact depth tie goes to the lower index. Empty = INT64_MAX. z > 1e-6 > 0, so the
//   float bits of z order like z.
//
// Speed: points are kept structure-of-arrays; each camera projects a block of points in a branch-free,
// vectorisable loop (pixel or -1, depth bits), then a scalar loop applies min to the z-buffer without a
// data-dependent branch. Frames are split over threads; with fewer frames than threads the points are split too,
// into private z-buffers merged by min (the result does not depend on the split).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// The projection loop is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC function
// multi-versioning). None of them contracts to FMA (-ffp-contract=off), so all round identically.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GF_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GF_VECTOR_CLONES
#endif

constexpr float kZMin = 1e-6f;
constexpr int64_t kEmpty = std::numeric_limits<int64_t>::max();
constexpr int64_t kMinPointsPerChunk = 1 << 16;
constexpr int64_t kBlock = 256;  // points projected per vectorised block

// Run f(0) .. f(n-1) on the ATen thread pool, handing tasks out one at a time (dynamic scheduling), so a thread
// that the OS pauses (a shared machine) does not hold up a static share of the work. The order in which tasks
// run does not affect any result.
template <typename F>
void dynamic_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < n; task = next++) f(task);
  });
}

// depth [H,W] rows v0..v1 of one frame -> world points, array-of-structures [H,W,3].
template <typename T>
void unproject_rows(const T* depth, const T* e, const T* k, int64_t W, int64_t v0, int64_t v1, T* out) {
  for (int64_t v = v0; v < v1; ++v) {
    const T yn = (static_cast<T>(v) - k[5]) / k[4];
    for (int64_t u = 0; u < W; ++u) {
      const int64_t i = v * W + u;
      const T d = depth[i];
      const T xn = ((static_cast<T>(u) - k[2]) - k[1] * yn) / k[0];
      const T dx = xn * d - e[3];
      const T dy = yn * d - e[7];
      const T dz = d - e[11];
      out[3 * i + 0] = e[0] * dx + e[4] * dy + e[8] * dz;
      out[3 * i + 1] = e[1] * dx + e[5] * dy + e[9] * dz;
      out[3 * i + 2] = e[2] * dx + e[6] * dy + e[10] * dz;
    }
  }
}

// Same values as unproject_rows<float>, structure-of-arrays; a pixel with valid == false gets NaN coordinates,
// which every camera drops (its z is NaN, and NaN > 1e-6 is false).
void unproject_rows_soa(const float* depth, const bool* valid, const float* e, const float* k, int64_t W,
                        int64_t v0, int64_t v1, float* X, float* Y, float* Z) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t v = v0; v < v1; ++v) {
    const float yn = (static_cast<float>(v) - k[5]) / k[4];
    for (int64_t u = 0; u < W; ++u) {
      const int64_t i = v * W + u;
      const float d = depth[i];
      const float xn = ((static_cast<float>(u) - k[2]) - k[1] * yn) / k[0];
      const float dx = xn * d - e[3];
      const float dy = yn * d - e[7];
      const float dz = d - e[11];
      const bool ok = valid == nullptr || valid[i];
      X[i] = ok ? e[0] * dx + e[4] * dy + e[8] * dz : nan;
      Y[i] = ok ? e[1] * dx + e[5] * dy + e[9] * dz : nan;
      Z[i] = ok ? e[2] * dx + e[6] * dy + e[10] * dz : nan;
    }
  }
}

// Project n points into one camera: pix[i] = v*W + u, or -1 when dropped (z <= 1e-6, NaN, outside the image);
// zbits[i] = float bits of the camera z. Branch-free so the compiler vectorises it.
GF_VECTOR_CLONES void project_block(const float* __restrict e, const float* __restrict k, const float* __restrict X,
                   const float* __restrict Y, const float* __restrict Z, int64_t n, int32_t H, int32_t W,
                   int32_t* __restrict pix, uint32_t* __restrict zbits) {
  const float e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3], e4 = e[4], e5 = e[5], e6 = e[6], e7 = e[7];
  const float e8 = e[8], e9 = e[9], e10 = e[10], e11 = e[11];
  const float fx = k[0], sk = k[1], cx = k[2], fy = k[4], cy = k[5];
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H);
  for (int64_t i = 0; i < n; ++i) {
    const float zc = e8 * X[i] + e9 * Y[i] + e10 * Z[i] + e11;
    const float xc = e0 * X[i] + e1 * Y[i] + e2 * Z[i] + e3;
    const float yc = e4 * X[i] + e5 * Y[i] + e6 * Z[i] + e7;
    const float xn = xc / zc;
    const float yn = yc / zc;
    // pixel = floor(x + 0.5); for a = x + 0.5: floor(a) in [0, W) <=> a in [0, W), and there floor(a) equals
    // truncation, so no floor() is needed (NaN fails every comparison).
    const float au = fx * xn + sk * yn + cx + 0.5f;
    const float av = fy * yn + cy + 0.5f;
    const bool ok = (zc > kZMin) & (au >= 0.f) & (au < Wf) & (av >= 0.f) & (av < Hf);
    const int32_t p = static_cast<int32_t>(ok ? av : 0.f) * W + static_cast<int32_t>(ok ? au : 0.f);
    pix[i] = ok ? p : -1;
    uint32_t bits;
    std::memcpy(&bits, &zc, sizeof(bits));
    zbits[i] = bits;
  }
}

// Splat points p0..p1 (SoA) into one camera's z-buffer zb [H*W].
void splat_range(const float* e, const float* k, const float* X, const float* Y, const float* Z, int64_t p0,
                 int64_t p1, int32_t H, int32_t W, int64_t* zb) {
  int32_t pix[kBlock];
  uint32_t zbits[kBlock];
  for (int64_t b = p0; b < p1; b += kBlock) {
    const int64_t n = std::min(kBlock, p1 - b);
    project_block(e, k, X + b, Y + b, Z + b, n, H, W, pix, zbits);
    for (int64_t i = 0; i < n; ++i) {
      if (pix[i] < 0) continue;
      const int64_t key = (static_cast<int64_t>(zbits[i]) << 32) | (b + i);
      int64_t& slot = zb[pix[i]];
      slot = key < slot ? key : slot;
    }
  }
}

// Points (SoA) -> z-buffer keys [S,H*W]. Parallel over frames, and over point chunks when frames are few.
torch::Tensor zbuffer_soa(const float* X, const float* Y, const float* Z, int64_t P, const float* e,
                          const float* k, int64_t S, int64_t H, int64_t W, const torch::TensorOptions& options) {
  const int64_t HW = H * W;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks =
      S >= threads ? 1 : std::max<int64_t>(1, std::min((threads + S - 1) / S, P / kMinPointsPerChunk));
  const int64_t chunk_len = (P + chunks - 1) / chunks;
  auto buffers = torch::empty({chunks, S, HW}, options.dtype(torch::kInt64));
  int64_t* buf = buffers.data_ptr<int64_t>();
  dynamic_tasks(chunks * S, [&](int64_t task) {
    const int64_t c = task / S, s = task % S;
    int64_t* zb = buf + (c * S + s) * HW;
    std::fill(zb, zb + HW, kEmpty);
    splat_range(e + 12 * s, k + 9 * s, X, Y, Z, c * chunk_len, std::min(P, (c + 1) * chunk_len),
                static_cast<int32_t>(H), static_cast<int32_t>(W), zb);
  });
  if (chunks == 1) return buffers[0];
  auto keys = buffers[0].clone();
  int64_t* out = keys.data_ptr<int64_t>();
  at::parallel_for(0, S * HW, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c = 1; c < chunks; ++c) {
      const int64_t* other = buf + c * S * HW;
      for (int64_t i = begin; i < end; ++i) out[i] = std::min(out[i], other[i]);
    }
  });
  return keys;
}

void check_cameras(const torch::Tensor& extrinsic, const torch::Tensor& intrinsic, torch::ScalarType dtype) {
  TORCH_CHECK(extrinsic.device().is_cpu() && intrinsic.device().is_cpu(), "cameras must be CPU tensors");
  TORCH_CHECK(extrinsic.dim() == 3 && extrinsic.size(1) == 3 && extrinsic.size(2) == 4 &&
                  extrinsic.is_contiguous() && extrinsic.scalar_type() == dtype,
              "extrinsic must be a contiguous [S,3,4] tensor of the points' dtype");
  TORCH_CHECK(intrinsic.dim() == 3 && intrinsic.size(0) == extrinsic.size(0) && intrinsic.size(1) == 3 &&
                  intrinsic.size(2) == 3 && intrinsic.is_contiguous() && intrinsic.scalar_type() == dtype,
              "intrinsic must be a contiguous [S,3,3] tensor of the points' dtype");
}

void check_image_size(int64_t H, int64_t W, int64_t P) {
  TORCH_CHECK(H >= 1 && W >= 1 && H * W < (int64_t(1) << 31), "image size must be positive and below 2^31 pixels");
  TORCH_CHECK(P < (int64_t(1) << 31), "at most 2^31 - 1 points fit the z-buffer key, got ", P);
}

}  // namespace

// depth [S,H,W] (float32 or float64) -> world points [S,H,W,3] of the same dtype.
torch::Tensor unproject(const torch::Tensor& depth, const torch::Tensor& extrinsic, const torch::Tensor& intrinsic) {
  TORCH_CHECK(depth.device().is_cpu() && depth.dim() == 3 && depth.is_contiguous(),
              "depth must be a contiguous CPU [S,H,W] tensor");
  check_cameras(extrinsic, intrinsic, depth.scalar_type());
  TORCH_CHECK(extrinsic.size(0) == depth.size(0), "one camera per depth map");
  const int64_t S = depth.size(0), H = depth.size(1), W = depth.size(2);
  auto out = torch::empty({S, H, W, 3}, depth.options());
  AT_DISPATCH_FLOATING_TYPES(depth.scalar_type(), "unproject", [&] {
    const scalar_t* d = depth.data_ptr<scalar_t>();
    const scalar_t* e = extrinsic.data_ptr<scalar_t>();
    const scalar_t* k = intrinsic.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, S * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end;) {
        const int64_t s = row / H, v0 = row % H, v1 = std::min(H, v0 + (end - row));
        unproject_rows<scalar_t>(d + s * H * W, e + 12 * s, k + 9 * s, W, v0, v1, o + s * H * W * 3);
        row += v1 - v0;
      }
    });
  });
  return out;
}

// points [P,3] float32 -> z-buffer keys [S,H*W] int64.
torch::Tensor zbuffer(const torch::Tensor& points, const torch::Tensor& extrinsic, const torch::Tensor& intrinsic,
                      int64_t H, int64_t W) {
  TORCH_CHECK(points.device().is_cpu() && points.dim() == 2 && points.size(1) == 3 && points.is_contiguous() &&
                  points.scalar_type() == torch::kFloat32,
              "points must be a contiguous float32 CPU [P,3] tensor");
  check_cameras(extrinsic, intrinsic, torch::kFloat32);
  const int64_t P = points.size(0), S = extrinsic.size(0);
  check_image_size(H, W, P);
  auto soa = torch::empty({3, P}, points.options());
  const float* pts = points.data_ptr<float>();
  float* X = soa.data_ptr<float>();
  float* Y = X + P;
  float* Z = Y + P;
  at::parallel_for(0, P, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      X[p] = pts[3 * p];
      Y[p] = pts[3 * p + 1];
      Z[p] = pts[3 * p + 2];
    }
  });
  return zbuffer_soa(X, Y, Z, P, extrinsic.data_ptr<float>(), intrinsic.data_ptr<float>(), S, H, W,
                     points.options());
}

// keys [S,HW], colors [P,C] float32 contiguous, background [C] -> image [S,C,HW] (winner's colour, else
// background), depth [S,HW] (+inf where empty), index [S,HW] (-1 where empty).
std::vector<torch::Tensor> resolve(const torch::Tensor& keys, const torch::Tensor& colors,
                                   const torch::Tensor& background) {
  TORCH_CHECK(keys.device().is_cpu() && keys.dim() == 2 && keys.is_contiguous() &&
                  keys.scalar_type() == torch::kInt64,
              "keys must be a contiguous int64 CPU [S,HW] tensor");
  TORCH_CHECK(colors.device().is_cpu() && colors.dim() == 2 && colors.is_contiguous() &&
                  colors.scalar_type() == torch::kFloat32,
              "colors must be a contiguous float32 CPU [P,C] tensor");
  const int64_t S = keys.size(0), HW = keys.size(1), C = colors.size(1);
  TORCH_CHECK(background.numel() == C && background.is_contiguous() && background.scalar_type() == torch::kFloat32,
              "background must be a contiguous float32 [C] tensor");
  const auto f32 = keys.options().dtype(torch::kFloat32);
  auto image = torch::empty({S, C, HW}, f32);
  auto depth = torch::empty({S, HW}, f32);
  auto index = torch::empty({S, HW}, keys.options());
  const int64_t* kp = keys.data_ptr<int64_t>();
  const float* cp = colors.data_ptr<float>();
  const float* bg = background.data_ptr<float>();
  float* im = image.data_ptr<float>();
  float* dp = depth.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, S * HW, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = j / HW, i = j % HW;
      const int64_t key = kp[j];
      const bool found = key != kEmpty;
      const int64_t idx = found ? (key & 0xFFFFFFFFLL) : -1;
      const float* colour = found ? cp + idx * C : bg;
      for (int64_t c = 0; c < C; ++c) im[(s * C + c) * HW + i] = colour[c];
      const uint32_t bits = static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32);
      float z;
      std::memcpy(&z, &bits, sizeof(z));
      dp[j] = found ? z : inf;
      ip[j] = idx;
    }
  });
  return {image, depth, index};
}

// The fused reprojection error. frames [S,C,H,W] float32, depth [S,H,W] float32, valid [S,H,W] bool, cameras
// [S,3,4] / [S,3,3] float32 -> rendered [S,C,H,W] (background 0), sse [S] float64 (sum over C,H,W of the squared
// error), hits [S] int64 (pixels hit). Point i = s*H*W + v*W + u, the pixel's own index, breaks depth ties.
std::vector<torch::Tensor> reproject(const torch::Tensor& frames, const torch::Tensor& depth,
                                     const torch::Tensor& valid, const torch::Tensor& extrinsic,
                                     const torch::Tensor& intrinsic) {
  TORCH_CHECK(frames.device().is_cpu() && frames.dim() == 4 && frames.is_contiguous() &&
                  frames.scalar_type() == torch::kFloat32,
              "frames must be a contiguous float32 CPU [S,C,H,W] tensor");
  const int64_t S = frames.size(0), C = frames.size(1), H = frames.size(2), W = frames.size(3);
  const int64_t HW = H * W, P = S * HW;
  TORCH_CHECK(depth.device().is_cpu() && depth.dim() == 3 && depth.size(0) == S && depth.size(1) == H &&
                  depth.size(2) == W && depth.is_contiguous() && depth.scalar_type() == torch::kFloat32,
              "depth must be a contiguous float32 CPU [S,H,W] tensor");
  TORCH_CHECK(valid.device().is_cpu() && valid.numel() == P && valid.is_contiguous() &&
                  valid.scalar_type() == torch::kBool,
              "valid must be a contiguous bool CPU [S,H,W] tensor");
  check_cameras(extrinsic, intrinsic, torch::kFloat32);
  TORCH_CHECK(extrinsic.size(0) == S, "one camera per frame");
  check_image_size(H, W, P);
  const float* fp = frames.data_ptr<float>();
  const float* dp = depth.data_ptr<float>();
  const bool* vp = valid.data_ptr<bool>();
  const float* e = extrinsic.data_ptr<float>();
  const float* k = intrinsic.data_ptr<float>();

  // 1. the cloud: world points (SoA, NaN where not valid) and point-major colours [P,C].
  auto cloud = torch::empty({3 + C, P}, frames.options());
  float* X = cloud.data_ptr<float>();
  float* Y = X + P;
  float* Z = Y + P;
  float* colors = Z + P;  // [P,C]
  at::parallel_for(0, S * H, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t s = row / H, v0 = row % H, v1 = std::min(H, v0 + (end - row));
      const int64_t base = s * HW;
      unproject_rows_soa(dp + base, vp + base, e + 12 * s, k + 9 * s, W, v0, v1, X + base, Y + base, Z + base);
      for (int64_t i = v0 * W; i < v1 * W; ++i) {
        for (int64_t c = 0; c < C; ++c) colors[(base + i) * C + c] = fp[(s * C + c) * HW + i];
      }
      row += v1 - v0;
    }
  });

  // 2. z-buffer of the cloud in every frame.
  auto keys = zbuffer_soa(X, Y, Z, P, e, k, S, H, W, frames.options());
  const int64_t* kp = keys.data_ptr<int64_t>();

  // 3. resolve + error, in fixed pixel blocks summed in order (deterministic for any thread count).
  auto rendered = torch::empty({S, C, H, W}, frames.options());
  float* rp = rendered.data_ptr<float>();
  constexpr int64_t kPixBlock = 4096, kPrefetch = 16;
  const int64_t blocks = (HW + kPixBlock - 1) / kPixBlock;
  auto partial = torch::empty({S * blocks}, frames.options().dtype(torch::kFloat64));
  auto partial_hits = torch::empty({S * blocks}, frames.options().dtype(torch::kInt64));
  double* bse = partial.data_ptr<double>();
  int64_t* bhit = partial_hits.data_ptr<int64_t>();
  dynamic_tasks(S * blocks, [&](int64_t task) {
    const int64_t s = task / blocks, i0 = (task % blocks) * kPixBlock, i1 = std::min(HW, i0 + kPixBlock);
    const int64_t* key = kp + s * HW;
    int64_t hit = 0;
    for (int64_t i = i0; i < i1; ++i) {  // gather the winners' colours (prefetched: random reads of the cloud)
      if (i + kPrefetch < i1 && key[i + kPrefetch] != kEmpty) {
        __builtin_prefetch(colors + (key[i + kPrefetch] & 0xFFFFFFFFLL) * C);
      }
      const bool found = key[i] != kEmpty;
      const float* colour = colors + (found ? (key[i] & 0xFFFFFFFFLL) : 0) * C;
      for (int64_t c = 0; c < C; ++c) rp[(s * C + c) * HW + i] = found ? colour[c] : 0.f;
      hit += found;
    }
    double lane[4] = {0.0, 0.0, 0.0, 0.0};  // fixed summation order: deterministic for any thread count
    for (int64_t c = 0; c < C; ++c) {
      const float* r = rp + (s * C + c) * HW;
      const float* f = fp + (s * C + c) * HW;
      for (int64_t i = i0; i < i1; ++i) {
        const double diff = static_cast<double>(r[i]) - static_cast<double>(f[i]);
        lane[i & 3] += diff * diff;
      }
    }
    bse[task] = (lane[0] + lane[1]) + (lane[2] + lane[3]);
    bhit[task] = hit;
  });
  auto sse = torch::zeros({S}, frames.options().dtype(torch::kFloat64));
  auto hits = torch::zeros({S}, frames.options().dtype(torch::kInt64));
  double* se = sse.data_ptr<double>();
  int64_t* hp = hits.data_ptr<int64_t>();
  for (int64_t task = 0; task < S * blocks; ++task) {
    se[task / blocks] += bse[task];
    hp[task / blocks] += bhit[task];
  }
  return {rendered, sse, hits};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("unproject", &unproject, "depth [S,H,W] -> world points [S,H,W,3]");
  m.def("zbuffer", &zbuffer, "points [P,3] -> packed z-buffer keys [S,H*W]");
  m.def("resolve", &resolve, "keys [S,HW], colors [P,C], background [C] -> image, depth, index");
  m.def("reproject", &reproject, "fused reprojection error -> rendered [S,C,H,W], sse [S], hits [S]");
}

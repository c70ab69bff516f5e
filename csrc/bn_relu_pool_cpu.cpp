// CPU kernels of metaformer::bn_relu_pool: training-mode BatchNorm (batch statistics) + ReLU + 2x2 max-pool
// in one op, with a hand-written backward and double backward (second-order MAML differentiates the
// backward). ATen runs the three layers as five separate passes forward and five more backward, with an
// int64 index tensor and a zero-filled gradient buffer; a Conv-4 MAML step on CPU spends ~40% of its time
// there. Here: forward = a statistics pass and one pass that writes the pooled output and a 1-byte argmax
// code; backward = a pass over the pooled positions and one write of the full gradient.
//
// Math, per channel (M = N*H*W elements; x̂ = (y - mean) * invstd; z = gamma * x̂ + beta):
//   out = max(0, max of the 2x2 window of z); code = window position of the max, or -1 when out == 0
//   backward: gz = grad_out scattered to the argmax (0 elsewhere and where code == -1)
//     grad_bias = Σ gz, grad_weight = Σ gz x̂, grad_y = gamma * invstd * (gz - grad_bias/M - x̂ grad_weight/M)
//   double backward (u = d/d grad_y, vw = d/d grad_weight, vb = d/d grad_bias): see bn_relu_pool_double.
// Rows and columns beyond 2*(H/2), 2*(W/2) (odd sizes) take part in the statistics but not in the pooling,
// as in max_pool2d's floor mode.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

// The per-channel loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (the
// extension is built without -march, as torch is); elsewhere they are compiled once.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define METAFORMER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define METAFORMER_CLONES
#endif

namespace metaformer {
namespace {

struct Geometry {
  int64_t n, c, h, w, ho, wo, hw, howo;
};

Geometry geometry(const at::Tensor& y) {
  Geometry g{y.size(0), y.size(1), y.size(2), y.size(3), y.size(2) / 2, y.size(3) / 2, 0, 0};
  g.hw = g.h * g.w;
  g.howo = g.ho * g.wo;
  return g;
}

void check_input(const at::Tensor& y, const char* name) {
  TORCH_CHECK(y.device().is_cpu(), "metaformer::", name, ": expected a CPU tensor, got ", y.device());
  TORCH_CHECK(y.dim() == 4, "metaformer::", name, ": expected input [N, C, H, W], got ", y.sizes());
  TORCH_CHECK(y.size(0) > 0 && y.size(1) > 0 && y.size(2) >= 2 && y.size(3) >= 2, "metaformer::", name,
              ": input ", y.sizes(), " is too small (needs N, C >= 1 and H, W >= 2 for a 2x2 pool)");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, "metaformer::", name,
              ": float32 or float64 only, got ", y.scalar_type(), " (other dtypes take the unfused path)");
}

// Offset of window position `code` (0..3, row-major in the 2x2 window) of pooled cell (i, j) in its plane.
inline int64_t window_offset(int64_t i, int64_t j, int8_t code, int64_t w) {
  return (2 * i + (code >> 1)) * w + 2 * j + (code & 1);
}

// Lane count of the partial sums below: independent accumulators let the compiler vectorise a reduction
// it may not reorder itself (no -ffast-math); a plane's partial sums are then added in double.
constexpr int kLanes = 16;

// s1 += Σ (p[k] - shift), s2 += Σ (p[k] - shift)^2 over one plane.
template <typename scalar_t>
inline void plane_moments(const scalar_t* p, int64_t n, scalar_t shift, double& s1, double& s2) {
  scalar_t a1[kLanes] = {}, a2[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t d = p[k + l] - shift;
      a1[l] += d;
      a2[l] += d * d;
    }
  }
  double r1 = 0.0, r2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    r1 += static_cast<double>(a1[l]);
    r2 += static_cast<double>(a2[l]);
  }
  for (; k < n; ++k) {
    const double d = static_cast<double>(p[k]) - static_cast<double>(shift);
    r1 += d;
    r2 += d * d;
  }
  s1 += r1;
  s2 += r2;
}

// s1 += Σ u[k], s2 += Σ u[k] * (p[k] - shift) over n elements.
template <typename scalar_t>
inline void plane_dot(const scalar_t* u, const scalar_t* p, int64_t n, scalar_t shift, double& s1, double& s2) {
  scalar_t a1[kLanes] = {}, a2[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      a1[l] += u[k + l];
      a2[l] += u[k + l] * (p[k + l] - shift);
    }
  }
  double r1 = 0.0, r2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    r1 += static_cast<double>(a1[l]);
    r2 += static_cast<double>(a2[l]);
  }
  for (; k < n; ++k) {
    r1 += static_cast<double>(u[k]);
    r2 += static_cast<double>(u[k]) * (static_cast<double>(p[k]) - static_cast<double>(shift));
  }
  s1 += r1;
  s2 += r2;
}

// Gathers, for every pooled cell of one plane, grad_out where the cell is active (else 0) and the value of
// `full` (a [H, W] plane) at the cell's argmax; contiguous copies make the reductions vectorisable.
template <typename scalar_t>
inline void gather_argmax(const scalar_t* go, const int8_t* code, const scalar_t* full, const Geometry& g,
                          scalar_t* gz_out, scalar_t* val_out) {
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t j = 0; j < g.wo; ++j) {
      const int64_t cell = i * g.wo + j;
      const int8_t q = code[cell];
      gz_out[cell] = q >= 0 ? go[cell] : scalar_t(0);
      val_out[cell] = full[window_offset(i, j, static_cast<int8_t>(q & 3), g.w)];  // q = -1 reads a valid spot
    }
  }
}

// Σ gz and Σ gz (full - shift) over the planes of channel c, gz = grad_out at the active argmaxes: the
// sums the backward and the double backward both start from. gz, vals: Ho*Wo scratch.
template <typename scalar_t>
inline void pooled_grad_sums(const scalar_t* grad_out, const int8_t* code, const scalar_t* full, const Geometry& g,
                             int64_t c, scalar_t shift, scalar_t* gz, scalar_t* vals, double& sum_gz,
                             double& sum_gz_val) {
  for (int64_t n = 0; n < g.n; ++n) {
    const int64_t plane = n * g.c + c;
    gather_argmax(grad_out + plane * g.howo, code + plane * g.howo, full + plane * g.hw, g, gz, vals);
    plane_dot(gz, vals, g.howo, shift, sum_gz, sum_gz_val);
  }
}

template <typename scalar_t>
struct ForwardArgs {
  Geometry g;
  const scalar_t* y;
  const scalar_t* weight;
  const scalar_t* bias;
  scalar_t* out;
  double* mean;
  double* invstd;
  int8_t* code;
  double eps;
};

// max_pool2d's rule: the first maximum in row-major window order wins, NaN propagates; relu then clamps.
// Branchy and NaN-aware: used for a channel whose statistics or affine factors are not finite.
template <typename scalar_t>
inline void pool_cell_careful(const scalar_t z[4], scalar_t& out, int8_t& code) {
  scalar_t best = z[0];
  int8_t at = 0;
  for (int8_t q = 1; q < 4; ++q) {
    if (std::isnan(best)) break;
    if (z[q] > best || std::isnan(z[q])) {
      best = z[q];
      at = q;
    }
  }
  const bool keep = best > scalar_t(0) || std::isnan(best);
  out = keep ? best : scalar_t(0);
  code = keep ? at : int8_t(-1);
}

// Pooling of one plane of finite values with an even width, in vectorisable loops: (1) the max of each
// horizontal pair, which for an even width are the flat pairs (2k, 2k+1) of the plane (left wins ties);
// (2) the max of the two rows of each window (top wins ties) = the first maximum in row-major order, as in
// max_pool2d; then relu (code -1 where the output is 0). h, hb: H*W/2 scratch; code32: Ho*Wo scratch.
template <typename scalar_t>
inline void pool_plane_even(const scalar_t* plane, const Geometry& g, scalar_t scale, scalar_t offs, scalar_t* out,
                            int8_t* code, scalar_t* h, int32_t* hb, int32_t* code32) {
  const int64_t pairs = g.hw / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const scalar_t z0 = plane[2 * k] * scale + offs, z1 = plane[2 * k + 1] * scale + offs;
    const bool right = z1 > z0;
    h[k] = right ? z1 : z0;
    hb[k] = right ? 1 : 0;
  }
  for (int64_t i = 0; i < g.ho; ++i) {
    const scalar_t* h0 = h + 2 * i * g.wo;
    const scalar_t* h1 = h0 + g.wo;
    const int32_t* b0 = hb + 2 * i * g.wo;
    const int32_t* b1 = b0 + g.wo;
    scalar_t* orow = out + i * g.wo;
    int32_t* crow = code32 + i * g.wo;
    for (int64_t j = 0; j < g.wo; ++j) {
      const bool bottom = h1[j] > h0[j];
      const scalar_t best = bottom ? h1[j] : h0[j];
      const int32_t at = bottom ? 2 + b1[j] : b0[j];
      const bool keep = best > scalar_t(0);
      orow[j] = keep ? best : scalar_t(0);
      crow[j] = keep ? at : -1;
    }
  }
  for (int64_t k = 0; k < g.howo; ++k) code[k] = static_cast<int8_t>(code32[k]);
}

template <typename scalar_t>
METAFORMER_CLONES void forward_channels(const ForwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Geometry& g = a.g;
  const double m = static_cast<double>(g.n * g.hw);
  std::vector<scalar_t> h(g.hw / 2 + 1);
  std::vector<int32_t> hb(g.hw / 2 + 1), code32(g.howo);
  for (int64_t c = c0; c < c1; ++c) {
    // shifted one-pass sums: the shift (first element) keeps E[d^2] - E[d]^2 free of cancellation
    const scalar_t shift_s = a.y[c * g.hw];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t n = 0; n < g.n; ++n) plane_moments(a.y + (n * g.c + c) * g.hw, g.hw, shift_s, s1, s2);
    const double dm = s1 / m;
    const double var = std::max(s2 / m - dm * dm, 0.0);
    const double mean = static_cast<double>(shift_s) + dm;
    const double invstd = 1.0 / std::sqrt(var + a.eps);
    a.mean[c] = mean;
    a.invstd[c] = invstd;
    const double gamma = static_cast<double>(a.weight[c]);
    const scalar_t scale = static_cast<scalar_t>(gamma * invstd);
    const scalar_t offs = static_cast<scalar_t>(static_cast<double>(a.bias[c]) - mean * gamma * invstd);
    const bool finite = std::isfinite(s1) && std::isfinite(s2) && std::isfinite(static_cast<double>(scale)) &&
                        std::isfinite(static_cast<double>(offs));
    for (int64_t n = 0; n < g.n; ++n) {
      const scalar_t* plane = a.y + (n * g.c + c) * g.hw;
      scalar_t* o = a.out + (n * g.c + c) * g.howo;
      int8_t* code = a.code + (n * g.c + c) * g.howo;
      if (finite && g.w % 2 == 0) {
        pool_plane_even(plane, g, scale, offs, o, code, h.data(), hb.data(), code32.data());
        continue;
      }
      for (int64_t i = 0; i < g.ho; ++i) {
        const scalar_t* r0 = plane + 2 * i * g.w;
        const scalar_t* r1 = r0 + g.w;
        for (int64_t j = 0; j < g.wo; ++j) {
          const scalar_t z[4] = {r0[2 * j] * scale + offs, r0[2 * j + 1] * scale + offs, r1[2 * j] * scale + offs,
                                 r1[2 * j + 1] * scale + offs};
          pool_cell_careful(z, o[i * g.wo + j], code[i * g.wo + j]);
        }
      }
    }
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    at::Tensor& out, at::Tensor& mean_t, at::Tensor& invstd_t, at::Tensor& code_t) {
  const ForwardArgs<scalar_t> args{geometry(y),
                                   y.data_ptr<scalar_t>(),
                                   weight.data_ptr<scalar_t>(),
                                   bias.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>(),
                                   mean_t.data_ptr<double>(),
                                   invstd_t.data_ptr<double>(),
                                   code_t.data_ptr<int8_t>(),
                                   eps};
  at::parallel_for(0, args.g.c, 1, [&](int64_t c0, int64_t c1) { forward_channels(args, c0, c1); });
}

template <typename scalar_t>
struct BackwardArgs {
  Geometry g;
  const scalar_t* grad_out;
  const scalar_t* y;
  const scalar_t* weight;
  const double* mean;
  const double* invstd;
  const int8_t* code;
  scalar_t* grad_y;
  scalar_t* grad_w;
  scalar_t* grad_b;
};

template <typename scalar_t>
METAFORMER_CLONES void backward_channels(const BackwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Geometry& g = a.g;
  const double m = static_cast<double>(g.n * g.hw);
  std::vector<scalar_t> gz(g.howo), yv(g.howo);
  for (int64_t c = c0; c < c1; ++c) {
    const double mean = a.mean[c], invstd = a.invstd[c], gamma = static_cast<double>(a.weight[c]);
    const scalar_t mean_s = static_cast<scalar_t>(mean);
    double sum_gz = 0.0, sum_gz_y = 0.0;  // Σ gz, Σ gz (y - mean)
    pooled_grad_sums(a.grad_out, a.code, a.y, g, c, mean_s, gz.data(), yv.data(), sum_gz, sum_gz_y);
    const double sum_gz_xhat = sum_gz_y * invstd;
    a.grad_b[c] = static_cast<scalar_t>(sum_gz);
    a.grad_w[c] = static_cast<scalar_t>(sum_gz_xhat);
    // grad_y = k*gz - k*sum_gz/M - k*x̂*sum_gz_xhat/M, written as e0 - y*e1 (+ k*gz at the argmax)
    const double k = gamma * invstd;
    const double e1 = k * sum_gz_xhat / m * invstd;
    const scalar_t e0 = static_cast<scalar_t>(-k * sum_gz / m + mean * e1);
    const scalar_t e1s = static_cast<scalar_t>(e1);
    const scalar_t ks = static_cast<scalar_t>(k);
    for (int64_t n = 0; n < g.n; ++n) {
      const int64_t plane = n * g.c + c;
      const scalar_t* yplane = a.y + plane * g.hw;
      scalar_t* gy = a.grad_y + plane * g.hw;
      for (int64_t idx = 0; idx < g.hw; ++idx) gy[idx] = e0 - yplane[idx] * e1s;
      const scalar_t* go = a.grad_out + plane * g.howo;
      const int8_t* code = a.code + plane * g.howo;
      for (int64_t i = 0; i < g.ho; ++i) {
        for (int64_t j = 0; j < g.wo; ++j) {
          const int8_t q = code[i * g.wo + j];
          if (q >= 0) gy[window_offset(i, j, q, g.w)] += ks * go[i * g.wo + j];
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& mean_t,
                     const at::Tensor& invstd_t, const at::Tensor& code_t, at::Tensor& grad_y, at::Tensor& grad_w,
                     at::Tensor& grad_b) {
  const BackwardArgs<scalar_t> args{geometry(y),
                                    grad_out.data_ptr<scalar_t>(),
                                    y.data_ptr<scalar_t>(),
                                    weight.data_ptr<scalar_t>(),
                                    mean_t.data_ptr<double>(),
                                    invstd_t.data_ptr<double>(),
                                    code_t.data_ptr<int8_t>(),
                                    grad_y.data_ptr<scalar_t>(),
                                    grad_w.data_ptr<scalar_t>(),
                                    grad_b.data_ptr<scalar_t>()};
  at::parallel_for(0, args.g.c, 1, [&](int64_t c0, int64_t c1) { backward_channels(args, c0, c1); });
}

// Vector-Jacobian product of the backward (grad_out, y, weight) -> (grad_y, grad_weight, grad_bias) with
// u = d/d grad_y, vw = d/d grad_weight, vb = d/d grad_bias (each may be absent = zero). With
// gb = Σ gz, gw = Σ gz x̂, Su = Σ u, Sux = Σ u x̂, Sugz = Σ u gz (per channel):
//   d grad_out (at the argmax) = gamma*s*(u - Su/M - x̂ Sux/M) + vw x̂ + vb
//   d weight = s*(Sugz - gb Su/M - gw Sux/M)
//   d y = s*(ca u + cb gz - gbar - x̂ gx) - Q s^2 x̂/M, with ca = -gamma s gw/M, cb = vw - gamma s Sux/M,
//         Q = gamma (Sugz - Su gb/M - Sux gw/M), gbar = (ca Su + cb gb)/M, gx = (ca Sux + cb gw)/M
// (x̂ depends on y through the mean and through s = invstd; Q is the derivative through s itself).
template <typename scalar_t>
struct DoubleBackwardArgs {
  Geometry g;
  const scalar_t* u;   // d/d grad_y, nullptr = 0
  const scalar_t* vw;  // d/d grad_weight, nullptr = 0
  const scalar_t* vb;  // d/d grad_bias, nullptr = 0
  const scalar_t* grad_out;
  const scalar_t* y;
  const scalar_t* weight;
  const double* mean;
  const double* invstd;
  const int8_t* code;
  scalar_t* d_grad_out;
  scalar_t* d_y;
  scalar_t* d_w;
};

template <typename scalar_t>
METAFORMER_CLONES void double_backward_channels(const DoubleBackwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Geometry& g = a.g;
  const double m = static_cast<double>(g.n * g.hw);
  const bool has_u = a.u != nullptr;
  std::vector<scalar_t> gz(g.howo), yv(g.howo);
  for (int64_t c = c0; c < c1; ++c) {
    const double mean = a.mean[c], s = a.invstd[c], gamma = static_cast<double>(a.weight[c]);
    const double vw = a.vw ? static_cast<double>(a.vw[c]) : 0.0;
    const double vb = a.vb ? static_cast<double>(a.vb[c]) : 0.0;
    const scalar_t mean_s = static_cast<scalar_t>(mean);
    double su = 0.0, sux = 0.0;  // Σ u, then Σ u x̂
    if (has_u) {
      for (int64_t n = 0; n < g.n; ++n) {
        const int64_t plane = n * g.c + c;
        plane_dot(a.u + plane * g.hw, a.y + plane * g.hw, g.hw, mean_s, su, sux);
      }
      sux *= s;
    }
    double gb = 0.0, gw = 0.0, sugz = 0.0, unused = 0.0;  // Σ gz, Σ gz x̂, Σ u gz
    pooled_grad_sums(a.grad_out, a.code, a.y, g, c, mean_s, gz.data(), yv.data(), gb, gw);
    if (has_u) pooled_grad_sums(a.grad_out, a.code, a.u, g, c, scalar_t(0), gz.data(), yv.data(), unused, sugz);
    gw *= s;
    const double ca = -gamma * s * gw / m;
    const double cb = vw - gamma * s * sux / m;
    const double qs = gamma * (sugz - su * gb / m - sux * gw / m);
    const double gbar = (ca * su + cb * gb) / m;
    const double gx = (ca * sux + cb * gw) / m;
    a.d_w[c] = static_cast<scalar_t>(s * (sugz - gb * su / m - gw * sux / m));
    // d y = s*a*u + e0 - y*e1 (+ s*b*gz at the argmax), x̂ = (y - mean) s expanded
    const double e1 = (s * gx + qs * s * s / m) * s;
    const scalar_t e0 = static_cast<scalar_t>(-s * gbar + mean * e1);
    const scalar_t e1s = static_cast<scalar_t>(e1);
    const scalar_t sa = static_cast<scalar_t>(s * ca);
    const double sb = s * cb;
    const double kg = gamma * s;
    for (int64_t n = 0; n < g.n; ++n) {
      const scalar_t* plane = a.y + (n * g.c + c) * g.hw;
      const scalar_t* u = has_u ? a.u + (n * g.c + c) * g.hw : nullptr;
      scalar_t* dy = a.d_y + (n * g.c + c) * g.hw;
      if (has_u) {
        for (int64_t k = 0; k < g.hw; ++k) dy[k] = sa * u[k] + e0 - plane[k] * e1s;
      } else {
        for (int64_t k = 0; k < g.hw; ++k) dy[k] = e0 - plane[k] * e1s;
      }
      const scalar_t* go = a.grad_out + (n * g.c + c) * g.howo;
      const int8_t* code = a.code + (n * g.c + c) * g.howo;
      scalar_t* dgo = a.d_grad_out + (n * g.c + c) * g.howo;
      for (int64_t i = 0; i < g.ho; ++i) {
        for (int64_t j = 0; j < g.wo; ++j) {
          const int8_t q = code[i * g.wo + j];
          if (q < 0) {
            dgo[i * g.wo + j] = scalar_t(0);
            continue;
          }
          const int64_t off = window_offset(i, j, q, g.w);
          const double xhat = (static_cast<double>(plane[off]) - mean) * s;
          const double uk = has_u ? static_cast<double>(u[off]) : 0.0;
          dy[off] += static_cast<scalar_t>(sb * static_cast<double>(go[i * g.wo + j]));
          dgo[i * g.wo + j] = static_cast<scalar_t>(kg * (uk - su / m - xhat * sux / m) + vw * xhat + vb);
        }
      }
    }
  }
}

template <typename scalar_t>
void double_backward_kernel(const at::Tensor& ggy, const at::Tensor& ggw, const at::Tensor& ggb,
                            const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
                            const at::Tensor& mean_t, const at::Tensor& invstd_t, const at::Tensor& code_t,
                            at::Tensor& d_grad_out, at::Tensor& d_y, at::Tensor& d_w) {
  const DoubleBackwardArgs<scalar_t> args{geometry(y),
                                          ggy.defined() ? ggy.data_ptr<scalar_t>() : nullptr,
                                          ggw.defined() ? ggw.data_ptr<scalar_t>() : nullptr,
                                          ggb.defined() ? ggb.data_ptr<scalar_t>() : nullptr,
                                          grad_out.data_ptr<scalar_t>(),
                                          y.data_ptr<scalar_t>(),
                                          weight.data_ptr<scalar_t>(),
                                          mean_t.data_ptr<double>(),
                                          invstd_t.data_ptr<double>(),
                                          code_t.data_ptr<int8_t>(),
                                          d_grad_out.data_ptr<scalar_t>(),
                                          d_y.data_ptr<scalar_t>(),
                                          d_w.data_ptr<scalar_t>()};
  at::parallel_for(0, args.g.c, 1, [&](int64_t c0, int64_t c1) { double_backward_channels(args, c0, c1); });
}

void check_channels(const at::Tensor& t, const at::Tensor& y, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == y.size(1), "metaformer::bn_relu_pool: ", what, " must be [C=", y.size(1),
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), "metaformer::bn_relu_pool: ", what, " dtype ", t.scalar_type(),
              " differs from the input's ", y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(const at::Tensor& input,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias, double eps) {
  check_input(input, "bn_relu_pool");
  check_channels(weight, input, "weight");
  check_channels(bias, input, "bias");
  const at::Tensor y = input.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const Geometry g = geometry(y);
  at::Tensor out = at::empty({g.n, g.c, g.ho, g.wo}, y.options());
  at::Tensor mean = at::empty({g.c}, y.options().dtype(at::kDouble));
  at::Tensor invstd = at::empty({g.c}, y.options().dtype(at::kDouble));
  at::Tensor code = at::empty({g.n, g.c, g.ho, g.wo}, y.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bn_relu_pool", [&] {
    forward_kernel<scalar_t>(y, w, b, eps, out, mean, invstd, code);
  });
  return {out, mean, invstd, code};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& input,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& mean,
                                                                         const at::Tensor& invstd,
                                                                         const at::Tensor& code) {
  check_input(input, "bn_relu_pool_backward");
  check_channels(weight, input, "weight");
  const at::Tensor y = input.contiguous();
  const Geometry g = geometry(y);
  TORCH_CHECK(grad_out.sizes() == code.sizes() && code.size(0) == g.n && code.size(1) == g.c && code.size(2) == g.ho &&
                  code.size(3) == g.wo,
              "metaformer::bn_relu_pool_backward: grad_out ", grad_out.sizes(), " and code ", code.sizes(),
              " must both be the pooled shape [", g.n, ", ", g.c, ", ", g.ho, ", ", g.wo, "]");
  const at::Tensor go = grad_out.to(y.scalar_type()).contiguous();
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_w = at::empty({g.c}, y.options());
  at::Tensor grad_b = at::empty({g.c}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bn_relu_pool_backward", [&] {
    backward_kernel<scalar_t>(go, y, weight.contiguous(), mean.contiguous(), invstd.contiguous(), code.contiguous(),
                              grad_y, grad_w, grad_b);
  });
  return {grad_y, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const std::optional<at::Tensor>& ggy, const std::optional<at::Tensor>& ggw, const std::optional<at::Tensor>& ggb,
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& code) {
  check_input(input, "bn_relu_pool_double_backward");
  const at::Tensor y = input.contiguous();
  const auto dtype = y.scalar_type();
  at::Tensor u, vw, vb;
  if (ggy.has_value() && ggy->defined()) {
    TORCH_CHECK(ggy->sizes() == y.sizes(), "metaformer::bn_relu_pool_double_backward: grad of grad_y ", ggy->sizes(),
                " must match the input ", y.sizes());
    u = ggy->to(dtype).contiguous();
  }
  if (ggw.has_value() && ggw->defined()) vw = ggw->to(dtype).contiguous();
  if (ggb.has_value() && ggb->defined()) vb = ggb->to(dtype).contiguous();
  at::Tensor d_grad_out = at::empty(code.sizes(), y.options());
  at::Tensor d_y = at::empty_like(y);
  at::Tensor d_w = at::empty({y.size(1)}, y.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_relu_pool_double_backward", [&] {
    double_backward_kernel<scalar_t>(u, vw, vb, grad_out.to(dtype).contiguous(), y, weight.contiguous(),
                                     mean.contiguous(), invstd.contiguous(), code.contiguous(), d_grad_out, d_y, d_w);
  });
  return {d_grad_out, d_y, d_w};
}

}  // namespace
}  // namespace metaformer

TORCH_LIBRARY_FRAGMENT(metaformer, m) {
  m.def("bn_relu_pool(Tensor input, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor mean, Tensor invstd, Tensor code) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool_double_backward(Tensor? grad_grad_input, Tensor? grad_grad_weight, Tensor? grad_grad_bias, "
      "Tensor grad_out, Tensor input, Tensor weight, Tensor mean, Tensor invstd, Tensor code) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metaformer, CPU, m) {
  m.impl("bn_relu_pool", &metaformer::bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &metaformer::bn_relu_pool_backward_cpu);
  m.impl("bn_relu_pool_double_backward", &metaformer::bn_relu_pool_double_backward_cpu);
}

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
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pool_planes.h"

namespace metaformer {
namespace {

using namespace planes;

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

template <typename scalar_t>
METAFORMER_CLONES void forward_channels(const ForwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Geometry& g = a.g;
  const double m = static_cast<double>(g.n * g.hw);
  const int64_t nc = c1 - c0;
  std::vector<double> s1(nc, 0.0), s2(nc, 0.0);
  std::vector<scalar_t> shift(nc), scale(nc), offs(nc);
  std::vector<char> finite(nc);
  // shifted one-pass sums: a shift inside the data (a channel's first element) takes the mean's magnitude out of
  // E[d^2] - E[d]^2, which removes most of the cancellation of the unshifted formula (not all: it may sit 3 sigma out)
  for (int64_t c = c0; c < c1; ++c) shift[c - c0] = a.y[c * g.hw];
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      plane_moments(a.y + (n * g.c + c) * g.hw, g.hw, shift[c - c0], s1[c - c0], s2[c - c0]);
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k = c - c0;
    const double dm = s1[k] / m;
    const double var = std::max(s2[k] / m - dm * dm, 0.0);
    const double mean = static_cast<double>(shift[k]) + dm;
    const double invstd = 1.0 / std::sqrt(var + a.eps);
    a.mean[c] = mean;
    a.invstd[c] = invstd;
    const double gamma = static_cast<double>(a.weight[c]);
    scale[k] = static_cast<scalar_t>(gamma * invstd);
    offs[k] = static_cast<scalar_t>(static_cast<double>(a.bias[c]) - mean * gamma * invstd);
    finite[k] = std::isfinite(s1[k]) && std::isfinite(s2[k]) && std::isfinite(static_cast<double>(scale[k])) &&
                std::isfinite(static_cast<double>(offs[k]));
  }
  std::vector<scalar_t> h(g.hw / 2 + 1);
  std::vector<int32_t> hb(g.hw / 2 + 1), code32(g.howo);
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k = c - c0;
      const scalar_t* plane = a.y + (n * g.c + c) * g.hw;
      scalar_t* o = a.out + (n * g.c + c) * g.howo;
      int8_t* code = a.code + (n * g.c + c) * g.howo;
      pool_plane(plane, g, scale[k], offs[k], finite[k] != 0, o, code, h.data(), hb.data(), code32.data());
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
  const int64_t nc = c1 - c0;
  std::vector<scalar_t> gz(g.howo), yv(g.howo);
  std::vector<double> sum_gz(nc, 0.0), sum_gz_y(nc, 0.0);  // Σ gz, Σ gz (y - mean)
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = n * g.c + c;
      pooled_grad_sums(a.grad_out + plane * g.howo, a.code + plane * g.howo, a.y + plane * g.hw, g,
                       static_cast<scalar_t>(a.mean[c]), gz.data(), yv.data(), sum_gz[c - c0], sum_gz_y[c - c0]);
    }
  }
  // grad_y = k*gz - k*sum_gz/M - k*x̂*sum_gz_xhat/M, written as e0 - y*e1 (+ k*gz at the argmax)
  std::vector<scalar_t> e0(nc), e1(nc), ks(nc);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = c - c0;
    const double mean = a.mean[c], invstd = a.invstd[c], gamma = static_cast<double>(a.weight[c]);
    const double sum_gz_xhat = sum_gz_y[j] * invstd;
    a.grad_b[c] = static_cast<scalar_t>(sum_gz[j]);
    a.grad_w[c] = static_cast<scalar_t>(sum_gz_xhat);
    const double k = gamma * invstd;
    const double e1d = k * sum_gz_xhat / m * invstd;
    e0[j] = static_cast<scalar_t>(-k * sum_gz[j] / m + mean * e1d);
    e1[j] = static_cast<scalar_t>(e1d);
    ks[j] = static_cast<scalar_t>(k);
  }
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j = c - c0;
      const int64_t plane = n * g.c + c;
      const scalar_t* yplane = a.y + plane * g.hw;
      scalar_t* gy = a.grad_y + plane * g.hw;
      const scalar_t* go = a.grad_out + plane * g.howo;
      const int8_t* code = a.code + plane * g.howo;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (simd::avx512_selected()) {
          simd::write_grad_plane_f32(yplane, go, code, g.h, g.w, e0[j], e1[j], ks[j], gy);
          continue;
        }
        if (simd::avx2_selected() && g.wo >= simd::avx2::kMinBackwardCells) {
          simd::avx2::write_grad_plane_f32(yplane, go, code, g.h, g.w, e0[j], e1[j], ks[j], gy);
          continue;
        }
      }
      for (int64_t idx = 0; idx < g.hw; ++idx) gy[idx] = e0[j] - yplane[idx] * e1[j];
      for (int64_t i = 0; i < g.ho; ++i) {
        for (int64_t jj = 0; jj < g.wo; ++jj) {
          const int8_t q = code[i * g.wo + jj];
          if (q >= 0) gy[window_offset(i, jj, q, g.w)] += ks[j] * go[i * g.wo + jj];
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
  const int64_t nc = c1 - c0;
  std::vector<scalar_t> gz(g.howo), yv(g.howo), mean_s(nc);
  for (int64_t c = c0; c < c1; ++c) mean_s[c - c0] = static_cast<scalar_t>(a.mean[c]);
  // per channel: Σ u, Σ u x̂ (still without the factor s), Σ gz, Σ gz x̂ (likewise), Σ u gz
  std::vector<double> su(nc, 0.0), sux(nc, 0.0), gb(nc, 0.0), gw(nc, 0.0), sugz(nc, 0.0);
  double unused = 0.0;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j = c - c0;
      const int64_t plane = n * g.c + c;
      if (has_u) plane_dot(a.u + plane * g.hw, a.y + plane * g.hw, g.hw, mean_s[j], su[j], sux[j]);
      pooled_grad_sums(a.grad_out + plane * g.howo, a.code + plane * g.howo, a.y + plane * g.hw, g, mean_s[j],
                       gz.data(), yv.data(), gb[j], gw[j]);
      if (has_u) {
        pooled_grad_sums(a.grad_out + plane * g.howo, a.code + plane * g.howo, a.u + plane * g.hw, g, scalar_t(0),
                         gz.data(), yv.data(), unused, sugz[j]);
      }
    }
  }
  struct Coef {
    double mean, s, su, sux, vw, vb, sb, kg;
    scalar_t e0, e1, sa;
  };
  std::vector<Coef> coef(nc);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = c - c0;
    const double mean = a.mean[c], s = a.invstd[c], gamma = static_cast<double>(a.weight[c]);
    const double vw = a.vw ? static_cast<double>(a.vw[c]) : 0.0;
    const double vb = a.vb ? static_cast<double>(a.vb[c]) : 0.0;
    const double sxu = sux[j] * s, gwx = gw[j] * s;
    const double ca = -gamma * s * gwx / m;
    const double cb = vw - gamma * s * sxu / m;
    const double qs = gamma * (sugz[j] - su[j] * gb[j] / m - sxu * gwx / m);
    const double gbar = (ca * su[j] + cb * gb[j]) / m;
    const double gx = (ca * sxu + cb * gwx) / m;
    a.d_w[c] = static_cast<scalar_t>(s * (sugz[j] - gb[j] * su[j] / m - gwx * sxu / m));
    // d y = s*a*u + e0 - y*e1 (+ s*b*gz at the argmax), x̂ = (y - mean) s expanded
    const double e1 = (s * gx + qs * s * s / m) * s;
    coef[j] = Coef{mean, s, su[j], sxu, vw, vb, s * cb, gamma * s, static_cast<scalar_t>(-s * gbar + mean * e1),
                   static_cast<scalar_t>(e1), static_cast<scalar_t>(s * ca)};
  }
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const Coef& k = coef[c - c0];
      const scalar_t* plane = a.y + (n * g.c + c) * g.hw;
      const scalar_t* u = has_u ? a.u + (n * g.c + c) * g.hw : nullptr;
      scalar_t* dy = a.d_y + (n * g.c + c) * g.hw;
      if (has_u) {
        for (int64_t i = 0; i < g.hw; ++i) dy[i] = k.sa * u[i] + k.e0 - plane[i] * k.e1;
      } else {
        for (int64_t i = 0; i < g.hw; ++i) dy[i] = k.e0 - plane[i] * k.e1;
      }
      const scalar_t* go = a.grad_out + (n * g.c + c) * g.howo;
      const int8_t* code = a.code + (n * g.c + c) * g.howo;
      scalar_t* dgo = a.d_grad_out + (n * g.c + c) * g.howo;
      for (int64_t i = 0; i < g.ho; ++i) {
        for (int64_t jj = 0; jj < g.wo; ++jj) {
          const int8_t q = code[i * g.wo + jj];
          if (q < 0) {
            dgo[i * g.wo + jj] = scalar_t(0);
            continue;
          }
          const int64_t off = window_offset(i, jj, q, g.w);
          const double xhat = (static_cast<double>(plane[off]) - k.mean) * k.s;
          const double uk = has_u ? static_cast<double>(u[off]) : 0.0;
          dy[off] += static_cast<scalar_t>(k.sb * static_cast<double>(go[i * g.wo + jj]));
          dgo[i * g.wo + jj] = static_cast<scalar_t>(k.kg * (uk - k.su / m - xhat * k.sux / m) + k.vw * xhat + k.vb);
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

namespace metaformer {
namespace {
// Which kernels the float32 block ops run in this process: "avx512", "avx2" or "generic" (benchmarks record it).
std::string cpu_kernels() { return simd::kernels_name(simd::kernels()); }
}  // namespace
}  // namespace metaformer

TORCH_LIBRARY_FRAGMENT(metaformer, m) {
  m.def("cpu_kernels() -> str", &metaformer::cpu_kernels);
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

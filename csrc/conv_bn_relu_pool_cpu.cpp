// CPU kernels of metaformer::conv3x3_bn_relu_pool: the first block of Conv-4 (a 3x3 convolution with padding 1
// on an image of at most 3 channels, then training-mode BatchNorm + ReLU + 2x2 max-pool) in one op, for
// passes that are differentiated once (the query pass of MAML: its graph only ever sees a first-order
// backward). With one input channel the convolution is 9 multiply-adds per output, so the op recomputes
// the conv output plane by plane instead of writing [N, O, H, W] (15 MB for 75 Omniglot images) and reading
// it back three times; ATen's convolution, its weight gradient and the BatchNorm passes around them were
// ~13 ms of each task's query pass on the session-11 CPU.
//
// Math (p = the Cin*9 zero-padded patch at a position, M = N*H*W positions, mu = E[p], C = E[(p-mu)(p-mu)^T]):
//   t = w_o . p (the conv output without its bias, which cancels in BatchNorm with batch statistics)
//   mean_o = w_o . mu, var_o = w_o^T C w_o: the BatchNorm statistics from the patch statistics, exactly
//   out = max(0, max over the 2x2 window of gamma_o invstd_o (t - mean_o) + beta_o), code as in bn_relu_pool
// backward (gz = grad_out at the argmax, Sgz = Σ gz, Sgx = Σ gz x̂, A_o = Σ gz p at the argmax):
//   grad_beta = Sgz, grad_gamma = Sgx, grad_w_o = gamma invstd (A_o - Sgz mu - Sgx invstd C w_o),
//   grad_conv_bias = 0 (Σ grad_t = 0 for batch statistics), no input gradient (the input is data).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pool_planes.h"

namespace metaformer {
namespace {

using namespace planes;

constexpr int64_t kMaxInChannels = 3;

struct Stem {
  int64_t cin, p;  // input channels, patch length cin*9
  Geometry g;      // of the conv output: n, c = output channels, h, w (same as the input's), pooled ho, wo
};

Stem stem_geometry(const at::Tensor& x, const at::Tensor& weight) {
  Stem s{x.size(1), x.size(1) * 9, Geometry{x.size(0), weight.size(0), x.size(2), x.size(3), x.size(2) / 2,
                                            x.size(3) / 2, 0, 0}};
  s.g.hw = s.g.h * s.g.w;
  s.g.howo = s.g.ho * s.g.wo;
  return s;
}

// The patches of one image as rows: rows[(ci*3 + dh)*3 + dw][y*W + x] = image[ci][y + dh - 1][x + dw - 1]
// (0 outside the image).
template <typename scalar_t>
void im2col(const scalar_t* img, const Stem& s, scalar_t* rows) {
  const int64_t h = s.g.h, w = s.g.w;
  for (int64_t ci = 0; ci < s.cin; ++ci) {
    for (int64_t dh = 0; dh < 3; ++dh) {
      for (int64_t dw = 0; dw < 3; ++dw) {
        scalar_t* r = rows + ((ci * 3 + dh) * 3 + dw) * h * w;
        for (int64_t y = 0; y < h; ++y) {
          scalar_t* out = r + y * w;
          const int64_t sy = y + dh - 1;
          if (sy < 0 || sy >= h) {
            for (int64_t x = 0; x < w; ++x) out[x] = scalar_t(0);
            continue;
          }
          const scalar_t* src = img + (ci * h + sy) * w;
          if (dw == 0) {
            out[0] = scalar_t(0);
            for (int64_t x = 1; x < w; ++x) out[x] = src[x - 1];
          } else if (dw == 1) {
            for (int64_t x = 0; x < w; ++x) out[x] = src[x];
          } else {
            for (int64_t x = 0; x + 1 < w; ++x) out[x] = src[x + 1];
            out[w - 1] = scalar_t(0);
          }
        }
      }
    }
  }
}

// mu [P] and C [P*P] (double) of the zero-padded patches over all positions of the batch: a pass for the
// mean, then one over the centred rows (no E[pp] - mu mu cancellation).
template <typename scalar_t>
void patch_statistics(const scalar_t* x, const Stem& s, std::vector<double>& mu, std::vector<double>& cov) {
  const int64_t hw = s.g.hw, p = s.p;
  const double m = static_cast<double>(s.g.n * hw);
  std::vector<scalar_t> rows(p * hw);
  std::vector<double> sum(p, 0.0), unused(p, 0.0);
  for (int64_t n = 0; n < s.g.n; ++n) {
    im2col(x + n * s.cin * hw, s, rows.data());
    for (int64_t i = 0; i < p; ++i) plane_moments(rows.data() + i * hw, hw, scalar_t(0), sum[i], unused[i]);
  }
  mu.assign(p, 0.0);
  for (int64_t i = 0; i < p; ++i) mu[i] = sum[i] / m;
  std::vector<double> cross(p * p, 0.0), ignored(p * p, 0.0);
  for (int64_t n = 0; n < s.g.n; ++n) {
    im2col(x + n * s.cin * hw, s, rows.data());
    for (int64_t i = 0; i < p; ++i) {
      const scalar_t mi = static_cast<scalar_t>(mu[i]);
      scalar_t* r = rows.data() + i * hw;
      for (int64_t k = 0; k < hw; ++k) r[k] -= mi;
    }
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        plane_dot(rows.data() + i * hw, rows.data() + j * hw, hw, scalar_t(0), ignored[i * p + j], cross[i * p + j]);
      }
    }
  }
  cov.assign(p * p, 0.0);
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j <= i; ++j) cov[i * p + j] = cov[j * p + i] = cross[i * p + j] / m;
  }
}

// t planes of nc <= simd::kStemBlock consecutive output channels over one image's rows:
// t[c*hw + k] = ((w0 p0 + w1 p1) + w2 p2) + ...
template <typename scalar_t>
inline void conv_planes(const scalar_t* rows, const scalar_t* w, int64_t p, int64_t hw, int64_t nc, scalar_t* t) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) return simd::conv_planes_f32(rows, w, p, hw, nc, t);
    if (simd::avx2_selected()) return simd::avx2::conv_planes_f32(rows, w, p, hw, nc, t);
  }
  for (int64_t c = 0; c < nc; ++c) {
    scalar_t* tc = t + c * hw;
    const scalar_t* wc = w + c * p;
    for (int64_t k = 0; k < hw; ++k) tc[k] = wc[0] * rows[k];
    for (int64_t i = 1; i < p; ++i) {
      const scalar_t wi = wc[i];
      const scalar_t* r = rows + i * hw;
      for (int64_t k = 0; k < hw; ++k) tc[k] += wi * r[k];
    }
  }
}

// gz plane: grad_out at each active argmax, 0 elsewhere (windows are disjoint, so an inactive cell writes a
// 0 over a 0).
template <typename scalar_t>
inline void scatter_plane(const scalar_t* go, const int8_t* code, const Geometry& g, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) return simd::scatter_plane_f32(go, code, g.h, g.w, out);
    if (simd::avx2_selected() && g.wo >= simd::avx2::kMinBackwardCells) {
      return simd::avx2::scatter_plane_f32(go, code, g.h, g.w, out);
    }
  }
  for (int64_t k = 0; k < g.hw; ++k) out[k] = scalar_t(0);
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t j = 0; j < g.wo; ++j) {
      const int8_t q = code[i * g.wo + j];
      out[window_offset(i, j, static_cast<int8_t>(q & 3), g.w)] = q >= 0 ? go[i * g.wo + j] : scalar_t(0);
    }
  }
}

// acc[c*p + i] += Σ u[c] . rows[i] for nc planes u and the p rows of one image.
template <typename scalar_t>
inline void rows_dot_planes(const scalar_t* u, const scalar_t* rows, int64_t p, int64_t hw, int64_t nc, double* acc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) return simd::rows_dot_planes_f32(u, rows, p, hw, nc, acc);
    if (simd::avx2_selected()) return simd::avx2::rows_dot_planes_f32(u, rows, p, hw, nc, acc);
  }
  double unused = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t i = 0; i < p; ++i) plane_dot(u + c * hw, rows + i * hw, hw, scalar_t(0), unused, acc[c * p + i]);
  }
}

// For every image n of the batch and block of up to simd::kStemBlock channels cb .. cb+nc-1 of [c0, c1):
// fills rows (the image's patches) and t (the block's conv planes, [nc, H*W]), then calls fn(n, cb, nc).
template <typename scalar_t, typename Fn>
inline void for_each_stem_block(const scalar_t* x, const scalar_t* weight, const Stem& s, int64_t c0, int64_t c1,
                                scalar_t* rows, scalar_t* t, Fn&& fn) {
  for (int64_t n = 0; n < s.g.n; ++n) {
    im2col(x + n * s.cin * s.g.hw, s, rows);
    for (int64_t cb = c0; cb < c1; cb += simd::kStemBlock) {
      const int64_t nc = std::min(simd::kStemBlock, c1 - cb);
      conv_planes(rows, weight + cb * s.p, s.p, s.g.hw, nc, t);
      fn(n, cb, nc);
    }
  }
}

template <typename scalar_t>
struct StemForwardArgs {
  Stem s;
  const scalar_t* x;
  const scalar_t* weight;  // [O, P]
  const scalar_t* scale;   // [O]: gamma * invstd
  const scalar_t* offs;    // [O]: beta - gamma * invstd * mean
  const char* finite;      // [O]
  scalar_t* out;
  int8_t* code;
};

template <typename scalar_t>
METAFORMER_CLONES void stem_forward_channels(const StemForwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Stem& s = a.s;
  const Geometry& g = s.g;
  std::vector<scalar_t> rows(s.p * g.hw), t(simd::kStemBlock * g.hw), h(g.hw / 2 + 1);
  std::vector<int32_t> hb(g.hw / 2 + 1), code32(g.howo);
  for_each_stem_block(a.x, a.weight, s, c0, c1, rows.data(), t.data(), [&](int64_t n, int64_t cb, int64_t nc) {
    for (int64_t c = cb; c < cb + nc; ++c) {
      const int64_t plane = n * g.c + c;
      pool_plane(t.data() + (c - cb) * g.hw, g, a.scale[c], a.offs[c], a.finite[c] != 0, a.out + plane * g.howo,
                 a.code + plane * g.howo, h.data(), hb.data(), code32.data());
    }
  });
}

template <typename scalar_t>
struct StemBackwardArgs {
  Stem s;
  const scalar_t* grad_out;
  const scalar_t* x;
  const scalar_t* weight;  // [O, P]
  const double* mean;      // [O]: of t
  const int8_t* code;
  double* sum_gz;   // [O]
  double* sum_gzt;  // [O]: Σ gz (t - mean)
  double* a;        // [O, P]: Σ gz p at the argmax
};

template <typename scalar_t>
METAFORMER_CLONES void stem_backward_channels(const StemBackwardArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  const Stem& s = a.s;
  const Geometry& g = s.g;
  const int64_t blk = simd::kStemBlock;
  std::vector<scalar_t> rows(s.p * g.hw), t(blk * g.hw), gzfull(blk * g.hw), gz(g.howo), vals(g.howo);
  for_each_stem_block(a.x, a.weight, s, c0, c1, rows.data(), t.data(), [&](int64_t n, int64_t cb, int64_t nc) {
    for (int64_t c = cb; c < cb + nc; ++c) {
      const int64_t plane = n * g.c + c;
      const scalar_t* go = a.grad_out + plane * g.howo;
      const int8_t* code = a.code + plane * g.howo;
      pooled_grad_sums(go, code, t.data() + (c - cb) * g.hw, g, static_cast<scalar_t>(a.mean[c]), gz.data(),
                       vals.data(), a.sum_gz[c], a.sum_gzt[c]);
      scatter_plane(go, code, g, gzfull.data() + (c - cb) * g.hw);
    }
    rows_dot_planes(gzfull.data(), rows.data(), s.p, g.hw, nc, a.a + cb * s.p);
  });
}

void check_stem(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "metaformer::", name, ": expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.size(0) > 0 && x.size(2) >= 2 && x.size(3) >= 2, "metaformer::", name,
              ": expected images [N, C, H, W] with N >= 1 and H, W >= 2, got ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxInChannels, "metaformer::", name, ": at most ", kMaxInChannels,
              " input channels (the stem of an image network), got ", x.size(1));
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(0) >= 1,
              "metaformer::", name, ": conv weight must be [O, ", x.size(1), ", 3, 3], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "metaformer::", name,
              ": float32 or float64 only, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "metaformer::", name, ": conv weight dtype ",
              weight.scalar_type(), " differs from the input's ", x.scalar_type());
}

void check_per_channel(const at::Tensor& t, const at::Tensor& weight, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == weight.size(0), "metaformer::conv3x3_bn_relu_pool: ", what,
              " must be [O=", weight.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "metaformer::conv3x3_bn_relu_pool: ", what, " dtype ",
              t.scalar_type(), " differs from the input's ", x.scalar_type());
}

// conv_bias takes no part: with batch statistics it cancels (its gradient, exact zeros, is the autograd
// formula's); it is an argument so that autograd sees it used.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv3x3_bn_relu_pool_cpu(
    const at::Tensor& input, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps) {
  check_stem(input, conv_weight, "conv3x3_bn_relu_pool");
  if (conv_bias.has_value() && conv_bias->defined()) check_per_channel(*conv_bias, conv_weight, input, "conv_bias");
  check_per_channel(bn_weight, conv_weight, input, "bn_weight");
  check_per_channel(bn_bias, conv_weight, input, "bn_bias");
  const at::Tensor x = input.contiguous(), w = conv_weight.contiguous();
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  const Stem s = stem_geometry(x, w);
  const Geometry& g = s.g;
  at::Tensor out = at::empty({g.n, g.c, g.ho, g.wo}, x.options());
  at::Tensor mean = at::empty({g.c}, x.options().dtype(at::kDouble));
  at::Tensor invstd = at::empty({g.c}, x.options().dtype(at::kDouble));
  at::Tensor code = at::empty({g.n, g.c, g.ho, g.wo}, x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_bn_relu_pool", [&] {
    std::vector<double> mu, cov;
    patch_statistics(x.data_ptr<scalar_t>(), s, mu, cov);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    std::vector<scalar_t> scale(g.c), offs(g.c);
    std::vector<char> finite(g.c);
    double* mean_p = mean.data_ptr<double>();
    double* invstd_p = invstd.data_ptr<double>();
    for (int64_t c = 0; c < g.c; ++c) {
      double mc = 0.0, var = 0.0;
      for (int64_t i = 0; i < s.p; ++i) {
        const double wi = static_cast<double>(wp[c * s.p + i]);
        mc += wi * mu[i];
        for (int64_t j = 0; j < s.p; ++j) var += wi * cov[i * s.p + j] * static_cast<double>(wp[c * s.p + j]);
      }
      const double inv = 1.0 / std::sqrt(std::max(var, 0.0) + eps);
      mean_p[c] = mc;
      invstd_p[c] = inv;
      const double k = static_cast<double>(gamma.data_ptr<scalar_t>()[c]) * inv;
      scale[c] = static_cast<scalar_t>(k);
      offs[c] = static_cast<scalar_t>(static_cast<double>(beta.data_ptr<scalar_t>()[c]) - mc * k);
      finite[c] = std::isfinite(mc) && std::isfinite(var) && std::isfinite(static_cast<double>(scale[c])) &&
                  std::isfinite(static_cast<double>(offs[c]));
    }
    const StemForwardArgs<scalar_t> args{s,           x.data_ptr<scalar_t>(), wp, scale.data(), offs.data(),
                                         finite.data(), out.data_ptr<scalar_t>(), code.data_ptr<int8_t>()};
    at::parallel_for(0, g.c, 1, [&](int64_t c0, int64_t c1) { stem_forward_channels(args, c0, c1); });
  });
  return {out, mean, invstd, code};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& conv_weight, const at::Tensor& bn_weight,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& code) {
  check_stem(input, conv_weight, "conv3x3_bn_relu_pool_backward");
  check_per_channel(bn_weight, conv_weight, input, "bn_weight");
  const at::Tensor x = input.contiguous(), w = conv_weight.contiguous(), gamma = bn_weight.contiguous();
  const Stem s = stem_geometry(x, w);
  const Geometry& g = s.g;
  TORCH_CHECK(grad_out.sizes() == code.sizes() && code.dim() == 4 && code.size(0) == g.n && code.size(1) == g.c &&
                  code.size(2) == g.ho && code.size(3) == g.wo,
              "metaformer::conv3x3_bn_relu_pool_backward: grad_out ", grad_out.sizes(), " and code ", code.sizes(),
              " must both be the pooled shape [", g.n, ", ", g.c, ", ", g.ho, ", ", g.wo, "]");
  TORCH_CHECK(mean.numel() == g.c && invstd.numel() == g.c && mean.scalar_type() == at::kDouble &&
                  invstd.scalar_type() == at::kDouble,
              "metaformer::conv3x3_bn_relu_pool_backward: mean and invstd must be the forward's float64 [O] outputs");
  const at::Tensor go = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous(), code_c = code.contiguous();
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_gamma = at::empty({g.c}, x.options());
  at::Tensor grad_beta = at::empty({g.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_bn_relu_pool_backward", [&] {
    std::vector<double> mu, cov;
    patch_statistics(x.data_ptr<scalar_t>(), s, mu, cov);
    std::vector<double> sum_gz(g.c, 0.0), sum_gzt(g.c, 0.0), acc(g.c * s.p, 0.0);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const StemBackwardArgs<scalar_t> args{s,
                                          go.data_ptr<scalar_t>(),
                                          x.data_ptr<scalar_t>(),
                                          wp,
                                          mean_c.data_ptr<double>(),
                                          code_c.data_ptr<int8_t>(),
                                          sum_gz.data(),
                                          sum_gzt.data(),
                                          acc.data()};
    at::parallel_for(0, g.c, 1, [&](int64_t c0, int64_t c1) { stem_backward_channels(args, c0, c1); });
    const double* inv = invstd_c.data_ptr<double>();
    const scalar_t* gm = gamma.data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      const double sgx = sum_gzt[c] * inv[c];
      grad_gamma.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sgx);
      grad_beta.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_gz[c]);
      const double k = static_cast<double>(gm[c]) * inv[c];
      for (int64_t i = 0; i < s.p; ++i) {
        double cw = 0.0;  // (C w_c)_i
        for (int64_t j = 0; j < s.p; ++j) cw += cov[i * s.p + j] * static_cast<double>(wp[c * s.p + j]);
        gw[c * s.p + i] = static_cast<scalar_t>(k * (acc[c * s.p + i] - sum_gz[c] * mu[i] - sgx * inv[c] * cw));
      }
    }
  });
  return {grad_w, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace metaformer

TORCH_LIBRARY_FRAGMENT(metaformer, m) {
  m.def(
      "conv3x3_bn_relu_pool(Tensor input, Tensor conv_weight, Tensor? conv_bias, Tensor bn_weight, Tensor bn_bias, "
      "float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv3x3_bn_relu_pool_backward(Tensor grad_out, Tensor input, Tensor conv_weight, Tensor bn_weight, "
      "Tensor mean, Tensor invstd, Tensor code) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metaformer, CPU, m) {
  m.impl("conv3x3_bn_relu_pool", &metaformer::conv3x3_bn_relu_pool_cpu);
  m.impl("conv3x3_bn_relu_pool_backward", &metaformer::conv3x3_bn_relu_pool_backward_cpu);
}

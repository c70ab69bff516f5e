// Plane-level pieces shared by the fused BatchNorm+ReLU+max-pool op (bn_relu_pool_cpu.cpp) and the fused
// Conv-4 stem (conv_bn_relu_pool_cpu.cpp): the 2x2 max-pool with its 1-byte argmax code, and the per-plane
// sums the backward passes start from. Each dispatches float32 to the kernel set simd::kernels() chose: AVX-512
// (bn_relu_pool_avx512.h), else AVX2 + FMA (bn_relu_pool_avx2.h), else the generic loops here.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bn_relu_pool_avx2.h"
#include "bn_relu_pool_avx512.h"

// The per-channel loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (the
// extension is built without -march, as torch is); elsewhere they are compiled once.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define METAFORMER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define METAFORMER_CLONES
#endif

namespace metaformer {
namespace planes {

struct Geometry {
  int64_t n, c, h, w, ho, wo, hw, howo;
};

inline Geometry geometry(const at::Tensor& y) {
  Geometry g{y.size(0), y.size(1), y.size(2), y.size(3), y.size(2) / 2, y.size(3) / 2, 0, 0};
  g.hw = g.h * g.w;
  g.howo = g.ho * g.wo;
  return g;
}

inline void check_input(const at::Tensor& y, const char* name) {
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

using simd::kLanes;

// s1 += Σ (p[k] - shift), s2 += Σ (p[k] - shift)^2 over one plane: kLanes lanes of scalar_t per block of
// simd::kBlock elements, widened into double lane totals; the vector kernels make the same operations.
template <typename scalar_t>
inline void plane_moments(const scalar_t* p, int64_t n, scalar_t shift, double& s1, double& s2) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) return simd::plane_moments_f32(p, n, shift, s1, s2);
    if (simd::avx2_selected()) return simd::avx2::plane_moments_f32(p, n, shift, s1, s2);
  }
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += simd::kBlock) {  // float lanes of at most kLaneTerms terms (see kBlock)
    const int64_t e = std::min(b + simd::kBlock, full);
    scalar_t a1[kLanes] = {}, a2[kLanes] = {};
    for (int64_t k = b; k < e; k += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const scalar_t d = p[k + l] - shift;
        a1[l] += d;
        a2[l] += d * d;
      }
    }
    simd::widen_lanes(a1, a2, d1, d2);
  }
  simd::finish_moments(d1, d2, p, full, n, shift, s1, s2);
}

// s1 += Σ u[k], s2 += Σ u[k] * (p[k] - shift) over n elements.
template <typename scalar_t>
inline void plane_dot(const scalar_t* u, const scalar_t* p, int64_t n, scalar_t shift, double& s1, double& s2) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) return simd::plane_dot_f32(u, p, n, shift, s1, s2);
    if (simd::avx2_selected()) return simd::avx2::plane_dot_f32(u, p, n, shift, s1, s2);
  }
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += simd::kBlock) {  // as in plane_moments
    const int64_t e = std::min(b + simd::kBlock, full);
    scalar_t a1[kLanes] = {}, a2[kLanes] = {};
    for (int64_t k = b; k < e; k += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        a1[l] += u[k + l];
        a2[l] += u[k + l] * (p[k + l] - shift);
      }
    }
    simd::widen_lanes(a1, a2, d1, d2);
  }
  simd::finish_dot(d1, d2, u, p, full, n, shift, s1, s2);
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

// s1 += Σ gz, s2 += Σ gz (full - shift) over one plane's pooled cells, gz = grad_out at the active argmaxes:
// the sums the backward and the double backward both start from. gz, vals: Ho*Wo scratch.
template <typename scalar_t>
inline void pooled_grad_sums(const scalar_t* grad_out, const int8_t* code, const scalar_t* full, const Geometry& g,
                             scalar_t shift, scalar_t* gz, scalar_t* vals, double& s1, double& s2) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::avx512_selected()) {
      simd::pooled_grad_sums_f32(grad_out, code, full, g.h, g.w, shift, s1, s2);
      return;
    }
    if (simd::avx2_selected() && g.wo >= simd::avx2::kMinBackwardCells) {
      simd::avx2::pooled_grad_sums_f32(grad_out, code, full, g.h, g.w, shift, gz, vals, s1, s2);
      return;
    }
  }
  gather_argmax(grad_out, code, full, g, gz, vals);
  plane_dot(gz, vals, g.howo, shift, s1, s2);
}

// Every pass below walks its channel block plane by plane in memory order (n outer, channel inner) and keeps
// per-channel sums: a channel-outer walk jumps C*H*W elements between planes, which defeats the hardware
// prefetcher (a [75, 64, 28, 28] forward took 7.5 ms that way, 1.5 ms in memory order, on the AMD EPYC
// of session 11). Each channel still adds its planes in the order n = 0, 1, ..., so the sums do not depend on
// the thread count.

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

// Pooled output and argmax code of one plane, z = y * scale + offs: the SIMD or the even-width kernel where
// the channel is finite, else the NaN-aware cell by cell rule. h, hb: H*W/2 + 1 scratch; code32: Ho*Wo scratch.
template <typename scalar_t>
inline void pool_plane(const scalar_t* plane, const Geometry& g, scalar_t scale, scalar_t offs, bool finite,
                       scalar_t* out, int8_t* code, scalar_t* h, int32_t* hb, int32_t* code32) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (finite && simd::avx512_selected()) {
      simd::pool_plane_f32(plane, g.h, g.w, scale, offs, out, code);
      return;
    }
    if (finite && simd::avx2_selected()) {
      simd::avx2::pool_plane_f32(plane, g.h, g.w, scale, offs, out, code);
      return;
    }
  }
  if (finite && g.w % 2 == 0) {
    pool_plane_even(plane, g, scale, offs, out, code, h, hb, code32);
    return;
  }
  for (int64_t i = 0; i < g.ho; ++i) {
    const scalar_t* r0 = plane + 2 * i * g.w;
    const scalar_t* r1 = r0 + g.w;
    for (int64_t j = 0; j < g.wo; ++j) {
      const scalar_t z[4] = {r0[2 * j] * scale + offs, r0[2 * j + 1] * scale + offs, r1[2 * j] * scale + offs,
                             r1[2 * j + 1] * scale + offs};
      pool_cell_careful(z, out[i * g.wo + j], code[i * g.wo + j]);
    }
  }
}

}  // namespace planes
}  // namespace metaformer

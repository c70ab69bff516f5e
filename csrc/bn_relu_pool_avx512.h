// AVX-512 float32 plane kernels of metaformer::bn_relu_pool (torch-free), and what all kernel sets share:
// the 16-lane reduction order and the run-time choice of a set (the AVX2 + FMA set: bn_relu_pool_avx2.h).
// The generic kernels (pool_planes.h, bn_relu_pool_cpu.cpp) spend most of their time in scalar per-cell code
// (a branch per pooled cell in the backward scatter, short rows); these work on a row of pooled cells at a
// time: 16 cells = 32 input columns per vector pair, deinterleaved into even and odd columns, with the window
// choice in mask registers. Same arithmetic as the generic kernels, in the same order except for
// pooled_grad_sums_f32 and the stem's two (tests hold all of them against the composite).
#pragma once

#include <cstdint>

namespace metaformer {
namespace simd {

// Lane count of the plane reductions (generic and AVX-512 alike): independent partial sums let the compiler
// vectorise a reduction it may not reorder itself (no -ffast-math); a plane's partial sums are then added in
// double by the functions below, which all kernel sets call so that they give the same bits.
constexpr int kLanes = 16;

// Terms a float lane of a plane reduction takes before it is widened into a double lane total and restarts
// from zero. A float accumulator's rounding error grows with the number of terms it has taken; over a whole
// plane a lane took H*W/16 of them (16k on a 512x512 plane), and the float32 forward drifted from torch's
// float32 error of ~1e-7 to 3e-6 (512x512) and 1e-5 (1024x1024) relative. 256 terms a lane keep every plane
// at the error of a 64x64 one. The widening is two conversions and two double adds per accumulator and block
// of 256 vector steps, which does not show in the timings; planes of up to kBlock elements (Conv-4's 28x28
// and 14x14 maps) are one block, and their sums keep the bits they had before the blocking.
constexpr int64_t kLaneTerms = 256;

// Elements of a plane reduced per block (kLanes lanes of kLaneTerms terms).
constexpr int64_t kBlock = kLanes * kLaneTerms;

// d1[l] += a1[l], d2[l] += a2[l], each widened to double: one block's float lanes into the plane's double lane
// totals (the vector kernels make the same adds lane for lane).
template <typename T>
inline void widen_lanes(const T* a1, const T* a2, double* d1, double* d2) {
  for (int l = 0; l < kLanes; ++l) {
    d1[l] += static_cast<double>(a1[l]);
    d2[l] += static_cast<double>(a2[l]);
  }
}

// s1 += Σ (p[k] - shift), s2 += Σ (p[k] - shift)^2, given the kLanes double lane totals d1, d2 of p[0 .. k0):
// lanes in order, then p[k0 .. n) in double.
template <typename T>
inline void finish_moments(const double* d1, const double* d2, const T* p, int64_t k0, int64_t n, T shift,
                           double& s1, double& s2) {
  double r1 = 0.0, r2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    r1 += d1[l];
    r2 += d2[l];
  }
  for (int64_t k = k0; k < n; ++k) {
    const double d = static_cast<double>(p[k]) - static_cast<double>(shift);
    r1 += d;
    r2 += d * d;
  }
  s1 += r1;
  s2 += r2;
}

// s1 += Σ u[k], s2 += Σ u[k] * (p[k] - shift), given the kLanes double lane totals of [0 .. k0), as finish_moments.
template <typename T>
inline void finish_dot(const double* d1, const double* d2, const T* u, const T* p, int64_t k0, int64_t n, T shift,
                       double& s1, double& s2) {
  double r1 = 0.0, r2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    r1 += d1[l];
    r2 += d2[l];
  }
  for (int64_t k = k0; k < n; ++k) {
    r1 += static_cast<double>(u[k]);
    r2 += static_cast<double>(u[k]) * (static_cast<double>(p[k]) - static_cast<double>(shift));
  }
  s1 += r1;
  s2 += r2;
}

// Calls f(k) for each element k of an [h, w] plane that lies in no 2x2 window (an odd last column, an odd last
// row): the vector kernels write only the windows' elements, these get their value from f.
template <typename F>
inline void for_unpooled_edges(int64_t h, int64_t w, F f) {
  if (w % 2 == 1) {
    for (int64_t r = 0; r < 2 * (h / 2); ++r) f(r * w + w - 1);
  }
  if (h % 2 == 1) {
    for (int64_t x = 0; x < w; ++x) f((h - 1) * w + x);
  }
}

// The float32 plane kernel sets, in order of preference: AVX-512 (F/BW/VL/DQ; this file), AVX2 + FMA
// (bn_relu_pool_avx2.h) and the generic loops of pool_planes.h (any CPU, float64 too).
enum class Kernels { generic = 0, avx2 = 1, avx512 = 2 };

// The set this process runs, chosen once (simd_select.cpp): the best the CPU has, or METAFORMER_SIMD's
// choice ("0" = generic, "avx2", "avx512"; one the CPU lacks falls back to the best it has, with a warning).
Kernels kernels();

// "avx512", "avx2" or "generic": what the cpu_kernels() op reports.
const char* kernels_name(Kernels k);

// Whether the float32 kernels are this file's (the dispatchers test this, then avx2_selected()).
inline bool avx512_selected() { return kernels() == Kernels::avx512; }

// Whether the float32 kernels are the AVX2 + FMA ones of bn_relu_pool_avx2.h.
inline bool avx2_selected() { return kernels() == Kernels::avx2; }

// s1 += Σ (p[k] - shift), s2 += Σ (p[k] - shift)^2 over n floats: 16 float lanes per block of kBlock, widened
// into double lanes, then double (the generic plane_moments' exact order, so both give the same bits).
void plane_moments_f32(const float* p, int64_t n, float shift, double& s1, double& s2);

// s1 += Σ u[k], s2 += Σ u[k] * (p[k] - shift) over n floats, in the generic plane_dot's order.
void plane_dot_f32(const float* u, const float* p, int64_t n, float shift, double& s1, double& s2);

// Pooled output and 1-byte argmax code of one [h, w] plane of finite values: z = y * scale + offs, out =
// max(0, first maximum of each 2x2 window in row-major order), code = its window position or -1 where out is 0.
void pool_plane_f32(const float* plane, int64_t h, int64_t w, float scale, float offs, float* out, int8_t* code);

// s1 += Σ gz, s2 += Σ gz * (full at the argmax - shift) over one plane's pooled cells, gz = grad_out where the
// cell is active (code >= 0), else 0. Float lanes for kLaneTerms row chunks at a time, then double, but lanes per
// row chunk and a tree sum of them, not the generic code's flat order: its sums, hence every backward output,
// differ from the generic ones in the last bits (the AVX2 version gathers first and matches them exactly).
void pooled_grad_sums_f32(const float* grad_out, const int8_t* code, const float* full, int64_t h, int64_t w,
                          float shift, double& s1, double& s2);

// grad_y of one plane: e0 - y * e1 everywhere, plus k * grad_out at each active argmax.
void write_grad_plane_f32(const float* y, const float* grad_out, const int8_t* code, int64_t h, int64_t w, float e0,
                          float e1, float k, float* grad_y);

// The conv stem (conv_bn_relu_pool_cpu.cpp), nc <= kStemBlock output channels at a time, p patch rows of hw:
// t[c*hw + k] = Σ_i w[c*p + i] rows[i*hw + k] (i in order, fused multiply-adds: unlike the other kernels
// here, not bit-identical to the generic code).
constexpr int64_t kStemBlock = 4;  // register-resident rows for one input channel (p = 9); others loop
void conv_planes_f32(const float* rows, const float* w, int64_t p, int64_t hw, int64_t nc, float* t);

// acc[c*p + i] += Σ_k u[c*hw + k] rows[i*hw + k]: float lanes over blocks of kBlock positions, then double.
void rows_dot_planes_f32(const float* u, const float* rows, int64_t p, int64_t hw, int64_t nc, double* acc);

// out = grad_out at each active cell's argmax, 0 everywhere else, on one [h, w] plane.
void scatter_plane_f32(const float* grad_out, const int8_t* code, int64_t h, int64_t w, float* out);

}  // namespace simd
}  // namespace metaformer

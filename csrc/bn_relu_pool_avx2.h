// AVX2 + FMA float32 plane kernels of metaformer::bn_relu_pool (torch-free): the AVX-512 kernels of
// bn_relu_pool_avx512.h for CPUs without AVX-512 (AMD Zen 1-3, most Intel client CPUs). 8 pooled cells =
// 16 input columns per vector pair; no mask registers, so window choices are compare results (all-ones
// lanes) used by blends, and row ends use maskload/maskstore. Bit-identical to the generic kernels: the
// 16-lane partial sums (kLanes) are two 8-lane accumulators, lanes 0-7 and 8-15, widened into double per
// block of kBlock and reduced by the same finish_moments / finish_dot code; pooled_grad_sums gathers into the
// same scratch rows and reduces them in the same order.
// Only the stem's conv_planes_f32 / rows_dot_planes_f32 use fused multiply-adds, as on AVX-512.
#pragma once

#include <cstdint>

#include "bn_relu_pool_avx512.h"

namespace metaformer {
namespace simd {
namespace avx2 {

// The backward kernels (pooled_grad_sums_f32, write_grad_plane_f32, scatter_plane_f32) are used for rows of at
// least this many pooled cells; shorter rows run the generic loops, which give the same bits. A row of 3-4
// cells is one mostly empty vector plus its shuffles: on 7x7 planes the generic loops took a third of the
// time (0.06 against 0.20 ms for 4800 planes, write_grad), from 5 cells on (10x10) the vectors win.
constexpr int64_t kMinBackwardCells = 5;

// s1 += Σ (p[k] - shift), s2 += Σ (p[k] - shift)^2 over n floats, in the generic plane_moments' order.
void plane_moments_f32(const float* p, int64_t n, float shift, double& s1, double& s2);

// s1 += Σ u[k], s2 += Σ u[k] * (p[k] - shift) over n floats, in the generic plane_dot's order.
void plane_dot_f32(const float* u, const float* p, int64_t n, float shift, double& s1, double& s2);

// Pooled output and argmax code of one [h, w] plane of finite values, as simd::pool_plane_f32.
void pool_plane_f32(const float* plane, int64_t h, int64_t w, float scale, float offs, float* out, int8_t* code);

// s1 += Σ gz, s2 += Σ gz * (full at the argmax - shift) over one plane's pooled cells, as the generic
// pooled_grad_sums: gz and vals (Ho*Wo floats of scratch each) receive the gathered cells, then plane_dot_f32.
void pooled_grad_sums_f32(const float* grad_out, const int8_t* code, const float* full, int64_t h, int64_t w,
                          float shift, float* gz, float* vals, double& s1, double& s2);

// grad_y of one plane: e0 - y * e1 everywhere, plus k * grad_out at each active argmax.
void write_grad_plane_f32(const float* y, const float* grad_out, const int8_t* code, int64_t h, int64_t w, float e0,
                          float e1, float k, float* grad_y);

// The stem's conv planes, as simd::conv_planes_f32 (fused multiply-adds: not bit-identical to the generic code).
void conv_planes_f32(const float* rows, const float* w, int64_t p, int64_t hw, int64_t nc, float* t);

// acc[c*p + i] += Σ_k u[c*hw + k] rows[i*hw + k], as simd::rows_dot_planes_f32 (fused multiply-adds).
void rows_dot_planes_f32(const float* u, const float* rows, int64_t p, int64_t hw, int64_t nc, double* acc);

// out = grad_out at each active cell's argmax, 0 everywhere else, on one [h, w] plane.
void scatter_plane_f32(const float* grad_out, const int8_t* code, int64_t h, int64_t w, float* out);

}  // namespace avx2
}  // namespace simd
}  // namespace metaformer

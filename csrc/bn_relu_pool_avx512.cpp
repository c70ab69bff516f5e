// AVX-512 float32 plane kernels of metaformer::bn_relu_pool; see bn_relu_pool_avx512.h. Each function carries
// its own target attribute (the extension is built without -march, as torch is) and runs only where
// kernels() chose AVX-512.
#include "bn_relu_pool_avx512.h"

#include <cstdlib>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define METAFORMER_HAVE_AVX512_KERNELS 1
#define METAFORMER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

namespace metaformer {
namespace simd {

#ifdef METAFORMER_HAVE_AVX512_KERNELS

namespace {

METAFORMER_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
}

// Pooled cells j0 .. j0+cnt-1 of a row cover input columns 2*j0 .. 2*j0+2*cnt-1: two masked loads, split
// into even (left of each window) and odd (right) columns.
// `room`: floats readable from `row` on (the rest of its plane). Where 32 fit, plain loads: masked loads are
// several times slower on some CPUs (measured on this AMD EPYC), and lanes past cnt are never used unmasked.
METAFORMER_AVX512 inline void load_pairs(const float* row, int64_t cnt, int64_t room, __m512& even, __m512& odd) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 lo, hi;
  if (room >= 32) {
    lo = _mm512_loadu_ps(row);
    hi = _mm512_loadu_ps(row + 16);
  } else {
    lo = _mm512_maskz_loadu_ps(first_lanes(2 * cnt), row);
    hi = _mm512_maskz_loadu_ps(first_lanes(2 * cnt - 16), row + 16);
  }
  even = _mm512_permutex2var_ps(lo, ie, hi);
  odd = _mm512_permutex2var_ps(lo, io, hi);
}

// The inverse of load_pairs: even/odd lanes back to natural column order (lo = columns 0-15, hi = 16-31).
METAFORMER_AVX512 inline void interleave(__m512 even, __m512 odd, __m512& lo, __m512& hi) {
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  lo = _mm512_permutex2var_ps(even, il, odd);
  hi = _mm512_permutex2var_ps(even, ih, odd);
}

METAFORMER_AVX512 inline void interleave_masks(__mmask16 even, __mmask16 odd, __mmask16& lo, __mmask16& hi) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512 fl, fh;
  interleave(_mm512_castsi512_ps(_mm512_maskz_mov_epi32(even, one)), _mm512_castsi512_ps(_mm512_maskz_mov_epi32(odd, one)),
             fl, fh);
  lo = _mm512_test_epi32_mask(_mm512_castps_si512(fl), one);
  hi = _mm512_test_epi32_mask(_mm512_castps_si512(fh), one);
}

// The 2x2 windows of pooled cells j0 .. j0+cnt-1 of pooled row i of an [h, w] plane, position by position
// (z[0] top-left, z[1] top-right, z[2] bottom-left, z[3] bottom-right).
METAFORMER_AVX512 inline void load_windows(const float* plane, int64_t h, int64_t w, int64_t i, int64_t j0,
                                           int64_t cnt, __m512 z[4]) {
  const int64_t top = 2 * i * w + 2 * j0, bottom = top + w;
  load_pairs(plane + top, cnt, h * w - top, z[0], z[1]);
  load_pairs(plane + bottom, cnt, h * w - bottom, z[2], z[3]);
}

// Codes of cells j0 .. j0+cnt-1 as int32 lanes; lanes past cnt read as -1 (inactive).
METAFORMER_AVX512 inline __m512i load_codes(const int8_t* code, int64_t cnt, int64_t room) {
  const __mmask16 m = first_lanes(cnt);
  const __m128i bytes = room >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(code)) : _mm_maskz_loadu_epi8(m, code);
  return _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), m, _mm512_cvtepi8_epi32(bytes));
}

// cnt floats at p (room readable): the rest of the lanes zero.
METAFORMER_AVX512 inline __m512 load_cells(const float* p, int64_t cnt, int64_t room) {
  return room >= 16 ? _mm512_maskz_mov_ps(first_lanes(cnt), _mm512_loadu_ps(p)) : _mm512_maskz_loadu_ps(first_lanes(cnt), p);
}

// Cells j0 .. j0+cnt-1 of a row (cell = i*wo + j0 of `cells` in the plane): their grad_out (0 past cnt) and
// one mask per window position of their argmax code.
METAFORMER_AVX512 inline __m512 load_cell_chunk(const int8_t* code, const float* grad_out, int64_t cell, int64_t cnt,
                                               int64_t cells, __mmask16 at[4]) {
  const __m512i q = load_codes(code + cell, cnt, cells - cell);
  for (int pos = 0; pos < 4; ++pos) at[pos] = _mm512_cmpeq_epi32_mask(q, _mm512_set1_epi32(pos));
  return load_cells(grad_out + cell, cnt, cells - cell);
}

METAFORMER_AVX512 inline double reduce_double(__m512 v) {
  const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(a, b));
}

// d[l] += lane l of v widened, l = 0 .. 15: the generic widen_lanes' adds, lane for lane. Through memory: it
// runs once a block, and the accumulators stay free to take registers in the loops.
METAFORMER_AVX512 inline void widen_into(__m512 v, double* d) {
  const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), a));
  _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), b));
}

// min(b + kBlock, end): where the block of a reduction over [.., end) that starts at b ends.
inline int64_t block_end(int64_t b, int64_t end) { return end - b < kBlock ? end : b + kBlock; }

}  // namespace

METAFORMER_AVX512 void plane_moments_f32(const float* p, int64_t n, float shift, double& s1, double& s2) {
  const __m512 vshift = _mm512_set1_ps(shift);
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += kBlock) {  // the generic kernel's blocks (see kLaneTerms)
    const int64_t e = block_end(b, full);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t k = b; k < e; k += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + k), vshift);
      a1 = _mm512_add_ps(a1, d);
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(d, d));
    }
    widen_into(a1, d1);
    widen_into(a2, d2);
  }
  finish_moments(d1, d2, p, full, n, shift, s1, s2);  // the generic kernel's reduction order
}

METAFORMER_AVX512 void plane_dot_f32(const float* u, const float* p, int64_t n, float shift, double& s1, double& s2) {
  const __m512 vshift = _mm512_set1_ps(shift);
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += kBlock) {
    const int64_t e = block_end(b, full);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t k = b; k < e; k += 16) {
      const __m512 vu = _mm512_loadu_ps(u + k);
      a1 = _mm512_add_ps(a1, vu);
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(vu, _mm512_sub_ps(_mm512_loadu_ps(p + k), vshift)));
    }
    widen_into(a1, d1);
    widen_into(a2, d2);
  }
  finish_dot(d1, d2, u, p, full, n, shift, s1, s2);  // the generic kernel's reduction order
}

METAFORMER_AVX512 void pool_plane_f32(const float* plane, int64_t h, int64_t w, float scale, float offs, float* out,
                                      int8_t* code) {
  const int64_t ho = h / 2, wo = w / 2;
  const __m512 vs = _mm512_set1_ps(scale), vo = _mm512_set1_ps(offs), zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2), minus_one = _mm512_set1_epi32(-1);
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 16) {
      const int64_t cnt = wo - j0 < 16 ? wo - j0 : 16;
      __m512 z[4];
      load_windows(plane, h, w, i, j0, cnt, z);
      // y * scale + offs as two roundings, like the generic kernel (no FMA: -ffp-contract=off there)
      const __m512 z00 = _mm512_add_ps(_mm512_mul_ps(z[0], vs), vo);
      const __m512 z01 = _mm512_add_ps(_mm512_mul_ps(z[1], vs), vo);
      const __m512 z10 = _mm512_add_ps(_mm512_mul_ps(z[2], vs), vo);
      const __m512 z11 = _mm512_add_ps(_mm512_mul_ps(z[3], vs), vo);
      // first maximum in row-major window order: right only if strictly greater, bottom likewise
      const __mmask16 right0 = _mm512_cmp_ps_mask(z01, z00, _CMP_GT_OQ);
      const __mmask16 right1 = _mm512_cmp_ps_mask(z11, z10, _CMP_GT_OQ);
      const __m512 top = _mm512_mask_blend_ps(right0, z00, z01);
      const __m512 bot = _mm512_mask_blend_ps(right1, z10, z11);
      const __mmask16 bottom = _mm512_cmp_ps_mask(bot, top, _CMP_GT_OQ);
      const __m512 best = _mm512_mask_blend_ps(bottom, top, bot);
      const __m512i at_top = _mm512_maskz_mov_epi32(right0, one);
      const __m512i at_bot = _mm512_add_epi32(two, _mm512_maskz_mov_epi32(right1, one));
      const __m512i at = _mm512_mask_blend_epi32(bottom, at_top, at_bot);
      const __mmask16 keep = _mm512_cmp_ps_mask(best, zero, _CMP_GT_OQ);
      const __mmask16 m = first_lanes(cnt);
      _mm512_mask_storeu_ps(out + i * wo + j0, m, _mm512_maskz_mov_ps(keep, best));
      _mm512_mask_cvtepi32_storeu_epi8(code + i * wo + j0, m, _mm512_mask_blend_epi32(keep, minus_one, at));
    }
  }
}

METAFORMER_AVX512 void pooled_grad_sums_f32(const float* grad_out, const int8_t* code, const float* full, int64_t h,
                                            int64_t w, float shift, double& s1, double& s2) {
  const int64_t ho = h / 2, wo = w / 2;
  const __m512 vshift = _mm512_set1_ps(shift);
  __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  alignas(64) double d1[kLanes] = {}, d2[kLanes] = {};
  int64_t chunks = 0;  // row chunks in a1, a2: at most kLaneTerms terms a lane, as in plane_dot
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 16) {
      const int64_t cnt = wo - j0 < 16 ? wo - j0 : 16;
      __mmask16 at[4];
      const __m512 go = load_cell_chunk(code, grad_out, i * wo + j0, cnt, ho * wo, at);
      const __m512 gz = _mm512_maskz_mov_ps(at[0] | at[1] | at[2] | at[3], go);  // 0 where the cell is inactive
      __m512 z[4];
      load_windows(full, h, w, i, j0, cnt, z);
      // the value at the argmax; inactive cells read position 3 (q & 3 of -1), as the generic gather does
      __m512 v = z[3];
      v = _mm512_mask_mov_ps(v, at[2], z[2]);
      v = _mm512_mask_mov_ps(v, at[1], z[1]);
      v = _mm512_mask_mov_ps(v, at[0], z[0]);
      v = _mm512_maskz_mov_ps(first_lanes(cnt), v);  // lanes past cnt hold the next row: make them add exact zeros
      a1 = _mm512_add_ps(a1, gz);
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(gz, _mm512_sub_ps(v, vshift)));
      if (++chunks == kLaneTerms) {
        widen_into(a1, d1);
        widen_into(a2, d2);
        a1 = a2 = _mm512_setzero_ps();
        chunks = 0;
      }
    }
  }
  widen_into(a1, d1);
  widen_into(a2, d2);
  // a plane of one block gives reduce_double(a1)'s bits, as before the blocking
  s1 += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_load_pd(d1), _mm512_load_pd(d1 + 8)));
  s2 += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_load_pd(d2), _mm512_load_pd(d2 + 8)));
}

METAFORMER_AVX512 void write_grad_plane_f32(const float* y, const float* grad_out, const int8_t* code, int64_t h,
                                            int64_t w, float e0, float e1, float k, float* grad_y) {
  const int64_t ho = h / 2, wo = w / 2;
  const __m512 ve0 = _mm512_set1_ps(e0), ve1 = _mm512_set1_ps(e1), vk = _mm512_set1_ps(k);
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 16) {
      const int64_t cnt = wo - j0 < 16 ? wo - j0 : 16;
      __mmask16 at[4];
      const __m512 kg = _mm512_mul_ps(vk, load_cell_chunk(code, grad_out, i * wo + j0, cnt, ho * wo, at));
      for (int r = 0; r < 2; ++r) {
        const int64_t base = (2 * i + r) * w + 2 * j0;
        __m512 add_lo, add_hi;
        interleave(_mm512_maskz_mov_ps(at[2 * r], kg), _mm512_maskz_mov_ps(at[2 * r + 1], kg), add_lo, add_hi);
        __mmask16 has_lo, has_hi;
        interleave_masks(at[2 * r], at[2 * r + 1], has_lo, has_hi);
        const __mmask16 m_lo = first_lanes(2 * cnt), m_hi = first_lanes(2 * cnt - 16);
        const bool room = h * w - base >= 32;
        const __m512 y_lo = room ? _mm512_loadu_ps(y + base) : _mm512_maskz_loadu_ps(m_lo, y + base);
        const __m512 y_hi = room ? _mm512_loadu_ps(y + base + 16) : _mm512_maskz_loadu_ps(m_hi, y + base + 16);
        __m512 g_lo = _mm512_sub_ps(ve0, _mm512_mul_ps(y_lo, ve1));
        __m512 g_hi = _mm512_sub_ps(ve0, _mm512_mul_ps(y_hi, ve1));
        // only where a cell's argmax lies, so every other element is exactly e0 - y * e1
        g_lo = _mm512_mask_add_ps(g_lo, has_lo, g_lo, add_lo);
        g_hi = _mm512_mask_add_ps(g_hi, has_hi, g_hi, add_hi);
        _mm512_mask_storeu_ps(grad_y + base, m_lo, g_lo);
        _mm512_mask_storeu_ps(grad_y + base + 16, m_hi, g_hi);
      }
    }
  }
  // an odd last column and an odd last row belong to no window: e0 - y * e1 only
  for_unpooled_edges(h, w, [&](int64_t idx) { grad_y[idx] = e0 - y[idx] * e1; });
}

// The rows of one image stay in registers for a chunk of 16 positions while several output channels use
// them: one load per row and chunk instead of one per row, chunk and channel (the per-channel loop waited on
// L2: 9 rows of 784 floats do not stay in a 32 KiB L1 next to everything else). Compile-time sizes keep the
// rows and accumulators in registers. Fused multiply-adds, as oneDNN's convolution uses; the generic code
// rounds twice (the two differ in the last bits).
// Positions k .. k+15 (masked by m) of the P patch rows of length hw, one vector per row.
template <int P>
METAFORMER_AVX512 inline void load_rows(const float* rows, int64_t hw, int64_t k, __mmask16 m, __m512 r[P]) {
  #pragma GCC unroll 16
  for (int i = 0; i < P; ++i) r[i] = _mm512_maskz_loadu_ps(m, rows + i * hw + k);
}

template <int P, int NC>
METAFORMER_AVX512 inline void conv_block(const float* rows, const float* w, int64_t hw, float* t) {
  for (int64_t k = 0; k < hw; k += 16) {
    const __mmask16 m = first_lanes(hw - k);
    __m512 r[P];
    load_rows<P>(rows, hw, k, m, r);
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      __m512 acc = _mm512_mul_ps(_mm512_set1_ps(w[c * P]), r[0]);
      #pragma GCC unroll 16
      for (int i = 1; i < P; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(w[c * P + i]), r[i], acc);
      _mm512_mask_storeu_ps(t + c * hw + k, m, acc);
    }
  }
}

// Blocks of kBlock positions, each lane's kLaneTerms products then added into acc in double (see kLaneTerms).
template <int P, int NC>
METAFORMER_AVX512 inline void dot_block(const float* u, const float* rows, int64_t hw, double* acc) {
  for (int64_t b = 0; b < hw; b += kBlock) {
    const int64_t e = block_end(b, hw);
    __m512 a[NC][P];
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      #pragma GCC unroll 16
      for (int i = 0; i < P; ++i) a[c][i] = _mm512_setzero_ps();
    }
    for (int64_t k = b; k < e; k += 16) {
      const __mmask16 m = first_lanes(e - k);
      __m512 r[P];
      load_rows<P>(rows, hw, k, m, r);
      #pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        const __m512 vu = _mm512_maskz_loadu_ps(m, u + c * hw + k);
        #pragma GCC unroll 16
        for (int i = 0; i < P; ++i) a[c][i] = _mm512_fmadd_ps(vu, r[i], a[c][i]);
      }
    }
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      #pragma GCC unroll 16
      for (int i = 0; i < P; ++i) acc[c * P + i] += reduce_double(a[c][i]);
    }
  }
}

METAFORMER_AVX512 void conv_planes_f32(const float* rows, const float* w, int64_t p, int64_t hw, int64_t nc, float* t) {
  int64_t c = 0;
  if (p == 9) {
    for (; c + 4 <= nc; c += 4) conv_block<9, 4>(rows, w + c * p, hw, t + c * hw);
    for (; c < nc; ++c) conv_block<9, 1>(rows, w + c * p, hw, t + c * hw);
    return;
  }
  for (; c < nc; ++c) {
    for (int64_t k = 0; k < hw; k += 16) {
      const __mmask16 m = first_lanes(hw - k);
      __m512 acc = _mm512_mul_ps(_mm512_set1_ps(w[c * p]), _mm512_maskz_loadu_ps(m, rows + k));
      for (int64_t i = 1; i < p; ++i) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(w[c * p + i]), _mm512_maskz_loadu_ps(m, rows + i * hw + k), acc);
      }
      _mm512_mask_storeu_ps(t + c * hw + k, m, acc);
    }
  }
}

METAFORMER_AVX512 void rows_dot_planes_f32(const float* u, const float* rows, int64_t p, int64_t hw, int64_t nc,
                                           double* acc) {
  int64_t c = 0;
  if (p == 9) {
    for (; c + 2 <= nc; c += 2) dot_block<9, 2>(u + c * hw, rows, hw, acc + c * p);
    for (; c < nc; ++c) dot_block<9, 1>(u + c * hw, rows, hw, acc + c * p);
    return;
  }
  for (; c < nc; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t b = 0; b < hw; b += kBlock) {  // as dot_block
        const int64_t e = block_end(b, hw);
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = b; k < e; k += 16) {
          const __mmask16 m = first_lanes(e - k);
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, u + c * hw + k), _mm512_maskz_loadu_ps(m, rows + i * hw + k),
                              a);
        }
        acc[c * p + i] += reduce_double(a);
      }
    }
  }
}

METAFORMER_AVX512 void scatter_plane_f32(const float* grad_out, const int8_t* code, int64_t h, int64_t w, float* out) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 16) {
      const int64_t cnt = wo - j0 < 16 ? wo - j0 : 16;
      __mmask16 at[4];
      const __m512 go = load_cell_chunk(code, grad_out, i * wo + j0, cnt, ho * wo, at);
      const __mmask16 m_lo = first_lanes(2 * cnt), m_hi = first_lanes(2 * cnt - 16);
      for (int r = 0; r < 2; ++r) {
        __m512 lo, hi;
        interleave(_mm512_maskz_mov_ps(at[2 * r], go), _mm512_maskz_mov_ps(at[2 * r + 1], go), lo, hi);
        float* row = out + (2 * i + r) * w + 2 * j0;
        _mm512_mask_storeu_ps(row, m_lo, lo);
        _mm512_mask_storeu_ps(row + 16, m_hi, hi);
      }
    }
  }
  for_unpooled_edges(h, w, [&](int64_t idx) { out[idx] = 0.0f; });
}

#else  // no AVX-512 kernels on this compiler / architecture: the generic kernels run everywhere

void plane_moments_f32(const float*, int64_t, float, double&, double&) { std::abort(); }
void plane_dot_f32(const float*, const float*, int64_t, float, double&, double&) { std::abort(); }
void conv_planes_f32(const float*, const float*, int64_t, int64_t, int64_t, float*) { std::abort(); }
void rows_dot_planes_f32(const float*, const float*, int64_t, int64_t, int64_t, double*) { std::abort(); }
void scatter_plane_f32(const float*, const int8_t*, int64_t, int64_t, float*) { std::abort(); }
void pool_plane_f32(const float*, int64_t, int64_t, float, float, float*, int8_t*) { std::abort(); }
void pooled_grad_sums_f32(const float*, const int8_t*, const float*, int64_t, int64_t, float, double&, double&) {
  std::abort();
}
void write_grad_plane_f32(const float*, const float*, const int8_t*, int64_t, int64_t, float, float, float, float*) {
  std::abort();
}

#endif

}  // namespace simd
}  // namespace metaformer

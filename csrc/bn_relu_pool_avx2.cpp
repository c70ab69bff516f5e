// AVX2 + FMA float32 plane kernels of metaformer::bn_relu_pool; see bn_relu_pool_avx2.h. Each function carries
// its own target attribute (the extension is built without -march, as torch is) and runs only where kernels()
// chose AVX2. Products and sums are separate instructions except in the stem's two kernels (the build has
// -ffp-contract=off, so the compiler does not fuse them either): that keeps the other kernels bit-identical to
// the generic loops.
#include "bn_relu_pool_avx2.h"

#include <cstdlib>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define METAFORMER_HAVE_AVX2_KERNELS 1
#define METAFORMER_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace metaformer {
namespace simd {
namespace avx2 {

#ifdef METAFORMER_HAVE_AVX2_KERNELS

namespace {

// All-ones int32 lanes 0 .. n-1 (n clamped to 0 .. 8): the masks of maskload / maskstore and of blends.
METAFORMER_AVX2 inline __m256i first_lanes(int64_t n) {
  const int c = n <= 0 ? 0 : (n >= 8 ? 8 : static_cast<int>(n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first cnt floats of v to p, `room` floats of the caller's plane (or scratch) being writable from p on.
// Where 8 fit, a full store: the lanes past cnt land on cells or columns of the same plane that the caller
// writes again later (the next row, the odd last column or row), so only a plane's end needs care. There a
// scalar copy. A first version stored every partial vector with vmaskmovps (and row tails of codes with
// memcpy); Conv-4's 14x14 and 7x7 maps end in one on nearly every row, and this one took the 28x28 / 14x14
// forward from 1.35 / 0.51 to 1.04 / 0.36 ms (bench_block_ops.py, one run each on a busy machine).
METAFORMER_AVX2 inline void store_first(float* p, __m256 v, int64_t cnt, int64_t room) {
  if (cnt <= 0) return;
  if (room >= 8) {
    _mm256_storeu_ps(p, v);
    return;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int64_t l = 0; l < cnt; ++l) p[l] = lanes[l];
}

// Pooled cells j0 .. j0+cnt-1 of a row cover input columns 2*j0 .. 2*j0+2*cnt-1: two loads, split into even
// (left of each window) and odd (right) columns. `room`: floats readable from `row` on (the rest of its
// plane). Where 16 fit, plain loads (lanes past cnt are never stored); masked loads only at a plane's end.
METAFORMER_AVX2 inline void load_pairs(const float* row, int64_t cnt, int64_t room, __m256& even, __m256& odd) {
  __m256 lo, hi;
  if (room >= 16) {
    lo = _mm256_loadu_ps(row);
    hi = _mm256_loadu_ps(row + 8);
  } else {
    lo = _mm256_maskload_ps(row, first_lanes(2 * cnt));
    hi = _mm256_maskload_ps(row + 8, first_lanes(2 * cnt - 8));
  }
  // per 128-bit half: (lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6); the 64-bit permute puts the halves in column order
  const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

// The inverse of load_pairs: even/odd lanes back to column order (lo = columns 0-7, hi = 8-15). Also used
// on compare masks, whose lanes are bit patterns moved unchanged.
METAFORMER_AVX2 inline void interleave(__m256 even, __m256 odd, __m256& lo, __m256& hi) {
  const __m256 ul = _mm256_unpacklo_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5
  const __m256 uh = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
  lo = _mm256_permute2f128_ps(ul, uh, 0x20);
  hi = _mm256_permute2f128_ps(ul, uh, 0x31);
}

// The 2x2 windows of pooled cells j0 .. j0+cnt-1 of pooled row i of an [h, w] plane, position by position
// (z[0] top-left, z[1] top-right, z[2] bottom-left, z[3] bottom-right).
METAFORMER_AVX2 inline void load_windows(const float* plane, int64_t h, int64_t w, int64_t i, int64_t j0,
                                         int64_t cnt, __m256 z[4]) {
  const int64_t top = 2 * i * w + 2 * j0, bottom = top + w;
  load_pairs(plane + top, cnt, h * w - top, z[0], z[1]);
  load_pairs(plane + bottom, cnt, h * w - bottom, z[2], z[3]);
}

// Codes of cells j0 .. j0+cnt-1 as int32 lanes; lanes past cnt read as -1 (inactive).
METAFORMER_AVX2 inline __m256i load_codes(const int8_t* code, int64_t cnt, int64_t room) {
  __m128i bytes;
  if (room >= 8) {
    bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(code));
  } else {
    uint64_t tail = ~uint64_t{0};  // lanes past cnt: -1
    for (int64_t l = 0; l < cnt; ++l) {
      tail = (tail & ~(uint64_t{0xFF} << (8 * l))) | (uint64_t{static_cast<uint8_t>(code[l])} << (8 * l));
    }
    bytes = _mm_cvtsi64_si128(static_cast<int64_t>(tail));
  }
  return _mm256_blendv_epi8(_mm256_set1_epi32(-1), _mm256_cvtepi8_epi32(bytes), first_lanes(cnt));
}

// grad_out of cells j0 .. j0+cnt-1 of a row (cell = i*wo + j0 of `cells` in the plane), 0 past cnt.
METAFORMER_AVX2 inline __m256 load_cells(const float* grad_out, int64_t cell, int64_t cnt, int64_t cells) {
  const __m256i m = first_lanes(cnt);
  if (cells - cell >= 8) return _mm256_and_ps(_mm256_loadu_ps(grad_out + cell), _mm256_castsi256_ps(m));
  return _mm256_maskload_ps(grad_out + cell, m);
}

// All-ones where the argmax code q is window position pos. Computed where used, not kept in an array indexed
// by the row: that array lived on the stack, and reloading it cost scatter_plane_f32 a sixth of its time.
METAFORMER_AVX2 inline __m256 at_position(__m256i q, int pos) {
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_set1_epi32(pos)));
}

// The 8 lanes widened to double and added (the stem's reductions, which need not match the generic order).
METAFORMER_AVX2 inline double reduce_double(__m256 v) {
  const __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// d[l] += lane l of the generic kernels' 16 partial sums widened, from their two halves lo (lanes 0-7) and hi
// (8-15): the generic widen_lanes' adds, lane for lane.
METAFORMER_AVX2 inline void widen_into(__m256 lo, __m256 hi, double* d) {
  const __m256 half[2] = {lo, hi};
  for (int j = 0; j < 2; ++j) {
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(half[j]));
    const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(half[j], 1));
    _mm256_storeu_pd(d + 8 * j, _mm256_add_pd(_mm256_loadu_pd(d + 8 * j), a));
    _mm256_storeu_pd(d + 8 * j + 4, _mm256_add_pd(_mm256_loadu_pd(d + 8 * j + 4), b));
  }
}

// min(b + blk, end): where the block of blk elements of a reduction over [.., end) that starts at b ends.
inline int64_t block_end(int64_t b, int64_t blk, int64_t end) { return end - b < blk ? end : b + blk; }

}  // namespace

METAFORMER_AVX2 void plane_moments_f32(const float* p, int64_t n, float shift, double& s1, double& s2) {
  const __m256 vshift = _mm256_set1_ps(shift);
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += kBlock) {  // the generic kernel's blocks (see kLaneTerms)
    const int64_t e = block_end(b, kBlock, full);
    __m256 a1l = _mm256_setzero_ps(), a1h = _mm256_setzero_ps(), a2l = _mm256_setzero_ps(), a2h = _mm256_setzero_ps();
    for (int64_t k = b; k < e; k += kLanes) {
      const __m256 dl = _mm256_sub_ps(_mm256_loadu_ps(p + k), vshift);
      const __m256 dh = _mm256_sub_ps(_mm256_loadu_ps(p + k + 8), vshift);
      a1l = _mm256_add_ps(a1l, dl);
      a1h = _mm256_add_ps(a1h, dh);
      a2l = _mm256_add_ps(a2l, _mm256_mul_ps(dl, dl));
      a2h = _mm256_add_ps(a2h, _mm256_mul_ps(dh, dh));
    }
    widen_into(a1l, a1h, d1);
    widen_into(a2l, a2h, d2);
  }
  finish_moments(d1, d2, p, full, n, shift, s1, s2);  // the generic kernel's reduction order
}

METAFORMER_AVX2 void plane_dot_f32(const float* u, const float* p, int64_t n, float shift, double& s1, double& s2) {
  const __m256 vshift = _mm256_set1_ps(shift);
  double d1[kLanes] = {}, d2[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t b = 0; b < full; b += kBlock) {
    const int64_t e = block_end(b, kBlock, full);
    __m256 a1l = _mm256_setzero_ps(), a1h = _mm256_setzero_ps(), a2l = _mm256_setzero_ps(), a2h = _mm256_setzero_ps();
    for (int64_t k = b; k < e; k += kLanes) {
      const __m256 ul = _mm256_loadu_ps(u + k), uh = _mm256_loadu_ps(u + k + 8);
      a1l = _mm256_add_ps(a1l, ul);
      a1h = _mm256_add_ps(a1h, uh);
      a2l = _mm256_add_ps(a2l, _mm256_mul_ps(ul, _mm256_sub_ps(_mm256_loadu_ps(p + k), vshift)));
      a2h = _mm256_add_ps(a2h, _mm256_mul_ps(uh, _mm256_sub_ps(_mm256_loadu_ps(p + k + 8), vshift)));
    }
    widen_into(a1l, a1h, d1);
    widen_into(a2l, a2h, d2);
  }
  finish_dot(d1, d2, u, p, full, n, shift, s1, s2);  // the generic kernel's reduction order
}

METAFORMER_AVX2 void pool_plane_f32(const float* plane, int64_t h, int64_t w, float scale, float offs, float* out,
                                    int8_t* code) {
  const int64_t ho = h / 2, wo = w / 2;
  const __m256 vs = _mm256_set1_ps(scale), vo = _mm256_set1_ps(offs), zero = _mm256_setzero_ps();
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), minus_one = _mm256_set1_epi32(-1);
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 8) {
      const int64_t cnt = wo - j0 < 8 ? wo - j0 : 8;
      __m256 z[4];
      load_windows(plane, h, w, i, j0, cnt, z);
      // y * scale + offs as two roundings, like the generic kernel
      const __m256 z00 = _mm256_add_ps(_mm256_mul_ps(z[0], vs), vo);
      const __m256 z01 = _mm256_add_ps(_mm256_mul_ps(z[1], vs), vo);
      const __m256 z10 = _mm256_add_ps(_mm256_mul_ps(z[2], vs), vo);
      const __m256 z11 = _mm256_add_ps(_mm256_mul_ps(z[3], vs), vo);
      // first maximum in row-major window order: right only if strictly greater, bottom likewise
      const __m256 right0 = _mm256_cmp_ps(z01, z00, _CMP_GT_OQ);
      const __m256 right1 = _mm256_cmp_ps(z11, z10, _CMP_GT_OQ);
      const __m256 top = _mm256_blendv_ps(z00, z01, right0);
      const __m256 bot = _mm256_blendv_ps(z10, z11, right1);
      const __m256 bottom = _mm256_cmp_ps(bot, top, _CMP_GT_OQ);
      const __m256 best = _mm256_blendv_ps(top, bot, bottom);
      const __m256i at_top = _mm256_and_si256(_mm256_castps_si256(right0), one);
      const __m256i at_bot = _mm256_add_epi32(two, _mm256_and_si256(_mm256_castps_si256(right1), one));
      const __m256i at = _mm256_blendv_epi8(at_top, at_bot, _mm256_castps_si256(bottom));
      const __m256 keep = _mm256_cmp_ps(best, zero, _CMP_GT_OQ);
      const int64_t cell = i * wo + j0, room = ho * wo - cell;
      store_first(out + cell, _mm256_and_ps(best, keep), cnt, room);
      const __m256i q = _mm256_blendv_epi8(minus_one, at, _mm256_castps_si256(keep));
      // int32 -1 .. 3 to bytes: both packs saturate, which leaves these values unchanged
      const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      const __m128i q8 = _mm_packs_epi16(q16, q16);
      if (room >= 8) {  // as store_first: bytes past cnt are cells written again later
        _mm_storel_epi64(reinterpret_cast<__m128i*>(code + cell), q8);
      } else {
        const uint64_t bytes = static_cast<uint64_t>(_mm_cvtsi128_si64(q8));
        for (int64_t l = 0; l < cnt; ++l) code[cell + l] = static_cast<int8_t>(bytes >> (8 * l));
      }
    }
  }
}

METAFORMER_AVX2 void pooled_grad_sums_f32(const float* grad_out, const int8_t* code, const float* full, int64_t h,
                                          int64_t w, float shift, float* gz, float* vals, double& s1, double& s2) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j0 = 0; j0 < wo; j0 += 8) {
      const int64_t cnt = wo - j0 < 8 ? wo - j0 : 8;
      const int64_t cell = i * wo + j0;
      const __m256i q = load_codes(code + cell, cnt, ho * wo - cell);
      const __m256 go = load_cells(grad_out, cell, cnt, ho * wo);
      const __m256 active = _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, _mm256_set1_epi32(-1)));
      __m256 z[4];
      load_windows(full, h, w, i, j0, cnt, z);
      // the value at the argmax; inactive cells read position 3 (q & 3 of -1), as the generic gather does
      __m256 v = z[3];
      v = _mm256_blendv_ps(v, z[2], at_position(q, 2));
      v = _mm256_blendv_ps(v, z[1], at_position(q, 1));
      v = _mm256_blendv_ps(v, z[0], at_position(q, 0));
      store_first(gz + cell, _mm256_and_ps(go, active), cnt, ho * wo - cell);
      store_first(vals + cell, v, cnt, ho * wo - cell);
    }
  }
  // the generic kernel's reduction: 16 lanes over the gathered cells in flat order, not per row
  plane_dot_f32(gz, vals, ho * wo, shift, s1, s2);
}

METAFORMER_AVX2 void write_grad_plane_f32(const float* y, const float* grad_out, const int8_t* code, int64_t h,
                                          int64_t w, float e0, float e1, float k, float* grad_y) {
  const int64_t ho = h / 2, wo = w / 2;
  const __m256 ve0 = _mm256_set1_ps(e0), ve1 = _mm256_set1_ps(e1), vk = _mm256_set1_ps(k);
  // row by row, each to its end (r outside j0): a partial vector's full store then only spills onto columns
  // that are written afterwards (see store_first)
  for (int64_t i = 0; i < ho; ++i) {
    for (int r = 0; r < 2; ++r) {
      for (int64_t j0 = 0; j0 < wo; j0 += 8) {
        const int64_t cnt = wo - j0 < 8 ? wo - j0 : 8;
        const int64_t cell = i * wo + j0;
        const __m256i q = load_codes(code + cell, cnt, ho * wo - cell);
        const __m256 kg = _mm256_mul_ps(vk, load_cells(grad_out, cell, cnt, ho * wo));
        const __m256 left = at_position(q, 2 * r), right = at_position(q, 2 * r + 1);
        const int64_t base = (2 * i + r) * w + 2 * j0;
        __m256 add_lo, add_hi, has_lo, has_hi;
        interleave(_mm256_and_ps(left, kg), _mm256_and_ps(right, kg), add_lo, add_hi);
        interleave(left, right, has_lo, has_hi);
        __m256 y_lo, y_hi;
        const int64_t room = h * w - base;
        if (room >= 16) {
          y_lo = _mm256_loadu_ps(y + base);
          y_hi = _mm256_loadu_ps(y + base + 8);
        } else {
          y_lo = _mm256_maskload_ps(y + base, first_lanes(2 * cnt));
          y_hi = _mm256_maskload_ps(y + base + 8, first_lanes(2 * cnt - 8));
        }
        __m256 g_lo = _mm256_sub_ps(ve0, _mm256_mul_ps(y_lo, ve1));
        __m256 g_hi = _mm256_sub_ps(ve0, _mm256_mul_ps(y_hi, ve1));
        // only where a cell's argmax lies, so every other element is exactly e0 - y * e1 (no + 0.0)
        g_lo = _mm256_blendv_ps(g_lo, _mm256_add_ps(g_lo, add_lo), has_lo);
        g_hi = _mm256_blendv_ps(g_hi, _mm256_add_ps(g_hi, add_hi), has_hi);
        store_first(grad_y + base, g_lo, 2 * cnt, room);
        store_first(grad_y + base + 8, g_hi, 2 * cnt - 8, room - 8);
      }
    }
  }
  // an odd last column and an odd last row belong to no window: e0 - y * e1 only
  for_unpooled_edges(h, w, [&](int64_t idx) { grad_y[idx] = e0 - y[idx] * e1; });
}

METAFORMER_AVX2 void scatter_plane_f32(const float* grad_out, const int8_t* code, int64_t h, int64_t w, float* out) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t i = 0; i < ho; ++i) {
    for (int r = 0; r < 2; ++r) {  // rows to their end, as in write_grad_plane_f32
      for (int64_t j0 = 0; j0 < wo; j0 += 8) {
        const int64_t cnt = wo - j0 < 8 ? wo - j0 : 8;
        const int64_t cell = i * wo + j0;
        const __m256i q = load_codes(code + cell, cnt, ho * wo - cell);
        const __m256 go = load_cells(grad_out, cell, cnt, ho * wo);
        __m256 lo, hi;
        interleave(_mm256_and_ps(at_position(q, 2 * r), go), _mm256_and_ps(at_position(q, 2 * r + 1), go), lo, hi);
        const int64_t base = (2 * i + r) * w + 2 * j0, room = h * w - base;
        store_first(out + base, lo, 2 * cnt, room);
        store_first(out + base + 8, hi, 2 * cnt - 8, room - 8);
      }
    }
  }
  for_unpooled_edges(h, w, [&](int64_t idx) { out[idx] = 0.0f; });
}

// The stem: as on AVX-512, one image's patch rows stay in registers for a chunk of positions while several
// output channels use them (one load per row and chunk instead of one per row, chunk and channel). 16 ymm
// registers hold 9 rows and one accumulator, so the weights are broadcast from memory per use.
// Positions k .. k+7 of the P patch rows of length hw (masked past hw), one vector per row.
template <int P>
METAFORMER_AVX2 inline void load_rows(const float* rows, int64_t hw, int64_t k, __m256 r[P]) {
  if (k + 8 <= hw) {
    #pragma GCC unroll 16
    for (int i = 0; i < P; ++i) r[i] = _mm256_loadu_ps(rows + i * hw + k);
  } else {
    const __m256i m = first_lanes(hw - k);
    #pragma GCC unroll 16
    for (int i = 0; i < P; ++i) r[i] = _mm256_maskload_ps(rows + i * hw + k, m);
  }
}

template <int P, int NC>
METAFORMER_AVX2 inline void conv_block(const float* rows, const float* w, int64_t hw, float* t) {
  for (int64_t k = 0; k < hw; k += 8) {
    __m256 r[P];
    load_rows<P>(rows, hw, k, r);
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(w + c * P), r[0]);
      #pragma GCC unroll 16
      for (int i = 1; i < P; ++i) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + c * P + i), r[i], acc);
      store_first(t + c * hw + k, acc, hw - k, hw - k);
    }
  }
}

// The stem's 8-lane dot products take blocks of this many positions: kLaneTerms terms a lane, as everywhere.
constexpr int64_t kDotBlock = 8 * kLaneTerms;

// One channel at a time: P accumulators and the rows leave no registers for a second channel's.
template <int P>
METAFORMER_AVX2 inline void dot_block(const float* u, const float* rows, int64_t hw, double* acc) {
  for (int64_t b = 0; b < hw; b += kDotBlock) {
    const int64_t e = block_end(b, kDotBlock, hw);
    __m256 a[P];
    #pragma GCC unroll 16
    for (int i = 0; i < P; ++i) a[i] = _mm256_setzero_ps();
    int64_t k = b;
    for (; k + 8 <= e; k += 8) {
      const __m256 vu = _mm256_loadu_ps(u + k);
      #pragma GCC unroll 16
      for (int i = 0; i < P; ++i) a[i] = _mm256_fmadd_ps(vu, _mm256_loadu_ps(rows + i * hw + k), a[i]);
    }
    if (k < e) {  // the plane's last, partial vector (blocks are whole vectors)
      const __m256i m = first_lanes(e - k);
      const __m256 vu = _mm256_maskload_ps(u + k, m);
      #pragma GCC unroll 16
      for (int i = 0; i < P; ++i) a[i] = _mm256_fmadd_ps(vu, _mm256_maskload_ps(rows + i * hw + k, m), a[i]);
    }
    #pragma GCC unroll 16
    for (int i = 0; i < P; ++i) acc[i] += reduce_double(a[i]);
  }
}

METAFORMER_AVX2 void conv_planes_f32(const float* rows, const float* w, int64_t p, int64_t hw, int64_t nc, float* t) {
  int64_t c = 0;
  if (p == 9) {
    for (; c + 4 <= nc; c += 4) conv_block<9, 4>(rows, w + c * p, hw, t + c * hw);
    for (; c < nc; ++c) conv_block<9, 1>(rows, w + c * p, hw, t + c * hw);
    return;
  }
  for (; c < nc; ++c) {
    for (int64_t k = 0; k < hw; k += 8) {
      const __m256i m = first_lanes(hw - k);
      __m256 acc = _mm256_mul_ps(_mm256_set1_ps(w[c * p]), _mm256_maskload_ps(rows + k, m));
      for (int64_t i = 1; i < p; ++i) {
        acc = _mm256_fmadd_ps(_mm256_set1_ps(w[c * p + i]), _mm256_maskload_ps(rows + i * hw + k, m), acc);
      }
      store_first(t + c * hw + k, acc, hw - k, hw - k);
    }
  }
}

METAFORMER_AVX2 void rows_dot_planes_f32(const float* u, const float* rows, int64_t p, int64_t hw, int64_t nc,
                                         double* acc) {
  if (p == 9) {
    for (int64_t c = 0; c < nc; ++c) dot_block<9>(u + c * hw, rows, hw, acc + c * p);
    return;
  }
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t b = 0; b < hw; b += kDotBlock) {  // as dot_block
        const int64_t e = block_end(b, kDotBlock, hw);
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = b; k < e; k += 8) {
          const __m256i m = first_lanes(e - k);
          a = _mm256_fmadd_ps(_mm256_maskload_ps(u + c * hw + k, m), _mm256_maskload_ps(rows + i * hw + k, m), a);
        }
        acc[c * p + i] += reduce_double(a);
      }
    }
  }
}

#else  // no AVX2 kernels on this compiler / architecture: kernels() never chooses them

void plane_moments_f32(const float*, int64_t, float, double&, double&) { std::abort(); }
void plane_dot_f32(const float*, const float*, int64_t, float, double&, double&) { std::abort(); }
void pool_plane_f32(const float*, int64_t, int64_t, float, float, float*, int8_t*) { std::abort(); }
void pooled_grad_sums_f32(const float*, const int8_t*, const float*, int64_t, int64_t, float, float*, float*, double&,
                          double&) {
  std::abort();
}
void write_grad_plane_f32(const float*, const float*, const int8_t*, int64_t, int64_t, float, float, float, float*) {
  std::abort();
}
void conv_planes_f32(const float*, const float*, int64_t, int64_t, int64_t, float*) { std::abort(); }
void rows_dot_planes_f32(const float*, const float*, int64_t, int64_t, int64_t, double*) { std::abort(); }
void scatter_plane_f32(const float*, const int8_t*, int64_t, int64_t, float*) { std::abort(); }

#endif

}  // namespace avx2
}  // namespace simd
}  // namespace metaformer

// esper_kernels CPU backend: AVX-512 helpers shared by the AVX-512 files (avx512_small.cpp, avx512_wide.cpp).
//
// Include only from a translation unit compiled with the AVX-512 flags (csrc/CMakeLists.txt). Everything here
// is in an anonymous namespace: each AVX-512 file gets its own copies, none visible to the linker.
#pragma once

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
#error "avx512_math.h: compile with -mavx512f -mavx512bw -mavx512vl -mavx512dq (csrc/CMakeLists.txt)"
#endif

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "ppo_params.h"

namespace esper {
namespace cpu {
namespace avx512 {
namespace {

// exp(x) in float32: Cephes expf (k = round(x / ln2), r = x - k ln2 in two parts, degree-7 polynomial), 2^k by
// scalef (overflow to inf); NaN passes through. Results below FLT_MIN (x < -87) are 0, never subnormal: a
// subnormal result costs a microcode assist (~100 cycles) on Intel cores, and masked logits (mask_fill) hit
// this range on every call; the difference is below 1.2e-38 absolute
inline __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(89.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  const __m512 e = _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLT_UQ), y, k);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// log(x) in float32 (Cephes logf on the mantissa in [sqrt(1/2), sqrt(2))); log(0) = -inf, log(inf) = inf
inline __m512 log16(__m512 s) {
  __m512 m = _mm512_getmant_ps(s, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  __m512 e = _mm512_getexp_ps(s);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.f));
  const __m512 x = _mm512_sub_ps(m, _mm512_set1_ps(1.f));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(3.3333331174e-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  __m512 res = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(x, y));
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_EQ_OQ), _mm512_set1_ps(-INFINITY));
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(s, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), s);
  return _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_NGE_UQ), _mm512_set1_ps(NAN));
}

inline __m512i iota16i() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// transpose a 16 x 16 block in registers: r[k] = row k in, column k out
inline void tr16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// float -> fp16 / bf16 bits (round to nearest even, as float_to_half / float_to_bf16), in the low 16 bits
template <int DT>
inline __m512i to16(__m512 x) {
  if (DT == DT_F16) return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i xi = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(xi, 16), _mm512_set1_epi32(1));
  const __m512i rn = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i qn = _mm512_or_si512(_mm512_srli_epi32(xi, 16), _mm512_set1_epi32(0x40));
  return _mm512_mask_mov_epi32(rn, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qn);
}

inline __m512 clamp_min16(__m512 x, float lo) {  // clamp_min: x < lo ? lo : x (NaN stays NaN)
  return _mm512_max_ps(_mm512_set1_ps(lo), x);
}
inline __m512 clamp16(__m512 x, __m512 lo, __m512 hi) {  // clampf: NaN stays NaN
  x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), lo);
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), hi);
}
inline __mmask16 finite16(__m512 x) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
}

}  // namespace
}  // namespace avx512
}  // namespace cpu
}  // namespace esper

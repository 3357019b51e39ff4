// esper_kernels CPU backend: the AVX-512 wide path (heads of more than SMALL = 32 actions, no floor).
//
// One row at a time, 16 columns per vector. The forward reads the row twice (the max of the masked
// logits and the valid count; then e = exp(zhat - shift), summed, with the entropy's sums in the same pass:
// -sum_V p logp = (log(s) sum_V e - sum_V e d) / s, e = exp(d), d = zhat - m) and saves the row's m and
// log(s) (never m + log(s), which rounds at the logits' magnitude); the backward reads them back and
// needs one exp per logit: p and r = p (1 + logp) go to the row buffers, then the gradient
// (j == a ? gL : 0) - gHraw r - p sigma on the valid columns. Sums run in float per lane over at most
// WIDE_FLUSH columns, then in double, reduced in a fixed order: the same bits whatever the thread count.
// Tail vectors use masked loads and stores (nothing past a row's last column is touched).
//
// Compiled with the AVX-512 flags (csrc/CMakeLists.txt); only the entry points at the end (namespace
// esper::cpu::avx512) have external linkage, and the driver calls them only on a CPU with AVX-512.
#include <string.h>

#include "cpu/avx512_math.h"
#include "cpu/cpu_internal.h"

namespace esper {
namespace cpu {
namespace avx512 {
namespace {

constexpr int WIDE_FLUSH = 64 * 16;  // columns summed in float before the lanes are added into double

// columns [j, j + 16) of a row (k: the columns inside the row), as float. The load is kept apart from the
// mask blend that follows: folded into one merge-masked load, it would wait for the mask's load (a second
// cache miss in series on each line of a row read for the first time)
template <int DT>
inline __m512 wide_load(const void* row, int j, __mmask16 k) {
  if (DT == DT_F32) {
    __m512 x = _mm512_maskz_loadu_ps(k, reinterpret_cast<const float*>(row) + j);
    __asm__("" : "+v"(x));
    return x;
  }
  __m256i w = _mm256_maskz_loadu_epi16(k, reinterpret_cast<const uint16_t*>(row) + j);
  __asm__("" : "+v"(w));
  if (DT == DT_F16) return _mm512_cvtph_ps(w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}
// valid columns among k (no mask: all of k)
inline __mmask16 wide_valid(const uint8_t* m, int j, __mmask16 k) {
  if (!m) return k;
  const __m128i v = _mm_maskz_loadu_epi8(k, m + j);
  return _mm_test_epi8_mask(v, v);
}
inline __mmask16 wide_tail(int A, int j) {
  const int left = A - j;
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}
// the next row of the head (row i + 1, when there is one): its logits and mask, one 64-byte line per call
// (col: a column of the current vector); the hardware prefetchers stop at a page's end, and a row of a wide
// head is about a page
struct WideNext {
  const char* z = nullptr;
  const char* m = nullptr;
  int es = 4;
  WideNext(const PPOParams& P, int h, int64_t i, int es_) : es(es_) {
    if (i + 1 >= P.n) return;
    z = reinterpret_cast<const char*>(P.logits[h]) + (i + 1) * P.logits_rs[h] * es;
    if (P.has_mask) m = reinterpret_cast<const char*>(P.masks[h]) + (i + 1) * P.masks_rs[h];
  }
  // (inline asm: GCC 12 drops __builtin_prefetch / _mm_prefetch here)
  static inline void line(const char* p) { __asm__ volatile("prefetcht0 %0" : : "m"(*p)); }
  static inline void line_w(const char* p) { __asm__ volatile("prefetchw %0" : : "m"(*p)); }
  inline void at(int col) const {
    if (!z) return;
    if (es == 4 || (col & 31) == 0) line(z + (int64_t)col * es);
    if (m && (col & 63) == 0) line(m + col);
  }
};

// float lanes into two double accumulators
inline void wide_flush(__m512& f, __m512d& lo, __m512d& hi) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
  f = _mm512_setzero_ps();
}
inline float wide_sum(__m512d lo, __m512d hi) { return (float)_mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }

// the forward of row i of wide head h (a present step): row_forward's outputs, with the row's m and ls
template <int DT>
RowFwd wide_forward(const PPOParams& P, int h, int64_t i, const HeadIn& hi) {
  const int A = P.sizes[h];
  const int es = DT == DT_F32 ? 4 : 2;
  const void* row = reinterpret_cast<const char*>(P.logits[h]) + i * P.logits_rs[h] * es;
  const uint8_t* m = P.has_mask ? reinterpret_cast<const uint8_t*>(P.masks[h]) + i * P.masks_rs[h] : nullptr;
  const __m512 fill = _mm512_set1_ps(P.mask_fill);
  __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
  int n = 0;
  int j = 0;
  for (; j + 32 <= A; j += 32) {
    const __mmask16 v0 = wide_valid(m, j, 0xffff), v1 = wide_valid(m, j + 16, 0xffff);
    const __m512 z0 = _mm512_mask_blend_ps(v0, fill, wide_load<DT>(row, j, 0xffff));
    const __m512 z1 = _mm512_mask_blend_ps(v1, fill, wide_load<DT>(row, j + 16, 0xffff));
    mx0 = _mm512_max_ps(z0, mx0);  // NaN logits never become the max (as row_softmax)
    mx1 = _mm512_max_ps(z1, mx1);
    n += __builtin_popcount((unsigned)v0) + __builtin_popcount((unsigned)v1);
  }
  for (; j < A; j += 16) {
    const __mmask16 k = wide_tail(A, j), v = wide_valid(m, j, k);
    const __m512 z = _mm512_mask_blend_ps(v, fill, wide_load<DT>(row, j, k));
    mx0 = _mm512_mask_max_ps(mx0, k, z, mx0);
    n += __builtin_popcount((unsigned)v);
  }
  const WideNext next(P, h, i, es);
  const float sh = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));  // m (-inf without a valid action: see n)
  const __m512 shv = _mm512_set1_ps(sh);
  // s = sum e_j over every column; over the valid ones t2 = sum e_j, t1 = sum e_j d_j (d_j = zhat_j - m)
  __m512 s = _mm512_setzero_ps(), t1 = s, t2 = s;
  __m512d s_lo = _mm512_setzero_pd(), s_hi = s_lo, t1_lo = s_lo, t1_hi = s_lo, t2_lo = s_lo, t2_hi = s_lo;
  for (int c0 = 0; c0 < A; c0 += WIDE_FLUSH) {
    const int c1 = A < c0 + WIDE_FLUSH ? A : c0 + WIDE_FLUSH;
    for (j = c0; j < c1; j += 16) {
      const __mmask16 k = wide_tail(c1, j), v = wide_valid(m, j, k);
      next.at(j);
      const __m512 d = _mm512_sub_ps(_mm512_mask_blend_ps(v, fill, wide_load<DT>(row, j, k)), shv);
      const __m512 e = exp16(d);
      s = _mm512_mask_add_ps(s, k, s, e);
      t2 = _mm512_mask_add_ps(t2, v, t2, e);
      t1 = _mm512_mask3_fmadd_ps(e, d, t1, v);
    }
    wide_flush(s, s_lo, s_hi);
    wide_flush(t1, t1_lo, t1_hi);
    wide_flush(t2, t2_lo, t2_hi);
  }
  const float sf = wide_sum(s_lo, s_hi), t1f = wide_sum(t1_lo, t1_hi), t2f = wide_sum(t2_lo, t2_hi);
  const float ls = ek_log(sf);
  const float nf = (float)n;
  float ent = n > 0 ? (ls * t2f - t1f) / sf : 0.f;
  if (P.normalize_entropy) ent = nf > 1.f ? ent / ek_log(nf < 2.f ? 2.f : nf) : 0.f;
  RowFwd out;
  out.ent = ent;
  out.n = nf;
  out.taken = false;
  out.ell = f_nan();
  if (hi.in_range) {  // (NaN also without a valid action, as an action out of range)
    const bool va = !m || m[hi.a] != 0;
    if (n > 0) out.ell = log_prob(va ? load_logit(P, h, i, hi.a) : P.mask_fill, sh, ls);
    out.taken = va;
  }
  out.m = n > 0 ? sh : 0.f;  // (as row_forward)
  out.ls = n > 0 ? ls : 0.f;
  return out;
}

// the gradient of row i of wide head h (a present step) from the saved m and ls; p, r and the valid bits of the
// row go through pb, rb, vb (A floats, A floats, A / 8 bytes)
template <int DT>
void wide_backward(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float gL, float gE, float* pb, float* rb,
                   uint8_t* vb) {
  const int A = P.sizes[h];
  const int es = DT == DT_F32 ? 4 : 2;
  const void* row = reinterpret_cast<const char*>(P.logits[h]) + i * P.logits_rs[h] * es;
  const uint8_t* m = P.has_mask ? reinterpret_cast<const uint8_t*>(P.masks[h]) + i * P.masks_rs[h] : nullptr;
  const __m512 fill = _mm512_set1_ps(P.mask_fill);
  const __m512 ms = _mm512_set1_ps(saved_m(P)[i * P.num_heads + h]);
  const __m512 ls = _mm512_set1_ps(saved_ls(P)[i * P.num_heads + h]);
  char* grow = reinterpret_cast<char*>(P.grads[h]) + i * P.grads_rs[h] * es;
  // pass 1: p = exp(logp), logp = (zhat - m) - ls, r = p + logp p on the valid columns; sum_V r
  __m512 sr = _mm512_setzero_ps();
  __m512d sr_lo = _mm512_setzero_pd(), sr_hi = sr_lo;
  int n = 0;
  for (int c0 = 0; c0 < A; c0 += WIDE_FLUSH) {
    const int c1 = A < c0 + WIDE_FLUSH ? A : c0 + WIDE_FLUSH;
    for (int j = c0; j < c1; j += 16) {
      if (es == 4 || (j & 31) == 0) WideNext::line_w(grow + (int64_t)j * es);  // the lines pass 2 writes
      const __mmask16 k = wide_tail(c1, j), v = wide_valid(m, j, k);
      const __m512 lp = _mm512_sub_ps(_mm512_sub_ps(_mm512_mask_blend_ps(v, fill, wide_load<DT>(row, j, k)), ms), ls);
      const __m512 p = _mm512_maskz_mov_ps(v, exp16(lp));
      const __m512 r = _mm512_maskz_fmadd_ps(v, lp, p, p);
      sr = _mm512_add_ps(sr, r);
      _mm512_mask_storeu_ps(pb + j, k, p);
      _mm512_mask_storeu_ps(rb + j, k, r);
      const uint16_t vv = (uint16_t)v;
      memcpy(vb + (j >> 3), &vv, 2);
      n += __builtin_popcount((unsigned)v);
    }
    wide_flush(sr, sr_lo, sr_hi);
  }
  float ghr = gE;
  if (P.normalize_entropy) {
    const float nf = (float)n;
    ghr = nf > 1.f ? gE / ek_log(nf < 2.f ? 2.f : nf) : 0.f;
  }
  const float ng = -ghr;
  const int64_t a = hi.in_range ? hi.a : -1;
  const float gla = a >= 0 ? gL : 0.f;
  const float sig = gla + ng * wide_sum(sr_lo, sr_hi);
  // a non-finite upstream (row_backward's bad_upstream): NaN at every valid column
  const __mmask16 bad = bad_upstream(gla, ghr) ? (__mmask16)0xffff : (__mmask16)0;
  const __m512 nan = _mm512_set1_ps(NAN);
  // pass 2: g_j = (j == a ? gL : 0) + ng r_j - p_j sigma on the valid columns, 0 elsewhere
  const __m512 ngv = _mm512_set1_ps(ng), sigv = _mm512_set1_ps(sig), glv = _mm512_set1_ps(gla);
  const __m512i av = _mm512_set1_epi32((int32_t)a);
  const WideNext next(P, h, i, es);
  for (int j = 0; j < A; j += 16) {
    next.at(j);
    const __mmask16 k = wide_tail(A, j);
    uint16_t vv;
    memcpy(&vv, vb + (j >> 3), 2);
    const __mmask16 isa = _mm512_cmpeq_epi32_mask(_mm512_add_epi32(iota16i(), _mm512_set1_epi32(j)), av);
    const __m512 q = _mm512_mul_ps(ngv, _mm512_maskz_loadu_ps(k, rb + j));
    const __m512 base = _mm512_mask_add_ps(q, isa, q, glv);
    __m512 g = _mm512_maskz_mov_ps((__mmask16)vv, _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, pb + j), sigv, base));
    g = _mm512_mask_mov_ps(g, (__mmask16)vv & bad, nan);
    if (DT == DT_F32)
      _mm512_mask_storeu_ps(reinterpret_cast<float*>(grow) + j, k, g);
    else
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(grow) + j, k, _mm512_cvtepi32_epi16(to16<DT>(g)));
  }
}

}  // namespace

// ---- entry points (cpu_internal.h) ---------------------------------------------------------------------------
RowFwd wide_forward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi) {
  switch (P.logits_dtype) {
    case DT_F32:
      return wide_forward<DT_F32>(P, h, i, hi);
    case DT_F16:
      return wide_forward<DT_F16>(P, h, i, hi);
    default:
      return wide_forward<DT_BF16>(P, h, i, hi);
  }
}
void wide_backward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float gL, float gE, float* pb, float* rb,
                       uint8_t* vb) {
  switch (P.logits_dtype) {
    case DT_F32:
      wide_backward<DT_F32>(P, h, i, hi, gL, gE, pb, rb, vb);
      break;
    case DT_F16:
      wide_backward<DT_F16>(P, h, i, hi, gL, gE, pb, rb, vb);
      break;
    default:
      wide_backward<DT_BF16>(P, h, i, hi, gL, gE, pb, rb, vb);
      break;
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace esper

// esper_kernels CPU backend: the AVX-512 small-head path (heads of at most SMALL = 32 actions, floored or not).
//
// RB = 16 rows in the 16 lanes of a zmm register, one exp per logit in the forward and one in the backward.
// When the fast heads' logits (gradients) lie in one span of at most SPAN columns with one row stride (packed
// [N, S] tensors), a block is read (written) as RB rows of the span and transposed in registers (tr16);
// otherwise its columns are gathered (scattered) straight from the logits (any row stride, per-head tensors).
// With H + 1 <= RB the per-(step, head) outputs and saved values move the same way, as rows of the block. The
// per-lane inputs ([N, H] actions, relevance, old log-probs) are gathered, the masks read as one bit mask per
// row; float32 exp/log (Cephes polynomials with FMA, within 2 ulp) and float sums over the row (at most SMALL
// terms); the per-(step, head) statistics accumulate per lane in double and are reduced in lane order at the
// end of a chunk, so results stay independent of the thread count. Log-probs come from the shifted logits,
// (z - m) - log sum exp(z - m), as row_softmax; the forward saves each row's m and log-sum (after the [N, H + 1]
// coefficients; never their sum, the lse, which rounds at the magnitude of the logits), so the backward needs
// one exp per logit and no max/sum pass. Not bitwise equal to the row path (other exp, FMA, sum order), but as
// close to the reference.
// With a floor: row_softmax's floor and row_backward's floored branch lane-wise (floor_lanes / floor_backward:
// two exp and a log per logit).
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

// log(n) of a valid count n in [0, SMALL] (the row path's ek_log(n))
struct LogTab {
  alignas(64) float v[SMALL + 1];
  LogTab() {
    for (int k = 0; k <= SMALL; ++k) v[k] = ek_log((float)(k < 2 ? 2 : k));
  }
};
const LogTab& log_tab() {
  static const LogTab t;
  return t;
}

// lanes of a block: v at the rows of the lanes in m (else dflt), as float
inline void f_lanes(const Vec& v, int64_t b0, uint32_t m, float dflt, float* out) {
  if (v.dtype == DT_F32) {
    const float* p = reinterpret_cast<const float*>(v.ptr) + b0 * v.stride;
    for (int r = 0; r < RB; ++r) out[r] = ((m >> r) & 1u) ? p[r * v.stride] : dflt;
  } else {
    for (int r = 0; r < RB; ++r) out[r] = ((m >> r) & 1u) ? load_f(v, b0 + r) : dflt;
  }
}
// actions of the lanes in m: the action where in [0, A), else -1; inr = lanes in range
template <class T>
inline uint32_t a_lanes_t(const T* p, int64_t st, uint32_t m, int A, int32_t* act) {
  uint32_t inr = 0;
  for (int r = 0; r < RB; ++r) {
    const int64_t a = ((m >> r) & 1u) ? (int64_t)p[r * st] : -1;
    const bool ok = a >= 0 && a < A;
    act[r] = ok ? (int32_t)a : -1;
    inr |= (uint32_t)ok << r;
  }
  return inr;
}
inline uint32_t a_lanes(const Vec& v, int64_t b0, uint32_t m, int A, int32_t* act) {
  switch (v.dtype) {
    case DT_I64:
      return a_lanes_t(reinterpret_cast<const int64_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
    case DT_I32:
      return a_lanes_t(reinterpret_cast<const int32_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
    default:
      return a_lanes_t(reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
  }
}
// lanes of m whose byte is nonzero
inline uint32_t b_lanes(const Vec& v, int64_t b0, uint32_t m) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride;
  uint32_t out = 0;
  for (int r = 0; r < RB; ++r) out |= (uint32_t)(((m >> r) & 1u) && p[r * v.stride] != 0) << r;
  return out;
}

// RB rows of ncols <= 16 floats (row q at base + q * rs elements, rows q < nb; columns cm) into columns
// col[k][q] (0 for rows >= nb and columns outside cm)
inline void load_cols(const float* base, int64_t rs, int nb, __mmask16 cm, float (*col)[RB]) {
  __m512 r[16];
  for (int q = 0; q < RB; ++q) r[q] = q < nb ? _mm512_maskz_loadu_ps(cm, base + q * rs) : _mm512_setzero_ps();
  tr16(r);
  for (int k = 0; k < 16; ++k) _mm512_store_ps(col[k], r[k]);
}
// columns col[k] (k in cm) into rows q < nb at base + q * rs
inline void store_cols(float* base, int64_t rs, int nb, __mmask16 cm, const float (*col)[RB]) {
  __m512 r[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(col[k]);
  tr16(r);
  for (int q = 0; q < nb; ++q) _mm512_mask_storeu_ps(base + q * rs, cm, r[q]);
}

// the block's logits of every fast head (packed: FastPlan::zp) into C.zs, column-major; rows >= nb read 0
template <int DT>
void stage_z(const FastPlan& F, const BlockIn& B, FastCols& C) {
  const FastPlan::Span2D& Z = F.zp;
  const int es = DT == DT_F32 ? 4 : 2;
  const char* base = reinterpret_cast<const char*>(Z.lo) + B.b0 * Z.rs * es;
  for (int t = 0; t * 16 < Z.w; ++t) {
    const __mmask16 cm = (__mmask16)(Z.cols >> (16 * t));
    __m512 r[16];
    for (int q = 0; q < RB; ++q) {
      const char* row = base + (q * Z.rs + 16 * t) * es;
      if (q >= B.nb)
        r[q] = _mm512_setzero_ps();
      else if (DT == DT_F32)
        r[q] = _mm512_maskz_loadu_ps(cm, row);
      else if (DT == DT_F16)
        r[q] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(cm, row));
      else
        r[q] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cm, row)), 16));
    }
    tr16(r);
    for (int k = 0; k < 16; ++k) _mm512_store_ps(C.zs[16 * t + k], r[k]);
  }
}

// the block's gradients of every fast head (C.gs, column-major; packed: FastPlan::gp) into rows < nb
template <int DT>
void flush_g(const FastPlan& F, const BlockIn& B, const FastCols& C) {
  const FastPlan::Span2D& G = F.gp;
  const int es = DT == DT_F32 ? 4 : 2;
  char* base = reinterpret_cast<char*>(G.lo) + B.b0 * G.rs * es;
  for (int t = 0; t * 16 < G.w; ++t) {
    const __mmask16 cm = (__mmask16)(G.cols >> (16 * t));
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(C.gs[16 * t + k]);
    tr16(r);
    for (int q = 0; q < B.nb; ++q) {
      char* row = base + (q * G.rs + 16 * t) * es;
      if (DT == DT_F32)
        _mm512_mask_storeu_ps(row, cm, r[q]);
      else
        _mm256_mask_storeu_epi16(row, cm, _mm512_cvtepi32_epi16(to16<DT>(r[q])));
    }
  }
}

// vector forms of a_lanes / b_lanes / f_lanes (gathers of the lanes in m), falling back to them where the
// dtype or stride does not suit
inline uint32_t a_lanes16(const Vec& v, int64_t b0, uint32_t m, int A, int32_t* act) {
  if ((v.dtype != DT_I64 && v.dtype != DT_I32) || v.stride <= 0 || v.stride > FAST_MAX_RS)
    return a_lanes(v, b0, m, A, act);
  const __m512i idx = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32((int32_t)v.stride));
  __m512i a;
  if (v.dtype == DT_I64) {
    const int64_t* p = reinterpret_cast<const int64_t*>(v.ptr) + b0 * v.stride;
    const __m512i m1 = _mm512_set1_epi64(-1);
    const __m512i lo = _mm512_mask_i32gather_epi64(m1, (__mmask8)m, _mm512_castsi512_si256(idx), p, 8);
    const __m512i hi = _mm512_mask_i32gather_epi64(m1, (__mmask8)(m >> 8), _mm512_extracti64x4_epi64(idx, 1), p, 8);
    // saturated to int32: anything outside int32 stays out of [0, A)
    a = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi64_epi32(lo)), _mm512_cvtsepi64_epi32(hi), 1);
  } else {
    a = _mm512_mask_i32gather_epi32(_mm512_set1_epi32(-1), (__mmask16)m, idx,
                                    reinterpret_cast<const int32_t*>(v.ptr) + b0 * v.stride, 4);
  }
  // unsigned compare: negative actions are out of range
  const __mmask16 ok = (__mmask16)m & _mm512_cmp_epu32_mask(a, _mm512_set1_epi32(A), _MM_CMPINT_LT);
  _mm512_store_si512(act, _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), ok, a));
  return ok;
}
// bytes: a 32-bit word from each lane's byte, where the last of them stays inside the vector's n elements
inline uint32_t b_lanes16(const Vec& v, int64_t b0, uint32_t m, int64_t n) {
  if (v.stride <= 0 || v.stride > FAST_MAX_RS || (n - RB - b0) * v.stride < 3) return b_lanes(v, b0, m);
  const __m512i idx = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32((int32_t)v.stride));
  const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), (__mmask16)m, idx,
                                                reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride, 1);
  return (uint32_t)(m & _mm512_test_epi32_mask(w, _mm512_set1_epi32(0xff)));
}
inline __m512 f_lanes16(const Vec& v, int64_t b0, uint32_t m, float dflt) {
  if (v.dtype == DT_F32 && v.stride == 1)
    return _mm512_mask_loadu_ps(_mm512_set1_ps(dflt), (__mmask16)m, reinterpret_cast<const float*>(v.ptr) + b0);
  if (v.dtype == DT_F32 && v.stride > 0 && v.stride <= FAST_MAX_RS) {
    const __m512i idx = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32((int32_t)v.stride));
    return _mm512_mask_i32gather_ps(_mm512_set1_ps(dflt), (__mmask16)m, idx,
                                    reinterpret_cast<const float*>(v.ptr) + b0 * v.stride, 4);
  }
  alignas(64) float t[RB];
  f_lanes(v, b0, m, dflt, t);
  return _mm512_load_ps(t);
}

// the advantages of column h at the lanes in m (0 elsewhere), normalised as load_adv when normalize_adv
inline __m512 adv_lanes(const PPOParams& P, int h, int64_t b0, uint32_t m) {
  __m512 a = f_lanes16(P.adv[h], b0, m, 0.f);
  if (P.normalize_adv) {
    const float* nm = reinterpret_cast<const float*>(P.adv_norm) + 2 * (P.adv_per_head ? h : 0);
    a = _mm512_maskz_div_ps((__mmask16)m, _mm512_sub_ps(a, _mm512_set1_ps(nm[0])), _mm512_set1_ps(nm[1]));
  }
  return a;
}

// column j of the block (lanes at int32 element offsets idx from base), as float
template <int DT>
inline __m512 gather_col(const void* base, __m512i idx, int j) {
  if (DT == DT_F32) return _mm512_i32gather_ps(idx, reinterpret_cast<const float*>(base) + j, 4);
  const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
  __m512i w;
  if (j == 0) {  // the 32-bit word of columns 0 and 1, low half
    w = _mm512_and_si512(_mm512_i32gather_epi32(idx, p, 2), _mm512_set1_epi32(0xffff));
  } else {  // of columns j - 1 and j, high half (never past the row's last column)
    w = _mm512_srli_epi32(_mm512_i32gather_epi32(idx, p + (j - 1), 2), 16);
  }
  if (DT == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
}

// per-lane head inputs of a block: actions in range (else -1), valid-action bits of each row, relevance
struct HeadLanes {
  alignas(64) int32_t act[RB];
  alignas(64) uint32_t mrow[RB];
  alignas(64) float old[RB];
  alignas(64) float adv[RB];
  uint32_t rel, inr;
};

// the block's mask window of every row (packed masks), for head_lanes
void mask_rows(const FastPlan& F, const BlockIn& B, uint64_t* rows) {
  for (int r = 0; r < RB; ++r) {
    uint64_t bits = 0;
    if ((B.pres >> r) & 1u) {
      const __m512i v = _mm512_maskz_loadu_epi8(F.mbits, F.mbase + (B.b0 + r) * F.mrs);
      bits = _mm512_test_epi8_mask(v, v);
    }
    rows[r] = bits;
  }
}

void head_lanes(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows, bool fwd,
                HeadLanes& L) {
  const int A = P.sizes[h];
  const uint32_t full = A >= 32 ? 0xffffffffu : ((1u << A) - 1u);
  const uint32_t pres = B.pres;
  if (!P.has_mask) {
    _mm512_store_si512(L.mrow, _mm512_maskz_set1_epi32((__mmask16)pres, (int32_t)full));
  } else if (F.mpacked) {
    const __m512i sh = _mm512_set1_epi64(F.moff[h]);
    const __m256i r0 = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(_mm512_loadu_si512(rows), sh));
    const __m256i r1 = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(_mm512_loadu_si512(rows + 8), sh));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
    _mm512_store_si512(L.mrow, _mm512_and_si512(both, _mm512_set1_epi32((int32_t)full)));
  } else {
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(P.masks[h]);
    for (int r = 0; r < RB; ++r) {
      uint32_t bits = 0;
      if ((pres >> r) & 1u) {
        const __m256i v = _mm256_maskz_loadu_epi8(full, mb + (B.b0 + r) * P.masks_rs[h]);
        bits = _mm256_test_epi8_mask(v, v);
      }
      L.mrow[r] = bits;
    }
  }
  L.inr = a_lanes16(P.actions[h], B.b0, pres, A, L.act);
  L.rel = P.has_rel ? b_lanes16(P.rel[h], B.b0, pres, P.n) : pres;
  if (!fwd) return;
  _mm512_store_ps(L.old, f_lanes16(P.old_lp[h], B.b0, L.rel, 0.f));
  if (P.per_head && P.adv_per_head)
    _mm512_store_ps(L.adv, adv_lanes(P, h, B.b0, pres));
  else
    memcpy(L.adv, B.adv0, sizeof(L.adv));
}

// esper's floor over a block, lane-wise (row_softmax's floor part): from the masked logits C.z (valid columns
// C.v), their max m and valid count n: p1 = softmax(zhat) into C.e, the floor f = floor_f(n, floor), the
// renormalisation s_f = max(1 - |U| f, 1e-8) / max(P_O, 1e-8) and P_O = sum_O p1 (U: valid and p1 < f; O: the
// other valid columns, NaN p1 included, as the row path). Sums in float, in column order
struct FloorLanes {
  __m512 f, s_f, po;
};
FloorLanes floor_lanes(int A, FastCols& C, __m512 m, __m512 n, float floor) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 s1 = _mm512_setzero_ps();
  for (int j = 0; j < A; ++j) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(C.z[j]), m));
    _mm512_store_ps(C.e[j], e);
    s1 = _mm512_add_ps(s1, e);
  }
  FloorLanes fl;
  fl.f = _mm512_mul_ps(_mm512_div_ps(one, _mm512_max_ps(n, one)), _mm512_set1_ps(0.99f));  // floor_f
  fl.f = _mm512_min_ps(fl.f, _mm512_set1_ps(floor));
  __m512 nu = _mm512_setzero_ps(), po = _mm512_setzero_ps();
  for (int j = 0; j < A; ++j) {
    const __m512 p1 = _mm512_div_ps(_mm512_load_ps(C.e[j]), s1);
    _mm512_store_ps(C.e[j], p1);
    const __mmask16 under = C.v[j] & _mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ);
    nu = _mm512_mask_add_ps(nu, under, nu, one);
    po = _mm512_mask_add_ps(po, C.v[j] & ~under, po, p1);
  }
  const __m512 a_s = clamp_min16(_mm512_sub_ps(one, _mm512_mul_ps(nu, fl.f)), 1e-8f);
  fl.s_f = _mm512_div_ps(a_s, clamp_min16(po, 1e-8f));
  fl.po = po;
  return fl;
}
// q = f on U, p1 s_f elsewhere (under: the lanes in U)
inline __m512 floor_q(const FloorLanes& fl, __m512 p1, __mmask16 under) {
  return _mm512_mask_blend_ps(under, _mm512_mul_ps(p1, fl.s_f), fl.f);
}

// ppo_core.h's flowing() / no_flow() lane-wise: x in the lanes of m (a zero as -0.0), +0.0 in the others
__m512 flowing16(__mmask16 m, __m512 x) {
  const __m512 z = _mm512_setzero_ps();
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(m, x), m & _mm512_cmp_ps_mask(x, z, _CMP_EQ_OQ), _mm512_set1_ps(-0.f));
}

// head_stat_terms (ppo_head_terms.h) over 16 lanes: values in a zmm register, conditions as a lane mask
struct LaneTerms {
  using V = __m512;
  using B = __mmask16;
  static V k(float x) { return _mm512_set1_ps(x); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static B gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static B lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static B eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static B ord(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q); }
  static B nonfinite(V a) { return (B)~_mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(INFINITY), _CMP_LT_OQ); }
  static B all(B a, B b) { return a & b; }
  static B any(B a, B b) { return a | b; }
  static B no(B a) { return (B)~a; }
};

// the lane accumulator of one head, by each statistic's kind: sums in double per lane, minima and maxima in
// float per lane, counts as popcounts of the condition
struct LaneSink {
  LaneAcc& acc;
  template <int K>
  void term(__mmask16 on, __m512 v) {
    constexpr int kind = kHeadKind[K], q = head_slot(K);
    if constexpr (kind == ESPER_KIND_SUM) {
      const __m512 x = _mm512_maskz_mov_ps(on, v);
      const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      const __m512d hi8 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      _mm512_store_pd(acc.sum[q], _mm512_add_pd(_mm512_load_pd(acc.sum[q]), lo8));
      _mm512_store_pd(acc.sum[q] + 8, _mm512_add_pd(_mm512_load_pd(acc.sum[q] + 8), hi8));
    } else if constexpr (kind == ESPER_KIND_MIN) {
      const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(INFINITY), on, v);
      _mm512_store_ps(acc.mn[q], _mm512_min_ps(_mm512_load_ps(acc.mn[q]), x));
    } else if constexpr (kind == ESPER_KIND_MAX) {
      const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), on, v);
      _mm512_store_ps(acc.mx[q], _mm512_max_ps(_mm512_load_ps(acc.mx[q]), x));
    } else {
      static_assert(kind == ESPER_KIND_COUNT, "a per-head statistic's kind without a lane rule");
      acc.cnt[q] += __builtin_popcount((unsigned)on);
    }
  }
};

// the forward of head h over one block: outputs, saved m, ls and coefficients, lane statistics, Lsum and flags
template <int DT>
void fast_forward(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows, FastCols& C,
                  LaneAcc& acc, float* Lsum, uint32_t* flags) {
  const int A = P.sizes[h], H = P.num_heads;
  HeadLanes L;
  head_lanes(P, F, h, B, rows, true, L);
  const __mmask16 live = (__mmask16)B.live, pres = (__mmask16)B.pres, rel = (__mmask16)L.rel;
  const __m512i MR = _mm512_load_si512(L.mrow);
  const __m512i idx = _mm512_maskz_mullo_epi32(live, iota16i(), _mm512_set1_epi32((int32_t)P.logits_rs[h]));
  const int es = DT == DT_F32 ? 4 : 2;
  const void* base = reinterpret_cast<const char*>(P.logits[h]) + B.b0 * P.logits_rs[h] * es;
  const __m512 fill = _mm512_set1_ps(P.mask_fill), one = _mm512_set1_ps(1.f);
  const __m512i av = _mm512_load_si512(L.act);
  const bool zp = F.zp.on;
  const float (*zs)[RB] = C.zs + F.zp.off[h];
  __m512 m = _mm512_set1_ps(-INFINITY), n = _mm512_setzero_ps(), za = _mm512_setzero_ps();
  __mmask16 taken = 0;
  for (int j = 0; j < A; ++j) {
    const __mmask16 vj = _mm512_test_epi32_mask(MR, _mm512_set1_epi32((int32_t)(1u << j)));
    const __m512 z = _mm512_mask_blend_ps(vj, fill, zp ? _mm512_load_ps(zs[j]) : gather_col<DT>(base, idx, j));
    _mm512_store_ps(C.z[j], z);
    C.v[j] = vj;
    m = _mm512_max_ps(z, m);  // NaN logits never become the max (as row_softmax)
    n = _mm512_mask_add_ps(n, vj, n, one);
    const __mmask16 isa = _mm512_cmpeq_epi32_mask(av, _mm512_set1_epi32(j));
    za = _mm512_mask_mov_ps(za, isa, z);
    taken |= isa & vj;
  }
  if (P.floor[h] > 0.f) {  // the floored logits zhat = log(max(q, 1e-8)) on valid columns, then as without
    const FloorLanes fl = floor_lanes(A, C, m, n, P.floor[h]);
    m = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < A; ++j) {
      const __m512 p1 = _mm512_load_ps(C.e[j]);
      const __mmask16 vj = C.v[j], under = vj & _mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ);
      const __m512 z = _mm512_mask_blend_ps(vj, fill, log16(clamp_min16(floor_q(fl, p1, under), 1e-8f)));
      _mm512_store_ps(C.z[j], z);
      m = _mm512_max_ps(z, m);
      za = _mm512_mask_mov_ps(za, _mm512_cmpeq_epi32_mask(av, _mm512_set1_epi32(j)), z);
    }
  }
  // one pass from the shifted logits d_j = z_j - m <= 0 (row_softmax): s = sum e_j, and over the valid columns
  // t2 = sum e_j, t1 = sum e_j d_j (e_j = exp(d_j)); then logp_j = d_j - log(s) and
  // -sum_V p_j logp_j = (log(s) t2 - t1) / s, two terms >= 0 (no cancellation). Rows without a valid action
  // (m = -inf with exclusion, absent steps) give NaN here and are set apart below
  __m512 s = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps();
  for (int j = 0; j < A; ++j) {
    const __m512 d = _mm512_sub_ps(_mm512_load_ps(C.z[j]), m);
    const __m512 e = exp16(d);
    s = _mm512_add_ps(s, e);
    t2 = _mm512_mask_add_ps(t2, C.v[j], t2, e);
    t1 = _mm512_mask3_fmadd_ps(e, d, t1, C.v[j]);
  }
  const __m512 ls = log16(s);
  const __mmask16 nonempty = _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_GT_OQ);
  __m512 ent = _mm512_maskz_div_ps(nonempty, _mm512_fmsub_ps(ls, t2, t1), s);  // 0 without a valid action
  if (P.normalize_entropy) {
    const __m512 ln = _mm512_i32gather_ps(_mm512_cvttps_epi32(n), log_tab().v, 4);
    ent = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(n, one, _CMP_GT_OQ), ent, ln);
  }
  ent = _mm512_maskz_mov_ps(pres, ent);
  // NaN out of range or without a valid action (-inf for an excluded taken action: d = -inf)
  __m512 ell =
      _mm512_mask_mov_ps(_mm512_set1_ps(NAN), (__mmask16)L.inr & nonempty, _mm512_sub_ps(_mm512_sub_ps(za, m), ls));
  ell = _mm512_maskz_mov_ps(pres, ell);  // absent steps: 0 (as the row path)
  // the saved m and ls: 0 without a valid action (as row_forward), never NaN
  const __m512 msave = _mm512_maskz_mov_ps(nonempty, m), lsave = _mm512_maskz_mov_ps(nonempty, ls);
  if (F.otr) {  // written as rows by flush_out
    _mm512_store_ps(C.oc[0][h], ell);
    _mm512_store_ps(C.oc[1][h], ent);
    _mm512_store_ps(C.oc[2][h], msave);
    _mm512_store_ps(C.oc[4][h], lsave);
  } else {
    const __m512i idxH = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H));
    const int64_t o = B.b0 * H + h;
    _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(P.log_probs) + o, live, idxH, ell, 4);
    _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(P.entropy) + o, live, idxH, ent, 4);
    _mm512_mask_i32scatter_ps(saved_m(P) + o, live, idxH, msave, 4);
    _mm512_mask_i32scatter_ps(saved_ls(P) + o, live, idxH, lsave, 4);
  }

  // head_step, lane-wise (the same float operations)
  const __m512 Cc = _mm512_set1_ps(P.log_clamp), nC = _mm512_set1_ps(-P.log_clamp);
  const __m512 lo = _mm512_set1_ps(1.f - P.eps_low), hic = _mm512_set1_ps(1.f + P.eps_high);
  const __m512 w = _mm512_load_ps(B.w);
  const __m512 ninf = _mm512_set1_ps(-INFINITY), pinf = _mm512_set1_ps(INFINITY);
  const __m512 d = _mm512_maskz_sub_ps(rel, ell, _mm512_load_ps(L.old));
  const __mmask16 inside = _mm512_cmp_ps_mask(d, nC, _CMP_GE_OQ) & _mm512_cmp_ps_mask(d, Cc, _CMP_LE_OQ);
  __m512 lr = _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(d, nC, _CMP_LT_OQ), nC);
  lr = _mm512_mask_mov_ps(lr, _mm512_cmp_ps_mask(d, Cc, _CMP_GT_OQ), Cc);
  lr = _mm512_maskz_mov_ps(rel, lr);
  const __m512 ratio = exp16(lr);
  const __m512 wr = _mm512_maskz_mov_ps(rel, w);
  __m512 pol = _mm512_setzero_ps();
  const __mmask16 flag = rel & inside;
  if (P.per_head) {
    const __m512 adv = _mm512_load_ps(L.adv);
    __m512 rc = _mm512_mask_mov_ps(ratio, _mm512_cmp_ps_mask(ratio, lo, _CMP_LT_OQ), lo);
    rc = _mm512_mask_mov_ps(rc, _mm512_cmp_ps_mask(ratio, hic, _CMP_GT_OQ), hic);
    const __m512 s1 = _mm512_mul_ps(ratio, adv), s2 = _mm512_mul_ps(rc, adv);
    const __mmask16 take1 = _mm512_cmp_ps_mask(s1, s2, _CMP_LE_OQ) | _mm512_cmp_ps_mask(s1, s1, _CMP_UNORD_Q);
    pol = _mm512_maskz_mul_ps(rel, wr, _mm512_mask_blend_ps(take1, s2, s1));
    const __mmask16 ug = flag & _mm512_cmp_ps_mask(s1, s2, _CMP_NGT_UQ);
    const __m512 u =  // (head_grads)
        flowing16(ug, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(w, adv)), ratio));
    if (F.otr) {
      _mm512_store_ps(C.oc[3][h], u);
    } else {
      const __m512i idxS = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H + 1));
      _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(P.saved) + B.b0 * (H + 1) + h, live, idxS, u, 4);
    }
  } else {
    const __m512i f = _mm512_maskz_set1_epi32(flag, (int32_t)(1u << h));
    _mm512_store_si512(flags, _mm512_or_si512(_mm512_load_si512(flags), f));
  }
  _mm512_store_ps(Lsum, _mm512_add_ps(_mm512_load_ps(Lsum), lr));
  LaneSink sink{acc};
  head_stat_terms<LaneTerms>(HeadRow<LaneTerms>{pres, rel, taken, w, pol, ent, ratio, lr, ell, n, lo, hic}, sink);
}

// row_backward's floored branch, lane-wise: the gradient d/d z of each column into C.g (0 on masked columns),
// with C.e = 0, so that the caller's g - p sigma (sigma = 0) leaves it as it is. zs: the packed columns (else
// gathered from base at idx); ms, ls: the saved m and ls of the floored logits; gl, ng: as fast_backward
template <int DT>
inline void floor_backward(const PPOParams& P, int h, int A, FastCols& C, __m512i MR, const float (*zs)[RB],
                           const void* base, __m512i idx, __m512 fill, __m512 ms, __m512 ls, __m512i av, __m512 gl,
                           __m512 ng) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  __m512 m = _mm512_set1_ps(-INFINITY), n = zero;
  for (int j = 0; j < A; ++j) {  // the masked logits, their max and the valid count
    const __mmask16 vj = _mm512_test_epi32_mask(MR, _mm512_set1_epi32((int32_t)(1u << j)));
    const __m512 z = _mm512_mask_blend_ps(vj, fill, zs ? _mm512_load_ps(zs[j]) : gather_col<DT>(base, idx, j));
    _mm512_store_ps(C.z[j], z);
    C.v[j] = vj;
    m = _mm512_max_ps(z, m);
    n = _mm512_mask_add_ps(n, vj, n, one);
  }
  const FloorLanes fl = floor_lanes(A, C, m, n, P.floor[h]);
  // d/d logp of the floored logits (as without a floor) and its sum sigma; p kept in C.z
  __m512 sig = zero;
  for (int j = 0; j < A; ++j) {
    const __m512 p1 = _mm512_load_ps(C.e[j]);
    const __mmask16 vj = C.v[j], under = vj & _mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ);
    const __m512 z = _mm512_mask_blend_ps(vj, fill, log16(clamp_min16(floor_q(fl, p1, under), 1e-8f)));
    const __m512 lp = _mm512_sub_ps(_mm512_sub_ps(z, ms), ls);
    const __m512 p = exp16(lp);
    __m512 g = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(av, _mm512_set1_epi32(j)), gl);
    g = _mm512_mask_add_ps(g, vj, g, _mm512_fmadd_ps(_mm512_mul_ps(ng, lp), p, _mm512_mul_ps(ng, p)));
    sig = _mm512_add_ps(sig, g);
    _mm512_store_ps(C.g[j], g);
    _mm512_store_ps(C.z[j], p);
  }
  // gq = d/d q (valid, q >= 1e-8), T = sum_O gq p1; G_O = sum_O g for the closed form (g moves to C.z)
  __m512 T = zero, GO = zero;
  __mmask16 bad = 0;  // lanes where a q on O is clamped (the chain is exact there, the closed form is not)
  for (int j = 0; j < A; ++j) {
    const __m512 p1 = _mm512_load_ps(C.e[j]);
    const __mmask16 vj = C.v[j], under = vj & _mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ), over = vj & ~under;
    const __m512 q = floor_q(fl, p1, under);
    const __m512 g = _mm512_load_ps(C.g[j]);
    const __m512 gz = _mm512_fnmadd_ps(_mm512_load_ps(C.z[j]), sig, g);
    const __mmask16 okq = vj & _mm512_cmp_ps_mask(q, _mm512_set1_ps(1e-8f), _CMP_GE_OQ);
    const __m512 gq = _mm512_maskz_div_ps(okq, gz, clamp_min16(q, 1e-8f));
    _mm512_store_ps(C.g[j], gq);
    _mm512_store_ps(C.z[j], g);
    T = _mm512_mask_add_ps(T, over, T, _mm512_mul_ps(gq, p1));
    GO = _mm512_mask_add_ps(GO, over, GO, g);
    bad |= over & _mm512_cmp_ps_mask(q, _mm512_set1_ps(1e-8f), _CMP_LT_OQ);
  }
  const __mmask16 pok = _mm512_cmp_ps_mask(fl.po, _mm512_set1_ps(1e-8f), _CMP_GE_OQ);
  // lanes where no 1e-8 clamp binds take the closed form [k in O] (g_k - p1_k G_O / P_O), as row_backward (the
  // chain's float32 terms cancel to noise near a uniform distribution); p1 * (G_O / P_O) is rounded before the
  // subtraction, as the row path does, so a lone action over the floor gets exactly 0
  const __mmask16 regular = pok & ~bad;
  const __m512 go_po = _mm512_div_ps(GO, clamp_min16(fl.po, 1e-8f));
  const __m512 g_po =
      _mm512_maskz_mul_ps(pok, _mm512_sub_ps(zero, T), _mm512_div_ps(fl.s_f, clamp_min16(fl.po, 1e-8f)));
  // d/d p1 on O: gq s_f + g_po; sig1 = sum_O of it times p1; then d/d z = p1 (gp1 - sig1) on valid columns
  __m512 sig1 = zero;
  for (int j = 0; j < A; ++j) {
    const __m512 p1 = _mm512_load_ps(C.e[j]);
    const __mmask16 vj = C.v[j], over = vj & ~_mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ);
    const __m512 gp1 = _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(C.g[j]), fl.s_f), g_po);
    sig1 = _mm512_mask_add_ps(sig1, over, sig1, _mm512_mul_ps(gp1, p1));
  }
  for (int j = 0; j < A; ++j) {
    const __m512 p1 = _mm512_load_ps(C.e[j]);
    const __mmask16 vj = C.v[j], over = vj & ~_mm512_cmp_ps_mask(p1, fl.f, _CMP_LT_OQ);
    const __m512 gp1 = _mm512_maskz_add_ps(over, _mm512_mul_ps(_mm512_load_ps(C.g[j]), fl.s_f), g_po);
    const __m512 chain = _mm512_maskz_mul_ps(vj, p1, _mm512_sub_ps(gp1, sig1));
    const __m512 closed = _mm512_maskz_sub_ps(over, _mm512_load_ps(C.z[j]), _mm512_mul_ps(p1, go_po));
    _mm512_store_ps(C.g[j], _mm512_mask_blend_ps(regular, chain, closed));
    _mm512_store_ps(C.e[j], zero);
  }
}

// the backward of head h over one block (gL, gE: incoming gradients of present lanes, 0 elsewhere)
template <int DT>
void fast_backward(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows, FastCols& C) {
  const int A = P.sizes[h], H = P.num_heads;
  HeadLanes L;
  head_lanes(P, F, h, B, rows, false, L);
  const __mmask16 live = (__mmask16)B.live, pres = (__mmask16)B.pres;
  const __m512i MR = _mm512_load_si512(L.mrow);
  const __m512i idx = _mm512_maskz_mullo_epi32(live, iota16i(), _mm512_set1_epi32((int32_t)P.logits_rs[h]));
  const __m512i gidx = _mm512_maskz_mullo_epi32(live, iota16i(), _mm512_set1_epi32((int32_t)P.grads_rs[h]));
  const int es = DT == DT_F32 ? 4 : 2;
  const void* base = reinterpret_cast<const char*>(P.logits[h]) + B.b0 * P.logits_rs[h] * es;
  char* gbase = reinterpret_cast<char*>(P.grads[h]) + B.b0 * P.grads_rs[h] * es;
  const __m512 fill = _mm512_set1_ps(P.mask_fill);
  const __m512i av = _mm512_load_si512(L.act);
  __m512 ms, ls, u;  // saved m, ls and coefficient (0 in lanes >= nb)
  if (F.otr) {       // staged as columns by fast_stage
    ms = _mm512_load_ps(C.oc[2][h]);
    ls = _mm512_load_ps(C.oc[4][h]);
    u = _mm512_load_ps(C.oc[3][h]);
  } else {
    const __m512i idxH = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H));
    ms = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idxH, saved_m(P) + B.b0 * H + h, 4);
    ls = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idxH, saved_ls(P) + B.b0 * H + h, 4);
    const __m512i idxS = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H + 1));
    u = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idxS,
                                 reinterpret_cast<const float*>(P.saved) + B.b0 * (H + 1) + h, 4);
  }
  // incoming gradients of ell and of the entropy (head_grads, lane-wise; 0 for absent steps)
  const __mmask16 fl = _mm512_test_epi32_mask(_mm512_castps_si512(u), _mm512_castps_si512(u));  // flows()
  __m512 l = _mm512_maskz_mul_ps(fl, u, _mm512_set1_ps(F.pscale[h]));
  __m512 e = _mm512_maskz_mul_ps((__mmask16)L.rel, _mm512_set1_ps(F.ecoef[h]), _mm512_load_ps(B.w));
  if (P.grad_log_probs.ptr || P.grad_entropy.ptr) {
    alignas(64) float gx[RB], ex[RB];
    for (int r = 0; r < RB; ++r) {
      const bool ok = (B.pres >> r) & 1u;
      gx[r] = (ok && P.grad_log_probs.ptr) ? load_m(P.grad_log_probs, B.b0 + r, h) : 0.f;
      ex[r] = (ok && P.grad_entropy.ptr) ? load_m(P.grad_entropy, B.b0 + r, h) : 0.f;
    }
    if (P.grad_log_probs.ptr) l = _mm512_add_ps(l, _mm512_load_ps(gx));
    if (P.grad_entropy.ptr) e = _mm512_add_ps(e, _mm512_load_ps(ex));
  }
  const __m512 gl = _mm512_maskz_mov_ps(pres & (__mmask16)L.inr, l);
  __m512 ghr = _mm512_maskz_mov_ps(pres, e);
  if (P.normalize_entropy) {
    alignas(64) int32_t nc[RB];
    for (int r = 0; r < RB; ++r) nc[r] = __builtin_popcount(L.mrow[r]);
    const __m512i ni = _mm512_load_si512(nc);
    const __m512 ln = _mm512_i32gather_ps(ni, log_tab().v, 4);
    ghr = _mm512_maskz_div_ps(_mm512_cmpgt_epi32_mask(ni, _mm512_set1_epi32(1)), ghr, ln);
  }
  const __m512 ng = _mm512_sub_ps(_mm512_setzero_ps(), ghr);
  // a non-finite upstream (row_backward's bad_upstream): NaN at every valid action of the lane's row
  const __mmask16 bad = pres & ~(finite16(gl) & finite16(ghr));
  const __m512 nan = _mm512_set1_ps(NAN);
  const bool zp = F.zp.on;
  const float (*zs)[RB] = C.zs + F.zp.off[h];
  __m512 sig = _mm512_setzero_ps();
  if (P.floor[h] > 0.f)  // the gradient into C.g, C.e = 0: the stores below leave it as it is (sig = 0)
    floor_backward<DT>(P, h, A, C, MR, zp ? zs : nullptr, base, idx, fill, ms, ls, av, gl, ng);
  for (int j = 0; j < A && !(P.floor[h] > 0.f); ++j) {  // without a floor
    const __mmask16 vj = _mm512_test_epi32_mask(MR, _mm512_set1_epi32((int32_t)(1u << j)));
    const __m512 z = _mm512_mask_blend_ps(vj, fill, zp ? _mm512_load_ps(zs[j]) : gather_col<DT>(base, idx, j));
    const __m512 lp = _mm512_sub_ps(_mm512_sub_ps(z, ms), ls);
    const __m512 p = exp16(lp);
    __m512 g = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(av, _mm512_set1_epi32(j)), gl);
    g = _mm512_mask_add_ps(g, vj, g, _mm512_fmadd_ps(_mm512_mul_ps(ng, lp), p, _mm512_mul_ps(ng, p)));
    sig = _mm512_add_ps(sig, g);
    _mm512_store_ps(C.g[j], g);
    _mm512_store_ps(C.e[j], p);
    C.v[j] = vj;
  }
  if (F.gp.on) {  // written as rows by flush_g
    float (*gs)[RB] = C.gs + F.gp.off[h];
    for (int j = 0; j < A; ++j) {
      const __m512 out =
          _mm512_maskz_mov_ps(C.v[j], _mm512_fnmadd_ps(_mm512_load_ps(C.e[j]), sig, _mm512_load_ps(C.g[j])));
      _mm512_store_ps(gs[j], _mm512_mask_mov_ps(out, C.v[j] & bad, nan));
    }
    return;
  }
  for (int j = 0; j < A; ++j) {
    __m512 out = _mm512_maskz_mov_ps(C.v[j], _mm512_fnmadd_ps(_mm512_load_ps(C.e[j]), sig, _mm512_load_ps(C.g[j])));
    out = _mm512_mask_mov_ps(out, C.v[j] & bad, nan);
    if (DT == DT_F32)
      _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(gbase) + j, live, gidx, out, 4);
    else
      _mm512_store_ps(C.g[j], out);
  }
  if (DT != DT_F32) {  // 16-bit gradients: two columns per 32-bit word (the last pair overlaps when A is odd)
    uint16_t* g16 = reinterpret_cast<uint16_t*>(gbase);
    for (int j = 0; j < A; j += 2) {
      const int j0 = j + 1 < A ? j : A - 2;
      const __m512i wv = _mm512_or_si512(to16<DT>(_mm512_load_ps(C.g[j0])),
                                         _mm512_slli_epi32(to16<DT>(_mm512_load_ps(C.g[j0 + 1])), 16));
      _mm512_mask_i32scatter_epi32(g16 + j0, live, gidx, wv, 2);
    }
  }
}

// global_step over one block, lane-wise (the same float operations): joint ratio, saved coefficients,
// lane statistics, the moments' values and weights (xs, xw at the block's rows)
inline void acc_sum(double* a, __m512 x) {
  const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d hi8 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  _mm512_store_pd(a, _mm512_add_pd(_mm512_load_pd(a), lo8));
  _mm512_store_pd(a + 8, _mm512_add_pd(_mm512_load_pd(a + 8), hi8));
}
// a += (double)x * (double)y where m, else nothing
inline void acc_dprod(double* a, __mmask16 m, __m512 x, __m512 y) {
  const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d x1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  const __m512d y0 = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
  const __m512d y1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
  _mm512_store_pd(a, _mm512_add_pd(_mm512_load_pd(a), _mm512_maskz_mul_pd((__mmask8)m, x0, y0)));
  _mm512_store_pd(a + 8, _mm512_add_pd(_mm512_load_pd(a + 8), _mm512_maskz_mul_pd((__mmask8)(m >> 8), x1, y1)));
}

void fast_global(const PPOParams& P, const FastPlan& F, const BlockIn& B, const float* Lsum, const uint32_t* flags,
                 FastCols& C, GlobalAcc& acc, float* xs, float* xw) {
  const int H = P.num_heads;
  const __mmask16 live = (__mmask16)B.live, pres = (__mmask16)B.pres;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  const __m512 lo = _mm512_set1_ps(1.f - P.eps_low), hic = _mm512_set1_ps(1.f + P.eps_high);
  const __m512 w = _mm512_load_ps(B.w), w_raw = _mm512_load_ps(B.w_raw);
  __m512 L = _mm512_load_ps(Lsum);
  __mmask16 jin = 0xffff;
  if (P.has_jclamp) {
    const __m512 cj = _mm512_set1_ps(P.joint_clamp), ncj = _mm512_set1_ps(-P.joint_clamp);
    jin = _mm512_cmp_ps_mask(L, ncj, _CMP_GE_OQ) & _mm512_cmp_ps_mask(L, cj, _CMP_LE_OQ);
    L = clamp16(L, ncj, cj);
  }
  L = _mm512_maskz_mov_ps(pres, L);
  const __m512 r = exp16(L);
  __m512 gpol = zero, base = zero;
  if (!P.per_head) {
    const __m512 a = _mm512_load_ps(B.adv0);
    const __m512 s1 = _mm512_mul_ps(r, a), s2 = _mm512_mul_ps(clamp16(r, lo, hic), a);
    const __mmask16 take1 = _mm512_cmp_ps_mask(s1, s2, _CMP_LE_OQ) | _mm512_cmp_ps_mask(s1, s1, _CMP_UNORD_Q);
    gpol = _mm512_maskz_mul_ps(pres, w, _mm512_mask_blend_ps(take1, s2, s1));
    base = flowing16(pres & jin & _mm512_cmp_ps_mask(s1, s2, _CMP_NGT_UQ),
                     _mm512_mul_ps(_mm512_sub_ps(zero, _mm512_mul_ps(w, a)), r));  // (head_grads)  // (head_grads)
  }
  __mmask16 vpres = 0, bad_vw = 0;
  __m512 vw = zero, vl = zero, vclip = zero, R = zero, v = zero, vsaved = zero;
  if (P.has_values) {
    __m512 vw_raw = w_raw;
    if (P.value_weights.ptr) vw_raw = f_lanes16(P.value_weights, B.b0, B.live, 1.f);
    const __mmask16 fin = finite16(vw_raw);
    vpres = live & fin & _mm512_cmp_ps_mask(vw_raw, zero, _CMP_GT_OQ);
    bad_vw = live & ~(fin & _mm512_cmp_ps_mask(vw_raw, zero, _CMP_GE_OQ));
    vw = _mm512_maskz_mov_ps(vpres, vw_raw);
    v = f_lanes16(P.values, B.b0, vpres, 0.f);
    R = f_lanes16(P.returns, B.b0, vpres, 0.f);
    const __m512 d1 = _mm512_sub_ps(v, R);
    const __m512 l1 = _mm512_mul_ps(d1, d1);
    const __m512 dl1 = _mm512_mul_ps(two, d1);
    __m512 dvl;
    __mmask16 vflow = 0xFFFF;
    if (P.has_vclip) {
      const __m512 dc = _mm512_set1_ps(P.value_clip), ndc = _mm512_set1_ps(-P.value_clip);
      const __m512 vo = f_lanes16(P.old_values, B.b0, vpres, 0.f);
      const __m512 dv = _mm512_sub_ps(v, vo);
      __m512 vc = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(dv, ndc, _CMP_LT_OQ), _mm512_sub_ps(vo, dc));
      vc = _mm512_mask_mov_ps(vc, _mm512_cmp_ps_mask(dv, dc, _CMP_GT_OQ), _mm512_add_ps(vo, dc));
      const __m512 d2 = _mm512_sub_ps(vc, R);
      const __m512 l2 = _mm512_mul_ps(d2, d2);
      vl = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(l1, l1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(l1, l2, _CMP_GE_OQ), l2,
                                l1);
      const __mmask16 l2gt = _mm512_cmp_ps_mask(l2, l1, _CMP_GT_OQ), l1gt = _mm512_cmp_ps_mask(l1, l2, _CMP_GT_OQ);
      vclip = _mm512_maskz_mov_ps(vpres & l2gt, vw);
      const __mmask16 inside = _mm512_cmp_ps_mask(dv, ndc, _CMP_GE_OQ) & _mm512_cmp_ps_mask(dv, dc, _CMP_LE_OQ);
      const __m512 dl2 = _mm512_maskz_mul_ps(inside, two, d2);
      vflow = (__mmask16) ~(l2gt & ~inside);  // the clipped branch alone, its clamp binding: nothing flows
      const __m512 half = _mm512_set1_ps(0.5f);
      dvl = _mm512_add_ps(_mm512_mul_ps(half, dl1), _mm512_mul_ps(half, dl2));
      dvl = _mm512_mask_mov_ps(dvl, l2gt, dl2);
      dvl = _mm512_mask_mov_ps(dvl, l1gt, dl1);
    } else {
      vl = l1;
      dvl = dl1;
    }
    vsaved = flowing16(vpres & vflow, _mm512_mul_ps(vw, dvl));  // (value_grad)
  }
  const __m512 res = _mm512_maskz_sub_ps(vpres, R, v);
  // per-step outputs
  float* jr = reinterpret_cast<float*>(P.joint_ratio) + B.b0;
  _mm512_mask_storeu_ps(jr, live, r);
  float* saved = reinterpret_cast<float*>(P.saved) + B.b0 * (H + 1);
  const __m512i idxS = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H + 1));
  if (F.otr)
    _mm512_store_ps(C.oc[3][H], vsaved);
  else
    _mm512_mask_i32scatter_ps(saved + H, live, idxS, vsaved, 4);
  if (!P.per_head) {
    const __m512i fl = _mm512_load_si512(flags);
    for (int h = 0; h < H; ++h) {
      const __mmask16 fh = _mm512_test_epi32_mask(fl, _mm512_set1_epi32((int32_t)(1u << h)));
      const __m512 uh = _mm512_maskz_mov_ps(fh, base);  // (head_grads)
      if (F.otr)
        _mm512_store_ps(C.oc[3][h], uh);
      else
        _mm512_mask_i32scatter_ps(saved + h, live, idxS, uh, 4);
    }
  }
  _mm512_mask_storeu_ps(xs, live, r);
  _mm512_mask_storeu_ps(xs + CHUNK, live, R);
  _mm512_mask_storeu_ps(xs + 2 * CHUNK, live, res);
  _mm512_mask_storeu_ps(xw, live, w);
  _mm512_mask_storeu_ps(xw + CHUNK, live, vw);
  _mm512_mask_storeu_ps(xw + 2 * CHUNK, live, vw);
  // statistics
  const __mmask16 over = _mm512_cmp_ps_mask(r, hic, _CMP_GT_OQ), under = _mm512_cmp_ps_mask(r, lo, _CMP_LT_OQ);
  const __m512 sums[GSUMS] = {
      w,
      gpol,
      _mm512_maskz_mul_ps(pres, w, _mm512_sub_ps(_mm512_sub_ps(r, one), L)),
      _mm512_maskz_mul_ps(pres, w, _mm512_sub_ps(zero, L)),
      _mm512_maskz_mov_ps(pres & (over | under), w),
      _mm512_maskz_mov_ps(pres & over, w),
      _mm512_maskz_mov_ps(pres & under, w),
      vw,
      _mm512_maskz_mul_ps(vpres, vw, vl),
      vclip,
  };
  for (int q = 0; q < GSUMS; ++q) acc_sum(acc.sum[q], sums[q]);
  acc_dprod(acc.sum[GSUMS], pres, w, r);
  acc_dprod(acc.sum[GSUMS + 1], vpres, vw, R);
  acc_dprod(acc.sum[GSUMS + 2], vpres, vw, res);
  const __m512 pinf = _mm512_set1_ps(INFINITY), ninf = _mm512_set1_ps(-INFINITY);
  const __mmask16 rk = pres & _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
  const __m512 mins[GMINS] = {_mm512_mask_mov_ps(pinf, rk, r), _mm512_mask_mov_ps(pinf, pres, r),
                              _mm512_mask_mov_ps(pinf, vpres, R), _mm512_mask_mov_ps(pinf, vpres, res)};
  const __m512 maxs[GMINS] = {_mm512_mask_mov_ps(ninf, rk, r), _mm512_mask_mov_ps(ninf, pres, r),
                              _mm512_mask_mov_ps(ninf, vpres, R), _mm512_mask_mov_ps(ninf, vpres, res)};
  for (int q = 0; q < GMINS; ++q) {
    _mm512_store_ps(acc.mn[q], _mm512_min_ps(_mm512_load_ps(acc.mn[q]), mins[q]));
    _mm512_store_ps(acc.mx[q], _mm512_max_ps(_mm512_load_ps(acc.mx[q]), maxs[q]));
  }
  const __mmask16 bad_w = live & ~(finite16(w_raw) & _mm512_cmp_ps_mask(w_raw, zero, _CMP_GE_OQ));
  acc.cnt[0] += __builtin_popcount((unsigned)pres);
  acc.cnt[1] += __builtin_popcount((unsigned)bad_w);
  acc.cnt[2] += __builtin_popcount((unsigned)vpres);
  acc.cnt[3] += P.has_values ? __builtin_popcount((unsigned)bad_vw) : 0;
}

}  // namespace

// ---- entry points (cpu_internal.h) ---------------------------------------------------------------------------
void fast_forward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows, FastCols& C,
                      LaneAcc& acc, float* Lsum, uint32_t* flags) {
  switch (P.logits_dtype) {
    case DT_F32:
      fast_forward<DT_F32>(P, F, h, B, rows, C, acc, Lsum, flags);
      break;
    case DT_F16:
      fast_forward<DT_F16>(P, F, h, B, rows, C, acc, Lsum, flags);
      break;
    default:
      fast_forward<DT_BF16>(P, F, h, B, rows, C, acc, Lsum, flags);
      break;
  }
}
void fast_backward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows,
                       FastCols& C) {
  switch (P.logits_dtype) {
    case DT_F32:
      fast_backward<DT_F32>(P, F, h, B, rows, C);
      break;
    case DT_F16:
      fast_backward<DT_F16>(P, F, h, B, rows, C);
      break;
    default:
      fast_backward<DT_BF16>(P, F, h, B, rows, C);
      break;
  }
}
// block_in without StepIn (load_step's operations, lane-wise)
void block_in_vec(const PPOParams& P, int64_t b0, int nb, BlockIn& B) {
  B.b0 = b0;
  B.nb = nb;
  B.live = nb >= RB ? 0xffffu : ((1u << nb) - 1u);
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 w_raw = P.weights.ptr ? f_lanes16(P.weights, b0, B.live, 1.f) : one;
  const __mmask16 pres =
      (__mmask16)B.live & finite16(w_raw) & _mm512_cmp_ps_mask(w_raw, _mm512_setzero_ps(), _CMP_GT_OQ);
  B.pres = pres;
  _mm512_store_ps(B.w_raw, w_raw);
  _mm512_store_ps(B.w, _mm512_maskz_mov_ps(pres, w_raw));
  _mm512_store_ps(B.adv0, adv_lanes(P, 0, b0, pres));
}
void fast_mask_rows(const FastPlan& F, const BlockIn& B, uint64_t* rows) {
  if (F.mpacked) mask_rows(F, B, rows);
}
void fast_global_any(const PPOParams& P, const FastPlan& F, const BlockIn& B, const float* Lsum, const uint32_t* flags,
                     FastCols& C, GlobalAcc& acc, float* xs, float* xw) {
  fast_global(P, F, B, Lsum, flags, C, acc, xs, xw);
}
// before a block's heads: the packed logits (forward and backward) and, in the backward, the saved m, ls and
// coefficients as columns
void fast_stage(const PPOParams& P, const FastPlan& F, const BlockIn& B, FastCols& C, bool fwd) {
  if (F.zp.on) {
    switch (P.logits_dtype) {
      case DT_F32:
        stage_z<DT_F32>(F, B, C);
        break;
      case DT_F16:
        stage_z<DT_F16>(F, B, C);
        break;
      default:
        stage_z<DT_BF16>(F, B, C);
        break;
    }
  }
  if (!fwd && F.otr) {
    const int H = P.num_heads;
    load_cols(saved_m(P) + B.b0 * H, H, B.nb, (__mmask16)((1u << H) - 1u), C.oc[2]);
    load_cols(saved_ls(P) + B.b0 * H, H, B.nb, (__mmask16)((1u << H) - 1u), C.oc[4]);
    load_cols(reinterpret_cast<const float*>(P.saved) + B.b0 * (H + 1), H + 1, B.nb, (__mmask16)((2u << H) - 1u),
              C.oc[3]);
  }
}
// after a block's heads: the forward's column outputs, the backward's packed gradients
void fast_flush(const PPOParams& P, const FastPlan& F, const BlockIn& B, const FastCols& C, bool fwd) {
  if (fwd) {
    if (!F.otr) return;
    const int H = P.num_heads;
    const __mmask16 hm = (__mmask16)F.hmask;
    store_cols(reinterpret_cast<float*>(P.log_probs) + B.b0 * H, H, B.nb, hm, C.oc[0]);
    store_cols(reinterpret_cast<float*>(P.entropy) + B.b0 * H, H, B.nb, hm, C.oc[1]);
    store_cols(saved_m(P) + B.b0 * H, H, B.nb, hm, C.oc[2]);
    store_cols(saved_ls(P) + B.b0 * H, H, B.nb, hm, C.oc[4]);
    store_cols(reinterpret_cast<float*>(P.saved) + B.b0 * (H + 1), H + 1, B.nb, (__mmask16)F.smask, C.oc[3]);
    return;
  }
  if (!F.gp.on) return;
  switch (P.logits_dtype) {
    case DT_F32:
      flush_g<DT_F32>(F, B, C);
      break;
    case DT_F16:
      flush_g<DT_F16>(F, B, C);
      break;
    default:
      flush_g<DT_BF16>(F, B, C);
      break;
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace esper

// esper_kernels: the per-step, per-head math of the fused PPO loss, written once for the CPU and the GPU.
//
// docs/fused_math.md is the contract (esper_kernels/reference.py the truth). Everything here is inline and
// ESPER_HD (__host__ __device__ under nvcc): dtype conversions, the masked (floored) log-softmax of one row
// of one head, its entropy and its closed-form backward, the per-(step, head) loss terms and statistics,
// the per-step joint ratio and value loss, the merge of partial statistics and the losses from the
// statistics vector.
//
// A row of one head is reached through a *row policy* R, so the same algorithm runs over a CPU row buffer,
// a thread's row of a shared-memory tile, or a whole CUDA block striding over a wide row:
//   float R::zhat(int j)   masked logit (mask_fill where the action is invalid; never NaN from masked data)
//   bool  R::use(int j)    valid action of a present step
//   T     R::reduce(T init, F f, C combine)   combine over j in [0, A) of f(j) (a fixed, deterministic order)
//   void  R::for_each(F f) f(j) for every j (the policy owns which thread runs which j)
//   void  R::store(int j, float g)            the gradient of column j
// Policies with a block-wide reduce need every thread of the block to reach each call (row-uniform control
// flow), which the functions below keep: every branch before a reduce depends on the row only.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ppo_params.h"

// ESPER_HD: a function of this header (and of the headers built on it). On the host it has internal linkage
// (static inline): the CPU backend compiles this header into translation units with different instruction
// sets (csrc/cpu/: the AVX-512 files are built with -mavx512f ...), and an inline function with external
// linkage would leave a COMDAT copy in each, of which the linker keeps one for every caller: an AVX-512 copy
// could then run on a CPU without AVX-512. ESPER_HDM: the same for member functions (inline; the structs that
// have them are in an anonymous namespace on the host for the same reason).
#if defined(__CUDACC__)
#define ESPER_HD __host__ __device__ __forceinline__
#define ESPER_HDM __host__ __device__ __forceinline__
#else
#define ESPER_HD static inline
#define ESPER_HDM inline
#endif

#include "ppo_head_terms.h"

namespace esper {

// --------------------------------------------------------------------------------------------------------
// scalar helpers (NaN semantics as torch: clamp/minimum/maximum propagate NaN)
// --------------------------------------------------------------------------------------------------------
ESPER_HD float f_inf() { return INFINITY; }
ESPER_HD float f_nan() { return NAN; }
// The saved coefficient of a (step, head) or a step: +0.0 where no gradient flows (an irrelevant head, a clipped
// or clamped ratio, an absent step, a binding value clamp on the clipped branch alone), read as exactly 0 whatever
// the upstream (autograd's where); a flowing coefficient that is zero is kept as -0.0, so that an infinite
// upstream still makes it NaN (0 x inf) as in the reference. (No fast-math here: signed zeros are kept.)
ESPER_HD float no_flow() { return 0.f; }
ESPER_HD float flowing(float c) { return c == 0.f ? -0.f : c; }
ESPER_HD bool flows(float u) {
  uint32_t b;
  memcpy(&b, &u, 4);
  return b != 0u;
}
ESPER_HD bool is_finite(float x) { return x == x && x != INFINITY && x != -INFINITY; }
ESPER_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
ESPER_HD float clamp_min(float x, float lo) { return x < lo ? lo : x; }
ESPER_HD float safe_div(float num, float den) { return den > 0.f ? num / den : 0.f; }
#ifndef __CUDA_ARCH__
// expf for the host: inline and branch-free, so row loops pipeline it and the row-vectorised CPU path
// auto-vectorises it. exp(x) = 2^k exp(r), r = (x log2e - k) ln2 in [-0.35, 0.35], exp(r) by its Taylor
// polynomial to degree 10 in double (relative error < 3e-13), rounded once to float: checked on every
// float, it equals the correctly rounded exp except at a handful of exact ties (1 ulp); glibc's expf differs
// from it on ~4e-5 of the inputs (1 ulp)
static inline float host_expf(float x) {
  const float xc = x > -104.0f ? (x < 89.0f ? x : 89.0f) : -104.0f;  // NaN -> -104 (selected away below)
  const double shift = 0x1.8p52;
  const double z = 0x1.71547652b82fep0 * (double)xc;
  double kd = z + shift;
  int64_t ki;
  memcpy(&ki, &kd, 8);  // low bits: k = round(z)
  kd -= shift;
  const double r = (z - kd) * 0x1.62e42fefa39efp-1;
  double p = 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t eb = (uint64_t)(ki + 1023 - 0x18000000000000LL) << 52;  // 2^k
  double sc;
  memcpy(&sc, &eb, 8);
  float out = (float)(p * sc);
  out = x > 0x1.62e42ep6f ? INFINITY : out;  // overflow (x > log(2^128)), +inf
  out = x < -0x1.9fe368p6f ? 0.0f : out;     // underflow (x < log(2^-150)), -inf
  return x != x ? x + x : out;               // NaN
}
#endif
ESPER_HD float ek_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return host_expf(x);
#endif
}
ESPER_HD float ek_log(float x) { return logf(x); }
ESPER_HD float fmin_nn(float a, float b) { return b < a ? b : a; }  // inputs never NaN (pre-selected)
ESPER_HD float fmax_nn(float a, float b) { return b > a ? b : a; }
ESPER_HD double dmin_nn(double a, double b) { return b < a ? b : a; }
ESPER_HD double dmax_nn(double a, double b) { return b > a ? b : a; }

ESPER_HD uint32_t f2u(float f) {
  union {
    float f;
    uint32_t u;
  } c;
  c.f = f;
  return c.u;
}
ESPER_HD float u2f(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } c;
  c.u = u;
  return c.f;
}

// IEEE half / bfloat16 <-> float, round to nearest even (as torch's .to())
ESPER_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24 (exact)
    return sign ? -v : v;
  }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
ESPER_HD uint16_t float_to_half(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   // NaN
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {                                    // half subnormal (or zero)
    float v = u2f(ax) * 16777216.0f;                         // * 2^24, exact
    return (uint16_t)(sign | (uint32_t)rintf(v));            // rint: ties to even; 1024 = smallest normal
  }
  uint32_t em = ax - 0x38000000u;  // rebias 127 -> 15
  em += 0xfffu + ((em >> 13) & 1u);
  return (uint16_t)(sign | (em >> 13));
}
ESPER_HD float bf16_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }
ESPER_HD uint16_t float_to_bf16(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

ESPER_HD float load_elem(uintptr_t base, int64_t off, int32_t dt) {
  switch (dt) {
    case DT_F32:
      return reinterpret_cast<const float*>(base)[off];
    case DT_F16:
      return half_to_float(reinterpret_cast<const uint16_t*>(base)[off]);
    case DT_BF16:
      return bf16_to_float(reinterpret_cast<const uint16_t*>(base)[off]);
    case DT_F64:
      return (float)reinterpret_cast<const double*>(base)[off];
    case DT_U8:
      return reinterpret_cast<const uint8_t*>(base)[off] ? 1.f : 0.f;
    case DT_I32:
      return (float)reinterpret_cast<const int32_t*>(base)[off];
    case DT_I64:
      return (float)reinterpret_cast<const int64_t*>(base)[off];
  }
  return 0.f;
}
ESPER_HD float load_f(const Vec& v, int64_t i) { return load_elem(v.ptr, i * v.stride, v.dtype); }
ESPER_HD float load_m(const Mat& m, int64_t i, int64_t j) {
  return load_elem(m.ptr, i * m.stride0 + j * m.stride1, m.dtype);
}
ESPER_HD int64_t load_i(const Vec& v, int64_t i) {
  int64_t off = i * v.stride;
  switch (v.dtype) {
    case DT_I32:
      return reinterpret_cast<const int32_t*>(v.ptr)[off];
    case DT_I64:
      return reinterpret_cast<const int64_t*>(v.ptr)[off];
    case DT_U8:
      return reinterpret_cast<const uint8_t*>(v.ptr)[off];
  }
  return 0;
}
ESPER_HD bool load_b(const Vec& v, int64_t i) { return reinterpret_cast<const uint8_t*>(v.ptr)[i * v.stride] != 0; }

ESPER_HD void store_elem(uintptr_t base, int64_t off, int32_t dt, float g) {
  switch (dt) {
    case DT_F32:
      reinterpret_cast<float*>(base)[off] = g;
      break;
    case DT_F16:
      reinterpret_cast<uint16_t*>(base)[off] = float_to_half(g);
      break;
    case DT_BF16:
      reinterpret_cast<uint16_t*>(base)[off] = float_to_bf16(g);
      break;
  }
}

// logits / mask element j of row i of head h (masked logit: fill where invalid; absent rows: all invalid)
ESPER_HD float load_logit(const PPOParams& P, int h, int64_t i, int64_t j) {
  return load_elem(P.logits[h], i * P.logits_rs[h] + j, P.logits_dtype);
}
ESPER_HD bool load_valid(const PPOParams& P, int h, int64_t i, int64_t j) {
  return !P.has_mask || reinterpret_cast<const uint8_t*>(P.masks[h])[i * P.masks_rs[h] + j] != 0;
}

// --------------------------------------------------------------------------------------------------------
// one row of one head: masked (floored) log-softmax, entropy, backward
// --------------------------------------------------------------------------------------------------------
struct RowIn {
  int64_t a;      // taken action (only used when in_range)
  bool in_range;  // 0 <= a < A
  float floor;    // prob_floor (<= 0: off)
  float fill;     // mask_fill; -inf when invalid actions are excluded (mask_exclude): exp(-inf - m) = 0
  bool norm_ent;  // normalize_entropy
};

struct D2 {
  double x, y;
};
struct MaxCnt {
  float m, c;
};

struct FloorC {
  float m1, s1, f, s_f, po;
};

// the log-softmax of a row from its shifted logits: logp_j = (zhat_j - m) - ls, m the row max (NaN logits never
// become it), ls = log sum_k exp(zhat_k - m). Never zhat_j - (m + ls): that rounds at the magnitude of zhat (2e-6
// at a common offset of 50, 5e-4 at 1e4); zhat_j - m is exact for logits within a factor 2 of m. A row without
// a valid action (m = -inf with exclusion, or an absent step) gives NaN here: its outputs are set apart.
struct RowSm {
  float m;   // max of the final (floored) masked logits
  float ls;  // log sum exp(zhat - m) of them
  float n;   // valid actions
  bool floor_on;
  FloorC fc;
};

ESPER_HD float log_prob(float z, float m, float ls) { return (z - m) - ls; }

// esper's floor: f = min(floor, 0.99 / max(n, 1)) as torch computes it (reciprocal, then * 0.99)
ESPER_HD float floor_f(float n, float floor) {
  float f = (1.0f / (n < 1.f ? 1.f : n)) * 0.99f;
  return f > floor ? floor : f;
}

// the floored logit of one element from its un-floored masked logit (also q, p1 and "over")
ESPER_HD float floor_elem(float zh1, bool use, const FloorC& fc, float fill, float& q, float& p1, bool& over) {
  p1 = ek_exp(zh1 - fc.m1) / fc.s1;
  bool under = use && (p1 < fc.f);
  over = use && !(p1 < fc.f);
  q = under ? fc.f : p1 * fc.s_f;
  return use ? ek_log(clamp_min(q, 1e-8f)) : fill;
}

template <class R>
ESPER_HD float row_zfinal(const R& row, const RowSm& sm, float fill, int j) {
  float zh = row.zhat(j);
  if (!sm.floor_on) return zh;
  float q, p1;
  bool over;
  return floor_elem(zh, row.use(j), sm.fc, fill, q, p1, over);
}

// the row's log-softmax constants: m and ls of the (floored) masked logits, the valid count, the floor's constants
template <class R>
ESPER_HD RowSm row_softmax(const R& row, const RowIn& in) {
  RowSm sm;
  MaxCnt mc = row.reduce(
      MaxCnt{-INFINITY, 0.f}, [&](int j) { return MaxCnt{row.zhat(j), row.use(j) ? 1.f : 0.f}; },
      [](MaxCnt a, MaxCnt b) { return MaxCnt{b.m > a.m ? b.m : a.m, a.c + b.c}; });
  sm.n = mc.c;
  sm.floor_on = in.floor > 0.f;
  float m = mc.m;
  if (sm.floor_on) {
    FloorC fc;
    fc.m1 = m;
    float m1 = fc.m1;
    fc.s1 = (float)row.reduce(
        0.0, [&](int j) { return (double)ek_exp(row.zhat(j) - m1); }, [](double a, double b) { return a + b; });
    fc.f = floor_f(sm.n, in.floor);
    float s1 = fc.s1, f = fc.f;
    D2 np = row.reduce(
        D2{0.0, 0.0},
        [&](int j) {
          float p1 = ek_exp(row.zhat(j) - m1) / s1;
          bool u = row.use(j);
          return D2{(u && p1 < f) ? 1.0 : 0.0, (u && !(p1 < f)) ? (double)p1 : 0.0};
        },
        [](D2 a, D2 b) { return D2{a.x + b.x, a.y + b.y}; });
    float a_s = clamp_min(1.0f - (float)np.x * f, 1e-8f);
    fc.po = (float)np.y;
    fc.s_f = a_s / clamp_min(fc.po, 1e-8f);
    sm.fc = fc;
    m = row.reduce(
        -INFINITY, [&](int j) { return row_zfinal(row, sm, in.fill, j); },
        [](float a, float b) { return b > a ? b : a; });
  } else {
    sm.fc = FloorC{0.f, 1.f, 0.f, 1.f, 0.f};
  }
  float s = (float)row.reduce(
      0.0, [&](int j) { return (double)ek_exp(row_zfinal(row, sm, in.fill, j) - m); },
      [](double a, double b) { return a + b; });
  sm.m = m;
  sm.ls = ek_log(s);
  return sm;
}

struct RowFwd {
  float ell;    // log-prob of the taken action (NaN when out of range or without a valid action; -inf when excluded)
  float ent;    // entropy as used in the loss (normalised when asked; 0 without a valid action)
  float n;      // valid actions
  bool taken;   // the taken action is in range and valid
  float m, ls;  // the row's log-softmax constants (RowSm); 0 without a valid action
};

template <class R>
ESPER_HD RowFwd row_forward(const R& row, const RowIn& in) {
  RowSm sm = row_softmax(row, in);
  const float m = sm.m, ls = sm.ls;
  D2 hp = row.reduce(
      D2{0.0, 0.0},
      [&](int j) {
        if (!row.use(j)) return D2{0.0, 0.0};
        float lp = log_prob(row_zfinal(row, sm, in.fill, j), m, ls);
        float p = ek_exp(lp);
        return D2{(double)(p * lp), (double)p};
      },
      [](D2 a, D2 b) { return D2{a.x + b.x, a.y + b.y}; });
  RowFwd out;
  float ent = -(float)hp.x;
  if (in.norm_ent) ent = sm.n > 1.f ? ent / ek_log(sm.n < 2.f ? 2.f : sm.n) : 0.f;
  out.ent = ent;
  out.n = sm.n;
  int ja = in.in_range ? (int)in.a : 0;
  // no log-prob for an action out of range, nor in a row without a valid action (as an out-of-range action)
  out.ell = (in.in_range && sm.n > 0.f) ? log_prob(row_zfinal(row, sm, in.fill, ja), m, ls) : f_nan();
  out.taken = in.in_range && row.use(ja);
  // (a row without a valid action needs neither: 0, never the NaN of -inf - -inf, so the saved values are defined)
  out.m = sm.n > 0.f ? m : 0.f;
  out.ls = sm.n > 0.f ? ls : 0.f;
  return out;
}

// the gradient rule of a row whose upstream gradient (gL, or the raw entropy's ghr) is NaN or infinite: NaN at
// every valid action, 0 at masked ones (docs/semantics.md section 3)
ESPER_HD bool bad_upstream(float gL, float ghr) { return !is_finite(gL) || !is_finite(ghr); }

// d loss / d logits of one row: gL = incoming gradient of ell (0 when the action is out of range), gE = of the
// entropy as output
template <class R>
ESPER_HD void row_backward(R& row, const RowIn& in, float gL, float gE) {
  RowSm sm = row_softmax(row, in);
  const float m = sm.m, ls = sm.ls;
  float ghr = gE;
  if (in.norm_ent) ghr = sm.n > 1.f ? gE / ek_log(sm.n < 2.f ? 2.f : sm.n) : 0.f;
  if (bad_upstream(gL, ghr)) {  // (row-uniform: every thread of a block policy takes the same branch)
    row.for_each([&](int j) { row.store(j, row.use(j) ? f_nan() : 0.f); });
    return;
  }
  float ng = -ghr;
  int64_t a = in.in_range ? in.a : -1;
  float fill = in.fill;
  // d/d logp_j (autograd's terms: the gather of ell, then -sum_V p logp directly and through p = exp(logp))
  auto gl = [&](int j, float z, float& p) {
    float lp = log_prob(z, m, ls);
    p = ek_exp(lp);
    float g = (j == a) ? gL : 0.f;
    return g + (row.use(j) ? ng * p + (ng * lp) * p : 0.f);
  };
  float sig = (float)row.reduce(
      0.0,
      [&](int j) {
        float p;
        return (double)gl(j, row_zfinal(row, sm, fill, j), p);
      },
      [](double x, double y) { return x + y; });
  if (!sm.floor_on) {
    row.for_each([&](int j) {
      float p;
      float g = gl(j, row.zhat(j), p);
      row.store(j, row.use(j) ? g - p * sig : 0.f);
    });
    return;
  }
  // through the floor: q = f on U, p1 s on O (s depends on P_O = sum_O p1); p1 = softmax(un-floored)
  FloorC fc = sm.fc;
  auto gq_of = [&](int j, float& p1, bool& over) {
    float q, p;
    bool u = row.use(j);
    float z = floor_elem(row.zhat(j), u, fc, fill, q, p1, over);
    float g = gl(j, z, p);  // (sets p: its own statement, so p is read after)
    float gz = g - p * sig;
    return (u && q >= 1e-8f) ? gz / clamp_min(q, 1e-8f) : 0.f;
  };
  // where no 1e-8 clamp binds (P_O >= 1e-8, q >= 1e-8 on O) the chain below simplifies exactly to
  // [k in O] (g_k - p1_k G_O / P_O), G_O = sum_O g, g = d/d logp (docs/fused_math.md): accurate near a uniform
  // distribution, where the chain's float32 terms (O(1) in the incoming gradients) cancel to ~1e-6 noise.
  // (regular is the same for every column of the row: block-wide reduces stay row-uniform)
  D2 go = row.reduce(
      D2{0.0, 0.0},
      [&](int j) {
        float q, p1, p;
        bool over;
        float z = floor_elem(row.zhat(j), row.use(j), fc, fill, q, p1, over);
        float g = gl(j, z, p);
        return D2{over ? (double)g : 0.0, (over && q < 1e-8f) ? 1.0 : 0.0};
      },
      [](D2 a, D2 b) { return D2{a.x + b.x, a.y + b.y}; });
  if (fc.po >= 1e-8f && go.y == 0.0) {
    const float go_po = (float)go.x / clamp_min(fc.po, 1e-8f);
    row.for_each([&](int j) {
      float q, p1, p;
      bool over;
      float z = floor_elem(row.zhat(j), row.use(j), fc, fill, q, p1, over);
      float g = gl(j, z, p);
      row.store(j, (row.use(j) && over) ? g - p1 * go_po : 0.f);
    });
    return;
  }
  float T = (float)row.reduce(
      0.0,
      [&](int j) {
        float p1;
        bool over;
        float gq = gq_of(j, p1, over);
        return over ? (double)(gq * p1) : 0.0;
      },
      [](double x, double y) { return x + y; });
  float g_po = fc.po >= 1e-8f ? -T * (fc.s_f / clamp_min(fc.po, 1e-8f)) : 0.f;
  float sig1 = (float)row.reduce(
      0.0,
      [&](int j) {
        float p1;
        bool over;
        float gq = gq_of(j, p1, over);
        return over ? (double)((gq * fc.s_f + g_po) * p1) : 0.0;
      },
      [](double x, double y) { return x + y; });
  row.for_each([&](int j) {
    float p1;
    bool over;
    float gq = gq_of(j, p1, over);
    float gp1 = over ? gq * fc.s_f + g_po : 0.f;
    row.store(j, row.use(j) ? p1 * (gp1 - sig1) : 0.f);
  });
}

// (sums accumulate in float64 and round once: closer to torch's accurate float32 sums than a running float)

// a row already in memory: zhat (masked logits) and use flags at stride 1 (CPU row buffer, or one thread's
// row of a shared-memory tile); reductions in column order
namespace {  // (internal linkage: see ESPER_HDM)
struct BufRow {
  const float* z;
  const uint8_t* u;
  float* g;
  int A;
  ESPER_HDM float zhat(int j) const { return z[j]; }
  ESPER_HDM bool use(int j) const { return u[j] != 0; }
  template <class T, class F, class C>
  ESPER_HDM T reduce(T acc, F f, C c) const {
    for (int j = 0; j < A; ++j) acc = c(acc, f(j));
    return acc;
  }
  template <class F>
  ESPER_HDM void for_each(F f) const {
    for (int j = 0; j < A; ++j) f(j);
  }
  ESPER_HDM void store(int j, float v) const { g[j] = v; }
};
}  // namespace

// --------------------------------------------------------------------------------------------------------
// per step and per (step, head): loss terms, saved coefficients, statistics contributions
// --------------------------------------------------------------------------------------------------------
// global contributions: the statistics layout, then min/max of each moment's value (exactness of means)
enum { GX_RMIN = ESPER_GLOBAL_SIZE, GX_RMAX, GX_TMIN, GX_TMAX, GX_EMIN, GX_EMAX, GX_SIZE };
enum { KIND_SUM = 0, KIND_MIN = 1, KIND_MAX = 2 };

ESPER_HD int head_kind(int k) {  // counts are sums here
  const int kind = head_stat_kind(k);
  return kind == ESPER_KIND_MIN ? KIND_MIN : kind == ESPER_KIND_MAX ? KIND_MAX : KIND_SUM;
}
ESPER_HD int global_kind(int k) {
  return (k == G_RATIO_MIN || k == GX_RMIN || k == GX_TMIN || k == GX_EMIN)   ? KIND_MIN
         : (k == G_RATIO_MAX || k == GX_RMAX || k == GX_TMAX || k == GX_EMAX) ? KIND_MAX
                                                                              : KIND_SUM;
}
// kind of entry k of the statistics vector (moments excluded: see merge_moment)
ESPER_HD int stat_kind(int k) {
  return k < ESPER_GLOBAL_SIZE ? global_kind(k) : head_kind((k - ESPER_GLOBAL_SIZE) % ESPER_HEAD_SIZE);
}
ESPER_HD double kind_init(int kind) {
  return kind == KIND_MIN ? (double)INFINITY : kind == KIND_MAX ? -(double)INFINITY : 0.0;
}
ESPER_HD double kind_combine(int kind, double a, double b) {
  return kind == KIND_MIN ? dmin_nn(a, b) : kind == KIND_MAX ? dmax_nn(a, b) : a + b;
}

// the three weighted moments: (weight entry, mean entry, M2 entry, min slot, max slot)
ESPER_HD void moment_slots(int g, int& wi, int& mi, int& qi, int& lo, int& hi) {
  wi = g == 0 ? G_WEIGHT : G_VALUE_WEIGHT;
  mi = g == 0 ? G_RATIO_MEAN : g == 1 ? G_RETURN_MEAN : G_RESID_MEAN;
  qi = mi + 1;
  lo = GX_RMIN + 2 * g;
  hi = lo + 1;
}
// the mean of one part from (sum w, sum w x, min x, max x): exactly x when every kept x is equal
ESPER_HD double moment_mean(double W, double S1, double xmin, double xmax) {
  if (!(W > 0)) return 0.0;
  if (S1 != S1) return S1;
  if (xmin == xmax) return xmin;
  return S1 / W;
}
// M2 of a moment whose mean is not finite: a kept +inf or -inf makes the mean that infinity and the spread
// infinite; both infinities, or a NaN value, make both NaN (docs/semantics.md section 5). (The sum w x of the
// kept values, in double, is non-finite exactly when one of them is: it cannot overflow from float32 values.)
ESPER_HD double nonfinite_m2(double mean) { return mean != mean ? mean : (double)INFINITY; }
ESPER_HD bool finite_d(double x) { return x == x && x != (double)INFINITY && x != -(double)INFINITY; }

// Chan et al.: merge the moments (wb, mb, qb) into (wa, ma, qa); equal means merge exactly. A part with a
// non-finite mean decides alone: the means add as IEEE numbers (inf + inf = inf, inf - inf = NaN) and M2 follows
// nonfinite_m2 (never the inf - inf = NaN of the shifted formulas)
ESPER_HD void chan_merge(double& wa, double& ma, double& qa, double wb, double mb, double qb) {
  if (wb > 0) {
    if (!(wa > 0)) {
      wa = wb;
      ma = mb;
      qa = qb;
    } else if (!finite_d(ma) || !finite_d(mb)) {
      wa = wa + wb;
      ma = ma + mb;
    } else {
      double w = wa + wb;
      double d = mb - ma;
      ma = ma + d * (wb / w);
      qa = qa + qb + d * d * (wa * wb / w);
      wa = w;
    }
  }
  if (wa > 0 && !finite_d(ma)) qa = nonfinite_m2(ma);
}

struct StepIn {
  bool present;  // finite w > 0
  float w;       // w where present, else 0
  float w_raw;
  float adv0;  // advantage (column 0 when per-head), 0 when absent
};

// the advantage of head h at step i (its column of [N, H] advantages, or the one column); with normalize_adv,
// (A - mean) / denominator of its column from the pre-pass (adv_norm: (mean, denominator) per column)
ESPER_HD float load_adv(const PPOParams& P, int h, int64_t i) {
  const float a = load_f(P.adv[h], i);
  if (!P.normalize_adv) return a;
  const float* nm = reinterpret_cast<const float*>(P.adv_norm) + 2 * (P.adv_per_head ? h : 0);
  return (a - nm[0]) / nm[1];
}

ESPER_HD StepIn load_step(const PPOParams& P, int64_t i) {
  StepIn s;
  s.w_raw = P.weights.ptr ? load_f(P.weights, i) : 1.f;
  s.present = is_finite(s.w_raw) && s.w_raw > 0.f;
  s.w = s.present ? s.w_raw : 0.f;
  s.adv0 = s.present ? load_adv(P, 0, i) : 0.f;
  return s;
}

struct HeadIn {
  int64_t a;
  bool in_range;
  bool rel;  // present and relevant
};

ESPER_HD HeadIn load_head(const PPOParams& P, int h, int64_t i, bool present) {
  HeadIn hi;
  hi.a = load_i(P.actions[h], i);
  hi.in_range = hi.a >= 0 && hi.a < (int64_t)P.sizes[h];
  hi.rel = present && (!P.has_rel || load_b(P.rel[h], i));
  return hi;
}

ESPER_HD RowIn row_in(const PPOParams& P, int h, const HeadIn& hi) {
  RowIn in;
  in.a = hi.a;
  in.in_range = hi.in_range;
  in.floor = P.floor[h];
  in.fill = P.mask_fill;
  in.norm_ent = P.normalize_entropy != 0;
  return in;
}

struct HeadStep {
  float lr;   // clamped log-ratio (0 unless relevant)
  float u;    // per_head: unnormalised d PL / d ell (times den_h)
  bool flag;  // relevant and the log-ratio clamp passes the gradient (joint surrogate)
};

// the (step, head) loss terms and the head's statistics contributions c[HEAD_SIZE]
ESPER_HD HeadStep head_step(const PPOParams& P, int h, int64_t i, const StepIn& s, const HeadIn& hi, const RowFwd& rf,
                            double* c) {
  const float C = P.log_clamp, lo = 1.f - P.eps_low, hi_c = 1.f + P.eps_high;
  const bool rel = hi.rel;
  float old = rel ? load_f(P.old_lp[h], i) : 0.f;
  float d = rel ? rf.ell - old : 0.f;
  bool inside = d >= -C && d <= C;
  float lr = rel ? clampf(d, -C, C) : 0.f;
  float ratio = ek_exp(lr);
  float wr = rel ? s.w : 0.f;
  float pol = 0.f, u = no_flow();  // (head_grads)
  if (P.per_head) {
    float adv = P.adv_per_head ? (s.present ? load_adv(P, h, i) : 0.f) : s.adv0;
    float s1 = ratio * adv, s2 = clampf(ratio, lo, hi_c) * adv;
    float surr = (s1 <= s2 || s1 != s1) ? s1 : s2;
    pol = rel ? wr * surr : 0.f;
    u = (rel && inside && !(s1 > s2)) ? flowing(-(s.w * adv) * ratio) : no_flow();
  }
  const bool pres = s.present;
  const float n = rf.n, ell = rf.ell;
  RowTermSink<double> sink{c, 1};
  head_stat_terms<ScalarTerms>(HeadRow<ScalarTerms>{pres, rel, rf.taken, s.w, pol, rf.ent, ratio, lr, ell, n, lo, hi_c},
                               sink);
  HeadStep out;
  out.lr = lr;
  out.u = u;
  out.flag = rel && inside;
  return out;
}

// one step's value-loss terms (docs/semantics.md 2.11), shared by the CPU rows and the CUDA one-pass kernels
struct ValueTerms {
  bool vpres;   // a finite value weight > 0 (values given)
  bool bad_vw;  // a negative or non-finite value weight
  bool vflow;   // a gradient flows into v (not where the clipped branch alone is taken and its clamp binds)
  float vw;     // the value weight (0 where !vpres)
  float v, R;   // the value and the return (0 where !vpres)
  float vl;     // the squared error, or the larger of the plain and clipped ones with value clipping
  float vclip;  // vw where the clipped error is the larger one, else 0
  float dvl;    // d vl / d v (each branch's share at a tie, as torch.maximum)
};

ESPER_HD ValueTerms value_terms(const PPOParams& P, int64_t i, float w_raw) {
  ValueTerms t{false, false, true, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (!P.has_values) return t;
  const float vw_raw = P.value_weights.ptr ? load_f(P.value_weights, i) : w_raw;
  const bool fin = is_finite(vw_raw);
  t.vpres = fin && vw_raw > 0.f;
  t.bad_vw = !fin || vw_raw < 0.f;
  t.vw = t.vpres ? vw_raw : 0.f;
  t.v = t.vpres ? load_f(P.values, i) : 0.f;
  t.R = t.vpres ? load_f(P.returns, i) : 0.f;
  const float d1 = t.v - t.R;
  const float l1 = d1 * d1;
  const float dl1 = 2.f * d1;
  if (P.has_vclip) {
    const float dc = P.value_clip;
    const float vo = t.vpres ? load_f(P.old_values, i) : 0.f;
    const float dv = t.v - vo;
    const float vc = dv > dc ? vo + dc : (dv < -dc ? vo - dc : t.v);
    const float d2 = vc - t.R;
    const float l2 = d2 * d2;
    t.vl = (l1 != l1 || l1 >= l2) ? l1 : l2;
    t.vclip = (t.vpres && l2 > l1) ? t.vw : 0.f;
    const bool inside = dv >= -dc && dv <= dc;
    const float dl2 = inside ? 2.f * d2 : 0.f;
    t.dvl = l1 > l2 ? dl1 : (l2 > l1 ? dl2 : 0.5f * dl1 + 0.5f * dl2);
    t.vflow = !(l2 > l1 && !inside);  // the clipped branch alone, its clamp binding: nothing flows
  } else {
    t.vl = l1;
    t.dvl = dl1;
  }
  return t;
}

struct GlobalStep {
  float r;       // joint ratio
  float base;    // joint: unnormalised d PL / d ell for every flagged head (times W)
  float vsaved;  // unnormalised d VL / d v (times VW)
  float x[3];    // the moments' values: r, R, R - v
  float xw[3];   // and their weights (0 where not kept)
};

// the step's joint ratio, joint surrogate and value loss, and the global contributions c[GX_SIZE]
// (moment entries: weight, sum w x, M2 = 0; min/max of x in the GX slots)
ESPER_HD GlobalStep global_step(const PPOParams& P, int64_t i, const StepIn& s, float Lsum, double* c) {
  const float lo = 1.f - P.eps_low, hi_c = 1.f + P.eps_high;
  const bool pres = s.present;
  const float w = s.w;
  bool jin = true;
  float L = Lsum;
  if (P.has_jclamp) {
    jin = Lsum >= -P.joint_clamp && Lsum <= P.joint_clamp;
    L = clampf(Lsum, -P.joint_clamp, P.joint_clamp);
  }
  L = pres ? L : 0.f;
  float r = ek_exp(L);
  GlobalStep g;
  g.r = r;
  g.base = no_flow();
  float gpol = 0.f;
  if (!P.per_head) {
    float a = s.adv0;
    float s1 = r * a, s2 = clampf(r, lo, hi_c) * a;
    float surr = (s1 <= s2 || s1 != s1) ? s1 : s2;
    gpol = pres ? w * surr : 0.f;
    g.base = (pres && jin && !(s1 > s2)) ? flowing(-(w * a) * r) : no_flow();
  }
  // value loss
  const ValueTerms vt = value_terms(P, i, s.w_raw);
  const bool vpres = vt.vpres, bad_vw = vt.bad_vw;
  const float vw = vt.vw, vl = vt.vl, vclip = vt.vclip, R = vt.R, v = vt.v;
  g.vsaved = (vpres && vt.vflow) ? flowing(vw * vt.dvl) : no_flow();  // (value_grad)
  float res = vpres ? R - v : 0.f;
  bool rk = pres && r == r;
  c[G_STEPS] = pres ? 1.0 : 0.0;
  c[G_WEIGHT] = w;
  c[G_POLICY_NUM] = gpol;
  c[G_KL_K3] = pres ? w * ((r - 1.f) - L) : 0.f;
  c[G_KL_K1] = pres ? w * -L : 0.f;
  c[G_CLIP] = (pres && (r > hi_c || r < lo)) ? w : 0.f;
  c[G_CLIP_POS] = (pres && r > hi_c) ? w : 0.f;
  c[G_CLIP_NEG] = (pres && r < lo) ? w : 0.f;
  c[G_RATIO_MEAN] = pres ? (double)w * (double)r : 0.0;
  c[G_RATIO_M2] = 0.0;
  c[G_RATIO_MIN] = rk ? r : f_inf();
  c[G_RATIO_MAX] = rk ? r : -f_inf();
  c[G_BAD_WEIGHTS] = (!is_finite(s.w_raw) || s.w_raw < 0.f) ? 1.0 : 0.0;
  c[G_VALUE_STEPS] = vpres ? 1.0 : 0.0;
  c[G_VALUE_WEIGHT] = vw;
  c[G_VALUE_NUM] = vpres ? vw * vl : 0.f;
  c[G_VALUE_CLIP] = vclip;
  c[G_RETURN_MEAN] = vpres ? (double)vw * (double)R : 0.0;
  c[G_RETURN_M2] = 0.0;
  c[G_RESID_MEAN] = vpres ? (double)vw * (double)res : 0.0;
  c[G_RESID_M2] = 0.0;
  c[G_BAD_VALUE_WEIGHTS] = (P.has_values && bad_vw) ? 1.0 : 0.0;
  c[GX_RMIN] = pres ? r : f_inf();
  c[GX_RMAX] = pres ? r : -f_inf();
  c[GX_TMIN] = vpres ? R : f_inf();
  c[GX_TMAX] = vpres ? R : -f_inf();
  c[GX_EMIN] = vpres ? res : f_inf();
  c[GX_EMAX] = vpres ? res : -f_inf();
  g.x[0] = r;
  g.x[1] = R;
  g.x[2] = res;
  g.xw[0] = pres ? w : 0.f;
  g.xw[1] = vw;
  g.xw[2] = vw;
  return g;
}

// the four losses (loss, policy, entropy, value) from the (merged) statistics vector; kcoef: per-head entropy
// coefficients (the metric table of ppo_metrics.h reuses this)
ESPER_HD void loss_terms(int H, bool per_head, const float* kcoef, float entropy_coef, float value_coef,
                         const float* st, float* out) {
  float pl = 0.f, el = 0.f;
  for (int h = 0; h < H; ++h) {
    const float* hs = st + ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE;
    if (per_head) pl += safe_div(hs[HD_POLICY_NUM], hs[HD_REL_WEIGHT]);
    el += kcoef[h] * safe_div(hs[HD_ENTROPY_NUM], hs[HD_REL_WEIGHT]);
  }
  pl = per_head ? -pl : -safe_div(st[G_POLICY_NUM], st[G_WEIGHT]);
  el = -el;
  float vl = 0.5f * safe_div(st[G_VALUE_NUM], st[G_VALUE_WEIGHT]);
  out[0] = pl + entropy_coef * el + value_coef * vl;
  out[1] = pl;
  out[2] = el;
  out[3] = vl;
}

ESPER_HD void losses_from_stats(const PPOParams& P, const float* st, float* out) {
  loss_terms(P.num_heads, P.per_head != 0, P.kcoef, P.entropy_coef, P.value_coef, st, out);
}

// --------------------------------------------------------------------------------------------------------
// backward scalars
// --------------------------------------------------------------------------------------------------------
struct GradScal {
  float g_pol, g_ent, g_val;
};

ESPER_HD GradScal grad_scalars(const PPOParams& P) {
  float g[4] = {0.f, 0.f, 0.f, 0.f};
  if (P.grad_losses.ptr)
    for (int k = 0; k < 4; ++k) g[k] = load_f(P.grad_losses, k);
  GradScal gs;
  gs.g_pol = g[0] + g[1];
  gs.g_ent = P.entropy_coef * g[0] + g[2];
  gs.g_val = P.value_coef * g[0] + g[3];
  return gs;
}

// incoming gradients of ell_ih (gL) and of the output entropy (gE) of a present step
ESPER_HD void head_grads(const PPOParams& P, const float* st, const GradScal& gs, int h, int64_t i, const StepIn& s,
                         const HeadIn& hi, float& gL, float& gE) {
  const int H = P.num_heads;
  float den = st[ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE + HD_REL_WEIGHT];
  float pscale = safe_div(gs.g_pol, P.per_head ? den : st[G_WEIGHT]);
  // the saved coefficient: no_flow() where nothing flows (an irrelevant head, a clipped or clamped ratio): exactly 0
  // whatever the upstream (autograd's where); a flowing one is scaled (0 x inf = NaN, NaN stays NaN)
  float u = reinterpret_cast<const float*>(P.saved)[i * (H + 1) + h];
  float l = flows(u) ? u * pscale : 0.f;
  if (P.grad_log_probs.ptr) l += load_m(P.grad_log_probs, i, h);
  gL = hi.in_range ? l : 0.f;
  float ecoef = safe_div(gs.g_ent * -P.kcoef[h], den);
  float e = hi.rel ? ecoef * s.w : 0.f;
  if (P.grad_entropy.ptr) e += load_m(P.grad_entropy, i, h);
  gE = e;
}

ESPER_HD float value_grad(const PPOParams& P, const float* st, const GradScal& gs, int64_t i) {
  const int H = P.num_heads;
  float vscale = safe_div(gs.g_val * 0.5f, st[G_VALUE_WEIGHT]);
  // no_flow() saved where nothing flows (an absent step, a binding clamp on the clipped branch alone): exactly 0
  const float u = reinterpret_cast<const float*>(P.saved)[i * (H + 1) + H];
  return flows(u) ? u * vscale : 0.f;
}

}  // namespace esper

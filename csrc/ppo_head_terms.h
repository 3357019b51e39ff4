// esper_kernels: one row's contribution to each per-head statistic (esper_kernels/schema.py's HeadStat),
// stated once for every C++ path: the scalar row of ppo_core.h (cpu row and block paths), the CUDA one-pass
// kernels of ppo_onepass.h, and the AVX-512 lanes of cpu/avx512_small.cpp.
//
// Each term is a (condition, value) pair. A row whose condition is false contributes its statistic's identity
// (0 for a sum or a count, +inf for a minimum, -inf for a maximum); a count's value is 1. The caller's sink
// turns the pair into its own storage by the statistic's kind (the generated ESPER_HEAD_STATS list), so that a
// new per-head statistic is one line in schema.py and one line here for all C++ backends (docs/architecture.md).
//
// O supplies the value type V and the condition type B with their operations: ScalarTerms (float, bool) here,
// and the 16-lane AVX-512 one (__m512, __mmask16) in cpu/avx512_small.cpp.
#pragma once

#include <math.h>

#include "ppo_params.h"

// ESPER_HD / ESPER_HDM: see ppo_core.h, which includes this header after defining them
namespace esper {
namespace {  // (internal linkage on the host: see ESPER_HDM)

// the inputs of one head on one row (or 16 rows, lane-wise)
template <class O>
struct HeadRow {
  using V = typename O::V;
  using B = typename O::B;
  B pres;    // the step is present (finite weight > 0)
  B rel;     // ... and the head is relevant on it
  B taken;   // the taken action is in range and valid
  V w;       // the step's weight
  V pol;     // the per-head surrogate's numerator w * surr (0 when irrelevant, or with the joint surrogate)
  V ent;     // the head's entropy on the row
  V ratio;   // exp(lr): the head's ratio
  V lr;      // the clamped log-ratio (0 when irrelevant)
  V ell;     // the taken action's log-prob
  V n;       // valid actions of the row
  V lo, hi;  // 1 - eps_low, 1 + eps_high: the clip range
};

// the terms: put.template term<HD_X>(condition, value), one per HeadStat, in any order
template <class O, class Sink>
ESPER_HD void head_stat_terms(const HeadRow<O>& r, Sink& put) {
  using V = typename O::V;
  using B = typename O::B;
  const V one = O::k(1.f);
  const B ok_ell = O::all(r.rel, O::ord(r.ell));
  put.template term<HD_REL_WEIGHT>(r.rel, r.w);
  put.template term<HD_POLICY_NUM>(r.rel, r.pol);
  put.template term<HD_ENTROPY_NUM>(r.rel, O::mul(r.w, r.ent));
  put.template term<HD_KL_NUM>(r.rel, O::mul(r.w, O::sub(O::sub(r.ratio, one), r.lr)));
  put.template term<HD_CLIP_NUM>(O::all(r.rel, O::any(O::gt(r.ratio, r.hi), O::lt(r.ratio, r.lo))), r.w);
  put.template term<HD_RATIO_MAX>(O::all(r.rel, O::ord(r.ratio)), r.ratio);
  put.template term<HD_LOGP_MIN>(ok_ell, r.ell);
  put.template term<HD_LOGP_MAX>(ok_ell, r.ell);
  put.template term<HD_NONFINITE>(O::all(r.pres, O::nonfinite(r.ell)), one);
  put.template term<HD_EMPTY_MASK>(O::all(r.pres, O::eq(r.n, O::k(0.f))), one);
  put.template term<HD_INVALID_ACTION>(O::all(r.pres, O::no(r.taken)), one);
  put.template term<HD_VALID_MIN>(r.pres, r.n);
  put.template term<HD_VALID_MAX>(r.pres, r.n);
  put.template term<HD_VALID_SUM>(r.pres, O::mul(r.w, r.n));
  put.template term<HD_SINGLE>(O::all(r.pres, O::eq(r.n, one)), r.w);
  put.template term<HD_LEARNABLE>(O::all(r.rel, O::gt(r.n, one)), r.w);
}

// ---- the kinds, at compile time ----------------------------------------------------------------------------
constexpr int kHeadKind[ESPER_HEAD_SIZE] = {
#define ESPER_X(NAME, KIND) KIND,
    ESPER_HEAD_STATS(ESPER_X)
#undef ESPER_X
};
// position of statistic k among the head statistics of its kind (a lane accumulator's row)
constexpr int head_slot(int k) {
  int s = 0;
  for (int j = 0; j < k; ++j) s += kHeadKind[j] == kHeadKind[k];
  return s;
}
// how many head statistics have this kind
constexpr int head_kind_count(int kind) {
  int s = 0;
  for (int j = 0; j < ESPER_HEAD_SIZE; ++j) s += kHeadKind[j] == kind;
  return s;
}
static_assert(head_kind_count(ESPER_KIND_MEAN) == 0 && head_kind_count(ESPER_KIND_M2) == 0,
              "per-head moments need a merge rule in every C++ path (see merge_moment)");

// ---- one row, in float ----------------------------------------------------------------------------------------
struct ScalarTerms {
  using V = float;
  using B = bool;
  static ESPER_HDM V k(float x) { return x; }
  static ESPER_HDM V mul(V a, V b) { return a * b; }
  static ESPER_HDM V sub(V a, V b) { return a - b; }
  static ESPER_HDM B gt(V a, V b) { return a > b; }
  static ESPER_HDM B lt(V a, V b) { return a < b; }
  static ESPER_HDM B eq(V a, V b) { return a == b; }
  static ESPER_HDM B ord(V a) { return a == a; }
  static ESPER_HDM B nonfinite(V a) { return !(a == a && a != INFINITY && a != -INFINITY); }
  static ESPER_HDM B all(B a, B b) { return a && b; }
  static ESPER_HDM B any(B a, B b) { return a || b; }
  static ESPER_HDM B no(B a) { return !a; }
};

// a sink writing each term (or its identity) to c[k * cs], in T (float or double)
template <class T>
struct RowTermSink {
  T* c;    // the row's per-head contributions
  int cs;  // their stride (elements)
  template <int K>
  ESPER_HDM void term(bool on, float v) {
    constexpr int kind = kHeadKind[K];
    const float id = kind == ESPER_KIND_MIN ? INFINITY : kind == ESPER_KIND_MAX ? -INFINITY : 0.f;
    c[K * cs] = (T)(on ? v : id);
  }
};

}  // namespace
}  // namespace esper

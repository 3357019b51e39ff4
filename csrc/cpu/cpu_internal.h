// esper_kernels CPU backend: what the driver (driver.cpp) and the paths' files share.
//
// Files (each its own translation unit, built with its own flags by csrc/CMakeLists.txt):
//   driver.cpp       chunks, threads, the row path (ppo_core.h over a row buffer), forward_chunk /
//                    backward_rows, the AVX-512 plan (fast_plan) and the entry points cpu_forward / cpu_backward
//   block.cpp        the auto-vectorised block path (RB rows in SIMD lanes, bitwise the row path's results)
//   avx512_math.h    AVX-512 helpers (exp16, log16, tr16, ...), included by the AVX-512 files only
//   avx512_small.cpp the AVX-512 small-head path (heads of at most SMALL actions, floored or not)
//   avx512_wide.cpp  the AVX-512 wide path (heads of more than SMALL actions, no floor)
// The AVX-512 files are compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (x86-64 GCC/Clang only, where
// CMake defines ESPER_CPU_AVX512=1); the driver calls them only when the CPU has AVX-512 (cpu_has_avx512).
// Linkage: everything an AVX-512 file defines is internal except its entry points (namespace esper::cpu::avx512,
// declared below), and every function of the shared headers (ppo_core.h, this file) has internal linkage, so
// the linker can never pick an AVX-512 copy of a shared function for a generic caller (tests/test_cpu_isa.py
// checks the object files).
#pragma once

#include <stdint.h>
#include <string.h>

#include "ppo_core.h"

#ifndef ESPER_CPU_AVX512
#define ESPER_CPU_AVX512 0
#endif

namespace esper {
namespace cpu {

constexpr int64_t CHUNK = 128;  // rows per chunk (fixed: the reduction order depends on it, not on threads)
constexpr int RB = 16;          // rows per vectorised block (CHUNK is a multiple)
constexpr int SMALL = 32;       // heads of at most SMALL actions run row-vectorised
static_assert(CHUNK % RB == 0, "CHUNK must be a multiple of RB");
constexpr int64_t FAST_MAX_RS = int64_t(1) << 26;  // row strides (elements) whose 16-row offsets fit int32
constexpr int SPAN = 64;                           // columns of a packed block (FastPlan::Span2D)

// the saved log-softmax constants of (row i, head h) at [i * H + h], for the AVX-512 backward: the row max m,
// then ls = log sum exp(zhat - m), each [N, H] after the [N, H + 1] coefficients (CpuBackend.saved_shape is
// [N, 3H + 1])
static inline float* saved_m(const PPOParams& P) { return reinterpret_cast<float*>(P.saved) + P.n * (P.num_heads + 1); }
static inline float* saved_ls(const PPOParams& P) { return saved_m(P) + P.n * P.num_heads; }

// the gradient row g of row i of head h into the grads tensor, in the logits' dtype (g == nullptr: zeros)
static inline void store_row(const PPOParams& P, int h, int64_t i, const float* g) {
  const int A = P.sizes[h];
  const int64_t off = i * P.grads_rs[h];
  switch (P.logits_dtype) {
    case DT_F32: {
      float* d = reinterpret_cast<float*>(P.grads[h]) + off;
      if (g)
        memcpy(d, g, sizeof(float) * A);
      else
        memset(d, 0, sizeof(float) * A);
      break;
    }
    case DT_F16: {
      uint16_t* d = reinterpret_cast<uint16_t*>(P.grads[h]) + off;
      for (int j = 0; j < A; ++j) d[j] = g ? float_to_half(g[j]) : (uint16_t)0;
      break;
    }
    default: {
      uint16_t* d = reinterpret_cast<uint16_t*>(P.grads[h]) + off;
      for (int j = 0; j < A; ++j) d[j] = g ? float_to_bf16(g[j]) : (uint16_t)0;
      break;
    }
  }
}

// ---- small heads, RB rows at a time: the same operations in the same order as row_forward/row_backward over
// a BufRow (so bitwise the same results), with rows in the SIMD lanes (element j of row r at [j][r]) -----
struct SmallBuf {
  alignas(64) float z[SMALL][RB];  // masked logits
  alignas(64) float u[SMALL][RB];  // 1 = valid action of a present step
  alignas(64) float p[SMALL][RB];  // backward: p = exp(logp)
  alignas(64) float g[SMALL][RB];  // backward: d/d logp, then d/d z
  float zr[SMALL];                 // one gradient row, back in row order
};

// the block path (block.cpp): rows [b0, b0 + nb) of head h (no floor, at most SMALL actions)
void small_forward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi, RowFwd* out,
                   SmallBuf& B);
void small_backward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi, const float* gL,
                    const float* gE, SmallBuf& B);

// ---- the AVX-512 paths' state (filled and merged by the driver) ---------------------------------------------
// head statistics, by kind (ppo_head_terms.h's head_slot): the lanes sum (double), take the min / max of
// (float) or count
constexpr int NH_SUM = head_kind_count(ESPER_KIND_SUM), NH_MIN = head_kind_count(ESPER_KIND_MIN);
constexpr int NH_MAX = head_kind_count(ESPER_KIND_MAX), NH_CNT = head_kind_count(ESPER_KIND_COUNT);

struct LaneAcc {  // one head's statistics over one chunk, per lane
  alignas(64) double sum[NH_SUM][RB];
  alignas(64) float mn[NH_MIN][RB];
  alignas(64) float mx[NH_MAX][RB];
  int64_t cnt[NH_CNT];
  void init();                    // sums 0, minima +inf, maxima -inf, counts 0
  void fold(double* hacc) const;  // into hacc (initialised by kind): lanes in order
};

// the global statistics of one chunk, per lane (the same split as LaneAcc)
constexpr int GSUMS = 10, GDSUMS = 3, GCNTS = 4, GMINS = 4;
constexpr int GSUM_K[GSUMS] = {G_WEIGHT,   G_POLICY_NUM, G_KL_K3,        G_KL_K1,     G_CLIP,
                               G_CLIP_POS, G_CLIP_NEG,   G_VALUE_WEIGHT, G_VALUE_NUM, G_VALUE_CLIP};
constexpr int GDSUM_K[GDSUMS] = {G_RATIO_MEAN, G_RETURN_MEAN, G_RESID_MEAN};  // double products
constexpr int GCNT_K[GCNTS] = {G_STEPS, G_BAD_WEIGHTS, G_VALUE_STEPS, G_BAD_VALUE_WEIGHTS};
constexpr int GMIN_K[GMINS] = {G_RATIO_MIN, GX_RMIN, GX_TMIN, GX_EMIN};
constexpr int GMAX_K[GMINS] = {G_RATIO_MAX, GX_RMAX, GX_TMAX, GX_EMAX};

struct GlobalAcc {
  alignas(64) double sum[GSUMS + GDSUMS][RB];
  alignas(64) float mn[GMINS][RB];
  alignas(64) float mx[GMINS][RB];
  int64_t cnt[GCNTS];
  void init();
  void fold(double* gacc) const;
};

// one block of rows: the step inputs per lane
struct BlockIn {
  int64_t b0;
  int nb;
  uint32_t live, pres;  // lanes < nb; present steps
  alignas(64) float w[RB];
  alignas(64) float w_raw[RB];  // 1 in lanes >= nb
  alignas(64) float adv0[RB];
};

struct FastCols {  // one head's block, column-major: element j of lane r at [j][r]
  alignas(64) float z[SMALL][RB];
  alignas(64) float e[SMALL][RB];
  alignas(64) float g[SMALL][RB];
  // the block's logits (forward, backward) or gradients (backward) of every fast head, column-major, when
  // packed (FastPlan::zp / gp); column c of the span at [c]
  alignas(64) float zs[SPAN][RB];
  alignas(64) float gs[SPAN][RB];
  // per-(row, head) values in columns (FastPlan::otr): forward log_probs, entropy, m, the saved row (H + 1
  // columns) and ls; backward: saved m, coefficients and ls
  alignas(64) float oc[5][RB][RB];
  uint16_t v[SMALL];
};

// per-call constants of the AVX-512 path (shared by the threads)
struct FastPlan {
  bool fast[ESPER_MAX_HEADS];     // heads this call runs on the AVX-512 path
  bool fast_ok[ESPER_MAX_HEADS];  // heads it would run there
  bool wide[ESPER_MAX_HEADS];     // wide heads this call runs on the AVX-512 wide path (wide_forward / wide_backward)
  bool wide_ok[ESPER_MAX_HEADS];  // wide heads it would run there
  bool any = false;
  bool all = false;  // every head: the step inputs of a block are read as vectors (block_in_vec), no StepIn
  // masks of every fast head inside one 64-byte window of a row (packed [N, S] masks): one load per row
  bool mpacked = false;
  const uint8_t* mbase = nullptr;
  int64_t mrs = 0;
  uint64_t mbits = 0;  // the window's bytes that belong to fast heads
  int moff[ESPER_MAX_HEADS];
  // backward: d loss / d ell per unit of saved coefficient, d loss / d entropy per unit of weight
  float pscale[ESPER_MAX_HEADS], ecoef[ESPER_MAX_HEADS];
  // every fast head's logits (gradients) inside one span of at most SPAN columns with one row stride (packed
  // [N, S] tensors): a block moves as RB rows of the span, transposed in registers, instead of one gather
  // (scatter) per column; only the fast heads' columns are read or written (masked loads and stores)
  struct Span2D {
    bool on = false;
    uintptr_t lo = 0;   // the span's first column in row 0
    int64_t rs = 0;     // row stride (elements)
    int w = 0;          // columns
    uint64_t cols = 0;  // the fast heads' columns
    int off[ESPER_MAX_HEADS] = {};
  };
  Span2D zp, gp;
  // H + 1 <= RB: the [N, H] outputs (log_probs, entropy, m, ls) and the saved [N, H + 1] rows go through columns
  // of FastCols::oc, written (read) as RB contiguous rows of the block
  bool otr = false;
  uint32_t hmask = 0;  // columns of the fast heads
  uint32_t smask = 0;  // saved columns the fast path writes
  // the per-row memory streams of the call (bytes [lo, hi) of row i at base + i * stride), prefetched
  // PREFETCH_BLOCKS blocks ahead: with a dozen streams, the hardware prefetchers alone leave the gathers and
  // the per-row loads waiting on memory
  struct Span {
    uintptr_t base;
    int64_t stride, lo, hi;
    bool write;
  };
  static constexpr int MAX_SPANS = 8 * ESPER_MAX_HEADS + 16;
  Span spans[MAX_SPANS];
  int nspans = 0;
  // a stream to prefetch (merged into a span of the same stride when within one row of it); the driver's
  void stream(uintptr_t p, int64_t stride, int64_t len, bool write = false);
  void vec_stream(const Vec& v);
};

#if ESPER_CPU_AVX512
// ---- entry points of the AVX-512 files (call only when cpu_has_avx512()) --------------------------------------
namespace avx512 {
// avx512_small.cpp: the small-head path over one block of RB rows
void block_in_vec(const PPOParams& P, int64_t b0, int nb, BlockIn& B);  // the block's step inputs, lane-wise
void fast_mask_rows(const FastPlan& F, const BlockIn& B, uint64_t* rows);
void fast_stage(const PPOParams& P, const FastPlan& F, const BlockIn& B, FastCols& C, bool fwd);
void fast_forward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows, FastCols& C,
                      LaneAcc& acc, float* Lsum, uint32_t* flags);
void fast_backward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows,
                       FastCols& C);
void fast_global_any(const PPOParams& P, const FastPlan& F, const BlockIn& B, const float* Lsum, const uint32_t* flags,
                     FastCols& C, GlobalAcc& acc, float* xs, float* xw);
void fast_flush(const PPOParams& P, const FastPlan& F, const BlockIn& B, const FastCols& C, bool fwd);
// avx512_wide.cpp: one row of a wide head (a present step); the forward returns the row's m and ls in its
// RowFwd, the backward reads them from the saved values and uses pb, rb (A floats each) and vb (A / 8 + 2 bytes)
// as row buffers
RowFwd wide_forward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi);
void wide_backward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float gL, float gE, float* pb, float* rb,
                       uint8_t* vb);
}  // namespace avx512
#endif

}  // namespace cpu
}  // namespace esper

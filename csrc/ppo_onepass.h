// esper_kernels: the one-pass fused PPO loss (issue 12), written once for the CUDA kernels (csrc/ppo_cuda.cu)
// and for their host emulation (csrc/ppo_onepass_host.h, _C.onepass_host_*).
//
// A training step is three kernels:
//   pre-pass   the normalisers that depend on per-step inputs only: present-weight sum W, present-step count,
//              value-weight sum VW, each head's relevant-weight sum den_h, and the advantage moments of each
//              advantage column (normalize_advantages). Per-block partials; every block of the main kernel merges
//              them in the same fixed order (so no ticket is needed here), block 0 stores the merged normalisers.
//   main       the forward. Small heads (every head <= 32 actions): a block of R rows, one thread per row, the
//              block's rows staged into shared memory with coalesced (16-byte where aligned) loads; each head runs
//              a code path specialised on its padded width (RegRow<W>, values in registers, one exp per logit).
//              Wide heads: a cluster of CL blocks per row, each block holding a chunk of the row in shared memory
//              (or re-reading it when it does not fit: the streamed variant). While the row is on chip it writes
//              d loss / d logits for an upstream gradient of 1 on `loss`, and the per-block statistics partials;
//              the last block to finish (threadfence + ticket) merges them in a fixed order into the statistics
//              vector, the four losses and the metric table.
//   fix-up     the backward: reads the incoming gradients on the device and returns at once (upstream (1, 0, 0,
//              0), nothing on log_probs / entropy), rescales the gradient in place (only the loss's scalar
//              differs), or recomputes it from the logits (the main kernel's code with the given upstream).
//
// Everything is float32 (no float64 anywhere). The math is docs/semantics.md; the gradient docs/fused_math.md.
// The code below is ESPER_HD and is parameterised by an execution policy ("Exec": how a block's threads run a
// phase, synchronise and fold), so the kernels and the host emulation run the same per-row, per-block and
// last-block code; only the Exec primitives differ (threads vs loops, shuffles vs arrays, in the same order).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ppo_core.h"
#include "ppo_metrics.h"

// member functions: ESPER_HDM (ESPER_HD may be `static inline` on the host, which a member function cannot be);
// ppo_core.h defines it where it has it
#ifndef ESPER_HDM
#if defined(__CUDACC__)
#define ESPER_HDM __host__ __device__ __forceinline__
#else
#define ESPER_HDM inline
#endif
#endif

namespace esper {
namespace op {

// --------------------------------------------------------------------------------------------------------
// constants and layouts
// --------------------------------------------------------------------------------------------------------
constexpr int SMALL_W = 32;         // widest head of the thread-per-row path
constexpr int MAX_TILE_ROWS = 128;  // rows (threads) per block of the small path, at most
constexpr int NGROUPS = 8;          // a tile fold: each statistic folded by 8 threads over R / 8 rows each
constexpr int WIDE_THREADS = 256;   // threads per block of the wide path and of the pre-pass
constexpr int MAX_CLUSTER = 8;      // blocks per row of the wide path (portable cluster size)

// normalisers (pre-pass, merged): W, VW, present count, the fix-up's scale state, den_h, (mean, den) per column
enum : int { NM_W = 0, NM_VW = 1, NM_NPRES = 2, NM_SCALE = 3, NM_DEN = 4 };
ESPER_HD int norms_size(int H) { return NM_DEN + 3 * H; }
ESPER_HD int nm_adv(int H, int col) { return NM_DEN + H + 2 * col; }  // mean; den at +1
// pre-pass partial: W, present count, VW, den_h, then (w, mean, M2) per advantage column
enum : int { PRE_W = 0, PRE_N = 1, PRE_VW = 2, PRE_DEN = 3 };
ESPER_HD int pre_size(int H) { return PRE_DEN + 4 * H; }
ESPER_HD int pre_adv(int H, int col) { return PRE_DEN + H + 3 * col; }
// ctl: ticket counters (uint32): the main kernel's, the fix-up's (zeroed by the pre-pass, reset by their last block)
enum : int { CTL_MAIN = 0, CTL_FIX = 1, CTL_SIZE = 2 };

// statistic kinds as bit masks, from the schema's X-macros (never positions)
#define ESPER_X(NAME, KIND) | ((KIND) == ESPER_KIND_MIN ? (1u << HD_##NAME) : 0u)
constexpr uint32_t kHeadMin = 0u ESPER_HEAD_STATS(ESPER_X);
#undef ESPER_X
#define ESPER_X(NAME, KIND) | ((KIND) == ESPER_KIND_MAX ? (1u << HD_##NAME) : 0u)
constexpr uint32_t kHeadMax = 0u ESPER_HEAD_STATS(ESPER_X);
#undef ESPER_X
#define ESPER_X(NAME, KIND) | ((KIND) == ESPER_KIND_MIN ? (1u << G_##NAME) : 0u)
constexpr uint32_t kGlobalMin = 0u ESPER_GLOBAL_STATS(ESPER_X);
#undef ESPER_X
#define ESPER_X(NAME, KIND) | ((KIND) == ESPER_KIND_MAX ? (1u << G_##NAME) : 0u)
constexpr uint32_t kGlobalMax = 0u ESPER_GLOBAL_STATS(ESPER_X);
#undef ESPER_X
#define ESPER_X(NAME, KIND) | ((KIND) == ESPER_KIND_MEAN || (KIND) == ESPER_KIND_M2 ? (1u << G_##NAME) : 0u)
constexpr uint32_t kGlobalMoment = 0u ESPER_GLOBAL_STATS(ESPER_X);
#undef ESPER_X
static_assert(ESPER_GLOBAL_SIZE <= 32 && ESPER_HEAD_SIZE <= 32, "kind bit masks hold 32 statistics");

// the weighted moments (weight, mean, M2) of the global block
struct MomentIdx {
  int w, m, q;
};
#define ESPER_X(W, M, Q) +1
constexpr int NMOM = 0 ESPER_GLOBAL_MOMENTS(ESPER_X);
#undef ESPER_X
ESPER_HD MomentIdx moment_idx(int k) {  // (a chain of selects: no table in local memory)
  MomentIdx r{0, 0, 0};
  int c = 0;
#define ESPER_X(W, M, Q)                          \
  if (k == c) r = MomentIdx{G_##W, G_##M, G_##Q}; \
  ++c;
  ESPER_GLOBAL_MOMENTS(ESPER_X)
#undef ESPER_X
  return r;
}

ESPER_HD bool bit(uint32_t m, int k) { return ((m >> k) & 1u) != 0; }
// combine two values of one statistic by its kind (MIN/MAX inputs are never NaN: pre-selected)
ESPER_HD float kcombine(bool mn, bool mx, float a, float b) {
  const float lo = b < a ? b : a, hi = b > a ? b : a;
  return mn ? lo : (mx ? hi : a + b);
}
ESPER_HD float kident(bool mn, bool mx) { return mn ? INFINITY : (mx ? -INFINITY : 0.f); }
// order-preserving integer keys of (non-NaN) floats: the warp's integer min / max reduction (REDUX) takes them
ESPER_HD int32_t fkey(float x) {
  const int32_t b = (int32_t)f2u(x);
  return b >= 0 ? b : (b ^ 0x7fffffff);
}
ESPER_HD float fkey_inv(int32_t k) { return u2f((uint32_t)(k >= 0 ? k : (k ^ 0x7fffffff))); }
// min / max by key (as the warp reduction orders them: -0 < +0)
ESPER_HD float kminmax(bool mn, float a, float b) {
  return mn ? (fkey(b) < fkey(a) ? b : a) : (fkey(b) > fkey(a) ? b : a);
}

// a weighted moment: weight, mean, M2 = sum w (x - mean)^2. A non-finite mean marks values with an infinity (mean =
// that infinity, M2 = +inf) or a NaN / both infinities (NaN, NaN): merging keeps it (docs/semantics.md section 5)
struct Mom {
  float w, m, q;
};
ESPER_HD Mom mom_point(float w, float x) {
  if (!(w > 0.f)) return Mom{0.f, 0.f, 0.f};
  return Mom{w, x, is_finite(x) ? 0.f : (x != x ? x : INFINITY)};
}
// Chan et al.; equal means merge exactly (a constant quantity keeps M2 = 0)
ESPER_HD Mom mom_combine(Mom a, Mom b) {
  if (!(b.w > 0.f)) return a;
  if (!(a.w > 0.f)) return b;
  const float w = a.w + b.w;
  const bool fa = is_finite(a.m), fb = is_finite(b.m);
  if (!fa || !fb) {
    const float bad = (fa ? 0.f : a.m) + (fb ? 0.f : b.m);  // IEEE: inf + -inf and NaN give NaN
    return Mom{w, bad, bad != bad ? bad : INFINITY};
  }
  const float d = b.m - a.m;
  const float fb_w = b.w / w;
  return Mom{w, a.m + d * fb_w, a.q + b.q + d * d * (a.w * fb_w)};
}

// the fixed tree of a fold over 8 values (the xor shuffles 4, 2, 1 of the device: lane 0's operand order)
template <class T, class C>
ESPER_HD T tree8(T* v, C c) {
  for (int o = 4; o >= 1; o >>= 1) {
    T nv[8];
    for (int g = 0; g < 8; ++g) nv[g] = c(v[g], v[g ^ o]);
    for (int g = 0; g < 8; ++g) v[g] = nv[g];
  }
  return v[0];
}
// the fixed tree of a fold over 32 lanes (xor 16, 8, 4, 2, 1)
template <class T, class C>
ESPER_HD T tree32(T* v, C c) {
  for (int o = 16; o >= 1; o >>= 1) {
    T nv[32];
    for (int g = 0; g < 32; ++g) nv[g] = c(v[g], v[g ^ o]);
    for (int g = 0; g < 32; ++g) v[g] = nv[g];
  }
  return v[0];
}

// exp of the per-logit softmax terms: on the device ex2.approx(x log2 e) (2 instructions; relative error a few ulp
// plus |x| 2^-24, x <= 0 here: the terms far below the max, whose error does not reach the sums), on the host the
// accurate one
ESPER_HD float exp_fast(float x) {
#ifdef __CUDA_ARCH__
  float y;  // (ftz: a result below 2^-126 is 0; __expf would add a subnormal fix-up, 3 instructions)
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return ek_exp(x);
#endif
}
ESPER_HD int popc32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// --------------------------------------------------------------------------------------------------------
// the call's extra parameters (besides PPOParams)
// --------------------------------------------------------------------------------------------------------
// a segment: columns [col, col + ncols) of the row image, element (i, j) at ptr + (i * rs + j) * element size;
// consecutive heads whose tensors are one buffer with a common row stride form one segment
struct Seg {
  uintptr_t ptr;
  int64_t rs;
  int32_t col, ncols;
  uint64_t magic;  // ceil(2^40 / ncols): e / ncols = (e * magic) >> 40 for e < 2^20
};

// which kernel shape runs the call
enum : int { PATH_SMALL = 0, PATH_WIDE = 1, PATH_STREAM = 2 };

struct OnePass {
  int32_t path;
  int32_t S;        // columns of the row image (sum of head sizes)
  int32_t pitch;    // small path: shared-memory floats per row (odd, >= S): conflict-free row reads
  int32_t rows;     // small path: rows per tile (threads per block)
  int32_t wmax;     // small path: the padded width of the widest head (8, 16 or 32: the kernel instance)
  int32_t cluster;  // wide path: blocks per row
  int32_t chunk;    // wide path: columns per block (a multiple of 16)
  int32_t nseg_z, nseg_m, nseg_g;
  int32_t grid_pre;         // pre-pass blocks (partials)
  int32_t grid_main;        // main-kernel blocks (small: blocks; wide: clusters x cluster)
  int32_t nparts;           // main partials (small: blocks; wide: clusters)
  int32_t write_grad;       // the forward writes d loss / d logits (upstream 1) into P.grads
  int32_t write_gv;         // the forward writes d loss / d values into gv
  int32_t joint_c;          // small path, joint surrogate with gradient: the coefficient tile (shared memory)
  int32_t fixup;            // this launch is the fix-up (upstream from P.grad_losses / grad_log_probs / grad_entropy)
  int32_t force_recompute;  // fix-up: the gradient buffers hold nothing (recompute; no scale state)
  int32_t smem;             // dynamic shared memory per block (bytes)
  int32_t off[ESPER_MAX_HEADS];  // column offset of head h in the row image
  Seg zseg[ESPER_MAX_HEADS];
  Seg mseg[ESPER_MAX_HEADS];
  Seg gseg[ESPER_MAX_HEADS];
  uintptr_t norms;      // float [norms_size(H)]
  uintptr_t pre_parts;  // float [grid_pre * pre_size(H)]
  uintptr_t parts;      // float [nparts * K]
  uintptr_t ctl;        // uint32 [CTL_SIZE]
  uintptr_t table;      // float [metrics_size(H)] or 0
  uintptr_t gv;         // float [N] (d loss / d values) or 0
  uintptr_t gl[4];      // fix-up: float32 incoming gradients of loss, policy_loss, entropy_loss, value_loss (0: none)
  MetricsCfg mc;
};

ESPER_HD int dtype_size(int32_t dt) { return dt == DT_F32 ? 4 : (dt == DT_U8 ? 1 : 2); }
ESPER_HD int div_magic(int64_t e, const Seg& s) { return (int)(((uint64_t)e * s.magic) >> 40); }

// --------------------------------------------------------------------------------------------------------
// loads and stores of staged tiles (16 bytes at a time where the layout allows)
// --------------------------------------------------------------------------------------------------------
struct V16 {
  uint32_t w[4];
};
ESPER_HD V16 ld16(uintptr_t p) {
#ifdef __CUDA_ARCH__
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return V16{{v.x, v.y, v.z, v.w}};
#else
  V16 v;
  memcpy(&v, reinterpret_cast<const void*>(p), 16);
  return v;
#endif
}
ESPER_HD void st16(uintptr_t p, const V16& v) {  // (device: a streaming global store; the gradient is read later)
#ifdef __CUDA_ARCH__
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
#else
  memcpy(reinterpret_cast<void*>(p), &v, 16);
#endif
}
ESPER_HD uint32_t f_bits(float g, int32_t dt) {
  return dt == DT_F32 ? f2u(g) : (uint32_t)(dt == DT_F16 ? float_to_half(g) : float_to_bf16(g));
}
ESPER_HD float ld_f(uintptr_t base, int64_t off, int32_t dt) {
#ifdef __CUDA_ARCH__
  if (dt == DT_F32) return __ldg(reinterpret_cast<const float*>(base) + off);
  const uint16_t h = __ldg(reinterpret_cast<const unsigned short*>(base) + off);
  return dt == DT_F16 ? half_to_float(h) : bf16_to_float(h);
#else
  return load_elem(base, off, dt);
#endif
}
ESPER_HD uint8_t ld_b(uintptr_t base, int64_t off) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const unsigned char*>(base) + off);
#else
  return reinterpret_cast<const uint8_t*>(base)[off];
#endif
}

// element k (compile-time) of a 16-byte vector holding ESZ-byte elements of dtype dt, as a float
template <int ESZ>
ESPER_HD float v16_elem(const V16& v, int k, int32_t dt) {
  if (ESZ == 4) return u2f(v.w[k]);
  if (ESZ == 2) {
    const uint16_t h = (uint16_t)(v.w[k >> 1] >> ((k & 1) * 16));
    return dt == DT_F16 ? half_to_float(h) : bf16_to_float(h);
  }
  return (float)(uint8_t)(v.w[k >> 2] >> ((k & 3) * 8));
}
ESPER_HD float ld_any(uintptr_t base, int64_t e, int32_t dt) {
  return dt == DT_U8 ? (float)ld_b(base, e) : ld_f(base, e, dt);
}

// A contiguous run of `count` elements from address `base` (dtype dt of ESZ bytes): f(e, value) for each element e,
// 16 bytes at a time between a scalar head and tail (cooperative: thread tid of nth). Byte runs (masks) give
// f(e, 0 or 1). A thread's vector loads are independent (four in flight per iteration); every register index is a
// compile-time constant.
template <int ESZ, class F>
ESPER_HD void run_load_t(uintptr_t base, int64_t count, int32_t dt, int tid, int nth, F f) {
  constexpr int V = 16 / ESZ;
  int64_t lead = (int64_t)(((16u - (uint32_t)(base & 15u)) & 15u) / (uint32_t)ESZ);
  if ((base & (uintptr_t)(ESZ - 1)) != 0) lead = count;  // misaligned elements: scalar only
  if (lead > count) lead = count;
  const int64_t nvec = (count - lead) / V;
  for (int64_t e = tid; e < lead; e += nth) f(e, ld_any(base, e, dt));
  const uintptr_t vb = base + (uintptr_t)(lead * ESZ);
  int64_t v = tid;
  for (; v + 3 * (int64_t)nth < nvec; v += 4 * (int64_t)nth) {
    V16 x0 = ld16(vb + (uintptr_t)(v * 16)), x1 = ld16(vb + (uintptr_t)((v + nth) * 16));
    V16 x2 = ld16(vb + (uintptr_t)((v + 2 * (int64_t)nth) * 16)),
        x3 = ld16(vb + (uintptr_t)((v + 3 * (int64_t)nth) * 16));
    const int64_t e0 = lead + v * V, st = (int64_t)nth * V;
#pragma unroll
    for (int k = 0; k < V; ++k) f(e0 + k, v16_elem<ESZ>(x0, k, dt));
#pragma unroll
    for (int k = 0; k < V; ++k) f(e0 + st + k, v16_elem<ESZ>(x1, k, dt));
#pragma unroll
    for (int k = 0; k < V; ++k) f(e0 + 2 * st + k, v16_elem<ESZ>(x2, k, dt));
#pragma unroll
    for (int k = 0; k < V; ++k) f(e0 + 3 * st + k, v16_elem<ESZ>(x3, k, dt));
  }
  for (; v < nvec; v += nth) {
    const V16 x = ld16(vb + (uintptr_t)(v * 16));
    const int64_t e0 = lead + v * V;
#pragma unroll
    for (int k = 0; k < V; ++k) f(e0 + k, v16_elem<ESZ>(x, k, dt));
  }
  for (int64_t e = lead + nvec * V + tid; e < count; e += nth) f(e, ld_any(base, e, dt));
}
template <class F>
ESPER_HD void run_load(uintptr_t base, int64_t count, int32_t dt, int tid, int nth, F f) {
  if (dt == DT_F32)
    run_load_t<4>(base, count, dt, tid, nth, f);
  else if (dt == DT_U8)
    run_load_t<1>(base, count, dt, tid, nth, f);
  else
    run_load_t<2>(base, count, dt, tid, nth, f);
}

// the opposite: a contiguous run of `count` gradient elements at `base`, value g(e) (float), stored in dtype dt
template <int ESZ, class G>
ESPER_HD void run_store_t(uintptr_t base, int64_t count, int32_t dt, int tid, int nth, G g) {
  constexpr int V = 16 / ESZ;
  int64_t lead = (int64_t)(((16u - (uint32_t)(base & 15u)) & 15u) / (uint32_t)ESZ);
  if ((base & (uintptr_t)(ESZ - 1)) != 0) lead = count;
  if (lead > count) lead = count;
  const int64_t nvec = (count - lead) / V;
  for (int64_t e = tid; e < lead; e += nth) store_elem(base, e, dt, g(e));
  const uintptr_t vb = base + (uintptr_t)(lead * ESZ);
  for (int64_t v = tid; v < nvec; v += nth) {
    V16 x{{0u, 0u, 0u, 0u}};
    const int64_t e0 = lead + v * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const uint32_t b = f_bits(g(e0 + k), dt);
      if (ESZ == 4)
        x.w[k] = b;
      else
        x.w[k >> 1] |= b << ((k & 1) * 16);
    }
    st16(vb + (uintptr_t)(v * 16), x);
  }
  for (int64_t e = lead + nvec * V + tid; e < count; e += nth) store_elem(base, e, dt, g(e));
}
template <class G>
ESPER_HD void run_store(uintptr_t base, int64_t count, int32_t dt, int tid, int nth, G g) {
  if (dt == DT_F32)
    run_store_t<4>(base, count, dt, tid, nth, g);
  else
    run_store_t<2>(base, count, dt, tid, nth, g);
}

// rows [row0, row0 + nrows) of one segment into a tile: f(r, col + j, value)
template <class F>
ESPER_HD void seg_load(const Seg& s, int32_t dt, int64_t row0, int nrows, int tid, int nth, F f) {
  const int esz = dtype_size(dt);
  if (s.rs == s.ncols) {  // the rows are one contiguous run
    run_load(s.ptr + (uintptr_t)(row0 * s.rs * esz), (int64_t)nrows * s.ncols, dt, tid, nth, [&](int64_t e, float x) {
      const int r = div_magic(e, s);
      f(r, s.col + (int)(e - (int64_t)r * s.ncols), x);
    });
  } else {  // padded rows: coalesced 4- or 2-byte loads (consecutive threads, consecutive columns of a row)
    const int64_t total = (int64_t)nrows * s.ncols;
    for (int64_t e = tid; e < total; e += nth) {
      const int r = div_magic(e, s);
      const int j = (int)(e - (int64_t)r * s.ncols);
      const int64_t off = (row0 + r) * s.rs + j;
      f(r, s.col + j, ld_any(s.ptr, off, dt));
    }
  }
}
template <class G>
ESPER_HD void seg_store(const Seg& s, int32_t dt, int64_t row0, int nrows, int tid, int nth, G g) {
  const int esz = dtype_size(dt);
  if (s.rs == s.ncols) {
    run_store(s.ptr + (uintptr_t)(row0 * s.rs * esz), (int64_t)nrows * s.ncols, dt, tid, nth, [&](int64_t e) {
      const int r = div_magic(e, s);
      return g(r, s.col + (int)(e - (int64_t)r * s.ncols));
    });
  } else {
    const int64_t total = (int64_t)nrows * s.ncols;
    for (int64_t e = tid; e < total; e += nth) {
      const int r = div_magic(e, s);
      const int j = (int)(e - (int64_t)r * s.ncols);
      store_elem(s.ptr, (row0 + r) * s.rs + j, dt, g(r, s.col + j));
    }
  }
}

// --------------------------------------------------------------------------------------------------------
// one row of one head: the softmax in the (z - m) form, entropy, taken log-prob, gradient (docs/fused_math.md)
// --------------------------------------------------------------------------------------------------------
// A row policy gives the algorithm its storage and its folds:
//   int A                         the head's width
//   bool use(j), float z(j)       valid action of a present step; its logit (read only where use(j))
//   T fold(T init, F f, C c)      c over f(j), j in [0, A), in the policy's fixed order; every caller gets the result
//   void for_each(F f)            f(j) for the caller's share of j
//   static const bool kStores     the policy keeps per-column values (slot0/slot1); otherwise they are recomputed
//   float slot0(j), set_slot0(j, v), slot1(j), set_slot1(j, v)   two floats per column; slot0 may alias z (the
//                                 algorithm reads z only before its first set_slot0)
struct RowIn {
  int a;          // taken action when in range, else -1
  bool exclude;   // mask_fill None: invalid actions excluded from max and sum
  float fillv;    // the masked logit: -inf (exclusion) or F
  float floor;    // prob_floor (> 0: on)
  bool norm_ent;  // normalize_entropy
};

struct Core {
  float n;     // valid actions
  float ell;   // taken log-prob (NaN: out of range or no valid action)
  float Hout;  // entropy as used in the loss
  bool taken;  // the taken action is in range and valid
  // the (final, floored) softmax: max, sum of e, log of the sum, raw entropy, valid share of the sum
  float m, s, inv_s, ls, H, PV;
  float qa;  // 1 - p_a, as the sum of the other actions' e over s
  // the floor: un-floored max and sum, f, the scale of O, P_O, and whether the closed-form gradient holds
  float m1, s1, inv_s1, f, s_f, PO;
  float nO;  // valid actions at or over the floor
  bool floor_on, closed;
};

struct F3 {
  float a, b, c;
};
ESPER_HD F3 f3_add(F3 x, F3 y) { return F3{x.a + y.a, x.b + y.b, x.c + y.c}; }
ESPER_HD F3 f3_maxcnt(F3 x, F3 y) { return F3{y.a > x.a ? y.a : x.a, x.b + y.b, x.c + y.c}; }

template <class Row>
ESPER_HD float zh_of(const Row& row, const RowIn& in, int j) {
  return row.use(j) ? row.z(j) : in.fillv;
}
// esper's floor: f = min(floor, 0.99 / max(n, 1)) as torch computes it (reciprocal, then * 0.99)
ESPER_HD float floor_of(float n, float floor) {
  const float f = (1.0f / (n < 1.f ? 1.f : n)) * 0.99f;
  return f > floor ? floor : f;
}
// q of a valid action from its un-floored probability
ESPER_HD float floor_q(float p1, const Core& c) { return p1 < c.f ? c.f : p1 * c.s_f; }

template <class Row>
ESPER_HD float p1_of(const Row& row, const RowIn& in, const Core& c, int j) {
  const float e1 = Row::kStores ? row.slot0(j) : ek_exp(zh_of(row, in, j) - c.m1);
  return e1 * c.inv_s1;
}
template <class Row>
ESPER_HD float zh2_of(const Row& row, const RowIn& in, const Core& c, int j) {
  if (!row.use(j)) return in.fillv;
  return ek_log(clamp_min(floor_q(p1_of(row, in, c, j), c), 1e-8f));
}
// the final masked logit (floored or not) and its e = exp(zhat - m)
template <bool FLOORS, class Row>
ESPER_HD float zfin_of(const Row& row, const RowIn& in, const Core& c, int j) {
  return (FLOORS && c.floor_on) ? zh2_of(row, in, c, j) : zh_of(row, in, j);
}
template <bool FLOORS, class Row>
ESPER_HD float e_of(const Row& row, const RowIn& in, const Core& c, int j) {
  return Row::kStores ? row.slot1(j) : ek_exp(zfin_of<FLOORS>(row, in, c, j) - c.m);
}

// the softmax over the final logits zf (m is known): sums of e, of e over the valid actions, of e (zf - m), and
// zf_a - m; stores e in slot1
template <class Row, class ZF>
ESPER_HD void softmax_sums(Row& row, const RowIn& in, Core& c, ZF zf) {
  const float m = c.m;
  const int a = in.a;
  struct S5 {
    float s, sv, t, za, sna;
  };
  const S5 r = row.fold(
      S5{0.f, 0.f, 0.f, 0.f, 0.f},
      [&](int j) {
        const float d = zf(j) - m;
        const float e = exp_fast(d);
        if (Row::kStores) row.set_slot1(j, e);
        const bool u = row.use(j);
        return S5{e, u ? e : 0.f, u ? e * d : 0.f, j == a ? d : 0.f, j == a ? 0.f : e};
      },
      [](S5 x, S5 y) { return S5{x.s + y.s, x.sv + y.sv, x.t + y.t, x.za + y.za, x.sna + y.sna}; });
  c.s = r.s;
  c.inv_s = 1.f / r.s;
  c.qa = r.sna * c.inv_s;  // 1 - p_a without the cancellation of 1 - e_a / s (p_a near 1)
  c.ls = ek_log(r.s);
  c.PV = r.sv == r.s ? 1.f : r.sv * c.inv_s;  // (exactly 1 with exclusion: masked actions add exact zeros)
  c.H = c.ls * c.PV - r.t * c.inv_s;          // -sum_V p (zf - m - ls)
  c.ell = a >= 0 ? r.za - c.ls : f_nan();
}

// the forward of one (row, head): every caller of a shared-fold policy reaches the same folds (row-uniform flow).
// FLOORS = false compiles the floor out (the caller knows the head has none)
template <bool FLOORS, class Row>
ESPER_HD Core row_core(Row& row, const RowIn& in) {
  Core c;
  const int a = in.a;
  // max (of the valid logits with exclusion, of every masked logit with a fill), valid count, taken valid
  const F3 mc = row.fold(
      F3{-INFINITY, 0.f, 0.f},
      [&](int j) {
        const bool u = row.use(j);
        return F3{zh_of(row, in, j), u ? 1.f : 0.f, (u && j == a) ? 1.f : 0.f};
      },
      f3_maxcnt);
  c.n = mc.b;
  c.taken = mc.c > 0.f;
  c.floor_on = FLOORS && in.floor > 0.f;
  c.closed = true;
  c.m1 = c.s1 = c.f = c.s_f = c.PO = c.nO = 0.f;
  c.inv_s1 = 1.f;
  c.m = mc.a;
  c.s = c.inv_s = 1.f;
  c.ls = c.H = c.qa = 0.f;
  c.PV = 1.f;
  c.ell = f_nan();
  c.Hout = 0.f;
  if (c.n == 0.f) return c;  // no valid action: ell NaN, entropy 0, gradient 0 (both mask modes)
  if (FLOORS && c.floor_on) {
    // p1 = softmax of the un-floored logits; U = p1 < f, O the other valid actions; q = f on U, p1 s_f on O
    c.m1 = mc.a;
    const float m1 = c.m1;
    c.s1 = row.fold(
        0.f,
        [&](int j) {
          const float e1 = ek_exp(zh_of(row, in, j) - m1);
          if (Row::kStores) row.set_slot0(j, e1);
          return e1;
        },
        [](float x, float y) { return x + y; });
    c.inv_s1 = 1.f / c.s1;
    c.f = floor_of(c.n, in.floor);
    const F3 uo = row.fold(
        F3{0.f, 0.f, 0.f},
        [&](int j) {
          const float p1 = p1_of(row, in, c, j);
          const bool u = row.use(j);
          return F3{(u && p1 < c.f) ? 1.f : 0.f, (u && !(p1 < c.f)) ? p1 : 0.f, 0.f};
        },
        f3_add);
    c.PO = uo.b;
    c.nO = c.n - uo.a;
    c.s_f = clamp_min(1.0f - uo.a * c.f, 1e-8f) / clamp_min(c.PO, 1e-8f);
    // the floored logits' max, and whether a q on O falls under the 1e-8 clamp (then the chain rule, not the
    // closed form, is the reference's gradient)
    const F3 m2 = row.fold(
        F3{-INFINITY, 0.f, 0.f},
        [&](int j) {
          const float z2 = zh2_of(row, in, c, j);
          const bool u = row.use(j);
          bool tiny = false;
          if (u) {
            const float p1 = p1_of(row, in, c, j);
            tiny = !(p1 < c.f) && floor_q(p1, c) < 1e-8f;
          }
          return F3{z2, tiny ? 1.f : 0.f, 0.f};
        },
        f3_maxcnt);
    c.m = m2.a;
    c.closed = c.PO >= 1e-8f && m2.b == 0.f;
    softmax_sums(row, in, c, [&](int j) { return zh2_of(row, in, c, j); });
  } else {
    softmax_sums(row, in, c, [&](int j) { return zh_of(row, in, j); });
  }
  c.Hout = c.H;
  if (in.norm_ent) c.Hout = c.n > 1.f ? c.H / ek_log(c.n < 2.f ? 2.f : c.n) : 0.f;
  return c;
}

// d loss / d logits of one (row, head) given the incoming gradients of ell (gL, 0 when the action is out of range)
// and of the raw entropy (ghr). sink(j, g) receives every column's gradient (0 where invalid).
template <bool FLOORS, class Row, class Sink>
ESPER_HD void row_grad(Row& row, const RowIn& in, const Core& c, float gL, float ghr, Sink sink) {
  if (c.n == 0.f) {
    row.for_each([&](int j) { sink(j, 0.f); });
    return;
  }
  if (!is_finite(gL) || !is_finite(ghr)) {  // a non-finite upstream: NaN at every valid action
    row.for_each([&](int j) { sink(j, row.use(j) ? f_nan() : 0.f); });
    return;
  }
  const int a = in.a;
  // gradient w.r.t. the final log-prob of column j, and the log-prob
  auto g_lp = [&](int j, float& p, float& lp) {
    const float e = e_of<FLOORS>(row, in, c, j);
    p = e * c.inv_s;
    lp = (zfin_of<FLOORS>(row, in, c, j) - c.m) - c.ls;
    const float g = j == a ? gL : 0.f;
    return row.use(j) ? g - ghr * (p * (lp + 1.f)) : g;
  };
  if (!FLOORS || !c.floor_on) {
    const float k = 1.f + c.H - c.PV;
    row.for_each([&](int j) {
      float g = 0.f;
      if (row.use(j)) {
        const float p = e_of<FLOORS>(row, in, c, j) * c.inv_s;
        const float lp = (zh_of(row, in, j) - c.m) - c.ls;
        g = gL * (j == a ? c.qa : -p) - ghr * (p * (lp + k));
      }
      sink(j, g);
    });
    return;
  }
  if (c.closed && c.nO == 1.f) {
    // one action at or over the floor: every q is a constant (f under it, 1 - |U| f for it), so the gradient is
    // exactly 0 (the closed form's g_k - p1_k (g_k / p1_k) would leave a rounding residual)
    row.for_each([&](int j) { sink(j, 0.f); });
    return;
  }
  if (c.closed) {
    // [k in O] (g_k - p1_k G_O / P_O), G_O = sum_O g: the floor's closed form (actions under it get exactly 0)
    const float GO = row.fold(
        0.f,
        [&](int j) {
          if (!row.use(j) || p1_of(row, in, c, j) < c.f) return 0.f;
          float p, lp;
          return g_lp(j, p, lp);
        },
        [](float x, float y) { return x + y; });
    const float r = GO / clamp_min(c.PO, 1e-8f);
    row.for_each([&](int j) {
      float out = 0.f;
      if (row.use(j)) {
        const float p1 = p1_of(row, in, c, j);
        if (!(p1 < c.f)) {
          float p, lp;
          const float g = g_lp(j, p, lp);
          const float pr = p1 * r;  // rounded before the subtraction: an action alone over the floor gets 0
          out = g - pr;
        }
      }
      sink(j, out);
    });
    return;
  }
  // a 1e-8 clamp binds: the chain rule through the floor, as autograd takes it
  const float sig = row.fold(
      0.f,
      [&](int j) {
        float p, lp;
        return g_lp(j, p, lp);
      },
      [](float x, float y) { return x + y; });
  auto gq_of = [&](int j, float& p1, bool& over) {
    p1 = p1_of(row, in, c, j);
    const bool u = row.use(j);
    over = u && !(p1 < c.f);
    float p, lp;
    const float g = g_lp(j, p, lp);
    const float gz = g - p * sig;
    const float q = floor_q(p1, c);
    return (u && q >= 1e-8f) ? gz / clamp_min(q, 1e-8f) : 0.f;
  };
  const float T = row.fold(
      0.f,
      [&](int j) {
        float p1;
        bool over;
        const float gq = gq_of(j, p1, over);
        return over ? gq * p1 : 0.f;
      },
      [](float x, float y) { return x + y; });
  const float g_po = c.PO >= 1e-8f ? -T * (c.s_f / clamp_min(c.PO, 1e-8f)) : 0.f;
  const float sig1 = row.fold(
      0.f,
      [&](int j) {
        float p1;
        bool over;
        const float gq = gq_of(j, p1, over);
        return over ? (gq * c.s_f + g_po) * p1 : 0.f;
      },
      [](float x, float y) { return x + y; });
  row.for_each([&](int j) {
    float p1;
    bool over;
    const float gq = gq_of(j, p1, over);
    const float gp1 = over ? gq * c.s_f + g_po : 0.f;
    sink(j, row.use(j) ? p1 * (gp1 - sig1) : 0.f);
  });
}

// the log-prob output of an absent step, as the reference computes it (every action excluded: the dummy uniform
// row): -log A when the action is in range and the mask has a valid action, else NaN; its entropy output is 0
ESPER_HD float absent_ell(int A, float n, int a) { return (a >= 0 && n > 0.f) ? -ek_log((float)A) : f_nan(); }

// the gradient of the raw entropy from the gradient of the entropy as output (normalize_entropy)
ESPER_HD float raw_entropy_grad(const Core& c, bool norm_ent, float gE) {
  if (!norm_ent) return gE;
  return c.n > 1.f ? gE / ek_log(c.n < 2.f ? 2.f : c.n) : 0.f;
}

// the small path's row policy: one thread's row of one head, W >= A values in registers (fully unrolled loops)
template <int W>
struct RegRow {
  static const bool kStores = true;
  float zv[W];  // logits; then e1 (slot0, the floor's first exp)
  float ev[W];  // e of the final softmax (slot1)
  uint32_t ub;  // use bits
  int A;
  ESPER_HDM bool use(int j) const { return ((ub >> j) & 1u) != 0; }
  ESPER_HDM float z(int j) const { return zv[j]; }
  ESPER_HDM float slot0(int j) const { return zv[j]; }
  ESPER_HDM void set_slot0(int j, float v) { zv[j] = v; }
  ESPER_HDM float slot1(int j) const { return ev[j]; }
  ESPER_HDM void set_slot1(int j, float v) { ev[j] = v; }
  template <class T, class F, class C>
  ESPER_HDM T fold(T acc, F f, C c) const {
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (j < A) acc = c(acc, f(j));
    return acc;
  }
  template <class F>
  ESPER_HDM void for_each(F f) const {
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (j < A) f(j);
  }
};

// --------------------------------------------------------------------------------------------------------
// per step and per (step, head): loss terms, upstream gradients, statistics contributions
// --------------------------------------------------------------------------------------------------------
struct StepIn {
  bool present;  // finite w > 0
  float w;       // w where present, else 0
  float w_raw;
};
ESPER_HD StepIn step_in(const PPOParams& P, int64_t i) {
  StepIn s;
  s.w_raw = P.weights.ptr ? load_f(P.weights, i) : 1.f;
  s.present = is_finite(s.w_raw) && s.w_raw > 0.f;
  s.w = s.present ? s.w_raw : 0.f;
  return s;
}
// the advantage of column col (0, or h with per-head advantages), normalised when asked; 0 on absent steps
ESPER_HD float adv_of(const PPOParams& P, const float* nm, int col, int64_t i, bool present) {
  if (!present) return 0.f;
  float A = load_f(P.adv[col], i);
  if (P.normalize_adv) {
    const int k = nm_adv(P.num_heads, P.adv_per_head ? col : 0);
    A = (A - nm[k]) / nm[k + 1];
  }
  return A;
}

struct HeadIn {
  int a;  // in range, else -1
  bool rel;
};
ESPER_HD HeadIn head_in(const PPOParams& P, int h, int64_t i, bool present) {
  HeadIn hi;
  const int64_t a = load_i(P.actions[h], i);
  hi.a = (a >= 0 && a < (int64_t)P.sizes[h]) ? (int)a : -1;
  hi.rel = present && (!P.has_rel || load_b(P.rel[h], i));
  return hi;
}
ESPER_HD RowIn row_in(const PPOParams& P, int h, const HeadIn& hi) {
  RowIn in;
  in.a = hi.a;
  in.exclude = P.mask_exclude != 0;
  in.fillv = P.mask_exclude ? -INFINITY : P.mask_fill;
  in.floor = P.floor[h];
  in.norm_ent = P.normalize_entropy != 0;
  return in;
}

// the incoming gradients of the three loss terms: (policy, entropy, value) scales
struct Up {
  float g_pol, g_ent, g_val;
};
ESPER_HD Up upstream_of(const PPOParams& P, const float* g4) {
  Up u;
  u.g_pol = g4[0] + g4[1];
  u.g_ent = P.entropy_coef * g4[0] + g4[2];
  u.g_val = P.value_coef * g4[0] + g4[3];
  return u;
}

struct HeadTerms {
  float lr;    // clamped log-ratio (0 unless relevant)
  float gpol;  // per_head: d loss / d ell from the policy term (0 where nothing flows)
  bool flag;   // joint: relevant and the log-ratio clamp passes the gradient
  float gent;  // d loss / d (entropy as output) from the entropy term
};

// the (step, head) terms and, when c != nullptr, the head's statistics contributions c[k * cs], k < HEAD_SIZE
// hc: the block's per-head constants (head_consts)
ESPER_HD HeadTerms head_terms(const PPOParams& P, const float* nm, const Up& up, int h, int64_t i, const StepIn& s,
                              const HeadIn& hi, const Core& co, float* c, int cs, const float* hc) {
  const float C = P.log_clamp, lo = 1.f - P.eps_low, hi_c = 1.f + P.eps_high;
  const bool rel = hi.rel, pres = s.present;
  const float ell = co.ell, n = co.n;
  const float old = rel ? load_f(P.old_lp[h], i) : 0.f;
  const float d = rel ? ell - old : 0.f;
  const bool inside = d >= -C && d <= C;
  const float lr = rel ? clampf(d, -C, C) : 0.f;
  const float ratio = ek_exp(lr);
  const float wr = rel ? s.w : 0.f;
  HeadTerms t;
  t.lr = lr;
  t.flag = rel && inside;
  t.gpol = 0.f;
  float pol = 0.f;
  if (P.per_head) {
    const float adv = adv_of(P, nm, P.adv_per_head ? h : 0, i, pres);
    const float s1 = ratio * adv, s2 = clampf(ratio, lo, hi_c) * adv;
    const float surr = (s1 <= s2 || s1 != s1) ? s1 : s2;
    pol = rel ? wr * surr : 0.f;
    const bool act = rel && inside && !(s1 > s2);
    t.gpol = act ? (-(s.w * adv) * ratio) * hc[2 * h] : 0.f;
  }
  t.gent = rel ? hc[2 * h + 1] * s.w : 0.f;
  if (c) {
    RowTermSink<float> sink{c, cs};
    head_stat_terms<ScalarTerms>(
        HeadRow<ScalarTerms>{pres, rel, co.taken, s.w, pol, co.Hout, ratio, lr, ell, n, lo, hi_c}, sink);
  }
  return t;
}
// the identity contributions of a row that is not there
ESPER_HD void head_ident(float* c, int cs = 1) {
#pragma unroll
  for (int k = 0; k < ESPER_HEAD_SIZE; ++k) c[k * cs] = kident(bit(kHeadMin, k), bit(kHeadMax, k));
}
ESPER_HD void global_ident(float* c, int cs = 1) {
#pragma unroll
  for (int k = 0; k < ESPER_GLOBAL_SIZE; ++k) c[k * cs] = kident(bit(kGlobalMin, k), bit(kGlobalMax, k));
}

struct GlobalTerms {
  float r;      // joint ratio
  float gbase;  // joint: d loss / d ell of every flagged head (0 where nothing flows)
  float gv;     // d loss / d value
  Mom mom[NMOM];
};

// the step's joint ratio, joint surrogate and value loss; c[k * cs], k < GLOBAL_SIZE, its contributions (moments:
// identity, their points in mom)
ESPER_HD GlobalTerms global_terms(const PPOParams& P, const float* nm, const Up& up, int64_t i, const StepIn& s,
                                  float Lsum, float* c, int cs, const float* hc) {
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
  const float r = ek_exp(L);
  GlobalTerms g;
  g.r = r;
  g.gbase = 0.f;
  float gpol = 0.f;
  if (!P.per_head) {
    const float a = adv_of(P, nm, 0, i, pres);
    const float s1 = r * a, s2 = clampf(r, lo, hi_c) * a;
    const float surr = (s1 <= s2 || s1 != s1) ? s1 : s2;
    gpol = pres ? w * surr : 0.f;
    const bool act = pres && jin && !(s1 > s2);
    g.gbase = act ? (-(w * a) * r) * hc[2 * P.num_heads] : 0.f;
  }
  const ValueTerms vt = value_terms(P, i, s.w_raw);
  const bool vpres = vt.vpres, bad_vw = vt.bad_vw;
  const float vw = vt.vw, vl = vt.vl, vclip = vt.vclip, R = vt.R, v = vt.v;
  g.gv = (vpres && vt.vflow) ? (vw * vt.dvl) * hc[2 * P.num_heads + 1] : 0.f;
  const float res = vpres ? R - v : 0.f;
  for (int m = 0; m < NMOM; ++m) {
    const int mi = moment_idx(m).m;
    g.mom[m] = mi == G_RATIO_MEAN    ? mom_point(pres ? w : 0.f, r)
               : mi == G_RETURN_MEAN ? mom_point(vw, R)
               : mi == G_RESID_MEAN  ? mom_point(vw, res)
                                     : Mom{0.f, 0.f, 0.f};
  }
  if (c) {
    global_ident(c, cs);
    const bool rk = pres && r == r;
    c[G_STEPS * cs] = pres ? 1.f : 0.f;
    c[G_WEIGHT * cs] = w;
    c[G_POLICY_NUM * cs] = gpol;
    c[G_KL_K3 * cs] = pres ? w * ((r - 1.f) - L) : 0.f;
    c[G_KL_K1 * cs] = pres ? w * -L : 0.f;
    c[G_CLIP * cs] = (pres && (r > hi_c || r < lo)) ? w : 0.f;
    c[G_CLIP_POS * cs] = (pres && r > hi_c) ? w : 0.f;
    c[G_CLIP_NEG * cs] = (pres && r < lo) ? w : 0.f;
    c[G_RATIO_MIN * cs] = rk ? r : INFINITY;
    c[G_RATIO_MAX * cs] = rk ? r : -INFINITY;
    c[G_BAD_WEIGHTS * cs] = (!is_finite(s.w_raw) || s.w_raw < 0.f) ? 1.f : 0.f;
    c[G_VALUE_STEPS * cs] = vpres ? 1.f : 0.f;
    c[G_VALUE_WEIGHT * cs] = vw;
    c[G_VALUE_NUM * cs] = vpres ? vw * vl : 0.f;
    c[G_VALUE_CLIP * cs] = vclip;
    c[G_BAD_VALUE_WEIGHTS * cs] = (P.has_values && bad_vw) ? 1.f : 0.f;
  }
  return g;
}

// the block's per-head constants of the upstream: hc[2h] = d PL / d (per_head numerator of h), hc[2h + 1] the entropy
// term's coefficient over den_h, hc[2H] the joint surrogate's scale over W, hc[2H + 1] the value loss's over VW
ESPER_HD int hc_size(int H) { return 2 * H + 2; }
ESPER_HD void head_consts(const PPOParams& P, const float* nm, const float* g4, float* hc) {
  const Up up = upstream_of(P, g4);
  const int H = P.num_heads;
  for (int h = 0; h < H; ++h) {
    const float den = nm[NM_DEN + h];
    hc[2 * h] = safe_div(up.g_pol, den);
    hc[2 * h + 1] = safe_div(up.g_ent * -P.kcoef[h], den);
  }
  hc[2 * H] = safe_div(up.g_pol, nm[NM_W]);
  hc[2 * H + 1] = safe_div(up.g_val * 0.5f, nm[NM_VW]);
}

// the incoming gradients of one (step, head)'s ell and raw entropy in the fix-up (or the forward: g4 = (1,0,0,0))
struct RowUp {
  float gL, gE;
};
ESPER_HD RowUp row_upstream(const PPOParams& P, const HeadIn& hi, const HeadTerms& t, float gbase, int h, int64_t i,
                            bool fix) {
  float l = P.per_head ? t.gpol : (t.flag ? gbase : 0.f);
  float e = t.gent;
  if (fix && P.grad_log_probs.ptr) l += load_m(P.grad_log_probs, i, h);
  if (fix && P.grad_entropy.ptr) e += load_m(P.grad_entropy, i, h);
  RowUp u;
  u.gL = hi.a >= 0 ? l : 0.f;
  u.gE = e;
  return u;
}

// --------------------------------------------------------------------------------------------------------
// statistics: block accumulators, partials and the last block's merge
// --------------------------------------------------------------------------------------------------------
ESPER_HD int stats_k(int H) { return ESPER_GLOBAL_SIZE + H * ESPER_HEAD_SIZE; }
// kind bits of entry k of the statistics vector
ESPER_HD void kind_of(int k, bool& mn, bool& mx, bool& mom) {
  if (k < ESPER_GLOBAL_SIZE) {
    mn = bit(kGlobalMin, k);
    mx = bit(kGlobalMax, k);
    mom = bit(kGlobalMoment, k);
  } else {
    const int hk = (k - ESPER_GLOBAL_SIZE) % ESPER_HEAD_SIZE;
    mn = bit(kHeadMin, hk);
    mx = bit(kHeadMax, hk);
    mom = false;
  }
}
// a block's accumulators: acc[K] (moments' mean/M2 slots unused) and the moments
ESPER_HD void acc_init(float* acc, Mom* am, int K) {
  for (int k = 0; k < K; ++k) {
    bool mn, mx, mom;
    kind_of(k, mn, mx, mom);
    acc[k] = kident(mn, mx);
  }
  for (int m = 0; m < NMOM; ++m) am[m] = Mom{0.f, 0.f, 0.f};
}
// the partial of a block: the statistics layout (a moment's weight is its SUM statistic); each entry written once
ESPER_HD void acc_store(const float* acc, const Mom* am, int K, float* part, int tid, int nth) {
  for (int k = tid; k < K; k += nth) {
    float v = acc[k];
    for (int m = 0; m < NMOM; ++m) {
      const MomentIdx x = moment_idx(m);
      if (k == x.m) v = am[m].m;
      if (k == x.q) v = am[m].q;
    }
    part[k] = v;
  }
}
// a load of another block's partial (device: through L2, never a stale L1 line)
ESPER_HD float ld_cg(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}
// one lane's share of the merge of statistic k over the parts p = lane, lane + 32, ... (sequential)
ESPER_HD float merge_lane(const float* parts, int nparts, int K, int k, int lane) {
  bool mn, mx, mom;
  kind_of(k, mn, mx, mom);
  float v = kident(mn, mx);
  for (int p = lane; p < nparts; p += 32) v = kcombine(mn, mx, v, ld_cg(parts + (int64_t)p * K + k));
  return v;
}
ESPER_HD Mom merge_lane_mom(const float* parts, int nparts, int K, int m, int lane) {
  const MomentIdx x = moment_idx(m);
  Mom v{0.f, 0.f, 0.f};
  for (int p = lane; p < nparts; p += 32) {
    const float* q = parts + (int64_t)p * K;
    v = mom_combine(v, Mom{ld_cg(q + x.w), ld_cg(q + x.m), ld_cg(q + x.q)});
  }
  return v;
}

// the last block's outputs from the merged statistics: the losses and the metric table
ESPER_HD void finish(const PPOParams& P, const OnePass& O, const float* stats) {
  losses_from_stats(P, stats, reinterpret_cast<float*>(P.losses));
  if (O.table) derive_metrics(O.mc, stats, reinterpret_cast<float*>(O.table));
}

// --------------------------------------------------------------------------------------------------------
// the pre-pass
// --------------------------------------------------------------------------------------------------------
// rows of pre-pass block b: [b * rows, min(N, (b + 1) * rows)), rows = ceil(N / grid_pre)
ESPER_HD int64_t pre_rows(const PPOParams& P, const OnePass& O) {
  return (P.n + O.grid_pre - 1) / (O.grid_pre > 0 ? O.grid_pre : 1);
}
ESPER_HD int adv_cols(const PPOParams& P) { return P.normalize_adv ? (P.adv_per_head ? P.num_heads : 1) : 0; }

// one thread's share (rows start + tid, + nth, ...) of pre-pass column task `col`: a sum (F3.a) or a moment
struct PreAcc {
  float x;
  Mom mo;
};
ESPER_HD bool pre_is_mom(const PPOParams& P, int col) {
  return col >= pre_adv(P.num_heads, 0) && col < pre_adv(P.num_heads, adv_cols(P));
}
ESPER_HD bool pre_used(const PPOParams& P, int col) {
  const int H = P.num_heads;
  if (col < PRE_DEN + H) return true;
  return col >= pre_adv(H, 0) && col < pre_adv(H, adv_cols(P)) && (col - pre_adv(H, 0)) % 3 == 0;
}
ESPER_HD PreAcc pre_thread(const PPOParams& P, int col, int64_t start, int64_t end, int tid, int nth) {
  const int H = P.num_heads;
  PreAcc a{0.f, Mom{0.f, 0.f, 0.f}};
  for (int64_t i = start + tid; i < end; i += nth) {
    const StepIn s = step_in(P, i);
    if (col == PRE_W) {
      a.x += s.w;
    } else if (col == PRE_N) {
      a.x += s.present ? 1.f : 0.f;
    } else if (col == PRE_VW) {
      if (P.has_values) {
        const float vw_raw = P.value_weights.ptr ? load_f(P.value_weights, i) : s.w_raw;
        a.x += (is_finite(vw_raw) && vw_raw > 0.f) ? vw_raw : 0.f;
      }
    } else if (col < PRE_DEN + H) {
      const int h = col - PRE_DEN;
      const bool rel = s.present && (!P.has_rel || load_b(P.rel[h], i));
      a.x += rel ? s.w : 0.f;
    } else {
      const int c = (col - pre_adv(H, 0)) / 3;
      const float x = s.present ? load_f(P.adv[P.adv_per_head ? c : 0], i) : 0.f;
      a.mo = mom_combine(a.mo, mom_point(s.w, x));
    }
  }
  return a;
}
ESPER_HD PreAcc pre_combine(PreAcc a, PreAcc b) { return PreAcc{a.x + b.x, mom_combine(a.mo, b.mo)}; }
ESPER_HD void pre_store(const PPOParams& P, int col, const PreAcc& a, float* part) {
  if (pre_is_mom(P, col)) {
    part[col] = a.mo.w;
    part[col + 1] = a.mo.m;
    part[col + 2] = a.mo.q;
  } else {
    part[col] = a.x;
  }
}
// one lane's share of merging pre-pass column col over the partials
ESPER_HD PreAcc pre_merge_lane(const PPOParams& P, const float* parts, int nparts, int col, int lane) {
  const int PK = pre_size(P.num_heads);
  PreAcc a{0.f, Mom{0.f, 0.f, 0.f}};
  const bool mom = pre_is_mom(P, col);
  for (int p = lane; p < nparts; p += 32) {
    const float* q = parts + (int64_t)p * PK;
    if (mom)
      a.mo = mom_combine(a.mo, Mom{q[col], q[col + 1], q[col + 2]});
    else
      a.x += q[col];
  }
  return a;
}
// the normalisers from the merged pre-pass columns (nm[] already holds the sums; moments in raw)
ESPER_HD void norms_finish(const PPOParams& P, const PreAcc* raw_moms, float* nm) {
  const int H = P.num_heads;
  nm[NM_SCALE] = 1.f;
  for (int c = 0; c < H; ++c) {
    nm[nm_adv(H, c)] = 0.f;
    nm[nm_adv(H, c) + 1] = 1.f;
  }
  for (int c = 0; c < adv_cols(P); ++c) {
    const Mom mo = raw_moms[c].mo;
    float var = safe_div(mo.q, mo.w);
    if (P.adv_std_unbiased) {
      const float n = nm[NM_NPRES];
      var = n > 1.f ? var * (n / clamp_min(n - 1.f, 1.f)) : 0.f;
    }
    const float sd = sqrtf(var);
    nm[nm_adv(H, c)] = mo.m;
    nm[nm_adv(H, c) + 1] = P.adv_eps_add ? sd + P.adv_eps : (sd < P.adv_eps ? P.adv_eps : sd);
  }
}

// --------------------------------------------------------------------------------------------------------
// the fix-up's decision (every block takes it from the same device data)
// --------------------------------------------------------------------------------------------------------
enum : int { FIX_NONE = 0, FIX_RESCALE = 1, FIX_RECOMPUTE = 2 };
// factor: the rescale factor; state: the scale the gradient buffers will hold after this call (NaN: not a pure
// scale of the upstream-1 gradient, the next fix-up recomputes)
ESPER_HD int fix_mode(const PPOParams& P, const OnePass& O, const float* g4, float& factor, float& state) {
  factor = 1.f;
  state = f_nan();
  const bool pure = g4[1] == 0.f && g4[2] == 0.f && g4[3] == 0.f && !P.grad_log_probs.ptr && !P.grad_entropy.ptr;
  const float g0 = g4[0];
  const bool good = pure && is_finite(g0) && g0 != 0.f;
  if (good) state = g0;
  if (O.force_recompute || !good) return FIX_RECOMPUTE;
  const float cur = reinterpret_cast<const float*>(O.norms)[NM_SCALE];
  if (!(is_finite(cur) && cur != 0.f)) return FIX_RECOMPUTE;
  if (g0 == cur) return FIX_NONE;
  factor = g0 / cur;
  if (P.logits_dtype != DT_F32) {
    // a half-precision gradient rescaled by a power of two is exact; otherwise recompute (one rounding)
    int ex;
    const float fr = frexpf(factor, &ex);
    if (fr != 0.5f && fr != -0.5f) return FIX_RECOMPUTE;
  }
  return FIX_RESCALE;
}

// --------------------------------------------------------------------------------------------------------
// block bodies, shared by the kernels and the host emulation through an execution policy X:
//   x.R (small) / X::WT (wide)                      the block shape (O.cluster blocks per cluster)
//   x.threads(f)                                    f(r) per row thread (small) / f(rank, tid) (wide)
//   x.coop(f)                                       f(tid, nth): the block's threads split a loop (any split)
//   x.sync()                                        a block barrier (host: nothing)
//   x.leader()                                      thread 0 of the block (host: always)
//   x.lanes_fold(ntasks, lane_fn, combine, out)     task t folded over 32 lanes (lane_fn(t, lane)) then the xor
//                                                   tree 16..1 (combine(t, a, b)); out(t, value) once per task
//   x.block_fold(f, combine)                        f(tid, WIDE_THREADS) per thread, then the fixed block tree
//   x.coop_cluster(f)                               f(tid, nth) split over every thread of the cluster (wide)
//   x.ticket(counter, n, all_ranks)                 true in the last of n blocks to arrive (threadfence + atomic);
//                                                   all_ranks: every block of a cluster takes one (else rank 0 only)
//   x.reset_ticket(counter)                         the last block resets the counter
//   small: x.warp_head_stats(cl, wacc, K, base), x.warp_global_stats(cl, wacc, wmom, K)   the warps' statistics
//   wide:  x.cluster_fold(f, combine), x.zp(col) / x.up(col) / x.ep(col)   the cluster fold; chunk storage
// --------------------------------------------------------------------------------------------------------
constexpr int RV = ESPER_GLOBAL_SIZE > ESPER_HEAD_SIZE ? ESPER_GLOBAL_SIZE : ESPER_HEAD_SIZE;

// the per-block state both paths keep in shared memory (besides their tiles)
struct BlockSmem {
  float* nm;     // norms_size(H)
  float* g4;     // the 4 incoming loss gradients
  float* acc;    // stats_k(H): the block's statistics accumulators
  Mom* am;       // NMOM
  PreAcc* pmom;  // H: merged advantage moments
  float* out;    // stats_k(H): the last block's merged statistics
  float* hc;     // hc_size(H): the per-head constants of the upstream
};
ESPER_HD size_t align16(size_t b) { return (b + 15) & ~(size_t)15; }
ESPER_HD size_t block_smem_bytes(int H) {
  const int K = stats_k(H);
  return align16(sizeof(float) * norms_size(H)) + align16(sizeof(float) * 4) + align16(sizeof(float) * K) +
         align16(sizeof(Mom) * NMOM) + align16(sizeof(PreAcc) * H) + align16(sizeof(float) * K) +
         align16(sizeof(float) * hc_size(H));
}
ESPER_HD BlockSmem block_carve(unsigned char*& p, int H) {
  const int K = stats_k(H);
  BlockSmem b;
  b.nm = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * norms_size(H));
  b.g4 = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * 4);
  b.acc = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * K);
  b.am = reinterpret_cast<Mom*>(p);
  p += align16(sizeof(Mom) * NMOM);
  b.pmom = reinterpret_cast<PreAcc*>(p);
  p += align16(sizeof(PreAcc) * H);
  b.out = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * K);
  b.hc = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * hc_size(H));
  return b;
}

// the start of a main or fix-up block: the normalisers (merged from the pre-pass partials, or the forward's), the
// incoming loss gradients, the statistics accumulators
template <class X>
ESPER_HD void prologue(X& x, const PPOParams& P, const OnePass& O, const BlockSmem& b, int block) {
  const int H = P.num_heads;
  float* gnm = reinterpret_cast<float*>(O.norms);
  if (!O.fixup) {
    const float* pp = reinterpret_cast<const float*>(O.pre_parts);
    x.lanes_fold(
        pre_size(H),
        [&](int col, int lane) {
          return pre_used(P, col) ? pre_merge_lane(P, pp, O.grid_pre, col, lane) : PreAcc{0.f, Mom{0.f, 0.f, 0.f}};
        },
        [](int, PreAcc u, PreAcc v) { return pre_combine(u, v); },
        [&](int col, const PreAcc& a) {
          if (col == PRE_W)
            b.nm[NM_W] = a.x;
          else if (col == PRE_N)
            b.nm[NM_NPRES] = a.x;
          else if (col == PRE_VW)
            b.nm[NM_VW] = a.x;
          else if (col < PRE_DEN + H)
            b.nm[NM_DEN + col - PRE_DEN] = a.x;
          else if (pre_used(P, col))
            b.pmom[(col - pre_adv(H, 0)) / 3] = a;
        });
    x.sync();
    if (x.leader()) norms_finish(P, b.pmom, b.nm);
    x.sync();
    if (block == 0)
      x.coop([&](int tid, int nth) {
        for (int k = tid; k < norms_size(H); k += nth) gnm[k] = b.nm[k];
      });
    if (x.leader()) {
      b.g4[0] = 1.f;
      b.g4[1] = b.g4[2] = b.g4[3] = 0.f;
    }
  } else {
    x.coop([&](int tid, int nth) {
      for (int k = tid; k < norms_size(H); k += nth) b.nm[k] = gnm[k];
      if (tid == 0)
        for (int k = 0; k < 4; ++k) b.g4[k] = O.gl[k] ? *reinterpret_cast<const float*>(O.gl[k]) : 0.f;
    });
  }
  x.sync();  // the normalisers and the incoming gradients are in place
  if (x.leader()) {
    acc_init(b.acc, b.am, stats_k(H));
    head_consts(P, b.nm, b.g4, b.hc);
  }
  x.sync();
}

// the last block: merge the partials in a fixed order, write the statistics, the losses and the metric table
template <class X>
ESPER_HD void last_block(X& x, const PPOParams& P, const OnePass& O, const BlockSmem& b, int nparts) {
  const int K = stats_k(P.num_heads);
  const float* parts = reinterpret_cast<const float*>(O.parts);
  x.lanes_fold(
      K, [&](int k, int lane) { return merge_lane(parts, nparts, K, k, lane); },
      [&](int k, float u, float v) {
        bool mn, mx, mom;
        kind_of(k, mn, mx, mom);
        return kcombine(mn, mx, u, v);
      },
      [&](int k, float v) { b.out[k] = v; });
  x.lanes_fold(
      NMOM, [&](int m, int lane) { return merge_lane_mom(parts, nparts, K, m, lane); },
      [](int, Mom u, Mom v) { return mom_combine(u, v); },
      [&](int m, const Mom& v) {
        const MomentIdx mi = moment_idx(m);
        b.out[mi.m] = v.m;
        b.out[mi.q] = v.q;
      });
  x.sync();
  float* st = reinterpret_cast<float*>(P.stats);
  x.coop([&](int tid, int nth) {
    for (int k = tid; k < K; k += nth) st[k] = b.out[k];
  });
  if (x.leader()) finish(P, O, b.out);
}

// the fix-up's rescale: every gradient element of rows [i0, i1) times factor (and d loss / d values)
template <class X>
ESPER_HD void rescale_rows(X& x, const PPOParams& P, const OnePass& O, float factor, int64_t i0, int64_t i1) {
  if (i1 <= i0) return;
  const int32_t dt = P.logits_dtype;
  x.coop_cluster([&](int tid, int nth) {
    if (O.write_grad)
      for (int k = 0; k < O.nseg_g; ++k) {
        const Seg& s = O.gseg[k];
        if (s.rs == s.ncols) {
          const int64_t base = i0 * s.rs, cnt = (i1 - i0) * s.ncols;
          for (int64_t e = tid; e < cnt; e += nth)
            store_elem(s.ptr, base + e, dt, load_elem(s.ptr, base + e, dt) * factor);
        } else {
          const int64_t cnt = (i1 - i0) * s.ncols;
          for (int64_t e = tid; e < cnt; e += nth) {
            const int64_t r = e / s.ncols, j = e - r * s.ncols;
            const int64_t off = (i0 + r) * s.rs + j;
            store_elem(s.ptr, off, dt, load_elem(s.ptr, off, dt) * factor);
          }
        }
      }
    if (O.gv) {
      float* gv = reinterpret_cast<float*>(O.gv);
      for (int64_t i = i0 + tid; i < i1; i += nth) gv[i] = gv[i] * factor;
    }
  });
}

// after a fix-up that changed the gradient buffers: the last block records the scale they now hold
// (every block of the launch takes a ticket: none may read the old scale after the new one is written)
template <class X>
ESPER_HD void fix_epilogue(X& x, const PPOParams& P, const OnePass& O, const float* g4, int nblocks) {
  if (O.force_recompute) return;
  uint32_t* ctl = reinterpret_cast<uint32_t*>(O.ctl);
  if (x.ticket(ctl + CTL_FIX, nblocks, true) && x.leader()) {
    float factor, state;
    fix_mode(P, O, g4, factor, state);  // (the same decision every block took; the scale has not changed yet)
    reinterpret_cast<float*>(O.norms)[NM_SCALE] = state;
    x.reset_ticket(ctl + CTL_FIX);
  }
}

// ---- the pre-pass: block `block` of grid_pre ---------------------------------------------------------------
template <class X>
ESPER_HD void prepass_block(X& x, const PPOParams& P, const OnePass& O, int block) {
  const int H = P.num_heads, PK = pre_size(H);
  if (block == 0 && x.leader()) {
    uint32_t* ctl = reinterpret_cast<uint32_t*>(O.ctl);
    ctl[CTL_MAIN] = 0u;
    ctl[CTL_FIX] = 0u;
  }
  const int64_t rows = pre_rows(P, O);
  const int64_t start = block * rows;
  const int64_t end = start + rows < P.n ? start + rows : P.n;
  float* part = reinterpret_cast<float*>(O.pre_parts) + (int64_t)block * PK;
  for (int col = 0; col < PK; ++col) {
    if (!pre_used(P, col)) {
      if (x.leader() && !pre_is_mom(P, col)) part[col] = 0.f;  // (a used moment's other two columns: its own)
      continue;
    }
    const PreAcc a = x.block_fold([&](int tid, int nth) { return pre_thread(P, col, start, end, tid, nth); },
                                  [](PreAcc u, PreAcc v) { return pre_combine(u, v); });
    if (x.leader()) pre_store(P, col, a, part);
  }
}

// ---- the small path's statistics: one row's contributions, reduced across the warp --------------------------
// Each warp folds its 32 rows at once: the MIN / MAX statistics by the integer warp reduction of order-preserving
// keys (exact), the sums and counts by a butterfly (reduce-scatter: 16 values over the 32 lanes in log steps, each
// lane ends with the warp's total of one value), the moments by a shifted two-pass (the first finite kept value of
// the warp as the shift: constant data stay exact) whose sums join the butterfly. Each warp accumulates into its own
// row of accumulators across tiles; the block combines its warps in order at the end.
struct HeadC {
  float v[ESPER_HEAD_SIZE];
};
struct GlobC {
  float v[ESPER_GLOBAL_SIZE];
  float mw[NMOM], mx[NMOM];  // the moments' points (weight 0: not kept)
};
constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }
constexpr int HEAD_BF = pow2_at_least(ESPER_HEAD_SIZE);               // the head butterfly's width
constexpr int GLOB_BF = pow2_at_least(ESPER_GLOBAL_SIZE + 3 * NMOM);  // the global one's: sums, then W, S1, bad
static_assert(HEAD_BF <= 32 && GLOB_BF <= 32, "a butterfly holds at most 32 values");
constexpr uint32_t kHeadMinMax = kHeadMin | kHeadMax;
constexpr uint32_t kGlobalSkip = kGlobalMin | kGlobalMax | kGlobalMoment;

// a warp's accumulators: sums as floats, MIN / MAX statistics as their integer keys (fkey; the warp reduction's
// order), moments as Mom
ESPER_HD void wacc_init(float* wacc, Mom* wm, int K) {
  for (int k = 0; k < K; ++k) {
    bool mn, mx, mom;
    kind_of(k, mn, mx, mom);
    wacc[k] = (mn || mx) ? u2f((uint32_t)fkey(mn ? INFINITY : -INFINITY)) : 0.f;
  }
  for (int m = 0; m < NMOM; ++m) wm[m] = Mom{0.f, 0.f, 0.f};
}
ESPER_HD void wacc_minmax(float* slot, bool mn, int32_t key) {  // slot holds a key
  const int32_t cur = (int32_t)f2u(*slot);
  *slot = u2f((uint32_t)(mn ? (key < cur ? key : cur) : (key > cur ? key : cur)));
}
// the block's final statistics accumulators from its warps' (in warp order)
ESPER_HD void warps_to_block(const float* wacc, const Mom* wmom, int nw, int K, float* acc, Mom* am) {
  for (int w = 0; w < nw; ++w) {
    for (int k = 0; k < K; ++k) {
      bool mn, mx, mom;
      kind_of(k, mn, mx, mom);
      const float x = wacc[w * K + k];
      acc[k] = (mn || mx) ? kminmax(mn, acc[k], fkey_inv((int32_t)f2u(x))) : acc[k] + x;
    }
    for (int m = 0; m < NMOM; ++m) am[m] = mom_combine(am[m], wmom[w * NMOM + m]);
  }
}
// a warp's moment from its reduced sums (W, S1 = sum w (x - x0), the IEEE sum of the non-finite kept values, any
// non-finite kept value) and M2 = sum w (x - mean)^2
ESPER_HD Mom warp_moment(float W, float S1, float bad, bool any_bad, float x0, float M2) {
  if (!(W > 0.f)) return Mom{0.f, 0.f, 0.f};
  if (any_bad) return Mom{W, bad, bad != bad ? bad : INFINITY};
  return Mom{W, x0 + S1 / W, M2};
}

// ---- the small path: a block of R rows per tile, one thread per row ------------------------------------------
struct SmallSmem {
  BlockSmem b;
  float* zt;    // R x pitch: logits, then the gradient
  float* ct;    // R x pitch: the joint surrogate's gradient coefficient (joint_c), else null
  uint8_t* ut;  // R x pitch: masks (has_mask), else null
  float* wacc;  // (R / 32) x K: each warp's statistics accumulators (forward)
  Mom* wmom;    // (R / 32) x NMOM: and its moments
};
ESPER_HD size_t small_smem_bytes(int H, int R, int pitch, bool joint_c, bool has_mask, bool fwd) {
  size_t b = block_smem_bytes(H) + align16(sizeof(float) * (size_t)R * pitch);
  if (joint_c) b += align16(sizeof(float) * (size_t)R * pitch);
  if (has_mask) b += align16((size_t)R * pitch);
  if (fwd) b += align16(sizeof(float) * (size_t)(R / 32) * stats_k(H)) + align16(sizeof(Mom) * (R / 32) * NMOM);
  return b;
}
ESPER_HD SmallSmem small_carve(unsigned char* p, int H, int R, int pitch, bool joint_c, bool has_mask, bool fwd) {
  SmallSmem s;
  s.b = block_carve(p, H);
  s.zt = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * (size_t)R * pitch);
  s.ct = nullptr;
  if (joint_c) {
    s.ct = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * (size_t)R * pitch);
  }
  s.ut = nullptr;
  if (has_mask) {
    s.ut = p;
    p += align16((size_t)R * pitch);
  }
  s.wacc = nullptr;
  s.wmom = nullptr;
  if (fwd) {
    s.wacc = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * (size_t)(R / 32) * stats_k(H));
    s.wmom = reinterpret_cast<Mom*>(p);
    p += align16(sizeof(Mom) * (R / 32) * NMOM);
  }
  return s;
}

// one (row, head) of the small path without a floor, W >= A: the row in registers, padded with -inf past A (which
// adds exact zeros), one exp per logit (the softmax in the (z - m) form of docs/semantics.md), the outputs, the
// gradient into the tile and (joint surrogate) its coefficient for the joint term into the coefficient tile. The
// same math as row_core / row_grad on one row, written out for the registers.
template <int W>
ESPER_HD void small_head_w(const PPOParams& P, const OnePass& O, const SmallSmem& sm, const Up& up, int h, int64_t i,
                           int r, const StepIn& s, float& L, uint32_t& jf, float* cb, int cs) {
  const int A = P.sizes[h], off = O.off[h], pitch = O.pitch;
  const float* zr = sm.zt + r * pitch + off;
  const uint8_t* ur = sm.ut ? sm.ut + r * pitch + off : nullptr;
  const HeadIn hi = head_in(P, h, i, true);
  const RowIn in = row_in(P, h, hi);
  const int a = in.a;
  float zv[W], ev[W];
  uint32_t ub = 0u;
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    ev[j] = 0.f;
    const bool col = j < A;
    const float z = col ? zr[j] : 0.f;
    const bool u = col && (ur ? ur[j] != 0 : true);
    ub |= (u ? 1u : 0u) << j;
    zv[j] = u ? z : (col ? in.fillv : -INFINITY);  // the masked logit; -inf past the head
    m = zv[j] > m ? zv[j] : m;
  }
  Core co;
  co.n = (float)popc32(ub);
  co.taken = a >= 0 && ((ub >> a) & 1u) != 0;
  co.floor_on = false;
  co.closed = true;
  co.m1 = co.s1 = co.f = co.s_f = co.PO = co.nO = 0.f;
  co.inv_s1 = 1.f;
  co.m = m;
  co.s = co.inv_s = 1.f;
  co.ls = co.H = co.qa = 0.f;
  co.PV = 1.f;
  co.ell = f_nan();
  co.Hout = 0.f;
  if (co.n > 0.f) {
    float sum = 0.f, sv = 0.f, t = 0.f, za = 0.f, sna = 0.f;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float d = zv[j] - m;
      const float e = exp_fast(d);
      ev[j] = e;
      const bool u = ((ub >> j) & 1u) != 0;
      sum = sum + e;
      sv = sv + (u ? e : 0.f);
      t = t + (u ? e * d : 0.f);
      za = j == a ? d : za;
      sna = sna + (j == a ? 0.f : e);
    }
    co.s = sum;
    co.inv_s = 1.f / sum;
    co.qa = sna * co.inv_s;
    co.ls = ek_log(sum);
    co.PV = sv == sum ? 1.f : sv * co.inv_s;
    co.H = co.ls * co.PV - t * co.inv_s;
    co.ell = a >= 0 ? za - co.ls : f_nan();
    co.Hout = co.H;
    if (in.norm_ent) co.Hout = co.n > 1.f ? co.H / ek_log(co.n < 2.f ? 2.f : co.n) : 0.f;
  }
  const HeadTerms t = head_terms(P, sm.b.nm, up, h, i, s, hi, co, cb, cs, sm.b.hc);
  L += t.lr;
  if (t.flag) jf |= 1u << h;
  if (!O.fixup) {
    const int H = P.num_heads;
    reinterpret_cast<float*>(P.log_probs)[i * H + h] = co.ell;
    reinterpret_cast<float*>(P.entropy)[i * H + h] = co.Hout;
  }
  if (!O.write_grad) return;
  const RowUp ru = row_upstream(P, hi, t, 0.f, h, i, O.fixup != 0);
  const float gL = ru.gL, ghr = raw_entropy_grad(co, in.norm_ent, ru.gE);
  float* G = sm.zt + r * pitch + off;
  // the coefficient goes to the coefficient tile (joint surrogate), else to G first, which the gradient overwrites:
  // no per-element test
  float* Cf = O.joint_c ? sm.ct + r * pitch + off : G;
  const bool live = co.n > 0.f, bad = !is_finite(gL) || !is_finite(ghr);
  // a non-finite upstream: NaN at every valid action, carried by the scalars (no per-element select)
  const float gLx = bad ? f_nan() : gL, ghx = bad ? f_nan() : ghr;
  const float k1 = (1.f + co.H - co.PV) - co.ls;  // logp_j + 1 + H - P_V = (z_j - m) + k1
  const uint32_t ul = live ? ub : 0u;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    if (j < A) {
      const bool u = ((ul >> j) & 1u) != 0;
      const float p = ev[j] * co.inv_s;
      const float coef = j == a ? co.qa : -p;
      const float g = gLx * coef - ghx * (p * ((zv[j] - m) + k1));
      Cf[j] = u ? coef : 0.f;
      G[j] = u ? g : 0.f;
    }
  }
}

// the small path's row policy for a floored head: the staged row in shared memory, loops (not unrolled), the
// floor's exps recomputed where needed (a floored head costs a few transcendental operations per logit, but one
// copy of the code serves every width)
struct SmemRow {
  static const bool kStores = false;
  const float* zr;
  const uint8_t* ur;
  int A;
  ESPER_HDM bool use(int j) const { return ur ? ur[j] != 0 : true; }
  ESPER_HDM float z(int j) const { return zr[j]; }
  ESPER_HDM float slot0(int) const { return 0.f; }
  ESPER_HDM void set_slot0(int, float) const {}
  ESPER_HDM float slot1(int) const { return 0.f; }
  ESPER_HDM void set_slot1(int, float) const {}
  template <class T, class F, class C>
  ESPER_HDM T fold(T acc, F f, C c) const {
#pragma unroll 1
    for (int j = 0; j < A; ++j) acc = c(acc, f(j));
    return acc;
  }
  template <class F>
  ESPER_HDM void for_each(F f) const {
#pragma unroll 1
    for (int j = 0; j < A; ++j) f(j);
  }
};

ESPER_HD void small_head_floor(const PPOParams& P, const OnePass& O, const SmallSmem& sm, const Up& up, int h,
                               int64_t i, int r, const StepIn& s, float& L, uint32_t& jf, float* c, int cs) {
  const int off = r * O.pitch + O.off[h];
  SmemRow row{sm.zt + off, sm.ut ? sm.ut + off : nullptr, P.sizes[h]};
  const HeadIn hi = head_in(P, h, i, true);
  const RowIn in = row_in(P, h, hi);
  const Core co = row_core<true>(row, in);
  const HeadTerms t = head_terms(P, sm.b.nm, up, h, i, s, hi, co, c, cs, sm.b.hc);
  L += t.lr;
  if (t.flag) jf |= 1u << h;
  if (!O.fixup) {
    const int H = P.num_heads;
    reinterpret_cast<float*>(P.log_probs)[i * H + h] = co.ell;
    reinterpret_cast<float*>(P.entropy)[i * H + h] = co.Hout;
  }
  if (!O.write_grad) return;
  const RowUp ru = row_upstream(P, hi, t, 0.f, h, i, O.fixup != 0);
  const float ghr = raw_entropy_grad(co, in.norm_ent, ru.gE);
  if (O.joint_c) {  // the joint term's coefficient (the gradient for gL = 1, linear in gL), before G overwrites z
    float* Cf = sm.ct + off;
    row_grad<true>(row, in, co, 1.f, 0.f, [&](int j, float g) { Cf[j] = g; });
  }
  float* G = sm.zt + off;  // (row_grad's last pass reads column j before writing it: in place is safe)
  row_grad<true>(row, in, co, ru.gL, ghr, [&](int j, float g) { G[j] = g; });
}

// c: the tile-fold buffer at this row (contribution k at c[k * cs]) or null. WMAX: the widest head of the call
// (a kernel per width class: its registers are those of its widest path)
template <int WMAX>
ESPER_HD void small_head(const PPOParams& P, const OnePass& O, const SmallSmem& sm, const Up& up, int h, int64_t i,
                         int r, bool ok, const StepIn& s, float& L, uint32_t& jf, float* c, int cs) {
  if (!ok) {
    if (c) head_ident(c, cs);
    return;
  }
  if (!s.present) {
    if (c) head_ident(c, cs);
    const int H = P.num_heads;
    if (!O.fixup) {
      const int A = P.sizes[h];
      float n = (float)A;
      if (sm.ut) {
        const uint8_t* U = sm.ut + r * O.pitch + O.off[h];
        n = 0.f;
        for (int j = 0; j < A; ++j) n += U[j] ? 1.f : 0.f;
      }
      reinterpret_cast<float*>(P.log_probs)[i * H + h] = absent_ell(A, n, head_in(P, h, i, false).a);
      reinterpret_cast<float*>(P.entropy)[i * H + h] = 0.f;
    }
    if (O.write_grad) {
      float* G = sm.zt + r * O.pitch + O.off[h];
      for (int j = 0; j < P.sizes[h]; ++j) G[j] = 0.f;
    }
    return;
  }
  const int A = P.sizes[h];
  if (P.floor[h] > 0.f)
    small_head_floor(P, O, sm, up, h, i, r, s, L, jf, c, cs);
  else if (WMAX <= 4 || A <= 4)
    small_head_w<4>(P, O, sm, up, h, i, r, s, L, jf, c, cs);
  else if (WMAX <= 8 || A <= 8)
    small_head_w<(WMAX < 8 ? WMAX : 8)>(P, O, sm, up, h, i, r, s, L, jf, c, cs);
  else if (WMAX <= 16 || A <= 16)
    small_head_w<(WMAX < 16 ? WMAX : 16)>(P, O, sm, up, h, i, r, s, L, jf, c, cs);
  else
    small_head_w<WMAX>(P, O, sm, up, h, i, r, s, L, jf, c, cs);
}

// the joint surrogate's second pass: add gLj * coefficient where the head is flagged (NaN rule on gLj)
ESPER_HD void small_joint_pass(const PPOParams& P, const OnePass& O, const SmallSmem& sm, int r, uint32_t jf,
                               float gbase) {
  if (gbase == 0.f) return;  // exactly nothing flows
  const bool fin = is_finite(gbase);
  for (int h = 0; h < P.num_heads; ++h) {
    if (!((jf >> h) & 1u)) continue;
    const int A = P.sizes[h], off = r * O.pitch + O.off[h];
    float* G = sm.zt + off;
    const float* Cf = sm.ct + off;
    const uint8_t* U = sm.ut ? sm.ut + off : nullptr;
    for (int j = 0; j < A; ++j) {
      if (U && !U[j]) continue;
      G[j] = fin ? G[j] + gbase * Cf[j] : f_nan();
    }
  }
}

template <int WMAX, class X>
ESPER_HD void small_block(X& x, const PPOParams& P, const OnePass& O, const SmallSmem& sm, int block, int nblocks) {
  const int H = P.num_heads, R = x.R, pitch = O.pitch;
  const bool fwd = !O.fixup;
  prologue(x, P, O, sm.b, block);
  if (O.fixup) {
    float factor, state;
    const int mode = fix_mode(P, O, sm.b.g4, factor, state);
    if (mode == FIX_NONE) return;
    if (mode == FIX_RESCALE) {
      const int64_t per = (P.n + nblocks - 1) / nblocks;
      const int64_t i0 = block * per, i1 = i0 + per < P.n ? i0 + per : P.n;
      rescale_rows(x, P, O, factor, i0, i1);
      fix_epilogue(x, P, O, sm.b.g4, nblocks);
      return;
    }
  }
  const Up up = upstream_of(P, sm.b.g4);
  const int64_t ntiles = (P.n + R - 1) / R;
  const int K = stats_k(H), NW = R / 32;
  if (fwd) {
    if (x.leader())
      for (int w = 0; w < NW; ++w) wacc_init(sm.wacc + w * K, sm.wmom + w * NMOM, K);
    x.sync();
  }
  // a packed row (one segment of every column, no padding) has the tile's layout when the pitch is S (odd S)
  auto flat = [&](const Seg* sg, int n) {
    return n == 1 && sg[0].col == 0 && sg[0].ncols == pitch && sg[0].rs == pitch;
  };
  const bool flat_z = flat(O.zseg, O.nseg_z), flat_m = flat(O.mseg, O.nseg_m), flat_g = flat(O.gseg, O.nseg_g);
  typename X::template Local<StepIn> st;
  typename X::template Local<float> Ls, gb;
  typename X::template Local<uint32_t> jf;
  typename X::template Local<HeadC> hcv;
  typename X::template Local<GlobC> gcv;
  for (int64_t tile = block; tile < ntiles; tile += nblocks) {
    const int64_t row0 = tile * R;
    const int nrows = (int)(P.n - row0 < R ? P.n - row0 : R);
    x.sync();
    x.coop([&](int tid, int nth) {
      if (flat_z)  // one contiguous run per tile into the same layout: element e at e (vector shared stores)
        run_load(O.zseg[0].ptr + (uintptr_t)(row0 * pitch * dtype_size(P.logits_dtype)), (int64_t)nrows * pitch,
                 P.logits_dtype, tid, nth, [&](int64_t e, float v) { sm.zt[e] = v; });
      else
        for (int k = 0; k < O.nseg_z; ++k)
          seg_load(O.zseg[k], P.logits_dtype, row0, nrows, tid, nth,
                   [&](int r, int col, float v) { sm.zt[r * pitch + col] = v; });
      if (P.has_mask) {
        if (flat_m)
          run_load(O.mseg[0].ptr + (uintptr_t)(row0 * pitch), (int64_t)nrows * pitch, DT_U8, tid, nth,
                   [&](int64_t e, float v) { sm.ut[e] = v != 0.f ? 1 : 0; });
        else
          for (int k = 0; k < O.nseg_m; ++k)
            seg_load(O.mseg[k], DT_U8, row0, nrows, tid, nth,
                     [&](int r, int col, float v) { sm.ut[r * pitch + col] = v != 0.f ? 1 : 0; });
      }
    });
    x.sync();
    x.threads([&](int r) {
      StepIn s{false, 0.f, 0.f};
      if (r < nrows) s = step_in(P, row0 + r);
      st(r) = s;
      Ls(r) = 0.f;
      jf(r) = 0u;
      gb(r) = 0.f;
    });
    for (int h = 0; h < H; ++h) {
      x.threads(
          [&](int r) { small_head<WMAX>(P, O, sm, up, h, row0 + r, r, r < nrows, st(r), Ls(r), jf(r), hcv(r).v, 1); });
      if (fwd) x.warp_head_stats(hcv, sm.wacc, K, ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE);
    }
    x.threads([&](int r) {  // (the contributions are computed in the fix-up too: no pointer that may be null)
      float* c = gcv(r).v;
      const int64_t i = row0 + r;
      if (r < nrows) {
        const GlobalTerms g = global_terms(P, sm.b.nm, up, i, st(r), Ls(r), c, 1, sm.b.hc);
        if (fwd) reinterpret_cast<float*>(P.joint_ratio)[i] = g.r;
        if (O.gv) reinterpret_cast<float*>(O.gv)[i] = g.gv;
        gb(r) = g.gbase;
#pragma unroll
        for (int m = 0; m < NMOM; ++m) {
          gcv(r).mw[m] = g.mom[m].w;
          gcv(r).mx[m] = g.mom[m].m;
        }
      } else {
        global_ident(c);
#pragma unroll
        for (int m = 0; m < NMOM; ++m) gcv(r).mw[m] = gcv(r).mx[m] = 0.f;
      }
    });
    if (fwd) x.warp_global_stats(gcv, sm.wacc, sm.wmom, K);
    if (O.write_grad && O.joint_c)
      x.threads([&](int r) {
        if (r < nrows && st(r).present) small_joint_pass(P, O, sm, r, jf(r), gb(r));
      });
    if (O.write_grad) {
      x.sync();
      x.coop([&](int tid, int nth) {
        if (flat_g)
          run_store(O.gseg[0].ptr + (uintptr_t)(row0 * pitch * dtype_size(P.logits_dtype)), (int64_t)nrows * pitch,
                    P.logits_dtype, tid, nth, [&](int64_t e) { return sm.zt[e]; });
        else
          for (int k = 0; k < O.nseg_g; ++k)
            seg_store(O.gseg[k], P.logits_dtype, row0, nrows, tid, nth,
                      [&](int r, int col) { return sm.zt[r * pitch + col]; });
      });
    }
  }
  if (fwd) {
    x.sync();
    if (x.leader()) warps_to_block(sm.wacc, sm.wmom, NW, K, sm.b.acc, sm.b.am);
    x.sync();
    float* part = reinterpret_cast<float*>(O.parts) + (int64_t)block * K;
    x.coop([&](int tid, int nth) { acc_store(sm.b.acc, sm.b.am, K, part, tid, nth); });
    uint32_t* ctl = reinterpret_cast<uint32_t*>(O.ctl);
    if (x.ticket(ctl + CTL_MAIN, nblocks, false)) {
      last_block(x, P, O, sm.b, nblocks);
      if (x.leader()) x.reset_ticket(ctl + CTL_MAIN);
    }
  } else {
    fix_epilogue(x, P, O, sm.b.g4, nblocks);
  }
}

// ---- the wide path: a cluster of CL blocks per row, each block holding a chunk of the row's columns ----------
// (STAGED: the chunk in shared memory, one read of the row from DRAM; otherwise re-read through L2)
template <class X, bool STAGED>
struct WideRow {
  static const bool kStores = STAGED;
  X* x;
  const PPOParams* P;
  int h, A, off;
  int64_t i;
  ESPER_HDM bool use(int j) const {
    if (STAGED) return !P->has_mask || *x->up(off + j) != 0;
    return load_valid(*P, h, i, j);
  }
  ESPER_HDM float z(int j) const { return STAGED ? *x->zp(off + j) : load_logit(*P, h, i, j); }
  ESPER_HDM float slot0(int j) const { return *x->zp(off + j); }
  ESPER_HDM void set_slot0(int j, float v) const { *x->zp(off + j) = v; }
  ESPER_HDM float slot1(int j) const { return *x->ep(off + j); }
  ESPER_HDM void set_slot1(int j, float v) const { *x->ep(off + j) = v; }
  template <class T, class F, class C>
  ESPER_HDM T fold(T init, F f, C c) const {
    const int a0 = off, a1 = off + A, ch = x->chunk;
    return x->cluster_fold(
        [&](int rank, int tid) {
          T acc = init;
          const int c0 = rank * ch;
          const int lo = a0 > c0 ? a0 : c0, hi = a1 < c0 + ch ? a1 : c0 + ch;
          for (int col = lo + tid; col < hi; col += X::WT) acc = c(acc, f(col - a0));
          return acc;
        },
        c);
  }
  template <class F>
  ESPER_HDM void for_each(F f) const {
    const int a0 = off, a1 = off + A, ch = x->chunk;
    x->threads([&](int rank, int tid) {
      const int c0 = rank * ch;
      const int lo = a0 > c0 ? a0 : c0, hi = a1 < c0 + ch ? a1 : c0 + ch;
      for (int col = lo + tid; col < hi; col += X::WT) f(col - a0);
    });
  }
};

struct RowUpS {
  float gL, ghr;
};
struct WideSmem {
  BlockSmem b;
  Core* cores;       // H
  HeadIn* his;       // H
  RowUpS* ups;       // H
  HeadTerms* terms;  // H
  float* c;          // RV: one row's statistics contributions (the rank-0 leader)
  float* z;          // chunk (staged)
  float* e;          // chunk (staged)
  uint8_t* u;        // chunk (staged, has_mask)
};
ESPER_HD size_t wide_smem_bytes(int H, int chunk, bool staged, bool has_mask) {
  size_t b = block_smem_bytes(H) + align16(sizeof(Core) * H) + align16(sizeof(HeadIn) * H) +
             align16(sizeof(RowUpS) * H) + align16(sizeof(HeadTerms) * H) + align16(sizeof(float) * RV);
  if (staged) {
    b += 2 * align16(sizeof(float) * (size_t)chunk);
    if (has_mask) b += align16((size_t)chunk);
  }
  return b;
}
ESPER_HD WideSmem wide_carve(unsigned char* p, int H, int chunk, bool staged, bool has_mask) {
  WideSmem w;
  w.b = block_carve(p, H);
  w.cores = reinterpret_cast<Core*>(p);
  p += align16(sizeof(Core) * H);
  w.his = reinterpret_cast<HeadIn*>(p);
  p += align16(sizeof(HeadIn) * H);
  w.ups = reinterpret_cast<RowUpS*>(p);
  p += align16(sizeof(RowUpS) * H);
  w.terms = reinterpret_cast<HeadTerms*>(p);
  p += align16(sizeof(HeadTerms) * H);
  w.c = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * RV);
  w.z = w.e = nullptr;
  w.u = nullptr;
  if (staged) {
    w.z = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * (size_t)chunk);
    w.e = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * (size_t)chunk);
    if (has_mask) {
      w.u = p;
      p += align16((size_t)chunk);
    }
  }
  return w;
}

// the statistics of one row, accumulated in order by the cluster's rank-0 leader
ESPER_HD void acc_add(float* acc, int base, const float* c, int V, uint32_t mn, uint32_t mx) {
  for (int k = 0; k < V; ++k) acc[base + k] = kcombine(bit(mn, k), bit(mx, k), acc[base + k], c[k]);
}

template <class X, bool STAGED>
ESPER_HD void wide_cluster(X& x, const PPOParams& P, const OnePass& O, const WideSmem& sm, int cl, int ncl) {
  const int H = P.num_heads, ch = O.chunk;
  const bool fwd = !O.fixup;
  const int32_t dt = P.logits_dtype;
  prologue(x, P, O, sm.b, cl);
  if (O.fixup) {
    float factor, state;
    const int mode = fix_mode(P, O, sm.b.g4, factor, state);
    if (mode == FIX_NONE) return;
    if (mode == FIX_RESCALE) {
      const int64_t per = (P.n + ncl - 1) / ncl;
      const int64_t i0 = cl * per, i1 = i0 + per < P.n ? i0 + per : P.n;
      rescale_rows(x, P, O, factor, i0, i1);
      fix_epilogue(x, P, O, sm.b.g4, ncl * O.cluster);
      return;
    }
  }
  const Up up = upstream_of(P, sm.b.g4);
  const int fixup = O.fixup;
  for (int64_t i = cl; i < P.n; i += ncl) {
    x.sync();
    const StepIn s = step_in(P, i);
    if (s.present) {
      if (STAGED) {
        x.threads([&](int rank, int tid) {
          const int c0 = rank * ch, c1 = c0 + ch;
          for (int k = 0; k < O.nseg_z; ++k) {
            const Seg& sg = O.zseg[k];
            const int lo = sg.col > c0 ? sg.col : c0, hi = sg.col + sg.ncols < c1 ? sg.col + sg.ncols : c1;
            if (hi <= lo) continue;
            const uintptr_t base = sg.ptr + (uintptr_t)((i * sg.rs + (lo - sg.col)) * dtype_size(dt));
            run_load(base, hi - lo, dt, tid, X::WT, [&](int64_t e, float v) { *x.zp(lo + (int)e) = v; });
          }
          if (P.has_mask)
            for (int k = 0; k < O.nseg_m; ++k) {
              const Seg& sg = O.mseg[k];
              const int lo = sg.col > c0 ? sg.col : c0, hi = sg.col + sg.ncols < c1 ? sg.col + sg.ncols : c1;
              if (hi <= lo) continue;
              const uintptr_t base = sg.ptr + (uintptr_t)(i * sg.rs + (lo - sg.col));
              run_load(base, hi - lo, DT_U8, tid, X::WT,
                       [&](int64_t e, float v) { *x.up(lo + (int)e) = v != 0.f ? 1 : 0; });
            }
        });
        x.sync();
      }
      for (int h = 0; h < H; ++h) {
        WideRow<X, STAGED> row{&x, &P, h, P.sizes[h], O.off[h], i};
        const HeadIn hi = head_in(P, h, i, true);
        const Core co = row_core<true>(row, row_in(P, h, hi));
        if (x.leader()) {
          sm.cores[h] = co;
          sm.his[h] = hi;
        }
      }
    }
    if (!s.present && fwd)  // the absent step's outputs need its valid counts (the reference's dummy row)
      for (int h = 0; h < H; ++h) {
        WideRow<X, STAGED> row{&x, &P, h, P.sizes[h], O.off[h], i};
        float n = (float)P.sizes[h];
        if (P.has_mask)
          n = row.fold(
              0.f, [&](int j) { return load_valid(P, h, i, j) ? 1.f : 0.f; }, [](float u, float v) { return u + v; });
        if (x.leader()) {
          sm.cores[h].n = n;
          sm.his[h] = head_in(P, h, i, false);
        }
      }
    // the row's scalar work: one thread per block (the rank-0 leader also accumulates the statistics)
    if (x.leader()) {
      float* c = sm.c;
      const bool st = fwd && x.stats_leader();
      float L = 0.f;
      HeadTerms* t = sm.terms;
      for (int h = 0; h < H; ++h) {
        if (s.present) {
          t[h] = head_terms(P, sm.b.nm, up, h, i, s, sm.his[h], sm.cores[h], st ? c : nullptr, 1, sm.b.hc);
          L += t[h].lr;
          if (st) {
            reinterpret_cast<float*>(P.log_probs)[i * H + h] = sm.cores[h].ell;
            reinterpret_cast<float*>(P.entropy)[i * H + h] = sm.cores[h].Hout;
          }
        } else if (st) {
          head_ident(c);
          reinterpret_cast<float*>(P.log_probs)[i * H + h] = absent_ell(P.sizes[h], sm.cores[h].n, sm.his[h].a);
          reinterpret_cast<float*>(P.entropy)[i * H + h] = 0.f;
        }
        if (st) acc_add(sm.b.acc, ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE, c, ESPER_HEAD_SIZE, kHeadMin, kHeadMax);
      }
      const GlobalTerms g = global_terms(P, sm.b.nm, up, i, s, L, st ? c : nullptr, 1, sm.b.hc);
      if (st) {
        acc_add(sm.b.acc, 0, c, ESPER_GLOBAL_SIZE, kGlobalMin, kGlobalMax);
        for (int m = 0; m < NMOM; ++m) sm.b.am[m] = mom_combine(sm.b.am[m], g.mom[m]);
        reinterpret_cast<float*>(P.joint_ratio)[i] = g.r;
      }
      if (O.gv && x.stats_leader()) reinterpret_cast<float*>(O.gv)[i] = g.gv;
      if (s.present)
        for (int h = 0; h < H; ++h) {
          const RowUp ru = row_upstream(P, sm.his[h], t[h], g.gbase, h, i, fixup != 0);
          sm.ups[h] = RowUpS{ru.gL, raw_entropy_grad(sm.cores[h], P.normalize_entropy != 0, ru.gE)};
        }
    }
    if (!O.write_grad) continue;
    x.sync();
    for (int h = 0; h < H; ++h) {
      WideRow<X, STAGED> row{&x, &P, h, P.sizes[h], O.off[h], i};
      const uintptr_t gp = P.grads[h];
      const int64_t gbase = i * P.grads_rs[h];
      if (!s.present) {
        row.for_each([&](int j) { store_elem(gp, gbase + j, dt, 0.f); });
        continue;
      }
      const HeadIn hi = sm.his[h];
      const RowUpS u = sm.ups[h];
      row_grad<true>(row, row_in(P, h, hi), sm.cores[h], u.gL, u.ghr,
                     [&](int j, float g) { store_elem(gp, gbase + j, dt, g); });
    }
  }
  if (fwd) {
    if (x.is_rank0()) {
      x.sync();
      const int K = stats_k(H);
      float* part = reinterpret_cast<float*>(O.parts) + (int64_t)cl * K;
      x.coop([&](int tid, int nth) { acc_store(sm.b.acc, sm.b.am, K, part, tid, nth); });
      uint32_t* ctl = reinterpret_cast<uint32_t*>(O.ctl);
      if (x.ticket(ctl + CTL_MAIN, ncl, false)) {  // (one ticket per cluster: its rank 0)
        last_block(x, P, O, sm.b, ncl);
        if (x.leader()) x.reset_ticket(ctl + CTL_MAIN);
      }
    }
  } else {
    fix_epilogue(x, P, O, sm.b.g4, ncl * O.cluster);
  }
}

// --------------------------------------------------------------------------------------------------------
// the plan of a call (host): segments, path, tile and cluster shapes, grids, shared memory
// --------------------------------------------------------------------------------------------------------
struct Machine {
  int sm_count;     // multiprocessors
  int cc_major;     // compute capability (clusters from 9)
  int smem_optin;   // dynamic shared memory a block may have (bytes)
  int smem_per_sm;  // shared memory per multiprocessor (bytes)
  int max_blocks;   // > 0: at most this many main blocks (clusters on the wide path): tests force many blocks
};

inline void build_segs(const PPOParams& P, const uintptr_t* ptrs, const int64_t* rs, int esz, Seg* segs,
                       int32_t& nseg) {
  nseg = 0;
  int col = 0;
  for (int h = 0; h < P.num_heads; ++h) {
    const int A = P.sizes[h];
    Seg* cur = nseg ? &segs[nseg - 1] : nullptr;
    if (cur && ptrs[h] == cur->ptr + (uintptr_t)cur->ncols * (uintptr_t)esz && rs[h] == cur->rs) {
      cur->ncols += A;
    } else {
      Seg s;
      s.ptr = ptrs[h];
      s.rs = rs[h];
      s.col = col;
      s.ncols = A;
      s.magic = 0;
      segs[nseg++] = s;
    }
    col += A;
  }
  for (int k = 0; k < nseg; ++k)
    segs[k].magic = (((uint64_t)1 << 40) + (uint64_t)segs[k].ncols - 1) / (uint64_t)segs[k].ncols;
}

// which path, which shapes; fixup / write_grad / write_gv / force_recompute and the scratch pointers are the
// caller's. Returns "" or why the call cannot run.
inline const char* plan(const PPOParams& P, const Machine& M, OnePass& O) {
  const int H = P.num_heads;
  const int esz = dtype_size(P.logits_dtype);
  int S = 0, maxA = 0;
  for (int h = 0; h < H; ++h) {
    O.off[h] = S;
    S += P.sizes[h];
    if (P.sizes[h] > maxA) maxA = P.sizes[h];
  }
  O.S = S;
  build_segs(P, P.logits, P.logits_rs, esz, O.zseg, O.nseg_z);
  O.nseg_m = 0;
  if (P.has_mask) build_segs(P, P.masks, P.masks_rs, 1, O.mseg, O.nseg_m);
  O.nseg_g = 0;
  if (O.write_grad) build_segs(P, P.grads, P.grads_rs, esz, O.gseg, O.nseg_g);
  const bool fwd = !O.fixup;
  O.joint_c = (O.write_grad && !P.per_head) ? 1 : 0;
  const int64_t N = P.n;
  const int64_t pre_blocks = (N + 4095) / 4096;
  O.grid_pre = (int)(pre_blocks < 1 ? 1 : (pre_blocks > 128 ? 128 : pre_blocks));
  const int cap = M.max_blocks > 0 ? M.max_blocks : (1 << 30);
  // small heads: a tile of R rows in shared memory, at most 64 KB a block (several blocks per multiprocessor)
  O.path = PATH_WIDE;
  if (maxA <= SMALL_W) {
    const int pitch = S | 1;
    for (int R = MAX_TILE_ROWS; R >= 32; R >>= 1) {
      const size_t b = small_smem_bytes(H, R, pitch, O.joint_c != 0, P.has_mask != 0, fwd);
      if (b <= 64 * 1024 || (R == 32 && b <= (size_t)M.smem_optin)) {
        O.path = PATH_SMALL;
        O.wmax = maxA <= 8 ? 8 : (maxA <= 16 ? 16 : 32);
        O.rows = R;
        O.pitch = pitch;
        O.smem = (int32_t)b;
        break;
      }
    }
  }
  if (O.path == PATH_SMALL) {
    const int64_t ntiles = (N + O.rows - 1) / O.rows;
    int per_sm = M.smem_per_sm / (O.smem + 1024);
    const int by_threads = 2048 / O.rows;
    per_sm = per_sm < by_threads ? per_sm : by_threads;
    per_sm = per_sm < 1 ? 1 : (per_sm > 32 ? 32 : per_sm);
    int64_t g = (int64_t)M.sm_count * per_sm;
    g = g < ntiles ? g : ntiles;
    g = g < cap ? g : cap;
    O.grid_main = O.nparts = (int32_t)(g < 1 ? 1 : g);
    O.cluster = 1;
    O.chunk = 0;
    return "";
  }
  // wide: a cluster of CL blocks per row, each a chunk of at most 4,096 columns in shared memory
  const int max_cl = M.cc_major >= 9 ? MAX_CLUSTER : 1;
  const int chunk_cap = M.cc_major >= 9 ? 4096 : 8192;
  int CL = (S + chunk_cap - 1) / chunk_cap;
  bool staged = CL <= max_cl;
  if (!staged) CL = max_cl;
  int chunk = (S + CL - 1) / CL;
  chunk = (chunk + 15) & ~15;
  size_t b = wide_smem_bytes(H, chunk, staged, P.has_mask != 0);
  if (staged && b > (size_t)M.smem_optin) {
    staged = false;
    b = wide_smem_bytes(H, chunk, false, P.has_mask != 0);
  }
  if (b > (size_t)M.smem_optin) return "the per-head statistics do not fit in shared memory";
  O.path = staged ? PATH_WIDE : PATH_STREAM;
  O.cluster = CL;
  O.chunk = chunk;
  O.rows = WIDE_THREADS;
  O.pitch = 0;
  O.smem = (int32_t)b;
  int per_sm = M.smem_per_sm / (int)(b + 1024);
  per_sm = per_sm < 8 ? per_sm : 8;
  per_sm = per_sm < 1 ? 1 : per_sm;
  int64_t ncl = (int64_t)M.sm_count * per_sm / CL;
  ncl = ncl < N ? ncl : N;
  ncl = ncl < cap ? ncl : cap;
  if (ncl < 1) ncl = 1;
  O.nparts = (int32_t)ncl;
  O.grid_main = (int32_t)(ncl * CL);
  return "";
}

}  // namespace op
}  // namespace esper

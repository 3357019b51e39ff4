// esper_kernels: the fused PPO loss on the CPU (forward with statistics, backward recomputing the softmax):
// the driver.
//
// Rows are cut into fixed chunks of CHUNK rows (independent of the thread count); each chunk's statistics
// are reduced in row order into a partial (double), and the partials are merged in chunk order, so every
// output is bitwise the same whatever the number of threads. Threads (std::thread, count from Python, one
// per 64 K logits at most) take contiguous runs of chunks; no OpenMP (it would clash with torch's libgomp).
//
// Within a chunk, rows go in blocks of RB = 16, one row per SIMD lane. On CPUs with AVX-512 (checked at run
// time), heads of at most 32 actions run the AVX-512 small-head path (avx512_small.cpp): one exp per logit in
// the forward and one in the backward (the forward saves each row's m and ls), float32 exp/log with FMA,
// statistics accumulated per lane and reduced in a fixed order, floored heads included. Small heads without a floor
// that it does not take (no AVX-512) run the auto-vectorised block path (block.cpp), bitwise the row path's results.
// Wider heads without a floor run the AVX-512 wide path (avx512_wide.cpp: one row at a time, 16 columns per
// vector, the same exp/log, m and ls saved as for small heads). Log-probs come from the shifted logits in every
// path: (z - m) - log sum exp(z - m) (ppo_core.h row_softmax).
// Floored wide heads (and floored small heads without AVX-512, and every head with vectorise = false) run the
// row-by-row path over a row buffer (BufRow), which is exactly the code a CUDA thread runs for a small head.
// cpu_internal.h lists the files.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/cpu_internal.h"
#include "ppo_cpu.h"

namespace esper {
namespace cpu {
namespace {

template <class F>
void parallel_chunks(int64_t nchunks, int nthreads, F&& f) {
  int64_t T = std::max<int64_t>(1, std::min<int64_t>(nthreads, nchunks));
  if (T <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) f(c, 0);
    return;
  }
  // thread t: the contiguous chunks [t * nchunks / T, (t + 1) * nchunks / T) (its rows' prefetches stay in
  // its own rows)
  auto run = [&f, T, nchunks](int64_t t) {
    const int64_t c1 = (t + 1) * nchunks / T;
    for (int64_t c = t * nchunks / T; c < c1; ++c) f(c, (int)t);
  };
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  for (int64_t t = 1; t < T; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}

// one thread's row buffers
struct Bufs {
  std::vector<float> z, g;
  std::vector<uint8_t> u;
  std::unique_ptr<SmallBuf> small;
  std::unique_ptr<FastCols> cols;
  std::vector<LaneAcc> acc;  // per head
  std::unique_ptr<GlobalAcc> gacc;
  bool vectorise;
  Bufs(int A, int H, bool vec)
      : z(std::max(A, 1)),
        g(std::max(A, 1)),
        u(std::max(A, 1)),
        small(new SmallBuf),
        cols(new FastCols),
        acc(H),
        gacc(new GlobalAcc),
        vectorise(vec) {}
};

template <class T, class Cvt>
inline void stage_typed(const T* src, const uint8_t* m, int A, float fill, float* z, uint8_t* u, Cvt cvt) {
  if (m) {
    for (int j = 0; j < A; ++j) {
      bool v = m[j] != 0;
      u[j] = v;
      z[j] = v ? cvt(src[j]) : fill;
    }
  } else {
    for (int j = 0; j < A; ++j) {
      u[j] = 1;
      z[j] = cvt(src[j]);
    }
  }
}

// masked logits of row i of head h (a present step) into z, valid flags into u
inline void stage_row(const PPOParams& P, int h, int64_t i, float* z, uint8_t* u) {
  const int A = P.sizes[h];
  const uint8_t* m = P.has_mask ? reinterpret_cast<const uint8_t*>(P.masks[h]) + i * P.masks_rs[h] : nullptr;
  const int64_t off = i * P.logits_rs[h];
  switch (P.logits_dtype) {
    case DT_F32:
      stage_typed(reinterpret_cast<const float*>(P.logits[h]) + off, m, A, P.mask_fill, z, u,
                  [](float x) { return x; });
      break;
    case DT_F16:
      stage_typed(reinterpret_cast<const uint16_t*>(P.logits[h]) + off, m, A, P.mask_fill, z, u,
                  [](uint16_t x) { return half_to_float(x); });
      break;
    default:
      stage_typed(reinterpret_cast<const uint16_t*>(P.logits[h]) + off, m, A, P.mask_fill, z, u,
                  [](uint16_t x) { return bf16_to_float(x); });
      break;
  }
}

inline bool vectorised(const PPOParams& P, int h) { return P.sizes[h] <= SMALL && !(P.floor[h] > 0.f); }

// prefetch the logits and masks of rows [i0, i1) of every head (and, for the backward, the gradient rows)
inline void prefetch_rows(const PPOParams& P, int64_t i0, int64_t i1, bool grads) {
#if defined(__GNUC__)
  const int es = P.logits_dtype == DT_F32 ? 4 : 2;
  for (int h = 0; h < P.num_heads; ++h) {
    const int64_t A = P.sizes[h];
    if (A > 4 * SMALL) continue;  // wide rows stream well enough on their own
    for (int64_t i = i0; i < i1; ++i) {
      const char* z = reinterpret_cast<const char*>(P.logits[h]) + i * P.logits_rs[h] * es;
      for (int64_t b = 0; b < A * es; b += 64) __builtin_prefetch(z + b, 0, 3);
      __builtin_prefetch(z + A * es - 1, 0, 3);
      if (P.has_mask) {
        const char* m = reinterpret_cast<const char*>(P.masks[h]) + i * P.masks_rs[h];
        __builtin_prefetch(m, 0, 3);
        __builtin_prefetch(m + A - 1, 0, 3);
      }
      if (grads) {
        char* g = reinterpret_cast<char*>(P.grads[h]) + i * P.grads_rs[h] * es;
        __builtin_prefetch(g, 1, 3);
        __builtin_prefetch(g + A * es - 1, 1, 3);
      }
    }
  }
#else
  (void)P, (void)i0, (void)i1, (void)grads;
#endif
}

// the CPU has what the AVX-512 files were compiled for (always false when they were not compiled)
bool cpu_has_avx512() {
#if ESPER_CPU_AVX512
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("popcnt");
  }();
  return ok;
#else
  return false;
#endif
}

// the AVX-512 paths run: the CPU has AVX-512 and the environment variable ESPER_KERNELS_CPU_AVX512 is not "0"
// (read once per call, by fast_plan: the tests run the paths of a CPU without AVX-512 this way, on one with it)
bool use_avx512() {
  if (!cpu_has_avx512()) return false;
  const char* env = std::getenv("ESPER_KERNELS_CPU_AVX512");
  return !(env && env[0] == '0' && env[1] == 0);
}

// heads the AVX-512 path runs: small (with or without a floor), 16-bit logits of at least 2 columns (a column
// is read as one 32-bit word inside the row), row strides within the gather's int32 offsets
inline bool fast_head(const PPOParams& P, int h, bool avx512) {
  return avx512 && P.sizes[h] <= SMALL && (P.logits_dtype == DT_F32 || P.sizes[h] >= 2) &&
         P.logits_rs[h] <= FAST_MAX_RS && P.grads_rs[h] <= FAST_MAX_RS;
}

// heads the AVX-512 wide path runs: more than SMALL actions, no floor
inline bool wide_head(const PPOParams& P, int h, bool avx512) {
  return avx512 && P.sizes[h] > SMALL && !(P.floor[h] > 0.f);
}

inline void block_in(const StepIn* sb, int64_t b0, int nb, BlockIn& B) {
  B.b0 = b0;
  B.nb = nb;
  B.live = nb >= RB ? 0xffffu : ((1u << nb) - 1u);
  B.pres = 0;
  for (int r = 0; r < RB; ++r) {
    const bool p = r < nb && sb[r].present;
    B.pres |= (uint32_t)p << r;
    B.w[r] = p ? sb[r].w : 0.f;
    B.w_raw[r] = r < nb ? sb[r].w_raw : 1.f;
    B.adv0[r] = p ? sb[r].adv0 : 0.f;
  }
}

constexpr int PREFETCH_BLOCKS = 2;

// the span of the heads in sel (pointers ptr[h], A_h columns of es bytes, row strides rs[h]); off when they
// do not fit one span or share no row stride
FastPlan::Span2D span2d(const PPOParams& P, const bool* sel, const uintptr_t* ptr, const int64_t* rs, int es) {
  FastPlan::Span2D S;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  int64_t rs0 = -1, ncols = 0;
  for (int h = 0; h < P.num_heads; ++h) {
    if (!sel[h]) continue;
    if (rs0 < 0) rs0 = rs[h];
    if (rs[h] != rs0 || (ptr[h] % es) != 0) return S;
    lo = std::min<uintptr_t>(lo, ptr[h]);
    hi = std::max<uintptr_t>(hi, ptr[h] + (uintptr_t)P.sizes[h] * es);
    ncols += P.sizes[h];
  }
  if (rs0 <= 0 || hi <= lo || hi - lo > (uintptr_t)SPAN * es || ncols < 8) return S;
  S.lo = lo;
  S.rs = rs0;
  S.w = (int)((hi - lo) / es);
  for (int h = 0; h < P.num_heads; ++h) {
    S.off[h] = 0;
    if (!sel[h]) continue;
    S.off[h] = (int)((ptr[h] - lo) / es);
    const uint64_t full = P.sizes[h] >= 64 ? ~0ull : ((1ull << P.sizes[h]) - 1ull);
    S.cols |= full << S.off[h];
  }
  S.on = true;
  return S;
}

// prefetch rows [i0, i0 + RB) of every stream (i0 < n)
inline void prefetch_block(const FastPlan& F, int64_t i0, int64_t n) {
#if defined(__GNUC__)
  if (i0 >= n) return;
  const int64_t i1 = std::min<int64_t>(i0 + RB, n);
  for (int k = 0; k < F.nspans; ++k) {
    const FastPlan::Span& sp = F.spans[k];
    const int64_t w = sp.hi - sp.lo;
    if (sp.stride <= w + 128) {  // (nearly) contiguous rows: every line of the block
      const uintptr_t a0 = (sp.base + i0 * sp.stride + sp.lo) & ~(uintptr_t)63;
      const uintptr_t a1 = sp.base + (i1 - 1) * sp.stride + sp.hi;
      for (uintptr_t a = a0; a < a1; a += 64) {
        if (sp.write)
          __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 3);
        else
          __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const uintptr_t a0 = (sp.base + i * sp.stride + sp.lo) & ~(uintptr_t)63;
        const uintptr_t a1 = sp.base + i * sp.stride + sp.hi;
        for (uintptr_t a = a0; a < a1; a += 64) {
          if (sp.write)
            __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 3);
          else
            __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
        }
      }
    }
  }
#else
  (void)F, (void)i0, (void)n;
#endif
}

FastPlan fast_plan(const PPOParams& P, bool vectorise, const float* st, const GradScal* gs) {
  FastPlan F;
  const bool avx512 = use_avx512();
  const int H = P.num_heads;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int h = 0; h < H; ++h) {
    F.fast_ok[h] = fast_head(P, h, avx512);
    F.fast[h] = vectorise && F.fast_ok[h];
    F.wide_ok[h] = wide_head(P, h, avx512);
    F.wide[h] = vectorise && F.wide_ok[h];
    F.any = F.any || F.fast[h];
    F.all = (h == 0 || F.all) && F.fast[h];
    F.moff[h] = 0;
    F.pscale[h] = F.ecoef[h] = 0.f;
    if (F.fast[h] && P.has_mask) {
      lo = std::min<uintptr_t>(lo, P.masks[h]);
      hi = std::max<uintptr_t>(hi, P.masks[h] + P.sizes[h]);
    }
    if (st && gs) {
      const float den = st[ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE + HD_REL_WEIGHT];
      F.pscale[h] = safe_div(gs->g_pol, P.per_head ? den : st[G_WEIGHT]);  // as head_grads
      F.ecoef[h] = safe_div(gs->g_ent * -P.kcoef[h], den);
    }
  }
  if (F.any) {  // the streams of every head's rows and of the steps (forward: st == nullptr)
    const bool fwd = st == nullptr;
    const int es = P.logits_dtype == DT_F32 ? 4 : 2;
    for (int h = 0; h < H; ++h) {
      const int64_t A = P.sizes[h];
      if (A > 4 * SMALL) continue;  // wide rows stream well enough on their own
      F.stream(P.logits[h], P.logits_rs[h] * es, A * es);
      if (P.has_mask) F.stream(P.masks[h], P.masks_rs[h], A);
      if (!fwd) F.stream(P.grads[h], P.grads_rs[h] * es, A * es, true);
      F.vec_stream(P.actions[h]);
      if (P.has_rel) F.vec_stream(P.rel[h]);
      if (fwd) F.vec_stream(P.old_lp[h]);
      if (fwd || h == 0) F.vec_stream(P.adv[h]);
    }
    F.vec_stream(P.weights);
    if (fwd) {
      F.vec_stream(P.values);
      F.vec_stream(P.returns);
      F.vec_stream(P.old_values);
      F.vec_stream(P.value_weights);
      F.stream(P.log_probs, 4 * H, 4 * H, true);
      F.stream(P.entropy, 4 * H, 4 * H, true);
      F.stream(P.joint_ratio, 4, 4, true);
      F.stream(P.saved, 4 * (H + 1), 4 * (H + 1), true);
      F.stream(P.saved + 4 * (uintptr_t)(P.n * (H + 1)), 4 * H, 4 * H, true);
    } else {
      F.stream(P.saved, 4 * (H + 1), 4 * (H + 1));
      F.stream(P.saved + 4 * (uintptr_t)(P.n * (H + 1)), 4 * H, 4 * H);
      if (P.grad_log_probs.ptr) F.stream(P.grad_log_probs.ptr, 4 * P.grad_log_probs.stride0, 4 * H);
      if (P.grad_entropy.ptr) F.stream(P.grad_entropy.ptr, 4 * P.grad_entropy.stride0, 4 * H);
      if (P.grad_values) F.stream(P.grad_values, 4, 4, true);
    }
  }
  if (P.has_mask && F.any && hi - lo <= 64) {
    F.mpacked = true;
    for (int h = 0; h < H; ++h)
      if (F.fast[h] && P.masks_rs[h] != P.masks_rs[0]) F.mpacked = false;
  }
  if (F.any) {
    const int es = P.logits_dtype == DT_F32 ? 4 : 2;
    F.zp = span2d(P, F.fast, P.logits, P.logits_rs, es);
    if (st) F.gp = span2d(P, F.fast, P.grads, P.grads_rs, es);
    F.otr = H + 1 <= RB;
    for (int h = 0; h < H; ++h) F.hmask |= (uint32_t)F.fast[h] << h;
    // (64-bit: H may be 32; the masks are used only when otr, H < RB)
    F.smask = (uint32_t)(P.per_head ? (F.hmask | (1ull << H)) : ((2ull << H) - 1ull));
  }
  if (F.mpacked) {
    F.mbase = reinterpret_cast<const uint8_t*>(lo);
    F.mrs = P.masks_rs[0];
    for (int h = 0; h < H; ++h) {
      if (!F.fast[h]) continue;
      F.moff[h] = (int)(P.masks[h] - lo);
      const uint64_t full = P.sizes[h] >= 64 ? ~0ull : ((1ull << P.sizes[h]) - 1ull);
      F.mbits |= full << F.moff[h];
    }
  }
  return F;
}

// statistics of rows [r0, r1) into part[K] (moments: weight, mean, M2)
void forward_chunk(const PPOParams& P, const FastPlan& F, int64_t r0, int64_t r1, Bufs& b, double* part) {
  const int H = P.num_heads;
  float* logp = reinterpret_cast<float*>(P.log_probs);
  float* ent = reinterpret_cast<float*>(P.entropy);
  float* jr = reinterpret_cast<float*>(P.joint_ratio);
  float* saved = reinterpret_cast<float*>(P.saved);
  double hacc[ESPER_MAX_HEADS][ESPER_HEAD_SIZE];
  double gacc[GX_SIZE];
  const bool* fast = F.fast;
  for (int h = 0; h < H; ++h) {
    for (int k = 0; k < ESPER_HEAD_SIZE; ++k) hacc[h][k] = kind_init(head_kind(k));
    if (fast[h]) b.acc[h].init();
  }
  for (int k = 0; k < GX_SIZE; ++k) gacc[k] = kind_init(global_kind(k));
  if (F.any) b.gacc->init();
  float xs[3][CHUNK], xw[3][CHUNK];
  double c[GX_SIZE];

  StepIn sb[RB];
  HeadIn hib[RB];
  RowFwd rfb[RB];
  BlockIn B;
  alignas(64) float Lsum[RB];
  alignas(64) uint32_t flags[RB];
  alignas(64) uint64_t rows[RB];
  for (int64_t i0 = r0; i0 < r1; i0 += RB) {
    const int nb = (int)std::min<int64_t>(RB, r1 - i0);
    if (F.any)
      prefetch_block(F, i0 + PREFETCH_BLOCKS * RB, P.n);
    else
      prefetch_rows(P, i0 + RB, std::min<int64_t>(i0 + 2 * RB, P.n), false);
    if (F.all) {
#if ESPER_CPU_AVX512
      avx512::block_in_vec(P, i0, nb, B);
#endif
    } else {
      for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i0 + q);
      block_in(sb, i0, nb, B);
    }
    if (F.any) {
#if ESPER_CPU_AVX512
      avx512::fast_mask_rows(F, B, rows);
      avx512::fast_stage(P, F, B, *b.cols, true);
#endif
    }
    for (int q = 0; q < RB; ++q) {
      Lsum[q] = 0.f;
      flags[q] = 0;
    }
    for (int h = 0; h < H; ++h) {  // every head's rows of the block: outputs, statistics, Lsum, flags
      if (fast[h]) {
#if ESPER_CPU_AVX512
        avx512::fast_forward_any(P, F, h, B, rows, *b.cols, b.acc[h], Lsum, flags);
#endif
        continue;
      }
      for (int q = 0; q < nb; ++q) hib[q] = load_head(P, h, i0 + q, sb[q].present);
      if (b.vectorise && vectorised(P, h)) {
        small_forward(P, h, i0, nb, sb, hib, rfb, *b.small);
      } else {
        for (int q = 0; q < nb; ++q) {
          RowFwd rf{0.f, 0.f, 0.f, false, 0.f, 0.f};
          if (sb[q].present && F.wide[h]) {
#if ESPER_CPU_AVX512
            rf = avx512::wide_forward_any(P, h, i0 + q, hib[q]);
#endif
          } else if (sb[q].present) {
            stage_row(P, h, i0 + q, b.z.data(), b.u.data());
            BufRow row{b.z.data(), b.u.data(), nullptr, P.sizes[h]};
            rf = row_forward(row, row_in(P, h, hib[q]));
          }
          rfb[q] = rf;
        }
      }
      for (int q = 0; q < nb; ++q) {
        const int64_t i = i0 + q;
        const RowFwd& rf = rfb[q];
        logp[i * H + h] = rf.ell;
        ent[i * H + h] = rf.ent;
        saved_m(P)[i * H + h] = rf.m;  // (for the AVX-512 backward, whichever path the forward took)
        saved_ls(P)[i * H + h] = rf.ls;
        const HeadStep hs = head_step(P, h, i, sb[q], hib[q], rf, c);
#pragma GCC unroll 16
        for (int k = 0; k < ESPER_HEAD_SIZE; ++k) hacc[h][k] = kind_combine(head_kind(k), hacc[h][k], c[k]);
        Lsum[q] += hs.lr;
        if (P.per_head)
          saved[i * (H + 1) + h] = hs.u;
        else if (hs.flag)
          flags[q] |= 1u << h;
      }
    }
    if (F.any) {
#if ESPER_CPU_AVX512
      avx512::fast_global_any(P, F, B, Lsum, flags, *b.cols, *b.gacc, &xs[0][i0 - r0], &xw[0][i0 - r0]);
      avx512::fast_flush(P, F, B, *b.cols, true);
#endif
      continue;
    }
    for (int q = 0; q < nb; ++q) {
      const int64_t i = i0 + q;
      const GlobalStep g = global_step(P, i, sb[q], Lsum[q], c);
#pragma GCC unroll 32
      for (int k = 0; k < GX_SIZE; ++k) gacc[k] = kind_combine(global_kind(k), gacc[k], c[k]);
      jr[i] = g.r;
      if (!P.per_head)
        for (int h = 0; h < H; ++h) saved[i * (H + 1) + h] = ((flags[q] >> h) & 1u) ? g.base : no_flow();
      saved[i * (H + 1) + H] = g.vsaved;
      for (int m = 0; m < 3; ++m) {
        xs[m][i - r0] = g.x[m];
        xw[m][i - r0] = g.xw[m];
      }
    }
  }
  for (int h = 0; h < H; ++h)
    if (fast[h]) b.acc[h].fold(hacc[h]);
  if (F.any) b.gacc->fold(gacc);
  for (int k = 0; k < ESPER_GLOBAL_SIZE; ++k) part[k] = gacc[k];
  for (int m = 0; m < 3; ++m) {
    int wi, mi, qi, lo, hi;
    moment_slots(m, wi, mi, qi, lo, hi);
    const double mean = moment_mean(gacc[wi], gacc[mi], gacc[lo], gacc[hi]);
    double m2 = 0.0;
    if (!finite_d(mean)) {  // a kept infinity (or NaN): no shifted sum (inf - inf), the rule of chan_merge
      m2 = nonfinite_m2(mean);
    } else {
      for (int64_t r = 0; r < r1 - r0; ++r) {
        if (xw[m][r] > 0.f) {
          const double d = (double)xs[m][r] - mean;
          m2 += (double)xw[m][r] * d * d;
        }
      }
    }
    part[mi] = mean;
    part[qi] = m2;
  }
  for (int h = 0; h < H; ++h)
    for (int k = 0; k < ESPER_HEAD_SIZE; ++k) part[ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE + k] = hacc[h][k];
}

void backward_rows(const PPOParams& P, const FastPlan& F, const float* st, const GradScal& gs, int64_t r0, int64_t r1,
                   Bufs& b) {
  const int H = P.num_heads;
  float* gv = reinterpret_cast<float*>(P.grad_values);
  StepIn sb[RB];
  HeadIn hi[RB];
  BlockIn B;
  float gL[RB], gE[RB];
  alignas(64) uint64_t rows[RB];
  for (int64_t i0 = r0; i0 < r1; i0 += RB) {
    const int nb = (int)std::min<int64_t>(RB, r1 - i0);
    if (F.any)
      prefetch_block(F, i0 + PREFETCH_BLOCKS * RB, P.n);
    else
      prefetch_rows(P, i0 + RB, std::min<int64_t>(i0 + 2 * RB, P.n), true);
    if (F.all) {
#if ESPER_CPU_AVX512
      avx512::block_in_vec(P, i0, nb, B);
#endif
    } else {
      for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i0 + q);
      if (F.any) block_in(sb, i0, nb, B);
    }
    if (F.any) {
#if ESPER_CPU_AVX512
      avx512::fast_mask_rows(F, B, rows);
      avx512::fast_stage(P, F, B, *b.cols, false);
#endif
    }
    for (int h = 0; h < H; ++h) {
      if (F.fast[h]) {
#if ESPER_CPU_AVX512
        avx512::fast_backward_any(P, F, h, B, rows, *b.cols);
#endif
        continue;
      }
      for (int q = 0; q < nb; ++q) {
        gL[q] = gE[q] = 0.f;
        if (sb[q].present) {
          hi[q] = load_head(P, h, i0 + q, true);
          head_grads(P, st, gs, h, i0 + q, sb[q], hi[q], gL[q], gE[q]);
        }
      }
      if (b.vectorise && vectorised(P, h)) {
        small_backward(P, h, i0, nb, sb, hi, gL, gE, *b.small);
        continue;
      }
      for (int q = 0; q < nb; ++q) {
        const int64_t i = i0 + q;
        if (!sb[q].present) {
          store_row(P, h, i, nullptr);
          continue;
        }
        if (F.wide[h]) {
#if ESPER_CPU_AVX512
          avx512::wide_backward_any(P, h, i, hi[q], gL[q], gE[q], b.z.data(), b.g.data(), b.u.data());
#endif
          continue;
        }
        stage_row(P, h, i, b.z.data(), b.u.data());
        BufRow row{b.z.data(), b.u.data(), b.g.data(), P.sizes[h]};
        row_backward(row, row_in(P, h, hi[q]), gL[q], gE[q]);
        store_row(P, h, i, b.g.data());
      }
    }
#if ESPER_CPU_AVX512
    if (F.any) avx512::fast_flush(P, F, B, *b.cols, false);
#endif
    if (P.has_values && gv)
      for (int q = 0; q < nb; ++q) gv[i0 + q] = value_grad(P, st, gs, i0 + q);
  }
}

// ---- advantage normalisation (normalize_adv): a pre-pass over the advantages and weights ------------------------
// Per advantage column (one, or H for per-head advantages [N, H]) over the present steps (finite w > 0): each
// chunk's weight, mean (exact for equal values, moment_mean) and M2 about that mean, merged in chunk order by
// chan_merge, so the result is bitwise the same for any thread count; then (mean, denominator) per column into
// norm: std = sqrt(M2 / W), times sqrt(n / (n - 1)) with adv_std_unbiased (0 when n <= 1, n present steps), and
// the denominator max(std, adv_eps), or std + adv_eps with adv_eps_add (docs/semantics.md section 2.9).
struct AdvPart {
  double w, mean, m2, n;
};

void adv_chunk(const PPOParams& P, int cols, int64_t r0, int64_t r1, AdvPart* out) {
  for (int c = 0; c < cols; ++c) {
    double W = 0.0, S = 0.0, n = 0.0, lo = INFINITY, hi = -INFINITY;
    for (int64_t i = r0; i < r1; ++i) {
      const float w = P.weights.ptr ? load_f(P.weights, i) : 1.f;
      if (!(is_finite(w) && w > 0.f)) continue;
      const float a = load_f(P.adv[c], i);
      W += (double)w;
      S += (double)w * (double)a;
      n += 1.0;
      lo = dmin_nn(lo, a == a ? (double)a : lo);
      hi = dmax_nn(hi, a == a ? (double)a : hi);
    }
    const double mean = moment_mean(W, S, lo, hi);
    double m2 = 0.0;
    if (!finite_d(mean)) {
      m2 = nonfinite_m2(mean);
    } else {
      for (int64_t i = r0; i < r1; ++i) {
        const float w = P.weights.ptr ? load_f(P.weights, i) : 1.f;
        if (!(is_finite(w) && w > 0.f)) continue;
        const double d = (double)load_f(P.adv[c], i) - mean;
        m2 += (double)w * d * d;
      }
    }
    out[c] = AdvPart{W, mean, m2, n};
  }
}

void adv_prepass(const PPOParams& P, int nthreads, float* norm) {
  const int cols = P.adv_per_head ? P.num_heads : 1;
  const int64_t nchunks = (P.n + CHUNK - 1) / CHUNK;
  std::vector<AdvPart> parts((size_t)std::max<int64_t>(nchunks, 1) * cols);
  parallel_chunks(nchunks, nthreads, [&](int64_t c, int) {
    adv_chunk(P, cols, c * CHUNK, std::min(P.n, (c + 1) * CHUNK), parts.data() + c * cols);
  });
  for (int c = 0; c < cols; ++c) {
    double W = 0.0, mean = 0.0, m2 = 0.0, n = 0.0;
    for (int64_t k = 0; k < nchunks; ++k) {
      const AdvPart& p = parts[k * cols + c];
      chan_merge(W, mean, m2, p.w, p.mean, p.m2);
      n += p.n;
    }
    double var = W > 0.0 ? m2 / W : 0.0;
    if (P.adv_std_unbiased) var = n > 1.0 ? var * (n / (n - 1.0)) : 0.0;
    const double sd = sqrt(var);
    const double eps = (double)P.adv_eps;
    norm[2 * c] = (float)mean;
    norm[2 * c + 1] = (float)(P.adv_eps_add ? sd + eps : (sd < eps ? eps : sd));  // (NaN stays NaN)
  }
}

// threads worth starting: one per MIN_WORK logits (a thread start costs tens of microseconds)
constexpr int64_t MIN_WORK = 1 << 16;
int64_t useful_threads(const PPOParams& P, int nthreads, int64_t nchunks) {
  int64_t S = 0;
  for (int h = 0; h < P.num_heads; ++h) S += P.sizes[h];
  const int64_t by_work = std::max<int64_t>(1, (P.n * S) / MIN_WORK);
  return std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(nthreads, nchunks), by_work));
}

}  // namespace

void LaneAcc::init() {
  for (int q = 0; q < NH_SUM; ++q)
    for (int r = 0; r < RB; ++r) sum[q][r] = 0.0;
  for (int r = 0; r < RB; ++r) {
    for (int q = 0; q < NH_MIN; ++q) mn[q][r] = INFINITY;
    for (int q = 0; q < NH_MAX; ++q) mx[q][r] = -INFINITY;
  }
  for (int q = 0; q < NH_CNT; ++q) cnt[q] = 0;
}

// into hacc (initialised by kind): lanes in order
void LaneAcc::fold(double* hacc) const {
  for (int k = 0; k < ESPER_HEAD_SIZE; ++k) {
    const int q = head_slot(k);
    switch (kHeadKind[k]) {
      case ESPER_KIND_SUM: {
        double s = 0.0;
        for (int r = 0; r < RB; ++r) s += sum[q][r];
        hacc[k] += s;
        break;
      }
      case ESPER_KIND_MIN:
        for (int r = 0; r < RB; ++r) hacc[k] = dmin_nn(hacc[k], (double)mn[q][r]);
        break;
      case ESPER_KIND_MAX:
        for (int r = 0; r < RB; ++r) hacc[k] = dmax_nn(hacc[k], (double)mx[q][r]);
        break;
      default:  // ESPER_KIND_COUNT (ppo_head_terms.h rules out per-head moments)
        hacc[k] += (double)cnt[q];
    }
  }
}

void GlobalAcc::init() {
  for (int q = 0; q < GSUMS + GDSUMS; ++q)
    for (int r = 0; r < RB; ++r) sum[q][r] = 0.0;
  for (int q = 0; q < GMINS; ++q)
    for (int r = 0; r < RB; ++r) {
      mn[q][r] = INFINITY;
      mx[q][r] = -INFINITY;
    }
  for (int q = 0; q < GCNTS; ++q) cnt[q] = 0;
}

void GlobalAcc::fold(double* gacc) const {
  for (int q = 0; q < GSUMS + GDSUMS; ++q) {
    double s = 0.0;
    for (int r = 0; r < RB; ++r) s += sum[q][r];
    gacc[q < GSUMS ? GSUM_K[q] : GDSUM_K[q - GSUMS]] += s;
  }
  for (int q = 0; q < GMINS; ++q)
    for (int r = 0; r < RB; ++r) {
      gacc[GMIN_K[q]] = dmin_nn(gacc[GMIN_K[q]], (double)mn[q][r]);
      gacc[GMAX_K[q]] = dmax_nn(gacc[GMAX_K[q]], (double)mx[q][r]);
    }
  for (int q = 0; q < GCNTS; ++q) gacc[GCNT_K[q]] += (double)cnt[q];
}

void FastPlan::stream(uintptr_t p, int64_t stride, int64_t len, bool write) {
  if (!p || stride <= 0 || len <= 0) return;
  for (int k = 0; k < nspans; ++k) {
    Span& sp = spans[k];
    const int64_t d = (int64_t)(p - sp.base);
    if (sp.stride == stride && sp.write == write && d > -stride && d < stride) {
      sp.lo = std::min(sp.lo, d);
      sp.hi = std::max(sp.hi, d + len);
      return;
    }
  }
  if (nspans < MAX_SPANS) spans[nspans++] = Span{p, stride, 0, len, write};
}

void FastPlan::vec_stream(const Vec& v) {
  static const int es[] = {4, 2, 2, 8, 1, 4, 8};
  if (v.ptr && v.dtype >= 0 && v.dtype <= 6) stream(v.ptr, v.stride * es[v.dtype], es[v.dtype]);
}

}  // namespace cpu

using namespace cpu;  // (this file's own namespace)

void cpu_forward(const PPOParams& P_in, int nthreads, bool vectorise) {
  const int H = P_in.num_heads;
  const int K = stats_size(H);
  const int64_t N = P_in.n;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  std::vector<double> parts((size_t)std::max<int64_t>(nchunks, 1) * K);
  const int64_t T = useful_threads(P_in, nthreads, nchunks);
  PPOParams P = P_in;
  float norm[2 * ESPER_MAX_HEADS];  // the pre-pass's (mean, denominator) per advantage column
  if (P.normalize_adv) {
    adv_prepass(P, (int)T, norm);
    if (P.adv_norm)  // (also to the caller's scratch, when given)
      std::memcpy(reinterpret_cast<void*>(P.adv_norm), norm, sizeof(float) * 2 * (P.adv_per_head ? H : 1));
    P.adv_norm = reinterpret_cast<uintptr_t>(norm);
  }
  std::vector<Bufs> bufs;
  bufs.reserve(T);
  for (int64_t t = 0; t < T; ++t) bufs.emplace_back(P.max_size, H, vectorise);
  const FastPlan F = fast_plan(P, vectorise, nullptr, nullptr);
  parallel_chunks(nchunks, (int)T, [&](int64_t c, int t) {
    forward_chunk(P, F, c * CHUNK, std::min(N, (c + 1) * CHUNK), bufs[t], parts.data() + c * K);
  });

  // merge the chunks in order
  std::vector<double> acc(K);
  for (int k = 0; k < K; ++k) acc[k] = kind_init(stat_kind(k));
  double mw[3] = {0, 0, 0}, mm[3] = {0, 0, 0}, mq[3] = {0, 0, 0};
  for (int64_t c = 0; c < nchunks; ++c) {
    const double* p = parts.data() + c * K;
    for (int k = 0; k < K; ++k) acc[k] = kind_combine(stat_kind(k), acc[k], p[k]);
    for (int m = 0; m < 3; ++m) {
      int wi, mi, qi, lo, hi;
      moment_slots(m, wi, mi, qi, lo, hi);
      chan_merge(mw[m], mm[m], mq[m], p[wi], p[mi], p[qi]);
    }
  }
  for (int m = 0; m < 3; ++m) {
    int wi, mi, qi, lo, hi;
    moment_slots(m, wi, mi, qi, lo, hi);
    acc[mi] = mm[m];
    acc[qi] = mq[m];
  }
  float* st = reinterpret_cast<float*>(P.stats);
  for (int k = 0; k < K; ++k) st[k] = (float)acc[k];
  losses_from_stats(P, st, reinterpret_cast<float*>(P.losses));
}

void cpu_backward(const PPOParams& P_in, int nthreads, bool vectorise) {
  PPOParams P = P_in;
  P.normalize_adv = 0;  // (the backward reads no advantage: the forward saved its coefficients)
  const int H = P.num_heads;
  const int64_t N = P.n;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  const float* st = reinterpret_cast<const float*>(P.stats);
  const GradScal gs = grad_scalars(P);
  const int64_t T = useful_threads(P, nthreads, nchunks);
  std::vector<Bufs> bufs;
  bufs.reserve(T);
  for (int64_t t = 0; t < T; ++t) bufs.emplace_back(P.max_size, H, vectorise);
  const FastPlan F = fast_plan(P, vectorise, st, &gs);
  parallel_chunks(nchunks, (int)T, [&](int64_t c, int t) {
    backward_rows(P, F, st, gs, c * CHUNK, std::min(N, (c + 1) * CHUNK), bufs[t]);
  });
}

}  // namespace esper

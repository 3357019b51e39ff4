// esper_kernels: the fused PPO loss on the CPU (forward with statistics, backward recomputing the softmax).
//
// Rows are cut into fixed chunks of CHUNK rows (independent of the thread count); each chunk's statistics
// are reduced in row order into a partial (double), and the partials are merged in chunk order, so every
// output is bitwise the same whatever the number of threads. Threads (std::thread, count from Python, one
// per 64 K logits at most) take contiguous runs of chunks; no OpenMP (it would clash with torch's libgomp).
//
// Within a chunk, rows go in blocks of RB = 16, one row per SIMD lane. On CPUs with AVX-512 (checked at run
// time), heads of at most 32 actions run the AVX-512 path (fast_forward / fast_backward / fast_global below):
// one exp per logit in the forward and one in the backward (the forward saves each row's lse), float32 exp/log
// with FMA, statistics accumulated per lane and reduced in a fixed order; with a floor, row_softmax's floor
// and row_backward's floored branch lane-wise (floor_lanes / floor_backward: two exp and a log per logit).
// Without AVX-512, heads without a floor run the auto-vectorised block path (block_lse / block_entropy /
// block_grad, target_clones), bitwise the row path's results. Wider heads without a floor run the AVX-512
// wide path (wide_forward / wide_backward: one row at a time, 16 columns per vector, the same exp/log, the lse
// saved as for small heads).
// Floored wide heads (and floored small heads without AVX-512, and every head with vectorise = false) run the
// row-by-row path over a row buffer (BufRow), which is exactly the code a CUDA thread runs for a small head.
#include "ppo_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "ppo_core.h"

namespace esper {
namespace {

constexpr int64_t CHUNK = 128;  // rows per chunk (fixed: the reduction order depends on it, not on threads)
constexpr int RB = 16;          // rows per vectorised block (CHUNK is a multiple)
constexpr int SMALL = 32;       // heads of at most SMALL actions run row-vectorised
static_assert(CHUNK % RB == 0, "CHUNK must be a multiple of RB");

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(ESPER_NO_CLONES)
#define ESPER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESPER_CLONES
#endif

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
struct SmallBuf;
struct FastCols;
struct LaneAcc;
struct GlobalAcc;
struct Bufs {
  std::vector<float> z, g;
  std::vector<uint8_t> u;
  std::unique_ptr<SmallBuf> small;
  std::unique_ptr<FastCols> cols;
  std::vector<LaneAcc> acc;  // per head
  std::unique_ptr<GlobalAcc> gacc;
  bool vectorise;
  Bufs(int A, int H, bool vec);
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

inline void store_row(const PPOParams& P, int h, int64_t i, const float* g) {
  const int A = P.sizes[h];
  const int64_t off = i * P.grads_rs[h];
  switch (P.logits_dtype) {
    case DT_F32: {
      float* d = reinterpret_cast<float*>(P.grads[h]) + off;
      if (g) std::memcpy(d, g, sizeof(float) * A);
      else std::fill(d, d + A, 0.f);
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
  float zr[SMALL];  // one gradient row, back in row order
};

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

template <class T, class Cvt>
inline void stage_block_t(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, SmallBuf& B, Cvt cvt) {
  const int A = P.sizes[h];
  const float fill = P.mask_fill;
  const T* base = reinterpret_cast<const T*>(P.logits[h]);
  const uint8_t* mbase = P.has_mask ? reinterpret_cast<const uint8_t*>(P.masks[h]) : nullptr;
  for (int r = 0; r < RB; ++r) {
    if (r < nb && s[r].present) {
      const T* src = base + (b0 + r) * P.logits_rs[h];
      if (mbase) {
        const uint8_t* m = mbase + (b0 + r) * P.masks_rs[h];
        for (int j = 0; j < A; ++j) {  // branch-free: masks are random
          const float x = cvt(src[j]);
          const float v = (float)(m[j] != 0);
          B.u[j][r] = v;
          B.z[j][r] = v != 0.f ? x : fill;
        }
      } else {
        for (int j = 0; j < A; ++j) {
          B.u[j][r] = 1.f;
          B.z[j][r] = cvt(src[j]);
        }
      }
    } else {
      for (int j = 0; j < A; ++j) {
        B.z[j][r] = fill;
        B.u[j][r] = 0.f;
      }
    }
  }
}

// stage rows [b0, b0 + nb) of head h transposed; absent (or missing) rows hold no valid action
inline void stage_block(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, SmallBuf& B) {
  switch (P.logits_dtype) {
    case DT_F32:
      stage_block_t<float>(P, h, b0, nb, s, B, [](float x) { return x; });
      break;
    case DT_F16:
      stage_block_t<uint16_t>(P, h, b0, nb, s, B, [](uint16_t x) { return half_to_float(x); });
      break;
    default:
      stage_block_t<uint16_t>(P, h, b0, nb, s, B, [](uint16_t x) { return bf16_to_float(x); });
      break;
  }
}

// the lse of each row (row_softmax without a floor); n = valid count
ESPER_CLONES void block_lse(int A, const SmallBuf& B, float* __restrict lse, float* __restrict n_out) {
  float m[RB], n[RB], sh[RB];
  double sd[RB];
  for (int r = 0; r < RB; ++r) {
    m[r] = -INFINITY;
    n[r] = 0.f;
    sd[r] = 0.0;
  }
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) {
      const float z = B.z[j][r];
      m[r] = z > m[r] ? z : m[r];
      n[r] += B.u[j][r];
    }
  for (int r = 0; r < RB; ++r) sh[r] = lse_shift(m[r]);
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) sd[r] += (double)host_expf(B.z[j][r] - sh[r]);
  for (int r = 0; r < RB; ++r) {
    lse[r] = sh[r] + ek_log((float)sd[r]);
    n_out[r] = n[r];
  }
}

ESPER_CLONES void block_entropy(int A, const SmallBuf& B, const float* lse, double* hx) {
  for (int r = 0; r < RB; ++r) hx[r] = 0.0;
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) {
      const float lp = B.z[j][r] - lse[r];
      const float p = host_expf(lp);
      hx[r] += B.u[j][r] != 0.f ? (double)(p * lp) : 0.0;
    }
}

// d/d logp (kept in B.g, p in B.p) and its row sums, then the gradient d/d z into B.g
ESPER_CLONES void block_grad(int A, SmallBuf& B, const float* lse, const int32_t* a, const float* gL,
                             const float* ng) {
  double sd[RB];
  float sig[RB];
  for (int r = 0; r < RB; ++r) sd[r] = 0.0;
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) {
      const float lp = B.z[j][r] - lse[r];
      const float p = host_expf(lp);
      float g = (j == a[r]) ? gL[r] : 0.f;
      g = g + (B.u[j][r] != 0.f ? ng[r] * p + (ng[r] * lp) * p : 0.f);
      B.p[j][r] = p;
      B.g[j][r] = g;
      sd[r] += (double)g;
    }
  for (int r = 0; r < RB; ++r) sig[r] = (float)sd[r];
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) B.g[j][r] = B.u[j][r] != 0.f ? B.g[j][r] - B.p[j][r] * sig[r] : 0.f;
}

void small_forward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi, RowFwd* out,
                   SmallBuf& B) {
  const int A = P.sizes[h];
  stage_block(P, h, b0, nb, s, B);
  float lse[RB], n[RB];
  double hx[RB];
  block_lse(A, B, lse, n);
  block_entropy(A, B, lse, hx);
  for (int r = 0; r < nb; ++r) {
    if (!s[r].present) {
      out[r] = RowFwd{0.f, 0.f, 0.f, false};
      continue;
    }
    float ent = -(float)hx[r];
    if (P.normalize_entropy) ent = n[r] > 1.f ? ent / ek_log(n[r] < 2.f ? 2.f : n[r]) : 0.f;
    const int ja = hi[r].in_range ? (int)hi[r].a : 0;
    out[r].ent = ent;
    out[r].n = n[r];
    out[r].ell = hi[r].in_range ? B.z[ja][r] - lse[r] : f_nan();
    out[r].taken = hi[r].in_range && B.u[ja][r] != 0.f;
  }
}

// gradients of rows [b0, b0 + nb) of head h (present rows: gL, gE given) into the grads tensor
void small_backward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi,
                    const float* gL, const float* gE, SmallBuf& B) {
  const int A = P.sizes[h];
  stage_block(P, h, b0, nb, s, B);
  float lse[RB], n[RB], ng[RB], gl[RB];
  int32_t a[RB];
  block_lse(A, B, lse, n);
  for (int r = 0; r < RB; ++r) {
    const bool ok = r < nb && s[r].present;
    float ghr = ok ? gE[r] : 0.f;
    if (P.normalize_entropy) ghr = n[r] > 1.f ? ghr / ek_log(n[r] < 2.f ? 2.f : n[r]) : 0.f;
    ng[r] = -ghr;
    gl[r] = ok ? gL[r] : 0.f;
    a[r] = (ok && hi[r].in_range) ? (int32_t)hi[r].a : -1;
  }
  block_grad(A, B, lse, a, gl, ng);
  for (int r = 0; r < nb; ++r) {
    if (!s[r].present) {
      store_row(P, h, b0 + r, nullptr);
      continue;
    }
    for (int j = 0; j < A; ++j) B.zr[j] = B.g[j][r];
    store_row(P, h, b0 + r, B.zr);
  }
}


// ---- small heads on AVX-512: RB rows in the 16 lanes of a zmm register, one exp per logit ------------------
// When the fast heads' logits (gradients) lie in one span of at most SPAN columns with one row stride (packed
// [N, S] tensors), a block is read (written) as RB rows of the span and transposed in registers (tr16);
// otherwise its columns are gathered (scattered) straight from the logits (any row stride, per-head tensors).
// With H + 1 <= RB the per-(step, head) outputs and saved values move the same way, as rows of the block. The
// per-lane inputs ([N, H] actions, relevance, old log-probs) are gathered, the masks read as one bit mask per
// row; float32 exp/log (Cephes polynomials with FMA, within 2 ulp) and float sums over
// the row (at most SMALL terms); the per-(step, head) statistics accumulate per lane in double and are
// reduced in lane order at the end of a chunk, so results stay independent of the thread count. The forward
// saves each row's lse (after the [N, H + 1] coefficients), so the backward needs one exp per logit and no
// max/sum pass. Not bitwise equal to the row path (other exp, FMA, sum order), but as close to the reference.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(ESPER_NO_AVX512)
#define ESPER_FAST 1
#define ESPER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")))

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("popcnt");
  }();
  return ok;
}
#else
bool cpu_has_avx512() { return false; }
#endif

constexpr int64_t FAST_MAX_RS = int64_t(1) << 26;  // row strides (elements) whose 16-row offsets fit int32

// heads the AVX-512 path runs: small (with or without a floor), 16-bit logits of at least 2 columns (a column
// is read as one 32-bit word inside the row), row strides within the gather's int32 offsets
inline bool fast_head(const PPOParams& P, int h) {
  return cpu_has_avx512() && P.sizes[h] <= SMALL && (P.logits_dtype == DT_F32 || P.sizes[h] >= 2) &&
         P.logits_rs[h] <= FAST_MAX_RS && P.grads_rs[h] <= FAST_MAX_RS;
}

// heads the AVX-512 wide path runs: more than SMALL actions, no floor
inline bool wide_head(const PPOParams& P, int h) {
  return cpu_has_avx512() && P.sizes[h] > SMALL && !(P.floor[h] > 0.f);
}

// the saved lse of (row i, head h): after the [N, H + 1] coefficients (CpuBackend.saved_shape is [N, 2H + 1])
inline float* saved_lse(const PPOParams& P) { return reinterpret_cast<float*>(P.saved) + P.n * (P.num_heads + 1); }

// head statistics the lanes sum (double), take the min / max of (float) or count
constexpr int NSUMS = 8;
constexpr int SUM_K[NSUMS] = {HD_REL_WEIGHT, HD_POLICY_NUM, HD_ENTROPY_NUM, HD_KL_NUM,
                              HD_CLIP_NUM,   HD_VALID_SUM,  HD_SINGLE,      HD_LEARNABLE};
constexpr int MIN_K[2] = {HD_LOGP_MIN, HD_VALID_MIN};
constexpr int MAX_K[3] = {HD_RATIO_MAX, HD_LOGP_MAX, HD_VALID_MAX};
constexpr int CNT_K[3] = {HD_NONFINITE, HD_EMPTY_MASK, HD_INVALID_ACTION};

struct LaneAcc {  // one head's statistics over one chunk, per lane
  alignas(64) double sum[NSUMS][RB];
  alignas(64) float mn[2][RB];
  alignas(64) float mx[3][RB];
  int64_t cnt[3];
  void init() {
    for (int q = 0; q < NSUMS; ++q)
      for (int r = 0; r < RB; ++r) sum[q][r] = 0.0;
    for (int r = 0; r < RB; ++r) {
      mn[0][r] = mn[1][r] = INFINITY;
      mx[0][r] = mx[1][r] = mx[2][r] = -INFINITY;
    }
    cnt[0] = cnt[1] = cnt[2] = 0;
  }
  // into hacc (initialised by kind): lanes in order
  void fold(double* hacc) const {
    for (int q = 0; q < NSUMS; ++q) {
      double s = 0.0;
      for (int r = 0; r < RB; ++r) s += sum[q][r];
      hacc[SUM_K[q]] += s;
    }
    for (int q = 0; q < 2; ++q)
      for (int r = 0; r < RB; ++r) hacc[MIN_K[q]] = dmin_nn(hacc[MIN_K[q]], (double)mn[q][r]);
    for (int q = 0; q < 3; ++q)
      for (int r = 0; r < RB; ++r) hacc[MAX_K[q]] = dmax_nn(hacc[MAX_K[q]], (double)mx[q][r]);
    for (int q = 0; q < 3; ++q) hacc[CNT_K[q]] += (double)cnt[q];
  }
};

// the global statistics of one chunk, per lane (the same split as LaneAcc)
constexpr int GSUMS = 10, GDSUMS = 3, GCNTS = 4, GMINS = 4;
constexpr int GSUM_K[GSUMS] = {G_WEIGHT, G_POLICY_NUM, G_KL_K3,        G_KL_K1,   G_CLIP,
                               G_CLIP_POS, G_CLIP_NEG, G_VALUE_WEIGHT, G_VALUE_NUM, G_VALUE_CLIP};
constexpr int GDSUM_K[GDSUMS] = {G_RATIO_MEAN, G_RETURN_MEAN, G_RESID_MEAN};  // double products
constexpr int GCNT_K[GCNTS] = {G_STEPS, G_BAD_WEIGHTS, G_VALUE_STEPS, G_BAD_VALUE_WEIGHTS};
constexpr int GMIN_K[GMINS] = {G_RATIO_MIN, GX_RMIN, GX_TMIN, GX_EMIN};
constexpr int GMAX_K[GMINS] = {G_RATIO_MAX, GX_RMAX, GX_TMAX, GX_EMAX};

struct GlobalAcc {
  alignas(64) double sum[GSUMS + GDSUMS][RB];
  alignas(64) float mn[GMINS][RB];
  alignas(64) float mx[GMINS][RB];
  int64_t cnt[GCNTS];
  void init() {
    for (int q = 0; q < GSUMS + GDSUMS; ++q)
      for (int r = 0; r < RB; ++r) sum[q][r] = 0.0;
    for (int q = 0; q < GMINS; ++q)
      for (int r = 0; r < RB; ++r) {
        mn[q][r] = INFINITY;
        mx[q][r] = -INFINITY;
      }
    for (int q = 0; q < GCNTS; ++q) cnt[q] = 0;
  }
  void fold(double* gacc) const {
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

constexpr int SPAN = 64;  // columns of a packed block (FastPlan::Span2D)

struct FastCols {  // one head's block, column-major: element j of lane r at [j][r]
  alignas(64) float z[SMALL][RB];
  alignas(64) float e[SMALL][RB];
  alignas(64) float g[SMALL][RB];
  // the block's logits (forward, backward) or gradients (backward) of every fast head, column-major, when
  // packed (FastPlan::zp / gp); column c of the span at [c]
  alignas(64) float zs[SPAN][RB];
  alignas(64) float gs[SPAN][RB];
  // per-(row, head) values in columns (FastPlan::otr): forward log_probs, entropy, lse and the saved row
  // (H + 1 columns); backward: saved lse and coefficients
  alignas(64) float oc[4][RB][RB];
  uint16_t v[SMALL];
};

// per-call constants of the AVX-512 path (shared by the threads)
struct FastPlan {
  bool fast[ESPER_MAX_HEADS];     // heads this call runs on the AVX-512 path
  bool fast_ok[ESPER_MAX_HEADS];  // heads it would run there (the forward saves their lse in any case)
  bool wide[ESPER_MAX_HEADS];     // wide heads this call runs on the AVX-512 wide path (wide_forward / wide_backward)
  bool wide_ok[ESPER_MAX_HEADS];  // wide heads it would run there (the forward saves their lse in any case)
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
    uintptr_t lo = 0;  // the span's first column in row 0
    int64_t rs = 0;    // row stride (elements)
    int w = 0;         // columns
    uint64_t cols = 0;  // the fast heads' columns
    int off[ESPER_MAX_HEADS] = {};
  };
  Span2D zp, gp;
  // H + 1 <= RB: the [N, H] outputs (log_probs, entropy, lse) and the saved [N, H + 1] rows go through columns
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
  void stream(uintptr_t p, int64_t stride, int64_t len, bool write = false) {
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
  void vec_stream(const Vec& v) {
    static const int es[] = {4, 2, 2, 8, 1, 4, 8};
    if (v.ptr && v.dtype >= 0 && v.dtype <= 6) stream(v.ptr, v.stride * es[v.dtype], es[v.dtype]);
  }
};

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
        if (sp.write) __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 3);
        else __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const uintptr_t a0 = (sp.base + i * sp.stride + sp.lo) & ~(uintptr_t)63;
        const uintptr_t a1 = sp.base + i * sp.stride + sp.hi;
        for (uintptr_t a = a0; a < a1; a += 64) {
          if (sp.write) __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 3);
          else __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
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
  const int H = P.num_heads;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int h = 0; h < H; ++h) {
    F.fast_ok[h] = fast_head(P, h);
    F.fast[h] = vectorise && F.fast_ok[h];
    F.wide_ok[h] = wide_head(P, h);
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
    F.smask = P.per_head ? (F.hmask | (1u << H)) : ((2u << H) - 1u);
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
    case DT_I64: return a_lanes_t(reinterpret_cast<const int64_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
    case DT_I32: return a_lanes_t(reinterpret_cast<const int32_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
    default: return a_lanes_t(reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride, v.stride, m, A, act);
  }
}
// lanes of m whose byte is nonzero
inline uint32_t b_lanes(const Vec& v, int64_t b0, uint32_t m) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride;
  uint32_t out = 0;
  for (int r = 0; r < RB; ++r) out |= (uint32_t)(((m >> r) & 1u) && p[r * v.stride] != 0) << r;
  return out;
}

#ifdef ESPER_FAST
// exp(x) in float32: Cephes expf (k = round(x / ln2), r = x - k ln2 in two parts, degree-7 polynomial), 2^k by
// scalef (overflow to inf); NaN passes through. Results below FLT_MIN (x < -87) are 0, never subnormal: a
// subnormal result costs a microcode assist (~100 cycles) on Intel cores, and masked logits (mask_fill) hit
// this range on every call; the difference is below 1.2e-38 absolute
ESPER_AVX512 inline __m512 exp16(__m512 x) {
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
ESPER_AVX512 inline __m512 log16(__m512 s) {
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

ESPER_AVX512 inline __m512i iota16i() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// transpose a 16 x 16 block in registers: r[k] = row k in, column k out
ESPER_AVX512 inline void tr16(__m512* r) {
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

// RB rows of ncols <= 16 floats (row q at base + q * rs elements, rows q < nb; columns cm) into columns
// col[k][q] (0 for rows >= nb and columns outside cm)
ESPER_AVX512 inline void load_cols(const float* base, int64_t rs, int nb, __mmask16 cm, float (*col)[RB]) {
  __m512 r[16];
  for (int q = 0; q < RB; ++q) r[q] = q < nb ? _mm512_maskz_loadu_ps(cm, base + q * rs) : _mm512_setzero_ps();
  tr16(r);
  for (int k = 0; k < 16; ++k) _mm512_store_ps(col[k], r[k]);
}
// columns col[k] (k in cm) into rows q < nb at base + q * rs
ESPER_AVX512 inline void store_cols(float* base, int64_t rs, int nb, __mmask16 cm, const float (*col)[RB]) {
  __m512 r[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(col[k]);
  tr16(r);
  for (int q = 0; q < nb; ++q) _mm512_mask_storeu_ps(base + q * rs, cm, r[q]);
}

// the block's logits of every fast head (packed: FastPlan::zp) into C.zs, column-major; rows >= nb read 0
template <int DT>
ESPER_AVX512 void stage_z(const FastPlan& F, const BlockIn& B, FastCols& C) {
  const FastPlan::Span2D& Z = F.zp;
  const int es = DT == DT_F32 ? 4 : 2;
  const char* base = reinterpret_cast<const char*>(Z.lo) + B.b0 * Z.rs * es;
  for (int t = 0; t * 16 < Z.w; ++t) {
    const __mmask16 cm = (__mmask16)(Z.cols >> (16 * t));
    __m512 r[16];
    for (int q = 0; q < RB; ++q) {
      const char* row = base + (q * Z.rs + 16 * t) * es;
      if (q >= B.nb) r[q] = _mm512_setzero_ps();
      else if (DT == DT_F32) r[q] = _mm512_maskz_loadu_ps(cm, row);
      else if (DT == DT_F16) r[q] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(cm, row));
      else r[q] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cm, row)), 16));
    }
    tr16(r);
    for (int k = 0; k < 16; ++k) _mm512_store_ps(C.zs[16 * t + k], r[k]);
  }
}

// float -> fp16 / bf16 bits (round to nearest even, as float_to_half / float_to_bf16), in the low 16 bits
template <int DT>
ESPER_AVX512 inline __m512i to16(__m512 x);

// the block's gradients of every fast head (C.gs, column-major; packed: FastPlan::gp) into rows < nb
template <int DT>
ESPER_AVX512 void flush_g(const FastPlan& F, const BlockIn& B, const FastCols& C) {
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
      if (DT == DT_F32) _mm512_mask_storeu_ps(row, cm, r[q]);
      else _mm256_mask_storeu_epi16(row, cm, _mm512_cvtepi32_epi16(to16<DT>(r[q])));
    }
  }
}

// vector forms of a_lanes / b_lanes / f_lanes (gathers of the lanes in m), falling back to them where the
// dtype or stride does not suit
ESPER_AVX512 inline uint32_t a_lanes16(const Vec& v, int64_t b0, uint32_t m, int A, int32_t* act) {
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
ESPER_AVX512 inline uint32_t b_lanes16(const Vec& v, int64_t b0, uint32_t m, int64_t n) {
  if (v.stride <= 0 || v.stride > FAST_MAX_RS || (n - RB - b0) * v.stride < 3) return b_lanes(v, b0, m);
  const __m512i idx = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32((int32_t)v.stride));
  const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), (__mmask16)m, idx,
                                                reinterpret_cast<const uint8_t*>(v.ptr) + b0 * v.stride, 1);
  return (uint32_t)(m & _mm512_test_epi32_mask(w, _mm512_set1_epi32(0xff)));
}
ESPER_AVX512 inline __m512 f_lanes16(const Vec& v, int64_t b0, uint32_t m, float dflt) {
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

// column j of the block (lanes at int32 element offsets idx from base), as float
template <int DT>
ESPER_AVX512 inline __m512 gather_col(const void* base, __m512i idx, int j) {
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

template <int DT>
ESPER_AVX512 inline __m512i to16(__m512 x) {
  if (DT == DT_F16) return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i xi = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(xi, 16), _mm512_set1_epi32(1));
  const __m512i rn = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i qn = _mm512_or_si512(_mm512_srli_epi32(xi, 16), _mm512_set1_epi32(0x40));
  return _mm512_mask_mov_epi32(rn, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qn);
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
ESPER_AVX512 void mask_rows(const FastPlan& F, const BlockIn& B, uint64_t* rows) {
  for (int r = 0; r < RB; ++r) {
    uint64_t bits = 0;
    if ((B.pres >> r) & 1u) {
      const __m512i v = _mm512_maskz_loadu_epi8(F.mbits, F.mbase + (B.b0 + r) * F.mrs);
      bits = _mm512_test_epi8_mask(v, v);
    }
    rows[r] = bits;
  }
}

ESPER_AVX512 void head_lanes(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows,
                             bool fwd, HeadLanes& L) {
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
  if (P.per_head && P.adv_per_head) _mm512_store_ps(L.adv, f_lanes16(P.adv[h], B.b0, pres, 0.f));
  else std::memcpy(L.adv, B.adv0, sizeof(L.adv));
}

// esper's floor over a block, lane-wise (row_softmax's floor part): from the masked logits C.z (valid columns
// C.v), their max m and valid count n: p1 = softmax(zhat) into C.e, the floor f = floor_f(n, floor), the
// renormalisation s_f = max(1 - |U| f, 1e-8) / max(P_O, 1e-8) and P_O = sum_O p1 (U: valid and p1 < f; O: the
// other valid columns, NaN p1 included, as the row path). Sums in float, in column order
struct FloorLanes {
  __m512 f, s_f, po;
};
ESPER_AVX512 inline __m512 clamp_min16(__m512 x, float lo) {  // clamp_min: x < lo ? lo : x (NaN stays NaN)
  return _mm512_max_ps(_mm512_set1_ps(lo), x);
}
ESPER_AVX512 FloorLanes floor_lanes(int A, FastCols& C, __m512 m, __m512 n, float floor) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __mmask16 minf = _mm512_cmp_ps_mask(_mm512_abs_ps(m), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
  const __m512 m1 = _mm512_mask_mov_ps(m, minf, _mm512_setzero_ps());  // lse_shift
  __m512 s1 = _mm512_setzero_ps();
  for (int j = 0; j < A; ++j) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(C.z[j]), m1));
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
ESPER_AVX512 inline __m512 floor_q(const FloorLanes& fl, __m512 p1, __mmask16 under) {
  return _mm512_mask_blend_ps(under, _mm512_mul_ps(p1, fl.s_f), fl.f);
}

// the forward of head h over one block: outputs, saved lse / coefficients, lane statistics, Lsum and flags
template <int DT>
ESPER_AVX512 void fast_forward(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows,
                               FastCols& C, LaneAcc& acc, float* Lsum, uint32_t* flags) {
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
  const float(*zs)[RB] = C.zs + F.zp.off[h];
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
  const __mmask16 minf = _mm512_cmp_ps_mask(_mm512_abs_ps(m), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
  const __m512 sh = _mm512_mask_mov_ps(m, minf, _mm512_setzero_ps());  // lse_shift
  // one pass: s = sum e_j, and over the valid columns t2 = sum e_j, t1 = sum e_j d_j (e_j = exp(d_j),
  // d_j = z_j - sh <= 0); then -sum_V p_j logp_j = (log(s) t2 - t1) / s, two terms >= 0 (no cancellation)
  __m512 s = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps();
  for (int j = 0; j < A; ++j) {
    const __m512 d = _mm512_sub_ps(_mm512_load_ps(C.z[j]), sh);
    const __m512 e = exp16(d);
    s = _mm512_add_ps(s, e);
    t2 = _mm512_mask_add_ps(t2, C.v[j], t2, e);
    t1 = _mm512_mask3_fmadd_ps(e, d, t1, C.v[j]);
  }
  const __m512 ls = log16(s);
  const __m512 lse = _mm512_add_ps(sh, ls);
  __m512 ent = _mm512_div_ps(_mm512_fmsub_ps(ls, t2, t1), s);
  if (P.normalize_entropy) {
    const __m512 ln = _mm512_i32gather_ps(_mm512_cvttps_epi32(n), log_tab().v, 4);
    ent = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(n, one, _CMP_GT_OQ), ent, ln);
  }
  ent = _mm512_maskz_mov_ps(pres, ent);
  __m512 ell = _mm512_mask_mov_ps(_mm512_set1_ps(NAN), (__mmask16)L.inr, _mm512_sub_ps(za, lse));
  ell = _mm512_maskz_mov_ps(pres, ell);  // absent steps: 0 (as the row path)
  if (F.otr) {  // written as rows by flush_out
    _mm512_store_ps(C.oc[0][h], ell);
    _mm512_store_ps(C.oc[1][h], ent);
    _mm512_store_ps(C.oc[2][h], lse);
  } else {
    const __m512i idxH = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H));
    const int64_t o = B.b0 * H + h;
    _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(P.log_probs) + o, live, idxH, ell, 4);
    _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(P.entropy) + o, live, idxH, ent, 4);
    _mm512_mask_i32scatter_ps(saved_lse(P) + o, live, idxH, lse, 4);
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
    const __m512 u = _mm512_maskz_mul_ps(ug, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(w, adv)), ratio);
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
  const __mmask16 okell = rel & _mm512_cmp_ps_mask(ell, ell, _CMP_ORD_Q);
  const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(ell), pinf, _CMP_LT_OQ);
  const __mmask16 clip = rel & (_mm512_cmp_ps_mask(ratio, hic, _CMP_GT_OQ) | _mm512_cmp_ps_mask(ratio, lo, _CMP_LT_OQ));
  const __m512 sums[NSUMS] = {
      wr,
      pol,
      _mm512_maskz_mul_ps(rel, wr, ent),
      _mm512_maskz_mul_ps(rel, wr, _mm512_sub_ps(_mm512_sub_ps(ratio, one), lr)),
      _mm512_maskz_mov_ps(clip, wr),
      _mm512_maskz_mul_ps(pres, w, n),
      _mm512_maskz_mov_ps(pres & _mm512_cmp_ps_mask(n, one, _CMP_EQ_OQ), w),
      _mm512_maskz_mov_ps(rel & _mm512_cmp_ps_mask(n, one, _CMP_GT_OQ), w),
  };
  for (int q = 0; q < NSUMS; ++q) {
    const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(sums[q]));
    const __m512d hi8 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sums[q]), 1)));
    _mm512_store_pd(acc.sum[q], _mm512_add_pd(_mm512_load_pd(acc.sum[q]), lo8));
    _mm512_store_pd(acc.sum[q] + 8, _mm512_add_pd(_mm512_load_pd(acc.sum[q] + 8), hi8));
  }
  const __m512 mins[2] = {_mm512_mask_mov_ps(pinf, okell, ell), _mm512_mask_mov_ps(pinf, pres, n)};
  const __m512 maxs[3] = {_mm512_mask_mov_ps(ninf, rel & _mm512_cmp_ps_mask(ratio, ratio, _CMP_ORD_Q), ratio),
                          _mm512_mask_mov_ps(ninf, okell, ell), _mm512_mask_mov_ps(ninf, pres, n)};
  for (int q = 0; q < 2; ++q) _mm512_store_ps(acc.mn[q], _mm512_min_ps(_mm512_load_ps(acc.mn[q]), mins[q]));
  for (int q = 0; q < 3; ++q) _mm512_store_ps(acc.mx[q], _mm512_max_ps(_mm512_load_ps(acc.mx[q]), maxs[q]));
  acc.cnt[0] += __builtin_popcount((unsigned)(pres & ~fin));
  acc.cnt[1] += __builtin_popcount((unsigned)(pres & _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_EQ_OQ)));
  acc.cnt[2] += __builtin_popcount((unsigned)(pres & ~taken));
}

// row_backward's floored branch, lane-wise: the gradient d/d z of each column into C.g (0 on masked columns),
// with C.e = 0, so that the caller's g - p sigma (sigma = 0) leaves it as it is. zs: the packed columns (else
// gathered from base at idx); lse: the saved lse of the floored logits; gl, ng: as fast_backward
template <int DT>
ESPER_AVX512 inline void floor_backward(const PPOParams& P, int h, int A, FastCols& C, __m512i MR,
                                        const float (*zs)[RB], const void* base, __m512i idx, __m512 fill,
                                        __m512 lse, __m512i av, __m512 gl, __m512 ng) {
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
    const __m512 lp = _mm512_sub_ps(z, lse);
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
ESPER_AVX512 void fast_backward(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B, const uint64_t* rows,
                                FastCols& C) {
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
  __m512 lse, u;  // saved lse and coefficient (0 in lanes >= nb)
  if (F.otr) {  // staged as columns by stage_saved
    lse = _mm512_load_ps(C.oc[2][h]);
    u = _mm512_load_ps(C.oc[3][h]);
  } else {
    const __m512i idxH = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H));
    lse = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idxH, saved_lse(P) + B.b0 * H + h, 4);
    const __m512i idxS = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H + 1));
    u = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idxS,
                                 reinterpret_cast<const float*>(P.saved) + B.b0 * (H + 1) + h, 4);
  }
  // incoming gradients of ell and of the entropy (head_grads, lane-wise; 0 for absent steps)
  __m512 l = _mm512_mul_ps(u, _mm512_set1_ps(F.pscale[h]));
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
  const bool zp = F.zp.on;
  const float(*zs)[RB] = C.zs + F.zp.off[h];
  __m512 sig = _mm512_setzero_ps();
  if (P.floor[h] > 0.f)  // the gradient into C.g, C.e = 0: the stores below leave it as it is (sig = 0)
    floor_backward<DT>(P, h, A, C, MR, zp ? zs : nullptr, base, idx, fill, lse, av, gl, ng);
  for (int j = 0; j < A && !(P.floor[h] > 0.f); ++j) {  // without a floor
    const __mmask16 vj = _mm512_test_epi32_mask(MR, _mm512_set1_epi32((int32_t)(1u << j)));
    const __m512 z = _mm512_mask_blend_ps(vj, fill, zp ? _mm512_load_ps(zs[j]) : gather_col<DT>(base, idx, j));
    const __m512 lp = _mm512_sub_ps(z, lse);
    const __m512 p = exp16(lp);
    __m512 g = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(av, _mm512_set1_epi32(j)), gl);
    g = _mm512_mask_add_ps(g, vj, g, _mm512_fmadd_ps(_mm512_mul_ps(ng, lp), p, _mm512_mul_ps(ng, p)));
    sig = _mm512_add_ps(sig, g);
    _mm512_store_ps(C.g[j], g);
    _mm512_store_ps(C.e[j], p);
    C.v[j] = vj;
  }
  if (F.gp.on) {  // written as rows by flush_g
    float(*gs)[RB] = C.gs + F.gp.off[h];
    for (int j = 0; j < A; ++j)
      _mm512_store_ps(gs[j], _mm512_maskz_mov_ps(C.v[j], _mm512_fnmadd_ps(_mm512_load_ps(C.e[j]), sig,
                                                                           _mm512_load_ps(C.g[j]))));
    return;
  }
  for (int j = 0; j < A; ++j) {
    const __m512 out = _mm512_maskz_mov_ps(
        C.v[j], _mm512_fnmadd_ps(_mm512_load_ps(C.e[j]), sig, _mm512_load_ps(C.g[j])));
    if (DT == DT_F32) _mm512_mask_i32scatter_ps(reinterpret_cast<float*>(gbase) + j, live, gidx, out, 4);
    else _mm512_store_ps(C.g[j], out);
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
ESPER_AVX512 inline void acc_sum(double* a, __m512 x) {
  const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d hi8 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  _mm512_store_pd(a, _mm512_add_pd(_mm512_load_pd(a), lo8));
  _mm512_store_pd(a + 8, _mm512_add_pd(_mm512_load_pd(a + 8), hi8));
}
// a += (double)x * (double)y where m, else nothing
ESPER_AVX512 inline void acc_dprod(double* a, __mmask16 m, __m512 x, __m512 y) {
  const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d x1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  const __m512d y0 = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
  const __m512d y1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
  _mm512_store_pd(a, _mm512_add_pd(_mm512_load_pd(a), _mm512_maskz_mul_pd((__mmask8)m, x0, y0)));
  _mm512_store_pd(a + 8, _mm512_add_pd(_mm512_load_pd(a + 8), _mm512_maskz_mul_pd((__mmask8)(m >> 8), x1, y1)));
}
ESPER_AVX512 inline __m512 clamp16(__m512 x, __m512 lo, __m512 hi) {  // clampf: NaN stays NaN
  x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), lo);
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), hi);
}
ESPER_AVX512 inline __mmask16 finite16(__m512 x) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
}

ESPER_AVX512 void fast_global(const PPOParams& P, const FastPlan& F, const BlockIn& B, const float* Lsum,
                              const uint32_t* flags, FastCols& C, GlobalAcc& acc, float* xs, float* xw) {
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
    base = _mm512_maskz_mul_ps(pres & jin & _mm512_cmp_ps_mask(s1, s2, _CMP_NGT_UQ),
                               _mm512_sub_ps(zero, _mm512_mul_ps(w, a)), r);
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
    if (P.has_vclip) {
      const __m512 dc = _mm512_set1_ps(P.value_clip), ndc = _mm512_set1_ps(-P.value_clip);
      const __m512 vo = f_lanes16(P.old_values, B.b0, vpres, 0.f);
      const __m512 dv = _mm512_sub_ps(v, vo);
      __m512 vc = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(dv, ndc, _CMP_LT_OQ), _mm512_sub_ps(vo, dc));
      vc = _mm512_mask_mov_ps(vc, _mm512_cmp_ps_mask(dv, dc, _CMP_GT_OQ), _mm512_add_ps(vo, dc));
      const __m512 d2 = _mm512_sub_ps(vc, R);
      const __m512 l2 = _mm512_mul_ps(d2, d2);
      vl = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(l1, l1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(l1, l2, _CMP_GE_OQ),
                                l2, l1);
      const __mmask16 l2gt = _mm512_cmp_ps_mask(l2, l1, _CMP_GT_OQ), l1gt = _mm512_cmp_ps_mask(l1, l2, _CMP_GT_OQ);
      vclip = _mm512_maskz_mov_ps(vpres & l2gt, vw);
      const __m512 dl2 = _mm512_maskz_mul_ps(
          _mm512_cmp_ps_mask(dv, ndc, _CMP_GE_OQ) & _mm512_cmp_ps_mask(dv, dc, _CMP_LE_OQ), two, d2);
      const __m512 half = _mm512_set1_ps(0.5f);
      dvl = _mm512_add_ps(_mm512_mul_ps(half, dl1), _mm512_mul_ps(half, dl2));
      dvl = _mm512_mask_mov_ps(dvl, l2gt, dl2);
      dvl = _mm512_mask_mov_ps(dvl, l1gt, dl1);
    } else {
      vl = l1;
      dvl = dl1;
    }
    vsaved = _mm512_maskz_mul_ps(vpres, vw, dvl);
  }
  const __m512 res = _mm512_maskz_sub_ps(vpres, R, v);
  // per-step outputs
  float* jr = reinterpret_cast<float*>(P.joint_ratio) + B.b0;
  _mm512_mask_storeu_ps(jr, live, r);
  float* saved = reinterpret_cast<float*>(P.saved) + B.b0 * (H + 1);
  const __m512i idxS = _mm512_mullo_epi32(iota16i(), _mm512_set1_epi32(H + 1));
  if (F.otr) _mm512_store_ps(C.oc[3][H], vsaved);
  else _mm512_mask_i32scatter_ps(saved + H, live, idxS, vsaved, 4);
  if (!P.per_head) {
    const __m512i fl = _mm512_load_si512(flags);
    for (int h = 0; h < H; ++h) {
      const __mmask16 fh = _mm512_test_epi32_mask(fl, _mm512_set1_epi32((int32_t)(1u << h)));
      if (F.otr) _mm512_store_ps(C.oc[3][h], _mm512_maskz_mov_ps(fh, base));
      else _mm512_mask_i32scatter_ps(saved + h, live, idxS, _mm512_maskz_mov_ps(fh, base), 4);
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

ESPER_AVX512 void fast_forward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B,
                                   const uint64_t* rows, FastCols& C, LaneAcc& acc, float* Lsum, uint32_t* flags) {
  switch (P.logits_dtype) {
    case DT_F32: fast_forward<DT_F32>(P, F, h, B, rows, C, acc, Lsum, flags); break;
    case DT_F16: fast_forward<DT_F16>(P, F, h, B, rows, C, acc, Lsum, flags); break;
    default: fast_forward<DT_BF16>(P, F, h, B, rows, C, acc, Lsum, flags); break;
  }
}
ESPER_AVX512 void fast_backward_any(const PPOParams& P, const FastPlan& F, int h, const BlockIn& B,
                                    const uint64_t* rows, FastCols& C) {
  switch (P.logits_dtype) {
    case DT_F32: fast_backward<DT_F32>(P, F, h, B, rows, C); break;
    case DT_F16: fast_backward<DT_F16>(P, F, h, B, rows, C); break;
    default: fast_backward<DT_BF16>(P, F, h, B, rows, C); break;
  }
}
// block_in without StepIn (load_step's operations, lane-wise)
ESPER_AVX512 void block_in_vec(const PPOParams& P, int64_t b0, int nb, BlockIn& B) {
  B.b0 = b0;
  B.nb = nb;
  B.live = nb >= RB ? 0xffffu : ((1u << nb) - 1u);
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 w_raw = P.weights.ptr ? f_lanes16(P.weights, b0, B.live, 1.f) : one;
  const __mmask16 pres = (__mmask16)B.live & finite16(w_raw) &
                         _mm512_cmp_ps_mask(w_raw, _mm512_setzero_ps(), _CMP_GT_OQ);
  B.pres = pres;
  _mm512_store_ps(B.w_raw, w_raw);
  _mm512_store_ps(B.w, _mm512_maskz_mov_ps(pres, w_raw));
  _mm512_store_ps(B.adv0, f_lanes16(P.adv[0], b0, pres, 0.f));
}
ESPER_AVX512 void fast_mask_rows(const FastPlan& F, const BlockIn& B, uint64_t* rows) {
  if (F.mpacked) mask_rows(F, B, rows);
}
ESPER_AVX512 void fast_global_any(const PPOParams& P, const FastPlan& F, const BlockIn& B, const float* Lsum,
                                  const uint32_t* flags, FastCols& C, GlobalAcc& acc, float* xs, float* xw) {
  fast_global(P, F, B, Lsum, flags, C, acc, xs, xw);
}
// before a block's heads: the packed logits (forward and backward) and, in the backward, the saved lse and
// coefficients as columns
ESPER_AVX512 void fast_stage(const PPOParams& P, const FastPlan& F, const BlockIn& B, FastCols& C, bool fwd) {
  if (F.zp.on) {
    switch (P.logits_dtype) {
      case DT_F32: stage_z<DT_F32>(F, B, C); break;
      case DT_F16: stage_z<DT_F16>(F, B, C); break;
      default: stage_z<DT_BF16>(F, B, C); break;
    }
  }
  if (!fwd && F.otr) {
    const int H = P.num_heads;
    load_cols(saved_lse(P) + B.b0 * H, H, B.nb, (__mmask16)((1u << H) - 1u), C.oc[2]);
    load_cols(reinterpret_cast<const float*>(P.saved) + B.b0 * (H + 1), H + 1, B.nb, (__mmask16)((2u << H) - 1u),
              C.oc[3]);
  }
}
// after a block's heads: the forward's column outputs, the backward's packed gradients
ESPER_AVX512 void fast_flush(const PPOParams& P, const FastPlan& F, const BlockIn& B, const FastCols& C, bool fwd) {
  if (fwd) {
    if (!F.otr) return;
    const int H = P.num_heads;
    const __mmask16 hm = (__mmask16)F.hmask;
    store_cols(reinterpret_cast<float*>(P.log_probs) + B.b0 * H, H, B.nb, hm, C.oc[0]);
    store_cols(reinterpret_cast<float*>(P.entropy) + B.b0 * H, H, B.nb, hm, C.oc[1]);
    store_cols(saved_lse(P) + B.b0 * H, H, B.nb, hm, C.oc[2]);
    store_cols(reinterpret_cast<float*>(P.saved) + B.b0 * (H + 1), H + 1, B.nb, (__mmask16)F.smask, C.oc[3]);
    return;
  }
  if (!F.gp.on) return;
  switch (P.logits_dtype) {
    case DT_F32: flush_g<DT_F32>(F, B, C); break;
    case DT_F16: flush_g<DT_F16>(F, B, C); break;
    default: flush_g<DT_BF16>(F, B, C); break;
  }
}
// ---- wide heads on AVX-512: one row at a time, 16 columns per vector ----------------------------------------
// Heads of more than SMALL actions without a floor. The forward reads the row twice (the max of the masked
// logits and the valid count; then e = exp(zhat - shift), summed, with the entropy's sums in the same pass:
// -sum_V p logp = (log(s) sum_V e - sum_V e d) / s) and saves the row's lse; the backward reads it back and
// needs one exp per logit: p and r = p (1 + logp) go to the row buffers, then the gradient
// (j == a ? gL : 0) - gHraw r - p sigma on the valid columns. Sums run in float per lane over at most
// WIDE_FLUSH columns, then in double, reduced in a fixed order: the same bits whatever the thread count.
// Tail vectors use masked loads and stores (nothing past a row's last column is touched).
constexpr int WIDE_FLUSH = 64 * 16;  // columns summed in float before the lanes are added into double

// columns [j, j + 16) of a row (k: the columns inside the row), as float. The load is kept apart from the
// mask blend that follows: folded into one merge-masked load, it would wait for the mask's load (a second
// cache miss in series on each line of a row read for the first time)
template <int DT>
ESPER_AVX512 inline __m512 wide_load(const void* row, int j, __mmask16 k) {
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
ESPER_AVX512 inline __mmask16 wide_valid(const uint8_t* m, int j, __mmask16 k) {
  if (!m) return k;
  const __m128i v = _mm_maskz_loadu_epi8(k, m + j);
  return _mm_test_epi8_mask(v, v);
}
ESPER_AVX512 inline __mmask16 wide_tail(int A, int j) {
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
ESPER_AVX512 inline void wide_flush(__m512& f, __m512d& lo, __m512d& hi) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
  f = _mm512_setzero_ps();
}
ESPER_AVX512 inline float wide_sum(__m512d lo, __m512d hi) { return (float)_mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }

// the forward of row i of wide head h (a present step): row_forward's outputs and the row's lse
template <int DT>
ESPER_AVX512 RowFwd wide_forward(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float& lse_out) {
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
  const float sh = lse_shift(_mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)));
  const __m512 shv = _mm512_set1_ps(sh);
  // s = sum e_j over every column; over the valid ones t2 = sum e_j, t1 = sum e_j d_j (d_j = zhat_j - sh)
  __m512 s = _mm512_setzero_ps(), t1 = s, t2 = s;
  __m512d s_lo = _mm512_setzero_pd(), s_hi = s_lo, t1_lo = s_lo, t1_hi = s_lo, t2_lo = s_lo, t2_hi = s_lo;
  for (int c0 = 0; c0 < A; c0 += WIDE_FLUSH) {
    const int c1 = std::min(A, c0 + WIDE_FLUSH);
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
  const float lse = sh + ls;
  const float nf = (float)n;
  float ent = n > 0 ? (ls * t2f - t1f) / sf : 0.f;
  if (P.normalize_entropy) ent = nf > 1.f ? ent / ek_log(nf < 2.f ? 2.f : nf) : 0.f;
  RowFwd out;
  out.ent = ent;
  out.n = nf;
  out.taken = false;
  out.ell = f_nan();
  if (hi.in_range) {
    const bool va = !m || m[hi.a] != 0;
    out.ell = (va ? load_logit(P, h, i, hi.a) : P.mask_fill) - lse;
    out.taken = va;
  }
  lse_out = lse;
  return out;
}

// the gradient of row i of wide head h (a present step) from the saved lse; p, r and the valid bits of the
// row go through pb, rb, vb (A floats, A floats, A / 8 bytes)
template <int DT>
ESPER_AVX512 void wide_backward(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float gL, float gE, float* pb,
                                float* rb, uint8_t* vb) {
  const int A = P.sizes[h];
  const int es = DT == DT_F32 ? 4 : 2;
  const void* row = reinterpret_cast<const char*>(P.logits[h]) + i * P.logits_rs[h] * es;
  const uint8_t* m = P.has_mask ? reinterpret_cast<const uint8_t*>(P.masks[h]) + i * P.masks_rs[h] : nullptr;
  const __m512 fill = _mm512_set1_ps(P.mask_fill);
  const __m512 lse = _mm512_set1_ps(saved_lse(P)[i * P.num_heads + h]);
  char* grow = reinterpret_cast<char*>(P.grads[h]) + i * P.grads_rs[h] * es;
  // pass 1: p = exp(zhat - lse), r = p + logp p on the valid columns; sum_V r
  __m512 sr = _mm512_setzero_ps();
  __m512d sr_lo = _mm512_setzero_pd(), sr_hi = sr_lo;
  int n = 0;
  for (int c0 = 0; c0 < A; c0 += WIDE_FLUSH) {
    const int c1 = std::min(A, c0 + WIDE_FLUSH);
    for (int j = c0; j < c1; j += 16) {
      if (es == 4 || (j & 31) == 0) WideNext::line_w(grow + (int64_t)j * es);  // the lines pass 2 writes
      const __mmask16 k = wide_tail(c1, j), v = wide_valid(m, j, k);
      const __m512 lp = _mm512_sub_ps(_mm512_mask_blend_ps(v, fill, wide_load<DT>(row, j, k)), lse);
      const __m512 p = _mm512_maskz_mov_ps(v, exp16(lp));
      const __m512 r = _mm512_maskz_fmadd_ps(v, lp, p, p);
      sr = _mm512_add_ps(sr, r);
      _mm512_mask_storeu_ps(pb + j, k, p);
      _mm512_mask_storeu_ps(rb + j, k, r);
      const uint16_t vv = (uint16_t)v;
      std::memcpy(vb + (j >> 3), &vv, 2);
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
  // pass 2: g_j = (j == a ? gL : 0) + ng r_j - p_j sigma on the valid columns, 0 elsewhere
  const __m512 ngv = _mm512_set1_ps(ng), sigv = _mm512_set1_ps(sig), glv = _mm512_set1_ps(gla);
  const __m512i av = _mm512_set1_epi32((int32_t)a);
  const WideNext next(P, h, i, es);
  for (int j = 0; j < A; j += 16) {
    next.at(j);
    const __mmask16 k = wide_tail(A, j);
    uint16_t vv;
    std::memcpy(&vv, vb + (j >> 3), 2);
    const __mmask16 isa = _mm512_cmpeq_epi32_mask(_mm512_add_epi32(iota16i(), _mm512_set1_epi32(j)), av);
    const __m512 q = _mm512_mul_ps(ngv, _mm512_maskz_loadu_ps(k, rb + j));
    const __m512 base = _mm512_mask_add_ps(q, isa, q, glv);
    const __m512 g = _mm512_maskz_mov_ps((__mmask16)vv, _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, pb + j), sigv, base));
    if (DT == DT_F32) _mm512_mask_storeu_ps(reinterpret_cast<float*>(grow) + j, k, g);
    else _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(grow) + j, k, _mm512_cvtepi32_epi16(to16<DT>(g)));
  }
}

ESPER_AVX512 RowFwd wide_forward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float& lse) {
  switch (P.logits_dtype) {
    case DT_F32: return wide_forward<DT_F32>(P, h, i, hi, lse);
    case DT_F16: return wide_forward<DT_F16>(P, h, i, hi, lse);
    default: return wide_forward<DT_BF16>(P, h, i, hi, lse);
  }
}
ESPER_AVX512 void wide_backward_any(const PPOParams& P, int h, int64_t i, const HeadIn& hi, float gL, float gE,
                                    Bufs& b) {
  float* pb = b.z.data();
  float* rb = b.g.data();
  uint8_t* vb = b.u.data();
  switch (P.logits_dtype) {
    case DT_F32: wide_backward<DT_F32>(P, h, i, hi, gL, gE, pb, rb, vb); break;
    case DT_F16: wide_backward<DT_F16>(P, h, i, hi, gL, gE, pb, rb, vb); break;
    default: wide_backward<DT_BF16>(P, h, i, hi, gL, gE, pb, rb, vb); break;
  }
}
#else
void fast_global_any(const PPOParams&, const FastPlan&, const BlockIn&, const float*, const uint32_t*, FastCols&,
                     GlobalAcc&, float*, float*) {}
void fast_stage(const PPOParams&, const FastPlan&, const BlockIn&, FastCols&, bool) {}
void block_in_vec(const PPOParams&, int64_t, int, BlockIn&) {}
void fast_flush(const PPOParams&, const FastPlan&, const BlockIn&, const FastCols&, bool) {}
void fast_forward_any(const PPOParams&, const FastPlan&, int, const BlockIn&, const uint64_t*, FastCols&, LaneAcc&,
                      float*, uint32_t*) {}
void fast_backward_any(const PPOParams&, const FastPlan&, int, const BlockIn&, const uint64_t*, FastCols&) {}
void fast_mask_rows(const FastPlan&, const BlockIn&, uint64_t*) {}
RowFwd wide_forward_any(const PPOParams&, int, int64_t, const HeadIn&, float&) { return RowFwd{0.f, 0.f, 0.f, false}; }
void wide_backward_any(const PPOParams&, int, int64_t, const HeadIn&, float, float, Bufs&) {}
#endif

Bufs::Bufs(int A, int H, bool vec)
    : z(std::max(A, 1)), g(std::max(A, 1)), u(std::max(A, 1)), small(new SmallBuf), cols(new FastCols), acc(H),
      gacc(new GlobalAcc), vectorise(vec) {}

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
  const bool* fast_ok = F.fast_ok;
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
    if (F.any) prefetch_block(F, i0 + PREFETCH_BLOCKS * RB, P.n);
    else prefetch_rows(P, i0 + RB, std::min<int64_t>(i0 + 2 * RB, P.n), false);
    if (F.all) {
      block_in_vec(P, i0, nb, B);
    } else {
      for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i0 + q);
      block_in(sb, i0, nb, B);
    }
    if (F.any) {
      fast_mask_rows(F, B, rows);
      fast_stage(P, F, B, *b.cols, true);
    }
    for (int q = 0; q < RB; ++q) {
      Lsum[q] = 0.f;
      flags[q] = 0;
    }
    for (int h = 0; h < H; ++h) {  // every head's rows of the block: outputs, statistics, Lsum, flags
      if (fast[h]) {
        fast_forward_any(P, F, h, B, rows, *b.cols, b.acc[h], Lsum, flags);
        continue;
      }
      for (int q = 0; q < nb; ++q) hib[q] = load_head(P, h, i0 + q, sb[q].present);
      if (b.vectorise && vectorised(P, h)) {
        small_forward(P, h, i0, nb, sb, hib, rfb, *b.small);
      } else {
        for (int q = 0; q < nb; ++q) {
          RowFwd rf{0.f, 0.f, 0.f, false};
          float lse = 0.f;
          if (sb[q].present && F.wide[h]) {
            rf = wide_forward_any(P, h, i0 + q, hib[q], lse);
          } else if (sb[q].present) {
            stage_row(P, h, i0 + q, b.z.data(), b.u.data());
            BufRow row{b.z.data(), b.u.data(), nullptr, P.sizes[h]};
            const RowIn in = row_in(P, h, hib[q]);
            rf = row_forward(row, in);
            if (fast_ok[h] || F.wide_ok[h]) lse = row_softmax(row, in).lse;  // the AVX-512 backward reads it
          }
          if (fast_ok[h] || F.wide_ok[h]) saved_lse(P)[(i0 + q) * H + h] = lse;
          rfb[q] = rf;
        }
      }
      for (int q = 0; q < nb; ++q) {
        const int64_t i = i0 + q;
        const RowFwd& rf = rfb[q];
        logp[i * H + h] = rf.ell;
        ent[i * H + h] = rf.ent;
        const HeadStep hs = head_step(P, h, i, sb[q], hib[q], rf, c);
#pragma GCC unroll 16
        for (int k = 0; k < ESPER_HEAD_SIZE; ++k) hacc[h][k] = kind_combine(head_kind(k), hacc[h][k], c[k]);
        Lsum[q] += hs.lr;
        if (P.per_head) saved[i * (H + 1) + h] = hs.u;
        else if (hs.flag) flags[q] |= 1u << h;
      }
    }
    if (F.any) {
      fast_global_any(P, F, B, Lsum, flags, *b.cols, *b.gacc, &xs[0][i0 - r0], &xw[0][i0 - r0]);
      fast_flush(P, F, B, *b.cols, true);
      continue;
    }
    for (int q = 0; q < nb; ++q) {
      const int64_t i = i0 + q;
      const GlobalStep g = global_step(P, i, sb[q], Lsum[q], c);
#pragma GCC unroll 32
      for (int k = 0; k < GX_SIZE; ++k) gacc[k] = kind_combine(global_kind(k), gacc[k], c[k]);
      jr[i] = g.r;
      if (!P.per_head)
        for (int h = 0; h < H; ++h) saved[i * (H + 1) + h] = ((flags[q] >> h) & 1u) ? g.base : 0.f;
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
    for (int64_t r = 0; r < r1 - r0; ++r) {
      if (xw[m][r] > 0.f) {
        const double d = (double)xs[m][r] - mean;
        m2 += (double)xw[m][r] * d * d;
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
    if (F.any) prefetch_block(F, i0 + PREFETCH_BLOCKS * RB, P.n);
    else prefetch_rows(P, i0 + RB, std::min<int64_t>(i0 + 2 * RB, P.n), true);
    if (F.all) {
      block_in_vec(P, i0, nb, B);
    } else {
      for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i0 + q);
      if (F.any) block_in(sb, i0, nb, B);
    }
    if (F.any) {
      fast_mask_rows(F, B, rows);
      fast_stage(P, F, B, *b.cols, false);
    }
    for (int h = 0; h < H; ++h) {
      if (F.fast[h]) {
        fast_backward_any(P, F, h, B, rows, *b.cols);
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
          wide_backward_any(P, h, i, hi[q], gL[q], gE[q], b);
          continue;
        }
        stage_row(P, h, i, b.z.data(), b.u.data());
        BufRow row{b.z.data(), b.u.data(), b.g.data(), P.sizes[h]};
        row_backward(row, row_in(P, h, hi[q]), gL[q], gE[q]);
        store_row(P, h, i, b.g.data());
      }
    }
    if (F.any) fast_flush(P, F, B, *b.cols, false);
    if (P.has_values && gv)
      for (int q = 0; q < nb; ++q) gv[i0 + q] = value_grad(P, st, gs, i0 + q);
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

void cpu_forward(const PPOParams& P, int nthreads, bool vectorise) {
  const int H = P.num_heads;
  const int K = stats_size(H);
  const int64_t N = P.n;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  std::vector<double> parts((size_t)std::max<int64_t>(nchunks, 1) * K);
  const int64_t T = useful_threads(P, nthreads, nchunks);
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

void cpu_backward(const PPOParams& P, int nthreads, bool vectorise) {
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

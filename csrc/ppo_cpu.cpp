// esper_kernels: the fused PPO loss on the CPU (forward with statistics, backward recomputing the softmax).
//
// Rows are cut into fixed chunks of CHUNK rows (independent of the thread count); each chunk's statistics
// are reduced in row order into a partial (double), and the partials are merged in chunk order, so every
// output is bitwise the same whatever the number of threads. Threads (std::thread, count from Python, one
// per 64 K logits at most) take chunks round-robin; no OpenMP (it would clash with torch's libgomp).
//
// Within a chunk, rows go in blocks of RB = 16: heads of at most 32 actions without a floor run the row
// algorithm of ppo_core.h with the 16 rows in SIMD lanes (block_lse / block_entropy / block_grad, compiled
// for AVX-512, AVX2 and baseline x86-64 with target_clones; the same operations in the same order, so the
// results are bitwise those of the row-by-row path); other heads (wide, floored) run the row-by-row path
// over a row buffer (BufRow), which is exactly the code a CUDA thread runs for a small head.
#include "ppo_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "ppo_core.h"

namespace esper {
namespace {

constexpr int64_t CHUNK = 128;  // rows per chunk (fixed: the reduction order depends on it, not on threads)
constexpr int RB = 16;          // rows per vectorised block (CHUNK is a multiple)
constexpr int SMALL = 32;       // heads of at most SMALL actions (no floor) run row-vectorised
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
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  for (int64_t t = 1; t < T; ++t)
    pool.emplace_back([&f, t, T, nchunks]() {
      for (int64_t c = t; c < nchunks; c += T) f(c, (int)t);
    });
  for (int64_t c = 0; c < nchunks; c += T) f(c, 0);
  for (auto& th : pool) th.join();
}

// one thread's row buffers
struct SmallBuf;
struct Bufs {
  std::vector<float> z, g;
  std::vector<uint8_t> u;
  std::unique_ptr<SmallBuf> small;
  bool vectorise;
  Bufs(int A, bool vec);
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

Bufs::Bufs(int A, bool vec)
    : z(std::max(A, 1)), g(std::max(A, 1)), u(std::max(A, 1)), small(new SmallBuf), vectorise(vec) {}

// statistics of rows [r0, r1) into part[K] (moments: weight, mean, M2)
void forward_chunk(const PPOParams& P, int64_t r0, int64_t r1, Bufs& b, double* part) {
  const int H = P.num_heads;
  float* logp = reinterpret_cast<float*>(P.log_probs);
  float* ent = reinterpret_cast<float*>(P.entropy);
  float* jr = reinterpret_cast<float*>(P.joint_ratio);
  float* saved = reinterpret_cast<float*>(P.saved);
  double hacc[ESPER_MAX_HEADS][ESPER_HEAD_SIZE];
  double gacc[GX_SIZE];
  for (int h = 0; h < H; ++h)
    for (int k = 0; k < ESPER_HEAD_SIZE; ++k) hacc[h][k] = kind_init(head_kind(k));
  for (int k = 0; k < GX_SIZE; ++k) gacc[k] = kind_init(global_kind(k));
  float xs[3][CHUNK], xw[3][CHUNK];
  double c[GX_SIZE];

  StepIn sb[RB];
  HeadIn hib[ESPER_MAX_HEADS][RB];
  RowFwd rfb[ESPER_MAX_HEADS][RB];
  for (int64_t i = r0; i < r1; ++i) {
    const int r = (int)((i - r0) % RB);
    if (r == 0) {  // the next block of rows: every head's row results, head by head
      const int nb = (int)std::min<int64_t>(RB, r1 - i);
      prefetch_rows(P, i + RB, std::min<int64_t>(i + 2 * RB, P.n), false);
      for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i + q);
      for (int h = 0; h < H; ++h) {
        for (int q = 0; q < nb; ++q) hib[h][q] = load_head(P, h, i + q, sb[q].present);
        if (b.vectorise && vectorised(P, h)) {
          small_forward(P, h, i, nb, sb, hib[h], rfb[h], *b.small);
          continue;
        }
        for (int q = 0; q < nb; ++q) {
          RowFwd rf{0.f, 0.f, 0.f, false};
          if (sb[q].present) {
            stage_row(P, h, i + q, b.z.data(), b.u.data());
            BufRow row{b.z.data(), b.u.data(), nullptr, P.sizes[h]};
            rf = row_forward(row, row_in(P, h, hib[h][q]));
          }
          rfb[h][q] = rf;
        }
      }
    }
    const StepIn& s = sb[r];
    float Lsum = 0.f;
    uint32_t flags = 0;
    for (int h = 0; h < H; ++h) {
      const HeadIn& hi = hib[h][r];
      const RowFwd& rf = rfb[h][r];
      logp[i * H + h] = rf.ell;
      ent[i * H + h] = rf.ent;
      const HeadStep hs = head_step(P, h, i, s, hi, rf, c);
#pragma GCC unroll 16
      for (int k = 0; k < ESPER_HEAD_SIZE; ++k) hacc[h][k] = kind_combine(head_kind(k), hacc[h][k], c[k]);
      Lsum += hs.lr;
      if (P.per_head) saved[i * (H + 1) + h] = hs.u;
      else if (hs.flag) flags |= 1u << h;
    }
    const GlobalStep g = global_step(P, i, s, Lsum, c);
#pragma GCC unroll 32
    for (int k = 0; k < GX_SIZE; ++k) gacc[k] = kind_combine(global_kind(k), gacc[k], c[k]);
    jr[i] = g.r;
    if (!P.per_head)
      for (int h = 0; h < H; ++h) saved[i * (H + 1) + h] = ((flags >> h) & 1u) ? g.base : 0.f;
    saved[i * (H + 1) + H] = g.vsaved;
    for (int m = 0; m < 3; ++m) {
      xs[m][i - r0] = g.x[m];
      xw[m][i - r0] = g.xw[m];
    }
  }
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

void backward_rows(const PPOParams& P, const float* st, const GradScal& gs, int64_t r0, int64_t r1, Bufs& b) {
  const int H = P.num_heads;
  float* gv = reinterpret_cast<float*>(P.grad_values);
  StepIn sb[RB];
  HeadIn hi[RB];
  float gL[RB], gE[RB];
  for (int64_t i0 = r0; i0 < r1; i0 += RB) {
    const int nb = (int)std::min<int64_t>(RB, r1 - i0);
    prefetch_rows(P, i0 + RB, std::min<int64_t>(i0 + 2 * RB, P.n), true);
    for (int q = 0; q < nb; ++q) sb[q] = load_step(P, i0 + q);
    for (int h = 0; h < H; ++h) {
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
        stage_row(P, h, i, b.z.data(), b.u.data());
        BufRow row{b.z.data(), b.u.data(), b.g.data(), P.sizes[h]};
        row_backward(row, row_in(P, h, hi[q]), gL[q], gE[q]);
        store_row(P, h, i, b.g.data());
      }
    }
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
  for (int64_t t = 0; t < T; ++t) bufs.emplace_back(P.max_size, vectorise);
  parallel_chunks(nchunks, (int)T, [&](int64_t c, int t) {
    forward_chunk(P, c * CHUNK, std::min(N, (c + 1) * CHUNK), bufs[t], parts.data() + c * K);
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
  const int64_t N = P.n;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  const float* st = reinterpret_cast<const float*>(P.stats);
  const GradScal gs = grad_scalars(P);
  const int64_t T = useful_threads(P, nthreads, nchunks);
  std::vector<Bufs> bufs;
  bufs.reserve(T);
  for (int64_t t = 0; t < T; ++t) bufs.emplace_back(P.max_size, vectorise);
  parallel_chunks(nchunks, (int)T, [&](int64_t c, int t) {
    backward_rows(P, st, gs, c * CHUNK, std::min(N, (c + 1) * CHUNK), bufs[t]);
  });
}

}  // namespace esper

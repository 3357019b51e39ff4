// esper_kernels CPU backend: the auto-vectorised block path (heads of at most SMALL actions without a floor).
//
// RB rows of one head at a time, transposed into a SmallBuf (element j of row r at [j][r]), so that the
// compiler vectorises over the rows; the same float operations in the same order as row_forward /
// row_backward of ppo_core.h over a BufRow, so bitwise the row path's results. The block loops are built for
// AVX-512, AVX2 and the baseline with GCC's target_clones (chosen once at load time); the driver runs this path
// for small unfloored heads that the AVX-512 small-head path does not take (no AVX-512, or a head it cannot
// read).
#include <stdint.h>

#include "cpu/cpu_internal.h"

namespace esper {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(ESPER_NO_CLONES)
#define ESPER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESPER_CLONES
#endif

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

// the log-softmax constants of each row (row_softmax without a floor): m = max, ls = log sum exp(z - m); n =
// valid count
ESPER_CLONES void block_softmax(int A, const SmallBuf& B, float* __restrict m_out, float* __restrict ls,
                                float* __restrict n_out) {
  float m[RB], n[RB];
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
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) sd[r] += (double)host_expf(B.z[j][r] - m[r]);
  for (int r = 0; r < RB; ++r) {
    m_out[r] = m[r];
    ls[r] = ek_log((float)sd[r]);
    n_out[r] = n[r];
  }
}

ESPER_CLONES void block_entropy(int A, const SmallBuf& B, const float* m, const float* ls, double* hx) {
  for (int r = 0; r < RB; ++r) hx[r] = 0.0;
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) {
      const float lp = log_prob(B.z[j][r], m[r], ls[r]);
      const float p = host_expf(lp);
      hx[r] += B.u[j][r] != 0.f ? (double)(p * lp) : 0.0;
    }
}

// d/d logp (kept in B.g, p in B.p) and its row sums, then the gradient d/d z into B.g
ESPER_CLONES void block_grad(int A, SmallBuf& B, const float* m, const float* ls, const int32_t* a, const float* gL,
                             const float* ng) {
  double sd[RB];
  float sig[RB];
  for (int r = 0; r < RB; ++r) sd[r] = 0.0;
  for (int j = 0; j < A; ++j)
    for (int r = 0; r < RB; ++r) {
      const float lp = log_prob(B.z[j][r], m[r], ls[r]);
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

}  // namespace

void small_forward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi, RowFwd* out,
                   SmallBuf& B) {
  const int A = P.sizes[h];
  stage_block(P, h, b0, nb, s, B);
  float m[RB], ls[RB], n[RB];
  double hx[RB];
  block_softmax(A, B, m, ls, n);
  block_entropy(A, B, m, ls, hx);
  for (int r = 0; r < nb; ++r) {
    if (!s[r].present) {
      out[r] = RowFwd{0.f, 0.f, 0.f, false, 0.f, 0.f};
      continue;
    }
    float ent = -(float)hx[r];
    if (P.normalize_entropy) ent = n[r] > 1.f ? ent / ek_log(n[r] < 2.f ? 2.f : n[r]) : 0.f;
    const int ja = hi[r].in_range ? (int)hi[r].a : 0;
    out[r].ent = ent;
    out[r].n = n[r];
    out[r].ell = (hi[r].in_range && n[r] > 0.f) ? log_prob(B.z[ja][r], m[r], ls[r]) : f_nan();
    out[r].taken = hi[r].in_range && B.u[ja][r] != 0.f;
    out[r].m = n[r] > 0.f ? m[r] : 0.f;  // (as row_forward)
    out[r].ls = n[r] > 0.f ? ls[r] : 0.f;
  }
}

// gradients of rows [b0, b0 + nb) of head h (present rows: gL, gE given) into the grads tensor
void small_backward(const PPOParams& P, int h, int64_t b0, int nb, const StepIn* s, const HeadIn* hi, const float* gL,
                    const float* gE, SmallBuf& B) {
  const int A = P.sizes[h];
  stage_block(P, h, b0, nb, s, B);
  float m[RB], ls[RB], n[RB], ng[RB], gl[RB];
  int32_t a[RB];
  bool bad[RB];
  block_softmax(A, B, m, ls, n);
  for (int r = 0; r < RB; ++r) {
    const bool ok = r < nb && s[r].present;
    float ghr = ok ? gE[r] : 0.f;
    if (P.normalize_entropy) ghr = n[r] > 1.f ? ghr / ek_log(n[r] < 2.f ? 2.f : n[r]) : 0.f;
    ng[r] = -ghr;
    gl[r] = ok ? gL[r] : 0.f;
    a[r] = (ok && hi[r].in_range) ? (int32_t)hi[r].a : -1;
    bad[r] = bad_upstream(gl[r], ghr);
  }
  block_grad(A, B, m, ls, a, gl, ng);
  for (int r = 0; r < nb; ++r) {
    if (!s[r].present) {
      store_row(P, h, b0 + r, nullptr);
      continue;
    }
    // (a non-finite upstream: NaN at every valid action, as row_backward)
    for (int j = 0; j < A; ++j) B.zr[j] = bad[r] ? (B.u[j][r] != 0.f ? f_nan() : 0.f) : B.g[j][r];
    store_row(P, h, b0 + r, B.zr);
  }
}

}  // namespace cpu
}  // namespace esper

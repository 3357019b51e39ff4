// esper_kernels: the host emulation of the one-pass CUDA kernels (_C.onepass_host_forward / _backward).
//
// The kernels of csrc/ppo_cuda.cu are thin wrappers around the block bodies of ppo_onepass.h (prepass_block,
// small_block, wide_cluster), run by a device execution policy. This file runs the same bodies on the CPU with a
// host policy: one block (or cluster) after the other in order, a block's threads as loops, every fold in the
// device's order (the tile folds' 8 groups and xor tree, the 256-thread block tree, the 32-lane merges, the
// cluster's ranks in order). It is single-threaded and deterministic; its results differ from a GPU's only in the
// rounding of exp and log (and in FMA contraction). What it cannot run: __syncthreads, shuffles, shared-memory
// races, the atomic ticket and the cluster's distributed shared memory (see ppo_cuda.cu).
#pragma once

#include <string>
#include <vector>

#include "ppo_onepass.h"

namespace esper {
namespace op {
namespace host {

// the block tree of a fold over n (a power of two) threads: v[l] = c(v[l], v[l + o]) for o = n/2 .. 1
template <class T, class C>
inline T block_tree(T* v, int n, C c) {
  for (int o = n / 2; o >= 1; o >>= 1)
    for (int l = 0; l < o; ++l) v[l] = c(v[l], v[l + o]);
  return v[0];
}

struct Common {
  uint32_t tickets = 0;
  template <class F>
  void coop(F f) {
    f(0, 1);
  }
  template <class F>
  void coop_cluster(F f) {
    f(0, 1);
  }
  void sync() {}
  bool leader() const { return true; }
  bool stats_leader() const { return true; }
  bool is_rank0() const { return true; }
  template <class LF, class C, class OF>
  void lanes_fold(int ntasks, LF lf, C c, OF out) {
    using T = decltype(lf(0, 0));
    for (int t = 0; t < ntasks; ++t) {
      T v[32];
      for (int l = 0; l < 32; ++l) v[l] = lf(t, l);
      out(t, tree32(v, [&](T a, T b) { return c(t, a, b); }));
    }
  }
  template <class F, class C>
  auto block_fold(F f, C c) -> decltype(f(0, 0)) {
    using T = decltype(f(0, 0));
    std::vector<T> v(WIDE_THREADS);
    for (int t = 0; t < WIDE_THREADS; ++t) v[t] = f(t, WIDE_THREADS);
    return block_tree(v.data(), WIDE_THREADS, c);
  }
  void reset_ticket(uint32_t* ctr) { *ctr = 0u; }
};

// a small-path block: R row threads
struct SmallX : Common {
  int R;
  uint32_t units = 1;
  template <class T>
  struct Local {
    T v[MAX_TILE_ROWS];
    T& operator()(int r) { return v[r]; }
  };
  template <class F>
  void threads(F f) {
    for (int r = 0; r < R; ++r) f(r);
  }
  // the warps' statistics (ppo_onepass.h: HeadC, GlobC): the device's shuffles and warp reductions, lane by lane
  template <int N>
  static void bfly(float (&v)[32][N], float* out, int* idx) {
    float cur[32][N];
    int id[32];
    for (int l = 0; l < 32; ++l) {
      id[l] = 0;
      for (int q = 0; q < N; ++q) cur[l][q] = v[l][q];
    }
    int o = 16;
    for (int n = N; n > 1; n >>= 1, o >>= 1) {
      float nx[32][N];
      for (int l = 0; l < 32; ++l) {
        const bool hi = (l & o) != 0;
        const int p = l ^ o;
        for (int q = 0; q < n / 2; ++q) {
          const float mine = hi ? cur[l][q + n / 2] : cur[l][q];
          const float recv = hi ? cur[p][q + n / 2] : cur[p][q];  // the partner's send: the half it does not keep
          nx[l][q] = mine + recv;
        }
        id[l] = id[l] * 2 + (hi ? 1 : 0);
      }
      for (int l = 0; l < 32; ++l)
        for (int q = 0; q < n / 2; ++q) cur[l][q] = nx[l][q];
    }
    float x[32];
    for (int l = 0; l < 32; ++l) x[l] = cur[l][0];
    for (; o >= 1; o >>= 1) {
      float nx[32];
      for (int l = 0; l < 32; ++l) nx[l] = x[l] + x[l ^ o];
      for (int l = 0; l < 32; ++l) x[l] = nx[l];
    }
    for (int l = 0; l < 32; ++l) {
      out[l] = x[l];
      idx[l] = id[l];
    }
  }
  template <class L>
  void warp_head_stats(L& cl, float* wacc, int K, int base) {
    for (int w = 0; w < R / 32; ++w) {
      float* acc = wacc + w * K + base;
      float v[32][HEAD_BF];
      for (int l = 0; l < 32; ++l)
        for (int k = 0; k < HEAD_BF; ++k) v[l][k] = k < ESPER_HEAD_SIZE ? cl(32 * w + l).v[k] : 0.f;
      for (int k = 0; k < ESPER_HEAD_SIZE; ++k) {
        if (!bit(kHeadMinMax, k)) continue;
        const bool mn = bit(kHeadMin, k);
        int32_t key = fkey(v[0][k]);
        for (int l = 1; l < 32; ++l)
          key = mn ? (fkey(v[l][k]) < key ? fkey(v[l][k]) : key) : (fkey(v[l][k]) > key ? fkey(v[l][k]) : key);
        wacc_minmax(acc + k, mn, key);
        for (int l = 0; l < 32; ++l) v[l][k] = 0.f;
      }
      float out[32];
      int idx[32];
      bfly<HEAD_BF>(v, out, idx);
      for (int l = 0; l < 32; l += 32 / HEAD_BF)
        if (idx[l] < ESPER_HEAD_SIZE && !bit(kHeadMinMax, idx[l])) acc[idx[l]] += out[l];
    }
  }
  template <class L>
  void warp_global_stats(L& cl, float* wacc, Mom* wmom, int K) {
    for (int w = 0; w < R / 32; ++w) {
      float* acc = wacc + w * K;
      Mom* am = wmom + w * NMOM;
      float v[32][GLOB_BF];
      for (int l = 0; l < 32; ++l)
        for (int k = 0; k < GLOB_BF; ++k)
          v[l][k] = (k < ESPER_GLOBAL_SIZE && !bit(kGlobalSkip, k)) ? cl(32 * w + l).v[k] : 0.f;
      for (int k = 0; k < ESPER_GLOBAL_SIZE; ++k) {
        if (!bit(kGlobalMin | kGlobalMax, k)) continue;
        const bool mn = bit(kGlobalMin, k);
        int32_t key = fkey(cl(32 * w).v[k]);
        for (int l = 1; l < 32; ++l) {
          const int32_t kl = fkey(cl(32 * w + l).v[k]);
          key = mn ? (kl < key ? kl : key) : (kl > key ? kl : key);
        }
        wacc_minmax(acc + k, mn, key);
      }
      float x0[NMOM];
      bool any_bad[NMOM];
      for (int m = 0; m < NMOM; ++m) {
        x0[m] = 0.f;
        any_bad[m] = false;
        for (int l = 31; l >= 0; --l) {  // the first kept finite value (lowest lane)
          const float wl = cl(32 * w + l).mw[m], xl = cl(32 * w + l).mx[m];
          if (wl > 0.f && is_finite(xl)) x0[m] = xl;
        }
        for (int l = 0; l < 32; ++l) {
          const float wl = cl(32 * w + l).mw[m], xl = cl(32 * w + l).mx[m];
          const bool kept = wl > 0.f, fin = is_finite(xl);
          any_bad[m] = any_bad[m] || (kept && !fin);
          v[l][ESPER_GLOBAL_SIZE + 3 * m] = kept ? wl : 0.f;
          v[l][ESPER_GLOBAL_SIZE + 3 * m + 1] = (kept && fin) ? wl * (xl - x0[m]) : 0.f;
          v[l][ESPER_GLOBAL_SIZE + 3 * m + 2] = (kept && !fin) ? xl : 0.f;
        }
      }
      float out[32];
      int idx[32];
      bfly<GLOB_BF>(v, out, idx);
      for (int l = 0; l < 32; l += 32 / GLOB_BF)
        if (idx[l] < ESPER_GLOBAL_SIZE && !bit(kGlobalSkip, idx[l])) acc[idx[l]] += out[l];
      float W[NMOM], S1[NMOM], bad[NMOM], mean[NMOM];
      for (int m = 0; m < NMOM; ++m) {
        W[m] = out[ESPER_GLOBAL_SIZE + 3 * m];
        S1[m] = out[ESPER_GLOBAL_SIZE + 3 * m + 1];
        bad[m] = out[ESPER_GLOBAL_SIZE + 3 * m + 2];
        mean[m] = W[m] > 0.f ? x0[m] + S1[m] / W[m] : 0.f;
      }
      float v2[32][4];
      for (int l = 0; l < 32; ++l) {
        for (int q = 0; q < 4; ++q) v2[l][q] = 0.f;
        for (int m = 0; m < NMOM; ++m) {
          const float wl = cl(32 * w + l).mw[m], xl = cl(32 * w + l).mx[m];
          const float d = xl - mean[m];
          v2[l][m] = (wl > 0.f && is_finite(xl)) ? wl * (d * d) : 0.f;
        }
      }
      float out2[32];
      int idx2[32];
      bfly<4>(v2, out2, idx2);
      for (int m = 0; m < NMOM; ++m)
        am[m] = mom_combine(am[m], warp_moment(W[m], S1[m], bad[m], any_bad[m], x0[m], out2[8 * m]));
    }
  }
  bool ticket(uint32_t* ctr, int n, bool) {
    const uint32_t t = (*ctr)++;
    return (int)t == n - 1;
  }
};

// a wide-path cluster: CL blocks of WIDE_THREADS threads; the ranks' chunks are consecutive in one buffer
struct WideX : Common {
  static const int WT = WIDE_THREADS;
  int cl;  // blocks per cluster
  int chunk;
  float* zb;
  float* eb;
  uint8_t* ub;
  float* zp(int col) const { return zb + col; }
  float* ep(int col) const { return eb + col; }
  uint8_t* up(int col) const { return ub + col; }
  template <class F>
  void threads(F f) {
    for (int rank = 0; rank < cl; ++rank)
      for (int t = 0; t < WT; ++t) f(rank, t);
  }
  template <class F, class C>
  auto cluster_fold(F f, C c) -> decltype(f(0, 0)) {
    using T = decltype(f(0, 0));
    std::vector<T> v(WT);
    T acc{};
    for (int rank = 0; rank < cl; ++rank) {
      for (int t = 0; t < WT; ++t) v[t] = f(rank, t);
      const T r = block_tree(v.data(), WT, c);
      acc = rank == 0 ? r : c(acc, r);
    }
    return acc;
  }
  bool ticket(uint32_t* ctr, int n, bool all_ranks) {
    const uint32_t before = *ctr;
    *ctr += all_ranks ? (uint32_t)cl : 1u;
    return (int)before + (all_ranks ? cl : 1) == n;
  }
};

template <class T>
struct Buf {
  std::vector<T> v;
  T* get(size_t n) {
    v.assign(n ? n : 1, T{});
    return v.data();
  }
};

// runs the pre-pass (forward only) and the main or fix-up blocks in order
inline std::string run(const PPOParams& P, const OnePass& O0) {
  OnePass O = O0;
  const int H = P.num_heads;
  if (!O.fixup) {
    SmallX x;
    x.R = MAX_TILE_ROWS;
    for (int b = 0; b < O.grid_pre; ++b) prepass_block(x, P, O, b);
  }
  Buf<float> mem;  // the block's "shared memory", carved 16-byte aligned
  if (O.path == PATH_SMALL) {
    const size_t bytes = small_smem_bytes(H, O.rows, O.pitch, O.joint_c != 0, P.has_mask != 0, !O.fixup);
    float* base = mem.get(bytes / sizeof(float) + 8);
    unsigned char* p = reinterpret_cast<unsigned char*>(((uintptr_t)base + 15) & ~(uintptr_t)15);
    const SmallSmem sm = small_carve(p, H, O.rows, O.pitch, O.joint_c != 0, P.has_mask != 0, !O.fixup);
    SmallX x;
    x.R = O.rows;
    x.tickets = 0;
    for (int b = 0; b < O.grid_main; ++b) {
      memset(p, 0, bytes);
      small_block<SMALL_W>(x, P, O, sm, b, O.grid_main);
    }
    return "";
  }
  const bool staged = O.path == PATH_WIDE;
  const size_t bytes = wide_smem_bytes(H, O.chunk, false, false);
  float* base = mem.get(bytes / sizeof(float) + 8);
  unsigned char* p = reinterpret_cast<unsigned char*>(((uintptr_t)base + 15) & ~(uintptr_t)15);
  const WideSmem sm = wide_carve(p, H, O.chunk, false, false);
  Buf<float> zb, eb;
  Buf<uint8_t> ub;
  const size_t cols = (size_t)O.chunk * O.cluster;
  WideX x;
  x.cl = O.cluster;
  x.chunk = O.chunk;
  x.zb = zb.get(cols);
  x.eb = eb.get(cols);
  x.ub = ub.get(cols);
  const int ncl = O.nparts;
  for (int c = 0; c < ncl; ++c) {
    memset(p, 0, bytes);
    if (staged)
      wide_cluster<WideX, true>(x, P, O, sm, c, ncl);
    else
      wide_cluster<WideX, false>(x, P, O, sm, c, ncl);
  }
  return "";
}

}  // namespace host
}  // namespace op
}  // namespace esper

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
  void coop(F f) { f(0, 1); }
  template <class F>
  void coop_cluster(F f) { f(0, 1); }
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
  // the tile fold: statistic k folded by 8 groups (group g: rows g, g + 8, ...), then the xor tree over the groups
  void fold_tile(const float* red, int V, uint32_t mn, uint32_t mx, float* acc) {
    const int RS = R + 8;
    for (int k = 0; k < V; ++k) {
      const bool a = bit(mn, k), b = bit(mx, k);
      float v[NGROUPS];
      for (int g = 0; g < NGROUPS; ++g) {
        float x = kident(a, b);
        for (int r = g; r < R; r += NGROUPS) x = kcombine(a, b, x, red[k * RS + r]);
        v[g] = x;
      }
      acc[k] = kcombine(a, b, acc[k], tree8(v, [&](float p, float q) { return kcombine(a, b, p, q); }));
    }
  }
  void fold_tile_mom(const float* redm, Mom* am) {
    const int RS = R + 8;
    for (int m = 0; m < NMOM; ++m) {
      Mom v[NGROUPS];
      for (int g = 0; g < NGROUPS; ++g) {
        Mom x{0.f, 0.f, 0.f};
        for (int r = g; r < R; r += NGROUPS)
          x = mom_combine(x, mom_point(redm[(2 * m) * RS + r], redm[(2 * m + 1) * RS + r]));
        v[g] = x;
      }
      am[m] = mom_combine(am[m], tree8(v, mom_combine));
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
    if (staged) wide_cluster<WideX, true>(x, P, O, sm, c, ncl);
    else wide_cluster<WideX, false>(x, P, O, sm, c, ncl);
  }
  return "";
}

}  // namespace host
}  // namespace op
}  // namespace esper

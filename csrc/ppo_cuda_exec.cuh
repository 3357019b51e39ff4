// esper_kernels: the device execution policies of the one-pass kernels (csrc/ppo_onepass.h's block bodies run on
// a GPU): threads, barriers, warp shuffles and reductions, the atomic ticket, the cluster's distributed shared
// memory. Included by csrc/ppo_cuda.cu (and by tests/cuda_static_check.py's probe kernels).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "ppo_onepass.h"

namespace esper {
namespace cudaexec {

namespace cg = cooperative_groups;
using namespace op;

constexpr unsigned FULL = 0xffffffffu;
// shared memory of the execution policy itself: the block tree's scratch (256 values of up to FOLD_BYTES), the
// ticket flag and the cluster fold's two slots
constexpr int FOLD_BYTES = 24;
constexpr int EXEC_SCRATCH = WIDE_THREADS * FOLD_BYTES + 16 + 2 * FOLD_BYTES;

static_assert(sizeof(PPOParams) + sizeof(OnePass) <= 32000, "kernel parameters must fit the 32 KB limit");

// ---- warp shuffles of small trivially-copyable values ------------------------------------------------------
template <class T>
__device__ __forceinline__ T shfl_xor_t(T v, int o) {
  static_assert(sizeof(T) % 4 == 0 && sizeof(T) <= FOLD_BYTES, "32-bit words, at most FOLD_BYTES");
  constexpr int W = sizeof(T) / 4;
  uint32_t w[W];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = __shfl_xor_sync(FULL, w[k], o);
  memcpy(&v, w, sizeof(T));
  return v;
}
template <class T>
__device__ __forceinline__ T shfl_down_t(T v, int o) {
  constexpr int W = sizeof(T) / 4;
  uint32_t w[W];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = __shfl_down_sync(FULL, w[k], o);
  memcpy(&v, w, sizeof(T));
  return v;
}

// ---- the execution policies ---------------------------------------------------------------------------------
// Members are __host__ __device__ only so that the shared ESPER_HD bodies compile for both sides; their host
// halves are never called (the host emulation has its own policies).
struct DevCommon {
  unsigned char* scratch;  // EXEC_SCRATCH bytes of shared memory (16-byte aligned)
  __host__ __device__ void sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  __host__ __device__ bool leader() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x == 0;
#else
    return false;
#endif
  }
  template <class F>
  __host__ __device__ void coop(F f) {
#ifdef __CUDA_ARCH__
    f((int)threadIdx.x, (int)blockDim.x);
#endif
  }
  // task t on warp t mod warps: lane_fn(t, lane), then the xor tree 16..1; lane 0 calls out
  template <class LF, class C, class OF>
  __host__ __device__ void lanes_fold(int ntasks, LF lf, C c, OF out) {
#ifdef __CUDA_ARCH__
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int t = warp; t < ntasks; t += nw) {
      auto v = lf(t, lane);
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) v = c(t, v, shfl_xor_t(v, o));
      if (lane == 0) out(t, v);
    }
#endif
  }
  // f(tid, blockDim) per thread, then the block tree (shared memory down to 32, then shuffles), result to all
  template <class F, class C>
  __host__ __device__ auto block_fold(F f, C c) -> decltype(f(0, 0)) {
    using T = decltype(f(0, 0));
#ifdef __CUDA_ARCH__
    T v = f((int)threadIdx.x, (int)blockDim.x);
    return block_tree(v, c);
#else
    return T{};
#endif
  }
  template <class T, class C>
  __device__ __forceinline__ T block_tree(T v, C c) {
    T* sc = reinterpret_cast<T*>(scratch);
    const int t = threadIdx.x;
    __syncthreads();  // the previous fold's result has been read
    sc[t] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o >= 32; o >>= 1) {
      if (t < o) sc[t] = c(sc[t], sc[t + o]);
      __syncthreads();
    }
    if (t < 32) {
      T w = sc[t];
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) w = c(w, shfl_down_t(w, o));
      if (t == 0) sc[0] = w;
    }
    __syncthreads();
    return sc[0];
  }
  // the last of n blocks to arrive: every thread's earlier global writes are visible to it
  __host__ __device__ bool ticket(uint32_t* ctr, int n, bool) {
#ifdef __CUDA_ARCH__
    int* flag = reinterpret_cast<int*>(scratch + WIDE_THREADS * FOLD_BYTES);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *flag = atomicAdd(ctr, 1u) == (uint32_t)(n - 1) ? 1 : 0;
    __syncthreads();
    const bool last = *flag != 0;
    if (last) __threadfence();
    return last;
#else
    return false;
#endif
  }
  __host__ __device__ void reset_ticket(uint32_t* ctr) {
#ifdef __CUDA_ARCH__
    atomicExch(ctr, 0u);
#endif
  }
};

struct DevSmallX : DevCommon {
  int R;
  template <class T>
  struct Local {
    T v;
    __host__ __device__ T& operator()(int) { return v; }
  };
  template <class F>
  __host__ __device__ void threads(F f) {
#ifdef __CUDA_ARCH__
    f((int)threadIdx.x);
#endif
  }
  template <class F>
  __host__ __device__ void coop_cluster(F f) {
    coop(f);
  }
  // the warps' statistics (ppo_onepass.h: HeadC, GlobC; the host policy replays the same order lane by lane)
  template <class L>
  __host__ __device__ void warp_head_stats(L& cl, float* wacc, int K, int base) {
#ifdef __CUDA_ARCH__
    const int lane = threadIdx.x & 31;
    float* acc = wacc + (threadIdx.x >> 5) * K + base;
    float v[HEAD_BF];
#pragma unroll
    for (int k = 0; k < HEAD_BF; ++k) v[k] = k < ESPER_HEAD_SIZE ? cl(0).v[k] : 0.f;
#pragma unroll
    for (int k = 0; k < ESPER_HEAD_SIZE; ++k) {
      if (!bit(kHeadMinMax, k)) continue;
      const bool mn = bit(kHeadMin, k);
      const int key = mn ? __reduce_min_sync(FULL, fkey(v[k])) : __reduce_max_sync(FULL, fkey(v[k]));
      if (lane == 0) wacc_minmax(acc + k, mn, key);
      v[k] = 0.f;
    }
    int idx;
    const float tot = bfly<HEAD_BF>(v, lane, idx);
    if ((lane & (32 / HEAD_BF - 1)) == 0 && idx < ESPER_HEAD_SIZE && !bit(kHeadMinMax, idx)) acc[idx] += tot;
#endif
  }
  template <class L>
  __host__ __device__ void warp_global_stats(L& cl, float* wacc, Mom* wmom, int K) {
#ifdef __CUDA_ARCH__
    const int lane = threadIdx.x & 31;
    float* acc = wacc + (threadIdx.x >> 5) * K;
    Mom* am = wmom + (threadIdx.x >> 5) * NMOM;
    const GlobC& c = cl(0);
    float v[GLOB_BF];
#pragma unroll
    for (int k = 0; k < GLOB_BF; ++k) v[k] = (k < ESPER_GLOBAL_SIZE && !bit(kGlobalSkip, k)) ? c.v[k] : 0.f;
#pragma unroll
    for (int k = 0; k < ESPER_GLOBAL_SIZE; ++k) {
      if (!bit(kGlobalMin | kGlobalMax, k)) continue;
      const bool mn = bit(kGlobalMin, k);
      const int key = mn ? __reduce_min_sync(FULL, fkey(c.v[k])) : __reduce_max_sync(FULL, fkey(c.v[k]));
      if (lane == 0) wacc_minmax(acc + k, mn, key);
    }
    float x0[NMOM];
    bool any_bad[NMOM];
#pragma unroll
    for (int m = 0; m < NMOM; ++m) {
      const float wl = c.mw[m], xl = c.mx[m];
      const bool kept = wl > 0.f, fin = is_finite(xl);
      const unsigned kf = __ballot_sync(FULL, kept && fin);
      any_bad[m] = __ballot_sync(FULL, kept && !fin) != 0u;
      x0[m] = __shfl_sync(FULL, xl, kf ? __ffs(kf) - 1 : 0);
      if (!kf) x0[m] = 0.f;
      v[ESPER_GLOBAL_SIZE + 3 * m] = kept ? wl : 0.f;
      v[ESPER_GLOBAL_SIZE + 3 * m + 1] = (kept && fin) ? wl * (xl - x0[m]) : 0.f;
      v[ESPER_GLOBAL_SIZE + 3 * m + 2] = (kept && !fin) ? xl : 0.f;
    }
    int idx;
    const float tot = bfly<GLOB_BF>(v, lane, idx);
    if ((lane & (32 / GLOB_BF - 1)) == 0 && idx < ESPER_GLOBAL_SIZE && !bit(kGlobalSkip, idx)) acc[idx] += tot;
    float W[NMOM], S1[NMOM], bad[NMOM], v2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int m = 0; m < NMOM; ++m) {  // (GLOB_BF == 32: lane l holds value l)
      W[m] = __shfl_sync(FULL, tot, ESPER_GLOBAL_SIZE + 3 * m);
      S1[m] = __shfl_sync(FULL, tot, ESPER_GLOBAL_SIZE + 3 * m + 1);
      bad[m] = __shfl_sync(FULL, tot, ESPER_GLOBAL_SIZE + 3 * m + 2);
      const float mean = W[m] > 0.f ? x0[m] + S1[m] / W[m] : 0.f;
      const float d = c.mx[m] - mean;
      v2[m] = (c.mw[m] > 0.f && is_finite(c.mx[m])) ? c.mw[m] * (d * d) : 0.f;
    }
    int idx2;
    const float m2 = bfly<4>(v2, lane, idx2);
#pragma unroll
    for (int m = 0; m < NMOM; ++m) {
      const float M2 = __shfl_sync(FULL, m2, 8 * m);
      if (lane == 0) am[m] = mom_combine(am[m], warp_moment(W[m], S1[m], bad[m], any_bad[m], x0[m], M2));
    }
#endif
  }
  // the butterfly: N values per lane; halving steps over offsets 16, 8, ... leave one value (index idx) per lane,
  // the remaining offsets sum it with the lanes holding the same index. (Compile-time recursion: every array index
  // is a constant, so the values stay in registers.)
  template <int N>
  __device__ __forceinline__ static float bfly(float (&v)[N], int lane, int& idx) {
    idx = 0;
    return bfly_step<N, N, 16>(v, lane, idx);
  }
  template <int N, int n, int o>
  __device__ __forceinline__ static float bfly_step(float (&v)[N], int lane, int& idx) {
    if constexpr (n > 1) {
      const bool hi = (lane & o) != 0;
#pragma unroll
      for (int q = 0; q < n / 2; ++q) {
        // (values first, then the selects: a select between two array elements could become a select of their
        // addresses, and the array would move to local memory)
        const float lo = v[q], up = v[q + n / 2];
        const float mine = __int_as_float(hi ? __float_as_int(up) : __float_as_int(lo));
        const float send = __int_as_float(hi ? __float_as_int(lo) : __float_as_int(up));
        v[q] = mine + __shfl_xor_sync(FULL, send, o);
      }
      idx = idx * 2 + (hi ? 1 : 0);
      return bfly_step<N, n / 2, o / 2>(v, lane, idx);
    } else {
      float x = v[0];
#pragma unroll
      for (int oo = o; oo >= 1; oo >>= 1) x = x + __shfl_xor_sync(FULL, x, oo);
      return x;
    }
  }
};
static_assert(GLOB_BF == 32 && NMOM <= 4, "the global statistics' butterfly: one value per lane; M2 over 4");

struct DevWideX : DevCommon {
  static const int WT = WIDE_THREADS;
  int cl, rank, chunk;
  int buf;  // the cluster fold's slot (alternates)
  float* z;
  float* e;
  uint8_t* u;
  __host__ __device__ float* zp(int col) const { return z + (col - rank * chunk); }
  __host__ __device__ float* ep(int col) const { return e + (col - rank * chunk); }
  __host__ __device__ uint8_t* up(int col) const { return u + (col - rank * chunk); }
  __host__ __device__ bool stats_leader() const {
#ifdef __CUDA_ARCH__
    return rank == 0 && threadIdx.x == 0;
#else
    return false;
#endif
  }
  __host__ __device__ bool is_rank0() const { return rank == 0; }
  template <class F>
  __host__ __device__ void threads(F f) {
#ifdef __CUDA_ARCH__
    f(rank, (int)threadIdx.x);
#endif
  }
  template <class F>
  __host__ __device__ void coop_cluster(F f) {
#ifdef __CUDA_ARCH__
    f(rank * WT + (int)threadIdx.x, cl * WT);
#endif
  }
  // the block tree, then (clusters) each block's result through its own shared memory, folded in rank order
  template <class F, class C>
  __host__ __device__ auto cluster_fold(F f, C c) -> decltype(f(0, 0)) {
    using T = decltype(f(0, 0));
#ifdef __CUDA_ARCH__
    T r = block_tree(f(rank, (int)threadIdx.x), c);
    if (cl == 1) return r;
#if __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    T* slot = reinterpret_cast<T*>(scratch + WIDE_THREADS * FOLD_BYTES + 16 + FOLD_BYTES * buf);
    buf ^= 1;
    if (threadIdx.x == 0) *slot = r;
    cluster.sync();
    T acc = *cluster.map_shared_rank(slot, 0);
    for (int q = 1; q < cl; ++q) acc = c(acc, *cluster.map_shared_rank(slot, q));
    return acc;
#else
    return r;  // (no clusters before sm_90: the plan keeps cl == 1)
#endif
#else
    return T{};
#endif
  }
};

}  // namespace cudaexec
}  // namespace esper

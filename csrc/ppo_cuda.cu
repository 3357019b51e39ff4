// esper_kernels: the one-pass fused PPO loss as CUDA kernels (issue 12). The math and the block bodies are
// csrc/ppo_onepass.h, shared with the host emulation (csrc/ppo_onepass_host.h); this file is the device execution
// policies (threads, barriers, shuffles, the atomic ticket, the cluster's distributed shared memory) and the
// launches. Every launch is on the caller's stream; nothing synchronises with the host.
//
// A training step:
//   prepass_kernel   grid_pre blocks x 256 threads: per-block partials of the normalisers (W, present count, VW,
//                    den_h, the advantage moments); zeroes the tickets of this call.
//   small_kernel     every head <= 32 actions: grid_main blocks (persistent) x R threads (one per row), a tile of R
//                    rows staged in shared memory; the forward (fixup = 0: outputs, gradient for an upstream of 1,
//                    statistics partials, the last block's merge) or the fix-up (fixup = 1).
//   wide_kernel<S>   any head > 32 actions: clusters of CL blocks x 256 threads, one row per cluster at a time
//                    (S: the row's chunk staged in shared memory, else re-read); forward or fix-up as above.
// So a step is three launches: prepass, main (forward), main (fix-up; it returns at once for loss.backward()).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "ppo_cuda.h"
#include "ppo_onepass.h"

namespace esper {
namespace {

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
  // statistic k folded by the 8 lanes k*8 .. k*8+7, lane g over rows g, g + 8, ...; then the xor tree 4, 2, 1
  __host__ __device__ void fold_tile(const float* red, int V, uint32_t mn, uint32_t mx, float* acc) {
#ifdef __CUDA_ARCH__
    __syncthreads();  // red written by every row thread
    const int RS = R + 8;
    const int ntasks = V * NGROUPS;
    for (int base = 0; base < ntasks; base += R) {
      const int t = base + threadIdx.x;
      const int k = t >> 3, g = t & 7;
      const bool valid = t < ntasks;
      const bool a = valid && bit(mn, k), b = valid && bit(mx, k);
      float v = kident(a, b);
      const float* q = red + k * RS;
      if (!valid) {
      } else if (a) {  // one loop per kind (the kind is the task's): the same operations as kcombine
        for (int r = g; r < R; r += NGROUPS) v = q[r] < v ? q[r] : v;
      } else if (b) {
        for (int r = g; r < R; r += NGROUPS) v = q[r] > v ? q[r] : v;
      } else {
        for (int r = g; r < R; r += NGROUPS) v = v + q[r];
      }
#pragma unroll
      for (int o = 4; o >= 1; o >>= 1) v = kcombine(a, b, v, __shfl_xor_sync(FULL, v, o));
      if (valid && g == 0) acc[k] = kcombine(a, b, acc[k], v);
    }
#endif
  }
  __host__ __device__ void fold_tile_mom(const float* redm, Mom* am) {
#ifdef __CUDA_ARCH__
    const int RS = R + 8;
    if (threadIdx.x < 32) {  // NMOM * 8 <= 32 tasks: one warp
      const int m = threadIdx.x >> 3, g = threadIdx.x & 7;
      const bool valid = m < NMOM;
      Mom v{0.f, 0.f, 0.f};
      if (valid)
        for (int r = g; r < R; r += NGROUPS) v = mom_combine(v, mom_point(redm[(2 * m) * RS + r], redm[(2 * m + 1) * RS + r]));
#pragma unroll
      for (int o = 4; o >= 1; o >>= 1) v = mom_combine(v, shfl_xor_t(v, o));
      if (valid && g == 0) am[m] = mom_combine(am[m], v);
    }
#endif
  }
};
static_assert(NMOM * NGROUPS <= 32, "the moments' tile fold runs on one warp");

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

// ---- the kernels: thin wrappers around the shared bodies ----------------------------------------------------
__global__ void __launch_bounds__(WIDE_THREADS) prepass_kernel(const __grid_constant__ PPOParams P,
                                                               const __grid_constant__ OnePass O) {
  extern __shared__ __align__(16) unsigned char smem[];
  DevSmallX x;
  x.scratch = smem;
  x.R = blockDim.x;
  prepass_block(x, P, O, blockIdx.x);
}

// WMAX: the widest head's padded width (a kernel per class: registers follow the widest path compiled in)
template <int WMAX>
__global__ void __launch_bounds__(MAX_TILE_ROWS, WMAX < 32 ? 3 : 2) small_kernel(const __grid_constant__ PPOParams P,
                                                              const __grid_constant__ OnePass O) {
  extern __shared__ __align__(16) unsigned char smem[];
  DevSmallX x;
  x.scratch = smem;
  x.R = blockDim.x;
  const SmallSmem sm = small_carve(smem + EXEC_SCRATCH, P.num_heads, O.rows, O.pitch, O.joint_c != 0,
                                   P.has_mask != 0, O.fixup == 0);
  small_block<WMAX>(x, P, O, sm, blockIdx.x, gridDim.x);
}

template <bool STAGED>
__global__ void __launch_bounds__(WIDE_THREADS, 1) wide_kernel(const __grid_constant__ PPOParams P,
                                                            const __grid_constant__ OnePass O) {
  extern __shared__ __align__(16) unsigned char smem[];
  DevWideX x;
  x.scratch = smem;
  x.cl = O.cluster;
  x.rank = 0;
#if __CUDA_ARCH__ >= 900
  if (O.cluster > 1) x.rank = (int)cg::this_cluster().block_rank();
#endif
  x.chunk = O.chunk;
  x.buf = 0;
  const WideSmem sm = wide_carve(smem + EXEC_SCRATCH, P.num_heads, O.chunk, STAGED, P.has_mask != 0);
  x.z = sm.z;
  x.e = sm.e;
  x.u = sm.u;
  wide_cluster<DevWideX, STAGED>(x, P, O, sm, (int)(blockIdx.x / (unsigned)O.cluster), O.nparts);
#if __CUDA_ARCH__ >= 900
  if (O.cluster > 1) cg::this_cluster().sync();  // no block leaves while another may read its shared memory
#endif
}

__global__ void metrics_kernel(const MetricsCfg c, const float* stats, float* out) { derive_metrics(c, stats, out); }

// ---- host side ----------------------------------------------------------------------------------------------
struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

std::string err_str(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

constexpr int MAX_DEVICES = 64;
std::mutex g_mu;
Machine g_machine[MAX_DEVICES];
bool g_machine_ok[MAX_DEVICES];
int g_smem_set[MAX_DEVICES][5];  // dynamic shared memory already allowed per kernel (small<32>, wide<1>, wide<0>,
                                 // small<8>, small<16>)

std::string machine_of(int device, Machine& M) {
  if (device < 0 || device >= MAX_DEVICES) return "device index out of range";
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_machine_ok[device]) {
    Machine m{};
    cudaError_t e;
    if ((e = cudaDeviceGetAttribute(&m.sm_count, cudaDevAttrMultiProcessorCount, device)) ||
        (e = cudaDeviceGetAttribute(&m.cc_major, cudaDevAttrComputeCapabilityMajor, device)) ||
        (e = cudaDeviceGetAttribute(&m.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) ||
        (e = cudaDeviceGetAttribute(&m.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)))
      return err_str("cudaDeviceGetAttribute", e);
    m.smem_optin -= EXEC_SCRATCH;
    m.max_blocks = 0;
    g_machine[device] = m;
    g_machine_ok[device] = true;
  }
  M = g_machine[device];
  return "";
}

template <class K>
std::string allow_smem(K kernel, int which, int device, int bytes) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_smem_set[device][which] >= bytes) return "";
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return err_str("cudaFuncSetAttribute", e);
  g_smem_set[device][which] = bytes;
  return "";
}

std::string launch_main(const PPOParams& P, const OnePass& O, cudaStream_t stream, int device) {
  const int bytes = O.smem + EXEC_SCRATCH;
  if (O.path == PATH_SMALL) {
    void (*kern)(const PPOParams, const OnePass) =
        O.wmax <= 8 ? small_kernel<8> : (O.wmax <= 16 ? small_kernel<16> : small_kernel<32>);
    const int which = O.wmax <= 8 ? 3 : (O.wmax <= 16 ? 4 : 0);
    if (std::string err = allow_smem(kern, which, device, bytes); !err.empty()) return err;
    kern<<<O.grid_main, O.rows, bytes, stream>>>(P, O);
    if (cudaError_t e = cudaGetLastError()) return err_str("small_kernel launch", e);
    return "";
  }
  const bool staged = O.path == PATH_WIDE;
  void (*kern)(const PPOParams, const OnePass) = staged ? wide_kernel<true> : wide_kernel<false>;
  if (std::string err = allow_smem(kern, staged ? 1 : 2, device, bytes); !err.empty()) return err;
  if (O.cluster == 1) {
    kern<<<O.grid_main, WIDE_THREADS, bytes, stream>>>(P, O);
    if (cudaError_t e = cudaGetLastError()) return err_str("wide_kernel launch", e);
    return "";
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)O.grid_main);
  cfg.blockDim = dim3(WIDE_THREADS);
  cfg.dynamicSmemBytes = (size_t)bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)O.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaError_t e = cudaLaunchKernelEx(&cfg, kern, P, O)) return err_str("wide_kernel cluster launch", e);
  return "";
}

}  // namespace

std::string cuda_status() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return err_str("the CUDA runtime cannot see a device", e);
  if (count == 0) return "no CUDA device";
  return "";
}

std::string cuda_machine(int device, op::Machine& M) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  return machine_of(device, M);
}

std::string cuda_onepass_forward(const PPOParams& P, const op::OnePass& O, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  prepass_kernel<<<O.grid_pre, WIDE_THREADS, EXEC_SCRATCH, stream>>>(P, O);
  if (cudaError_t e = cudaGetLastError()) return err_str("prepass_kernel launch", e);
  return launch_main(P, O, stream, device);
}

std::string cuda_onepass_backward(const PPOParams& P, const op::OnePass& O, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  if (P.n == 0) return "";
  return launch_main(P, O, reinterpret_cast<cudaStream_t>(stream_handle), device);
}

std::string cuda_derive_metrics(const MetricsCfg& c, uintptr_t stats, uintptr_t out, uintptr_t stream_handle,
                                int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  metrics_kernel<<<1, 1, 0, stream>>>(c, reinterpret_cast<const float*>(stats), reinterpret_cast<float*>(out));
  if (cudaError_t e = cudaGetLastError()) return err_str("metrics launch", e);
  return "";
}

}  // namespace esper

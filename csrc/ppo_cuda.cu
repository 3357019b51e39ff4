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
#include "ppo_cuda_exec.cuh"
#include "ppo_onepass.h"

namespace esper {
namespace {

namespace cg = cooperative_groups;
using namespace op;
using namespace cudaexec;

// ---- the kernels: thin wrappers around the shared bodies ----------------------------------------------------
__global__ void __launch_bounds__(WIDE_THREADS)
    prepass_kernel(const __grid_constant__ PPOParams P, const __grid_constant__ OnePass O) {
  extern __shared__ __align__(16) unsigned char smem[];
  DevSmallX x;
  x.scratch = smem;
  x.R = blockDim.x;
  prepass_block(x, P, O, blockIdx.x);
}

// WMAX: the widest head's padded width (a kernel per class: registers follow the widest path compiled in). The
// register cap: ptxas fills whatever it is given; 208 is the lowest tried (176, 192, 208) at which no class spills
// (sm_90, nvcc 13.0): 4 blocks of 64 rows per multiprocessor, about what the shared memory allows anyway
template <int WMAX>
__global__ void __maxnreg__(WMAX < 32 ? 208 : 255)
    small_kernel(const __grid_constant__ PPOParams P, const __grid_constant__ OnePass O) {
  extern __shared__ __align__(16) unsigned char smem[];
  DevSmallX x;
  x.scratch = smem;
  x.R = blockDim.x;
  const SmallSmem sm =
      small_carve(smem + EXEC_SCRATCH, P.num_heads, O.rows, O.pitch, O.joint_c != 0, P.has_mask != 0, O.fixup == 0);
  small_block<WMAX>(x, P, O, sm, blockIdx.x, gridDim.x);
}

template <bool STAGED>
__global__ void __launch_bounds__(WIDE_THREADS, 1)
    wide_kernel(const __grid_constant__ PPOParams P, const __grid_constant__ OnePass O) {
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

using Kern = void (*)(const PPOParams, const OnePass);
// the main kernel of a plan, and its slot in g_smem_set
Kern main_kernel(const OnePass& O, int& which) {
  if (O.path == PATH_SMALL) {
    which = O.wmax <= 8 ? 3 : (O.wmax <= 16 ? 4 : 0);
    return O.wmax <= 8 ? small_kernel<8> : (O.wmax <= 16 ? small_kernel<16> : small_kernel<32>);
  }
  const bool staged = O.path == PATH_WIDE;
  which = staged ? 1 : 2;
  return staged ? wide_kernel<true> : wide_kernel<false>;
}

std::string launch_main(const PPOParams& P, const OnePass& O, cudaStream_t stream, int device) {
  const int bytes = O.smem + EXEC_SCRATCH;
  int which = 0;
  const Kern kern = main_kernel(O, which);
  if (std::string err = allow_smem(kern, which, device, bytes); !err.empty()) return err;
  if (O.path == PATH_SMALL) {
    kern<<<O.grid_main, O.rows, bytes, stream>>>(P, O);
    if (cudaError_t e = cudaGetLastError()) return err_str("small_kernel launch", e);
    return "";
  }
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

std::string cuda_onepass_occupancy(const PPOParams& P, op::OnePass& O, int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  Machine M;
  if (std::string err = machine_of(device, M); !err.empty()) return err;
  int which = 0;
  const Kern kern = main_kernel(O, which);
  const int bytes = O.smem + EXEC_SCRATCH;
  if (std::string err = allow_smem(kern, which, device, bytes); !err.empty()) return err;
  const int threads = O.path == PATH_SMALL ? O.rows : WIDE_THREADS;
  int per_sm = 0;
  if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, (size_t)bytes))
    return err_str("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  if (per_sm < 1) return "the main kernel does not fit on a multiprocessor (registers or shared memory)";
  const int64_t resident = (int64_t)M.sm_count * per_sm;  // blocks the device holds at once
  if (O.path == PATH_SMALL) {
    if (O.grid_main > resident) O.grid_main = O.nparts = (int32_t)resident;
  } else {
    const int64_t ncl = resident / O.cluster < 1 ? 1 : resident / O.cluster;
    if (O.nparts > ncl) {
      O.nparts = (int32_t)ncl;
      O.grid_main = (int32_t)(ncl * O.cluster);
    }
  }
  (void)P;
  return "";
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

// esper_kernels: the fused PPO loss as CUDA kernels. The math is ppo_core.h's (shared with the CPU backend);
// this file only maps rows to threads and reduces deterministically.
//
// Forward (5 launches, all on the caller's stream):
//   fwd_small  heads with A <= SMALL_MAX: a block of TILE_ROWS rows, one thread per row; each head's
//              [TILE_ROWS, A] tile of masked logits is staged through shared memory with coalesced loads
//              (consecutive threads read consecutive elements), then each thread runs the row algorithm
//              over its shared-memory row (odd row pitch: no bank conflicts).
//   fwd_wide   heads with A > SMALL_MAX: one block per (row, wide head), threads stride over the columns,
//              block-wide tree reductions (shuffles, then one warp) in a fixed order.
//   Both write log_probs, entropy and aux = (n << 2 | taken << 1) per (step, head).
//   step       one thread per row, STEP_ROWS rows per block: the per-(step, head) loss terms, joint ratio,
//              value loss, saved coefficients and the block's partial statistics (float64: sums, minima,
//              maxima, and weighted moments by two passes over the block), one row per block in `parts`.
//   reduce     one block per statistics entry merges the partial rows in a fixed tree order (Chan's formula
//              for the moments): no atomics, so the result is bitwise reproducible.
//   losses     one thread: the four losses from the statistics vector.
// Backward (2 launches): bwd_small (same tiling as fwd_small; the gradient tile is staged in shared memory
// and stored coalesced in the logits' dtype; also the values' gradient) and bwd_wide (block per row).
#include <cuda_runtime.h>

#include <string>

#include "ppo_core.h"
#include "ppo_cuda.h"

namespace esper {
namespace {

constexpr int SMALL_MAX = 32;     // widest head read through a shared-memory tile, one thread per row
constexpr int TILE_ROWS = 128;    // rows per block of the small-head kernels
constexpr int TILE_PITCH = SMALL_MAX + 1;
constexpr int WIDE_THREADS = 256;  // threads per row of a wide head
constexpr int STEP_ROWS = CUDA_STEP_ROWS;
constexpr int RED_THREADS = 256;
constexpr unsigned FULL = 0xffffffffu;
constexpr int RED_SMEM = 33 * 16;  // block_reduce scratch (bytes)

static_assert(sizeof(PPOParams) <= 32000, "PPOParams must fit the kernel-parameter limit");
static_assert(STEP_ROWS == 128, "block_reduce_vec assumes 128 threads");

struct HeadList {
  int count;
  int head[ESPER_MAX_HEADS];
};

// ---- generic block reduction of a small trivially-copyable T (float, double, D2, MaxCnt): fixed order ----------
template <class T>
__device__ __forceinline__ T shfl_down_t(T v, int d) {
  constexpr int W = sizeof(T) / 4;
  static_assert(sizeof(T) % 4 == 0, "32-bit words");
  uint32_t w[W];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = __shfl_down_sync(FULL, w[k], d);
  memcpy(&v, w, sizeof(T));
  return v;
}

// every thread of the block must call; `ident` is the identity of `c`; smem: RED_SMEM bytes, 16-aligned
template <class T, class C>
__device__ __forceinline__ T block_reduce(T v, T ident, C c, unsigned char* smem) {
  static_assert(sizeof(T) <= 16, "block_reduce: T too large");
  T* sm = reinterpret_cast<T*>(smem);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = c(v, shfl_down_t(v, d));
  __syncthreads();  // the previous call's result has been read by everyone
  if (lane == 0) sm[wid] = v;
  __syncthreads();
  if (wid == 0) {
    v = lane < nw ? sm[lane] : ident;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v = c(v, shfl_down_t(v, d));
    if (lane == 0) sm[32] = v;
  }
  __syncthreads();
  return sm[32];
}

// one row of one wide head, the whole block striding over its columns
struct BlockRow {
  const PPOParams* P;
  int h;
  int64_t i;
  int A;
  bool present;
  unsigned char* red;  // RED_SMEM bytes of shared memory
  ESPER_HD bool use(int j) const { return present && load_valid(*P, h, i, j); }
  ESPER_HD float zhat(int j) const { return use(j) ? load_logit(*P, h, i, j) : P->mask_fill; }
  template <class T, class F, class C>
  ESPER_HD T reduce(T acc, F f, C c) const {
#ifdef __CUDA_ARCH__
    T loc = acc;
    for (int j = threadIdx.x; j < A; j += blockDim.x) loc = c(loc, f(j));
    return block_reduce(loc, acc, c, red);
#else
    return acc;
#endif
  }
  template <class F>
  ESPER_HD void for_each(F f) const {
#ifdef __CUDA_ARCH__
    for (int j = threadIdx.x; j < A; j += blockDim.x) f(j);
#endif
  }
  ESPER_HD void store(int j, float v) const { store_elem(P->grads[h], i * P->grads_rs[h] + j, P->logits_dtype, v); }
};

__device__ __forceinline__ int32_t pack_aux(const RowFwd& rf) { return ((int32_t)rf.n << 2) | (rf.taken ? 2 : 0); }

// stage the [TILE_ROWS, A] tile of head h (masked logits, valid flags) into shared memory
__device__ __forceinline__ void stage_tile(const PPOParams& P, int h, int64_t row0, const uint8_t* pres, float* zt,
                                           uint8_t* ut) {
  const int A = P.sizes[h];
  const float fill = P.mask_fill;
  for (int e = threadIdx.x; e < TILE_ROWS * A; e += blockDim.x) {
    const int r = e / A, j = e - r * A;
    const int64_t i = row0 + r;
    bool u = false;
    float z = fill;
    if (pres[r]) {
      u = load_valid(P, h, i, j);
      if (u) z = load_logit(P, h, i, j);
    }
    zt[r * TILE_PITCH + j] = z;
    ut[r * TILE_PITCH + j] = u;
  }
}

// ---- forward ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(TILE_ROWS) fwd_small_kernel(const __grid_constant__ PPOParams P, int32_t* aux,
                                                              const HeadList heads) {
  __shared__ float zt[TILE_ROWS * TILE_PITCH];
  __shared__ uint8_t ut[TILE_ROWS * TILE_PITCH];
  __shared__ uint8_t pres[TILE_ROWS];
  const int H = P.num_heads;
  const int r = threadIdx.x;
  const int64_t row0 = (int64_t)blockIdx.x * TILE_ROWS, i = row0 + r;
  const bool row_ok = i < P.n;
  StepIn s{false, 0.f, 0.f, 0.f};
  if (row_ok) s = load_step(P, i);
  pres[r] = s.present;
  float* logp = reinterpret_cast<float*>(P.log_probs);
  float* ent = reinterpret_cast<float*>(P.entropy);
  for (int k = 0; k < heads.count; ++k) {
    const int h = heads.head[k];
    __syncthreads();
    stage_tile(P, h, row0, pres, zt, ut);
    __syncthreads();
    if (!row_ok) continue;
    RowFwd rf{0.f, 0.f, 0.f, false};
    if (s.present) {
      const HeadIn hi = load_head(P, h, i, true);
      BufRow row{zt + r * TILE_PITCH, ut + r * TILE_PITCH, nullptr, P.sizes[h]};
      rf = row_forward(row, row_in(P, h, hi));
    }
    logp[i * H + h] = rf.ell;
    ent[i * H + h] = rf.ent;
    aux[i * H + h] = pack_aux(rf);
  }
}

__global__ void __launch_bounds__(WIDE_THREADS) fwd_wide_kernel(const __grid_constant__ PPOParams P, int32_t* aux,
                                                                const HeadList heads) {
  __shared__ __align__(16) unsigned char red[RED_SMEM];
  const int H = P.num_heads;
  const int h = heads.head[blockIdx.y];
  const int64_t i = blockIdx.x;
  const StepIn s = load_step(P, i);
  RowFwd rf{0.f, 0.f, 0.f, false};
  if (s.present) {  // uniform over the block
    const HeadIn hi = load_head(P, h, i, true);
    BlockRow row{&P, h, i, P.sizes[h], true, red};
    rf = row_forward(row, row_in(P, h, hi));
  }
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(P.log_probs)[i * H + h] = rf.ell;
    reinterpret_cast<float*>(P.entropy)[i * H + h] = rf.ent;
    aux[i * H + h] = pack_aux(rf);
  }
}

// reduce NV per-thread values (STEP_ROWS threads) by their kinds into out[0..NV); every thread must call
// red: 32 * STEP_ROWS doubles of shared memory
template <int NV, class KF>
__device__ __forceinline__ void block_reduce_vec(const double* c, KF kind_of, double* out, double* red) {
  constexpr int NP = NV <= 16 ? 16 : 32;  // padded count of values
  constexpr int G = STEP_ROWS / NP;       // threads per value (8 or 4), an aligned group of lanes
  constexpr int L = STEP_ROWS / G;        // values each of them folds serially
  __syncthreads();  // a previous call is done reading
#pragma unroll
  for (int k = 0; k < NV; ++k) red[k * STEP_ROWS + threadIdx.x] = c[k];
  __syncthreads();
  const int k = threadIdx.x / G, part = threadIdx.x % G;
  const int kind = k < NV ? kind_of(k) : KIND_SUM;
  double v = kind_init(kind);
  if (k < NV)
    for (int q = part * L; q < (part + 1) * L; ++q) v = kind_combine(kind, v, red[k * STEP_ROWS + q]);
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = kind_combine(kind, v, __shfl_xor_sync(FULL, v, off));
  if (k < NV && part == 0) out[k] = v;
}

struct HeadKindF {
  __device__ int operator()(int k) const { return head_kind(k); }
};
struct GlobalKindF {
  __device__ int operator()(int k) const { return global_kind(k); }
};
struct SumKindF {
  __device__ int operator()(int) const { return KIND_SUM; }
};

__global__ void __launch_bounds__(STEP_ROWS) step_kernel(const __grid_constant__ PPOParams P, const int32_t* aux,
                                                         double* parts) {
  const int H = P.num_heads;
  const int K = ESPER_GLOBAL_SIZE + H * ESPER_HEAD_SIZE;
  const int64_t i = (int64_t)blockIdx.x * STEP_ROWS + threadIdx.x;
  const bool row_ok = i < P.n;
  __shared__ double red[32 * STEP_ROWS];
  double* part = parts + (int64_t)blockIdx.x * K;
  const float* logp = reinterpret_cast<const float*>(P.log_probs);
  const float* ent = reinterpret_cast<const float*>(P.entropy);
  float* saved = reinterpret_cast<float*>(P.saved);
  StepIn s{false, 0.f, 0.f, 0.f};
  if (row_ok) s = load_step(P, i);
  float Lsum = 0.f;
  uint32_t flags = 0;
  double c[GX_SIZE];
  for (int h = 0; h < H; ++h) {
    if (row_ok) {
      const HeadIn hi = load_head(P, h, i, s.present);
      const int32_t ax = aux[i * H + h];
      const RowFwd rf{logp[i * H + h], ent[i * H + h], (float)(ax >> 2), (ax & 2) != 0};
      const HeadStep hs = head_step(P, h, i, s, hi, rf, c);
      Lsum += hs.lr;
      if (P.per_head) saved[i * (H + 1) + h] = hs.u;
      else if (hs.flag) flags |= 1u << h;
    } else {
      for (int k = 0; k < ESPER_HEAD_SIZE; ++k) c[k] = kind_init(head_kind(k));
    }
    block_reduce_vec<ESPER_HEAD_SIZE>(c, HeadKindF(), part + ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE, red);
  }
  GlobalStep g;
  if (row_ok) {
    g = global_step(P, i, s, Lsum, c);
    reinterpret_cast<float*>(P.joint_ratio)[i] = g.r;
    if (!P.per_head)
      for (int h = 0; h < H; ++h) saved[i * (H + 1) + h] = ((flags >> h) & 1u) ? g.base : 0.f;
    saved[i * (H + 1) + H] = g.vsaved;
  } else {
    for (int k = 0; k < GX_SIZE; ++k) c[k] = kind_init(global_kind(k));
    for (int m = 0; m < 3; ++m) g.x[m] = g.xw[m] = 0.f;
  }
  __shared__ double gsum[GX_SIZE];
  block_reduce_vec<GX_SIZE>(c, GlobalKindF(), gsum, red);
  __syncthreads();
  // second pass of the moments: M2 about the block's mean
  double mean[3], d2[3];
  for (int m = 0; m < 3; ++m) {
    int wi, mi, qi, lo, hi;
    moment_slots(m, wi, mi, qi, lo, hi);
    mean[m] = moment_mean(gsum[wi], gsum[mi], gsum[lo], gsum[hi]);
    const double d = (double)g.x[m] - mean[m];
    d2[m] = g.xw[m] > 0.f ? (double)g.xw[m] * d * d : 0.0;
  }
  __shared__ double m2[3];
  block_reduce_vec<3>(d2, SumKindF(), m2, red);
  __syncthreads();
  if (threadIdx.x < ESPER_GLOBAL_SIZE) {
    const int k = threadIdx.x;
    double v = gsum[k];
    for (int m = 0; m < 3; ++m) {
      int wi, mi, qi, lo, hi;
      moment_slots(m, wi, mi, qi, lo, hi);
      if (k == mi) v = mean[m];
      if (k == qi) v = m2[m];
    }
    part[k] = v;
  }
}

__global__ void __launch_bounds__(RED_THREADS) reduce_kernel(const __grid_constant__ PPOParams P, const double* parts,
                                                             int64_t nparts) {
  const int H = P.num_heads;
  const int K = ESPER_GLOBAL_SIZE + H * ESPER_HEAD_SIZE;
  const int k = blockIdx.x;
  const int t = threadIdx.x;
  __shared__ double sw[RED_THREADS], sm[RED_THREADS], sq[RED_THREADS];
  int moment = -1, wi = 0, mi = 0, qi = 0, lo, hi;
  for (int m = 0; m < 3; ++m) {
    int a, b, c2;
    moment_slots(m, a, b, c2, lo, hi);
    if (k == b || k == c2) {
      moment = m;
      wi = a;
      mi = b;
      qi = c2;
    }
  }
  float* stats = reinterpret_cast<float*>(P.stats);
  if (moment >= 0) {
    double w = 0.0, mean = 0.0, q = 0.0;
    for (int64_t p = t; p < nparts; p += RED_THREADS)
      chan_merge(w, mean, q, parts[p * K + wi], parts[p * K + mi], parts[p * K + qi]);
    sw[t] = w;
    sm[t] = mean;
    sq[t] = q;
    __syncthreads();
    for (int s = RED_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) chan_merge(sw[t], sm[t], sq[t], sw[t + s], sm[t + s], sq[t + s]);
      __syncthreads();
    }
    if (t == 0) stats[k] = (float)(k == mi ? sm[0] : sq[0]);
  } else {
    const int kind = stat_kind(k);
    double v = kind_init(kind);
    for (int64_t p = t; p < nparts; p += RED_THREADS) v = kind_combine(kind, v, parts[p * K + k]);
    sw[t] = v;
    __syncthreads();
    for (int s = RED_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) sw[t] = kind_combine(kind, sw[t], sw[t + s]);
      __syncthreads();
    }
    if (t == 0) stats[k] = (float)sw[0];
  }
}

__global__ void metrics_kernel(const MetricsCfg c, const float* stats, float* out) { derive_metrics(c, stats, out); }

__global__ void losses_kernel(const __grid_constant__ PPOParams P) {
  losses_from_stats(P, reinterpret_cast<const float*>(P.stats), reinterpret_cast<float*>(P.losses));
}

// ---- backward -----------------------------------------------------------------------------------------
__global__ void __launch_bounds__(TILE_ROWS) bwd_small_kernel(const __grid_constant__ PPOParams P,
                                                              const HeadList heads) {
  __shared__ float zt[TILE_ROWS * TILE_PITCH];
  __shared__ float gt[TILE_ROWS * TILE_PITCH];
  __shared__ uint8_t ut[TILE_ROWS * TILE_PITCH];
  __shared__ uint8_t pres[TILE_ROWS];
  const int r = threadIdx.x;
  const int64_t row0 = (int64_t)blockIdx.x * TILE_ROWS, i = row0 + r;
  const bool row_ok = i < P.n;
  const float* st = reinterpret_cast<const float*>(P.stats);
  const GradScal gs = grad_scalars(P);
  StepIn s{false, 0.f, 0.f, 0.f};
  if (row_ok) s = load_step(P, i);
  pres[r] = s.present;
  if (row_ok && P.has_values && P.grad_values) reinterpret_cast<float*>(P.grad_values)[i] = value_grad(P, st, gs, i);
  for (int k = 0; k < heads.count; ++k) {
    const int h = heads.head[k];
    const int A = P.sizes[h];
    __syncthreads();
    stage_tile(P, h, row0, pres, zt, ut);
    __syncthreads();
    if (row_ok && s.present) {
      const HeadIn hi = load_head(P, h, i, true);
      float gL, gE;
      head_grads(P, st, gs, h, i, s, hi, gL, gE);
      BufRow row{zt + r * TILE_PITCH, ut + r * TILE_PITCH, gt + r * TILE_PITCH, A};
      row_backward(row, row_in(P, h, hi), gL, gE);
    } else {
      for (int j = 0; j < A; ++j) gt[r * TILE_PITCH + j] = 0.f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TILE_ROWS * A; e += blockDim.x) {
      const int rr = e / A, j = e - rr * A;
      const int64_t ii = row0 + rr;
      if (ii < P.n) store_elem(P.grads[h], ii * P.grads_rs[h] + j, P.logits_dtype, gt[rr * TILE_PITCH + j]);
    }
  }
}

__global__ void __launch_bounds__(WIDE_THREADS) bwd_wide_kernel(const __grid_constant__ PPOParams P,
                                                                const HeadList heads) {
  __shared__ __align__(16) unsigned char red[RED_SMEM];
  const int h = heads.head[blockIdx.y];
  const int64_t i = blockIdx.x;
  const StepIn s = load_step(P, i);
  BlockRow row{&P, h, i, P.sizes[h], s.present, red};
  if (!s.present) {  // uniform over the block
    row.for_each([&](int j) { row.store(j, 0.f); });
    return;
  }
  const HeadIn hi = load_head(P, h, i, true);
  float gL, gE;
  head_grads(P, reinterpret_cast<const float*>(P.stats), grad_scalars(P), h, i, s, hi, gL, gE);
  row_backward(row, row_in(P, h, hi), gL, gE);
}

// ---- host side ----------------------------------------------------------------------------------------
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

void split_heads(const PPOParams& P, HeadList& small, HeadList& wide) {
  small.count = wide.count = 0;
  for (int h = 0; h < P.num_heads; ++h) {
    if (P.sizes[h] <= SMALL_MAX) small.head[small.count++] = h;
    else wide.head[wide.count++] = h;
  }
}

}  // namespace

std::string cuda_status() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return err_str("the CUDA runtime cannot see a device", e);
  if (count == 0) return "no CUDA device";
  return "";
}

std::string cuda_forward(const PPOParams& P, const CudaScratch& S, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t N = P.n;
  const int K = stats_size(P.num_heads);
  const int64_t nparts = (N + STEP_ROWS - 1) / STEP_ROWS;
  int32_t* aux = reinterpret_cast<int32_t*>(S.aux);
  double* parts = reinterpret_cast<double*>(S.parts);
  HeadList small, wide;
  split_heads(P, small, wide);
  if (N > 0) {
    if (small.count > 0) {
      fwd_small_kernel<<<(unsigned)((N + TILE_ROWS - 1) / TILE_ROWS), TILE_ROWS, 0, stream>>>(P, aux, small);
      if (cudaError_t e = cudaGetLastError()) return err_str("fwd_small launch", e);
    }
    if (wide.count > 0) {
      if (N > 0x7fffffffLL) return "too many rows for the wide-head kernel";
      fwd_wide_kernel<<<dim3((unsigned)N, (unsigned)wide.count), WIDE_THREADS, 0, stream>>>(P, aux, wide);
      if (cudaError_t e = cudaGetLastError()) return err_str("fwd_wide launch", e);
    }
    step_kernel<<<(unsigned)nparts, STEP_ROWS, 0, stream>>>(P, aux, parts);
    if (cudaError_t e = cudaGetLastError()) return err_str("step launch", e);
  }
  reduce_kernel<<<K, RED_THREADS, 0, stream>>>(P, parts, nparts);
  if (cudaError_t e = cudaGetLastError()) return err_str("reduce launch", e);
  losses_kernel<<<1, 1, 0, stream>>>(P);
  if (cudaError_t e = cudaGetLastError()) return err_str("losses launch", e);
  return "";
}

std::string cuda_backward(const PPOParams& P, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return err_str("cudaSetDevice", guard.err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t N = P.n;
  if (N == 0) return "";
  HeadList small, wide;
  split_heads(P, small, wide);
  bwd_small_kernel<<<(unsigned)((N + TILE_ROWS - 1) / TILE_ROWS), TILE_ROWS, 0, stream>>>(P, small);
  if (cudaError_t e = cudaGetLastError()) return err_str("bwd_small launch", e);
  if (wide.count > 0) {
    if (N > 0x7fffffffLL) return "too many rows for the wide-head kernel";
    bwd_wide_kernel<<<dim3((unsigned)N, (unsigned)wide.count), WIDE_THREADS, 0, stream>>>(P, wide);
    if (cudaError_t e = cudaGetLastError()) return err_str("bwd_wide launch", e);
  }
  return "";
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

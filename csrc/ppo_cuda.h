// esper_kernels: host entry points of the CUDA backend (compiled only when nvcc is found).
#pragma once

#include <string>

#include "ppo_metrics.h"
#include "ppo_params.h"

namespace esper {

// rows per block of the per-step kernel: the caller allocates ceil(n / CUDA_STEP_ROWS) x K float64 partials
constexpr int CUDA_STEP_ROWS = 128;

// scratch the caller (Python, through torch's allocator) provides
struct CudaScratch {
  uintptr_t aux;    // int32 [N, H]
  uintptr_t parts;  // float64 [ceil(N / CUDA_STEP_ROWS), K]
};

// "" when a CUDA device can run the kernels, else why not
std::string cuda_status();
// both launch on `stream` (a cudaStream_t as an integer) under `device`; they return an error message or ""
std::string cuda_forward(const PPOParams& P, const CudaScratch& S, uintptr_t stream, int device);
std::string cuda_backward(const PPOParams& P, uintptr_t stream, int device);
// the metric table (float32 [metrics_size(H)]) of a float32 statistics vector, one thread of one block
std::string cuda_derive_metrics(const MetricsCfg& c, uintptr_t stats, uintptr_t out, uintptr_t stream, int device);

}  // namespace esper

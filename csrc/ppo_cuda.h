// esper_kernels: host entry points of the CUDA backend (compiled only when nvcc is found).
#pragma once

#include <string>

#include "ppo_metrics.h"
#include "ppo_onepass.h"
#include "ppo_params.h"

namespace esper {

// "" when a CUDA device can run the kernels, else why not
std::string cuda_status();
// the device's multiprocessors, compute capability and shared-memory limits (cached per device)
std::string cuda_machine(int device, op::Machine& M);
// the plan's main grid capped at the blocks the device holds at once (the kernel's registers and shared memory,
// cudaOccupancyMaxActiveBlocksPerMultiprocessor): the persistent blocks all run together
std::string cuda_onepass_occupancy(const PPOParams& P, op::OnePass& O, int device);
// every launch is on `stream` (a cudaStream_t as an integer) under `device`; each returns an error message or "".
// forward: the pre-pass and the main kernel (O planned with fixup = 0); backward: the fix-up (fixup = 1)
std::string cuda_onepass_forward(const PPOParams& P, const op::OnePass& O, uintptr_t stream, int device);
std::string cuda_onepass_backward(const PPOParams& P, const op::OnePass& O, uintptr_t stream, int device);
// the metric table (float32 [metrics_size(H)]) of a float32 statistics vector, one thread of one block
std::string cuda_derive_metrics(const MetricsCfg& c, uintptr_t stats, uintptr_t out, uintptr_t stream, int device);

}  // namespace esper

// esper_kernels: host entry points of the CPU backend.
#pragma once

#include "ppo_params.h"

namespace esper {

// forward: losses, log_probs, entropy, joint_ratio, stats and saved; nthreads >= 1. saved holds N * (2H + 1)
// floats: the [N, H + 1] coefficients of PPOParams, then the [N, H] log-sum-exp of each (step, head) that the
// backward's AVX-512 path reads (CpuBackend.saved_shape).
// vectorise: heads of at most 32 actions run 16 rows at a time in SIMD lanes (AVX-512 where the CPU has it,
// floored heads included; without AVX-512 only heads without a floor: within float32 rounding of the row
// path, not bitwise; false forces the row-by-row path,
// which the CUDA kernels share); wider heads without a floor run one row at a time with 16 columns per
// AVX-512 vector (also within float32 rounding of the row path)
void cpu_forward(const PPOParams& P, int nthreads, bool vectorise = true);
// backward: grads (logits dtype) and grad_values from stats, saved and the incoming gradients
void cpu_backward(const PPOParams& P, int nthreads, bool vectorise = true);

}  // namespace esper

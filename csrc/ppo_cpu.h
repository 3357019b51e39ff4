// esper_kernels: host entry points of the CPU backend.
#pragma once

#include "ppo_params.h"

namespace esper {

// forward: losses, log_probs, entropy, joint_ratio, stats and saved (see PPOParams); nthreads >= 1.
// vectorise: heads of at most 32 actions without a floor run 16 rows at a time in SIMD lanes (bitwise the
// same results as the row-by-row path, which the CUDA kernels share; false forces the row-by-row path)
void cpu_forward(const PPOParams& P, int nthreads, bool vectorise = true);
// backward: grads (logits dtype) and grad_values from stats, saved and the incoming gradients
void cpu_backward(const PPOParams& P, int nthreads, bool vectorise = true);

}  // namespace esper

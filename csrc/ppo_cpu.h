// esper_kernels: host entry points of the CPU backend.
#pragma once

#include "ppo_params.h"

namespace esper {

// forward: losses, log_probs, entropy, joint_ratio, stats and saved; nthreads >= 1. saved holds N * (3H + 1)
// floats: the [N, H + 1] coefficients of PPOParams, then the [N, H] row maxima m and the [N, H] log sum exp(z - m)
// of each (step, head), which the backward's AVX-512 paths read (CpuBackend.saved_shape). With normalize_adv, a
// pre-pass normalises the advantages first (bitwise the same for any thread count).
// vectorise: heads of at most 32 actions run 16 rows at a time in SIMD lanes (AVX-512 where the CPU has it,
// floored heads included; without AVX-512 only heads without a floor, bitwise the row path's results); false
// forces the row-by-row path, which the CUDA kernels share; wider heads without a floor run one row at a time with
// 16 columns per AVX-512 vector (within float32 rounding of the row path). ESPER_KERNELS_CPU_AVX512=0 in the
// environment keeps a CPU with AVX-512 on the other paths (csrc/cpu/driver.cpp).
void cpu_forward(const PPOParams& P, int nthreads, bool vectorise = true);
// backward: grads (logits dtype) and grad_values from stats, saved and the incoming gradients
void cpu_backward(const PPOParams& P, int nthreads, bool vectorise = true);

}  // namespace esper

// esper_kernels: the plain parameter block of one fused PPO-loss call (flash-attention style).
//
// Everything a kernel needs: raw data pointers (as integers, so the same struct is filled from Python and
// passed by value to a CUDA kernel), element strides, dtypes, sizes and the resolved config. Per-head inputs
// are read in place through per-head pointer tables: packed [N, S] logits give H pointers into one buffer
// (base + column offset, one common row stride), separate [N, A_h] tensors give H independent pointers and
// strides. No torch types anywhere: the extension never links libtorch.
#pragma once

#include <stdint.h>

#include "ppo_layout.h"  // generated from esper_kernels/schema.py at build time (the statistics layout)

#define ESPER_MAX_HEADS 32

namespace esper {

// element types (esper_kernels/backends/native.py mirrors these codes)
enum DType : int32_t {
  DT_F32 = 0,
  DT_F16 = 1,
  DT_BF16 = 2,
  DT_F64 = 3,
  DT_U8 = 4,  // bool or uint8
  DT_I32 = 5,
  DT_I64 = 6,
};

// the statistics vector (esper_kernels/schema.py): G_<NAME> indexes the global block, HD_<NAME> a head's block
enum GlobalStat : int32_t {
#define ESPER_X(NAME, KIND) G_##NAME,
  ESPER_GLOBAL_STATS(ESPER_X)
#undef ESPER_X
      G_COUNT_
};
enum HeadStat : int32_t {
#define ESPER_X(NAME, KIND) HD_##NAME,
  ESPER_HEAD_STATS(ESPER_X)
#undef ESPER_X
      HD_COUNT_
};
static_assert(G_COUNT_ == ESPER_GLOBAL_SIZE, "global statistics layout");
static_assert(HD_COUNT_ == ESPER_HEAD_SIZE, "per-head statistics layout");

// each statistic's merge kind (ESPER_KIND_*), from the schema
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline int global_stat_kind(int k) {
  switch (k) {
#define ESPER_X(NAME, KIND) \
  case G_##NAME:            \
    return KIND;
    ESPER_GLOBAL_STATS(ESPER_X)
#undef ESPER_X
  }
  return -1;
}
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline int head_stat_kind(int k) {
  switch (k) {
#define ESPER_X(NAME, KIND) \
  case HD_##NAME:           \
    return KIND;
    ESPER_HEAD_STATS(ESPER_X)
#undef ESPER_X
  }
  return -1;
}

// a strided vector [N] (or one column of an [N, H] tensor): element i at ptr + i * stride (elements);
// ptr == 0 means "not given"
struct Vec {
  uintptr_t ptr;
  int64_t stride;
  int32_t dtype;
  int32_t pad_;
};

// a strided matrix [N, H] (incoming gradients of log_probs / entropy)
struct Mat {
  uintptr_t ptr;
  int64_t stride0;
  int64_t stride1;
  int32_t dtype;
  int32_t pad_;
};

struct PPOParams {
  // ---- sizes
  int64_t n;          // rows (steps)
  int32_t num_heads;  // H <= ESPER_MAX_HEADS
  int32_t max_size;   // max_h A_h (set by the binding from sizes)

  // ---- flags
  int32_t logits_dtype;  // DT_F32 / DT_F16 / DT_BF16 (gradients are stored in this dtype)
  int32_t has_mask;
  int32_t has_rel;
  int32_t per_head;      // surrogate == "per_head"
  int32_t adv_per_head;  // advantages [N, H]
  int32_t normalize_entropy;
  int32_t has_values;
  int32_t has_vclip;         // value_clip finite and old_values given
  int32_t has_jclamp;        // joint_log_ratio_clamp finite
  int32_t mask_exclude;      // config.mask_fill is None: invalid actions are excluded from max and sum (else filled)
  int32_t normalize_adv;     // normalize_advantages: the kernels normalise A over present steps (pre-pass)
  int32_t adv_std_unbiased;  // advantage_std == "unbiased": std^2 = M2 / W * n / (n - 1), n present steps
  int32_t adv_eps_add;       // advantage_eps_add: (A - mean) / (std + eps), else / max(std, eps)
  int32_t pad0_;

  // ---- config (float32, as the reference uses them)
  float eps_low, eps_high;  // clip range [1 - eps_low, 1 + eps_high]
  float log_clamp;          // C
  float joint_clamp;        // Cj (when has_jclamp)
  float entropy_coef, value_coef;
  float value_clip;  // d (when has_vclip)
  float mask_fill;   // F; -inf when mask_exclude
  float adv_eps;     // advantage_eps (when normalize_adv)
  float pad1_;

  // ---- per head
  int32_t sizes[ESPER_MAX_HEADS];
  float floor[ESPER_MAX_HEADS];       // prob_floor (<= 0: off)
  float kcoef[ESPER_MAX_HEADS];       // entropy_coef_per_head
  uintptr_t logits[ESPER_MAX_HEADS];  // element (i, j) of head h at logits[h] + (i * logits_rs[h] + j) * elt
  int64_t logits_rs[ESPER_MAX_HEADS];
  uintptr_t masks[ESPER_MAX_HEADS];  // uint8 (bool viewed as uint8); when has_mask
  int64_t masks_rs[ESPER_MAX_HEADS];
  uintptr_t grads[ESPER_MAX_HEADS];  // backward output, logits dtype
  int64_t grads_rs[ESPER_MAX_HEADS];
  Vec actions[ESPER_MAX_HEADS];  // int32 / int64
  Vec old_lp[ESPER_MAX_HEADS];
  Vec rel[ESPER_MAX_HEADS];  // when has_rel
  Vec adv[ESPER_MAX_HEADS];  // per head (adv_per_head) or the same column H times

  // ---- per step
  Vec weights;                                     // ptr 0: all 1
  Vec values, returns, old_values, value_weights;  // value_weights ptr 0: the weights

  // ---- forward outputs (float32, contiguous)
  uintptr_t losses;       // [4]: loss, policy_loss, entropy_loss, value_loss
  uintptr_t log_probs;    // [N, H]
  uintptr_t entropy;      // [N, H]
  uintptr_t joint_ratio;  // [N]
  uintptr_t stats;        // [GLOBAL_SIZE + H * HEAD_SIZE]
  uintptr_t saved;        // [N, H + 1]: unnormalised dPL/d ell_ih, then unnormalised dVL/dv_i
  uintptr_t adv_norm;     // float32 [2 * columns] scratch: (mean, denominator) per advantage column (pre-pass)

  // ---- backward inputs / outputs
  Vec grad_losses;        // [4] (ptr 0: none)
  Mat grad_log_probs;     // [N, H] (ptr 0: none)
  Mat grad_entropy;       // [N, H] (ptr 0: none)
  uintptr_t grad_values;  // [N] float32 (when has_values)
};

inline int stats_size(int num_heads) { return ESPER_GLOBAL_SIZE + num_heads * ESPER_HEAD_SIZE; }

}  // namespace esper

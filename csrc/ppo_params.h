// esper_kernels: the plain parameter block of one fused PPO-loss call (flash-attention style).
//
// Everything a kernel needs: raw data pointers (as integers, so the same struct is filled from Python and
// passed by value to a CUDA kernel), element strides, dtypes, sizes and the resolved config. Per-head inputs
// are read in place through per-head pointer tables: packed [N, S] logits give H pointers into one buffer
// (base + column offset, one common row stride), separate [N, A_h] tensors give H independent pointers and
// strides. No torch types anywhere: the extension never links libtorch.
#pragma once

#include <stdint.h>

#define ESPER_MAX_HEADS 32
#define ESPER_GLOBAL_SIZE 22  // esper_kernels.stats.GLOBAL_SIZE
#define ESPER_HEAD_SIZE 16    // esper_kernels.stats.HEAD_SIZE

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

// statistics layout (esper_kernels/stats.py; checked against it at import by native.py)
enum GlobalStat : int32_t {
  G_STEPS = 0, G_WEIGHT, G_POLICY_NUM, G_KL_K3, G_KL_K1, G_CLIP, G_CLIP_POS, G_CLIP_NEG, G_RATIO_MEAN,
  G_RATIO_M2, G_RATIO_MIN, G_RATIO_MAX, G_BAD_WEIGHTS, G_VALUE_STEPS, G_VALUE_WEIGHT, G_VALUE_NUM,
  G_VALUE_CLIP, G_RETURN_MEAN, G_RETURN_M2, G_RESID_MEAN, G_RESID_M2, G_BAD_VALUE_WEIGHTS,
};
enum HeadStat : int32_t {
  HD_REL_WEIGHT = 0, HD_POLICY_NUM, HD_ENTROPY_NUM, HD_KL_NUM, HD_CLIP_NUM, HD_RATIO_MAX, HD_LOGP_MIN,
  HD_LOGP_MAX, HD_NONFINITE, HD_EMPTY_MASK, HD_INVALID_ACTION, HD_VALID_MIN, HD_VALID_MAX, HD_VALID_SUM,
  HD_SINGLE, HD_LEARNABLE,
};

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
  int32_t max_size;   // max_h A_h

  // ---- flags
  int32_t logits_dtype;  // DT_F32 / DT_F16 / DT_BF16 (gradients are stored in this dtype)
  int32_t has_mask;
  int32_t has_rel;
  int32_t per_head;      // surrogate == "per_head"
  int32_t adv_per_head;  // advantages [N, H]
  int32_t normalize_entropy;
  int32_t has_values;
  int32_t has_vclip;  // value_clip finite and old_values given
  int32_t has_jclamp;  // joint_log_ratio_clamp finite
  int32_t pad0_;

  // ---- config (float32, as the reference uses them)
  float eps_low, eps_high;  // clip range [1 - eps_low, 1 + eps_high]
  float log_clamp;          // C
  float joint_clamp;        // Cj (when has_jclamp)
  float entropy_coef, value_coef, value_clip, mask_fill;

  // ---- per head
  int32_t sizes[ESPER_MAX_HEADS];
  float floor[ESPER_MAX_HEADS];  // prob_floor (<= 0: off)
  float kcoef[ESPER_MAX_HEADS];  // entropy_coef_per_head
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
  Vec weights;  // ptr 0: all 1
  Vec values, returns, old_values, value_weights;  // value_weights ptr 0: the weights

  // ---- forward outputs (float32, contiguous)
  uintptr_t losses;       // [4]: loss, policy_loss, entropy_loss, value_loss
  uintptr_t log_probs;    // [N, H]
  uintptr_t entropy;      // [N, H]
  uintptr_t joint_ratio;  // [N]
  uintptr_t stats;        // [GLOBAL_SIZE + H * HEAD_SIZE]
  uintptr_t saved;        // [N, H + 1]: unnormalised dPL/d ell_ih, then unnormalised dVL/dv_i

  // ---- backward inputs / outputs
  Vec grad_losses;     // [4] (ptr 0: none)
  Mat grad_log_probs;  // [N, H] (ptr 0: none)
  Mat grad_entropy;    // [N, H] (ptr 0: none)
  uintptr_t grad_values;  // [N] float32 (when has_values)
};

inline int stats_size(int num_heads) { return ESPER_GLOBAL_SIZE + num_heads * ESPER_HEAD_SIZE; }

}  // namespace esper

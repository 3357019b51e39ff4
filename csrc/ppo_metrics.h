// esper_kernels: the metric table from the merged statistics vector, on the host or in one GPU thread.
//
// The same table, in the same order and with the same float32 operations, as _derive_table in
// esper_kernels/metrics.py (the test suite holds them together): every metric is
// gated(num, den, gate) = gate > 0 ? num / den : NaN, so a mean without data is NaN, never 0.
#pragma once

#include "ppo_core.h"

namespace esper {

constexpr int N_GLOBAL_METRICS = 23;  // esper_kernels.metrics.GLOBAL_METRICS
constexpr int N_HEAD_METRICS = 13;    // esper_kernels.metrics.HEAD_METRICS (metric-major: m * H + h)

ESPER_HD int metrics_size(int num_heads) { return N_GLOBAL_METRICS + N_HEAD_METRICS * num_heads; }

ESPER_HD float gated(float num, float den, float gate) { return gate > 0.f ? num / den : f_nan(); }
// torch.amin / amax: NaN propagates
ESPER_HD float nan_min(float a, float b) { return (a != a || b != b) ? f_nan() : (b < a ? b : a); }
ESPER_HD float nan_max(float a, float b) { return (a != a || b != b) ? f_nan() : (b > a ? b : a); }

// What the table needs besides the statistics (the fields of PPOParams it reads).
struct MetricsCfg {
  int32_t num_heads;
  int32_t per_head;    // surrogate == "per_head"
  int32_t has_values;  // values and returns were given
  int32_t has_vclip;   // value clipping on
  float entropy_coef, value_coef;
  float kcoef[ESPER_MAX_HEADS];  // entropy_coef_per_head
};

ESPER_HD MetricsCfg metrics_cfg(const PPOParams& P) {
  MetricsCfg c;
  c.num_heads = P.num_heads;
  c.per_head = P.per_head;
  c.has_values = P.has_values;
  c.has_vclip = P.has_vclip;
  c.entropy_coef = P.entropy_coef;
  c.value_coef = P.value_coef;
  for (int h = 0; h < ESPER_MAX_HEADS; ++h) c.kcoef[h] = h < P.num_heads ? P.kcoef[h] : 0.f;
  return c;
}

ESPER_HD void derive_metrics(const MetricsCfg& c, const float* s, float* out) {
  const int H = c.num_heads;
  const float* hs = s + ESPER_GLOBAL_SIZE;
  const float W = s[G_WEIGHT], steps = s[G_STEPS], VW = s[G_VALUE_WEIGHT];
  float any_rel = 0.f, kl_sum = 0.f, nonfinite = 0.f;
  float logp_min = f_inf(), logp_max = -f_inf();
  for (int h = 0; h < H; ++h) {
    const float* x = hs + h * ESPER_HEAD_SIZE;
    any_rel += x[HD_REL_WEIGHT];
    kl_sum += x[HD_KL_NUM];
    nonfinite += x[HD_NONFINITE];
    logp_min = h == 0 ? x[HD_LOGP_MIN] : nan_min(logp_min, x[HD_LOGP_MIN]);
    logp_max = h == 0 ? x[HD_LOGP_MAX] : nan_max(logp_max, x[HD_LOGP_MAX]);
  }
  // the losses as the forward computes them (a head without relevant steps adds 0)
  float lt[4];
  loss_terms(H, c.per_head != 0, c.kcoef, c.entropy_coef, c.value_coef, s, lt);
  const float loss = lt[0], pl = lt[1], el = lt[2], vl = lt[3];
  const float hvd = c.has_values ? s[G_VALUE_STEPS] : 0.f;
  const float has_ratio = s[G_RATIO_MAX] > -f_inf() ? steps : 0.f;
  const float has_logp = logp_min < f_inf() ? any_rel : 0.f;
  const float all_finite = (nonfinite == 0.f && is_finite(loss)) ? 1.f : 0.f;
  float* g = out;
  g[0] = gated(loss, 1.f, W + hvd);
  g[1] = gated(pl, 1.f, c.per_head ? any_rel : W);
  g[2] = gated(el, 1.f, any_rel);
  g[3] = gated(vl, 1.f, hvd);
  g[4] = gated(kl_sum, any_rel, any_rel);
  g[5] = gated(s[G_KL_K3], W, W);
  g[6] = gated(s[G_KL_K1], W, W);
  g[7] = gated(s[G_CLIP], W, W);
  g[8] = gated(s[G_CLIP_POS], W, W);
  g[9] = gated(s[G_CLIP_NEG], W, W);
  g[10] = gated(s[G_RATIO_MEAN], 1.f, W);
  g[11] = gated(sqrtf(s[G_RATIO_M2] / W), 1.f, W);
  g[12] = gated(s[G_RATIO_MIN], 1.f, has_ratio);
  g[13] = gated(s[G_RATIO_MAX], 1.f, has_ratio);
  g[14] = gated(logp_min, 1.f, has_logp);
  g[15] = gated(logp_max, 1.f, has_logp);
  g[16] = steps;
  g[17] = W;
  g[18] = all_finite;
  g[19] = gated(1.f - s[G_RESID_M2] / s[G_RETURN_M2], 1.f, hvd * s[G_RETURN_M2]);
  g[20] = gated(s[G_VALUE_CLIP], VW, (c.has_values && c.has_vclip) ? VW : 0.f);
  g[21] = s[G_BAD_WEIGHTS];
  g[22] = c.has_values ? s[G_BAD_VALUE_WEIGHTS] : f_nan();
  float* m = out + N_GLOBAL_METRICS;
  for (int h = 0; h < H; ++h) {
    const float* x = hs + h * ESPER_HEAD_SIZE;
    const float rw = x[HD_REL_WEIGHT];
    m[0 * H + h] = gated(x[HD_ENTROPY_NUM], rw, rw);
    m[1 * H + h] = gated(x[HD_KL_NUM], rw, rw);
    m[2 * H + h] = gated(x[HD_CLIP_NUM], rw, rw);
    m[3 * H + h] = gated(x[HD_RATIO_MAX], 1.f, x[HD_RATIO_MAX] > -f_inf() ? rw : 0.f);
    m[4 * H + h] = x[HD_NONFINITE];
    m[5 * H + h] = x[HD_EMPTY_MASK];
    m[6 * H + h] = x[HD_INVALID_ACTION];
    m[7 * H + h] = gated(x[HD_VALID_MIN], 1.f, steps);
    m[8 * H + h] = gated(x[HD_VALID_MAX], 1.f, steps);
    m[9 * H + h] = gated(x[HD_VALID_SUM], W, W);
    m[10 * H + h] = gated(x[HD_SINGLE], W, W);
    m[11 * H + h] = gated(rw, W, W);
    m[12 * H + h] = gated(x[HD_LEARNABLE], W, W);
  }
}

}  // namespace esper

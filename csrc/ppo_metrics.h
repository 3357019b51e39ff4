// esper_kernels: the metric table from the merged statistics vector, on the host or in one GPU thread.
//
// The same table, in the same order and with the same float32 operations, as _derive_table in
// esper_kernels/metrics.py (the test suite holds them together): every metric is
// gated(num, den, gate) = gate > 0 ? num / den : NaN, so a mean without data is NaN, never 0. The rows come from
// the schema (ESPER_GLOBAL_METRICS / ESPER_HEAD_METRICS of the generated ppo_layout.h); only the SPECIAL global
// rows are written out here.
#pragma once

#include "ppo_core.h"

namespace esper {

constexpr int N_GLOBAL_METRICS = ESPER_N_GLOBAL_METRICS;  // esper_kernels.schema.GLOBAL_METRICS
constexpr int N_HEAD_METRICS = ESPER_N_HEAD_METRICS;      // esper_kernels.schema.HEAD_METRICS (metric-major)

ESPER_HD int metrics_size(int num_heads) { return N_GLOBAL_METRICS + N_HEAD_METRICS * num_heads; }

ESPER_HD float gated(float num, float den, float gate) { return gate > 0.f ? num / den : f_nan(); }
// torch.amin / amax: NaN propagates
ESPER_HD float nan_min(float a, float b) { return (a != a || b != b) ? f_nan() : (b < a ? b : a); }
ESPER_HD float nan_max(float a, float b) { return (a != a || b != b) ? f_nan() : (b > a ? b : a); }

// What the table needs besides the statistics.
struct MetricsCfg {
  int32_t num_heads;
  int32_t per_head;            // surrogate == "per_head"
  int32_t has_values;          // values and returns were given
  int32_t has_vclip;           // value clipping on
  int32_t ratio_std_unbiased;  // ratio_std == "unbiased" (Bessel's correction with the present steps)
  float entropy_coef, value_coef;
  float kcoef[ESPER_MAX_HEADS];  // entropy_coef_per_head
};

// a non-special row: its statistic x and normaliser d (esper_kernels.metrics._row); kind: the statistic's
ESPER_HD float metric_row(int form, int kind, float x, float d) {
  switch (form) {
    case ESPER_FORM_MEAN:
      return gated(x, d, d);
    case ESPER_FORM_COUNT:
      return x;
    case ESPER_FORM_VALUE:
      return gated(x, 1.f, d);
    case ESPER_FORM_EXTREME: {
      const bool measured = kind == ESPER_KIND_MIN ? x < f_inf() : x > -f_inf();
      return gated(x, 1.f, measured ? d : 0.f);
    }
  }
  return f_nan();
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
  const float has_logp = logp_min < f_inf() ? any_rel : 0.f;
  float var = s[G_RATIO_M2] / W;
  if (c.ratio_std_unbiased) var = var * (steps / (steps - 1.f));
  const float over[] = {1.f, W, steps, VW, 0.f};  // indexed by ESPER_OVER_* (REL_WEIGHT: per head below)
  float* g = out;
#define ESPER_SPECIAL(NAME, VALUE) \
  case NAME:                       \
    g[NAME] = VALUE;               \
    break;
  enum {
#define ESPER_X(I, NAME, FORM, STAT, OVER) GM_##NAME = I,
    ESPER_GLOBAL_METRICS(ESPER_X)
#undef ESPER_X
  };
#define ESPER_X(I, NAME, FORM, STAT, OVER)                                                                         \
  if (FORM == ESPER_FORM_SPECIAL) {                                                                                \
    switch (I) {                                                                                                   \
      ESPER_SPECIAL(GM_LOSS, gated(loss, 1.f, W + hvd))                                                            \
      ESPER_SPECIAL(GM_POLICY_LOSS, gated(pl, 1.f, c.per_head ? any_rel : W))                                      \
      ESPER_SPECIAL(GM_ENTROPY_LOSS, gated(el, 1.f, any_rel))                                                      \
      ESPER_SPECIAL(GM_VALUE_LOSS, gated(vl, 1.f, hvd))                                                            \
      ESPER_SPECIAL(GM_APPROX_KL, gated(kl_sum, any_rel, any_rel))                                                 \
      ESPER_SPECIAL(GM_RATIO_STD, gated(sqrtf(var), 1.f, W))                                                       \
      ESPER_SPECIAL(GM_LOG_PROB_MIN, gated(logp_min, 1.f, has_logp))                                               \
      ESPER_SPECIAL(GM_LOG_PROB_MAX, gated(logp_max, 1.f, has_logp))                                               \
      ESPER_SPECIAL(GM_ALL_FINITE, (nonfinite == 0.f && is_finite(loss)) ? 1.f : 0.f)                              \
      ESPER_SPECIAL(GM_EXPLAINED_VARIANCE, gated(1.f - s[G_RESID_M2] / s[G_RETURN_M2], 1.f, hvd * s[G_RETURN_M2])) \
      ESPER_SPECIAL(GM_VALUE_CLIP_FRACTION, gated(s[G_VALUE_CLIP], VW, (c.has_values && c.has_vclip) ? VW : 0.f))  \
      ESPER_SPECIAL(GM_INVALID_VALUE_WEIGHTS, c.has_values ? s[G_BAD_VALUE_WEIGHTS] : f_nan())                     \
      default:                                                                                                     \
        g[I] = f_nan(); /* a SPECIAL row without code here: NaN, and the test suite fails */                       \
    }                                                                                                              \
  } else {                                                                                                         \
    g[I] = metric_row(FORM, global_stat_kind(STAT), s[STAT < 0 ? 0 : STAT], over[OVER]);                           \
  }
  ESPER_GLOBAL_METRICS(ESPER_X)
#undef ESPER_X
#undef ESPER_SPECIAL
  float* m = out + N_GLOBAL_METRICS;
  for (int h = 0; h < H; ++h) {
    const float* x = hs + h * ESPER_HEAD_SIZE;
    const float over_h[] = {1.f, W, steps, VW, x[HD_REL_WEIGHT]};
#define ESPER_X(I, NAME, FORM, STAT, OVER) m[I * H + h] = metric_row(FORM, head_stat_kind(STAT), x[STAT], over_h[OVER]);
    ESPER_HEAD_METRICS(ESPER_X)
#undef ESPER_X
  }
}

}  // namespace esper

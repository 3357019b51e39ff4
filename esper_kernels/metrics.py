"""PPOMetrics: the SPEC section 4 metric table, derived on the device from sufficient statistics.

The statistics (``esper_kernels.stats``) are sums, counts, minima, maxima and weighted moments, so the
metrics of a batch split across ranks are the metrics of the whole batch after ``all_reduce``. A metric
with no data is NaN, never 0.0: a 0 always means a measured zero.
"""

from __future__ import annotations

import math

import torch

from .config import ResolvedConfig
from .layout import HeadLayout
from .stats import GLOBAL_SIZE, HD, HEAD_SIZE, G, merge

__all__ = ["PPOMetrics", "GLOBAL_METRICS", "HEAD_METRICS"]

#: global metric names, in to_dict() order
GLOBAL_METRICS = (
    "loss", "policy_loss", "entropy_loss", "value_loss", "approx_kl", "joint_kl_k3", "joint_kl_k1",
    "clip_fraction", "clip_fraction_positive", "clip_fraction_negative", "ratio_mean", "ratio_std",
    "ratio_min", "ratio_max", "log_prob_min", "log_prob_max", "steps", "weight_sum", "all_finite",
    "explained_variance", "value_clip_fraction", "invalid_weights", "invalid_value_weights",
)
#: per-head metric names; to_dict() keys are head_{name}_{metric}
HEAD_METRICS = (
    "entropy", "kl", "clip_fraction", "ratio_max", "nonfinite", "empty_mask", "invalid_action",
    "valid_actions_min", "valid_actions_max", "valid_actions_mean", "single_action_fraction",
    "relevance_fraction", "learnable_fraction",
)

_NAN = float("nan")


def _div(num: torch.Tensor, den: torch.Tensor, empty: float = _NAN) -> torch.Tensor:
    """num / den, ``empty`` where den == 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), empty)


class PPOMetrics:
    """Device-side statistics of one loss call and every metric derived from them.

    ``metrics["clip_fraction"]`` and ``metrics.tensors()`` give 0-d device tensors without a host sync;
    ``to_dict()`` syncs once and returns floats with per-head keys ``head_{name}_{metric}``.
    """

    def __init__(self, stats: torch.Tensor, layout: HeadLayout, config: ResolvedConfig, has_values: bool):
        expected = GLOBAL_SIZE + layout.num_heads * HEAD_SIZE
        if stats.shape != (expected,):
            raise ValueError(f"stats: expected shape [{expected}], got {list(stats.shape)}")
        self.stats = stats
        self.layout = layout
        self.config = config
        self.has_values = has_values
        self._names = list(GLOBAL_METRICS) + [f"head_{h}_{m}" for m in HEAD_METRICS for h in layout.names]
        self._cache: torch.Tensor | None = None

    # -- derivation --------------------------------------------------------------------------------------
    def _derive(self) -> tuple[list[str], torch.Tensor]:
        """Every metric in one float32 vector (cached), in about 60 small ops whatever the number of heads.

        Each metric is ``where(gate > 0, num / den, NaN)`` over three stacked vectors: a ratio's gate is its
        denominator (a mean without data is NaN), a raw count has den = gate = 1, and a minimum, maximum or
        loss has den = 1 and its data condition as the gate.
        """
        if self._cache is not None:
            return self._names, self._cache
        s = self.stats
        cfg = self.config
        H = self.layout.num_heads
        hs = s[GLOBAL_SIZE:].view(H, HEAD_SIZE)
        g = s.__getitem__
        W, steps, VW = g(G.WEIGHT), g(G.STEPS), g(G.VALUE_WEIGHT)
        one, zero = s.new_ones(()), s.new_zeros(())
        rel_w = hs[:, HD.REL_WEIGHT]
        any_rel = rel_w.sum()
        rel_pos = rel_w > 0

        if cfg.per_head:
            pl = -_div(hs[:, HD.POLICY_NUM], rel_w, 0.0).sum()
        else:
            pl = -_div(g(G.POLICY_NUM), W, 0.0)
        # the per-head coefficients without a host-to-device copy (a copy syncs and cannot be graph-captured)
        kh = cfg.entropy_coef_per_head
        k = kh[0] if len(set(kh)) == 1 else torch.stack([torch.full((), c, device=s.device) for c in kh])
        ent_h = _div(hs[:, HD.ENTROPY_NUM], rel_w)
        # a head without relevant steps adds 0 (select, never multiply: a NaN entropy must stay NaN)
        el = -torch.where(rel_pos, k * ent_h, 0.0).sum()
        vl = 0.5 * _div(g(G.VALUE_NUM), VW, 0.0)
        loss = pl + cfg.entropy_coef * el + cfg.value_coef * vl
        # gates are non-negative, so "a or b" is a + b and "a and b" a selection
        has_value_data = g(G.VALUE_STEPS) if self.has_values else zero
        # minima and maxima ignore NaN, so "no data" includes "only NaN data": a ratio is >= 0 and a log-prob
        # is never +inf, so a ratio maximum of -inf or a log-prob minimum of +inf means nothing was measured
        has_ratio = torch.where(g(G.RATIO_MAX) > -math.inf, steps, 0.0)
        logp_min = hs[:, HD.LOGP_MIN].amin()
        has_logp = torch.where(logp_min < math.inf, any_rel, 0.0)
        all_finite = ((hs[:, HD.NONFINITE].sum() == 0) & torch.isfinite(loss)).float()
        vclip = self.has_values and math.isfinite(cfg.value_clip)
        # (num, den, gate) per global metric, in GLOBAL_METRICS order
        rows = (
            (loss, one, W + has_value_data),  # loss
            (pl, one, any_rel if cfg.per_head else W),  # policy_loss
            (el, one, any_rel),  # entropy_loss
            (vl, one, has_value_data),  # value_loss
            (hs[:, HD.KL_NUM].sum(), any_rel, any_rel),  # approx_kl
            (g(G.KL_K3), W, W), (g(G.KL_K1), W, W),  # joint_kl_k3, joint_kl_k1
            (g(G.CLIP), W, W), (g(G.CLIP_POS), W, W), (g(G.CLIP_NEG), W, W),  # clip fractions
            (g(G.RATIO_MEAN), one, W),  # ratio_mean
            (torch.sqrt(g(G.RATIO_M2) / W), one, W),  # ratio_std
            (g(G.RATIO_MIN), one, has_ratio), (g(G.RATIO_MAX), one, has_ratio),  # ratio_min, ratio_max
            (logp_min, one, has_logp), (hs[:, HD.LOGP_MAX].amax(), one, has_logp),  # log_prob_min, _max
            (steps, one, one), (W, one, one), (all_finite, one, one),  # steps, weight_sum, all_finite
            (1.0 - g(G.RESID_M2) / g(G.RETURN_M2), one, has_value_data * g(G.RETURN_M2)),  # explained_variance
            (g(G.VALUE_CLIP), VW, VW if vclip else zero),  # value_clip_fraction
            (g(G.BAD_WEIGHTS), one, one),  # invalid_weights
            (g(G.BAD_VALUE_WEIGHTS), one, one if self.has_values else zero),  # invalid_value_weights
        )
        num_g, den_g, gate_g = (torch.stack(c) for c in zip(*rows))
        # per head, in HEAD_METRICS order: columns of [H, 13] matrices
        ones, Wh, steps_h = one.expand(H), W.expand(H), steps.expand(H)
        col = hs.unbind(1)
        heads = (
            (col[HD.ENTROPY_NUM], rel_w, rel_w), (col[HD.KL_NUM], rel_w, rel_w),  # entropy, kl
            (col[HD.CLIP_NUM], rel_w, rel_w),  # clip_fraction
            (col[HD.RATIO_MAX], ones, torch.where(col[HD.RATIO_MAX] > -math.inf, rel_w, 0.0)),  # ratio_max
            (col[HD.NONFINITE], ones, ones), (col[HD.EMPTY_MASK], ones, ones),  # nonfinite, empty_mask
            (col[HD.INVALID_ACTION], ones, ones),  # invalid_action
            (col[HD.VALID_MIN], ones, steps_h), (col[HD.VALID_MAX], ones, steps_h),  # valid_actions_min, _max
            (col[HD.VALID_SUM], Wh, Wh), (col[HD.SINGLE], Wh, Wh),  # valid_actions_mean, single_action_fraction
            (rel_w, Wh, Wh), (col[HD.LEARNABLE], Wh, Wh),  # relevance_fraction, learnable_fraction
        )
        num_h, den_h, gate_h = (torch.stack(c) for c in zip(*heads))  # [13, H]: metric-major, as the names
        num = torch.cat([num_g, num_h.reshape(-1)])
        den = torch.cat([den_g, den_h.reshape(-1)])
        gate = torch.cat([gate_g, gate_h.reshape(-1)])
        self._cache = torch.where(gate > 0, num / den, _NAN).float()
        return self._names, self._cache

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every metric as a 0-d device tensor (no host sync)."""
        names, values = self._derive()
        return dict(zip(names, values.unbind()))

    def __getitem__(self, name: str) -> torch.Tensor:
        names, values = self._derive()
        if name not in names:
            raise KeyError(f"unknown metric {name!r}; metrics are {sorted(names)}")
        return values[names.index(name)]

    def to_dict(self) -> dict[str, float]:
        """Every metric as a float, with one host sync; per-head keys are head_{name}_{metric}."""
        names, values = self._derive()
        return dict(zip(names, values.tolist()))

    def head(self, name: str) -> dict[str, float]:
        """One head's metrics as floats (one host sync)."""
        self.layout.index(name)
        prefix = f"head_{name}_"
        return {k[len(prefix):]: v for k, v in self.to_dict().items() if k.startswith(prefix)}

    # -- combining ------------------------------------------------------------------------------------
    @classmethod
    def merge(cls, parts: list[PPOMetrics]) -> PPOMetrics:
        """The metrics of the concatenation of the batches behind ``parts`` (same layout and config)."""
        if not parts:
            raise ValueError("merge: expected at least one PPOMetrics")
        first = parts[0]
        for p in parts[1:]:
            if p.layout != first.layout or p.config != first.config:
                raise ValueError("merge: every part must share the layout and the config")
        stats = merge(torch.stack([p.stats for p in parts]))
        return cls(stats, first.layout, first.config, any(p.has_values for p in parts))

    def all_reduce(self, group=None) -> PPOMetrics:
        """Combine the statistics of every rank of ``group`` in place (one all_gather); returns self.

        Afterwards every metric equals the metric of the concatenated batch of all ranks.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        k = self.stats.numel()
        # a flat [world * K] output: gloo accepts only that form (NCCL takes it too); recent torch names the
        # collective all_gather_single and deprecates all_gather_into_tensor
        gathered = torch.empty(world * k, dtype=self.stats.dtype, device=self.stats.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, self.stats.contiguous(), group=group)
        self.stats = merge(gathered.view(world, k))
        self._cache = None
        return self

    def __repr__(self) -> str:
        return f"PPOMetrics(heads={list(self.layout.names)}, device={self.stats.device})"

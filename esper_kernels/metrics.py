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

    # -- statistics access ---------------------------------------------------------------------------
    def _g(self, i: int) -> torch.Tensor:
        return self.stats[i]

    def _heads(self, j: int) -> torch.Tensor:
        """[H] column j of the per-head block."""
        return self.stats[GLOBAL_SIZE:].view(self.layout.num_heads, HEAD_SIZE)[:, j]

    # -- derivation --------------------------------------------------------------------------------------
    def _derive(self) -> tuple[list[str], torch.Tensor]:
        s = self.stats
        cfg = self.config
        g = self._g
        hd = self._heads
        W, steps = g(G.WEIGHT), g(G.STEPS)
        nan = torch.full((), _NAN, device=s.device)
        rel_w = hd(HD.REL_WEIGHT)
        any_rel = rel_w.sum()

        if cfg.per_head:
            pl = -_div(hd(HD.POLICY_NUM), rel_w, 0.0).sum()
        else:
            pl = -_div(g(G.POLICY_NUM), W, 0.0)
        # the per-head coefficients without a host-to-device copy (a copy syncs and cannot be graph-captured)
        kh = cfg.entropy_coef_per_head
        k = kh[0] if len(set(kh)) == 1 else torch.stack([torch.full((), c, device=s.device) for c in kh])
        ent_h = _div(hd(HD.ENTROPY_NUM), rel_w)
        # a head without relevant steps adds 0 (select, never multiply: a NaN entropy must stay NaN)
        el = -torch.where(rel_w > 0, k * ent_h, 0.0).sum()
        VW = g(G.VALUE_WEIGHT)
        vl = 0.5 * _div(g(G.VALUE_NUM), VW, 0.0)
        loss = pl + cfg.entropy_coef * el + cfg.value_coef * vl
        has_value_data = (g(G.VALUE_STEPS) > 0) if self.has_values else torch.zeros((), dtype=torch.bool,
                                                                                      device=s.device)
        nonfinite_total = hd(HD.NONFINITE).sum()
        # minima and maxima ignore NaN, so "no data" includes "only NaN data": a ratio is >= 0 and a log-prob
        # is never +inf, so a ratio maximum of -inf or a log-prob minimum of +inf means nothing was measured
        has_ratio = (steps > 0) & (g(G.RATIO_MAX) > -math.inf)
        logp_min = hd(HD.LOGP_MIN).amin()
        has_logp = (any_rel > 0) & (logp_min < math.inf)

        out: dict[str, torch.Tensor] = {
            "loss": torch.where((W > 0) | has_value_data, loss, nan),
            "policy_loss": torch.where(any_rel > 0 if cfg.per_head else W > 0, pl, nan),
            "entropy_loss": torch.where(any_rel > 0, el, nan),
            "value_loss": torch.where(has_value_data, vl, nan),
            "approx_kl": _div(hd(HD.KL_NUM).sum(), any_rel),
            "joint_kl_k3": _div(g(G.KL_K3), W),
            "joint_kl_k1": _div(g(G.KL_K1), W),
            "clip_fraction": _div(g(G.CLIP), W),
            "clip_fraction_positive": _div(g(G.CLIP_POS), W),
            "clip_fraction_negative": _div(g(G.CLIP_NEG), W),
            "ratio_mean": torch.where(W > 0, g(G.RATIO_MEAN), nan),
            "ratio_std": torch.sqrt(_div(g(G.RATIO_M2), W)),
            "ratio_min": torch.where(has_ratio, g(G.RATIO_MIN), nan),
            "ratio_max": torch.where(has_ratio, g(G.RATIO_MAX), nan),
            "log_prob_min": torch.where(has_logp, logp_min, nan),
            "log_prob_max": torch.where(has_logp, hd(HD.LOGP_MAX).amax(), nan),
            "steps": steps,
            "weight_sum": W,
            "all_finite": ((nonfinite_total == 0) & torch.isfinite(loss)).float(),
            "explained_variance": torch.where(has_value_data, 1.0 - _div(g(G.RESID_M2), g(G.RETURN_M2)), nan),
            "value_clip_fraction": _div(g(G.VALUE_CLIP), VW) if (self.has_values and math.isfinite(cfg.value_clip))
            else nan,
            "invalid_weights": g(G.BAD_WEIGHTS),
            "invalid_value_weights": g(G.BAD_VALUE_WEIGHTS) if self.has_values else nan,
        }
        present = steps > 0
        head = {
            "entropy": ent_h,
            "kl": _div(hd(HD.KL_NUM), rel_w),
            "clip_fraction": _div(hd(HD.CLIP_NUM), rel_w),
            "ratio_max": torch.where((rel_w > 0) & (hd(HD.RATIO_MAX) > -math.inf), hd(HD.RATIO_MAX), _NAN),
            "nonfinite": hd(HD.NONFINITE),
            "empty_mask": hd(HD.EMPTY_MASK),
            "invalid_action": hd(HD.INVALID_ACTION),
            "valid_actions_min": torch.where(present, hd(HD.VALID_MIN), _NAN),
            "valid_actions_max": torch.where(present, hd(HD.VALID_MAX), _NAN),
            "valid_actions_mean": _div(hd(HD.VALID_SUM), W.expand_as(rel_w)),
            "single_action_fraction": _div(hd(HD.SINGLE), W.expand_as(rel_w)),
            "relevance_fraction": _div(rel_w, W.expand_as(rel_w)),
            "learnable_fraction": _div(hd(HD.LEARNABLE), W.expand_as(rel_w)),
        }
        names = list(GLOBAL_METRICS)
        values = [out[n].reshape(()) for n in GLOBAL_METRICS]
        for m in HEAD_METRICS:
            for h, hname in enumerate(self.layout.names):
                names.append(f"head_{hname}_{m}")
                values.append(head[m][h])
        return names, torch.stack([v.float() for v in values])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every metric as a 0-d device tensor (no host sync)."""
        names, values = self._derive()
        return dict(zip(names, values.unbind()))

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors()
        if name not in t:
            raise KeyError(f"unknown metric {name!r}; metrics are {sorted(t)}")
        return t[name]

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
        return self

    def __repr__(self) -> str:
        return f"PPOMetrics(heads={list(self.layout.names)}, device={self.stats.device})"

"""PPOMetrics: the docs/semantics.md sections 4 and 5 metric table, derived on the device from sufficient statistics.

The statistics (``esper_kernels.stats``) are sums, counts, minima, maxima and weighted moments, so the
metrics of a batch split across ranks are the metrics of the whole batch after ``all_reduce``. A metric
with no data is NaN, never 0.0: a 0 always means a measured zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from . import schema
from .config import ResolvedConfig
from .layout import HeadLayout
from .schema import GLOBAL_SIZE, HD, HEAD_SIZE, Form, G, Kind, Over
from .stats import merge

__all__ = ["PPOMetrics", "MetricTensors", "GLOBAL_METRICS", "HEAD_METRICS"]

#: global metric names, in to_dict() order
GLOBAL_METRICS = tuple(m.name for m in schema.GLOBAL_METRICS)
#: per-head metric names; to_dict() keys are head_{name}_{metric}
HEAD_METRICS = tuple(m.name for m in schema.HEAD_METRICS)

_NAN = float("nan")


class _TorchOps:
    """The array operations of ``_derive_table`` on torch tensors (any device; no host sync)."""

    where, stack, cat, sqrt, isfinite = torch.where, torch.stack, torch.cat, torch.sqrt, torch.isfinite

    @staticmethod
    def scalar(like: torch.Tensor, v: float) -> torch.Tensor:
        return like.new_full((), v)

    @staticmethod
    def expand(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.expand(n)

    @staticmethod
    def amin(x: torch.Tensor) -> torch.Tensor:
        return x.amin()

    @staticmethod
    def amax(x: torch.Tensor) -> torch.Tensor:
        return x.amax()

    @staticmethod
    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.float()


class _NumpyOps:
    """The same operations on numpy arrays: CPU statistics, where each torch op would cost microseconds."""

    where, cat, sqrt, isfinite = np.where, np.concatenate, np.sqrt, np.isfinite

    @staticmethod
    def stack(xs) -> np.ndarray:
        return np.array(xs, dtype=np.float32)  # np.stack's Python-level checks cost more than the maths

    @staticmethod
    def scalar(like: np.ndarray, v: float) -> np.ndarray:
        return np.full((), v, dtype=like.dtype)

    @staticmethod
    def expand(x: np.ndarray, n: int) -> np.ndarray:
        return np.broadcast_to(x, (n,))

    @staticmethod
    def amin(x: np.ndarray) -> np.ndarray:
        return x.min()

    @staticmethod
    def amax(x: np.ndarray) -> np.ndarray:
        return x.max()

    @staticmethod
    def f32(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)


def _row(metric: schema.Metric, stats: tuple[schema.Stat, ...], x, d, one, xp):
    """(num, den, gate) of a non-special metric row: its statistic ``x`` and normaliser ``d``."""
    if metric.form == Form.MEAN:
        return x, d, d
    if metric.form == Form.COUNT:
        return x, one, one
    if metric.form == Form.VALUE:
        return x, one, d
    # EXTREME: x where there is data and x is not its statistic's empty sentinel (+inf for a MIN, -inf for a MAX)
    kind = next(s.kind for s in stats if s.name == metric.stat)
    measured = (x < math.inf) if kind == Kind.MIN else (x > -math.inf)
    return x, one, xp.where(measured, d, 0.0)


def _derive_table(s, num_heads: int, cfg: ResolvedConfig, has_values: bool, xp=_TorchOps):
    """Every metric of the statistics vector ``s`` as one float32 vector, in about 60 array ops.

    Each metric is ``where(gate > 0, num / den, NaN)`` over three stacked vectors, built from the schema's rows
    (``esper_kernels.schema``): a mean's gate is its denominator (a mean without data is NaN), a raw count has
    den = gate = 1, and a minimum, maximum or loss has den = 1 and its data condition as the gate. The SPECIAL
    rows are written out below. ``xp`` runs it on torch tensors or on numpy arrays.
    """
    H = num_heads
    hs = s[GLOBAL_SIZE:].reshape(H, HEAD_SIZE)
    W, steps, VW = s[G.WEIGHT], s[G.STEPS], s[G.VALUE_WEIGHT]
    one, zero = xp.scalar(s, 1.0), xp.scalar(s, 0.0)

    def div0(num, den):  # num / den, 0 where den == 0
        ok = den > 0
        return xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)

    rel_w = hs[:, HD.REL_WEIGHT]
    any_rel = rel_w.sum()
    rel_pos = rel_w > 0
    pl = -div0(hs[:, HD.POLICY_NUM], rel_w).sum() if cfg.per_head else -div0(s[G.POLICY_NUM], W)
    kh = cfg.entropy_coef_per_head
    # the per-head coefficients without a host-to-device copy (a copy syncs and cannot be graph-captured)
    k = kh[0] if len(set(kh)) == 1 else xp.stack([xp.scalar(s, c) for c in kh])
    ent_h = xp.where(rel_pos, hs[:, HD.ENTROPY_NUM] / xp.where(rel_pos, rel_w, 1.0), _NAN)
    # a head without relevant steps adds 0 (select, never multiply: a NaN entropy must stay NaN)
    el = -xp.where(rel_pos, k * ent_h, 0.0).sum()
    vl = 0.5 * div0(s[G.VALUE_NUM], VW)
    loss = pl + cfg.entropy_coef * el + cfg.value_coef * vl
    # gates are non-negative, so "a or b" is a + b and "a and b" a product or a selection
    has_value_data = s[G.VALUE_STEPS] if has_values else zero
    logp_min = xp.amin(hs[:, HD.LOGP_MIN])
    has_logp = xp.where(logp_min < math.inf, any_rel, 0.0)
    var = s[G.RATIO_M2] / W
    if cfg.ratio_std_unbiased:  # Bessel's correction with n present steps; NaN for one step, as torch.std
        var = var * (steps / (steps - 1.0))
    vclip = has_values and math.isfinite(cfg.value_clip)
    special = {
        "loss": (loss, one, W + has_value_data),
        "policy_loss": (pl, one, any_rel if cfg.per_head else W),
        "entropy_loss": (el, one, any_rel),
        "value_loss": (vl, one, has_value_data),
        "approx_kl": (hs[:, HD.KL_NUM].sum(), any_rel, any_rel),
        "ratio_std": (xp.sqrt(var), one, W),
        "log_prob_min": (logp_min, one, has_logp),
        "log_prob_max": (xp.amax(hs[:, HD.LOGP_MAX]), one, has_logp),
        "all_finite": (xp.f32((hs[:, HD.NONFINITE].sum() == 0) & xp.isfinite(loss)), one, one),
        "explained_variance": (1.0 - s[G.RESID_M2] / s[G.RETURN_M2], one, has_value_data * s[G.RETURN_M2]),
        "value_clip_fraction": (s[G.VALUE_CLIP], VW, VW if vclip else zero),
        "invalid_value_weights": (s[G.BAD_VALUE_WEIGHTS], one, one if has_values else zero),
    }
    over = {Over.ONE: one, Over.WEIGHT: W, Over.STEPS: steps, Over.VALUE_WEIGHT: VW}
    rows = [
        special[m.name]
        if m.form == Form.SPECIAL
        else _row(m, schema.GLOBAL_STATS, s[getattr(G, m.stat)], over[m.over], one, xp)
        for m in schema.GLOBAL_METRICS
    ]
    over_h = {o: xp.expand(v, H) for o, v in over.items()}
    over_h[Over.REL_WEIGHT] = rel_w
    heads = [
        _row(m, schema.HEAD_STATS, hs[:, getattr(HD, m.stat)], over_h[m.over], over_h[Over.ONE], xp)
        for m in schema.HEAD_METRICS
    ]
    num, den, gate = (xp.cat([xp.stack(g), xp.stack(h).reshape(-1)]) for g, h in zip(zip(*rows), zip(*heads)))
    return xp.f32(xp.where(gate > 0, num / den, _NAN))


_NAMES: dict[tuple[str, ...], tuple[tuple[str, ...], dict[str, int]]] = {}


def _metric_names(head_names: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, int]]:
    """The table's names in order (globals, then per-head metric-major) and their positions (cached per layout
    in eager mode; traced directly under torch.compile)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and head_names in _NAMES:
        return _NAMES[head_names]
    names = GLOBAL_METRICS + tuple(f"head_{h}_{m}" for m in HEAD_METRICS for h in head_names)
    out = names, {n: i for i, n in enumerate(names)}
    if not compiling and len(_NAMES) < 64:
        _NAMES[head_names] = out
    return out


class MetricTensors(Mapping):
    """``PPOMetrics.tensors()`` in eager mode: a read-only mapping name -> 0-d tensor over the metric table.

    Each value is a view of the table made when it is looked up, so a step that logs a few metrics pays for a
    few views instead of one tensor per metric; ``dict(m)`` gives a plain dict.
    """

    __slots__ = ("_index", "_names", "_table")

    def __init__(self, names: tuple[str, ...], index: dict[str, int], table: torch.Tensor):
        self._names, self._index, self._table = names, index, table

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._table[self._index[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"MetricTensors({dict(zip(self._names, self._table.unbind()))!r})"


class PPOMetrics:
    """Device-side statistics of one loss call and every metric derived from them.

    ``metrics["clip_fraction"]`` and ``metrics.tensors()`` give 0-d device tensors without a host sync;
    ``to_dict()`` syncs once and returns floats with per-head keys ``head_{name}_{metric}``.
    """

    def __init__(self, stats: torch.Tensor, layout: HeadLayout, config: ResolvedConfig, has_values: bool, backend=None):
        expected = GLOBAL_SIZE + layout.num_heads * HEAD_SIZE
        if stats.shape != (expected,):
            raise ValueError(f"stats: expected shape [{expected}], got {list(stats.shape)}")
        self.stats = stats
        self.layout = layout
        self.config = config
        self.has_values = has_values
        self._names, self._index = _metric_names(layout.names)
        self._cache: torch.Tensor | None = None
        # a fused backend derives the table with one kernel of its own (``Backend.metric_table``)
        self._backend = backend if backend is not None and backend.has_metric_table else None

    # -- derivation --------------------------------------------------------------------------------------
    def _derive(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """Every metric in one float32 vector, derived once per statistics vector."""
        if self._cache is None:
            s = self.stats
            args = (self.layout.num_heads, self.config, self.has_values)
            if torch.compiler.is_compiling():
                self._cache = _derive_table(s, *args)
            elif self._backend is not None:
                self._cache = self._backend.metric_table(s.detach().float().contiguous(), self.config, self.has_values)
            elif s.device.type == "cpu" and not s.requires_grad:
                with np.errstate(all="ignore"):  # 0/0 and friends are gated to NaN on purpose
                    self._cache = torch.from_numpy(_derive_table(s.numpy(), *args, xp=_NumpyOps))
            else:
                self._cache = _derive_table(s, *args)
        return self._names, self._cache

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Every metric as a 0-d device tensor (no host sync): a dict under torch.compile, a ``MetricTensors``
        mapping (views made on lookup) in eager mode."""
        names, values = self._derive()
        if torch.compiler.is_compiling():
            return dict(zip(names, values.unbind()))
        return MetricTensors(names, self._index, values)

    def __getitem__(self, name: str) -> torch.Tensor:
        names, values = self._derive()
        if name not in self._index:
            raise KeyError(f"unknown metric {name!r}; metrics are {sorted(names)}")
        return values[self._index[name]]

    def to_dict(self) -> dict[str, float]:
        """Every metric as a float, with one host sync; per-head keys are head_{name}_{metric}."""
        names, values = self._derive()
        return dict(zip(names, values.tolist()))

    def head(self, name: str) -> dict[str, float]:
        """One head's metrics as floats (one host sync)."""
        self.layout.index(name)
        prefix = f"head_{name}_"
        return {k[len(prefix) :]: v for k, v in self.to_dict().items() if k.startswith(prefix)}

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
        return cls(stats, first.layout, first.config, any(p.has_values for p in parts), first._backend)

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

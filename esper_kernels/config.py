"""PPOLossConfig: every knob of docs/semantics.md section 2, validated at construction."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

from .layout import HeadLayout

__all__ = ["PPOLossConfig", "ResolvedConfig"]

PerHead = Mapping[str, float] | Sequence[float] | None
PerHeadOptional = Mapping[str, float | None] | Sequence[float | None] | None


#: the largest finite float32: every number reaches the kernels as a float32
FLOAT32_MAX = 3.4028234663852886e38


def _finite(
    name: str,
    value: object,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"PPOLossConfig.{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"PPOLossConfig.{name}: expected a finite number, got {value!r}")
    if abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"PPOLossConfig.{name}: {value!r} overflows float32 (the loss is computed in float32; "
            f"expected a magnitude <= {FLOAT32_MAX:.4g})"
        )
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"PPOLossConfig.{name}: expected {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"PPOLossConfig.{name}: expected {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _freeze_per_head(name: str, value, check) -> object:
    if value is None:
        return None
    if isinstance(value, Mapping):
        frozen = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"PPOLossConfig.{name}: keys must be head names (str), got {k!r}")
            frozen[k] = check(f"{name}[{k!r}]", v)
        return MappingProxyType(frozen)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"PPOLossConfig.{name}: expected a mapping by head name or a sequence in layout order, "
            f"got {type(value).__name__}"
        )
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))


class ResolvedConfig(NamedTuple):
    """The config against a layout, as plain numbers the backends read."""

    eps_low: float
    eps_high: float
    log_ratio_clamp: float
    joint_log_ratio_clamp: float  # inf = no clamp
    per_head: bool
    normalize_advantages: bool
    normalize_entropy: bool
    entropy_coef: float
    entropy_coef_per_head: tuple[float, ...]
    prob_floor: tuple[float, ...]  # <= 0 = no floor for that head
    value_coef: float
    value_clip: float  # inf = no clipping
    mask_fill: float  # -inf when invalid actions are excluded (mask_exclude)
    mask_exclude: bool  # config.mask_fill is None: invalid actions are excluded from max and sum
    advantage_std_unbiased: bool  # advantage_std == "unbiased"
    advantage_eps: float
    advantage_eps_add: bool
    ratio_std_unbiased: bool  # ratio_std == "unbiased"


@dataclass(frozen=True)
class PPOLossConfig:
    """The loss of docs/semantics.md. Per-head fields take a mapping by head name or a sequence in layout order.

    loss = PL + entropy_coef * EL + value_coef * VL with EL = -sum_h k_h E_h.

    ``mask_fill=None`` (default) excludes invalid actions from every max and sum (probability exactly 0); a
    float fills their logits with it instead (esper's -1e4, sb3-contrib's -1e8). With
    ``normalize_advantages``, A becomes (A - mean_w A) / max(std_w A, advantage_eps), or / (std_w A +
    advantage_eps) with ``advantage_eps_add``; ``advantage_std`` is the weighted population std or, "unbiased",
    that times sqrt(n / (n - 1)) with n present steps. ``ratio_std`` picks the same for the ratio_std metric.
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    log_ratio_clamp: float = 20.0
    joint_log_ratio_clamp: float | None = 30.0
    surrogate: Literal["joint", "per_head"] = "joint"
    normalize_advantages: bool = False
    normalize_entropy: bool = False
    entropy_coef: float = 0.0
    entropy_coef_per_head: PerHead = field(default=None, hash=False)
    prob_floor: PerHeadOptional = field(default=None, hash=False)
    value_coef: float = 0.5
    value_clip: float | None = None
    mask_fill: float | None = None
    advantage_std: Literal["population", "unbiased"] = "population"
    advantage_eps: float = 1e-8
    advantage_eps_add: bool = False
    ratio_std: Literal["population", "unbiased"] = "population"

    def __post_init__(self) -> None:
        _finite("clip_eps", self.clip_eps, low=0.0, low_open=True, high=1.0, high_open=True)
        if self.clip_eps_high is not None:
            _finite("clip_eps_high", self.clip_eps_high, low=0.0, low_open=True)
        _finite("log_ratio_clamp", self.log_ratio_clamp, low=0.0, low_open=True, high=80.0)
        if self.joint_log_ratio_clamp is not None:
            _finite("joint_log_ratio_clamp", self.joint_log_ratio_clamp, low=0.0, low_open=True, high=80.0)
        if self.surrogate not in ("joint", "per_head"):
            raise ValueError(f"PPOLossConfig.surrogate: expected 'joint' or 'per_head', got {self.surrogate!r}")
        for flag in ("normalize_advantages", "normalize_entropy", "advantage_eps_add"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"PPOLossConfig.{flag}: expected a bool, got {getattr(self, flag)!r}")
        _finite("entropy_coef", self.entropy_coef, low=0.0)
        _finite("value_coef", self.value_coef, low=0.0)
        if self.value_clip is not None:
            _finite("value_clip", self.value_clip, low=0.0, low_open=True)
        if self.mask_fill is not None:
            _finite("mask_fill", self.mask_fill, high=-1.0)
        for name in ("advantage_std", "ratio_std"):
            if getattr(self, name) not in ("population", "unbiased"):
                raise ValueError(
                    f"PPOLossConfig.{name}: expected 'population' or 'unbiased', got {getattr(self, name)!r}"
                )
        _finite("advantage_eps", self.advantage_eps, low=0.0, low_open=True)

        def coef(name: str, v: object) -> float:
            return _finite(name, v, low=0.0)

        def floor(name: str, v: object) -> float | None:
            return None if v is None else _finite(name, v, low=0.0, low_open=True, high=1.0, high_open=True)

        object.__setattr__(
            self, "entropy_coef_per_head", _freeze_per_head("entropy_coef_per_head", self.entropy_coef_per_head, coef)
        )
        object.__setattr__(self, "prob_floor", _freeze_per_head("prob_floor", self.prob_floor, floor))

    def _per_head(self, name: str, layout: HeadLayout, default):
        value = getattr(self, name)
        if value is None:
            return [default] * layout.num_heads
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in layout.names]
            if unknown:
                raise ValueError(f"PPOLossConfig.{name}: unknown head(s) {unknown}; heads are {list(layout.names)}")
            return [value.get(n, default) for n in layout.names]
        if len(value) != layout.num_heads:
            raise ValueError(
                f"PPOLossConfig.{name}: expected {layout.num_heads} values (one per head, in layout "
                f"order {list(layout.names)}), got {len(value)}"
            )
        return list(value)

    def resolve(self, layout: HeadLayout) -> ResolvedConfig:
        """Numbers per head for ``layout``; raises if a per-head field does not fit it. Cached per layout (the
        config is immutable: its per-head fields are frozen to tuples and read-only mappings)."""
        key = (layout.names, layout.sizes)
        cache = self.__dict__.get("_resolved")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_resolved", cache)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = self._resolve(layout)
        return hit

    def _resolve(self, layout: HeadLayout) -> ResolvedConfig:
        k = self._per_head("entropy_coef_per_head", layout, 1.0)
        f = self._per_head("prob_floor", layout, None)
        return ResolvedConfig(
            eps_low=float(self.clip_eps),
            eps_high=float(self.clip_eps if self.clip_eps_high is None else self.clip_eps_high),
            log_ratio_clamp=float(self.log_ratio_clamp),
            joint_log_ratio_clamp=math.inf if self.joint_log_ratio_clamp is None else float(self.joint_log_ratio_clamp),
            per_head=self.surrogate == "per_head",
            normalize_advantages=self.normalize_advantages,
            normalize_entropy=self.normalize_entropy,
            entropy_coef=float(self.entropy_coef),
            entropy_coef_per_head=tuple(float(x) for x in k),
            prob_floor=tuple(-1.0 if x is None else float(x) for x in f),
            value_coef=float(self.value_coef),
            value_clip=math.inf if self.value_clip is None else float(self.value_clip),
            mask_fill=-math.inf if self.mask_fill is None else float(self.mask_fill),
            mask_exclude=self.mask_fill is None,
            advantage_std_unbiased=self.advantage_std == "unbiased",
            advantage_eps=float(self.advantage_eps),
            advantage_eps_add=self.advantage_eps_add,
            ratio_std_unbiased=self.ratio_std == "unbiased",
        )

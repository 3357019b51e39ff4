"""The backend interface: what a backend returns (``RawOutput``), what it supports (``Supports``, as data) and the
base class that turns that data into the reasons a call cannot run (xformers style).

A backend declares ``supports``: device types, logits dtypes, maximum heads, the minimum CUDA compute capability
(per dtype where it differs) and the tolerances the test suite compares it with; ``Backend.not_supported_reasons``
derives every reason from it, and a backend adds only what data cannot say (``extra_reasons``). Machine-level
reasons (a missing build, no device) are ``unavailable_reasons``. One capability cache serves every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..config import ResolvedConfig
from ..inputs import PPOInputs

__all__ = ["RawOutput", "Supports", "Backend", "device_capability", "dtype_name"]


class RawOutput(NamedTuple):
    """What a backend returns before the API wraps it: flat per-step outputs and the statistics vector."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    entropy_loss: torch.Tensor
    value_loss: torch.Tensor
    log_probs: torch.Tensor  # [N, H]
    entropy: torch.Tensor  # [N, H]
    joint_ratio: torch.Tensor  # [N]
    stats: torch.Tensor  # [GLOBAL_SIZE + H * HEAD_SIZE] float32 (esper_kernels.schema)


@dataclass(frozen=True)
class Supports:
    """What a backend can run, and how closely the test suite holds it to the reference (docs/semantics.md 7)."""

    devices: tuple[str, ...]  # device types of the tensors it runs on
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)  # logits dtypes
    max_heads: int | None = None
    min_capability: tuple[int, int] | None = None  # oldest CUDA compute capability (CUDA tensors)
    dtype_capability: dict = field(default_factory=dict)  # dtype -> oldest capability for that dtype
    rtol: float = 1e-5  # outputs, metrics and float32 gradients
    atol: float = 1e-6
    float64_arbiter: bool = True  # gradient mismatches re-judged against the float64 reference


_CAPABILITY: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of ``device`` (a driver query the first time only)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Backend:
    """A way to compute the loss. Subclasses set ``name`` and ``supports`` and implement ``forward``."""

    name: str = ""
    supports: Supports = Supports(devices=())

    @property
    def devices(self) -> tuple[str, ...]:
        return self.supports.devices

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing build, no device); empty if it can."""
        return []

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        """Why this backend cannot run this particular call: from ``supports``, then ``extra_reasons``."""
        s = self.supports
        dev = inputs.device
        if dev.type not in s.devices:
            return [f"runs on {'/'.join(s.devices)} tensors, got {dev.type}"]
        reasons = []
        dtype = inputs.logits_dtype
        if dtype not in s.dtypes:
            reasons.append(
                f"{dtype_name(dtype)} logits are not supported (supported: "
                f"{', '.join(dtype_name(d) for d in s.dtypes)}; float64 runs on the reference backend)"
            )
        if s.max_heads is not None and inputs.layout.num_heads > s.max_heads:
            reasons.append(f"at most {s.max_heads} heads (got {inputs.layout.num_heads})")
        if dev.type == "cuda" and torch.version.hip is None and (s.min_capability or s.dtype_capability):
            cap = device_capability(dev)
            if s.min_capability and cap < s.min_capability:
                reasons.append(
                    f"GPU compute capability {cap[0]}.{cap[1]} is older than the "
                    f"{s.min_capability[0]}.{s.min_capability[1]} this backend is built for"
                )
            need = s.dtype_capability.get(dtype)
            if need and cap < need:
                reasons.append(
                    f"{dtype_name(dtype)} logits need compute capability {need[0]}.{need[1]} (this "
                    f"GPU: {cap[0]}.{cap[1]})"
                )
        return reasons + self.extra_reasons(inputs, cfg)

    def extra_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        """Reasons the ``supports`` data cannot express (none by default)."""
        return []

    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        raise NotImplementedError

    #: a backend with its own kernel for the metric table sets this (``metric_table``); the default derivation
    #: (``esper_kernels.metrics._derive_table``, torch ops or numpy) serves the others
    has_metric_table = False

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        """Every metric of the float32 statistics vector ``stats``, in ``PPOMetrics`` order (no host sync)."""
        raise NotImplementedError

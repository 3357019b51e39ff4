"""The backend interface and the reference backend."""

from __future__ import annotations

import torch

from ..config import ResolvedConfig
from ..inputs import PPOInputs
from ..reference import RawOutput, reference_forward

__all__ = ["Backend", "ReferenceBackend"]


class Backend:
    """A way to compute the loss. Subclasses set ``name`` and ``devices`` and implement ``forward``."""

    name: str = ""
    devices: tuple[str, ...] = ()

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing build, no device); empty if it can."""
        return []

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        """Why this backend cannot run this particular call (device, dtype, size); empty if it can."""
        if inputs.device.type not in self.devices:
            return [f"runs on {'/'.join(self.devices)} tensors, got {inputs.device.type}"]
        return []

    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        raise NotImplementedError

    #: a backend with its own kernel for the metric table sets this (``metric_table``); the default derivation
    #: (``esper_kernels.metrics._derive_table``, torch ops or numpy) serves the others
    has_metric_table = False

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        """Every metric of the float32 statistics vector ``stats``, in ``PPOMetrics`` order (no host sync)."""
        raise NotImplementedError


class ReferenceBackend(Backend):
    """Plain PyTorch (autograd for the gradient); any device, any float dtype, float64 included."""

    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        return []

    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        return reference_forward(inputs, cfg)

"""The ``reference`` backend: ``esper_kernels.reference`` (plain PyTorch, autograd) behind the Backend interface."""

from __future__ import annotations

import torch

from ..config import ResolvedConfig
from ..inputs import PPOInputs
from ..reference import reference_forward
from .base import Backend, RawOutput, Supports

__all__ = ["ReferenceBackend", "BACKENDS"]


class ReferenceBackend(Backend):
    """Plain PyTorch (autograd for the gradient); any device, any float dtype, float64 included."""

    name = "reference"
    supports = Supports(
        devices=("cpu", "cuda", "mps", "xpu", "meta"),
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
    )

    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        return reference_forward(inputs, cfg)


BACKENDS = {"reference": ReferenceBackend()}

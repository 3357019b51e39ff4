"""What "auto" prefers on CUDA tensors, from the benchmarks (benchmarks/results, notes in benchmarks/NOTES.md)."""

from __future__ import annotations

from ..inputs import PPOInputs


def cuda_preference(inputs: PPOInputs) -> list[str]:
    """Fused CUDA-device backends, fastest first, for this call's shape."""
    return ["triton", "cuda"]

"""The providers (reference eager and compiled, the fused backends, their CUDA graphs) and which of them run here."""

from __future__ import annotations

import torch

from ..backends import available_backends

__all__ = ["PROVIDERS", "resolve_providers"]

# provider name -> (kind, backend, torch.compile mode)
PROVIDERS: dict[str, tuple[str, str, str | None]] = {
    "reference": ("eager", "reference", None),
    "reference_compile": ("compile", "reference", "default"),
    "reference_compile_ro": ("compile", "reference", "reduce-overhead"),
    "triton": ("eager", "triton", None),
    "cuda": ("eager", "cuda", None),
    "cpu": ("eager", "cpu", None),
    "triton_graph": ("graph", "triton", None),
    "cuda_graph": ("graph", "cuda", None),
    "reference_graph": ("graph", "reference", None),
}


def resolve_providers(
    device: torch.device, requested: list[str] | None, include_compile: bool
) -> tuple[list[str], list[tuple[str, str]]]:
    """(providers to measure, [(provider, why not)]) for this device; ``requested`` None = every applicable one."""
    infos = available_backends()
    chosen, skipped = [], []
    names = requested if requested is not None else list(PROVIDERS)
    for name in names:
        if name not in PROVIDERS:
            raise SystemExit(f"bench: unknown provider {name!r}; expected some of {', '.join(PROVIDERS)}")
        kind, backend, cmode = PROVIDERS[name]
        explicit = requested is not None
        info = infos[backend]
        if not info.available:
            skipped.append((name, "; ".join(info.reasons)))
        elif device.type not in info.devices:
            skipped.append((name, f"runs on {'/'.join(info.devices)}, not {device.type}"))
        elif kind == "graph" and device.type != "cuda":
            skipped.append((name, "CUDA graphs need a GPU"))
        elif kind == "graph" and backend == "reference" and not explicit:
            skipped.append((name, "measured only when asked for by name"))
        elif cmode == "reduce-overhead" and device.type != "cuda":
            skipped.append((name, "reduce-overhead (CUDA graphs) needs a GPU"))
        elif kind == "compile" and not include_compile and not explicit:
            skipped.append((name, "torch.compile is in --full (compiles take minutes here); name it to include it"))
        elif backend == "triton" and device.type == "cpu" and not explicit:
            skipped.append((name, "the Triton interpreter on CPU is a correctness tool; name it to include it"))
        else:
            chosen.append(name)
    return chosen, skipped

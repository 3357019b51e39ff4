"""Backend registry: which backends can run here, why the others cannot, and what "auto" picks.

Every backend lives in a module named by ``_REGISTRY`` that exposes ``BACKENDS[name]``; a module that is missing
or fails to import makes the backend unavailable with the import error as its reason. Each backend declares
what it supports as data (``base.Supports``), and the base class turns that into the reasons a call cannot run;
an explicit request for a backend that cannot run raises with every reason. "auto" takes the first backend that
supports the call from a per-device order (``_auto_order``): the fused ``cpu`` backend for CPU tensors, for
CUDA tensors ``triton`` and ``cuda`` ordered by shape from the GPU measurements (``choice.py``), and
``reference`` last everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from ..config import ResolvedConfig
from ..inputs import PPOInputs
from .base import Backend

__all__ = [
    "BackendInfo",
    "available_backends",
    "get_backend",
    "select_backend",
    "BACKEND_NAMES",
    "BackendUnavailableError",
]

#: every backend and the module that defines it (as ``BACKENDS[name]``), in available_backends() order
_REGISTRY = {
    "reference": "esper_kernels.backends.reference_backend",
    "triton": "esper_kernels.backends.triton_backend",
    "cuda": "esper_kernels.backends.native",
    "cpu": "esper_kernels.backends.native",
}
BACKEND_NAMES = tuple(_REGISTRY)
_cache: dict[str, Backend | str] = {}
# whether each module is in this build, looked up once (no import)
_PRESENT = {name: importlib.util.find_spec(module) is not None for name, module in _REGISTRY.items()}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reasons: tuple[str, ...]  # why it cannot run here (empty when available)
    devices: tuple[str, ...]  # device types it runs on

    def __str__(self) -> str:
        status = "available" if self.available else "unavailable: " + "; ".join(self.reasons)
        return f"{self.name} ({', '.join(self.devices) or '-'}): {status}"


def _load(name: str) -> Backend | str:
    """The backend object, or the reason it cannot be loaded. The first load of each backend happens in
    ``_machine_reasons`` (outside any torch.compile graph), so a traced call only reads the cache."""
    if name in _cache:
        return _cache[name]
    result: Backend | str
    module = _REGISTRY[name]
    if not _PRESENT[name]:
        result = f"not part of this build (module {module} not found)"
    else:
        try:
            result = importlib.import_module(module).BACKENDS[name]
        except Exception as e:  # an import error is a reason, not a crash
            result = f"import failed: {type(e).__name__}: {e}"
    _cache[name] = result
    return result


def available_backends() -> dict[str, BackendInfo]:
    """Every backend name with whether it can run on this machine and, if not, why."""
    out = {}
    for name in BACKEND_NAMES:
        b = _load(name)
        if isinstance(b, str):
            out[name] = BackendInfo(name, False, (b,), ())
        else:
            reasons = _machine_reasons(name)
            out[name] = BackendInfo(name, not reasons, reasons, tuple(b.devices))
    return out


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {list(BACKEND_NAMES) + ['auto']}")
    b = _load(name)
    if isinstance(b, str):
        raise BackendUnavailableError(f"backend {name!r} cannot run: {b}")
    return b


#: backends found able to run on this machine (a backend that could run once stays able to: no re-query)
_RUNNABLE: set[str] = set()


@torch.compiler.assume_constant_result
def _machine_reasons(name: str) -> tuple[str, ...]:
    """``unavailable_reasons()`` of a loaded backend. Under torch.compile this runs once, outside the graph, at
    trace time (the checks find_spec, query the driver or call into the extension, all graph breaks)."""
    if name in _RUNNABLE and name in _cache:
        return ()
    b = _load(name)
    reasons = (b,) if isinstance(b, str) else tuple(b.unavailable_reasons())
    if not reasons:
        _RUNNABLE.add(name)
    return reasons


def _call_reasons(b: Backend, machine: tuple[str, ...], inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
    """Why ``b`` cannot run this call: its machine-level reasons, else the call's own."""
    return list(machine) or b.not_supported_reasons(inputs, cfg)


def _auto_order(inputs: PPOInputs) -> list[str]:
    if inputs.device.type == "cuda":
        from .choice import cuda_preference

        return cuda_preference(inputs) + ["reference"]
    if inputs.device.type == "cpu":
        # measured faster than the reference at every benchmarked shape, floors included (benchmarks/NOTES.md)
        return ["cpu", "reference"]
    return ["reference"]


def select_backend(name: str, inputs: PPOInputs, cfg: ResolvedConfig) -> Backend:
    """The backend that runs this call: ``name``, or the first that supports it for "auto"."""
    if name == "auto":
        tried = []
        for candidate in _auto_order(inputs):
            # _machine_reasons first: under torch.compile it loads the backend outside the graph, so that the
            # traced _load below finds it in the cache (a traced cache miss would contradict its own guard)
            machine = _machine_reasons(candidate)
            b = _load(candidate)
            if isinstance(b, str):
                tried.append(f"{candidate}: {b}")
                continue
            reasons = _call_reasons(b, machine, inputs, cfg)
            if not reasons:
                return b
            tried.append(f"{candidate}: " + "; ".join(reasons))
        raise BackendUnavailableError("backend 'auto': no backend supports this call:\n  " + "\n  ".join(tried))
    machine = _machine_reasons(name) if name in BACKEND_NAMES else ()  # first, as above
    b = get_backend(name)
    reasons = _call_reasons(b, machine, inputs, cfg)
    if reasons:
        raise BackendUnavailableError(f"backend {name!r} cannot run this call:\n  " + "\n  ".join(reasons))
    return b

"""``python -m esper_kernels info``: versions, devices and the backend table."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import available_backends


def info_text() -> str:
    lines = [
        f"esper_kernels {__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:
        lines.append(f"triton: not importable ({type(e).__name__}: {e})")
    lines.append(f"cpu threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
            )
    else:
        lines.append("cuda: no CUDA device")
    lines.append("")
    lines.append(f"{'backend':<10} {'status':<12} devices / why not")
    for name, b in available_backends().items():
        status = "available" if b.available else "unavailable"
        detail = ", ".join(b.devices) if b.available else "; ".join(b.reasons)
        lines.append(f"{name:<10} {status:<12} {detail}")
    return "\n".join(lines)

"""Where a row was measured: the device's name, the file-name slug, the commit, the Triton version, the date."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["REPO_ROOT", "commit_id", "device_name", "device_slug", "run_metadata", "triton_version"]

#: the checkout this package runs from (esper_kernels/bench/ -> the repository root)
REPO_ROOT = Path(__file__).resolve().parents[2]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the thread count PyTorch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu: {model} ({n} thread{'' if n == 1 else 's'})"


def device_slug(device: torch.device) -> str:
    """'cpu', or the GPU's model: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]+\d+[a-z0-9]*)\b", name.replace("nvidia", ""))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def commit_id() -> str:
    """$ESPER_BENCH_COMMIT, else the checkout's short hash (+dirty when tracked files changed), else 'unknown'."""
    if os.environ.get("ESPER_BENCH_COMMIT"):
        return os.environ["ESPER_BENCH_COMMIT"]
    root = REPO_ROOT
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not rev:
            return "unknown"
        # the benchmark's own outputs (benchmarks/results) do not make the measured code dirty
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)benchmarks/results",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def run_metadata(device: torch.device) -> dict[str, str]:
    """The CSV's provenance columns, the same for every row of one run: device, torch, triton, commit, date."""
    return dict(
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version(),
        commit=commit_id(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )

"""The input sets a case is timed on: how many to rotate (enough to exceed twice the cache), whether they fit in
memory, and building them from the case's synthetic batch."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .cases import Case
from .floor import floor_bytes_per_row

__all__ = ["cache_bytes", "fits", "free_bytes", "make_sets", "set_count"]


def cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's last-level cache (32 MiB when /sys does not say)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 2**20


def free_bytes(device: torch.device) -> int:
    """Free GPU memory, or the host's available memory (8 GiB when /proc does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def make_sets(case: Case, dtype: torch.dtype, device: torch.device, n_sets: int) -> list[dict]:
    """``n_sets`` copies on ``device`` of the case's batch (seed 0), logits and values requiring grad."""
    master = case.make_batch(dtype=dtype, device="cpu", seed=0)
    sets = []
    for _ in range(n_sets):
        b = {k: v.to(device, copy=True) for k, v in master.items()}
        b["logits"].requires_grad_(True)
        b["values"].requires_grad_(True)
        sets.append(b)
    return sets


def set_count(case: Case, dtype: torch.dtype, device: torch.device, override: int | None) -> int:
    """Input sets to rotate: 1 for ``tiny``, else ``override``, else enough to exceed twice the cache (capped)."""
    if case.name == "tiny":
        return 1
    if override:
        return override
    per_set = case.n_rows * floor_bytes_per_row(case.sizes, torch.empty((), dtype=dtype).element_size(), "backward")
    limit = 64 if device.type == "cuda" else 8
    return int(min(limit, max(1, math.ceil(2 * cache_bytes(device) / per_set))))


def fits(case: Case, dtype: torch.dtype, device: torch.device, n_sets: int) -> tuple[bool, str]:
    """Inputs of every set, their gradients and the reference's [N, S] float32 temporaries (about 12 of them)."""
    e = torch.empty((), dtype=dtype).element_size()
    need = (
        n_sets * case.n_rows * floor_bytes_per_row(case.sizes, e, "backward") + case.n_rows * sum(case.sizes) * 4 * 12
    )
    free = free_bytes(device)
    if device.type == "cpu":
        need += case.n_rows * sum(case.sizes) * 4 * 3  # make_batch's own temporaries on the host
    ok = need <= 0.7 * free
    return ok, f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"

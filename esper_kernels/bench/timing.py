"""Timing: GPU time (``triton.testing.do_bench`` or CUDA events), interleaved host time, the copy bandwidth."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runners import Runner

__all__ = ["copy_bandwidth", "gpu_bench", "interleaved", "percentiles", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``times_ms``."""
    import numpy as np

    med, p20, p80 = np.percentile(np.asarray(times_ms, dtype=float), [50, 20, 80])
    return float(med), float(p20), float(p80)


def gpu_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: triton.testing.do_bench, or the same event timing where Triton is missing."""
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(max(5, int(rep_ms / est)))
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return percentiles([s.elapsed_time(e) for s, e in events])


def interleaved(
    runners: list[Runner], seconds: float, device: torch.device, min_reps: int = 3, max_reps: int = 200
) -> dict[str, tuple[float, float, float]]:
    """Host wall time of each runner's call, the runners interleaved call by call (order alternating per round).

    On a GPU the device is synchronised after each call, outside the timed region: this is host time.
    """
    est = {}
    for r in runners:
        sync(device)
        t0 = time.perf_counter()
        r.run()
        est[r.name] = time.perf_counter() - t0
        sync(device)
    reps = int(min(max_reps, max(min_reps, seconds / max(sum(est.values()), 1e-6))))
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for k in range(reps):
        for r in runners if k % 2 == 0 else runners[::-1]:
            t0 = time.perf_counter()
            r.run()
            t1 = time.perf_counter()
            sync(device)
            times[r.name].append((t1 - t0) * 1e3)
    return {name: percentiles(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large copy on ``device`` (bytes read + bytes written), median of repeated copies."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        med = gpu_bench(lambda: dst.copy_(src), warmup_ms=25, rep_ms=100)[0]
        secs = med / 1e3
    else:
        dst.copy_(src)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        secs = sorted(times)[len(times) // 2]
    return 2 * n * 4 / secs

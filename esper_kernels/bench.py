"""``python -m esper_kernels bench``: the SPEC section 7 benchmark matrix on whatever device is here.

Cases (``CASES``): esper (N = 1,800, esper's 8 heads, S = 41), rl_64k, rl_1m (same heads), wide (two heads of
1,024), vocab (one head of 32,768), and ``tiny`` (N = 16, esper heads), whose rows are the host overhead of one
call (CPU-side wall time, validate=False, no device sync inside the timed region). Dtypes fp32 and bf16 (of the
logits; every other input in the dtype ``synthetic.make_batch`` gives it). Modes:

* ``forward``: ``ppo_loss`` on logits that require grad (the graph a training step builds), metrics not derived;
* ``backward``: ``loss.backward(retain_graph=True)`` of a forward done before the timed region;
* ``full``: forward + backward + ``metrics.tensors()``, as a training step uses it.

Providers: ``reference`` (eager), ``reference_compile`` (torch.compile, default mode), ``reference_compile_ro``
(mode="reduce-overhead", GPU only), the fused backends ``triton``/``cuda``/``cpu`` where
``available_backends()`` says they run on this device, and on the GPU ``<fused>_graph``: a CUDA graph of the
call replayed (GPU time without host overhead; ``reference_graph`` only when asked for by name).

Timing: on the GPU ``triton.testing.do_bench`` (median, 20th and 80th percentiles; it flushes L2 before each
call) over input sets rotated call by call (enough sets to exceed twice the L2); on the CPU, providers are
interleaved call by call and the percentiles taken over the calls. The floor: the fewest bytes the mode must move
(``floor_bytes``) over the copy bandwidth measured in the same run (a large device-to-device copy or, on the
CPU, a large memcpy; bytes read plus written); ``floor_fraction = floor_ms / median_ms`` (NaN for ``tiny``,
whose median is host time). ``peak_extra_mb``: MiB allocated above the inputs at the peak of three calls on one
input set (``torch.cuda.max_memory_allocated``; includes outputs, saved tensors, the gradient and, for the
graph and reduce-overhead providers, the graph pools); NaN on the CPU, where PyTorch keeps no allocator
statistics.

Output: ``bench_<device>.csv`` (columns ``COLUMNS``, one row per case, provider, mode and dtype measured) and
``bench_<device>.png`` in ``--out`` (default ``benchmarks/results``), and a summary table printed last.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .backends import available_backends
from .config import PPOLossConfig
from .layout import ESPER_HEADS, HeadLayout
from .loss import ppo_loss
from .synthetic import make_batch

__all__ = ["COLUMNS", "CASES", "Case", "floor_bytes", "floor_bytes_per_row", "main", "read_csv", "summary_text"]

COLUMNS = ("case", "provider", "mode", "dtype", "n_rows", "head_sizes", "median_ms", "p20_ms", "p80_ms",
           "peak_extra_mb", "floor_ms", "floor_fraction", "device", "torch", "triton", "commit", "date")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ESPER = tuple(ESPER_HEADS.items())
_NAN = float("nan")
_MIB = 2.0 ** 20


@dataclass(frozen=True)
class Case:
    name: str
    batch_shape: tuple[int, ...]
    heads: tuple[tuple[str, int], ...]

    @property
    def n_rows(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def layout(self) -> HeadLayout:
        return HeadLayout(self.heads)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(a for _, a in self.heads)

    @property
    def head_sizes(self) -> str:
        return "/".join(str(a) for a in self.sizes)


CASES: dict[str, Case] = {
    "tiny": Case("tiny", (2, 8), _ESPER),
    "esper": Case("esper", (12, 150), _ESPER),
    "rl_64k": Case("rl_64k", (65536,), _ESPER),
    "rl_1m": Case("rl_1m", (1048576,), _ESPER),
    "wide": Case("wide", (16384,), (("left", 1024), ("right", 1024))),
    "vocab": Case("vocab", (8192,), (("token", 32768),)),
}
# the compile providers' order under a time budget: esper-shaped cases first, fp32 before bf16
_PRIORITY = ("esper", "rl_64k", "rl_1m", "wide", "vocab", "tiny")
QUICK_CASES = {"cpu": ("tiny", "esper"), "cuda": ("tiny", "esper", "rl_64k", "rl_1m")}

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
_FUSED = ("triton", "cuda", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# the floor


def floor_bytes_per_row(sizes: tuple[int, ...], logit_bytes: int, mode: str = "full", values: bool = True) -> int:
    """Bytes per step that ``mode`` must move at least, for make_batch's input dtypes.

    Per step: logits S * logit_bytes and masks S (bool) are read once by the forward and once by the backward;
    the gradient (S * logit_bytes, plus 4 for the values' gradient) is written once by the backward; the per-step
    inputs are read once: actions 8 H (int64), old log-probs 4 H, relevance H (bool), advantages, weights,
    values and returns 4 each. Per-step outputs (log_probs, entropy, joint_ratio) are not counted.
    forward = big + per-step, backward = big + gradient + per-step, full = 2 big + gradient + per-step.
    """
    S, H = sum(sizes), len(sizes)
    big = S * logit_bytes + S
    per_step = 13 * H + 8 + (8 if values else 0)
    grad = S * logit_bytes + (4 if values else 0)
    return {"forward": big + per_step, "backward": big + grad + per_step, "full": 2 * big + grad + per_step}[mode]


def floor_bytes(batch: dict, layout: HeadLayout, mode: str = "full") -> int:
    """``floor_bytes_per_row`` counted from the batch's own tensors (their real dtypes): the measured rows use this."""
    big = sum(batch[k].numel() * batch[k].element_size() for k in ("logits", "action_masks")
              if batch.get(k) is not None)
    per_step = sum(t.numel() * t.element_size() for k, t in batch.items()
                   if k not in ("logits", "action_masks") and isinstance(t, torch.Tensor))
    grad = batch["logits"].numel() * batch["logits"].element_size()
    if batch.get("values") is not None:
        grad += batch["values"].numel() * 4
    return {"forward": big + per_step, "backward": big + grad + per_step, "full": 2 * big + grad + per_step}[mode]


# ---------------------------------------------------------------------------------------------------------------
# environment


def _device_name(device: torch.device) -> str:
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


def _commit() -> str:
    if os.environ.get("ESPER_BENCH_COMMIT"):
        return os.environ["ESPER_BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return "unknown"
        # the benchmark's own outputs (benchmarks/results) do not make the measured code dirty
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 2**20


def _free_bytes(device: torch.device) -> int:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large copy on ``device`` (bytes read + bytes written), median of repeated copies."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        med = _gpu_bench(lambda: dst.copy_(src), warmup_ms=25, rep_ms=100)[0]
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


# ---------------------------------------------------------------------------------------------------------------
# timing


def _percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    import numpy as np

    med, p20, p80 = np.percentile(np.asarray(times_ms, dtype=float), [50, 20, 80])
    return float(med), float(p20), float(p80)


def _gpu_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
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
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(5, int(rep_ms / est)))]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _percentiles([s.elapsed_time(e) for s, e in events])


def _interleaved(runners: list[Runner], seconds: float, device: torch.device, min_reps: int = 3,
                 max_reps: int = 200) -> dict[str, tuple[float, float, float]]:
    """Host wall time of each runner's call, the runners interleaved call by call (order alternating per round).

    On a GPU the device is synchronised after each call, outside the timed region: this is host time.
    """
    est = {}
    for r in runners:
        _sync(device)
        t0 = time.perf_counter()
        r.run()
        est[r.name] = time.perf_counter() - t0
        _sync(device)
    reps = int(min(max_reps, max(min_reps, seconds / max(sum(est.values()), 1e-6))))
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for k in range(reps):
        for r in (runners if k % 2 == 0 else runners[::-1]):
            t0 = time.perf_counter()
            r.run()
            t1 = time.perf_counter()
            _sync(device)
            times[r.name].append((t1 - t0) * 1e3)
    return {name: _percentiles(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------------------
# runners: one provider in one mode over a list of input sets


def _loss_fns(layout: HeadLayout, config: PPOLossConfig, backend: str):
    def call(b):
        return ppo_loss(b["logits"], b["action_masks"], b["actions"], b["old_log_probs"], b["advantages"],
                        layout=layout, head_relevance=b["head_relevance"], weights=b["weights"],
                        values=b.get("values"), returns=b.get("returns"), config=config, backend=backend,
                        validate=False)

    def loss_only(b):
        return call(b).loss

    def with_metrics(b):
        out = call(b)
        return out.loss, out.metrics.tensors()

    return loss_only, with_metrics


def _clear_grads(b: dict) -> None:
    b["logits"].grad = None
    if b.get("values") is not None:
        b["values"].grad = None


def _set_compile_limits() -> None:
    cfg = torch._dynamo.config
    for attr in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), 64))


class Runner:
    """One provider in one mode. ``setup()`` warms it up (compiles, captures); ``run()`` is the timed call."""

    def __init__(self, provider: str, mode: str, sets: list[dict], layout: HeadLayout, config: PPOLossConfig,
                 device: torch.device):
        self.name = provider
        self.kind, self.backend, self.compile_mode = PROVIDERS[provider]
        self.mode = mode
        self.sets = sets
        self.device = device
        self.ro = self.compile_mode == "reduce-overhead"
        self._i = 0
        self.keep: object = None
        self.losses: list[torch.Tensor] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.graph_keep: list[object] = []
        loss_only, with_metrics = _loss_fns(layout, config, self.backend)
        self._donated: bool | None = None
        if self.kind == "compile":  # close() resets dynamo; two compile runners may coexist (interleaved groups)
            _set_compile_limits()
            if mode == "backward":  # a compiled backward with donated buffers refuses retain_graph=True
                import torch._functorch.config as fc

                self._donated, fc.donated_buffer = fc.donated_buffer, False
            fn = with_metrics if mode == "full" else loss_only
            compiled = torch.compile(fn, mode=None if self.compile_mode == "default" else self.compile_mode,
                                     dynamic=False)
            if mode == "full":
                self.fwd_m, self.fwd = compiled, None
            else:
                self.fwd, self.fwd_m = compiled, None
        else:
            self.fwd, self.fwd_m = loss_only, with_metrics

    # one complete operation of this mode on set b (untimed uses: warm-up, memory probe, graph capture)
    def _op(self, b: dict) -> object:
        if self.ro:
            torch.compiler.cudagraph_mark_step_begin()
        _clear_grads(b)
        if self.mode == "forward":
            return self.fwd(b)
        if self.mode == "backward":
            self.fwd(b).backward()
            return None
        loss, metrics = self.fwd_m(b)
        loss.backward()
        return metrics

    def peak_extra_mb(self) -> float:
        """MiB above what is allocated now (the inputs) at the peak of three operations on set 0 (the first
        operation compiles or captures); NaN off the GPU, where it does nothing."""
        b = self.sets[0]
        if self.device.type != "cuda":  # setup() warms up
            return _NAN
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if self.kind == "graph":
            self._capture(1)  # warm-up and set 0's graph: one graph's pool, not every rotated set's
        else:
            for _ in range(3):
                self.keep = self._op(b)
                self.keep = None
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        if self.kind != "graph":
            _clear_grads(b)
        return peak / _MIB

    def _capture(self, upto: int) -> None:
        """Capture a graph of ``_op`` for each of the first ``upto`` sets not captured yet (warm-up first)."""
        if not self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (lazy init, JIT compiles)
                for _ in range(3):
                    self._op(self.sets[0])
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        for b in self.sets[len(self.graphs):upto]:
            _clear_grads(b)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                keep = self._op(b)
            self.graphs.append(g)
            self.graph_keep.append(keep)
        torch.cuda.synchronize()

    def setup(self) -> None:
        if self.kind == "graph":
            if self.mode == "backward":
                raise NotImplementedError("graph providers measure forward and full only")
            self._capture(len(self.sets))
            return
        if self.mode == "backward":
            for b in self.sets:
                _clear_grads(b)
                if self.ro:
                    torch.compiler.cudagraph_mark_step_begin()
                self.losses.append(self.fwd(b))
        self.run()
        _sync(self.device)

    def run(self) -> None:
        i = self._i
        self._i = (i + 1) % len(self.sets)
        if self.kind == "graph":
            self.graphs[i].replay()
            return
        b = self.sets[i]
        if self.ro:
            torch.compiler.cudagraph_mark_step_begin()
        if self.mode == "forward":
            self.keep = self.fwd(b)
        elif self.mode == "backward":
            _clear_grads(b)
            self.losses[i].backward(retain_graph=True)
        else:
            _clear_grads(b)
            loss, metrics = self.fwd_m(b)
            loss.backward()
            self.keep = metrics

    def close(self) -> None:
        self.keep = None
        self.losses.clear()
        self.graphs.clear()
        self.graph_keep.clear()
        for b in self.sets:
            _clear_grads(b)
        if self.kind == "compile":
            self.fwd = self.fwd_m = None
            torch._dynamo.reset()
            if self._donated is not None:
                import torch._functorch.config as fc

                fc.donated_buffer, self._donated = self._donated, None


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    device: torch.device
    cases: list[str]
    dtypes: list[str]
    modes: list[str]
    providers: list[str]
    out: Path
    budget: float | None
    warmup_ms: float
    rep_ms: float
    cpu_seconds: float
    sets: int | None
    config: PPOLossConfig
    plot: bool
    copy_mb: float | None = None
    append: bool = False


def resolve_providers(device: torch.device, requested: list[str] | None, include_compile: bool
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


def _make_sets(case: Case, dtype: torch.dtype, device: torch.device, n_sets: int) -> list[dict]:
    master = make_batch(case.batch_shape, case.layout, dtype=dtype, device="cpu", seed=0)
    sets = []
    for _ in range(n_sets):
        b = {k: v.to(device, copy=True) for k, v in master.items()}
        b["logits"].requires_grad_(True)
        b["values"].requires_grad_(True)
        sets.append(b)
    return sets


def _n_sets(case: Case, dtype: torch.dtype, device: torch.device, override: int | None) -> int:
    if case.name == "tiny":
        return 1
    if override:
        return override
    per_set = case.n_rows * floor_bytes_per_row(case.sizes, torch.empty((), dtype=dtype).element_size(), "backward")
    limit = 64 if device.type == "cuda" else 8
    return int(min(limit, max(1, math.ceil(2 * _cache_bytes(device) / per_set))))


def _fits(case: Case, dtype: torch.dtype, device: torch.device, n_sets: int) -> tuple[bool, str]:
    """Inputs of every set, their gradients and the reference's [N, S] float32 temporaries (about 12 of them)."""
    e = torch.empty((), dtype=dtype).element_size()
    need = n_sets * case.n_rows * floor_bytes_per_row(case.sizes, e, "backward") \
        + case.n_rows * sum(case.sizes) * 4 * 12
    free = _free_bytes(device)
    if device.type == "cpu":
        need += case.n_rows * sum(case.sizes) * 4 * 3  # make_batch's own temporaries on the host
    ok = need <= 0.7 * free
    return ok, f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def _err(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class Bench:
    def __init__(self, opts: Options):
        self.o = opts
        self.device = opts.device
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.t_start = time.perf_counter()
        self.compile_default = 60.0 if self.device.type == "cuda" else 150.0
        self.compile_seen: list[float] = []
        self.meta = dict(device=_device_name(self.device), torch=torch.__version__, triton=_triton_version(),
                         commit=_commit(), date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.slug = device_slug(self.device)
        self.csv_path = opts.out / f"bench_{self.slug}.csv"
        self.png_path = opts.out / f"bench_{self.slug}.png"
        self.bandwidth = _NAN
        self.prior = read_csv(self.csv_path) if opts.append and self.csv_path.exists() else []
        self._sets_key: tuple | None = None
        self._sets: list[dict] = []

    # -- helpers ------------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    @property
    def compile_estimate(self) -> float:
        """Seconds a compile (and its first calls) is expected to take: the longest seen so far."""
        return max(self.compile_seen) if self.compile_seen else self.compile_default

    def over_budget(self, extra: float = 0.0) -> bool:
        return self.o.budget is not None and self.elapsed() + extra > self.o.budget

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        self.log(f"skip {what}: {why}")

    def sets_for(self, case: Case, dtype_name: str) -> list[dict] | None:
        key = (case.name, dtype_name)
        if self._sets_key == key:
            return self._sets
        self._sets, self._sets_key = [], None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dtype = DTYPES[dtype_name]
        n = _n_sets(case, dtype, self.device, self.o.sets)
        ok, why = _fits(case, dtype, self.device, n)
        if not ok:
            self.skip(f"{case.name} {dtype_name}", f"does not fit memory ({why})")
            return None
        t0 = time.perf_counter()
        self._sets = _make_sets(case, dtype, self.device, n)
        self._sets_key = key
        self.log(f"{case.name} {dtype_name}: N={case.n_rows} heads={case.head_sizes}, {n} input set(s), "
                 f"made in {time.perf_counter() - t0:.1f}s")
        return self._sets

    def add_row(self, case: Case, provider: str, mode: str, dtype_name: str, stats: tuple[float, float, float],
                peak_mb: float, floor_ms: float) -> None:
        med, p20, p80 = stats
        frac = _NAN if case.name == "tiny" else floor_ms / med
        row = dict(case=case.name, provider=provider, mode=mode, dtype=dtype_name, n_rows=case.n_rows,
                   head_sizes=case.head_sizes, median_ms=med, p20_ms=p20, p80_ms=p80, peak_extra_mb=peak_mb,
                   floor_ms=floor_ms, floor_fraction=frac, **self.meta)
        self.rows.append(row)
        self.log(f"{case.name:<7} {dtype_name} {mode:<8} {provider:<22} {med:10.4f} ms [{p20:.4f}, {p80:.4f}]"
                 f"  floor {floor_ms:.4f} ms ({frac:.3f})  peak {peak_mb:.1f} MiB")

    # -- one group: a case, a dtype, a mode and some providers ----------------------------------------------------
    def group(self, case: Case, dtype_name: str, mode: str, providers: list[str]) -> None:
        if not providers:
            return
        what = f"{case.name} {dtype_name} {mode}"
        if self.over_budget():
            self.skip(f"{what} [{', '.join(providers)}]", "time budget spent")
            return
        sets = self.sets_for(case, dtype_name)
        if sets is None:
            return
        if case.name == "tiny" or self.device.type == "cpu" or mode == "backward":  # graphs: forward and full only
            providers = [p for p in providers if PROVIDERS[p][0] != "graph"]
            if not providers:
                return
        floor_ms = floor_bytes(sets[0], case.layout, mode) / self.bandwidth * 1e3
        ready: list[tuple[Runner, float]] = []
        for p in providers:
            kind = PROVIDERS[p][0]
            if kind == "compile" and self.over_budget(self.compile_estimate):
                self.skip(f"{what} {p}", f"time budget (a compile takes about {self.compile_estimate:.0f}s)")
                continue
            runner = None
            try:
                runner = Runner(p, mode, sets, case.layout, self.o.config, self.device)
                t0 = time.perf_counter()
                peak = runner.peak_extra_mb()
                runner.setup()
                if kind == "compile":
                    self.compile_seen.append(time.perf_counter() - t0)
            except Exception as e:  # one provider failing must not stop the others
                self.skip(f"{what} {p}", _err(e))
                if runner is not None:
                    runner.close()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if self.device.type == "cuda" and case.name != "tiny":
                try:
                    stats = _gpu_bench(runner.run, self.o.warmup_ms, self.o.rep_ms)
                except Exception as e:
                    self.skip(f"{what} {p}", _err(e))
                    runner.close()
                    continue
                self.add_row(case, p, mode, dtype_name, stats, peak, floor_ms)
                runner.close()
            else:
                ready.append((runner, peak))
        if ready:  # CPU (and host-overhead rows): interleaved
            seconds = (min(0.5, self.o.cpu_seconds) if case.name == "tiny" else self.o.cpu_seconds) * len(ready)
            try:
                results = _interleaved([r for r, _ in ready], seconds, self.device)
            except Exception as e:
                self.skip(f"{what} [{', '.join(r.name for r, _ in ready)}]", _err(e))
                results = {}
            for r, peak in ready:
                if r.name in results:
                    self.add_row(case, r.name, mode, dtype_name, results[r.name], peak, floor_ms)
                r.close()
        self.write_csv()

    # -- the whole matrix ---------------------------------------------------------------------------------------
    def run(self, providers: list[str]) -> None:
        o = self.o
        self.bandwidth = copy_bandwidth(self.device, None if o.copy_mb is None else int(o.copy_mb * _MIB))
        self.log(f"device: {self.meta['device']}; copy bandwidth {self.bandwidth / 1e9:.1f} GB/s (read + write)")
        compile_p = [p for p in providers if PROVIDERS[p][0] == "compile"]
        other_p = [p for p in providers if PROVIDERS[p][0] != "compile"]
        cases = [CASES[c] for c in o.cases]
        if self.device.type == "cpu":
            # one pass, every provider of a group interleaved
            for case in cases:
                for dt in o.dtypes:
                    for mode in o.modes:
                        self.group(case, dt, mode, providers)
            return
        # GPU: everything but torch.compile first (cheap), then the compiles in priority order: full mode for the
        # esper-shaped cases first, fp32 before bf16, so a time budget cuts the least important ones
        for case in cases:
            for dt in o.dtypes:
                for mode in o.modes:
                    self.group(case, dt, mode, other_p)
        if not compile_p:
            return
        order = sorted(((c, dt) for c in cases for dt in o.dtypes),
                       key=lambda cd: (cd[0].name in ("wide", "vocab", "tiny"), o.dtypes.index(cd[1]),
                                       _PRIORITY.index(cd[0].name)))
        for modes in (["full"], ["forward", "backward"]):
            for case, dt in order:
                for mode in modes:
                    if mode in o.modes:
                        self.group(case, dt, mode, compile_p)

    # -- output ---------------------------------------------------------------------------------------------------
    def write_csv(self) -> None:
        rows = self.rows
        if self.o.append and self.prior:
            new = {_key(r): r for r in self.rows}
            rows = [new.pop(_key(r), r) for r in self.prior] + list(new.values())
        write_csv(rows, self.csv_path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in COLUMNS])
    tmp.replace(path)


_NUMERIC = ("n_rows", "median_ms", "p20_ms", "p80_ms", "peak_extra_mb", "floor_ms", "floor_fraction")


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMERIC:
            r[k] = int(r[k]) if k == "n_rows" else float(r[k])
    return rows


def _index(seq, x) -> int:
    return list(seq).index(x) if x in seq else len(seq)


def _order(r: dict) -> tuple:
    """Summary order: case (esper first), dtype, provider (as PROVIDERS lists them)."""
    return (_index(("esper", "rl_64k", "rl_1m", "wide", "vocab", "tiny"), r["case"]), _index(DTYPES, r["dtype"]),
            _index(PROVIDERS, r["provider"]), r["provider"])


def _key(r: dict) -> tuple:
    return r["case"], r["provider"], r["mode"], r["dtype"]


def _ref_median(rows: list[dict], r: dict) -> float:
    for q in rows:
        if (q["case"], q["mode"], q["dtype"], q["provider"]) == (r["case"], r["mode"], r["dtype"], "reference"):
            return q["median_ms"]
    return _NAN


def summary_text(rows: list[dict], bandwidth: float | None = None, skipped: list[str] | None = None) -> str:
    """The short table printed last: full-mode rows and host-overhead (tiny) rows."""
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"device: {r0['device']} | torch {r0['torch']} | triton {r0['triton']} | commit {r0['commit']}"
                     f" | {r0['date']}")
    if bandwidth is not None:
        lines.append(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    head = f"{'case':<7} {'dtype':<5} {'provider':<21} {'median_ms':>10} {'p20-p80 ms':>19} {'x ref':>7} " \
           f"{'floor':>6} {'peakMiB':>8}"
    shown = sorted((r for r in rows if r["mode"] == "full" and r["case"] != "tiny"), key=_order)
    if shown:
        lines += ["", "full (forward+backward+metrics); x ref = reference eager median / median; floor = floor "
                      "fraction", head]
        for r in shown:
            lines.append(_line(r, _ref_median(rows, r)))
    tiny = sorted((r for r in rows if r["case"] == "tiny"), key=lambda r: (_index(MODES, r["mode"]), _order(r)))
    if tiny:
        lines += ["", "host overhead (case tiny, N=16: CPU-side time of one call, validate=False)",
                  f"{'mode':<8} {'dtype':<5} {'provider':<21} {'median_ms':>10} {'p20-p80 ms':>19}"]
        for r in tiny:
            lines.append(f"{r['mode']:<8} {r['dtype']:<5} {r['provider']:<21} {r['median_ms']:>10.4g} "
                         f"{r['p20_ms']:>9.4g}-{r['p80_ms']:.4g}")
    if skipped:
        lines += ["", f"not measured ({len(skipped)}):"] + [f"  {s}" for s in skipped[:12]]
        if len(skipped) > 12:
            lines.append(f"  ... and {len(skipped) - 12} more (see the log above)")
    return "\n".join(lines)


def _line(r: dict, ref: float) -> str:
    x = ref / r["median_ms"] if ref == ref else _NAN
    return (f"{r['case']:<7} {r['dtype']:<5} {r['provider']:<21} {r['median_ms']:>10.4g} "
            f"{r['p20_ms']:>9.4g}-{r['p80_ms']:<9.4g} {x:>7.2f} {r['floor_fraction']:>6.3f} {r['peak_extra_mb']:>8.1f}")


def plot(rows: list[dict], path: Path) -> bool:
    """Speedup over the reference eager (full mode) and floor fraction against N, per provider and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"bench: no plot ({type(e).__name__}: {e})")
        return False
    full = [r for r in rows if r["mode"] == "full" and r["case"] != "tiny"]
    if not full:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    providers = list(dict.fromkeys(r["provider"] for r in full))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    markers = {"esper": "o", "rl_64k": "o", "rl_1m": "o", "wide": "s", "vocab": "^"}
    for p in providers:
        for dt, ls in (("fp32", "-"), ("bf16", "--")):
            pts = sorted((r for r in full if r["provider"] == p and r["dtype"] == dt), key=lambda r: r["n_rows"])
            if not pts:
                continue
            label = f"{p} {dt}"
            for ax, key in ((axes[0], "speedup"), (axes[1], "floor_fraction")):
                if key == "speedup":
                    ys = [_ref_median(rows, r) / r["median_ms"] for r in pts]
                else:
                    ys = [r["floor_fraction"] for r in pts]
                xs = [r["n_rows"] for r in pts]
                esper_like = [(x, y) for x, y, r in zip(xs, ys, pts) if r["head_sizes"] == CASES["esper"].head_sizes]
                if esper_like:
                    ax.plot(*zip(*esper_like), ls=ls, color=colors[p], label=label)
                    label = None
                for x, y, r in zip(xs, ys, pts):
                    ax.plot([x], [y], marker=markers.get(r["case"], "x"), color=colors[p], ls="none", label=label)
                    label = None
                label = f"{p} {dt}"
    for c in ("esper", "rl_64k", "rl_1m", "wide", "vocab"):
        for ax in axes:
            ax.axvline(CASES[c].n_rows, color="0.85", lw=0.8, zorder=0)
            ax.annotate(c, (CASES[c].n_rows, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="0.4")
    axes[0].set(xscale="log", yscale="log", xlabel="N (steps)", ylabel="speedup over reference eager",
                title="forward+backward+metrics: speedup")
    axes[1].axhline(1.0, color="0.5", lw=0.8)
    axes[1].set(xscale="log", yscale="log", xlabel="N (steps)", ylabel="floor time / median time (log)",
                title="fraction of the bandwidth floor (1 = at the floor)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                   title="solid fp32, dashed bf16\no esper heads, s wide, ^ vocab", title_fontsize=7)
    r0 = full[0]
    fig.suptitle(f"esper_kernels ppo_loss on {r0['device']} (torch {r0['torch']}, commit {r0['commit']})",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _default_out() -> Path:
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks").is_dir():
        return root / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def _split(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m esper_kernels bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the small subset (default): cases tiny and esper on CPU "
                   "(plus rl_64k and rl_1m on GPU), both dtypes, every mode, no torch.compile")
    g.add_argument("--full", action="store_true", help="every case, dtype, mode and provider")
    p.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--providers", help=f"comma-separated, of {', '.join(PROVIDERS)}")
    p.add_argument("--dtypes", help="comma-separated, of fp32, bf16")
    p.add_argument("--modes", help="comma-separated, of forward, backward, full")
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: work not started by then is skipped (the compiles go last, by priority)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (GPU)")
    p.add_argument("--cpu-seconds", type=float, default=None,
                   help="timed seconds per provider and group on the CPU (default 1 quick, 3 full); at least 3 calls")
    p.add_argument("--sets", type=int, default=None, help="input sets to rotate (default: enough to exceed 2x cache)")
    p.add_argument("--copy-mb", type=float, default=None,
                   help="size of the bandwidth copy's source, MiB (default 1024 on GPU, 256 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU (default: PyTorch's); recorded in the device column")
    p.add_argument("--surrogate", choices=("joint", "per_head"), default="joint")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing bench_<device>.csv: new rows replace rows of the same case, "
                        "provider, mode and dtype; the others stay (the plot and summary show the merged rows)")
    p.add_argument("--from-csv", type=Path, default=None,
                   help="measure nothing: print the summary of this CSV and plot it (to --out, or beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_csv is not None:
        rows = read_csv(a.from_csv)
        if not a.no_plot and rows:
            out = a.out or a.from_csv.parent
            png = out / (a.from_csv.stem + ".png")
            if plot(rows, png):
                print(f"plot: {png}")
        print(summary_text(rows))
        return 0
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace) -> int:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device")
    full = bool(a.full)
    cases = _split(a.cases) or (list(CASES) if full else list(QUICK_CASES.get(device.type, QUICK_CASES["cpu"])))
    dtypes = _split(a.dtypes) or list(DTYPES)
    modes = _split(a.modes) or list(MODES)
    for name, vals, allowed in (("case", cases, CASES), ("dtype", dtypes, DTYPES), ("mode", modes, MODES)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SystemExit(f"bench: unknown {name} {bad}; expected some of {', '.join(allowed)}")
    providers, skipped = resolve_providers(device, _split(a.providers), include_compile=full)
    config = PPOLossConfig(surrogate=a.surrogate, entropy_coef=0.01)
    opts = Options(device=device, cases=cases, dtypes=dtypes, modes=modes, providers=providers,
                   out=a.out or _default_out(), budget=a.budget, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms,
                   cpu_seconds=a.cpu_seconds if a.cpu_seconds is not None else (3.0 if full else 1.0),
                   sets=a.sets, config=config, plot=not a.no_plot, copy_mb=a.copy_mb,
                   append=a.append)
    bench = Bench(opts)
    for name, why in skipped:
        bench.skip(name, why)
    bench.log(f"providers: {', '.join(providers) or 'none'}; cases: {', '.join(cases)}; dtypes: {', '.join(dtypes)};"
              f" modes: {', '.join(modes)}")
    if not providers:
        print("bench: no provider can run here", file=sys.stderr)
        return 1
    bench.run(providers)
    bench.write_csv()
    rows = read_csv(bench.csv_path) if opts.append else bench.rows
    print(f"csv: {bench.csv_path} ({len(bench.rows)} rows measured, {len(rows)} in the file)")
    if opts.plot and rows and plot(rows, bench.png_path):
        print(f"plot: {bench.png_path}")
    print()
    print(summary_text(rows, bench.bandwidth, bench.skipped))
    return 0 if bench.rows else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``Bench``: one run of the matrix (cases x dtypes x modes x providers) under an optional time budget, and its
``Options``. It builds the input sets, times each group of providers (GPU: one provider at a time with
``gpu_bench``; CPU and host-overhead rows: interleaved), records the rows and writes the CSV as it goes."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PPOLossConfig
from .cases import CASE_ORDER, CASES, DTYPES, Case
from .floor import floor_bytes
from .input_sets import fits, make_sets, set_count
from .provenance import device_slug, run_metadata
from .providers import PROVIDERS
from .results import merge_rows, read_csv, write_csv
from .runners import MIB, Runner
from .timing import copy_bandwidth, gpu_bench, interleaved

__all__ = ["Bench", "Options"]

_NAN = float("nan")


@dataclass
class Options:
    """What one run measures and how (``cli`` fills it from the command line)."""

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


def _err(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class Bench:
    """One run: ``run(providers)`` measures the matrix; ``rows`` holds what was measured, ``skipped`` what not."""

    def __init__(self, opts: Options):
        self.o = opts
        self.device = opts.device
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.t_start = time.perf_counter()
        self.compile_default = 60.0 if self.device.type == "cuda" else 150.0
        self.compile_seen: list[float] = []
        self.meta = run_metadata(self.device)
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
        n = set_count(case, dtype, self.device, self.o.sets)
        ok, why = fits(case, dtype, self.device, n)
        if not ok:
            self.skip(f"{case.name} {dtype_name}", f"does not fit memory ({why})")
            return None
        t0 = time.perf_counter()
        self._sets = make_sets(case, dtype, self.device, n)
        self._sets_key = key
        self.log(
            f"{case.name} {dtype_name}: N={case.n_rows} heads={case.head_sizes}, {n} input set(s), "
            f"made in {time.perf_counter() - t0:.1f}s"
        )
        return self._sets

    def add_row(
        self,
        case: Case,
        provider: str,
        mode: str,
        dtype_name: str,
        stats: tuple[float, float, float],
        peak_mb: float,
        floor_ms: float,
    ) -> None:
        med, p20, p80 = stats
        frac = _NAN if case.name == "tiny" else floor_ms / med
        row = dict(
            case=case.name,
            provider=provider,
            mode=mode,
            dtype=dtype_name,
            n_rows=case.n_rows,
            head_sizes=case.head_sizes,
            median_ms=med,
            p20_ms=p20,
            p80_ms=p80,
            peak_extra_mb=peak_mb,
            floor_ms=floor_ms,
            floor_fraction=frac,
            **self.meta,
        )
        self.rows.append(row)
        self.log(
            f"{case.name:<7} {dtype_name} {mode:<8} {provider:<22} {med:10.4f} ms [{p20:.4f}, {p80:.4f}]"
            f"  floor {floor_ms:.4f} ms ({frac:.3f})  peak {peak_mb:.1f} MiB"
        )

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
                    stats = gpu_bench(runner.run, self.o.warmup_ms, self.o.rep_ms)
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
                results = interleaved([r for r, _ in ready], seconds, self.device)
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
        self.bandwidth = copy_bandwidth(self.device, None if o.copy_mb is None else int(o.copy_mb * MIB))
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
        order = sorted(
            ((c, dt) for c in cases for dt in o.dtypes),
            key=lambda cd: (
                cd[0].name in ("wide", "vocab", "tiny"),
                o.dtypes.index(cd[1]),
                CASE_ORDER.index(cd[0].name),
            ),
        )
        for modes in (["full"], ["forward", "backward"]):
            for case, dt in order:
                for mode in modes:
                    if mode in o.modes:
                        self.group(case, dt, mode, compile_p)

    # -- output ---------------------------------------------------------------------------------------------------
    def write_csv(self) -> None:
        rows = self.rows
        if self.o.append and self.prior:
            rows = merge_rows(self.prior, self.rows)
        write_csv(rows, self.csv_path)

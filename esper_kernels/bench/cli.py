"""The command line of ``python -m esper_kernels bench``: ``parse_args`` and ``main`` (a run, or ``--from-csv``:
the summary and plot of an earlier CSV)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import PPOLossConfig
from .cases import CASES, DTYPES, MODES, QUICK_CASES
from .matrix import Bench, Options
from .plots import plot
from .provenance import REPO_ROOT
from .providers import PROVIDERS, resolve_providers
from .results import read_csv
from .summary import summary_text

__all__ = ["main", "parse_args"]

_DESCRIPTION = (
    "``python -m esper_kernels bench``: the benchmark matrix of benchmarks/README.md on whatever device is here."
)


def _default_out() -> Path:
    if (REPO_ROOT / "benchmarks").is_dir():
        return REPO_ROOT / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def _split(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m esper_kernels bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_true",
        help="the small subset (default): cases tiny and esper on CPU "
        "(plus rl_64k and rl_1m on GPU), both dtypes, every mode, no torch.compile",
    )
    g.add_argument("--full", action="store_true", help="every case, dtype, mode and provider")
    p.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--providers", help=f"comma-separated, of {', '.join(PROVIDERS)}")
    p.add_argument("--dtypes", help="comma-separated, of fp32, bf16")
    p.add_argument("--modes", help="comma-separated, of forward, backward, full")
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: work not started by then is skipped (the compiles go last, by priority)",
    )
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (GPU)")
    p.add_argument(
        "--cpu-seconds",
        type=float,
        default=None,
        help="timed seconds per provider and group on the CPU (default 1 quick, 3 full); at least 3 calls",
    )
    p.add_argument("--sets", type=int, default=None, help="input sets to rotate (default: enough to exceed 2x cache)")
    p.add_argument(
        "--copy-mb",
        type=float,
        default=None,
        help="size of the bandwidth copy's source, MiB (default 1024 on GPU, 256 on CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the CPU (default: PyTorch's); recorded in the device column",
    )
    p.add_argument("--surrogate", choices=("joint", "per_head"), default="joint")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into the existing bench_<device>.csv: new rows replace rows of the same case, "
        "provider, mode and dtype; the others stay (the plot and summary show the merged rows)",
    )
    p.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        help="measure nothing: print the summary of this CSV and plot it (to --out, or beside it)",
    )
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
    opts = Options(
        device=device,
        cases=cases,
        dtypes=dtypes,
        modes=modes,
        providers=providers,
        out=a.out or _default_out(),
        budget=a.budget,
        warmup_ms=a.warmup_ms,
        rep_ms=a.rep_ms,
        cpu_seconds=a.cpu_seconds if a.cpu_seconds is not None else (3.0 if full else 1.0),
        sets=a.sets,
        config=config,
        plot=not a.no_plot,
        copy_mb=a.copy_mb,
        append=a.append,
    )
    bench = Bench(opts)
    for name, why in skipped:
        bench.skip(name, why)
    bench.log(
        f"providers: {', '.join(providers) or 'none'}; cases: {', '.join(cases)}; dtypes: {', '.join(dtypes)};"
        f" modes: {', '.join(modes)}"
    )
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

"""The benchmark's smoke run (benchmarks/README.md): a tiny CPU run produces well-formed rows, ``--append`` merges,
the CSV
round-trips, and ``--from-csv`` prints and plots. Speed is never asserted."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from esper_kernels import bench
from esper_kernels.__main__ import main as cli_main
from esper_kernels.layout import ESPER_HEADS, HeadLayout
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.smoke

# the contract of the CSV, spelled out here rather than imported
COLUMNS = [
    "case",
    "provider",
    "mode",
    "dtype",
    "n_rows",
    "head_sizes",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_extra_mb",
    "floor_ms",
    "floor_fraction",
    "device",
    "torch",
    "triton",
    "commit",
    "date",
]


def test_floor_bytes_formula():
    esper = tuple(ESPER_HEADS.values())
    # the one-pass floor, 2 S e + S + 13 H + 20: logits and masks once, the gradient (and the values' gradient)
    # once, per-step inputs once (the two-pass floor of earlier versions was 698 and 452 here)
    assert bench.floor_bytes_per_row(esper, 4) == 493
    assert bench.floor_bytes_per_row(esper, 2) == 329
    assert bench.floor_bytes_per_row((32768,), 4) == 2 * 32768 * 4 + 32768 + 13 + 20
    layout = HeadLayout(ESPER_HEADS)
    for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
        b = make_batch((3, 5), layout, dtype=dtype)
        for mode in bench.MODES:
            assert bench.floor_bytes(b, layout, mode) == 15 * bench.floor_bytes_per_row(esper, e, mode)
    assert bench.floor_bytes_per_row(esper, 4, "forward") + bench.floor_bytes_per_row(
        esper, 4, "backward"
    ) > bench.floor_bytes_per_row(esper, 4, "full")


def test_bench_smoke_rows(tmp_path, capsys):
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--cases",
            "tiny,esper",
            "--providers",
            "reference",
            "--dtypes",
            "fp32,bf16",
            "--modes",
            "forward,backward,full",
            "--cpu-seconds",
            "0.02",
            "--sets",
            "2",
            "--threads",
            "1",
            "--copy-mb",
            "32",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    assert rc == 0
    path = tmp_path / "bench_cpu.csv"
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    rows = bench.read_csv(path)
    assert {(r["case"], r["mode"], r["dtype"]) for r in rows} == {
        (c, m, d) for c in ("tiny", "esper") for m in ("forward", "backward", "full") for d in ("fp32", "bf16")
    }
    for r in rows:
        assert r["provider"] == "reference"
        assert r["n_rows"] == bench.CASES[r["case"]].n_rows
        assert r["head_sizes"] == "3/13/4/3/3/4/5/6"
        for k in ("median_ms", "p20_ms", "p80_ms", "floor_ms"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert math.isnan(r["peak_extra_mb"])  # no allocator statistics on the CPU
        if r["case"] == "tiny":
            assert math.isnan(r["floor_fraction"])  # host time: no floor fraction
        else:
            assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["median_ms"], rel=1e-4)
        assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
        assert r["commit"] and r["date"].endswith("Z") and r["triton"]
    # one bandwidth for the whole run: every row's floor implies the same bytes per second
    bws = {
        round(
            bench.floor_bytes_per_row(tuple(ESPER_HEADS.values()), 4 if r["dtype"] == "fp32" else 2, r["mode"])
            * r["n_rows"]
            / r["floor_ms"],
            -3,
        )
        for r in rows
    }
    assert max(bws) / min(bws) < 1.001
    out = capsys.readouterr().out
    assert "full (forward+backward+metrics)" in out and "host overhead" in out


def test_append_replaces_the_rows_it_measures(tmp_path, monkeypatch):
    """--append: the second run's row replaces the first run's row of the same key, in place; the others stay."""
    common = [
        "--device",
        "cpu",
        "--cases",
        "tiny",
        "--providers",
        "reference",
        "--dtypes",
        "fp32",
        "--cpu-seconds",
        "0.02",
        "--threads",
        "1",
        "--copy-mb",
        "32",
        "--out",
        str(tmp_path),
        "--no-plot",
    ]
    monkeypatch.setenv("ESPER_BENCH_COMMIT", "first")
    assert bench.main([*common, "--modes", "forward,full"]) == 0
    monkeypatch.setenv("ESPER_BENCH_COMMIT", "second")
    assert bench.main([*common, "--modes", "full,backward", "--append"]) == 0
    merged = bench.read_csv(tmp_path / "bench_cpu.csv")
    assert [(r["mode"], r["commit"]) for r in merged] == [
        ("forward", "first"),
        ("full", "second"),
        ("backward", "second"),
    ]


def test_csv_round_trip(tmp_path):
    """write_csv then read_csv gives the rows back (ints, floats, NaN, strings); the results in the repository
    load and are written back byte for byte (the schema and the number format are unchanged)."""
    rows = [
        dict(
            case="esper",
            provider="cpu",
            mode="full",
            dtype="bf16",
            n_rows=1800,
            head_sizes="3/13",
            median_ms=1.2345678,
            p20_ms=1.0,
            p80_ms=2.5e-05,
            peak_extra_mb=float("nan"),
            floor_ms=0.125,
            floor_fraction=0.1,
            device="cpu: x (2 threads)",
            torch="2.0",
            triton="none",
            commit="abc+dirty",
            date="2026-01-01T00:00:00Z",
        )
    ]
    path = tmp_path / "r.csv"
    bench.write_csv(rows, path)
    back = bench.read_csv(path)
    assert len(back) == 1 and list(back[0]) == list(bench.COLUMNS)
    got, want = back[0], rows[0]
    assert math.isnan(got.pop("peak_extra_mb")) and math.isnan(want.pop("peak_extra_mb"))
    assert got == {**want, "median_ms": 1.23457}  # 6 significant digits
    assert type(got["n_rows"]) is int
    results = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("bench_*.csv"))
    assert results, "no benchmarks/results/bench_*.csv"
    for committed in results:
        bench.write_csv(bench.read_csv(committed), path)
        assert path.read_bytes() == committed.read_bytes(), committed.name


def test_bench_summary_and_plot_from_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [
        dict(
            case=c,
            provider=p,
            mode="full",
            dtype="fp32",
            n_rows=bench.CASES[c].n_rows,
            head_sizes=bench.CASES[c].head_sizes,
            median_ms=m,
            p20_ms=m * 0.9,
            p80_ms=m * 1.1,
            peak_extra_mb=float("nan"),
            floor_ms=0.1,
            floor_fraction=0.1 / m,
            device="cpu: test",
            torch="t",
            triton="none",
            commit="abc",
            date="2026-01-01T00:00:00Z",
        )
        for c in ("esper", "wide")
        for p, m in (("reference", 2.0), ("cpu", 0.5))
    ]
    path = tmp_path / "bench_cpu.csv"
    bench.write_csv(rows, path)
    assert cli_main(["bench", "--from-csv", str(path)]) == 0  # python -m esper_kernels bench --from-csv ...
    assert (tmp_path / "bench_cpu.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "4.00" in out  # the cpu provider's speedup over the reference


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit, match=r"unknown case \['nope'\]"):
        bench.main(["--device", "cpu", "--cases", "nope", "--no-plot"])
    with pytest.raises(SystemExit, match="unknown provider 'nope'"):
        bench.main(["--device", "cpu", "--providers", "nope", "--no-plot"])

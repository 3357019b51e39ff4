"""The benchmark's smoke run (SPEC 7): a tiny CPU run produces well-formed rows. Speed is never asserted."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from esper_kernels import bench
from esper_kernels.layout import ESPER_HEADS, HeadLayout
from esper_kernels.synthetic import make_batch

# the contract of the CSV, spelled out here rather than imported
COLUMNS = ["case", "provider", "mode", "dtype", "n_rows", "head_sizes", "median_ms", "p20_ms", "p80_ms",
           "peak_extra_mb", "floor_ms", "floor_fraction", "device", "torch", "triton", "commit", "date"]


def test_floor_bytes_formula():
    esper = tuple(ESPER_HEADS.values())
    # 3 S e + 2 S + 13 H + 20: logits and masks twice, the gradient (and the values' gradient) once, per-step once
    assert bench.floor_bytes_per_row(esper, 4) == 698
    assert bench.floor_bytes_per_row(esper, 2) == 452
    assert bench.floor_bytes_per_row((32768,), 4) == 3 * 32768 * 4 + 2 * 32768 + 13 + 20
    layout = HeadLayout(ESPER_HEADS)
    for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
        b = make_batch((3, 5), layout, dtype=dtype)
        for mode in bench.MODES:
            assert bench.floor_bytes(b, layout, mode) == 15 * bench.floor_bytes_per_row(esper, e, mode)
    assert (bench.floor_bytes_per_row(esper, 4, "forward") + bench.floor_bytes_per_row(esper, 4, "backward")
            > bench.floor_bytes_per_row(esper, 4, "full"))


def test_bench_smoke_rows(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--cases", "tiny,esper", "--providers", "reference", "--dtypes", "fp32,bf16",
                     "--modes", "forward,backward,full", "--cpu-seconds", "0.02", "--sets", "2", "--threads", "1",
                     "--copy-mb", "32", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    path = tmp_path / "bench_cpu.csv"
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    rows = bench.read_csv(path)
    assert {(r["case"], r["mode"], r["dtype"]) for r in rows} == {
        (c, m, d) for c in ("tiny", "esper") for m in ("forward", "backward", "full") for d in ("fp32", "bf16")}
    for r in rows:
        assert r["provider"] == "reference"
        assert r["n_rows"] == bench.CASES[r["case"]].n_rows
        assert r["head_sizes"] == "3/13/4/3/3/4/5/6"
        for k in ("median_ms", "p20_ms", "p80_ms", "floor_ms"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert math.isnan(r["peak_extra_mb"])  # no allocator statistics on the CPU
        e = 4 if r["dtype"] == "fp32" else 2
        bw = bench.floor_bytes_per_row(tuple(ESPER_HEADS.values()), e, r["mode"]) * r["n_rows"] / r["floor_ms"]
        assert bw > 0
        if r["case"] == "tiny":
            assert math.isnan(r["floor_fraction"])  # host time: no floor fraction
        else:
            assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["median_ms"], rel=1e-4)
        assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
        assert r["commit"] and r["date"].endswith("Z") and r["triton"]
    # one bandwidth for the whole run: every row's floor implies the same bytes per second
    bws = {round(bench.floor_bytes_per_row(tuple(ESPER_HEADS.values()), 4 if r["dtype"] == "fp32" else 2, r["mode"])
                 * r["n_rows"] / r["floor_ms"], -3) for r in rows}
    assert max(bws) / min(bws) < 1.001
    out = capsys.readouterr().out
    assert "full (forward+backward+metrics)" in out and "host overhead" in out

    # --append: a second run replaces the rows it measures and keeps the others
    before = {(r["case"], r["mode"], r["dtype"]): r["date"] for r in rows}
    rc = bench.main(["--device", "cpu", "--cases", "tiny", "--providers", "reference", "--dtypes", "fp32",
                     "--modes", "full", "--cpu-seconds", "0.02", "--threads", "1", "--copy-mb", "32",
                     "--out", str(tmp_path), "--no-plot", "--append"])
    assert rc == 0
    merged = bench.read_csv(path)
    assert len(merged) == len(rows)
    assert {(r["case"], r["mode"], r["dtype"]) for r in merged} == set(before)


def test_bench_summary_and_plot_from_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [dict(case=c, provider=p, mode="full", dtype="fp32", n_rows=bench.CASES[c].n_rows,
                 head_sizes=bench.CASES[c].head_sizes, median_ms=m, p20_ms=m * 0.9, p80_ms=m * 1.1,
                 peak_extra_mb=float("nan"), floor_ms=0.1, floor_fraction=0.1 / m, device="cpu: test", torch="t",
                 triton="none", commit="abc", date="2026-01-01T00:00:00Z")
            for c in ("esper", "wide") for p, m in (("reference", 2.0), ("cpu", 0.5))]
    path = tmp_path / "bench_cpu.csv"
    bench.write_csv(rows, path)
    assert bench.main(["--from-csv", str(path)]) == 0
    assert (tmp_path / "bench_cpu.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "4.00" in out  # the cpu provider's speedup over the reference


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--cases", "nope", "--no-plot"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--providers", "nope", "--no-plot"])

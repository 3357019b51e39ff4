"""The results CSV: its columns (the schema), writing and reading it, merging a run into an earlier file, and
looking up a row's reference median.

One row per case, provider, mode and dtype measured (``row_key``); the provenance columns (device, torch,
triton, commit, date) are the same for every row of one run. Floats are written with 6 significant digits,
NaN as ``nan``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

__all__ = ["COLUMNS", "NUMERIC", "merge_rows", "read_csv", "reference_median", "row_key", "write_csv"]

COLUMNS = (
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
)
#: the columns ``read_csv`` converts: n_rows to int, the others to float
NUMERIC = ("n_rows", "median_ms", "p20_ms", "p80_ms", "peak_extra_mb", "floor_ms", "floor_fraction")
_NAN = float("nan")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    """Write ``rows`` (dicts with every column of ``COLUMNS``) to ``path``, atomically (a temporary, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in COLUMNS])
    tmp.replace(path)


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a results CSV, the ``NUMERIC`` columns converted, the others strings."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in NUMERIC:
            r[k] = int(r[k]) if k == "n_rows" else float(r[k])
    return rows


def row_key(r: dict) -> tuple:
    """What a row measures: (case, provider, mode, dtype)."""
    return r["case"], r["provider"], r["mode"], r["dtype"]


def merge_rows(prior: list[dict], new: list[dict]) -> list[dict]:
    """``prior`` with each row replaced by the ``new`` row of the same key, in place; new keys appended."""
    by_key = {row_key(r): r for r in new}
    return [by_key.pop(row_key(r), r) for r in prior] + list(by_key.values())


def reference_median(rows: list[dict], r: dict) -> float:
    """The median of the reference eager row of ``r``'s case, mode and dtype; NaN when there is none."""
    for q in rows:
        if (q["case"], q["mode"], q["dtype"], q["provider"]) == (r["case"], r["mode"], r["dtype"], "reference"):
            return q["median_ms"]
    return _NAN

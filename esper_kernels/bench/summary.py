"""The summary printed last: the full-mode rows (median, percentiles, speed-up over the reference eager, floor
fraction, peak memory) and the host-overhead (``tiny``) rows."""

from __future__ import annotations

from .cases import CASE_ORDER, DTYPES, MODES
from .providers import PROVIDERS
from .results import reference_median

__all__ = ["summary_text"]

_NAN = float("nan")


def _index(seq, x) -> int:
    return list(seq).index(x) if x in seq else len(seq)


def _order(r: dict) -> tuple:
    """Summary order: case (esper first), dtype, provider (as PROVIDERS lists them)."""
    return (_index(CASE_ORDER, r["case"]), _index(DTYPES, r["dtype"]), _index(PROVIDERS, r["provider"]), r["provider"])


def summary_text(rows: list[dict], bandwidth: float | None = None, skipped: list[str] | None = None) -> str:
    """The short table printed last: full-mode rows and host-overhead (tiny) rows."""
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(
            f"device: {r0['device']} | torch {r0['torch']} | triton {r0['triton']} | commit {r0['commit']}"
            f" | {r0['date']}"
        )
    if bandwidth is not None:
        lines.append(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    head = (
        f"{'case':<7} {'dtype':<5} {'provider':<21} {'median_ms':>10} {'p20-p80 ms':>19} {'x ref':>7} "
        f"{'floor':>6} {'peakMiB':>8}"
    )
    shown = sorted((r for r in rows if r["mode"] == "full" and r["case"] != "tiny"), key=_order)
    if shown:
        lines += [
            "",
            "full (forward+backward+metrics); x ref = reference eager median / median; floor = floor fraction",
            head,
        ]
        for r in shown:
            lines.append(_line(r, reference_median(rows, r)))
    tiny = sorted((r for r in rows if r["case"] == "tiny"), key=lambda r: (_index(MODES, r["mode"]), _order(r)))
    if tiny:
        lines += [
            "",
            "host overhead (case tiny, N=16: CPU-side time of one call, validate=False)",
            f"{'mode':<8} {'dtype':<5} {'provider':<21} {'median_ms':>10} {'p20-p80 ms':>19}",
        ]
        for r in tiny:
            lines.append(
                f"{r['mode']:<8} {r['dtype']:<5} {r['provider']:<21} {r['median_ms']:>10.4g} "
                f"{r['p20_ms']:>9.4g}-{r['p80_ms']:.4g}"
            )
    if skipped:
        lines += ["", f"not measured ({len(skipped)}):"] + [f"  {s}" for s in skipped[:12]]
        if len(skipped) > 12:
            lines.append(f"  ... and {len(skipped) - 12} more (see the log above)")
    return "\n".join(lines)


def _line(r: dict, ref: float) -> str:
    x = ref / r["median_ms"] if ref == ref else _NAN
    return (
        f"{r['case']:<7} {r['dtype']:<5} {r['provider']:<21} {r['median_ms']:>10.4g} "
        f"{r['p20_ms']:>9.4g}-{r['p80_ms']:<9.4g} {x:>7.2f} {r['floor_fraction']:>6.3f} {r['peak_extra_mb']:>8.1f}"
    )

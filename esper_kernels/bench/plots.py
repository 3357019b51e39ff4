"""The plot of a run's full-mode rows against N: speed-up over the reference eager, and the floor fraction."""

from __future__ import annotations

from pathlib import Path

from ..synthetic import STANDARD_CASES
from .results import reference_median

__all__ = ["plot"]


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
    esper_sizes = STANDARD_CASES["esper"].head_sizes  # the esper-headed rows of a provider and dtype are joined
    for p in providers:
        for dt, ls in (("fp32", "-"), ("bf16", "--")):
            pts = sorted((r for r in full if r["provider"] == p and r["dtype"] == dt), key=lambda r: r["n_rows"])
            if not pts:
                continue
            label = f"{p} {dt}"
            for ax, key in ((axes[0], "speedup"), (axes[1], "floor_fraction")):
                if key == "speedup":
                    ys = [reference_median(rows, r) / r["median_ms"] for r in pts]
                else:
                    ys = [r["floor_fraction"] for r in pts]
                xs = [r["n_rows"] for r in pts]
                esper_like = [(x, y) for x, y, r in zip(xs, ys, pts) if r["head_sizes"] == esper_sizes]
                if esper_like:
                    ax.plot(*zip(*esper_like), ls=ls, color=colors[p], label=label)
                    label = None
                for x, y, r in zip(xs, ys, pts):
                    ax.plot([x], [y], marker=markers.get(r["case"], "x"), color=colors[p], ls="none", label=label)
                    label = None
                label = f"{p} {dt}"
    for c in STANDARD_CASES.values():
        for ax in axes:
            ax.axvline(c.n_rows, color="0.85", lw=0.8, zorder=0)
            ax.annotate(
                c.name,
                (c.n_rows, 1),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10),
                textcoords="offset points",
                fontsize=7,
                color="0.4",
            )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="N (steps)",
        ylabel="speedup over reference eager",
        title="forward+backward+metrics: speedup",
    )
    axes[1].axhline(1.0, color="0.5", lw=0.8)
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="N (steps)",
        ylabel="floor time / median time (log)",
        title="fraction of the bandwidth floor (1 = at the floor)",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        title="solid fp32, dashed bf16\no esper heads, s wide, ^ vocab",
        title_fontsize=7,
    )
    r0 = full[0]
    fig.suptitle(f"esper_kernels ppo_loss on {r0['device']} (torch {r0['torch']}, commit {r0['commit']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

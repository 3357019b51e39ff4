"""``python -m esper_kernels demo``: train a PPO agent on the built-in seed-slot environment with ``ppo_loss``.

    python -m esper_kernels demo [--backend B] [--updates N] [--seed S] [--device D] [--plot PATH]

Prints a progress bar, the per-head telemetry report every few updates (``esper_kernels.telemetry``), and
ends with ``final mean return X (first Y)``: the mean episode return over the last and over the first
max(1, min(5, N // 10)) of the N updates.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from ..telemetry import head_report
from .agent import AgentConfig, PPOAgent
from .env import SeedSlotEnv

__all__ = ["main", "train", "TrainResult", "plot_history"]

DEFAULT_UPDATES = 400


@dataclass
class TrainResult:
    returns: list[float] = field(default_factory=list)  # mean episode return per update
    entropy: dict[str, list[float]] = field(default_factory=dict)  # per head, per update (normalised)
    learnable: dict[str, list[float]] = field(default_factory=dict)  # per head learnable_fraction, per update
    losses: list[float] = field(default_factory=list)
    backend: str = ""
    seconds: float = 0.0

    def window(self) -> int:
        """How many updates the first and final means average over."""
        return max(1, min(5, len(self.returns) // 10))

    @property
    def first(self) -> float:
        return sum(self.returns[: self.window()]) / self.window()

    @property
    def final(self) -> float:
        return sum(self.returns[-self.window() :]) / self.window()


class _Progress:
    """A plain-text progress bar: redrawn in place on a terminal, a line every few updates otherwise."""

    def __init__(self, total: int, out=None, width: int = 24):
        self.total, self.width = total, width
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.every = max(1, total // 15)
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, done: int, text: str) -> None:
        if not self.tty and done % self.every and done != self.total:
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {done:>{len(str(self.total))}}/{self.total} {text} {time.perf_counter() - self.start:5.1f}s"
        if self.tty:
            self.out.write("\r" + line)
            self.drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def newline(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.drawn = False


def train(
    updates: int = DEFAULT_UPDATES,
    *,
    backend: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    num_envs: int = 128,
    horizon: int = 25,
    num_slots: int = 3,
    agent_config: AgentConfig | None = None,
    report_every: int | None = None,
    out=None,
    verbose: bool = True,
) -> TrainResult:
    """Train for ``updates`` PPO updates; returns the learning curve and the per-head telemetry history."""
    out = out or sys.stdout
    torch.manual_seed(seed)
    env = SeedSlotEnv(num_envs, num_slots, horizon, seed=seed, device=device)
    agent = PPOAgent(env, agent_config or AgentConfig(), backend=backend, seed=seed)
    names = env.layout.names
    res = TrainResult(entropy={n: [] for n in names}, learnable={n: [] for n in names})
    if report_every is None:
        report_every = max(1, math.ceil(updates / 4))
    if verbose:
        cfg = agent.cfg
        print(
            f"esper_kernels demo: PPO on the seed-slot environment ({num_envs} envs x {horizon} steps, "
            f"{num_slots} slots; {cfg.epochs} epochs x {cfg.minibatches} minibatches per update), "
            f"device {env.device}, seed {seed}",
            file=out,
        )
        print(f"heads {dict(env.layout.items())}", file=out)
    bar = _Progress(updates, out)
    start = time.perf_counter()
    for u in range(1, updates + 1):
        r = agent.train_iteration()
        m = r.metrics
        res.returns.append(r.mean_return)
        res.losses.append(m["loss"])
        res.backend = r.backend
        for n in names:
            res.entropy[n].append(m[f"head_{n}_entropy"])
            res.learnable[n].append(m[f"head_{n}_learnable_fraction"])
        if not verbose:
            continue
        if u == 1:
            print(f"backend {backend} -> {r.backend}", file=out)
        bar.update(
            u,
            f"return {r.mean_return:7.3f}  kl {m['approx_kl']:.4f}  "
            f"clip {m['clip_fraction']:.3f}  ev {m['explained_variance']:5.2f}",
        )
        if u % report_every == 0 or u == updates:
            bar.newline()
            print(f"-- update {u}: per-head telemetry (grad: L2 norm of each head's Linear, last minibatch)", file=out)
            print(head_report(m, r.grad_norms, heads=names), file=out)
    res.seconds = time.perf_counter() - start
    if verbose:
        bar.newline()
        print(
            f"{updates} updates in {res.seconds:.1f} s ({res.seconds / max(updates, 1):.2f} s/update), "
            f"backend {res.backend}",
            file=out,
        )
    return res


def plot_history(res: TrainResult, path: str) -> None:
    """A PNG: the mean return, and per head the entropy and the learnable fraction, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(res.returns) + 1))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(x, res.returns, color="black")
    axes[0].set(title="mean episode return", xlabel="update")
    styles = ("-", "--", ":")
    for i, (name, ys) in enumerate(res.entropy.items()):
        axes[1].plot(x, [y if math.isfinite(y) else float("nan") for y in ys], styles[i % 3], label=name)
    axes[1].legend(fontsize=7, ncol=2)
    # heads with the same relevance and masks have the same learnable fraction: one line, both names
    same: dict[tuple, list[str]] = {}
    for name, ys in res.learnable.items():
        same.setdefault(tuple(ys), []).append(name)
    for i, (ys, group) in enumerate(same.items()):
        axes[2].plot(x, list(ys), styles[i % 3], label=" = ".join(group))
    axes[1].set(title="per-head entropy (normalised, relevant steps)", xlabel="update")
    axes[2].set(title="per-head learnable fraction", xlabel="update", ylim=(-0.02, 1.02))
    axes[2].legend(fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.76))
    fig.suptitle(f"esper_kernels demo (backend {res.backend})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m esper_kernels demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", default="auto", help="reference, triton, cuda, cpu or auto (default)")
    p.add_argument("--updates", type=int, default=DEFAULT_UPDATES, help=f"PPO updates (default {DEFAULT_UPDATES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the return, entropy and learnable fraction")
    p.add_argument("--envs", type=int, default=128, help="parallel environments (default 128)")
    p.add_argument("--horizon", type=int, default=25, help="steps per episode and per rollout (default 25)")
    p.add_argument("--slots", type=int, default=3, help="seed slots (the slot head's size; default 3)")
    p.add_argument("--report-every", type=int, default=None, help="updates between per-head reports")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: this model's small ops run fastest on one)",
    )
    a = p.parse_args(argv)
    if a.updates < 1:
        p.error("--updates must be >= 1")
    torch.set_num_threads(max(1, a.threads))
    res = train(
        a.updates,
        backend=a.backend,
        seed=a.seed,
        device=a.device,
        num_envs=a.envs,
        horizon=a.horizon,
        num_slots=a.slots,
        report_every=a.report_every,
    )
    if a.plot:
        plot_history(res, a.plot)
        print(f"plot written to {a.plot}")
    print(f"final mean return {res.final:.3f} (first {res.first:.3f})")
    return 0

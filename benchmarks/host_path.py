"""The eager call's host part: one tiny ``ppo_loss`` forward + backward against one ``cross_entropy`` forward +
backward on the same logits, measured interleaved on the CPU (the issue's yardstick for the Python layer that
every backend shares).

    python benchmarks/host_path.py                      # N = 16, esper heads, backend cpu, validate=False
    python benchmarks/host_path.py --profile            # plus a cProfile of the ppo_loss steps
    python benchmarks/host_path.py --backend reference

Each round times ``--reps`` calls of each in turn (gc off) and keeps the per-call mean; the report gives the
minimum and the median over ``--rounds`` rounds and the ratio of the minima. One torch thread. No metrics are
read (``out.metrics`` stays underived), as in a training step that logs every k steps.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import esper_kernels as ek
from esper_kernels.synthetic import make_batch


def _setup(n: int, backend: str):
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((n,), layout, seed=0)
    z = b["logits"].detach().clone().requires_grad_(True)
    b = dict(b, logits=z)
    for k in ("values",):
        if b.get(k) is not None:
            b[k] = b[k].detach().clone().requires_grad_(True)
    cfg = ek.PPOLossConfig(entropy_coef=0.01)

    def step():
        out = ek.ppo_loss(**b, layout=layout, config=cfg, backend=backend, validate=False)
        out.loss.backward()

    zc = torch.randn(n, sum(layout.sizes), requires_grad=True)
    target = torch.randint(0, sum(layout.sizes), (n,))

    def ce():
        F.cross_entropy(zc, target).backward()

    return step, ce


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    step, ce = _setup(a.n, a.backend)
    for _ in range(50):
        step(), ce()
    gc.disable()
    ts, tc = [], []
    for _ in range(a.rounds):
        ts.append(_time(step, a.reps))
        tc.append(_time(ce, a.reps))
    gc.enable()
    print(
        f"ppo_loss ({a.backend}, N={a.n}, esper heads) fwd+bwd: min {min(ts):7.1f} us  median "
        f"{statistics.median(ts):7.1f} us"
    )
    print(
        f"cross_entropy [N, {sum(ek.ESPER_HEADS.values())}] fwd+bwd:          min {min(tc):7.1f} us  median "
        f"{statistics.median(tc):7.1f} us"
    )
    print(
        f"ratio (min / min): {min(ts) / min(tc):.2f}x   (median / median: "
        f"{statistics.median(ts) / statistics.median(tc):.2f}x)"
    )
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

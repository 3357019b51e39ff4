"""Quick CPU timing: forward + backward with metrics, cpu backend vs the reference (eager and torch.compile).

    python benchmarks/cpu_quick.py                      # esper and rl_64k, every provider
    python benchmarks/cpu_quick.py --cases esper --providers cpu reference
    python benchmarks/cpu_quick.py --cases wide vocab   # any case of esper_kernels.synthetic.STANDARD_CASES

Prints the median and 20/80 percentiles (ms) of one training-step-like call per provider: ``ppo_loss`` with
values (entropy_coef=0.01, joint surrogate, validate=False), ``metrics.tensors()``, then ``loss.backward()``;
and the speed-up of ``cpu`` over each other provider. Providers are timed round-robin, one call each in turn,
so that the load of a shared machine falls on all of them alike. Inputs: the case's batch from
``esper_kernels.synthetic.STANDARD_CASES`` (seed 0), the table ``python -m esper_kernels bench`` and the tests use.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import esper_kernels as ek
from esper_kernels.synthetic import STANDARD_CASES

DEFAULT_CASES = ["esper", "rl_64k"]


def _step_fn(layout, config, backend):
    def step(b):
        out = ek.ppo_loss(
            b["logits"],
            b["action_masks"],
            b["actions"],
            b["old_log_probs"],
            b["advantages"],
            layout=layout,
            head_relevance=b["head_relevance"],
            weights=b["weights"],
            values=b["values"],
            returns=b["returns"],
            config=config,
            backend=backend,
            validate=False,
        )
        return out.loss, out.metrics.tensors()

    return step


def make_runner(provider: str, batch: dict, layout, config):
    """A zero-argument callable doing one forward + backward with metrics (compiled and warmed up)."""
    backend = "reference" if provider.startswith("reference") else provider
    fn = _step_fn(layout, config, backend)
    if provider == "reference_compile":
        fn = torch.compile(fn, dynamic=False)

    def once():
        batch["logits"].grad = None
        batch["values"].grad = None
        loss, _ = fn(batch)
        loss.backward()

    for _ in range(3):  # warm-up (compiles)
        once()
    return once


def time_interleaved(runners: dict, seconds: float, min_calls: int = 5) -> dict[str, list[float]]:
    """Round-robin one call per provider, so that a shared machine's load hits every provider alike."""
    times = {p: [] for p in runners}
    t_end = time.perf_counter() + seconds * len(runners)
    while time.perf_counter() < t_end or min(len(v) for v in times.values()) < min_calls:
        for p, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[p].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(STANDARD_CASES))
    ap.add_argument("--providers", nargs="+", default=["cpu", "reference", "reference_compile"])
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per provider and case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--floor", type=float, default=None, help="prob_floor on every head (default: none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for case in args.cases:
        layout = STANDARD_CASES[case].layout
        floor = None if args.floor is None else [args.floor] * layout.num_heads
        config = ek.PPOLossConfig(entropy_coef=0.01, prob_floor=floor)
        batch = STANDARD_CASES[case].make_batch(seed=0)
        batch["logits"].requires_grad_(True)
        batch["values"].requires_grad_(True)
        torch._dynamo.reset()
        runners = {p: make_runner(p, batch, layout, config) for p in args.providers}
        med = {}
        for p, ts in time_interleaved(runners, args.seconds).items():
            ts = sorted(ts)
            q = statistics.quantiles(ts, n=5)
            med[p] = statistics.median(ts)
            print(f"{case:7s} {p:18s} median {med[p]:9.3f} ms  p20 {q[0]:9.3f}  p80 {q[3]:9.3f}  ({len(ts)} calls)")
        if "cpu" in med:
            for p, m in med.items():
                if p != "cpu":
                    print(f"{case:7s} cpu speed-up over {p}: {m / med['cpu']:.1f}x")


if __name__ == "__main__":
    main()

"""The benchmarks/README.md benchmark: a thin wrapper around ``esper_kernels.bench`` (also ``python -m esper_kernels
bench``).

    python benchmarks/bench_ppo_loss.py                 # quick subset (default), results in benchmarks/results/
    python benchmarks/bench_ppo_loss.py --full          # every case, dtype, mode and provider
    python benchmarks/bench_ppo_loss.py --cases esper,rl_64k --providers reference,triton --modes full
    python benchmarks/bench_ppo_loss.py --from-csv benchmarks/results/bench_h100.csv   # table and plot again

``--help`` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from esper_kernels.bench import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from esper_kernels.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""What the benchmark measures: its cases (the standard ones plus ``tiny``), modes and dtypes, and the quick subsets.

The standard cases themselves (batch shape, heads, how a batch is synthesised) are ``esper_kernels.synthetic``'s
``STANDARD_CASES``, shared with ``benchmarks/cpu_quick.py`` and the tests; this module adds the benchmark's own
``tiny`` case (N = 16, esper heads), whose rows are the host overhead of one call.
"""

from __future__ import annotations

import torch

from ..synthetic import STANDARD_CASES, Case

__all__ = ["CASES", "CASE_ORDER", "DTYPES", "MODES", "QUICK_CASES", "Case"]

CASES: dict[str, Case] = {"tiny": Case("tiny", (2, 8), STANDARD_CASES["esper"].heads), **STANDARD_CASES}
#: the summary's order, and the compile providers' under a time budget: esper-shaped cases first
CASE_ORDER = ("esper", "rl_64k", "rl_1m", "wide", "vocab", "tiny")
#: the default subset (without --full or --cases) per device type
QUICK_CASES = {"cpu": ("tiny", "esper"), "cuda": ("tiny", "esper", "rl_64k", "rl_1m")}
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

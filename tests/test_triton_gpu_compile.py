"""The triton backend's kernels compile for an H100 / H200 (sm_90) on any machine, GPU or not, and the small-head
kernels do not spill (tests/triton_compile_check.py).

The interpreter tier runs the kernels' semantics in numpy, which forgives what the GPU compiler rejects (shape
rules of some builtins, loop-carried types, constexpr tuple indexing, ...); this compiles, through Triton's real
compiler and ptxas, without a driver, in a subprocess (TRITON_INTERPRET unset), the variants that between them
reach every code path: esper's per_head surrogate with floors, normalised entropy, value clipping and advantage
normalisation (the pre-pass, the forward writing the gradient, both fix-up variants), the joint surrogate at
rl_1m's tile plan (4 warps, 8,192 programs), and a streamed wide head with a floor. ``--spill-check`` fails on
any register spill (stack or LDL/STL) in the small-head cases. Several minutes on 2 cores the first time (the
unrolled small-head forward is the longest compile), seconds once Triton's cache holds the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    r = subprocess.run(
        [sys.executable, script, "--arch", "90", "--spill-check", "esper_per_head", "rl_1m_fp32", "wide_floor_bf16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all compiled" in r.stdout and "no spills in small-head kernels" in r.stdout, r.stdout[-2000:]

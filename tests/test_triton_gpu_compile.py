"""The triton backend's kernels compile for an H100 (sm_90) on any machine, GPU or not (tests/triton_compile_check.py).

The interpreter tier runs the kernels' semantics in numpy, which forgives what the GPU compiler rejects (shape
rules of some builtins, loop-carried types, ...); this compiles two variants that between them reach every code
path (small heads with floors, per-head surrogate, normalised entropy, value clipping; a streamed wide head with a
floor) through Triton's real compiler and ptxas, without a driver, in a subprocess (TRITON_INTERPRET unset).
About 25 s on 2 cores the first time, seconds once Triton's cache holds the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    r = subprocess.run([sys.executable, script, "--arch", "90", "esper_per_head", "wide_floor_bf16"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all compiled" in r.stdout

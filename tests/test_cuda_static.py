"""The cuda backend's kernels compile for sm_90 on any machine with nvcc (tests/cuda_static_check.py), and the
small-head kernels (one thread per row, values in registers) and the pre-pass keep every value in registers: no
spill and no stack frame. The measured registers, SASS counts and SASS per row are in benchmarks/NOTES.md
("cuda one-pass, static"). About two minutes on two cores (ptxas).
"""

from __future__ import annotations

import shutil

import pytest
from cuda_static_check import find_cuobjdump, report, run, spills

pytestmark = pytest.mark.slow


def test_small_head_kernels_do_not_spill():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (on PATH or in Triton's package)")
    res = run(90)
    bad = spills(res)
    assert not bad, "register spills or stack in the small-head kernels:\n" + "\n".join(bad) + "\n" + report(res)
    # every kernel of ppo_cuda.cu was found and measured
    assert {
        "small_kernel<8>",
        "small_kernel<16>",
        "small_kernel<32>",
        "wide_kernel<staged>",
        "wide_kernel<streamed>",
        "prepass_kernel",
        "metrics_kernel",
    } <= set(res["kernels"])
    # no float64 arithmetic anywhere in the hot kernels
    for name in ("small_kernel<16>", "wide_kernel<staged>", "prepass_kernel"):
        c = res["kernels"][name]["sass"]
        assert c["DADD"] + c["DFMA"] + c["DMUL"] == 0, name

"""What "auto" prefers on CUDA tensors, from the H100 benchmark (benchmarks/results/bench_h100.csv).

The rule follows the GPU time of a replayed CUDA graph of forward + backward with metrics (the ``*_graph``
rows, which leave out the Python both backends share), checked against the eager rows:

=========  ============  ======  ===========  ==========  ==========================
case       heads         N       triton (ms)  cuda (ms)   pick
=========  ============  ======  ===========  ==========  ==========================
esper      8, <= 13      1,800   0.320        0.389       triton
rl_64k     8, <= 13      65,536  0.498        0.442       cuda (eager: cuda too)
rl_1m      8, <= 13      1 M     2.636        2.952       cuda: bf16 graph 2.28 vs 2.39,
                                                          eager 3.9 vs 6.6 ms (fp32)
wide       2 x 1,024     16,384  0.647        1.114       triton
vocab      1 x 32,768    8,192   3.146        7.109       triton
=========  ============  ======  ===========  ==========  ==========================

(fp32; bf16 ranks the same except where noted.) So: heads that the CUDA backend reads through its
shared-memory tile (every head at most ``CUDA_SMALL_MAX`` actions) with many rows go to ``cuda``; few rows or
any wider head go to ``triton``. Shapes between the measured ones follow the nearest measurement.
"""

from __future__ import annotations

from ..inputs import PPOInputs

#: widest head the CUDA backend reads through a shared-memory tile (csrc/ppo_cuda.cu SMALL_MAX)
CUDA_SMALL_MAX = 32
#: from this many rows on, small-head calls were faster with ``cuda`` (esper 1,800: triton; rl_64k: cuda)
CUDA_MIN_ROWS = 8192


def cuda_preference(inputs: PPOInputs) -> list[str]:
    """Fused CUDA-device backends, fastest first, for this call's shape."""
    small = max(inputs.layout.sizes) <= CUDA_SMALL_MAX
    if small and inputs.n >= CUDA_MIN_ROWS:
        return ["cuda", "triton"]
    return ["triton", "cuda"]

"""The harness itself: the reference equals itself, and a planted difference is caught."""

import pytest
import torch
from harness import check_backend, compare_metrics

import esper_kernels as ek
from esper_kernels.synthetic import SPEC_CASES, make_batch

pytestmark = pytest.mark.reference


def test_reference_matches_itself_fp32_and_bf16():
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    for dtype in (torch.float32, torch.bfloat16):
        check_backend("reference", make_batch((3, 7), layout, dtype=dtype, seed=1), layout,
                      ek.PPOLossConfig(entropy_coef=0.1))


def test_compare_metrics_catches_a_difference():
    with pytest.raises(AssertionError):
        compare_metrics({"loss": 1.0}, {"loss": 1.001})
    with pytest.raises(AssertionError):
        compare_metrics({"steps": 3.0}, {"steps": float("nan")})


@pytest.mark.parametrize("sizes, n, first", [
    *((SPEC_CASES[c].heads, SPEC_CASES[c].n_rows, first) for c, first in (
        ("esper", "triton"),  # esper: triton's graph time was lower on the H100
        ("rl_64k", "cuda"),  # rl_64k / rl_1m: cuda
        ("wide", "triton"),
        ("vocab", "triton"))),
    ({"a": 33, "b": 2}, 65536, "triton"),  # a head wider than the CUDA tile
])
def test_auto_prefers_the_measured_faster_cuda_backend(sizes, n, first):
    from esper_kernels.backends.choice import cuda_preference
    from esper_kernels.inputs import prepare_inputs

    layout = ek.HeadLayout(sizes)
    H = layout.num_heads
    inputs = prepare_inputs(layout, torch.zeros(n, layout.total), None, torch.zeros(n, H, dtype=torch.long),
                            torch.zeros(n, H), torch.zeros(n))
    order = cuda_preference(inputs)
    assert order[0] == first and sorted(order) == ["cuda", "triton"]


@pytest.mark.parametrize("floor, first", [(None, "cpu"), ({"op": 0.05}, "cpu")])
def test_auto_on_cpu_takes_the_measured_faster_backend(floor, first):
    """The fused cpu backend, floors or not (measured faster than the reference in both cases)."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((3, 4), layout, seed=0)
    out = ek.ppo_loss(**b, layout=layout, config=ek.PPOLossConfig(prob_floor=floor), validate=False)
    want = first if ek.available_backends()[first].available else "reference"
    assert out.backend == want

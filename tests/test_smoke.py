"""The harness itself: the reference equals itself, and a planted difference is caught."""

import pytest
import torch
from harness import check_backend, compare_metrics

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

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

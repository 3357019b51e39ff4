"""The harness itself: the reference equals itself, and a planted difference is caught."""

import pytest
import torch
from harness import check_backend, compare_metrics

import esper_kernels as ek
from esper_kernels.synthetic import STANDARD_CASES, make_batch

pytestmark = pytest.mark.reference


def test_reference_matches_itself_fp32_and_bf16():
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    for dtype in (torch.float32, torch.bfloat16):
        check_backend(
            "reference", make_batch((3, 7), layout, dtype=dtype, seed=1), layout, ek.PPOLossConfig(entropy_coef=0.1)
        )


def test_compare_metrics_catches_a_difference():
    with pytest.raises(AssertionError):
        compare_metrics({"loss": 1.0}, {"loss": 1.001})
    with pytest.raises(AssertionError):
        compare_metrics({"steps": 3.0}, {"steps": float("nan")})


@pytest.mark.parametrize(
    "sizes, n, first",
    [
        *(
            (STANDARD_CASES[c].heads, STANDARD_CASES[c].n_rows, first)
            for c, first in (
                ("esper", "triton"),  # esper: triton's graph time was lower on the H100
                ("rl_64k", "cuda"),  # rl_64k / rl_1m: cuda
                ("wide", "triton"),
                ("vocab", "triton"),
            )
        ),
        ({"a": 33, "b": 2}, 65536, "triton"),  # a head wider than the CUDA tile
    ],
)
def test_auto_prefers_the_measured_faster_cuda_backend(sizes, n, first):
    from esper_kernels.backends.choice import cuda_preference
    from esper_kernels.inputs import prepare_inputs

    layout = ek.HeadLayout(sizes)
    H = layout.num_heads
    inputs = prepare_inputs(
        layout,
        torch.zeros(n, layout.total),
        None,
        torch.zeros(n, H, dtype=torch.long),
        torch.zeros(n, H),
        torch.zeros(n),
    )
    order = cuda_preference(inputs)
    assert order[0] == first and sorted(order) == ["cuda", "triton"]


@pytest.mark.parametrize("floor", [None, {"op": 0.05}])
def test_auto_on_cpu_takes_the_cpu_backend_with_or_without_floors(floor):
    """The fused cpu backend, floors or not (measured faster than the reference in both cases); the reference
    only when the extension is not built."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((3, 4), layout, seed=0)
    out = ek.ppo_loss(**b, layout=layout, config=ek.PPOLossConfig(prob_floor=floor), validate=False)
    assert out.backend == ("cpu" if ek.available_backends()["cpu"].available else "reference")


def test_one_version_and_one_triton_minimum():
    """The installed metadata's version is esper_kernels.__version__ (pyproject reads it), and the Triton extra's
    minimum is the backend's MIN_TRITON."""
    import importlib.metadata
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from esper_kernels.backends import triton_backend

    assert importlib.metadata.version("esper_kernels") == ek.__version__
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (spec,) = pyproject["project"]["optional-dependencies"]["triton"]
    minimum = tuple(int(x) for x in re.fullmatch(r"triton>=(\d+)\.(\d+)", spec).groups())
    assert minimum == triton_backend.MIN_TRITON

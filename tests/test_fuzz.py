"""A hypothesis fuzz of every CPU-runnable backend against the reference, in the corners where bugs lived.

Invalid data with ``validate=False`` (actions out of range or masked out, empty masks, negative and NaN
weights), probability floors, no joint clamp, large common logit offsets, single-action and empty masks, both
mask modes, NaN/Inf garbage where nothing may read it. Each example compares the outputs, the metrics and the
gradients, NaN patterns included (docs/semantics.md; gradients: the non-finite pattern, section 3). The float64
reference arbitrates gradient mismatches where the float32 reference is itself ill-conditioned.

``HYPOTHESIS_PROFILE=thorough`` runs 300 examples per backend instead of CI's few dozen.
"""

from __future__ import annotations

import os

import pytest
import torch
from float64_arbiter import check_arbitrated
from hypothesis import given, settings
from hypothesis import strategies as st
from ref_cases import cases, layout_of, random_batch, single_thread  # noqa: F401

import esper_kernels as ek

pytestmark = pytest.mark.fuzz

FUSED = [b for b in ("cpu", "triton") if ek.available_backends()[b].available]
#: examples per backend in CI (the interpreter runs Triton's kernels op by op in numpy: far fewer for it)
EXAMPLES = {"cpu": 60, "triton": 12}


@st.composite
def adversarial(draw):
    sizes, kw, config = draw(cases(messy=None))
    # the corners: no joint clamp and floors more often, a large common offset, far-below-the-fill logits
    if draw(st.booleans()):
        config = ek.PPOLossConfig(**{**_fields(config), "joint_log_ratio_clamp": None})
    offset = draw(st.sampled_from([0.0, 0.0, 50.0, 1e4, -2e4]))
    return sizes, kw, config, offset


def _fields(config: ek.PPOLossConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def _offset(batch: dict, offset: float) -> dict:
    if offset:
        batch = dict(batch, logits=batch["logits"] + offset)
    return batch


def _fuzz(backend: str, data) -> None:
    sizes, kw, config, offset = data
    batch = _offset(random_batch(sizes, dtype=torch.float32, **kw), offset)
    check_arbitrated(backend, batch, layout_of(sizes), config)


@pytest.mark.parametrize("backend", FUSED)
def test_fuzz_against_the_reference(backend):
    examples = 300 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else EXAMPLES[backend]

    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(adversarial())
    def run(data):
        _fuzz(backend, data)

    run()

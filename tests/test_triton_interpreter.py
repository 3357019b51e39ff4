"""The triton backend in Triton's interpreter (CPU tensors, TRITON_INTERPRET=1): equal to the reference.

Every comparison goes through ``harness.check_backend`` (SPEC section 6 tolerances, random incoming gradients on
loss, log_probs and entropy). The interpreter is slow (each kernel op is a numpy call), so shapes are small and
the tiling knobs of ``triton_backend`` are lowered to reach, on tiny batches, the paths that large batches take
on a GPU: the streaming (online log-sum-exp) path of wide heads, many programs per call and several reduction
stages. Skipped where the interpreter is not in use (a GPU machine runs tests/test_gpu_triton.py instead).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from float64_arbiter import check_triton
from harness import check_output_grads_only, per_head, run
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ref_cases import (
    cases,
    check_metric_table,
    layout_of,
    per_head_forms_case,
    random_batch,
    stats_cases,
    strided_rows_case,
)

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                       reason="Triton interpreter not in use (TRITON_INTERPRET=1 is set by conftest without CUDA)"),
]

tb = pytest.importorskip("esper_kernels.backends.triton_backend")
if not ek.available_backends()["triton"].available:
    pytest.skip(f"triton backend unavailable: {ek.available_backends()['triton'].reasons}", allow_module_level=True)

LAYOUT = ek.HeadLayout(ek.ESPER_HEADS)
#: tiny tiles: heads of more than 16 actions stream in blocks of 16 columns, 4 rows per program, and the
#: partial statistics fold in several reduction stages of 2-row chunks
TINY = dict(MAX_TILE=32, MAX_ROWS=4, REDUCE_TILE=128, REDUCE_FINAL_ROWS=2, REDUCE_ROWS_PER_PROGRAM=2)


@contextlib.contextmanager
def tuning(**knobs):
    with mock.patch.multiple(tb, **knobs):
        yield


def check(batch, layout, config=None, **kw):
    return check_triton(batch, layout, config, **kw)


# -- every config field, both surrogates, floors, values, messy data: hypothesis ---------------------------
@settings(max_examples=int(os.environ.get("TRITON_INTERPRET_EXAMPLES", "16")), deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs seconds in the interpreter
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(messy=None), dtype=st.sampled_from([torch.float32, torch.float16]),
       tiny=st.booleans(), form=st.sampled_from(["packed", "sequence", "mapping"]))
def test_equals_reference_hypothesis(case, dtype, tiny, form):
    sizes, kw, config = case
    layout = layout_of(sizes)
    batch = random_batch(sizes, dtype=dtype, **kw)
    if form != "packed":
        batch["logits"] = per_head(batch["logits"], layout, as_mapping=form == "mapping")
        if batch["action_masks"] is not None:
            batch["action_masks"] = per_head(batch["action_masks"], layout, as_mapping=form == "mapping")
    with tuning(**TINY) if tiny else contextlib.nullcontext():
        check(batch, layout, config)


# -- fixed cases -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [
    ek.PPOLossConfig(entropy_coef=0.01),
    ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05, clip_eps_high=0.28,
                     prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.2}, value_clip=0.2,
                     entropy_coef_per_head={"op": 2.0, "tempo": 0.0}),
], ids=["joint", "per_head_floor"])
def test_esper_batch(dtype, config):
    """make_batch: esper's causal relevance, NaN garbage in absent steps, values (clipped for per_head)."""
    batch = make_batch((3, 5), LAYOUT, dtype=dtype, seed=3)
    if config.value_clip is not None:
        batch["old_values"] = batch["values"] + 0.3 * torch.randn(batch["values"].shape)
    check(batch, LAYOUT, config)


@pytest.mark.parametrize("floor", [None, 0.02])
def test_wide_head_streams(floor):
    """A head wider than one tile (100 actions, blocks of 16 columns) next to small ones; with and without a
    floor on the wide head (its forward then takes 3 passes over the row, its backward 5)."""
    layout = ek.HeadLayout({"a": 3, "wide": 100, "b": 5})
    batch = random_batch(list(layout.sizes), (7,), seed=11, mask_density=0.5, values=True, old_values=True,
                         logit_scale=3.0)
    config = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, value_clip=0.5,
                              prob_floor=None if floor is None else {"wide": floor, "a": 0.1})
    with tuning(**TINY):
        plan = tb._Plan(layout.sizes, 7, torch.device("cpu"))
        assert plan.wide == (False, True, False) and plan.block_c == 16
        check(batch, layout, config)
    with tuning(MAX_TILE=64):  # 2 rows of 32 columns; and the joint surrogate
        check(batch, layout, ek.PPOLossConfig(entropy_coef=0.1, prob_floor=[0.1, floor, None]))


def test_per_head_tensors_mapping_sequence_and_strides():
    """Per-head logits/masks as separate tensors (a mapping), actions as a sequence of int32 and int64 tensors,
    old log-probs as stride-2 columns, relevance as a sequence, bool weights, uint8 masks."""
    check(*per_head_forms_case())


def test_non_contiguous_rows():
    """Logits and masks as column slices of wider buffers (row stride > S), per-step tensors as strided views,
    a 2-D batch shape."""
    batch, layout = strided_rows_case()
    check(batch, layout, ek.PPOLossConfig(entropy_coef=0.01))


def test_many_programs_and_reduction_stages():
    """20 rows at 2 rows per program: 10 partial rows folded 2 at a time (several reduction launches)."""
    b = make_batch((20,), LAYOUT, seed=9)
    with tuning(MAX_ROWS=2, REDUCE_TILE=64, REDUCE_FINAL_ROWS=2, REDUCE_ROWS_PER_PROGRAM=2):
        check(b, LAYOUT, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.01))


def test_out_of_range_actions_and_garbage():
    """Actions out of range (negative, = A_h, huge int64) at present steps give NaN log-probs; nothing else reads
    out of range (the interpreter raises on an out-of-bounds access); metrics count them."""
    b = make_batch((12,), LAYOUT, seed=4)
    b["weights"][:6] = 1.0
    acts = b["actions"]
    acts[0, 0], acts[1, 2], acts[2, 7], acts[3, 3] = -1, LAYOUT.sizes[2], 2**62, -(2**40)
    b["head_relevance"][0, 0] = False  # an irrelevant head with a bad action: NaN log-prob, finite loss terms
    out, _ = check(b, LAYOUT, ek.PPOLossConfig(entropy_coef=0.01))
    m = out.metrics.to_dict()
    assert m["head_slot_invalid_action"] >= 1 and m["head_op_invalid_action"] >= 1
    assert torch.isnan(out.log_probs[1, 2])


def test_empty_batch_and_all_absent():
    b = make_batch((0,), LAYOUT, seed=1)
    out, _ = check(b, LAYOUT, check_grads=False)
    assert out.metrics.to_dict()["steps"] == 0
    b = make_batch((5,), LAYOUT, seed=2)
    b["weights"].zero_()
    check(b, LAYOUT, ek.PPOLossConfig(entropy_coef=0.1))


def test_grad_of_log_probs_only():
    """Only log_probs and entropy reach the loss (the losses' incoming gradient is None)."""
    check_output_grads_only("triton", make_batch((6,), LAYOUT, seed=6), LAYOUT)


def test_deterministic():
    """Repeated calls give bitwise the same outputs, statistics and gradients."""
    b = make_batch((10,), ek.HeadLayout({"a": 3, "w": 40}), seed=7)
    layout = ek.HeadLayout({"a": 3, "w": 40})
    config = ek.PPOLossConfig(surrogate="per_head", prob_floor=[None, 0.01], entropy_coef=0.1)
    with tuning(**TINY):
        results = [run("triton", b, layout, config, grad_seed=1) for _ in range(2)]
    (o1, g1), (o2, g2) = results
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats, o2.metrics.stats)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_backend_reasons():
    info = ek.available_backends()["triton"]
    assert info.available and "cpu" in info.devices
    b = make_batch((3,), LAYOUT, dtype=torch.float64, seed=0)
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        ek.ppo_loss(**b, layout=LAYOUT, backend="triton")
    assert tb.TritonBackend().saved_shape(5, 8) == [5, 9]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stats_cases(max_heads=9))
def test_metric_table_kernel_equals_the_torch_derivation(case):
    """The one-program metric-table kernel: the table of ``esper_kernels.metrics`` on adversarial statistics."""
    from esper_kernels.backends.triton_backend import BACKENDS

    check_metric_table(BACKENDS["triton"].metric_table, case)

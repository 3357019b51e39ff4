"""The triton backend in Triton's interpreter (CPU tensors, TRITON_INTERPRET=1): what only it has.

The behaviours every fused backend shares run on this backend in tests/test_conformance.py (the ``triton`` row of
tests/backends_under_test.py, with the tiny tiles below as a variant). Here: the tuning knobs (wide heads streamed
in chunks, vocab rows, head groups and column stores, many programs merged in two levels of tickets), the kernels'
compile-time flags and launch counts, determinism under tiny tiles, the forward's table against the metrics kernel.

Every comparison goes through ``harness.check_backend`` / ``float64_arbiter`` (docs/semantics.md section 7
tolerances). The
one-pass design has three paths through the backward, and each is checked against the reference: the fast path
(``loss.backward()``: the forward's gradient is returned as it is), the rescale path (an upstream scalar other
than 1 on ``loss`` only) and the recompute path (a gradient on ``log_probs``, ``entropy`` or another loss term,
a non-finite upstream, or a second backward through the same graph). The interpreter is slow (each kernel op is
a numpy call), so shapes are small and the tiling knobs of ``triton_backend`` are lowered to reach, on tiny
batches, the paths large batches take on a GPU: wide heads streamed in several chunks, many programs merged in
two levels of tickets, the pre-pass over several programs and chunks. Skipped where the interpreter is not in
use (a GPU machine runs tests/test_gpu_triton.py instead).
"""

from __future__ import annotations

import os

import pytest
import torch
from backends_under_test import TINY, tuning
from float64_arbiter import check_triton
from harness import ATOL, RTOL, assert_grad_close, grads_after, leaf_batch, run
from ref_cases import (
    PATH_CONFIGS,
    random_batch,
    wide_config,
)
from triton_launches import Launches

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
        reason="Triton interpreter not in use (TRITON_INTERPRET=1 is set by conftest without CUDA)",
    ),
]

tb = pytest.importorskip("esper_kernels.backends.triton_backend")
if not ek.available_backends()["triton"].available:
    pytest.skip(f"triton backend unavailable: {ek.available_backends()['triton'].reasons}", allow_module_level=True)
tk = pytest.importorskip("esper_kernels.backends.triton_kernels")

LAYOUT = ek.HeadLayout(ek.ESPER_HEADS)


def check(batch, layout, config=None, **kw):
    return check_triton(batch, layout, config, **kw)


def _same_grads(batch, layout, config, backward):
    """The triton backend's gradients after ``backward`` equal the reference's (float32 on upcast inputs)."""
    ref_batch = dict(batch, logits=batch["logits"].float())
    _, g, gv = grads_after("triton", batch, layout, config, backward)
    _, rg, rgv = grads_after("reference", ref_batch, layout, config, backward)
    assert_grad_close("grad logits", g, rg, batch["logits"].dtype)
    if gv is not None:
        torch.testing.assert_close(gv, rgv, rtol=RTOL, atol=ATOL, equal_nan=True)
    return g


# -- every config field, both surrogates, floors, values, messy data: hypothesis ---------------------------
# -- the three backward paths ---------------------------------------------------------------------------------
PATH_LIST = list(PATH_CONFIGS.values())


def _esper_batch(dtype=torch.float32, seed=3, shape=(3, 5)):
    b = make_batch(shape, LAYOUT, dtype=dtype, seed=seed)
    b["old_values"] = b["values"] + 0.3 * torch.randn(b["values"].shape, generator=torch.Generator().manual_seed(1))
    return b


@pytest.mark.parametrize("config", PATH_LIST, ids=list(PATH_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_returns_the_forwards_gradient(config, dtype):
    """``loss.backward()``: the fix-up launches and leaves the forward's gradient as it is (equal to the reference:
    test_conformance.test_backward_fast_path); the forward wrote the gradient (GRAD_ON, VGRAD_ON) and the fix-up
    held it (HOLDS)."""
    b = _esper_batch(dtype)
    with Launches().recording() as rec:
        grads_after("triton", b, LAYOUT, config, lambda out: out.loss.backward())
    (fwd,) = rec.main(fixup=False)
    (fix,) = rec.main(fixup=True)
    assert fwd["GRAD_ON"] and fwd["VGRAD_ON"]
    assert fix["HOLDS"] and not fix["HAS_GLP"] and not fix["HAS_GENT"]


def test_recompute_path_for_per_step_outputs():
    """Gradients on log_probs and entropy with loss: the fix-up recomputes (HOLDS with HAS_GLP / HAS_GENT); the
    gradients equal the reference's (test_conformance.test_backward_recompute_path_for_per_step_outputs_with_loss)."""
    b = _esper_batch()
    config = PATH_CONFIGS["per_head_floor_norm"]
    g = torch.Generator().manual_seed(4)
    glp = torch.randn(15, 8, generator=g)
    gent = torch.randn(15, 8, generator=g)
    with Launches().recording() as rec:
        grads_after(
            "triton",
            b,
            LAYOUT,
            config,
            lambda out: torch.autograd.backward(
                [out.loss, out.log_probs.reshape(15, 8), out.entropy.reshape(15, 8)], [torch.tensor(1.0), glp, gent]
            ),
        )
    (fix,) = rec.main(fixup=True)
    assert fix["HOLDS"] and fix["HAS_GLP"] and fix["HAS_GENT"]


def test_no_gradient_written_without_grad():
    """no_grad, inference_mode, and logits/values that do not require grad: the forward writes no gradient
    (GRAD_ON / VGRAD_ON off); only the values' gradient when only the values require grad."""
    b = make_batch((7,), LAYOUT, seed=2)
    b["logits"].requires_grad_(True)
    b["values"].requires_grad_(True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with Launches().recording() as rec, ctx():
            out = ek.ppo_loss(**b, layout=LAYOUT, backend="triton", validate=False)
        (fwd,) = rec.main(fixup=False)
        assert not fwd["GRAD_ON"] and not fwd["VGRAD_ON"] and not out.loss.requires_grad
    plain = dict(b, logits=b["logits"].detach(), values=b["values"].detach())
    with Launches().recording() as rec:
        ek.ppo_loss(**plain, layout=LAYOUT, backend="triton", validate=False)
    (fwd,) = rec.main(fixup=False)
    assert not fwd["GRAD_ON"] and not fwd["VGRAD_ON"]
    only_values = dict(b, logits=b["logits"].detach())
    with Launches().recording() as rec:
        out = ek.ppo_loss(**only_values, layout=LAYOUT, backend="triton", validate=False)
        out.loss.backward()
    (fwd,) = rec.main(fixup=False)
    assert not fwd["GRAD_ON"] and fwd["VGRAD_ON"]
    assert b["values"].grad is not None and b["logits"].grad is None


def test_launch_count_of_a_training_step():
    """One forward + ``loss.backward()`` + reading the metrics: three kernel launches (pre-pass, forward, fix-up);
    the metric table comes from the forward (no launch of its own)."""
    b = leaf_batch(make_batch((9,), LAYOUT, seed=5))
    with Launches().recording() as rec:
        out = ek.ppo_loss(**b, layout=LAYOUT, backend="triton", validate=False)
        out.loss.backward()
        out.metrics.to_dict()
    names = [name for name, _, _ in rec.calls]
    assert names == ["_ppo_pre_kernel", "_ppo_main_kernel", "_ppo_main_kernel"], names
    # merged statistics (no forward wrote their table) take the metrics kernel
    with Launches().recording() as rec:
        merged = ek.PPOMetrics.merge([out.metrics, out.metrics])
        merged.to_dict()
    assert [name for name, _, _ in rec.calls] == ["_ppo_metrics_kernel"]


# -- shapes: wide and vocab rows, many programs, odd N ------------------------------------------------------
@pytest.mark.parametrize("floor", [None, 0.02])
def test_wide_head_streams(floor):
    """A head wider than a chunk (100 actions in chunks of 16: the vocab path, read again for the gradient) next
    to small ones; with and without a floor on the wide head (three passes for the statistics, three more for
    the gradient); the fast path and the recompute path."""
    layout = ek.HeadLayout({"a": 3, "wide": 100, "b": 5})
    batch = random_batch(
        list(layout.sizes), (7,), seed=11, mask_density=0.5, values=True, old_values=True, logit_scale=3.0
    )
    config = wide_config(floor)
    with tuning(**TINY):
        enc_plan = tb._Plan(layout.sizes, 7, torch.device("cpu"), True)
        assert enc_plan.wide == (False, True, False) and enc_plan.block_c == 16
        check(batch, layout, config)
        _same_grads(batch, layout, config, lambda out: out.loss.backward())
    with tuning(MAX_BLOCK_C=128):  # the wide head in one chunk kept in registers; the joint surrogate
        config = ek.PPOLossConfig(entropy_coef=0.1, prob_floor=[0.1, floor, None])
        _same_grads(batch, layout, config, lambda out: out.loss.backward())


def test_vocab_row_split_in_chunks():
    """One head of 200 actions without masks, fp16, chunks of 16 (13 chunks, two passes)."""
    layout = ek.HeadLayout({"token": 200})
    batch = random_batch([200], (5,), seed=12, mask_density=None, dtype=torch.float16, relevance=False)
    config = ek.PPOLossConfig(entropy_coef=0.01, normalize_entropy=True)
    with tuning(**TINY):
        check(batch, layout, config)
        _same_grads(batch, layout, config, lambda out: out.loss.backward(torch.tensor(0.5)))


def test_many_programs_two_level_merge():
    """13 rows at 2 rows per program: 7 programs, merge groups of 2 (4 groups, the last one short: two ticket
    levels), and a pre-pass of 2 programs of 4 chunks each; statistics and metrics equal the reference's."""
    b = make_batch((13,), LAYOUT, seed=9)
    with tuning(ROWS_PER_PROGRAM=2, MERGE_GROUP=2, MERGE_CHUNK=2, PRE_CHUNK=2, PRE_PROGRAMS=3, PRE_MERGE_CHUNK=2):
        plan = tb._Plan(LAYOUT.sizes, 13, torch.device("cpu"), True)
        assert plan.programs == 7 and plan.n_groups == 4
        check(
            b,
            LAYOUT,
            ek.PPOLossConfig(
                surrogate="per_head",
                entropy_coef=0.01,
                normalize_advantages=True,
                advantage_std="unbiased",
                ratio_std="unbiased",
            ),
        )


def test_head_groups_and_column_stores():
    """Packed heads sharing tiles (GROUP_MAX 16 and 32) and column-at-a-time gradient stores (the forward's, and
    the backward's recompute's joined tiles) give the same results as one tile per head."""
    b = make_batch((6,), LAYOUT, seed=13)
    config = PATH_CONFIGS["per_head_floor_norm"]
    ref, ref_grads = run("triton", b, LAYOUT, config, grad_seed=2)
    for knobs in (
        dict(GROUP_MAX=32),
        dict(GROUP_MAX=0, TILE_STORE=False),
        dict(GROUP_MAX=16),
        dict(FIXUP_TILE_STORE=True),
    ):
        with tuning(**knobs):
            out, grads = run("triton", b, LAYOUT, config, grad_seed=2)
        assert torch.equal(out.loss, ref.loss), knobs
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), (knobs, k)


# -- input forms, data errors ---------------------------------------------------------------------------------
def test_deterministic():
    """Repeated calls give bitwise the same outputs, statistics, metric table and gradients (several programs
    and merge groups finishing in any order)."""
    layout = ek.HeadLayout({"a": 3, "w": 40})
    b = make_batch((10,), layout, seed=7)
    config = ek.PPOLossConfig(surrogate="per_head", prob_floor=[None, 0.01], entropy_coef=0.1)
    with tuning(**TINY):
        results = [run("triton", b, layout, config, grad_seed=1) for _ in range(2)]
    (o1, g1), (o2, g2) = results
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats, o2.metrics.stats)
    t1, t2 = (torch.tensor(list(o.metrics.to_dict().values())) for o in (o1, o2))
    assert torch.equal(t1.nan_to_num(7.0), t2.nan_to_num(7.0))
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_forward_table_equals_the_metrics_kernel():
    """The table the forward's last program writes equals the standalone metrics kernel's on the same statistics
    (and the torch derivation's, through check_backend above)."""
    b = make_batch((8,), LAYOUT, seed=14)
    config = ek.PPOLossConfig(surrogate="per_head", value_clip=0.2, ratio_std="unbiased", entropy_coef=0.1)
    b["old_values"] = b["values"] + 0.1
    out = ek.ppo_loss(**b, layout=LAYOUT, config=config, backend="triton", validate=False)
    backend = tb.BACKENDS["triton"]
    cfg = config.resolve(LAYOUT)
    table = backend.metric_table(out.metrics.stats, cfg, True)
    fresh = backend.metric_table(out.metrics.stats.clone(), cfg, True)  # another tensor: the metrics kernel
    assert table.data_ptr() != fresh.data_ptr()
    assert torch.equal(table.nan_to_num(7.0), fresh.nan_to_num(7.0))


def test_backend_interface():
    """Available on CPU tensors in the interpreter; its saved shape; one-pass (what it refuses:
    test_conformance.test_refuses_what_its_supports_data_excludes)."""
    info = ek.available_backends()["triton"]
    assert info.available and "cpu" in info.devices
    assert tb.TritonBackend().saved_shape(5, 8) == [tk.norm_size(8)]
    assert tb.TritonBackend.one_pass

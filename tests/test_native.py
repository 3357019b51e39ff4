"""The C++ ``cpu`` backend (esper_kernels._C, csrc/) against the reference.

Every comparison goes through ``harness.check_backend`` (docs/semantics.md section 7 tolerances, random incoming
gradients
on loss, log_probs and entropy, absent steps' gradients exactly 0). The cpu backend runs the same per-row
code (csrc/ppo_core.h) as the CUDA kernels, so these tests also cover the CUDA backend's math; the GPU tier
(tests/test_gpu_cuda.py) covers its threading and reductions.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from float64_arbiter import check_arbitrated
from harness import check_output_grads_only, per_head, run
from hypothesis import HealthCheck, given, settings
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
from esper_kernels.stats import G
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.native

LAYOUT = ek.HeadLayout(ek.ESPER_HEADS)


def test_extension_is_built():
    """The extension imports and the cpu backend is available (CI builds it; a missing build must fail here)."""
    from esper_kernels import _C

    info = ek.available_backends()
    assert info["cpu"].available, info["cpu"].reasons
    cuda = info["cuda"]
    if not torch.cuda.is_available():
        assert not cuda.available and cuda.reasons
        expected = "without its CUDA part" if not _C.has_cuda else "no CUDA device"
        assert expected in cuda.reasons[0], cuda.reasons


def check(batch, layout, config=None, **kw):
    """harness.check_backend for the cpu backend; a gradient mismatch is re-judged against the float64 reference
    (without a joint clamp, ratios of 1e13 times a floor's chain make the float32 reference's gradient noise)."""
    return check_arbitrated("cpu", batch, layout, config or ek.PPOLossConfig(), **kw)


# -- every config field, both surrogates, floors, values, messy data and garbage: hypothesis ---------------
@settings(max_examples=int(os.environ.get("NATIVE_EXAMPLES", "60")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(messy=None), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       form=st.sampled_from(["packed", "sequence", "mapping"]))
def test_equals_reference_hypothesis(case, dtype, form):
    sizes, kw, config = case
    if dtype != torch.float32:
        # messy data (relevant out-of-range actions) makes the loss and every gradient NaN, which
        # harness.assert_grad_close cannot compare in fp16/bf16 (its ulp bound is NaN); fp32 covers messy data
        kw = dict(kw, messy=False)
    layout = layout_of(sizes)
    batch = random_batch(sizes, dtype=dtype, **kw)
    if form != "packed":
        batch["logits"] = per_head(batch["logits"], layout, as_mapping=form == "mapping")
        if batch["action_masks"] is not None:
            batch["action_masks"] = per_head(batch["action_masks"], layout, as_mapping=form == "mapping")
    check(batch, layout, config)


@settings(max_examples=int(os.environ.get("NATIVE_EXAMPLES", "60")) // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(messy=None), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_row_path_and_vectorised_path_equal_reference(case, dtype):
    """Both small-head paths meet the reference: the row-vectorised one (16 rows in SIMD lanes) and the
    row-by-row one (the code the CUDA kernels run per row). They are not bitwise equal: the vectorised path
    has its own float32 exp/log with FMA and sums each row in float (one exp per logit), the row path rounds
    a float64 polynomial and sums in float64; so each is compared with the reference at the usual tolerances."""
    from esper_kernels.backends import native

    sizes, kw, config = case
    if dtype != torch.float32:
        kw = dict(kw, messy=False)  # (as test_equals_reference_hypothesis: NaN gradients in bf16)
    layout = layout_of(sizes)
    batch = random_batch(sizes, dtype=dtype, **kw)
    backend = native.BACKENDS["cpu"]
    try:
        for vec in (True, False):
            backend.vectorise = vec
            check(batch, layout, config)
    finally:
        backend.vectorise = True


# -- fixed cases -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [
    ek.PPOLossConfig(entropy_coef=0.01),
    ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05, clip_eps_high=0.28,
                     prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.2}, value_clip=0.2,
                     entropy_coef_per_head={"op": 2.0, "tempo": 0.0}),
    ek.PPOLossConfig(normalize_advantages=True, clip_eps=0.1, clip_eps_high=0.5, joint_log_ratio_clamp=None,
                     log_ratio_clamp=0.5, value_coef=1.0, mask_fill=-30.0),
], ids=["joint", "per_head_floor", "normadv_asym"])
def test_esper_batch(dtype, config):
    """make_batch: esper's causal relevance, NaN garbage in absent steps, values (clipped for per_head)."""
    batch = make_batch((4, 75), LAYOUT, dtype=dtype, seed=3)
    if config.value_clip is not None:
        batch["old_values"] = batch["values"] + 0.3 * torch.randn(batch["values"].shape)
    check(batch, LAYOUT, config)


@pytest.mark.parametrize("vclip", [None, 0.5])
def test_value_loss_and_value_weights(vclip):
    sizes = [4, 7]
    layout = layout_of(sizes)
    b = random_batch(sizes, (40,), seed=12, values=True, old_values=True, value_weights=True)
    check(b, layout, ek.PPOLossConfig(value_clip=vclip, value_coef=0.7, entropy_coef=0.02))
    b.pop("value_weights")
    check(b, layout, ek.PPOLossConfig(value_clip=vclip))


def test_per_head_advantages():
    sizes = [3, 9, 2]
    layout = layout_of(sizes)
    b = random_batch(sizes, (30,), seed=13, per_head_adv=True)
    check(b, layout, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1))
    check(b, layout, ek.PPOLossConfig(surrogate="per_head", normalize_advantages=True))


@pytest.mark.parametrize(("width", "floor"), [(5000, None), (300, 0.02)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_head(width, floor, dtype):
    """A wide head between small ones: 5,000 actions, and 300 with a floor (a floor on thousands of tiny
    probabilities is ill-conditioned in float32: the reference itself is ~1e-5 off its float64 gradient)."""
    layout = ek.HeadLayout({"a": 3, "wide": width, "b": 5})
    batch = random_batch(list(layout.sizes), (6,), seed=11, mask_density=0.5, values=True, old_values=True,
                         logit_scale=3.0, dtype=dtype)
    config = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, value_clip=0.5,
                              prob_floor=None if floor is None else {"wide": floor, "a": 0.1})
    check(batch, layout, config)


def test_widest_head():
    """One head of 131,072 actions (the largest supported), a few rows."""
    layout = ek.HeadLayout({"vocab": 131072})
    batch = random_batch([131072], (3,), seed=5, mask_density=0.9, weights="ones", relevance=False)
    check(batch, layout, ek.PPOLossConfig(entropy_coef=0.1))


def test_per_head_tensors_mapping_sequence_and_strides():
    """Per-head logits/masks as separate tensors (a mapping), actions as a sequence of int32 and int64 tensors,
    old log-probs as stride-2 columns, relevance as a sequence, bool weights, uint8 masks."""
    check(*per_head_forms_case())


def test_per_head_tensors_read_in_place():
    """Separate per-head leaves with their own row strides (views into padded buffers) are read without a copy:
    the backend gets the caller's storage."""
    sizes = [5, 12]
    layout = layout_of(sizes)
    b = random_batch(sizes, (11,), seed=21)
    bufs = [torch.full((11, a + 3), float("nan")) for a in sizes]
    parts = per_head(b["logits"], layout)
    leaves = []
    for buf, part, a in zip(bufs, parts, sizes):
        buf[:, 1:1 + a] = part
        leaves.append(buf[:, 1:1 + a])
    seen = []
    from esper_kernels.backends import native

    orig = native.forward_params

    def spy(call, outputs):
        seen.append([t.data_ptr() for t in call.logits])
        return orig(call, outputs)

    native.forward_params = spy
    try:
        check(dict(b, logits=leaves), layout, ek.PPOLossConfig(entropy_coef=0.1), leaf_fn=lambda lg, make: [
            make(buf).requires_grad_(True)[:, 1:1 + a] for buf, a in zip(bufs, sizes)])
        out = ek.ppo_loss(**dict(b, logits=leaves), layout=layout, backend="cpu", validate=False)
        assert torch.isfinite(out.loss)
    finally:
        native.forward_params = orig
    assert seen[-1] == [t.data_ptr() for t in leaves]


def test_non_contiguous_rows():
    """Logits and masks as column slices of wider buffers (row stride > S), per-step tensors as strided views,
    a 2-D batch shape."""
    batch, layout = strided_rows_case()
    check(batch, layout, ek.PPOLossConfig(entropy_coef=0.01))


def test_garbage_in_absent_steps_and_masked_positions():
    """NaN/Inf logits at masked positions and in absent steps, NaN old log-probs where irrelevant: nothing leaks."""
    sizes = [4, 6, 3]
    layout = layout_of(sizes)
    b = random_batch(sizes, (50,), seed=17, garbage=True, weights="float", values=True, value_weights=True)
    out, _ = check(b, layout, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.3, normalize_entropy=True))
    assert torch.isfinite(out.loss)


def test_out_of_range_actions():
    """Actions out of range (negative, = A_h, huge int64) at present steps give NaN log-probs and are counted;
    they are never used as an index (validate=False)."""
    b = make_batch((12,), LAYOUT, seed=4)
    b["weights"][:6] = 1.0
    acts = b["actions"]
    acts[0, 0], acts[1, 2], acts[2, 7], acts[3, 3] = -1, LAYOUT.sizes[2], 2**62, -(2**40)
    b["head_relevance"][0, 0] = False  # an irrelevant head with a bad action: NaN log-prob, finite loss terms
    out, _ = check(b, LAYOUT, ek.PPOLossConfig(entropy_coef=0.01))
    m = out.metrics.to_dict()
    assert m["head_slot_invalid_action"] >= 1 and m["head_op_invalid_action"] >= 1
    assert m["head_style_nonfinite"] == 1
    assert torch.isnan(out.log_probs[1, 2])
    b32 = dict(b, actions=b["actions"].clamp(-(2**31), 2**31 - 1).to(torch.int32))
    check(b32, LAYOUT, ek.PPOLossConfig(surrogate="per_head"))


def test_empty_batch_and_all_absent():
    b = make_batch((0,), LAYOUT, seed=1)
    out, _ = check(b, LAYOUT, check_grads=False)
    assert out.metrics.to_dict()["steps"] == 0
    b = make_batch((5,), LAYOUT, seed=2)
    b["weights"].zero_()
    check(b, LAYOUT, ek.PPOLossConfig(entropy_coef=0.1))


def test_constant_returns_explained_variance_is_nan():
    """Constant returns with fractional weights: the moments stay exact (var 0, explained variance NaN)."""
    sizes = [3]
    layout = layout_of(sizes)
    b = random_batch(sizes, (300,), seed=3, values=True, weights="float")
    b["returns"] = torch.full_like(b["returns"], 0.3)
    out, _ = check(b, layout)
    assert out.metrics.stats[G.RETURN_M2] == 0


def test_grad_of_log_probs_only():
    """Only log_probs and entropy reach the loss (the losses' incoming gradient is None)."""
    check_output_grads_only("cpu", make_batch((6,), LAYOUT, seed=6), LAYOUT)


def _bitwise(results):
    (o1, g1), (o2, g2) = results
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats.nan_to_num(7.0), o2.metrics.stats.nan_to_num(7.0))
    for k in g1:  # (messy data makes every gradient NaN: compared as equal)
        assert torch.equal(g1[k].nan_to_num(7.0), g2[k].nan_to_num(7.0)), k


def _check_thread_determinism(b, layout, config, threads=(1, 2, 2, 1)):
    """Bitwise equal outputs, statistics and gradients on repeated calls with 1 and 2 threads."""
    before = torch.get_num_threads()
    try:
        results = []
        for t in threads:
            torch.set_num_threads(t)
            results.append(run("cpu", b, layout, config, grad_seed=1))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        _bitwise([results[0], r])


def test_deterministic_repeated_calls_and_thread_counts():
    """Bitwise equal outputs, statistics and gradients on repeated calls and with 1 or 2 threads (the rows
    are cut into fixed chunks whatever the thread count; partials merge in chunk order)."""
    layout = ek.HeadLayout({"a": 3, "w": 40, "b": 7})
    b = random_batch(list(layout.sizes), (1000,), seed=7, values=True, old_values=True)
    config = ek.PPOLossConfig(surrogate="per_head", prob_floor=[None, 0.01, None], entropy_coef=0.1, value_clip=0.3)
    _check_thread_determinism(b, layout, config)


def test_backend_reasons_and_interface():
    from esper_kernels.backends import native

    b = make_batch((3,), LAYOUT, dtype=torch.float64, seed=0)
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        ek.ppo_loss(**b, layout=LAYOUT, backend="cpu")
    assert native.CpuBackend().saved_shape(5, 8) == [5, 25]
    many = ek.HeadLayout({f"h{i}": 2 for i in range(33)})
    bm = random_batch([2] * 33, (4,), seed=1)
    with pytest.raises(ek.BackendUnavailableError, match="at most 32 heads"):
        ek.ppo_loss(**bm, layout=many, backend="cpu")
    out = ek.ppo_loss(**make_batch((8,), LAYOUT, seed=2), layout=LAYOUT, backend="auto", validate=False)
    assert out.backend == "cpu"


@settings(max_examples=200, deadline=None)
@given(case=stats_cases(max_heads=32))
def test_metric_table_equals_the_torch_derivation(case):
    """csrc/ppo_metrics.h (the cpu backend's table, and the cuda backend's in one GPU thread): the table of
    ``esper_kernels.metrics`` on adversarial statistics."""
    from esper_kernels.backends.native import BACKENDS

    check_metric_table(BACKENDS["cpu"].metric_table, case)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_tensors"])
def test_runs_without_autograd(mode):
    """Evaluation calls (approx_kl for early stopping, logging) under no_grad / inference_mode, and inference
    tensors passed later, give the training call's numbers."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((4, 5), layout, seed=2)
    want = ek.ppo_loss(**b, layout=layout, backend="cpu", validate=False)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode)
    if mode == "inference_tensors":
        with torch.inference_mode():
            b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    with ctx if ctx is not None else contextlib.nullcontext():
        got = ek.ppo_loss(**b, layout=layout, backend="cpu", validate=False)
        assert torch.equal(got.loss, want.loss.detach())
        assert got.metrics.to_dict().keys() == want.metrics.to_dict().keys()
        assert torch.equal(got.metrics.stats, want.metrics.stats)


def _wide_adversarial_batch(dtype, seed=31):
    """Wide heads (33, 48, 1,000 actions) beside a small one, with adversarial present rows: an empty mask, a
    single valid action (taken, or not), a full mask, actions out of range in an irrelevant head (an empty mask in
    an irrelevant head too), and NaN/+-inf
    at every masked position."""
    layout = ek.HeadLayout({"s": 5, "w33": 33, "w1000": 1000, "w48": 48})
    sizes = list(layout.sizes)
    b = random_batch(sizes, (70,), seed=seed, mask_density=0.5, values=True, logit_scale=3.0, dtype=torch.float32,
                     garbage=False)
    z, m, acts, rel, w = b["logits"], b["action_masks"], b["actions"], b["head_relevance"], b["weights"]
    w[:8] = 1.0
    offs = [sum(sizes[:h]) for h in range(len(sizes))]
    for h, (off, a) in enumerate(zip(offs, sizes)):
        if a <= 32:
            continue
        cols = slice(off, off + a)
        m[0, cols] = False  # empty mask, on an irrelevant head (relevant, it makes the loss NaN: test_numerics)
        rel[0, h] = False
        m[1, cols] = False  # one valid action, the taken one
        m[1, off + int(acts[1, h])] = True
        m[2, cols] = False  # one valid action, not the taken one
        m[2, off + (int(acts[2, h]) + 1) % a] = True
        m[3, cols] = True  # every action valid
        acts[4, h], acts[5, h], acts[6, h], acts[7, h] = -1, a, 2**40, -(2**40)  # out of range, irrelevant
        rel[4:8, h] = False
    g = torch.Generator().manual_seed(seed)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, z.shape, generator=g)]
    present = (w > 0) & torch.isfinite(w)
    b["logits"] = torch.where(m & present.unsqueeze(-1), z, garbage).to(dtype)
    return b, layout


@pytest.mark.parametrize("vectorise", [True, False])
@pytest.mark.parametrize("config", [
    ek.PPOLossConfig(entropy_coef=0.05),
    ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, mask_fill=-30.0),
], ids=["joint", "per_head_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wide_heads_adversarial_rows(dtype, config, vectorise):
    """Wide heads (more than 32 actions, no floor) on the AVX-512 wide path (vectorise) and on the row path:
    masked garbage never leaks, empty masks, single valid actions and out-of-range actions behave as the
    reference, for A = 33, 48 and 1,000 (tails of 1, 0 and 8 columns), packed and per-head tensors."""
    from esper_kernels.backends import native

    b, layout = _wide_adversarial_batch(dtype)
    backend = native.BACKENDS["cpu"]
    try:
        backend.vectorise = vectorise
        out, _ = check(b, layout, config)
        assert torch.isfinite(out.loss)
        m = out.metrics.to_dict()
        assert m["head_w1000_empty_mask"] >= 1 and m["head_w33_invalid_action"] >= 4
        b2 = dict(b, logits=per_head(b["logits"], layout), action_masks=per_head(b["action_masks"], layout))
        check(b2, layout, config)
    finally:
        backend.vectorise = True


def test_wide_heads_deterministic_across_threads():
    """The wide path's per-row sums have a fixed order: bitwise equal results with 1 or 2 threads."""
    layout = ek.HeadLayout({"a": 3, "w": 300, "v": 1000})
    b = random_batch(list(layout.sizes), (700,), seed=8, values=True)
    config = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1, normalize_entropy=True)
    _check_thread_determinism(b, layout, config)


def _floor_adversarial_batch(dtype, seed=41):
    """Small heads (1 to 32 actions) with adversarial present rows for a floor: an empty mask, a single valid
    action (taken, or not), every action valid at equal logits (no p1 under the floor), valid logits far below
    mask_fill = -30 (every valid p1 under the floor when the fill is -30), one dominant action, actions out of
    range in irrelevant heads, and NaN/+-inf at every masked position and in absent steps."""
    layout = ek.HeadLayout({"one": 1, "two": 2, "five": 5, "op": 13, "full": 32, "odd": 17})
    sizes = list(layout.sizes)
    # logit scale 3: heads with most actions under the floor, where the chain rule's float32 terms cancel to
    # noise farther from float64 than the reference (the backends take the closed form there)
    b = random_batch(sizes, (90,), seed=seed, mask_density=0.6, values=True, logit_scale=3.0,
                     dtype=torch.float32, garbage=False)
    z, m, acts, rel, w = b["logits"], b["action_masks"], b["actions"], b["head_relevance"], b["weights"]
    w[:10] = 1.0
    offs = [sum(sizes[:h]) for h in range(len(sizes))]
    for h, (off, a) in enumerate(zip(offs, sizes)):
        cols = slice(off, off + a)
        m[0, cols] = False  # empty mask, on an irrelevant head (relevant, it makes the loss NaN: test_numerics)
        rel[0, h] = False
        m[1, cols] = False  # one valid action, the taken one
        m[1, off + int(acts[1, h])] = True
        m[2, cols] = False  # one valid action, not the taken one
        m[2, off + (int(acts[2, h]) + 1) % a] = True
        m[3, cols] = True  # every action valid, equal logits: p1 = 1/A >= f everywhere
        z[3, cols] = 0.7
        if a >= 2:  # valid logits far below the fill: with mask_fill = -30, every valid p1 < f
            m[4, cols] = torch.arange(a) % 2 == 0
            m[4, off + int(acts[4, h])] = True
            z[4, cols] = -60.0 + 0.1 * torch.arange(a, dtype=z.dtype)
        z[9, cols] = -4.0  # one dominant action: the others under the floor
        z[9, off + int(acts[9, h])] = 6.0
        acts[5, h], acts[6, h], acts[7, h], acts[8, h] = -1, a, 2**40, -(2**40)  # out of range, irrelevant
        rel[5:9, h] = False
    g = torch.Generator().manual_seed(seed)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, z.shape, generator=g)]
    present = (w > 0) & torch.isfinite(w)
    b["logits"] = torch.where(m & present.unsqueeze(-1), z, garbage).to(dtype)
    return b, layout


@pytest.mark.parametrize("vectorise", [True, False])
@pytest.mark.parametrize("config", [
    ek.PPOLossConfig(entropy_coef=0.05, prob_floor=[0.05] * 6),
    ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, mask_fill=-30.0,
                     prob_floor={"two": 0.3, "five": 0.1, "op": 0.02, "full": 0.01}),
], ids=["joint_all_floored", "per_head_norm_some_floored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_floored_small_heads_adversarial_rows(dtype, config, vectorise):
    """Floored heads of at most 32 actions on the AVX-512 small-head path (vectorise) and on the row path:
    the floor's renormalisation (none, some or every valid action under the floor), masked garbage never
    leaks, empty masks, single valid actions and out-of-range actions behave as the reference, packed and
    per-head tensors. Gradients through a floor are ill-conditioned: mismatches are re-judged against the
    float64 reference."""
    from float64_arbiter import check_arbitrated

    from esper_kernels.backends import native

    b, layout = _floor_adversarial_batch(dtype)
    backend = native.BACKENDS["cpu"]
    try:
        backend.vectorise = vectorise
        out, _ = check_arbitrated("cpu", b, layout, config)
        assert torch.isfinite(out.loss)
        m = out.metrics.to_dict()
        assert m["head_op_empty_mask"] >= 1 and m["head_op_invalid_action"] >= 4
        b2 = dict(b, logits=per_head(b["logits"], layout), action_masks=per_head(b["action_masks"], layout))
        check_arbitrated("cpu", b2, layout, config)
    finally:
        backend.vectorise = True


def test_floored_small_heads_deterministic_across_threads():
    """The floored small-head path's per-lane sums have a fixed order: bitwise equal results on repeated calls
    and with 1 or 2 threads."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((8, 125), layout, seed=9)
    config = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1, normalize_entropy=True,
                              prob_floor={n: 0.02 for n in layout.names[::2]} | {layout.names[1]: 0.2})
    _check_thread_determinism(b, layout, config)

"""The C++ ``cpu`` backend (esper_kernels._C, csrc/): what only it has.

The behaviours every fused backend shares (equal to the reference on random and fixed cases, input forms, data
errors, the backward's paths, determinism of repeated calls, the metric table) are in tests/test_conformance.py,
run there on this backend too. Here: the row path against the vectorised (SIMD) path, the AVX-512 wide and
floored small-head paths on adversarial rows, thread-count determinism, in-place reads of per-head leaves.

Every comparison goes through ``harness.check_backend`` (docs/semantics.md section 7 tolerances, random incoming
gradients
on loss, log_probs and entropy, absent steps' gradients exactly 0). The cpu backend runs the same per-row
code (csrc/ppo_core.h) as the CUDA kernels, so these tests also cover the CUDA backend's math; the GPU tier
(tests/test_gpu_cuda.py) covers its threading and reductions.
"""

from __future__ import annotations

import os

import pytest
import torch
from float64_arbiter import check_arbitrated
from harness import per_head, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ref_cases import (
    cases,
    layout_of,
    random_batch,
)

import esper_kernels as ek
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
@settings(
    max_examples=int(os.environ.get("NATIVE_EXAMPLES", "60")) // 2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
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
        buf[:, 1 : 1 + a] = part
        leaves.append(buf[:, 1 : 1 + a])
    seen = []
    from esper_kernels.backends import native

    orig = native.forward_params

    def spy(call, outputs):
        seen.append([t.data_ptr() for t in call.logits])
        return orig(call, outputs)

    native.forward_params = spy
    try:
        check(
            dict(b, logits=leaves),
            layout,
            ek.PPOLossConfig(entropy_coef=0.1),
            leaf_fn=lambda lg, make: [make(buf).requires_grad_(True)[:, 1 : 1 + a] for buf, a in zip(bufs, sizes)],
        )
        out = ek.ppo_loss(**dict(b, logits=leaves), layout=layout, backend="cpu", validate=False)
        assert torch.isfinite(out.loss)
    finally:
        native.forward_params = orig
    assert seen[-1] == [t.data_ptr() for t in leaves]


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


def test_backend_interface():
    """The cpu backend's saved shape and its choice by ``auto`` for CPU tensors (what it refuses:
    test_conformance.test_refuses_what_its_supports_data_excludes)."""
    from esper_kernels.backends import native

    assert native.CpuBackend().saved_shape(5, 8) == [5, 25]
    out = ek.ppo_loss(**make_batch((8,), LAYOUT, seed=2), layout=LAYOUT, backend="auto", validate=False)
    assert out.backend == "cpu"


def _wide_adversarial_batch(dtype, seed=31):
    """Wide heads (33, 48, 1,000 actions) beside a small one, with adversarial present rows: an empty mask, a
    single valid action (taken, or not), a full mask, actions out of range in an irrelevant head (an empty mask in
    an irrelevant head too), and NaN/+-inf
    at every masked position."""
    layout = ek.HeadLayout({"s": 5, "w33": 33, "w1000": 1000, "w48": 48})
    sizes = list(layout.sizes)
    b = random_batch(
        sizes, (70,), seed=seed, mask_density=0.5, values=True, logit_scale=3.0, dtype=torch.float32, garbage=False
    )
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
@pytest.mark.parametrize(
    "config",
    [
        ek.PPOLossConfig(entropy_coef=0.05),
        ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, mask_fill=-30.0),
    ],
    ids=["joint", "per_head_norm"],
)
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
    b = random_batch(
        sizes, (90,), seed=seed, mask_density=0.6, values=True, logit_scale=3.0, dtype=torch.float32, garbage=False
    )
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
@pytest.mark.parametrize(
    "config",
    [
        ek.PPOLossConfig(entropy_coef=0.05, prob_floor=[0.05] * 6),
        ek.PPOLossConfig(
            surrogate="per_head",
            normalize_entropy=True,
            entropy_coef=0.1,
            mask_fill=-30.0,
            prob_floor={"two": 0.3, "five": 0.1, "op": 0.02, "full": 0.01},
        ),
    ],
    ids=["joint_all_floored", "per_head_norm_some_floored"],
)
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
    config = ek.PPOLossConfig(
        surrogate="per_head",
        entropy_coef=0.1,
        normalize_entropy=True,
        prob_floor={n: 0.02 for n in layout.names[::2]} | {layout.names[1]: 0.2},
    )
    _check_thread_determinism(b, layout, config)

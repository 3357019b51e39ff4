"""Conformance: every fused backend equal to the reference, one test body per behaviour.

Each test runs once per row of ``backends_under_test.BACKENDS`` (the ``backend`` fixture): the C++ ``cpu``
backend, ``triton`` (CUDA tensors on a GPU, Triton's interpreter on CPU tensors without one), ``cuda`` (a GPU)
and ``cuda_host`` (the cuda backend's one-pass kernels emulated block by block on the host, installed as "cuda").
Every comparison goes through ``harness.check_backend`` / ``float64_arbiter.check_arbitrated`` (docs/semantics.md
section 7 tolerances, random incoming gradients on loss, log_probs and entropy, absent steps' gradients exactly
0). Batch sizes are the row's ``scale`` times the listed ones (the interpreter is slow). What only one backend has
(its tiling knobs, plans, thread counts, launch counts, device-only features) stays in that backend's own module.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from backends_under_test import params
from float64_arbiter import assert_grad_vs_float64, check_arbitrated
from harness import (
    ATOL,
    RTOL,
    assert_close,
    assert_grad_close,
    assert_same_non_finite,
    check_output_grads_only,
    grads_after,
    leaf_batch,
    per_head,
    run,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ref_cases import (
    PATH_CONFIGS,
    cases,
    check_metric_table,
    layout_of,
    per_head_forms_case,
    random_batch,
    stats_cases,
    strided_rows_case,
    wide_config,
)

import esper_kernels as ek
from esper_kernels.stats import G
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.conformance

ESPER = ek.HeadLayout(ek.ESPER_HEADS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(params=params())
def backend(request):
    b = request.param
    b.require()
    with b.setup():
        yield b


def check(backend, batch, layout, config=None, **kw):
    """check_arbitrated for ``backend`` on ``batch`` moved to its device."""
    return check_arbitrated(backend.name, backend.to(batch), layout, config or ek.PPOLossConfig(), **kw)


def _equal_runs(r1, r2):
    """Bitwise equal outputs, statistics, metric tables and gradients (NaN equal to NaN)."""
    (o1, g1), (o2, g2) = r1, r2
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats.nan_to_num(7.0), o2.metrics.stats.nan_to_num(7.0))
    t1, t2 = (torch.tensor(list(o.metrics.to_dict().values())) for o in (o1, o2))
    assert torch.equal(t1.nan_to_num(7.0), t2.nan_to_num(7.0))
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.equal(g1[k].nan_to_num(7.0), g2[k].nan_to_num(7.0)), k


# -- every config field, both surrogates, floors, values, messy data and garbage: hypothesis ---------------
def test_equals_reference_hypothesis(backend):
    """Random layouts, configs, dtypes and input forms (packed, per-head sequence, per-head mapping), in the
    default configuration of the backend or one of its variants."""
    contexts = backend.drawn_contexts()

    @settings(
        max_examples=backend.examples,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: an interpreted example costs seconds
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        case=cases(messy=None),
        dtype=st.sampled_from(backend.hypothesis_dtypes),
        form=st.sampled_from(["packed", "sequence", "mapping"]),
        variant=st.sampled_from(range(len(contexts))),
    )
    def example(case, dtype, form, variant):
        sizes, kw, config = case
        layout = layout_of(sizes)
        batch = random_batch(sizes, dtype=dtype, **kw)
        if form != "packed":
            batch["logits"] = per_head(batch["logits"], layout, as_mapping=form == "mapping")
            if batch["action_masks"] is not None:
                batch["action_masks"] = per_head(batch["action_masks"], layout, as_mapping=form == "mapping")
        with contexts[variant][1]():
            check(backend, batch, layout, config)

    example()


# -- fixed cases -------------------------------------------------------------------------------------------
ESPER_CONFIGS = {
    "joint": ek.PPOLossConfig(entropy_coef=0.01),
    "per_head_floor": ek.PPOLossConfig(
        surrogate="per_head",
        normalize_entropy=True,
        entropy_coef=0.05,
        clip_eps_high=0.28,
        prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.2},
        value_clip=0.2,
        entropy_coef_per_head={"op": 2.0, "tempo": 0.0},
    ),
    "normadv_asym": ek.PPOLossConfig(
        normalize_advantages=True,
        clip_eps=0.1,
        clip_eps_high=0.5,
        joint_log_ratio_clamp=None,
        log_ratio_clamp=0.5,
        value_coef=1.0,
        mask_fill=-30.0,
    ),
    "joint_floor": ek.PPOLossConfig(
        entropy_coef=0.1,
        normalize_entropy=True,
        prob_floor=[0.1] * 8,
        advantage_std="unbiased",
        normalize_advantages=True,
        advantage_eps_add=True,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", list(ESPER_CONFIGS.values()), ids=list(ESPER_CONFIGS))
def test_esper_batch(backend, dtype, config):
    """make_batch: esper's causal relevance, NaN garbage in absent steps, values (clipped for per_head); in every
    variant of the backend."""
    backend.skip_unless_supported(dtype=dtype)
    batch = make_batch(backend.shape(4, 75), ESPER, dtype=dtype, seed=3)
    if config.value_clip is not None:
        batch["old_values"] = batch["values"] + 0.3 * torch.randn(batch["values"].shape)
    for _, ctx in backend.contexts():
        with ctx():
            check(backend, batch, ESPER, config)


@pytest.mark.parametrize("vclip", [None, 0.5])
def test_value_loss_and_value_weights(backend, vclip):
    sizes = [4, 7]
    layout = layout_of(sizes)
    b = random_batch(sizes, (backend.rows(40),), seed=12, values=True, old_values=True, value_weights=True)
    check(backend, b, layout, ek.PPOLossConfig(value_clip=vclip, value_coef=0.7, entropy_coef=0.02))
    b.pop("value_weights")
    check(backend, b, layout, ek.PPOLossConfig(value_clip=vclip))


def test_per_head_advantages(backend):
    sizes = [3, 9, 2]
    layout = layout_of(sizes)
    b = random_batch(sizes, (backend.rows(30),), seed=13, per_head_adv=True)
    check(backend, b, layout, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1))
    check(backend, b, layout, ek.PPOLossConfig(surrogate="per_head", normalize_advantages=True))


@pytest.mark.parametrize(("width", "floor"), [(5000, None), (300, 0.02)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_head(backend, width, floor, dtype):
    """A wide head between small ones: 5,000 actions, and 300 with a floor (a floor on thousands of tiny
    probabilities is ill-conditioned in float32: the reference itself is ~1e-5 off its float64 gradient)."""
    backend.skip_unless_supported(dtype=dtype)
    layout = ek.HeadLayout({"a": 3, "wide": width, "b": 5})
    batch = random_batch(
        list(layout.sizes), (6,), seed=11, mask_density=0.5, values=True, old_values=True, logit_scale=3.0, dtype=dtype
    )
    config = wide_config(floor)
    check(backend, batch, layout, config)


def test_widest_head(backend):
    """One head of 131,072 actions (the largest supported), a few rows."""
    layout = ek.HeadLayout({"vocab": 131072})
    batch = random_batch([131072], (3,), seed=5, mask_density=0.9, weights="ones", relevance=False)
    check(backend, batch, layout, ek.PPOLossConfig(entropy_coef=0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_head_tensors_mapping_sequence_and_strides(backend, dtype):
    """Per-head logits/masks as separate tensors (a mapping), actions as a sequence of int32 and int64 tensors,
    old log-probs as stride-2 columns, relevance as a sequence, bool weights, uint8 masks; and ``loss.backward()``
    through them (the one-pass backends' fast path) equal to the reference's on the packed logits."""
    backend.skip_unless_supported(dtype=dtype)
    batch, layout, config = per_head_forms_case()
    batch["logits"] = {k: v.to(dtype) for k, v in batch["logits"].items()}
    check(backend, batch, layout, config)
    packed = backend.to(dict(batch, logits=torch.cat(list(batch["logits"].values()), -1)))
    _same_grads(backend, packed, layout, config, lambda out: out.loss.backward())


def test_non_contiguous_rows(backend):
    """Logits and masks as column slices of wider buffers (row stride > S), per-step tensors as strided views,
    a 2-D batch shape; in every variant of the backend."""
    batch, layout = strided_rows_case()
    for _, ctx in backend.contexts():
        with ctx():
            check(backend, batch, layout, ek.PPOLossConfig(entropy_coef=0.01))


def test_garbage_in_absent_steps_and_masked_positions(backend):
    """NaN/Inf logits at masked positions and in absent steps, NaN old log-probs where irrelevant: nothing leaks."""
    sizes = [4, 6, 3]
    layout = layout_of(sizes)
    b = random_batch(
        sizes, (backend.rows(50),), seed=17, garbage=True, weights="float", values=True, value_weights=True
    )
    out, _ = check(backend, b, layout, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.3, normalize_entropy=True))
    assert torch.isfinite(out.loss)


def test_out_of_range_actions(backend):
    """Actions out of range (negative, = A_h, huge int64) at present steps give NaN log-probs and are counted;
    they are never used as an index (validate=False); int32 actions too."""
    b = make_batch((12,), ESPER, seed=4)
    b["weights"][:6] = 1.0
    acts = b["actions"]
    acts[0, 0], acts[1, 2], acts[2, 7], acts[3, 3] = -1, ESPER.sizes[2], 2**62, -(2**40)
    b["head_relevance"][0, 0] = False  # an irrelevant head with a bad action: NaN log-prob, finite loss terms
    out, _ = check(backend, b, ESPER, ek.PPOLossConfig(entropy_coef=0.01))
    m = out.metrics.to_dict()
    assert m["head_slot_invalid_action"] >= 1 and m["head_op_invalid_action"] >= 1
    assert m["head_style_nonfinite"] == 1
    assert torch.isnan(out.log_probs[1, 2])
    b32 = dict(b, actions=b["actions"].clamp(-(2**31), 2**31 - 1).to(torch.int32))
    check(backend, b32, ESPER, ek.PPOLossConfig(surrogate="per_head"))
    # more rows, an action one past a head of 13 too
    b = make_batch((backend.rows(64, keep=8),), ESPER, seed=9)
    b["weights"][:8] = 1.0
    acts = b["actions"]
    acts[0, 0], acts[1, 2], acts[2, 7], acts[3, 3], acts[4, 1] = -1, ESPER.sizes[2], 2**62, -(2**40), 13
    out, _ = check(backend, b, ESPER, ek.PPOLossConfig(entropy_coef=0.01))
    m = out.metrics.to_dict()
    assert m["head_slot_invalid_action"] >= 1 and m["head_blueprint_invalid_action"] >= 1
    assert torch.isnan(out.log_probs[1, 2])


def test_empty_batch_and_all_absent(backend):
    """N = 0 (empty statistics, a zero loss), and batches whose every step is absent (NaN logits everywhere)."""
    b = make_batch((0,), ESPER, seed=1)
    out, _ = check(backend, b, ESPER, check_grads=False)
    m = out.metrics.to_dict()
    assert m["steps"] == 0 and math.isnan(m["ratio_mean"]) and out.loss.item() == 0.0
    for n, seed in ((5, 2), (9, 5)):
        b = make_batch((n,), ESPER, seed=seed)
        b["weights"].zero_()
        check(backend, b, ESPER, ek.PPOLossConfig(entropy_coef=0.1))
        b["logits"].fill_(float("nan"))
        for _, ctx in backend.contexts():
            with ctx():
                check(backend, b, ESPER, ek.PPOLossConfig(entropy_coef=0.1))


@pytest.mark.parametrize("n", [1, 3, 5, 7, 127, 129, 1000])
def test_odd_batch_sizes(backend, n):
    """N = 1, odd N smaller than a block or a tile, tiles with a partial last one (scaled down where slow, never
    below 8 rows); in every variant of the backend."""
    b = make_batch((backend.rows(n, keep=8),), ESPER, seed=n)
    b["old_values"] = b["values"] - 0.25
    for _, ctx in backend.contexts():
        with ctx():
            check(backend, b, ESPER, ek.PPOLossConfig(entropy_coef=0.1, value_clip=0.3))


def test_constant_returns_explained_variance_is_nan(backend):
    """Constant returns with fractional weights: the moments stay exact (var 0, explained variance NaN)."""
    sizes = [3]
    layout = layout_of(sizes)
    b = random_batch(sizes, (backend.rows(300),), seed=3, values=True, weights="float")
    b["returns"] = torch.full_like(b["returns"], 0.3)
    out, _ = check(backend, b, layout)
    assert out.metrics.stats[G.RETURN_M2] == 0


def test_grad_of_log_probs_only(backend):
    """Only log_probs and entropy reach the loss (the losses' incoming gradient is None)."""
    check_output_grads_only(backend.name, backend.to(make_batch((6,), ESPER, seed=6)), ESPER)


def test_deterministic_repeated_calls(backend):
    """Repeated calls give bitwise the same outputs, statistics, metric table and gradients, with another call (other
    sizes) in between to leave garbage in freed memory the next call's scratch may reuse; in every variant (several
    programs, blocks and merge groups finishing in any order)."""
    cfg = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.01, normalize_advantages=True)
    b = backend.to(make_batch((backend.rows(777),), ESPER, seed=12))
    other = backend.to(make_batch((backend.rows(1500),), ESPER, seed=1))
    layout = ek.HeadLayout({"a": 3, "w": 40})
    floors = backend.to(make_batch((10,), layout, seed=7))
    floor_cfg = ek.PPOLossConfig(surrogate="per_head", prob_floor=[None, 0.01], entropy_coef=0.1)
    for _, ctx in backend.contexts():
        with ctx():
            r1 = run(backend.name, b, ESPER, cfg, grad_seed=3)
            ek.ppo_loss(**other, layout=ESPER, backend=backend.name, validate=False)
            _equal_runs(r1, run(backend.name, b, ESPER, cfg, grad_seed=3))
            _equal_runs(*(run(backend.name, floors, layout, floor_cfg, grad_seed=1) for _ in range(2)))


# -- the backward: fast path, rescale, recompute, two backwards, accumulation, no autograd -----------------------


def _esper_batch(backend, dtype=torch.float32, seed=3):
    """An esper batch of (3, 100) steps (scaled), values and old values: on the backend's device."""
    b = make_batch(backend.shape(3, 100), ESPER, dtype=dtype, seed=seed)
    b["old_values"] = b["values"] + 0.3 * torch.randn(b["values"].shape, generator=torch.Generator().manual_seed(1))
    return backend.to(b)


def _same_grads(backend, batch, layout, config, backward, arbitrate=False):
    """The backend's gradients after ``backward`` equal the reference's (float32 on upcast inputs). With
    ``arbitrate``, a logits-gradient mismatch is re-judged against the float64 reference (float64_arbiter's rule)."""
    _, g, gv = grads_after(backend.name, batch, layout, config, backward)
    _, rg, rgv = grads_after("reference", dict(batch, logits=batch["logits"].float()), layout, config, backward)
    try:
        assert_grad_close("grad logits", g, rg, batch["logits"].dtype)
    except AssertionError:
        if not arbitrate:
            raise
        _, tg, _ = grads_after("reference", dict(batch, logits=batch["logits"].double()), layout, config, backward)
        assert_grad_vs_float64("grad logits", g, rg, tg)
    if gv is not None:
        if torch.isfinite(rgv).all():
            torch.testing.assert_close(gv, rgv, rtol=RTOL, atol=ATOL, equal_nan=True)
        else:  # a non-finite upstream: the non-finite pattern of docs/semantics.md section 3, as for the logits
            bad = assert_same_non_finite("grad values", gv, rgv)
            assert_close("grad values", gv.cpu()[~bad.cpu()], rgv.cpu()[~bad.cpu()])
    return g, rg


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", list(PATH_CONFIGS.values()), ids=list(PATH_CONFIGS))
def test_backward_fast_path(backend, config, dtype):
    """``loss.backward()``: the one-pass backends return the forward's gradient as it is; equal to the reference."""
    backend.skip_unless_supported(dtype=dtype)
    _same_grads(backend, _esper_batch(backend, dtype), ESPER, config, lambda out: out.loss.backward())


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 2.5), (torch.float32, -0.3), (torch.float32, 0.0), (torch.bfloat16, 1024.0)],
    ids=["2.5", "-0.3", "0", "bf16_1024"],
)
@pytest.mark.parametrize("config", list(PATH_CONFIGS.values()), ids=list(PATH_CONFIGS))
def test_backward_rescale_path(backend, config, dtype, scale):
    """An upstream scalar other than 1 on ``loss`` only: the one-pass backends rescale the forward's gradient."""
    backend.skip_unless_supported(dtype=dtype)
    # (an upstream of 1024 on bf16 logits: under a floor the fused closed form's exact zeros and the float32
    # reference's chain noise, ~1e-9 per unit upstream, differ by more than the absolute tolerance: the float64
    # reference arbitrates there, as check_arbitrated does everywhere else)
    _same_grads(
        backend,
        _esper_batch(backend, dtype),
        ESPER,
        config,
        lambda out: out.loss.backward(backend.tensor(scale)),
        arbitrate=scale == 1024.0,
    )


@pytest.mark.parametrize(
    ("term", "dtype"),
    [
        ("log_probs", torch.float32),
        ("entropy", torch.float32),
        ("policy_loss", torch.float32),
        ("entropy_loss", torch.float32),
        ("value_loss", torch.float32),
        ("entropy", torch.bfloat16),
    ],
    ids=["log_probs", "entropy", "policy_loss", "entropy_loss", "value_loss", "entropy_bf16"],
)
def test_backward_recompute_path(backend, term, dtype):
    """A gradient on a per-step output or another loss term: the one-pass backends recompute."""
    backend.skip_unless_supported(dtype=dtype)
    b = _esper_batch(backend, dtype)

    def backward(out):
        t = getattr(out, term)
        w = torch.linspace(-1, 1, t.numel(), device=t.device).reshape(t.shape)
        (out.loss + 0.3 * (t * w).nan_to_num().sum()).backward()

    _same_grads(backend, b, ESPER, PATH_CONFIGS["joint"], backward)


@pytest.mark.parametrize("config", list(PATH_CONFIGS.values()), ids=list(PATH_CONFIGS))
def test_backward_infinite_upstream(backend, config):
    """An infinite upstream on ``loss`` (the one-pass backends recompute): NaN at every valid action of a row the
    loss reaches, exactly 0 at masked actions, absent steps, irrelevant (step, head) rows and rows whose clipped
    or clamped ratio passes no gradient, as the reference's autograd (docs/semantics.md section 3). Some
    advantages are exactly 0 and some values equal their returns: a term that passes a gradient with a zero
    coefficient gets 0 x inf = NaN, never the 0 of a term that passes none."""
    b = _esper_batch(backend)
    adv, v = b["advantages"].clone(), b["values"].clone()
    adv.view(-1)[::7] = 0.0
    v.view(-1)[::5] = b["returns"].view(-1)[::5]
    b = dict(b, advantages=adv, values=v)
    _same_grads(backend, b, ESPER, config, lambda out: out.loss.backward(backend.tensor(math.inf)))


def test_backward_recompute_path_for_per_step_outputs_with_loss(backend):
    """Gradients on loss, log_probs and entropy together (random incoming gradients)."""
    b = _esper_batch(backend)
    n = b["weights"].numel()
    g = torch.Generator().manual_seed(4)
    glp, gent = (backend.to(torch.randn(n, ESPER.num_heads, generator=g)) for _ in range(2))
    _same_grads(
        backend,
        b,
        ESPER,
        PATH_CONFIGS["per_head_floor_norm"],
        lambda out: torch.autograd.backward(
            [out.loss, out.log_probs.reshape(n, -1), out.entropy.reshape(n, -1)], [backend.tensor(1.0), glp, gent]
        ),
    )


def test_two_backward_calls_with_retain_graph(backend):
    """Backward calls through one forward with different upstream scales: the first fixes up the forward's
    gradient (and hands it over), the next recompute into fresh buffers; all equal the reference's."""
    b = _esper_batch(backend)
    for config in PATH_CONFIGS.values():
        outs = {}
        for name in (backend.name, "reference"):
            lb = leaf_batch(b)
            out = ek.ppo_loss(**lb, layout=ESPER, config=config, backend=name, validate=False)
            (g1,) = torch.autograd.grad(out.loss, lb["logits"], backend.tensor(1.0), retain_graph=True)
            (g2,) = torch.autograd.grad(out.loss, lb["logits"], backend.tensor(-3.0), retain_graph=True)
            (g3,) = torch.autograd.grad(2.0 * out.loss, lb["logits"], retain_graph=True)
            (g4,) = torch.autograd.grad(out.loss * 2.0 + out.entropy_loss, lb["logits"])
            outs[name] = (g1, g2, g3, g4)
        for got, want in zip(outs[backend.name], outs["reference"]):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)
        assert not torch.equal(outs[backend.name][0], outs[backend.name][1])


def test_gradient_accumulates_into_an_existing_grad(backend):
    """logits.grad and values.grad already hold a gradient: backward adds to it, over two steps and over two
    backward calls through one graph."""
    b = _esper_batch(backend)
    config = PATH_CONFIGS["joint"]
    results = {}
    for name in (backend.name, "reference"):
        lb = leaf_batch(b)
        lb["logits"].grad = torch.full_like(lb["logits"], 0.25)
        lb["values"].grad = torch.full_like(lb["values"], -0.5)
        for scale in (1.0, 2.0):
            out = ek.ppo_loss(**lb, layout=ESPER, config=config, backend=name, validate=False)
            out.loss.backward(backend.tensor(scale))
        lb2 = leaf_batch(b)
        lb2["logits"].grad = torch.ones_like(lb2["logits"])
        out = ek.ppo_loss(**lb2, layout=ESPER, config=config, backend=name, validate=False)
        out.loss.backward(retain_graph=True)
        (3.0 * out.loss).backward()
        results[name] = (lb["logits"].grad, lb["values"].grad, lb2["logits"].grad, lb2["values"].grad)
    for got, want in zip(results[backend.name], results["reference"]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_tensors", "detached"])
def test_runs_without_autograd(backend, mode):
    """Evaluation calls (approx_kl for early stopping, logging) under no_grad / inference_mode, inference tensors
    passed later, and inputs that do not require grad, give the training call's numbers (and the reference's)."""
    b = backend.to(make_batch(backend.shape(4, 50), ESPER, seed=2))
    want = ek.ppo_loss(**b, layout=ESPER, backend=backend.name, validate=False)
    ref = ek.ppo_loss(**b, layout=ESPER, backend="reference", validate=False)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode)
    if mode == "inference_tensors":
        with torch.inference_mode():
            b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    with ctx if ctx is not None else contextlib.nullcontext():
        logits = b["logits"].clone().requires_grad_(True) if mode == "no_grad" else b["logits"]
        got = ek.ppo_loss(**dict(b, logits=logits), layout=ESPER, backend=backend.name, validate=False)
        assert not got.loss.requires_grad
        assert torch.equal(got.loss, want.loss.detach())
        assert got.metrics.to_dict().keys() == want.metrics.to_dict().keys()
        assert torch.equal(got.metrics.stats, want.metrics.stats)
        assert_close("loss", got.loss, ref.loss)
        present = (b["weights"] > 0).cpu()
        assert_close("log_probs", got.log_probs.cpu()[present], ref.log_probs.cpu()[present])


def test_values_only_require_grad(backend):
    """Only the values require grad: no logits gradient, the values' gradient equal to the reference's."""
    b = make_batch((backend.rows(64, keep=8),), ESPER, seed=8)
    b["old_values"] = b["values"] + 0.3
    b = backend.to(b)
    grads = {}
    for name in (backend.name, "reference"):
        v = b["values"].clone().requires_grad_(True)
        logits = b["logits"].clone()
        out = ek.ppo_loss(
            **dict(b, values=v, logits=logits), layout=ESPER, config=PATH_CONFIGS["joint"], backend=name, validate=False
        )
        out.loss.backward()
        assert logits.grad is None
        grads[name] = v.grad
    assert_close("grad values", grads[backend.name], grads["reference"])


# -- metrics ---------------------------------------------------------------------------------------------------
def test_metric_table_equals_the_torch_derivation(backend):
    """The backend's metric-table kernel (merged statistics; the forward writes its own): the table of
    ``esper_kernels.metrics`` on adversarial statistics."""
    impl = backend.backend_object()
    if not getattr(impl, "has_metric_table", False):
        pytest.skip(f"{backend.id} has no metric-table kernel (has_metric_table is False)")

    @settings(
        max_examples=backend.table_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=stats_cases(max_heads=backend.table_heads))
    def example(case):
        check_metric_table(lambda s, cfg, hv: impl.metric_table(backend.to(s), cfg, hv), case)

    example()


def test_merged_metrics_equal_the_reference(backend):
    """PPOMetrics.merge of two calls' statistics (the metric table then comes from the table kernel)."""
    b1, b2 = (backend.to(make_batch((backend.rows(n, keep=8),), ESPER, seed=s)) for n, s in ((40, 1), (30, 2)))
    m = ek.PPOMetrics.merge(
        [ek.ppo_loss(**b, layout=ESPER, backend=backend.name, validate=False).metrics for b in (b1, b2)]
    )
    r = ek.PPOMetrics.merge(
        [ek.ppo_loss(**b, layout=ESPER, backend="reference", validate=False).metrics for b in (b1, b2)]
    )
    got, want = m.to_dict(), r.to_dict()
    for k, w in want.items():
        g = got[k]
        assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= ATOL + RTOL * abs(w) or g == w, (k, g, w)


# -- what the backend refuses --------------------------------------------------------------------------------------
def test_refuses_what_its_supports_data_excludes(backend):
    """float64 logits and more heads than ``Supports.max_heads``: BackendUnavailableError naming the reason."""
    s = backend.backend_object().supports
    assert torch.float64 not in s.dtypes
    b = backend.to(make_batch((3,), ESPER, dtype=torch.float64, seed=0))
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        ek.ppo_loss(**b, layout=ESPER, backend=backend.name)
    assert s.max_heads is not None
    h = s.max_heads + 1
    many = ek.HeadLayout({f"h{i}": 2 for i in range(h)})
    bm = backend.to(random_batch([2] * h, (4,), seed=1))
    with pytest.raises(ek.BackendUnavailableError, match=f"at most {s.max_heads} heads"):
        ek.ppo_loss(**bm, layout=many, backend=backend.name)

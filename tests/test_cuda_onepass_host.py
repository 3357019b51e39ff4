"""The cuda backend's one-pass kernels, run on the CPU: ``CudaHostEmulation`` (csrc/ppo_onepass_host.h).

The CUDA kernels (csrc/ppo_cuda.cu) are thin wrappers around block bodies written once in csrc/ppo_onepass.h:
the pre-pass, the small-head tile path (one thread per row, registers per head width), the wide path (a cluster
of blocks per row, chunks in shared memory or re-read), the statistics' tile folds and the last block's merge,
and the fix-up. The host emulation runs those bodies block by block with every fold in the device's order, so
these tests check the kernels' math, tiling, merges and the backend's one-pass protocol (forward writes the
gradient, the fix-up returns at once, rescales or recomputes) against the reference, without a GPU. Threads,
barriers, shuffles, the atomic ticket and distributed shared memory are GPU-only (tests/test_gpu_cuda.py).

Each test puts the emulation in place of the "cuda" backend for CPU tensors (the ``emu`` fixture), so the whole
public path (``ek.ppo_loss(backend="cuda")``, autograd, metrics) runs as on a GPU. The behaviours every fused
backend shares run on the emulation in tests/test_conformance.py (its ``cuda_host`` row, with two main blocks as a
variant); here: the plan, the wide/stream paths and max_blocks variants, test_numerics' reproductions, and the
one-pass protocol's state (the forward's buffers, the scale state, holds, launches, the custom ops).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import test_numerics as tn
import torch
from backends_under_test import _Emulated
from float64_arbiter import check_arbitrated
from harness import assert_close, check_backend, per_head
from ref_cases import layout_of, random_batch

import esper_kernels as ek
from esper_kernels import _C
from esper_kernels.backends import fused, native
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.native

ESPER = ek.HeadLayout(ek.ESPER_HEADS)
NM_SCALE = 3  # csrc/ppo_onepass.h: the fix-up's scale state in the normalisers


@pytest.fixture(params=[0, 2], ids=["grid", "two_blocks"])
def emu(request):
    """The emulation with the device's grid (one tile per block for these sizes), and with at most two main
    blocks (many tiles or rows per block: the block accumulators across tiles)."""
    with _Emulated(native.CudaHostEmulation(max_blocks=request.param)) as e:
        yield e


@pytest.fixture
def emu1():
    with _Emulated(native.CudaHostEmulation()) as e:
        yield e


def check(batch, layout, config=None, **kw):
    return check_arbitrated("cuda", batch, layout, config or ek.PPOLossConfig(), **kw)


# -- the plan: which path and shapes the kernels take ----------------------------------------------------------
def _params(layout, n=5, dtype=torch.float32, packed=True, mask=True):
    b = make_batch((n,), layout, dtype=dtype, seed=0)
    if not packed:
        b["logits"] = [t.clone() for t in per_head(b["logits"], layout)]
    call = fused.FusedCall(
        [b["logits"]] if packed else b["logits"],
        [b["action_masks"]] if mask else [],
        [b["actions"][:, h] for h in range(layout.num_heads)],
        [b["old_log_probs"][:, h] for h in range(layout.num_heads)],
        b["advantages"],
        [],
        b["weights"],
        None,
        None,
        None,
        None,
        layout.sizes,
        ek.PPOLossConfig().resolve(layout),
    )
    return native._input_params(call), b


def test_plan_paths_and_shapes():
    p, _ = _params(ESPER, n=1800)
    plan = _C.onepass_plan(p, fixup=False, write_grad=True)
    assert plan["path"] == "small" and plan["rows"] in (64, 128) and plan["segments"][0] == 1
    assert plan["grid_main"] == plan["nparts"] == -(-1800 // plan["rows"])  # one tile per block
    assert plan["smem"] <= 64 * 1024
    few = _C.onepass_plan(p, fixup=False, write_grad=True, max_blocks=2)
    assert few["grid_main"] == 2
    p, _ = _params(ESPER, n=9, packed=False)
    assert _C.onepass_plan(p, fixup=False, write_grad=False)["segments"][0] == ESPER.num_heads
    wide = ek.HeadLayout({"left": 1024, "right": 1024})
    p, _ = _params(wide)
    plan = _C.onepass_plan(p, fixup=False, write_grad=True)
    assert plan["path"] == "wide" and plan["cluster"] == 1 and plan["chunk"] == 2048
    p, _ = _params(ek.HeadLayout({"token": 32768}), n=2)
    plan = _C.onepass_plan(p, fixup=False, write_grad=True)
    assert plan["path"] == "wide" and plan["cluster"] == 8 and plan["chunk"] == 4096
    p, _ = _params(ek.HeadLayout({"token": 40000}), n=2)
    plan = _C.onepass_plan(p, fixup=False, write_grad=True)
    assert plan["path"] == "stream" and plan["cluster"] == 8
    plan = _C.onepass_plan(p, fixup=False, write_grad=True, cc_major=8)  # no clusters before sm_90
    assert plan["path"] == "stream" and plan["cluster"] == 1


# -- equal to the reference --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes,n",
    [([1024, 1024], 7), ([3, 1000, 33, 5], 9), ([9000], 3), ([40000], 2), ([33], 40), ([2, 64, 3], 17)],
    ids=["wide", "mixed", "vocab_split", "stream", "just_over_32", "two_small_one_wide"],
)
@pytest.mark.parametrize("floor", [None, 0.02])
def test_wide_rows(emu, sizes, n, floor):
    """Rows with a head over 32 actions: a cluster of blocks per row (chunks of 4,096 columns, several ranks for
    9,000 and 40,000), staged in shared memory or re-read (40,000); floors, value clipping, messy data."""
    layout = layout_of(sizes)
    b = random_batch(
        sizes,
        (n,),
        seed=11,
        mask_density=0.5,
        values=True,
        old_values=True,
        value_weights=True,
        logit_scale=3.0,
        messy=True,
    )
    fl = None if floor is None else [floor] * len(sizes)
    check(
        b,
        layout,
        ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, value_clip=0.5, prob_floor=fl),
    )
    check(b, layout, ek.PPOLossConfig(entropy_coef=0.1, normalize_advantages=True, prob_floor=fl, mask_fill=-1e4))


def test_stream_without_clusters():
    """A machine without clusters (sm_80): the row is one block's, re-read through L2 when it does not fit."""
    with _Emulated(native.CudaHostEmulation()) as e:
        e.emu.machine["cc_major"] = 8
        layout = layout_of([9000, 4])
        b = random_batch([9000, 4], (3,), seed=2, values=True, messy=True)
        check(b, layout, ek.PPOLossConfig(entropy_coef=0.1, prob_floor=[0.01, 0.2]))


def test_many_blocks_merge(emu):
    """40 tiles: 40 partials merged by the last block (or two blocks of 20 tiles each)."""
    b = make_batch((5000,), ESPER, seed=9)
    check(b, ESPER, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.02, normalize_advantages=True))


# -- docs/semantics.md's numerics: tests/test_numerics.py's reproductions on the emulated cuda backend ----------
@pytest.mark.parametrize("per_head_", [False, True])
def test_numerics_no_gradient_into_data(emu1, per_head_):
    tn.test_no_gradient_reaches_data_inputs("cuda", per_head_)


@pytest.mark.parametrize("offset", [50.0, 1e4])
def test_numerics_large_offset(emu1, offset):
    tn.test_log_probs_accurate_at_a_large_logit_offset("cuda", offset)


def test_numerics_exclusion_and_fill(emu1):
    tn.test_entropy_of_huge_equal_logits("cuda")
    tn.test_invalid_actions_get_probability_zero_far_below_the_fill("cuda")
    tn.test_exclusion_equals_the_fill_for_normal_logits("cuda")


@pytest.mark.parametrize("mask_fill", [None, -1e4])
def test_numerics_empty_mask(emu1, mask_fill):
    tn.test_empty_mask_is_treated_as_an_out_of_range_action("cuda", mask_fill)


def test_numerics_non_finite_upstream(emu1):
    tn.test_a_nan_upstream_gives_nan_at_every_valid_action_of_the_row("cuda")
    # (floor=None only: with a floor the fused closed form gives exactly 0 under the floor where the float32
    # reference's chain leaves ~1e-14, and that test compares the exact-zero patterns; see the next test)
    tn.test_non_finite_upstream_pattern_matches_the_reference("cuda", None)


def test_non_finite_upstream_pattern_with_a_floor(emu1):
    """test_numerics' floored case without the exact-zero comparison of finite rows: non-finite where the
    reference is, exactly 0 at masked actions and absent steps, finite values close to the reference's."""
    batch, layout = tn._esperish(40, seed=8)
    batch["actions"][::5, 0] = 99
    cfg = ek.PPOLossConfig(prob_floor=[0.2] * layout.num_heads, joint_log_ratio_clamp=None, entropy_coef=0.1)
    grads = {}
    for b in ("reference", "cuda"):
        z = batch["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=cfg, backend=b, validate=False)
        g = torch.Generator().manual_seed(0)
        glp = torch.randn(out.log_probs.shape, generator=g)
        glp[1, 1] = float("nan")
        (grads[b],) = torch.autograd.grad([out.loss, out.log_probs], [z], [torch.ones(()), glp])
    want, got = grads["reference"], grads["cuda"]
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    masked = ~batch["action_masks"] | (batch["weights"] == 0).unsqueeze(-1)
    assert (got[masked] == 0).all() and (want[masked] == 0).all()
    fin = torch.isfinite(want)
    assert_close("finite gradients", got[fin], want[fin])


@pytest.mark.parametrize("where", [0, 5, 11])
def test_numerics_overflowed_joint_ratio(emu1, where):
    tn.test_overflowed_joint_ratio_reads_inf("cuda", where)


def test_numerics_double_backward_refused(emu1):
    tn.test_double_backward_says_the_fused_backends_do_not_support_it("cuda")


# -- the one-pass protocol: the forward writes the gradient, the fix-up's three paths ---------------------------
def _leaf_batch(n=300, seed=4, values=True):
    b = make_batch((n,), ESPER, seed=seed, values=values)
    z = b["logits"].clone().requires_grad_(True)
    b["logits"] = z
    if values:
        b["old_values"] = b["values"] + 0.3 * torch.sin(torch.arange(n, dtype=torch.float32))
        b["values"] = b["values"].clone().requires_grad_(True)
    return b


def _ref_grads(b, config, scale=1.0):
    z = b["logits"].detach().clone().requires_grad_(True)
    v = b["values"].detach().clone().requires_grad_(True) if b.get("values") is not None else None
    out = ek.ppo_loss(**dict(b, logits=z, values=v), layout=ESPER, config=config, backend="reference", validate=False)
    (scale * out.loss).backward()
    return z.grad, (v.grad if v is not None else None)


CFG = ek.PPOLossConfig(entropy_coef=0.05, value_clip=0.2)


def test_fast_path_returns_the_forward_gradient(emu1):
    """loss.backward(): the fix-up changes nothing; autograd keeps the forward's buffer as .grad (no copy)."""
    b = _leaf_batch()
    out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
    state = emu1.states[-1]
    assert state.grads is not None and state.gv is not None
    ptr = state.grads[0]
    out.loss.backward()
    want, want_v = _ref_grads(b, CFG)
    assert_close("grad", b["logits"].grad, want)
    assert_close("grad values", b["values"].grad, want_v)
    assert b["logits"].grad.data_ptr() == ptr  # the forward's gradient, handed over (not copied)
    assert state.norms[NM_SCALE].item() == 1.0  # no rescale, no recompute


def test_rescale_path(emu1):
    b = _leaf_batch()
    out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
    state = emu1.states[-1]
    (2.5 * out.loss).backward()
    want, want_v = _ref_grads(b, CFG, 2.5)
    assert_close("grad", b["logits"].grad, want)
    assert_close("grad values", b["values"].grad, want_v)
    assert state.norms[NM_SCALE].item() == 2.5  # the buffers now hold the gradient for an upstream of 2.5


@pytest.mark.parametrize("what", ["log_probs", "entropy", "policy_loss", "entropy_loss", "value_loss"])
def test_recompute_path(emu1, what):
    b = _leaf_batch()
    outs = {}
    for name in ("cuda", "reference"):
        z = b["logits"].detach().clone().requires_grad_(True)
        v = b["values"].detach().clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(b, logits=z, values=v), layout=ESPER, config=CFG, backend=name, validate=False)
        t = getattr(out, what)
        obj = out.loss + (t * torch.linspace(-1, 1, t.numel()).reshape(t.shape)).sum() * 0.3
        obj.backward()
        outs[name] = (z.grad, v.grad)
    assert_close("grad", outs["cuda"][0], outs["reference"][0])
    assert_close("grad values", outs["cuda"][1], outs["reference"][1])
    assert math.isnan(emu1.states[0].norms[NM_SCALE].item())  # not a pure scale any more


def test_two_backwards_with_different_scales(emu1):
    """retain_graph=True: the first backward hands its buffer over, the second recomputes into a fresh one."""
    b = _leaf_batch()
    out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
    (g1,) = torch.autograd.grad(2.0 * out.loss, b["logits"], retain_graph=True)
    (g2,) = torch.autograd.grad(-5.0 * out.loss, b["logits"], retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss, b["logits"])
    want, _ = _ref_grads(b, CFG)
    assert_close("first", g1, 2.0 * want)
    assert_close("second", g2, -5.0 * want)
    assert_close("third", g3, want)
    assert emu1.holds == [True, False, False]  # the forward's buffers fixed up once, then recomputed


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detached"])
def test_no_gradient_wanted_writes_none(emu1, mode):
    """Without grad the forward allocates and writes no gradient; outputs and metrics are the reference's."""
    b = make_batch((200,), ESPER, seed=6)
    if mode == "detached":
        out = ek.ppo_loss(**b, layout=ESPER, backend="cuda", validate=False)
    else:
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx:
            z = b["logits"].clone().requires_grad_(mode == "no_grad")
            out = ek.ppo_loss(**dict(b, logits=z), layout=ESPER, backend="cuda", validate=False)
    state = emu1.states[-1]
    assert state.grads is None and state.gv is None
    ref = ek.ppo_loss(**b, layout=ESPER, backend="reference", validate=False)
    assert_close("loss", out.loss, ref.loss)
    present = b["weights"] > 0
    assert_close("log_probs", out.log_probs[present], ref.log_probs[present])


def test_values_only(emu1):
    """Only the values require grad: no logits gradient is written, the values' is right."""
    b = make_batch((64,), ESPER, seed=8)
    b["old_values"] = b["values"] + 0.3
    v = b["values"].clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(b, values=v), layout=ESPER, config=CFG, backend="cuda", validate=False)
    assert emu1.states[-1].grads is None
    out.loss.backward()
    v2 = b["values"].clone().requires_grad_(True)
    ref = ek.ppo_loss(**dict(b, values=v2), layout=ESPER, config=CFG, backend="reference", validate=False)
    ref.loss.backward()
    assert_close("grad values", v.grad, v2.grad)


def test_launches_per_step(emu1):
    """One forward entry (pre-pass + main kernel) and one fix-up launch: three kernels a step."""
    b = _leaf_batch()
    calls = []
    with (
        mock.patch.object(emu1.emu, "_launch_forward", wraps=emu1.emu._launch_forward) as f,
        mock.patch.object(emu1.emu, "_launch_backward", wraps=emu1.emu._launch_backward) as g,
        mock.patch.object(emu1.emu, "_table_kernel", wraps=emu1.emu._table_kernel) as t,
    ):
        out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
        out.loss.backward()
        out.metrics.tensors()
        calls = (f.call_count, g.call_count, t.call_count)
    assert calls == (1, 1, 0)  # the metric table came from the forward's last block


def test_custom_op_protocol(emu1):
    """The shared custom ops (fused.py, the torch.compile path): kernel_forward gets no gradient buffers (writes
    none), kernel_backward recomputes into fresh buffers (holds=False: the fix-up with force_recompute)."""
    b = make_batch((150,), ESPER, seed=13)
    cfg = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.02, normalize_advantages=True, value_clip=0.3)
    b["old_values"] = b["values"] + 0.2
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        check_backend("cuda", b, ESPER, cfg)
    assert emu1.states and all(s.grads is None and s.gv is None for s in emu1.states)
    assert emu1.holds and not any(emu1.holds)

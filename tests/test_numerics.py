"""Numerics and reliability (docs/semantics.md sections 2-3), on every backend that runs here.

Each test reproduces a bug found by using the loss from outside the test suite: gradients leaking into data
inputs, log-probs that lose accuracy at a large common logit offset, invalid actions that keep probability
when the valid logits are far below the fill, NaN patterns of the gradient that differ between backends, and
an overflowed joint ratio reading as NaN ("no data") instead of inf.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import ATOL, RTOL, assert_close

import esper_kernels as ek

BACKENDS = [b for b in ("reference", "cpu", "triton") if ek.available_backends()[b].available]
FUSED = [b for b in BACKENDS if b != "reference"]


def _esperish(
    n: int, seed: int, offset: float = 0.0, scale: float = 2.0, sizes=(3, 13, 5)
) -> tuple[dict, ek.HeadLayout]:
    """A batch whose logits are exactly representable in float32 with ``offset`` added to every logit."""
    g = torch.Generator().manual_seed(seed)
    layout = ek.HeadLayout({f"h{i}": a for i, a in enumerate(sizes)})
    S, H = layout.total, layout.num_heads
    z = torch.round(torch.randn(n, S, generator=g) * scale * 256) / 256 + offset  # exact in float32
    masks = torch.rand(n, S, generator=g) < 0.7
    actions = torch.stack([torch.randint(0, a, (n,), generator=g) for a in sizes], -1)
    for h, (off, a) in enumerate(zip(layout.offsets, sizes)):
        masks[:, off : off + a].scatter_(-1, actions[:, h : h + 1], True)
    old = -torch.rand(n, H, generator=g) * 2.0
    batch = dict(
        logits=z,
        action_masks=masks,
        actions=actions,
        old_log_probs=old,
        advantages=torch.randn(n, generator=g),
        weights=(torch.rand(n, generator=g) > 0.1).float(),
    )
    return batch, layout


def _f64_truth(batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig):
    """The reference in float64 on the same inputs: log-probs, entropies and the logits gradient."""
    z = batch["logits"].double().clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=config, backend="reference", validate=False)
    out.loss.backward()
    return out, z.grad


# -- issue: no gradient into inputs that must get none ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_no_gradient_reaches_data_inputs(backend, per_head):
    """advantages, weights, old_log_probs, returns, old_values, value_weights never get a gradient, even when
    they require one (advantages R - V that were not detached must not train the critic)."""
    batch, layout = _esperish(12, seed=1)
    n, H = 12, layout.num_heads
    data = dict(
        advantages=torch.randn(n, H) if per_head else torch.randn(n),
        weights=torch.rand(n) + 0.1,
        old_log_probs=batch["old_log_probs"].clone(),
        returns=torch.randn(n),
        old_values=torch.randn(n),
        value_weights=torch.rand(n) + 0.1,
    )
    for t in data.values():
        t.requires_grad_(True)
    logits = batch["logits"].clone().requires_grad_(True)
    values = torch.randn(n, requires_grad=True)
    cfg = ek.PPOLossConfig(surrogate="per_head" if per_head else "joint", value_clip=0.2, normalize_advantages=True)
    out = ek.ppo_loss(
        logits,
        batch["action_masks"],
        batch["actions"],
        layout=layout,
        values=values,
        config=cfg,
        backend=backend,
        validate=False,
        **data,
    )
    (out.loss + out.log_probs.sum() + out.entropy.sum()).backward()
    assert logits.grad is not None and values.grad is not None
    for name, t in data.items():
        assert t.grad is None, f"{backend}: {name} got a gradient"


# -- issue: log-probs accurate at any common logit offset --------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [50.0, 1e4])
def test_log_probs_accurate_at_a_large_logit_offset(backend, offset):
    """(z - m) - log sum exp(z - m): float32 log-probs, joint log-probs, entropies and N x gradients within the
    float32 tolerance of float64 when every logit carries the same large offset."""
    n = 512 if backend == "triton" else 4096
    batch, layout = _esperish(n, seed=2, offset=offset)
    cfg = ek.PPOLossConfig(entropy_coef=0.1)
    want, want_grad = _f64_truth(batch, layout, cfg)
    z = batch["logits"].clone().requires_grad_(True)
    got = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=cfg, backend=backend, validate=False)
    got.loss.backward()
    present = batch["weights"] > 0
    assert_close("log_probs", got.log_probs[present], want.log_probs[present])
    assert_close("joint log-prob", got.log_probs[present].sum(-1), want.log_probs[present].sum(-1))
    assert_close("entropy", got.entropy[present], want.entropy[present])
    assert_close("N x grad", n * z.grad, n * want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_huge_equal_logits(backend):
    """Three logits all 1e8: entropy log 3 and log-prob -log 3 (z - lse rounds them to 0 and -1.125)."""
    layout = ek.HeadLayout({"a": 3})
    z = torch.full((2, 3), 1e8)
    out = ek.ppo_loss(
        z,
        None,
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(2, 1),
        torch.zeros(2),
        layout=layout,
        backend=backend,
        validate=False,
    )
    torch.testing.assert_close(out.entropy, torch.full((2, 1), math.log(3.0)), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.log_probs, torch.full((2, 1), -math.log(3.0)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("offset", [50.0, 200.0])
def test_backends_agree_at_a_large_offset(offset):
    batch, layout = _esperish(1024, seed=3, offset=offset)
    outs = {b: ek.ppo_loss(**batch, layout=layout, backend=b, validate=False) for b in BACKENDS}
    ref = outs["reference"]
    present = batch["weights"] > 0  # (an absent step's per-step outputs are unspecified)
    for b, out in outs.items():
        assert_close(f"{b} log_probs", out.log_probs[present], ref.log_probs[present])
        assert_close(f"{b} loss", out.loss, ref.loss)


# -- issue: invalid actions excluded exactly -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_actions_get_probability_zero_far_below_the_fill(backend):
    """Valid logits near -2e4 (below esper's fill of -1e4): with exclusion (mask_fill=None, the default) the
    masked actions get probability 0 and the loss is the one of the valid actions alone."""
    batch, layout = _esperish(64, seed=4, offset=-2e4)
    shifted = dict(batch, logits=batch["logits"] - (-2e4))
    out = ek.ppo_loss(**batch, layout=layout, backend=backend, validate=False)
    base = ek.ppo_loss(**shifted, layout=layout, backend="reference", validate=False)
    present = batch["weights"] > 0  # (an absent step's per-step outputs are unspecified)
    assert_close("log_probs", out.log_probs[present], base.log_probs[present], rtol=1e-5, atol=2e-5)
    assert_close("loss", out.loss, base.loss, rtol=1e-5, atol=2e-5)
    filled = ek.ppo_loss(
        **batch, layout=layout, backend=backend, validate=False, config=ek.PPOLossConfig(mask_fill=-1e4)
    )
    # the fill dominates: the old behaviour
    assert (filled.log_probs[present] - base.log_probs[present]).abs().max() > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusion_equals_the_fill_for_normal_logits(backend):
    batch, layout = _esperish(256, seed=5)
    a = ek.ppo_loss(**batch, layout=layout, backend=backend, validate=False)
    b = ek.ppo_loss(**batch, layout=layout, backend=backend, validate=False, config=ek.PPOLossConfig(mask_fill=-1e4))
    present = batch["weights"] > 0
    assert torch.equal(a.log_probs[present], b.log_probs[present])
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_fill", [None, -1e4])
def test_empty_mask_is_treated_as_an_out_of_range_action(backend, mask_fill):
    """No valid action: NaN log-prob, entropy 0, counted; on a present relevant step the loss is NaN; on an
    irrelevant head or an absent step it leaks into nothing (loss, gradient, that head's metrics)."""
    layout = ek.HeadLayout({"a": 3, "b": 4})
    g = torch.Generator().manual_seed(6)
    n = 6
    z = torch.randn(n, 7, generator=g)
    masks = torch.ones(n, 7, dtype=torch.bool)
    masks[0, 3:] = False  # head b empty at step 0
    masks[1, 3:] = False  # and at step 1 (absent)
    rel = torch.ones(n, 2, dtype=torch.bool)
    rel[0, 1] = False  # head b irrelevant at step 0
    w = torch.ones(n)
    w[1] = 0.0
    actions = torch.zeros(n, 2, dtype=torch.long)
    old = torch.full((n, 2), -1.0)
    cfg = ek.PPOLossConfig(mask_fill=mask_fill, entropy_coef=0.1)
    zz = z.clone().requires_grad_(True)
    out = ek.ppo_loss(
        zz,
        masks,
        actions,
        old,
        torch.randn(n, generator=g),
        layout=layout,
        head_relevance=rel,
        weights=w,
        config=cfg,
        backend=backend,
        validate=False,
    )
    assert math.isnan(out.log_probs[0, 1].item()) and out.entropy[0, 1].item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(zz.grad).all()
    assert (zz.grad[0, 3:] == 0).all() and (zz.grad[1] == 0).all()
    m = out.metrics.to_dict()
    assert m["head_b_empty_mask"] == 1.0 and m["head_b_nonfinite"] == 1.0 and m["all_finite"] == 0.0
    assert math.isfinite(m["head_b_entropy"]) and math.isfinite(m["head_b_kl"])
    # relevant at step 0: the loss is NaN, as with an out-of-range action
    rel[0, 1] = True
    out = ek.ppo_loss(
        z,
        masks,
        actions,
        old,
        torch.randn(n, generator=g),
        layout=layout,
        head_relevance=rel,
        weights=w,
        config=cfg,
        backend=backend,
        validate=False,
    )
    assert math.isnan(out.loss.item())
    with pytest.raises(ValueError, match="head 'b': no valid action"):
        ek.ppo_loss(
            z, masks, actions, old, torch.randn(n, generator=g), layout=layout, weights=w, config=cfg, backend=backend
        )


# -- issue: one NaN pattern of the gradient -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_upstream_gives_nan_at_every_valid_action_of_the_row(backend):
    """The reproduction of the issue: an out-of-range action makes the loss NaN; the floored head b's row gets
    NaN at every valid action (the fused closed form gave 0 under the floor)."""
    layout = ek.HeadLayout({"a": 1, "b": 2})
    z = torch.tensor([[0.15, 0.06, -0.11]], requires_grad=True)
    cfg = ek.PPOLossConfig(prob_floor=[None, 0.5], joint_log_ratio_clamp=None)
    out = ek.ppo_loss(
        z,
        None,
        torch.tensor([[7, 0]]),
        torch.tensor([[0.0, -0.6]]),
        torch.tensor([0.77]),
        layout=layout,
        config=cfg,
        backend=backend,
        validate=False,
    )
    out.loss.backward()
    assert z.grad[0, 0].item() == 0.0  # head a's action is out of range: nothing flows into it
    assert torch.isnan(z.grad[0, 1:]).all(), z.grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("floor", [None, 0.2])
def test_non_finite_upstream_pattern_matches_the_reference(backend, floor):
    """Rows whose upstream is NaN or inf: every valid action non-finite in both, masked actions and absent
    steps exactly 0 in both; every other row finite and equal."""
    batch, layout = _esperish(40, seed=8)
    batch["actions"][::5, 0] = 99  # out of range: NaN loss through the joint ratio
    cfg = ek.PPOLossConfig(
        prob_floor=None if floor is None else [floor] * layout.num_heads, joint_log_ratio_clamp=None, entropy_coef=0.1
    )
    grads = {}
    for b in ("reference", backend):
        z = batch["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=cfg, backend=b, validate=False)
        g = torch.Generator().manual_seed(0)
        glp = torch.randn(out.log_probs.shape, generator=g)
        glp[1, 1] = float("nan")  # a NaN incoming gradient on one (step, head) output
        (grads[b],) = torch.autograd.grad([out.loss, out.log_probs], [z], [torch.ones(()), glp])
    want, got = grads["reference"], grads[backend]
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    # masked actions and absent steps: exactly 0 in both, whatever their rows' upstream
    dead = ~batch["action_masks"] | (batch["weights"] <= 0).unsqueeze(-1)
    assert (got[dead] == 0).all() and (want[dead] == 0).all()
    fin = torch.isfinite(want)
    assert_close("finite gradients", got[fin], want[fin])


# -- issue: an overflowed joint ratio reads as inf ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", [0, 5, 11])
def test_overflowed_joint_ratio_reads_inf(backend, where):
    """Without a joint clamp, 6 heads at the per-head clamp 20 give L = 120: r = inf. ratio_mean, ratio_std and
    ratio_max read inf wherever the overflowing step sits in the batch (NaN means no data)."""
    sizes = (2,) * 6
    layout = ek.HeadLayout({f"h{i}": a for i, a in enumerate(sizes)})
    n = 12
    z = torch.zeros(n, 12)
    old = torch.full((n, 6), -math.log(2.0))  # ratio 1
    old[where] = -60.0  # lr clamps at +20 in every head
    cfg = ek.PPOLossConfig(joint_log_ratio_clamp=None)
    out = ek.ppo_loss(
        z,
        None,
        torch.zeros(n, 6, dtype=torch.long),
        old,
        torch.ones(n),
        layout=layout,
        config=cfg,
        backend=backend,
        validate=False,
    )
    m = out.metrics.to_dict()
    assert m["ratio_max"] == math.inf and m["ratio_mean"] == math.inf and m["ratio_std"] == math.inf, m
    assert m["ratio_min"] == 1.0 and m["joint_kl_k3"] == math.inf


# -- issue: the config refuses what overflows float32; clearer messages ---------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("mask_fill", -1e39),
        ("clip_eps_high", 1e39),
        ("value_clip", 1e39),
        ("entropy_coef", 1e39),
        ("advantage_eps", 1e39),
    ],
)
def test_config_refuses_values_that_overflow_float32(field, value):
    with pytest.raises(ValueError, match=rf"PPOLossConfig\.{field}: .*overflows float32"):
        ek.PPOLossConfig(**{field: value})


def test_layout_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    layout = ek.HeadLayout({"a": np.int64(3), "b": np.int32(2)})
    assert layout.sizes == (3, 2) and all(type(a) is int for a in layout.sizes)


def test_numpy_logits_raise_a_type_error_asking_for_a_tensor():
    np = pytest.importorskip("numpy")
    layout = ek.HeadLayout({"a": 3})
    with pytest.raises(TypeError, match=r"logits: expected a torch.Tensor .*numpy.ndarray.*torch.from_numpy"):
        ek.ppo_loss(
            np.zeros((2, 3), dtype=np.float32),
            None,
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(2, 1),
            torch.zeros(2),
            layout=layout,
        )


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_says_the_fused_backends_do_not_support_it(backend):
    batch, layout = _esperish(8, seed=9)
    z = batch["logits"].clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, backend=backend, validate=False)
    with pytest.raises(RuntimeError, match=r"do not support double backward.*'reference' backend does"):
        torch.autograd.grad(out.loss, z, create_graph=True)
    # the reference does
    z = batch["logits"].clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, backend="reference", validate=False)
    (g,) = torch.autograd.grad(out.loss, z, create_graph=True)
    g.square().sum().backward()
    assert z.grad is not None

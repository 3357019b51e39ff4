"""The bugs of the telemetry-freeze report (docs/background.md), each pinned down.

* mask collapse: a head with one valid action has exactly zero gradient and learnable_fraction 0, while its
  metrics are finite (nothing to learn, as opposed to broken);
* joint ratio shadow: clip_fraction and the ratio statistics use the TRUE joint ratio, not the op head's;
* KL overflow: a log-ratio of +50 gives finite KL and ratio metrics (the clamped log-ratio is reused);
* finiteness gate: non-finite log-probs are counted per head and make all_finite 0;
* bug-hiding zeros: a metric without data is NaN, never 0.0.
"""

from __future__ import annotations

import math

import pytest
import torch
from ref_cases import single_thread  # noqa: F401

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.reference

LAYOUT = ek.HeadLayout({"slot": 3, "style": 4, "op": 6})


def _current_log_probs(logits, masks, actions, layout, fill=-1e4):
    with torch.no_grad():
        out = []
        for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
            z = logits[..., off : off + a].float()
            if masks is not None:
                z = z.masked_fill(~masks[..., off : off + a], fill)
            out.append(torch.log_softmax(z, -1).gather(-1, actions[..., h : h + 1]).squeeze(-1))
        return torch.stack(out, -1)


def _batch(n=16, seed=0, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, layout.total, generator=g) * 2
    masks = torch.ones(n, layout.total, dtype=torch.bool)
    actions = torch.stack([torch.randint(0, a, (n,), generator=g) for a in layout.sizes], -1)
    old = _current_log_probs(logits, masks, actions, layout) + 0.1 * torch.randn(n, layout.num_heads, generator=g)
    rel = torch.ones(n, layout.num_heads, dtype=torch.bool)
    return dict(
        logits=logits,
        action_masks=masks,
        actions=actions,
        old_log_probs=old,
        advantages=torch.randn(n, generator=g),
        head_relevance=rel,
    )


def _run(batch, config=None, layout=LAYOUT, validate=False):
    b = dict(batch)
    z = b.pop("logits").clone().requires_grad_(True)
    out = ek.ppo_loss(
        z, **b, layout=layout, config=config or ek.PPOLossConfig(), backend="reference", validate=validate
    )
    return out, z


# -- mask collapse ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        ek.PPOLossConfig(entropy_coef=0.1),
        ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1, normalize_entropy=True),
        ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1, prob_floor=[0.1, 0.1, 0.1]),
    ],
    ids=["joint", "per_head_normalized_entropy", "per_head_floor"],
)
def test_mask_collapse_zero_gradient_finite_metrics(config):
    b = _batch()
    slot = LAYOUT.index("slot")
    off = LAYOUT.offsets[slot]
    # slot: exactly one valid action at every step (the taken one), relevant everywhere
    masks = b["action_masks"].clone()
    masks[:, off : off + 3] = False
    masks[torch.arange(16), off + b["actions"][:, slot]] = True
    b["action_masks"] = masks
    b["old_log_probs"] = _current_log_probs(b["logits"], masks, b["actions"], LAYOUT) + 0.1 * torch.randn(16, 3)
    b["old_log_probs"][:, slot] = 0.0  # log 1: the rollout's log-prob of the only action
    out, z = _run(b, config)
    out.loss.backward()
    g = z.grad
    assert (g[:, off : off + 3] == 0).all(), "a head with one valid action must get exactly zero gradient"
    assert (g[:, LAYOUT.offsets[2] :] != 0).any(), "the op head still learns"
    m = out.metrics.head("slot")
    assert m["learnable_fraction"] == 0.0 and m["single_action_fraction"] == 1.0
    assert m["valid_actions_min"] == m["valid_actions_max"] == m["valid_actions_mean"] == 1.0
    assert m["relevance_fraction"] == 1.0
    assert m["entropy"] == 0.0 and m["kl"] == 0.0 and m["ratio_max"] == 1.0 and m["clip_fraction"] == 0.0
    assert m["nonfinite"] == 0 and m["empty_mask"] == 0 and m["invalid_action"] == 0
    # every metric is a finite number, except those without data in this batch (no values given)
    no_data = {"value_loss", "explained_variance", "value_clip_fraction", "invalid_value_weights"}
    m_all = out.metrics.to_dict()
    assert {k for k, v in m_all.items() if not math.isfinite(v)} == no_data, m_all
    assert out.metrics.to_dict()["all_finite"] == 1.0
    assert (out.log_probs[:, slot] == 0).all()
    op = out.metrics.head("op")
    assert op["learnable_fraction"] == 1.0 and op["single_action_fraction"] == 0.0


def test_learnable_fraction_counts_relevant_steps_with_a_choice():
    b = _batch(n=8)
    w = torch.tensor([1.0, 1.0, 2.0, 2.0, 0.5, 0.5, 0.0, 1.0])
    rel = torch.ones(8, 3, dtype=torch.bool)
    rel[:4, 0] = False  # slot irrelevant on steps 0-3
    masks = b["action_masks"].clone()
    masks[4, 0:3] = torch.tensor([True, False, False])  # slot: one valid action on step 4
    b["actions"][4, 0] = 0
    b.update(weights=w, head_relevance=rel, action_masks=masks)
    out, _ = _run(b)
    m = out.metrics.head("slot")
    # present weight 8 (step 6 absent); relevant and n > 1: steps 5 and 7 -> 1.5
    assert m["learnable_fraction"] == pytest.approx(1.5 / 8.0)
    assert m["relevance_fraction"] == pytest.approx(2.0 / 8.0)
    assert m["single_action_fraction"] == pytest.approx(0.5 / 8.0)


# -- joint ratio shadow --------------------------------------------------------------------------------------------
def test_clip_fraction_uses_the_true_joint_ratio():
    b = _batch()
    style = LAYOUT.index("style")
    cur = _current_log_probs(b["logits"], b["action_masks"], b["actions"], LAYOUT)
    old = cur.clone()  # every head's ratio is 1 ...
    old[:, style] = cur[:, style] - 0.5  # ... except style's: e^0.5 = 1.65, far outside [0.8, 1.2]
    b["old_log_probs"] = old
    out, _ = _run(b)
    m = out.metrics.to_dict()
    assert m["head_op_clip_fraction"] == 0.0 and m["head_op_ratio_max"] == pytest.approx(1.0)
    assert m["head_style_clip_fraction"] == 1.0
    assert m["clip_fraction"] == 1.0 and m["clip_fraction_positive"] == 1.0 and m["clip_fraction_negative"] == 0.0
    assert m["ratio_mean"] == pytest.approx(math.exp(0.5), rel=1e-5)
    assert m["ratio_min"] == pytest.approx(math.exp(0.5), rel=1e-5)
    torch.testing.assert_close(out.joint_ratio, torch.full((16,), math.exp(0.5)), rtol=1e-5, atol=0)
    assert m["joint_kl_k1"] == pytest.approx(-0.5, rel=1e-5)
    # an irrelevant head's divergence is not part of the joint ratio
    b["head_relevance"] = b["head_relevance"].clone()
    b["head_relevance"][:, style] = False
    m2 = _run(b)[0].metrics.to_dict()
    assert m2["clip_fraction"] == 0.0 and m2["ratio_max"] == pytest.approx(1.0)
    assert math.isnan(m2["head_style_clip_fraction"])


def test_joint_ratio_is_the_product_of_relevant_head_ratios():
    b = _batch(n=6)
    cur = _current_log_probs(b["logits"], b["action_masks"], b["actions"], LAYOUT)
    d = torch.tensor([[0.1, -0.05, 0.02]]).expand(6, 3)
    b["old_log_probs"] = cur - d
    rel = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    b["head_relevance"] = rel
    out, _ = _run(b)
    want = torch.exp((d * rel).sum(-1))
    torch.testing.assert_close(out.joint_ratio, want, rtol=1e-5, atol=1e-6)


# -- KL overflow ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_ratio", [50.0, -50.0, 1e4])
def test_huge_log_ratio_gives_finite_kl_and_ratio_metrics(log_ratio):
    b = _batch()
    cur = _current_log_probs(b["logits"], b["action_masks"], b["actions"], LAYOUT)
    b["old_log_probs"] = cur - log_ratio  # every head: ell - old = log_ratio
    out, z = _run(b, ek.PPOLossConfig(entropy_coef=0.01))
    m = out.metrics.to_dict()
    for k in (
        "approx_kl",
        "joint_kl_k3",
        "joint_kl_k1",
        "ratio_mean",
        "ratio_std",
        "ratio_min",
        "ratio_max",
        "loss",
        "clip_fraction",
        "head_op_kl",
        "head_op_ratio_max",
        "head_slot_kl",
    ):
        assert math.isfinite(m[k]), f"{k} = {m[k]}"
    assert m["all_finite"] == 1.0
    C, CJ = 20.0, 30.0
    lr = math.copysign(C, log_ratio)
    assert m["head_op_kl"] == pytest.approx(math.exp(lr) - 1 - lr, rel=1e-5)
    assert m["head_op_ratio_max"] == pytest.approx(math.exp(lr), rel=1e-5)
    L = math.copysign(CJ, log_ratio)  # 3 heads x 20 = 60, clamped to 30
    assert m["joint_kl_k3"] == pytest.approx(math.exp(L) - 1 - L, rel=1e-5)
    assert m["ratio_max"] == pytest.approx(math.exp(L), rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(z.grad).all()


def test_per_head_log_ratio_clamp_applies_before_the_joint_sum():
    """Heads at +50 and -50: each clamps to +-20, so the joint log-ratio is 0, not clamp(0) of the raw sum."""
    b = _batch(n=4)
    cur = _current_log_probs(b["logits"], b["action_masks"], b["actions"], LAYOUT)
    b["old_log_probs"] = cur - torch.tensor([50.0, -50.0, 3.0])
    out, _ = _run(b)
    torch.testing.assert_close(out.joint_ratio, torch.full((4,), math.exp(3.0)), rtol=1e-5, atol=0)


# -- finiteness gate -----------------------------------------------------------------------------------------------
def test_nonfinite_log_probs_are_counted_per_head():
    b = _batch(n=10)
    w = torch.ones(10)
    w[9] = 0.0
    rel = b["head_relevance"].clone()
    rel[1, 1] = False
    b.update(weights=w, head_relevance=rel)
    z = b["logits"].clone()
    st = LAYOUT.offsets[1]
    z[0, st + 1] = float("nan")  # style, step 0 (relevant)
    z[1, st + 2] = float("nan")  # style, step 1 (irrelevant: counted too)
    z[2, st] = float("inf")  # style, step 2
    z[9, st] = float("nan")  # absent step: not counted
    z[3, LAYOUT.offsets[2] + 5] = float("nan")  # op, step 3
    b["logits"] = z
    out, _ = _run(b)
    m = out.metrics.to_dict()
    assert m["head_style_nonfinite"] == 3.0 and m["head_op_nonfinite"] == 1.0 and m["head_slot_nonfinite"] == 0.0
    assert m["all_finite"] == 0.0
    assert torch.isnan(out.log_probs[0, 1]) and not torch.isfinite(out.log_probs[2, 1])


def test_nan_logit_at_a_masked_position_is_not_counted():
    b = _batch(n=6)
    masks = b["action_masks"].clone()
    masks[0, 4] = False  # style action 1 invalid at step 0
    b["actions"][0, 1] = 0
    b["action_masks"] = masks
    b["logits"] = b["logits"].clone()
    b["logits"][0, 4] = float("nan")
    b["old_log_probs"] = _current_log_probs(b["logits"], masks, b["actions"], LAYOUT)
    m = _run(b)[0].metrics.to_dict()
    assert m["head_style_nonfinite"] == 0.0 and m["all_finite"] == 1.0


def test_all_finite_on_the_synthetic_esper_batch():
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    batch = make_batch((4, 25), layout, seed=2)
    m = ek.ppo_loss(**batch, layout=layout, backend="reference").metrics.to_dict()
    assert m["all_finite"] == 1.0 and all(m[f"head_{n}_nonfinite"] == 0 for n in layout.names)


def test_invalid_action_gives_nan_log_prob_and_is_counted_in_nonfinite():
    b = _batch(n=4)
    b["actions"] = b["actions"].clone()
    b["actions"][1, 2] = 6  # op has 6 actions: out of range
    out, _ = _run(b)
    assert torch.isnan(out.log_probs[1, 2])
    m = out.metrics.to_dict()
    assert m["head_op_invalid_action"] == 1.0 and m["head_op_nonfinite"] == 1.0 and m["all_finite"] == 0.0


# -- no data is NaN, never 0 ---------------------------------------------------------------------------------------
def test_a_head_never_relevant_has_nan_statistics_and_zero_fractions():
    b = _batch()
    b["head_relevance"] = b["head_relevance"].clone()
    b["head_relevance"][:, 0] = False
    out, z = _run(b, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1))
    m = out.metrics.head("slot")
    for k in ("entropy", "kl", "clip_fraction", "ratio_max"):
        assert math.isnan(m[k]), f"{k} = {m[k]}, expected NaN (no relevant step)"
    # measured zeros stay zeros
    assert m["relevance_fraction"] == 0.0 and m["learnable_fraction"] == 0.0
    assert m["nonfinite"] == 0.0 and m["valid_actions_mean"] == 3.0
    # the loss terms are 0 for that head (docs/semantics.md 2.7), so the loss stays finite, and the head gets no
    # gradient
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert (z.grad[:, :3] == 0).all()


@pytest.mark.parametrize("how", ["zero_weights", "empty_batch"])
def test_no_present_step_gives_nan_means(how):
    if how == "zero_weights":
        b = _batch(n=5)
        b["weights"] = torch.zeros(5)
    else:
        b = _batch(n=1)
        b = {k: v[:0] for k, v in b.items()}
    b["values"] = torch.zeros(b["advantages"].shape)
    b["returns"] = torch.ones(b["advantages"].shape)
    out, z = _run(b, ek.PPOLossConfig(entropy_coef=0.1))
    # loss terms: 0 (docs/semantics.md 2.7), with an all-zero gradient
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        assert getattr(out, k).item() == 0.0, k
    out.loss.backward()
    assert (z.grad == 0).all()
    m = out.metrics.to_dict()
    assert m["steps"] == 0.0 and m["weight_sum"] == 0.0 and m["invalid_weights"] == 0.0
    for k in (
        "loss",
        "policy_loss",
        "entropy_loss",
        "value_loss",
        "approx_kl",
        "joint_kl_k3",
        "joint_kl_k1",
        "clip_fraction",
        "clip_fraction_positive",
        "clip_fraction_negative",
        "ratio_mean",
        "ratio_std",
        "ratio_min",
        "ratio_max",
        "log_prob_min",
        "log_prob_max",
        "explained_variance",
    ):
        assert math.isnan(m[k]), f"{k} = {m[k]}, expected NaN"
    for name in LAYOUT.names:
        for k in (
            "entropy",
            "kl",
            "clip_fraction",
            "ratio_max",
            "valid_actions_min",
            "valid_actions_max",
            "valid_actions_mean",
            "single_action_fraction",
            "relevance_fraction",
            "learnable_fraction",
        ):
            assert math.isnan(m[f"head_{name}_{k}"]), f"head_{name}_{k} = {m[f'head_{name}_{k}']}"
        for k in ("nonfinite", "empty_mask", "invalid_action"):
            assert m[f"head_{name}_{k}"] == 0.0  # counts: a measured zero
    assert m["all_finite"] == 1.0  # nothing non-finite was computed: the loss (0) is finite


def test_without_values_the_value_metrics_are_nan():
    out, _ = _run(_batch())
    m = out.metrics.to_dict()
    for k in ("value_loss", "explained_variance", "value_clip_fraction", "invalid_value_weights"):
        assert math.isnan(m[k]), k
    assert out.value_loss.item() == 0.0
    assert math.isfinite(m["loss"])
    # with values but no clipping: value_clip_fraction has no meaning (NaN), explained variance does
    b = _batch()
    b["values"], b["returns"] = torch.randn(16), torch.randn(16)
    m = _run(b)[0].metrics.to_dict()
    assert math.isnan(m["value_clip_fraction"]) and math.isfinite(m["explained_variance"])
    assert m["invalid_value_weights"] == 0.0


def _constant_cases(count=40):
    """(weights, constant) pairs: fractional weights make sum(w c) / sum(w) differ from c by rounding."""
    g = torch.Generator().manual_seed(0)
    for _ in range(count):
        n = int(torch.randint(1, 7, (1,), generator=g))
        w = torch.rand(n, generator=g) * 3
        w[torch.rand(n, generator=g) < 0.2] = 0.0
        w[0] = 0.3 + w[0]  # at least one present step
        yield w, float(torch.randn(1, generator=g))


def test_constant_returns_have_no_explained_variance_and_constant_ratios_no_spread():
    """var(R) = 0 is no data for 1 - var(R - v) / var(R): NaN, not float32 rounding noise amplified to ~1e7;
    identical ratios have a std of exactly 0."""
    for w, c in _constant_cases():
        n = len(w)
        b = {k: v[:n] for k, v in _batch(n=6).items()}
        b["head_relevance"] = torch.zeros(n, 3, dtype=torch.bool)  # joint log-ratio 0: every ratio is exactly 1
        b.update(weights=w, values=torch.randn(n), returns=torch.full((n,), c))
        m = _run(b)[0].metrics.to_dict()
        assert math.isnan(m["explained_variance"]), (w, c, m["explained_variance"])
        assert m["ratio_std"] == 0.0, (w, m["ratio_std"])


def test_normalized_constant_advantages_are_zero():
    """(A - mean) / max(std, 1e-8) of a constant A is 0 (float32 rounding of the mean must not be amplified)."""
    from esper_kernels.reference import normalize_advantages

    cfg = ek.PPOLossConfig(normalize_advantages=True).resolve(ek.HeadLayout({"a": 2}))
    for w, c in _constant_cases():
        assert (normalize_advantages(torch.full((len(w),), c), w, cfg) == 0).all(), (w, c)
        per_head = normalize_advantages(torch.full((len(w), 2), c), w, cfg)
        assert (per_head == 0).all(), (w, c)
    w = torch.tensor([0.3, 0.7, 1.3, 0.0, 2.9, 0.1, 1.7])
    x = torch.randn(7)
    n = normalize_advantages(x, w, cfg)
    p = w > 0
    mean = (w * x).sum() / w.sum()
    std = ((w * (x - mean) ** 2).sum() / w.sum()).sqrt()
    torch.testing.assert_close(n[p], ((x - mean) / std)[p], rtol=1e-5, atol=1e-6)
    assert (n[~p] == 0).all()


@pytest.mark.parametrize("entropy_coef", [0.1, 0.0])
def test_all_finite_follows_the_loss_when_only_the_entropy_is_non_finite(entropy_coef):
    """-inf at a valid, untaken position: every log-prob is finite but the entropy is NaN (0 * -inf), so the loss
    is NaN (with entropy_coef = 0 too: 0 * NaN, IEEE); the metrics must say so (the loss metric NaN, all_finite 0)."""
    b = _batch(n=6)
    b["logits"] = b["logits"].clone()
    b["actions"] = b["actions"].clone()
    b["actions"][2, 1] = 0
    b["logits"][2, LAYOUT.offsets[1] + 1] = float("-inf")  # style, step 2, valid but not taken
    out, _ = _run(b, ek.PPOLossConfig(entropy_coef=entropy_coef))
    assert torch.isfinite(out.log_probs).all() and torch.isnan(out.entropy[2, 1])
    assert math.isnan(out.loss.item())
    m = out.metrics.to_dict()
    assert math.isnan(m["loss"]) and math.isnan(m["head_style_entropy"]) and math.isnan(m["entropy_loss"])
    assert m["all_finite"] == 0.0 and m["head_style_nonfinite"] == 0.0

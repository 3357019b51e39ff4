"""The reference backend equals an independent per-step, per-head loop over the formulas of docs/semantics.md
(spec_loop.py).

Hypothesis draws layouts (1 to 5 heads of 1 to 40 actions), [N] and [B, T] batches, masks, relevance, weights
(none, bool, zeros and fractions), old log-probs far enough off to hit both clamps, per-head advantages, value
inputs, data errors and NaN/Inf garbage where nothing may be read, and every PPOLossConfig field.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import compare_metrics
from hypothesis import assume, given, settings
from ref_cases import (
    cases,
    layout_of,
    random_batch,
    single_thread,  # noqa: F401
)
from spec_loop import spec_loss

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.reference


def run_reference(batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig):
    return ek.ppo_loss(**batch, layout=layout, config=config, backend="reference", validate=False)


def assert_matches_loop(out, want: dict, *, rtol: float, atol: float, metric_rtol: float, metric_atol: float):
    """Reference output ``out`` against the loop's result ``want``: losses, present rows, every metric."""
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        got = getattr(out, k).item()
        w = want[k]
        assert (math.isnan(got) and math.isnan(w)) or got == w or abs(got - w) <= atol + rtol * abs(w), (
            f"{k}: reference {got!r}, loop {w!r}"
        )
    present = torch.tensor(want["present"], dtype=torch.bool)
    H = out.log_probs.shape[-1]
    for k in ("log_probs", "entropy"):
        got = getattr(out, k).detach().reshape(-1, H).double()[present]
        exp = torch.tensor(want[k], dtype=torch.float64).reshape(-1, H)[present]
        torch.testing.assert_close(got, exp, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
    got = out.joint_ratio.reshape(-1).double()[present]
    exp = torch.tensor(want["joint_ratio"], dtype=torch.float64)[present]
    torch.testing.assert_close(got, exp, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"joint_ratio: {m}")
    got_m, want_m = out.metrics.to_dict(), float32_statistics(want["metrics"])
    # a standard deviation is only as accurate as the deviations from the mean: its error scales with the mean
    g, w, mean = got_m["ratio_std"], want_m["ratio_std"], want_m["ratio_mean"]
    if math.isfinite(g) and math.isfinite(w) and math.isfinite(mean):
        assert abs(g - w) <= metric_atol + metric_rtol * max(abs(w), abs(mean)), f"ratio_std: got {g}, want {w}"
        want_m["ratio_std"] = g
    compare_metrics(got_m, want_m, rtol=metric_rtol, atol=metric_atol)


F32_MAX = float(torch.finfo(torch.float32).max)


def float32_statistics(metrics: dict[str, float]) -> dict[str, float]:
    """The loop's metrics as float32 statistics hold them: a value beyond the float32 range is +-inf.

    Only reachable with joint_log_ratio_clamp=None (or > 44): a joint ratio above ~1e19 has a squared deviation
    (RATIO_M2) beyond float32, so ratio_std saturates to inf; above 3e38 the ratio itself does.
    """
    out = {k: float(torch.tensor(v, dtype=torch.float64).float()) for k, v in metrics.items()}
    std, w = metrics["ratio_std"], metrics["weight_sum"]
    if math.isfinite(std) and std * std * w > F32_MAX:
        out["ratio_std"] = math.inf
    return out


@given(cases(messy=None))
def test_reference_float64_equals_spec_loop(case):
    """Float64 logits: the reference and the loop agree to rounding (metrics go through float32 statistics)."""
    sizes, kw, config = case
    layout = layout_of(sizes)
    batch = random_batch(sizes, dtype=torch.float64, **kw)
    out = run_reference(batch, layout, config)
    assert out.loss.dtype == torch.float64
    want = spec_loss(batch, layout.names, layout.sizes, config)
    assert_matches_loop(out, want, rtol=1e-9, atol=1e-9, metric_rtol=2e-6, metric_atol=2e-6)


@settings(max_examples=15)
@given(cases(messy=False))
def test_reference_float32_equals_spec_loop(case):
    """Float32 logits (the production path) against the float64 loop, within float32 rounding."""
    sizes, kw, config = case
    layout = layout_of(sizes)
    batch = random_batch(sizes, dtype=torch.float32, **kw)
    want = spec_loss(batch, layout.names, layout.sizes, config)
    # float32 exp overflows beyond a log-ratio of 88 (reachable only with joint_log_ratio_clamp=None)
    assume(max(want["joint_ratio"]) < 1e30)
    out = run_reference(batch, layout, config)
    assert out.loss.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert_matches_loop(out, want, rtol=2e-5, atol=2e-5, metric_rtol=2e-5, metric_atol=2e-5)


@pytest.mark.parametrize("surrogate", ["joint", "per_head"])
def test_esper_batch_float64_equals_spec_loop(surrogate):
    """Esper's 8 heads with the causal relevance of docs/background.md, [B, T] = [3, 20], values with clipping."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    batch = make_batch((3, 20), layout, dtype=torch.float64, seed=3, old_noise=0.3)
    batch["old_values"] = batch["values"] + 0.3
    config = ek.PPOLossConfig(
        surrogate=surrogate,
        normalize_entropy=True,
        entropy_coef=0.05,
        value_clip=0.2,
        prob_floor={"op": 0.02, "blueprint": 0.01},
        clip_eps_high=0.28,
    )
    out = run_reference(batch, layout, config)
    want = spec_loss(batch, layout.names, layout.sizes, config)
    assert_matches_loop(out, want, rtol=1e-9, atol=1e-9, metric_rtol=2e-6, metric_atol=2e-6)
    m = out.metrics.to_dict()
    assert 0 < m["clip_fraction"] < 1 and 0 < m["value_clip_fraction"] < 1  # the batch exercises both branches


def test_hand_computed_example():
    """One head of 2 actions, numbers worked out by hand: guards the loop itself as much as the reference."""
    layout = ek.HeadLayout({"a": 2})
    batch = dict(
        logits=torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64),
        action_masks=None,
        actions=torch.tensor([[1]]),
        old_log_probs=torch.tensor([[math.log(0.5)]], dtype=torch.float64),
        advantages=torch.tensor([1.0], dtype=torch.float64),
        values=torch.tensor([1.0], dtype=torch.float64),
        returns=torch.tensor([3.0], dtype=torch.float64),
    )
    config = ek.PPOLossConfig(entropy_coef=0.1, value_coef=0.5)
    # p = [1/4, 3/4]; ell = log 3/4; r = 1.5; min(1.5 * 1, 1.2 * 1) = 1.2; H = -(1/4 log 1/4 + 3/4 log 3/4)
    ent = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expect = {"policy_loss": -1.2, "entropy_loss": -ent, "value_loss": 0.5 * 4.0, "loss": -1.2 - 0.1 * ent + 0.5 * 2.0}
    want = spec_loss(batch, layout.names, layout.sizes, config)
    out = run_reference(batch, layout, config)
    for k, v in expect.items():
        assert want[k] == pytest.approx(v, rel=1e-12), k
        assert getattr(out, k).item() == pytest.approx(v, rel=1e-12), k
    m = out.metrics.to_dict()
    assert m["clip_fraction"] == 1.0 and m["clip_fraction_positive"] == 1.0 and m["clip_fraction_negative"] == 0.0
    assert m["ratio_mean"] == pytest.approx(1.5) and m["ratio_std"] == 0.0
    assert m["joint_kl_k3"] == pytest.approx(0.5 - math.log(1.5)) and m["joint_kl_k1"] == pytest.approx(-math.log(1.5))
    assert m["head_a_kl"] == pytest.approx(0.5 - math.log(1.5)) and m["approx_kl"] == pytest.approx(m["head_a_kl"])
    assert m["log_prob_min"] == pytest.approx(math.log(0.75)) == pytest.approx(m["log_prob_max"])
    assert math.isnan(m["explained_variance"])  # one return: var(R) = 0, the metric has no data
    assert m["head_a_valid_actions_mean"] == 2.0 and m["head_a_learnable_fraction"] == 1.0


def test_comparison_detects_a_wrong_config():
    """The loop comparison is not a tautology: the loop with another clip_eps disagrees with the reference."""
    sizes = [3, 5]
    layout = layout_of(sizes)
    batch = random_batch(sizes, (8,), seed=4, dtype=torch.float64, old_noise=1.0)
    out = run_reference(batch, layout, ek.PPOLossConfig(clip_eps=0.2))
    want = spec_loss(batch, layout.names, layout.sizes, ek.PPOLossConfig(clip_eps=0.25))
    with pytest.raises(AssertionError):
        assert_matches_loop(out, want, rtol=1e-9, atol=1e-9, metric_rtol=2e-6, metric_atol=2e-6)

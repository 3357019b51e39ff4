"""docs/semantics.md section 7: bf16/fp16 logits are upcast on load, everything is computed in float32, and gradients
come back in the
logits' dtype. The reference on half-precision inputs equals the reference on the upcast float32 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import check_backend, per_head
from ref_cases import (
    layout_of,
    random_batch,
    single_thread,  # noqa: F401
)

import esper_kernels as ek

pytestmark = pytest.mark.reference

SIZES = [3, 13, 1, 6]
CONFIGS = {
    "default": ek.PPOLossConfig(),
    "per_head_all": ek.PPOLossConfig(
        surrogate="per_head",
        entropy_coef=0.1,
        normalize_entropy=True,
        prob_floor=[0.05, 0.01, None, 0.1],
        value_clip=0.2,
        normalize_advantages=True,
    ),
    "joint_entropy_floor": ek.PPOLossConfig(entropy_coef=0.05, prob_floor={"h1": 0.02}, clip_eps_high=0.28),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["N", "BxT"])
def test_half_logits_equal_float32_of_upcast_inputs(dtype, config_name, shape):
    config = CONFIGS[config_name]
    layout = layout_of(SIZES)
    batch = random_batch(
        SIZES,
        shape,
        seed=3,
        dtype=dtype,
        values=True,
        old_values=True,
        logit_scale=3.0,
        per_head_adv=config.surrogate == "per_head",
    )
    out, _ = check_backend("reference", batch, layout, config)
    assert out.loss.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert out.entropy.dtype == torch.float32 and out.joint_ratio.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_is_the_float32_gradient_rounded(dtype):
    """Exactly: the reference upcasts first, so its half gradient is its float32 gradient cast to the dtype."""
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (9,), seed=5, dtype=dtype, values=True, logit_scale=3.0)
    config = ek.PPOLossConfig(entropy_coef=0.1, prob_floor=[0.05, 0.01, None, 0.1])
    grads = {}
    for name, z in (("half", batch["logits"].clone()), ("fp32", batch["logits"].float())):
        z.requires_grad_(True)
        b = {k: v for k, v in batch.items() if k != "logits"}
        out = ek.ppo_loss(z, **b, layout=layout, config=config, backend="reference", validate=False)
        (out.loss + out.log_probs.nan_to_num().sum() * 0.01 + out.entropy.nan_to_num().sum() * 0.01).backward()
        grads[name] = z.grad
    assert grads["half"].dtype == dtype and grads["fp32"].dtype == torch.float32
    assert torch.equal(grads["half"], grads["fp32"].to(dtype))
    assert (grads["half"] != 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_head_half_logits(dtype):
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (2, 4), seed=7, dtype=dtype)
    batch["logits"] = {n: t.clone() for n, t in per_head(batch["logits"], layout, as_mapping=True).items()}
    batch["action_masks"] = per_head(batch["action_masks"], layout)
    check_backend("reference", batch, layout, CONFIGS["joint_entropy_floor"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_old_log_probs_and_per_step_inputs(dtype):
    """old_log_probs (and advantages, values, weights) in half precision are upcast too."""
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (8,), seed=2, values=True, garbage=False)
    half = dict(batch)
    for k in ("old_log_probs", "advantages", "values", "returns", "weights"):
        half[k] = batch[k].to(dtype)
    up = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == dtype else v) for k, v in half.items()}
    config = CONFIGS["joint_entropy_floor"]
    a = ek.ppo_loss(**half, layout=layout, config=config, backend="reference", validate=False)
    b = ek.ppo_loss(**up, layout=layout, config=config, backend="reference", validate=False)
    assert torch.equal(a.loss, b.loss) and a.metrics.to_dict().keys() == b.metrics.to_dict().keys()
    for k, v in a.metrics.to_dict().items():
        w = b.metrics.to_dict()[k]
        assert v == w or (v != v and w != w), k


def test_fp16_large_logits_do_not_overflow():
    """fp16 logits near its range (6e4) are fine once upcast: a float16 softmax would overflow."""
    layout = ek.HeadLayout({"a": 3})
    logits = torch.tensor([[60000.0, 59968.0, -60000.0], [-60000.0, 0.0, 60000.0]], dtype=torch.float16)
    out = ek.ppo_loss(
        logits,
        None,
        torch.tensor([[0], [2]]),
        torch.zeros(2, 1),
        torch.ones(2),
        layout=layout,
        backend="reference",
        config=ek.PPOLossConfig(entropy_coef=0.1),
    )
    m = out.metrics.to_dict()
    assert m["all_finite"] == 1.0 and torch.isfinite(out.log_probs).all()
    assert out.log_probs[0, 0].item() == pytest.approx(-math.exp(-32.0), abs=1e-7)
    assert out.log_probs[1, 0].item() == 0.0 and out.entropy[1, 0].item() == 0.0  # e^-1e5 underflows to 0


def test_float64_logits_compute_in_float64():
    """The reference-only float64 path (for gradcheck): outputs and losses in float64."""
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (4,), seed=1, dtype=torch.float64)
    out = ek.ppo_loss(**batch, layout=layout, backend="reference", validate=False)
    assert out.loss.dtype == out.log_probs.dtype == out.entropy.dtype == torch.float64
    assert out.metrics.stats.dtype == torch.float32


def test_mixed_logit_dtypes_across_heads_raise():
    layout = ek.HeadLayout({"a": 2, "b": 3})
    logits = [torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.bfloat16)]
    with pytest.raises(TypeError, match="logits: expected one dtype for every head"):
        ek.ppo_loss(
            logits,
            None,
            torch.zeros(4, 2, dtype=torch.long),
            torch.zeros(4, 2),
            torch.zeros(4),
            layout=layout,
            backend="reference",
        )


def test_harness_catches_a_half_gradient_off_by_more_than_one_ulp():
    """The dtype comparison used above is not a tautology."""
    from harness import assert_grad_close

    want = torch.tensor([1.0, -0.5, 3.0e-3])
    got = want.to(torch.bfloat16).clone()
    assert_grad_close("ok", got, want, torch.bfloat16)
    got[1] = got[1] * 1.05
    with pytest.raises(AssertionError):
        assert_grad_close("bad", got, want, torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_grad_close("dtype", want.clone(), want, torch.bfloat16)

"""docs/semantics.md section 1: what is never read never matters. NaN/Inf at masked logit positions, at absent steps
(w = 0: logits,
old log-probs, advantages, values, returns, old values) and in irrelevant heads' old log-probs change no loss, no
metric, no per-step output of a present step and no gradient, bit for bit; absent steps get exactly 0 gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from ref_cases import (
    layout_of,
    random_batch,
    single_thread,  # noqa: F401
)

import esper_kernels as ek

pytestmark = pytest.mark.reference

SIZES = [3, 1, 5, 4]
SHAPE = (3, 5)
CONFIGS = {
    "joint": ek.PPOLossConfig(entropy_coef=0.1, value_clip=0.2),
    "per_head_everything": ek.PPOLossConfig(
        surrogate="per_head",
        normalize_advantages=True,
        normalize_entropy=True,
        entropy_coef=0.05,
        prob_floor=[0.05, None, 0.02, 0.1],
        value_clip=0.3,
        clip_eps_high=0.28,
        entropy_coef_per_head=[1.0, 0.5, 2.0, 0.0],
    ),
}
POISONS = (float("nan"), float("inf"), float("-inf"))


def _clean(per_head_adv: bool = False, seed: int = 0) -> dict:
    b = random_batch(
        SIZES,
        SHAPE,
        seed,
        weights="float",
        old_noise=0.3,
        per_head_adv=per_head_adv,
        values=True,
        old_values=True,
        garbage=False,
    )
    assert (b["weights"] == 0).any() and (b["weights"] > 0).any() and not b["head_relevance"].all()
    return b


def _run(batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig, seed: int = 0):
    """Outputs, metrics and gradients (random incoming gradients on loss, log_probs and entropy; and loss alone)."""
    b = dict(batch)
    z = b.pop("logits").clone().requires_grad_(True)
    v = b.pop("values").clone().requires_grad_(True)
    out = ek.ppo_loss(z, values=v, **b, layout=layout, config=config, backend="reference", validate=False)
    g = torch.Generator().manual_seed(seed)
    grads = torch.autograd.grad(
        [out.loss, out.log_probs, out.entropy],
        [z, v],
        [
            torch.randn((), generator=g),
            torch.randn(out.log_probs.shape, generator=g),
            torch.randn(out.entropy.shape, generator=g),
        ],
        retain_graph=True,
    )
    loss_grads = torch.autograd.grad(out.loss, [z, v])
    return out, grads, loss_grads


def _assert_same(a, b, present: torch.Tensor, skip_metrics: tuple[str, ...] = ()):
    out_a, grads_a, loss_grads_a = a
    out_b, grads_b, loss_grads_b = b
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        assert torch.equal(getattr(out_a, k), getattr(out_b, k)), k
    for k in ("log_probs", "entropy", "joint_ratio"):
        ta, tb = getattr(out_a, k)[present], getattr(out_b, k)[present]
        assert torch.equal(ta, tb) or torch.allclose(ta, tb, rtol=0, atol=0, equal_nan=True), k
    ma, mb = out_a.metrics.to_dict(), out_b.metrics.to_dict()
    for k in ma:
        if k in skip_metrics:
            continue
        assert ma[k] == mb[k] or (math.isnan(ma[k]) and math.isnan(mb[k])), f"metric {k}: {ma[k]} != {mb[k]}"
    for name, ga, gb in zip(
        ("logits", "values", "logits (loss only)", "values (loss only)"), grads_a + loss_grads_a, grads_b + loss_grads_b
    ):
        assert torch.equal(ga, gb), f"gradient of {name} changed"


def _present(batch) -> torch.Tensor:
    return batch["weights"] > 0


def _poison_absent(
    b: dict, value: float, keys=("logits", "old_log_probs", "advantages", "values", "returns", "old_values")
) -> dict:
    b = dict(b)
    absent = ~_present(b)
    for k in keys:
        t = b[k].clone()
        t[absent] = value
        b[k] = t
    return b


def _poison_masked(b: dict, value: float) -> dict:
    b = dict(b)
    b["logits"] = torch.where(b["action_masks"], b["logits"], value)
    return b


def _poison_irrelevant_old(b: dict, value: float) -> dict:
    b = dict(b)
    b["old_log_probs"] = torch.where(b["head_relevance"], b["old_log_probs"], value)
    return b


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("where", ["masked", "absent", "irrelevant_old", "all"])
def test_garbage_changes_nothing(config_name, where):
    config = CONFIGS[config_name]
    layout = layout_of(SIZES)
    clean = _clean(per_head_adv=config.surrogate == "per_head")
    present = _present(clean)
    base = _run(clean, layout, config)
    assert math.isfinite(base[0].loss.item()) and base[0].metrics.to_dict()["all_finite"] == 1.0
    for value in POISONS:
        b = clean
        if where in ("masked", "all"):
            b = _poison_masked(b, value)
        if where in ("absent", "all"):
            b = _poison_absent(b, value)
        if where in ("irrelevant_old", "all"):
            b = _poison_irrelevant_old(b, value)
        assert not torch.equal(b["logits"], clean["logits"]) or not torch.equal(
            b["old_log_probs"], clean["old_log_probs"]
        )
        _assert_same(base, _run(b, layout, config), present)


@pytest.mark.parametrize("key", ["logits", "old_log_probs", "advantages", "values", "returns", "old_values"])
def test_each_absent_input_alone(key):
    """One input at a time, so a leak through any single one is named."""
    config = CONFIGS["per_head_everything"]
    layout = layout_of(SIZES)
    clean = _clean(per_head_adv=True)
    base = _run(clean, layout, config)
    _assert_same(base, _run(_poison_absent(clean, float("nan"), keys=(key,)), layout, config), _present(clean))


def test_absent_steps_and_masked_actions_get_exactly_zero_gradient():
    config = CONFIGS["per_head_everything"]
    layout = layout_of(SIZES)
    clean = _clean(per_head_adv=True)
    b = _poison_masked(_poison_absent(clean, float("nan")), float("inf"))
    _, (gz, gv), (lz, lv) = _run(b, layout, config)
    absent = ~_present(clean)
    for g in (gz, lz):
        assert torch.isfinite(g).all()
        assert (g[absent] == 0).all()
        assert (g[~clean["action_masks"]] == 0).all()
        assert (g[~absent] != 0).any()
    for g in (gv, lv):
        assert (g[absent] == 0).all() and (g[~absent] != 0).any()


def test_value_weights_decide_value_presence():
    """With separate value_weights, value inputs are read where value_weights > 0, whatever the policy weights."""
    config = CONFIGS["joint"]
    layout = layout_of(SIZES)
    clean = _clean()
    vw = (torch.arange(math.prod(SHAPE)).reshape(SHAPE) % 3 != 0).float()
    clean["value_weights"] = vw
    base = _run(clean, layout, config)
    b = dict(clean)
    for k in ("values", "returns", "old_values"):
        b[k] = torch.where(vw > 0, clean[k], float("nan"))
    _assert_same(base, _run(b, layout, config), _present(clean))
    _, (_, gv), _ = _run(b, layout, config)
    assert (gv[vw == 0] == 0).all()
    # and a policy-absent step with a value weight is read: its NaN value reaches the value loss
    b = dict(clean)
    hit = (vw > 0) & ~_present(clean)
    assert hit.any()
    b["values"] = torch.where(hit, float("nan"), clean["values"])
    assert math.isnan(_run(b, layout, config)[0].value_loss.item())


def test_irrelevant_heads_get_no_gradient_from_the_loss():
    """c_ih = 0: the loss's gradient on that head's logits at that step is exactly 0 (present steps too)."""
    config = CONFIGS["per_head_everything"]
    layout = layout_of(SIZES)
    clean = _clean(per_head_adv=True)
    _, _, (lz, _) = _run(clean, layout, config)
    rel = clean["head_relevance"] & _present(clean).unsqueeze(-1)
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        g = lz[..., off : off + a]
        assert (g[~rel[..., h]] == 0).all(), f"head {h}"


def test_nonfinite_logits_of_an_irrelevant_head():
    """A NaN logit at a valid position of an irrelevant head on a present step: the loss and every metric but the
    finiteness gate (nonfinite, all_finite) are unchanged, and so is every other row's and head's gradient.
    (That row's own gradient is NaN in the reference: see the README's note on irrelevant heads.)"""
    config = CONFIGS["joint"]
    layout = layout_of(SIZES)
    clean = _clean()
    rel, present = clean["head_relevance"], _present(clean)
    h = 2
    off, a = layout.offsets[h], layout.sizes[h]
    spots = (~rel[..., h] & present).nonzero()
    assert len(spots)
    i, j = spots[0].tolist()
    col = off + int(clean["action_masks"][i, j, off : off + a].nonzero()[0])
    b = dict(clean)
    b["logits"] = clean["logits"].clone()
    b["logits"][i, j, col] = float("nan")
    base, poisoned = _run(clean, layout, config), _run(b, layout, config)
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        assert torch.equal(getattr(base[0], k), getattr(poisoned[0], k)), k
    mb, mp = base[0].metrics.to_dict(), poisoned[0].metrics.to_dict()
    assert mp[f"head_h{h}_nonfinite"] == mb[f"head_h{h}_nonfinite"] + 1 and mp["all_finite"] == 0.0
    for k in mb:
        if k not in (f"head_h{h}_nonfinite", "all_finite"):
            assert mb[k] == mp[k] or (math.isnan(mb[k]) and math.isnan(mp[k])), k
    other = torch.ones_like(clean["logits"], dtype=torch.bool)
    other[i, j, off : off + a] = False
    assert torch.equal(base[2][0][other], poisoned[2][0][other])
    assert torch.equal(base[1][0][other], poisoned[1][0][other])

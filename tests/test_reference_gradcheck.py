"""docs/semantics.md section 7: the reference, in float64, passes torch.autograd.gradcheck (logits and values).

The outputs checked are the loss and both differentiable per-step outputs (log_probs, entropy). The loss has
kinks (the clip and clamps, the probability floor's under/over split, max of the value branches); every case
is built so that no input sits within ``MARGIN`` of one, which the test asserts before calling gradcheck.
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

MARGIN = 1e-3  # gradcheck perturbs by 1e-6: far enough from every kink
SIZES = [3, 1, 4]


def _kink_distance(batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig, ell: torch.Tensor) -> float:
    """The smallest distance of any step from a kink of the loss (float64, from the formulas of docs/semantics.md)."""
    cfg = config.resolve(layout)
    w = batch["weights"].double()
    present = w > 0
    rel = batch["head_relevance"].bool() & present.unsqueeze(-1)
    old = batch["old_log_probs"].double()
    dists = []
    raw = torch.where(rel, ell - old, 0.0)
    dists.append((raw.abs() - cfg.log_ratio_clamp).abs()[rel])
    lr = torch.where(rel, raw.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp), 0.0)
    bounds = torch.tensor([math.log(1 - cfg.eps_low), math.log(1 + cfg.eps_high)], dtype=torch.float64)
    if cfg.per_head:
        dists.append((lr[rel].unsqueeze(-1) - bounds).abs().flatten())
    L = lr.sum(-1)
    if math.isfinite(cfg.joint_log_ratio_clamp):
        dists.append((L.abs() - cfg.joint_log_ratio_clamp).abs()[present])
        L = L.clamp(-cfg.joint_log_ratio_clamp, cfg.joint_log_ratio_clamp)
    if not cfg.per_head:
        dists.append((L[present].unsqueeze(-1) - bounds).abs().flatten())
    # the probability floor's split U/O: p against f (relative)
    masks = batch["action_masks"]
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        if cfg.prob_floor[h] <= 0:
            continue
        valid = masks[:, off : off + a]
        p = torch.softmax(batch["logits"][:, off : off + a].double().masked_fill(~valid, cfg.mask_fill), -1)
        f = torch.clamp(0.99 / valid.sum(-1, keepdim=True).clamp(min=1), max=cfg.prob_floor[h])
        dists.append(((p - f).abs() / f)[valid & present.unsqueeze(-1)])
    if "old_values" in batch and math.isfinite(cfg.value_clip):
        v, vo, R = batch["values"].double(), batch["old_values"].double(), batch["returns"].double()
        dv = v - vo
        dists.append((dv.abs() - cfg.value_clip).abs())
        vc = vo + dv.clamp(-cfg.value_clip, cfg.value_clip)
        binding = dv.abs() > cfg.value_clip
        dists.append(((v - R) ** 2 - (vc - R) ** 2).abs()[binding])
    return float(torch.cat([d.flatten() for d in dists]).min())


def _case(config: ek.PPOLossConfig, seed: int, *, garbage: bool = False):
    """A float64 batch far from every kink: try seeds from ``seed`` until one is."""
    layout = layout_of(SIZES)
    for s in range(seed, seed + 200):
        batch = random_batch(
            SIZES,
            (5,),
            s,
            dtype=torch.float64,
            mask_density=0.85,
            weights="float",
            old_noise=0.0,
            per_head_adv=config.surrogate == "per_head",
            values=True,
            old_values=True,
            logit_scale=1.5,
            garbage=garbage,
        )
        # old log-probs at chosen offsets from the current ones: inside the clip range, outside it, beyond the clamp
        g = torch.Generator().manual_seed(s)
        offsets = torch.tensor([0.0, 0.05, -0.08, 0.4, -0.5, 3.0, -3.0])[torch.randint(0, 7, (5, 3), generator=g)]
        batch["old_log_probs"] = (batch["old_log_probs"].nan_to_num(0.0) + offsets).to(torch.float64)
        z = batch["logits"].clone().requires_grad_(True)
        b = {k: v for k, v in batch.items() if k != "logits"}
        out = ek.ppo_loss(z, **b, layout=layout, config=config, backend="reference", validate=False)
        if _kink_distance(batch, layout, config, out.log_probs.detach().double()) <= MARGIN:
            continue
        # not degenerate: the policy and the entropy terms both reach the logits
        g_pl, g_el = (torch.autograd.grad(t, z, retain_graph=True)[0] for t in (out.policy_loss, out.entropy_loss))
        if (g_pl != 0).sum() >= 4 and (g_el != 0).sum() >= 4:
            return layout, batch
    raise AssertionError("no seed gives a batch away from the kinks")


CONFIGS = {
    "joint": ek.PPOLossConfig(entropy_coef=0.1),
    "per_head": ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.1),
    "joint_floor_valueclip_norm": ek.PPOLossConfig(
        entropy_coef=0.2,
        normalize_entropy=True,
        value_clip=0.3,
        prob_floor=[0.1, None, 0.2],
        clip_eps_high=0.28,
        normalize_advantages=True,
    ),
    "per_head_floor_valueclip": ek.PPOLossConfig(
        surrogate="per_head",
        entropy_coef=0.05,
        prob_floor={"h0": 0.15},
        entropy_coef_per_head=[1.0, 0.0, 2.0],
        value_clip=0.2,
        normalize_advantages=True,
        normalize_entropy=True,
    ),
    "tight_clamps": ek.PPOLossConfig(log_ratio_clamp=1.0, joint_log_ratio_clamp=1.5, entropy_coef=0.1, value_coef=1.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck_loss_and_per_step_outputs(name):
    config = CONFIGS[name]
    layout, batch = _case(config, seed=10)
    logits = batch.pop("logits").clone().requires_grad_(True)
    values = batch.pop("values").clone().requires_grad_(True)

    def f(z, v):
        out = ek.ppo_loss(z, values=v, **batch, layout=layout, config=config, backend="reference", validate=False)
        return out.loss, out.log_probs, out.entropy

    assert torch.autograd.gradcheck(f, (logits, values), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the case is not degenerate: every part of the loss has a non-zero gradient somewhere
    out = ek.ppo_loss(logits, values=values, **batch, layout=layout, config=config, backend="reference", validate=False)
    gz, gv = torch.autograd.grad(out.loss, (logits, values))
    assert gz.abs().sum() > 0 and gv.abs().sum() > 0


def test_gradcheck_with_garbage_where_nothing_is_read():
    """NaN/Inf at absent steps and masked positions: gradcheck still passes (their gradients are exactly 0)."""
    config = CONFIGS["per_head_floor_valueclip"]
    layout, batch = _case(config, seed=40, garbage=True)
    assert not torch.isfinite(batch["logits"]).all()
    logits = batch.pop("logits").clone().requires_grad_(True)
    values = batch.pop("values").clone().requires_grad_(True)
    finite = torch.isfinite(logits.detach())

    def f(z, v):
        # gradcheck perturbs every input, the NaN ones too; only finite positions are perturbed here
        z = torch.where(finite, z, logits.detach())
        out = ek.ppo_loss(z, values=v, **batch, layout=layout, config=config, backend="reference", validate=False)
        return out.loss, out.entropy

    assert torch.autograd.gradcheck(f, (logits, values), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_gradient():
    """gradcheck as used here fails on a function whose backward is wrong (not a tautology)."""
    config = CONFIGS["joint"]
    layout, batch = _case(config, seed=10)
    logits = batch.pop("logits").clone().requires_grad_(True)
    for k in ("values", "returns", "old_values"):
        batch.pop(k)

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def f(z):
        return ek.ppo_loss(
            Twice.apply(z), **batch, layout=layout, config=config, backend="reference", validate=False
        ).loss

    assert not torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)

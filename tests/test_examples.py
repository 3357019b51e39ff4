"""examples/esper_update.py: it runs, logs esper's metric names, stops early on KL, and its ppo_loss config
reproduces esper-lite's compute_losses / compute_ratio_metrics.

``_esper_losses`` restates esper-lite's loss math in this file's own code (from ``simic/agent/ppo_update.py``
and ``tamiyo/policy/action_masks.py``: MaskedCategorical with invalid logits at -1e4 and entropy normalised by
log(n_valid); per-head clipped surrogate over causally relevant, unforced steps with normalisers clamped at
1; value loss with forced steps at weight 0.2; per-head entropy coefficients; the entropy-floor penalty,
skipping a head with no step as esper intends (its compute_losses path adds a constant coef * floor**2 for
such a head instead, see docs/switching.md); log-ratios clamped at 20 and the joint at 30). Comparisons are
at float32 tolerance (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import esper_kernels as ek

pytestmark = pytest.mark.smoke

RTOL, ATOL = 1e-5, 1e-6
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "esper_update.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("esper_update_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


#: the largest |difference| seen per quantity (never asserted on)
MEASURED: dict[str, float] = {}


def _close(name, got, want):
    got, want = torch.as_tensor(got).detach(), torch.as_tensor(want).detach()
    key = name.split(" ")[0] if name.startswith(("log_probs ", "entropy ")) else name
    key = "d loss / d logits" if key.startswith("d loss") and not key.endswith("values") else key
    MEASURED[key] = max(MEASURED.get(key, 0.0), (got.double() - want.double()).abs().max().item())
    torch.testing.assert_close(
        torch.as_tensor(got).double(),
        torch.as_tensor(want).double(),
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{name}: {m}",
    )


def _masked_categorical(z: torch.Tensor, m: torch.Tensor, a: torch.Tensor):
    """esper's MaskedCategorical: logits at -1e4 where invalid; log-prob of ``a``; H / log(n), 0 for n == 1."""
    logp = torch.log_softmax(z.masked_fill(~m, -1e4), -1)
    p = logp.exp()
    raw = -(p * logp * m).sum(-1)
    n = m.sum(-1).clamp(min=1)
    ent = torch.where(n == 1, torch.zeros_like(raw), raw / torch.where(n > 1, n.float().log(), torch.ones_like(raw)))
    return logp.gather(-1, a.unsqueeze(-1)).squeeze(-1), ent


def _esper_losses(ex, logits, masks, data, values, s):
    """esper-lite's compute_ratio_metrics + compute_losses on the valid steps (restated, see module docstring)."""
    valid = data["valid_mask"]
    forced = data["forced_actions"][valid]
    actor_w = (~forced).float()
    causal = ex.causal_masks(data["effective_op_actions"])[valid].float()
    adv = data["advantages"][valid]
    lp, ent = {}, {}
    for name in ex.HEAD_NAMES:
        lp[name], ent[name] = _masked_categorical(logits[name][valid], masks[name][valid], data["actions"][name][valid])
    log_ratio = {n: torch.clamp(lp[n] - data["old_log_probs"][n][valid], -20.0, 20.0) for n in ex.HEAD_NAMES}
    policy = torch.zeros(())
    entropy_loss = torch.zeros(())
    for h, n in enumerate(ex.HEAD_NAMES):
        r = torch.exp(log_ratio[n])
        a = adv * causal[:, h]
        surr = torch.min(r * a, torch.clamp(r, 1 - s.clip_ratio, 1 + s.clip_ratio) * a)
        m = causal[:, h] * actor_w
        policy = policy - (surr * m).sum() / m.sum().clamp(min=1)
        entropy_loss = entropy_loss - s.entropy_coef_per_head[n] * (ent[n] * m).sum() / m.sum().clamp(min=1)
    vw = torch.where(forced, 0.2, 1.0)
    value_loss = 0.5 * ((values[valid] - data["returns"][valid]) ** 2 * vw).sum() / vw.sum().clamp(min=1)
    penalty = torch.zeros(())
    for h, n in enumerate(ex.HEAD_NAMES):
        m = causal[:, h] * actor_w
        if m.sum() >= 1:  # esper skips heads with no available step
            mean = (ent[n] * m).sum() / m.sum().clamp(min=1)
            penalty = penalty + s.entropy_floor_penalty_coef[n] * torch.clamp(s.entropy_floor[n] - mean, min=0) ** 2
    total = policy + s.value_coef * value_loss + s.entropy_coef * entropy_loss + penalty
    # esper's coverage-weighted approx_kl (its masks: causal over every valid step)
    T = float(valid.sum())
    kl_sum = w_sum = torch.zeros(())
    for h, n in enumerate(ex.HEAD_NAMES):
        k3 = torch.exp(log_ratio[n]) - 1 - log_ratio[n]
        nv = causal[:, h].sum().clamp(min=1)
        kl_sum = kl_sum + nv / T * (k3 * causal[:, h]).sum() / nv
        w_sum = w_sum + nv / T
    joint = torch.exp(torch.clamp(torch.stack([log_ratio[n] for n in ex.HEAD_NAMES]).sum(0), -30.0, 30.0))
    return dict(
        policy=policy,
        value=value_loss,
        entropy=entropy_loss,
        penalty=penalty,
        total=total,
        approx_kl=kl_sum / w_sum.clamp(min=1e-8),
        joint_ratio=joint,
        entropy_per_head=ent,
        log_probs=lp,
    )


def test_esper_update_runs_and_logs_esper_names(ex, capsys):
    result = ex.main(["--envs", "6", "--steps", "12", "--epochs", "2", "--backend", "reference", "--target-kl", "1.0"])
    assert "esper update:" in capsys.readouterr().out
    assert not result["early_stopped"] and len(result["epochs"]) == 2
    for e in result["epochs"]:
        for key in (
            "policy_loss",
            "value_loss",
            "entropy",
            "approx_kl",
            "clip_fraction",
            "clip_fraction_positive",
            "clip_fraction_negative",
            "ratio_mean",
            "ratio_max",
            "ratio_min",
            "ratio_std",
            "log_prob_min",
            "log_prob_max",
            "joint_ratio_max",
            "entropy_floor_penalty",
            "pre_clip_grad_norm",
        ):
            assert math.isfinite(e[key]), key
        assert set(e["head_grad_norms"]) == set(ex.HEAD_NAMES) | {"value"}
        assert all(math.isfinite(v) and v > 0 for v in e["head_grad_norms"].values())
        assert set(e["head_entropies"]) == set(ex.HEAD_NAMES) and not any(e["head_nan_detected"].values())
        assert set(e["legacy"]) >= {"ratio_std", "clip_fraction", "head_op_entropy"}
    first, second = result["epochs"]
    # epoch 0 evaluates the rollout policy: every ratio is 1 (to rounding); epoch 1 sees one optimizer step
    assert abs(first["ratio_max"] - 1.0) < 1e-5 and first["clip_fraction"] == 0.0
    assert second["approx_kl"] > 1e-5 and second["ratio_std"] > 1e-3


def test_esper_update_kl_early_stop(ex):
    torch.manual_seed(1)
    net = ex.TamiyoStandIn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    data = ex.collect_rollout(net, 6, 12, seed=1)
    result = ex.ppo_update(net, opt, data, ex.UpdateSettings(recurrent_n_epochs=5, target_kl=1e-6, backend="reference"))
    # epoch 0 has KL 0 and steps; epoch 1 sees KL > 1.5e-6 and stops before its backward
    assert result["early_stopped"] and result["early_stop_epoch"] == 1
    assert len(result["epochs"]) == 2 and "head_grad_norms" not in result["epochs"][1]
    assert opt.state_dict()["state"][0]["step"].item() == 1.0


@pytest.mark.parametrize("clip_value", [False, True])
def test_esper_config_reproduces_esper_losses(ex, clip_value):
    torch.manual_seed(2)
    net = ex.TamiyoStandIn()
    data = ex.collect_rollout(net, 10, 20, seed=2)
    with torch.no_grad():  # move the policy off the rollout one so the ratios, KL and clipping are not trivial
        for p in net.heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    s = ex.UpdateSettings(
        clip_value=clip_value, value_clip=0.2, entropy_floor={h: 0.9 for h in ex.HEAD_NAMES}
    )  # floors high enough to bind
    ev = net.evaluate_actions(data["states"], data["actions"], data["masks"])
    leaves = {n: z.detach().clone().requires_grad_(True) for n, z in ev.logits.items()}
    leaves_e = {n: z.detach().clone().requires_grad_(True) for n, z in ev.logits.items()}
    values, values_e = (ev.values.detach().clone().requires_grad_(True) for _ in range(2))

    valid, forced = data["valid_mask"], data["forced_actions"]
    relevance = ex.causal_masks(data["effective_op_actions"]) & ~forced.unsqueeze(-1)
    out = ek.ppo_loss(
        leaves,
        ev.masks,
        data["actions"],
        data["old_log_probs"],
        data["advantages"],
        layout=ex.LAYOUT,
        head_relevance=relevance,
        weights=valid,
        values=values,
        returns=data["returns"],
        old_values=data["values"] if clip_value else None,
        value_weights=torch.where(valid, torch.where(forced, 0.2, 1.0), 0.0),
        config=ex.esper_config(s),
        backend="reference",
    )
    penalty = ex.entropy_floor_penalty(
        out.entropy, relevance & valid.unsqueeze(-1), s.entropy_floor, s.entropy_floor_penalty_coef
    )
    if clip_value:  # esper's clipped value loss: max of the two squared errors, over every valid step
        vw = torch.where(forced[valid], 0.2, 1.0)
        v, vo, R = values_e[valid], data["values"][valid], data["returns"][valid]
        clipped = vo + torch.clamp(v - vo, -0.2, 0.2)
        per_step = torch.max((v - R) ** 2, (clipped - R) ** 2)
        esper_value = 0.5 * (per_step * vw).sum() / vw.sum().clamp(min=1)
    e = _esper_losses(ex, leaves_e, ev.masks, data, values_e, s)
    if clip_value:
        e["total"] = e["total"] - s.value_coef * e["value"] + s.value_coef * esper_value
        e["value"] = esper_value
    m = out.metrics.to_dict()

    _close("policy_loss", out.policy_loss, e["policy"])
    _close("value_loss", out.value_loss, e["value"])
    _close("entropy_loss", out.entropy_loss, e["entropy"])
    _close("entropy_floor_penalty", penalty, e["penalty"])
    assert e["penalty"].item() > 0.0, "the floors should bind"
    _close("total loss", out.loss + penalty, e["total"])
    for h, n in enumerate(ex.HEAD_NAMES):
        _close(f"log_probs {n}", out.log_probs[..., h][valid], e["log_probs"][n])
        _close(f"entropy {n}", out.entropy[..., h][valid], e["entropy_per_head"][n])
    # the all-head joint ratio over every valid step (esper's) from the same outputs
    legacy = ex.legacy_ratio_metrics(out, data, s.clip_ratio)
    _close("legacy ratio_std", legacy["ratio_std"], e["joint_ratio"].std())
    _close("legacy ratio_max", legacy["ratio_max"], e["joint_ratio"].max())
    clipped = ((e["joint_ratio"] - 1).abs() > s.clip_ratio).float().mean()
    _close("legacy clip_fraction", legacy["clip_fraction"], clipped)
    assert 0.0 < m["clip_fraction"] < 1.0
    # gradients of the whole loss, floor penalty included
    grads = torch.autograd.grad(out.loss + penalty, [*leaves.values(), values])
    want = torch.autograd.grad(e["total"], [*leaves_e.values(), values_e])
    for name, g, w in zip([*leaves, "values"], grads, want):
        _close(f"d loss / d {name}", g, w)


def test_esper_approx_kl_matches_without_forced_steps(ex):
    """With no forced step (and every head relevant somewhere), esper's coverage-weighted approx_kl over its
    causal masks is ppo_loss's approx_kl; forced steps are where the two differ (docs/switching.md)."""
    torch.manual_seed(3)
    net = ex.TamiyoStandIn()
    data = ex.collect_rollout(net, 10, 20, seed=3)
    data["forced_actions"] = torch.zeros_like(data["forced_actions"])
    with torch.no_grad():
        for p in net.heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ev = net.evaluate_actions(data["states"], data["actions"], data["masks"])
    s = ex.UpdateSettings()
    causal = ex.causal_masks(data["effective_op_actions"])
    assert bool(causal[data["valid_mask"]].any(0).all()), "every head relevant on some step"
    out = ek.ppo_loss(
        ev.logits,
        ev.masks,
        data["actions"],
        data["old_log_probs"],
        data["advantages"],
        layout=ex.LAYOUT,
        head_relevance=causal,
        weights=data["valid_mask"],
        config=ex.esper_config(s),
        backend="reference",
    )
    e = _esper_losses(ex, ev.logits, ev.masks, data, ev.values, s)
    _close("approx_kl", out.metrics.to_dict()["approx_kl"], e["approx_kl"])

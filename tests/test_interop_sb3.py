"""Interop: ppo_loss against the real sb3-contrib MaskablePPO (pinned in the Makefile's DEPS).

sb3-contrib's own ``MaskableCategoricalDistribution`` and ``MaskableMultiCategoricalDistribution`` give the
per-step log-probs and entropies. ``MaskablePPO.train`` cannot be called on a given batch of logits (it pulls
minibatches from its rollout buffer through its policy network), so the dozen lines of its loss are
reproduced below from sb3-contrib 2.9.2 (``sb3_contrib/ppo_mask/ppo_mask.py``, ``MaskablePPO.train``), and
``test_reproduced_lines_are_in_the_installed_train`` fails if the installed ``train`` no longer contains them.

The config is the one docs/switching.md gives for sb3-contrib. Everything is compared at float32 tolerance
(rtol 1e-5, atol 1e-6): losses, per-step log-probs and entropies (per head and summed), the clip fraction,
the KL, and the gradients of each loss term with respect to the logits and the values.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import esper_kernels as ek

sb3_contrib = pytest.importorskip(
    "sb3_contrib", reason="sb3-contrib is pinned in the Makefile's DEPS: rm .venv/.deps && make test"
)
from sb3_contrib import MaskablePPO  # noqa: E402
from sb3_contrib.common.maskable.distributions import (  # noqa: E402
    MaskableCategoricalDistribution,
    MaskableMultiCategoricalDistribution,
)

pytestmark = pytest.mark.interop

RTOL, ATOL = 1e-5, 1e-6
CLIP_RANGE, ENT_COEF, VF_COEF = 0.2, 0.05, 0.5

#: the loss lines of MaskablePPO.train (sb3-contrib 2.9.2) that _sb3_train_lines reproduces, verbatim
TRAIN_LINES = (
    "advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)",
    "ratio = th.exp(log_prob - rollout_data.old_log_prob)",
    "policy_loss_1 = advantages * ratio",
    "policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)",
    "policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()",
    "clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()",
    "value_loss = F.mse_loss(rollout_data.returns, values_pred)",
    "entropy_loss = -th.mean(entropy)",
    "loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss",
    "log_ratio = log_prob - rollout_data.old_log_prob",
    "approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()",
)

#: the largest |difference| seen per quantity (read by whoever wants the numbers; never asserted on)
MEASURED: dict[str, float] = {}


def sb3_config() -> ek.PPOLossConfig:
    """docs/switching.md, sb3-contrib section: MaskablePPO(normalize_advantage=True, clip_range_vf=None)."""
    return ek.PPOLossConfig(
        clip_eps=CLIP_RANGE,
        surrogate="joint",
        normalize_advantages=True,
        advantage_std="unbiased",
        advantage_eps=1e-8,
        advantage_eps_add=True,
        entropy_coef=ENT_COEF,
        value_coef=2 * VF_COEF,  # sb3's value loss is the MSE without the 1/2
        mask_fill=-1e8,
        log_ratio_clamp=80.0,
        joint_log_ratio_clamp=None,
    )  # sb3 clamps no log-ratio


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    if got.numel():
        MEASURED[name] = max(MEASURED.get(name, 0.0), (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def make_batch(sizes: list[int], n: int, seed: int, logit_scale: float):
    """A masked batch: at least one valid action per head and row, some rows with exactly one, actions
    sampled from the masked policy, per-head old log-probs near the current ones (so ratios straddle the
    clip range), advantages with a non-zero mean, values and returns."""
    g = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    logits = torch.randn(n, S, generator=g) * logit_scale
    masks = torch.rand(n, S, generator=g) < 0.6
    actions, old = [], []
    off = 0
    for a in sizes:
        m = masks[:, off : off + a]
        m[torch.arange(n), torch.randint(0, a, (n,), generator=g)] = True
        single = torch.rand(n, generator=g) < 0.1  # mask collapse: one valid action
        keep = torch.randint(0, a, (n,), generator=g)
        m[single] = False
        m[single, keep[single]] = True
        z = logits[:, off : off + a].masked_fill(~m, float("-inf"))
        act = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
        lp = torch.log_softmax(z, -1).gather(-1, act[:, None]).squeeze(-1)
        actions.append(act)
        old.append(lp + 0.2 * torch.randn(n, generator=g))
        off += a
    return dict(
        logits=logits,
        masks=masks,
        actions=torch.stack(actions, -1),
        old_log_probs=torch.stack(old, -1),
        advantages=0.3 + 1.5 * torch.randn(n, generator=g),
        values=torch.randn(n, generator=g),
        returns=torch.randn(n, generator=g) * 2.0,
    )


def _sb3_distribution(sizes: list[int], logits: torch.Tensor, masks: torch.Tensor):
    if len(sizes) == 1:
        dist = MaskableCategoricalDistribution(sizes[0]).proba_distribution(logits)
    else:
        dist = MaskableMultiCategoricalDistribution(sizes).proba_distribution(logits)
    dist.apply_masking(masks)
    return dist


def _sb3_train_lines(log_prob, old_log_prob, advantages, values, returns, entropy):
    """The loss lines of MaskablePPO.train (sb3-contrib 2.9.2) on one minibatch: normalize_advantage=True,
    clip_range_vf=None (values_pred = values). Names as there; ``th`` is torch."""
    th = torch
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    ratio = th.exp(log_prob - old_log_prob)
    policy_loss_1 = advantages * ratio
    policy_loss_2 = advantages * th.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)
    policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()
    clip_fraction = th.mean((th.abs(ratio - 1) > CLIP_RANGE).float()).item()
    values_pred = values
    value_loss = F.mse_loss(returns, values_pred)
    entropy_loss = -th.mean(entropy)
    loss = policy_loss + ENT_COEF * entropy_loss + VF_COEF * value_loss
    with th.no_grad():
        log_ratio = log_prob - old_log_prob
        approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio)
    return dict(
        policy_loss=policy_loss,
        value_loss=value_loss,
        entropy_loss=entropy_loss,
        loss=loss,
        clip_fraction=clip_fraction,
        approx_kl=approx_kl_div,
    )


def _backends() -> list[str]:
    return [b for b in ("reference", "cpu") if ek.available_backends()[b].available]


def test_reproduced_lines_are_in_the_installed_train():
    source = inspect.getsource(MaskablePPO.train)
    missing = [line for line in TRAIN_LINES if line not in source]
    assert not missing, f"sb3-contrib {sb3_contrib.__version__}: MaskablePPO.train changed; update the test: {missing}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("sizes", [[7], [6, 3, 13, 4, 5]], ids=["single_head", "multi_head"])
@pytest.mark.parametrize("logit_scale", [1.0, 8.0])
def test_maskable_ppo_loss_log_probs_entropy_kl_and_gradients(sizes, logit_scale, backend):
    b = make_batch(sizes, n=301, seed=len(sizes) * 10 + int(logit_scale), logit_scale=logit_scale)
    H = len(sizes)
    names = [f"h{i}" for i in range(H)]
    layout = ek.HeadLayout(dict(zip(names, sizes)))

    # sb3-contrib: its distributions, then the train() lines; old log-prob = the joint (sum over heads) it stores
    z_sb3 = b["logits"].clone().requires_grad_(True)
    v_sb3 = b["values"].clone().requires_grad_(True)
    dist = _sb3_distribution(sizes, z_sb3, b["masks"])
    act = b["actions"][:, 0] if H == 1 else b["actions"]
    log_prob, entropy = dist.log_prob(act), dist.entropy()
    heads = [dist.distribution] if H == 1 else dist.distributions
    head_lp = torch.stack([d.log_prob(b["actions"][:, h]) for h, d in enumerate(heads)], -1)
    head_ent = torch.stack([d.entropy() for d in heads], -1)
    sb3 = _sb3_train_lines(log_prob, b["old_log_probs"].sum(-1), b["advantages"], v_sb3, b["returns"], entropy)

    # ppo_loss with the documented config
    z = b["logits"].clone().requires_grad_(True)
    v = b["values"].clone().requires_grad_(True)
    out = ek.ppo_loss(
        z,
        b["masks"],
        b["actions"],
        b["old_log_probs"],
        b["advantages"],
        layout=layout,
        values=v,
        returns=b["returns"],
        config=sb3_config(),
        backend=backend,
    )
    m = out.metrics.to_dict()

    _close("policy_loss", out.policy_loss, sb3["policy_loss"])
    _close("value_loss (x2)", 2 * out.value_loss, sb3["value_loss"])
    _close("entropy_loss", out.entropy_loss, sb3["entropy_loss"])
    _close("loss", out.loss, sb3["loss"])
    _close("log_probs per head", out.log_probs, head_lp)
    _close("log_prob joint", out.log_probs.sum(-1), log_prob)
    _close("entropy per head", out.entropy, head_ent)
    _close("entropy joint", out.entropy.sum(-1), entropy)
    _close("clip_fraction", torch.tensor(m["clip_fraction"]), torch.tensor(sb3["clip_fraction"]))
    _close("approx_kl", torch.tensor(m["joint_kl_k3"]), sb3["approx_kl"])
    assert 0.0 < sb3["clip_fraction"] < 1.0, "the batch should clip some steps and not others"

    # gradients of each term and of the total, with respect to the logits and the values
    terms = [
        ("policy_loss", out.policy_loss, sb3["policy_loss"]),
        ("entropy_loss", out.entropy_loss, sb3["entropy_loss"]),
        ("value_loss", 2 * out.value_loss, sb3["value_loss"]),
        ("loss", out.loss, sb3["loss"]),
    ]
    for name, ours, theirs in terms:
        gz, gv = torch.autograd.grad(ours, (z, v), retain_graph=True, allow_unused=True)
        tz, tv = torch.autograd.grad(theirs, (z_sb3, v_sb3), retain_graph=True, allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz
        gv = torch.zeros_like(v) if gv is None else gv
        tz = torch.zeros_like(z) if tz is None else tz
        tv = torch.zeros_like(v) if tv is None else tv
        _close(f"d {name} / d logits", gz, tz)
        _close(f"d {name} / d values", gv, tv)


def test_joint_old_log_prob_in_head_zero():
    """docs/switching.md: with only sb3's stored joint old log-prob, putting it in head 0 and zeros elsewhere
    gives the same joint ratio, loss, clip fraction, KL and gradients (no per-head log-ratio is clamped)."""
    sizes = [6, 3, 13, 4, 5]
    b = make_batch(sizes, n=301, seed=99, logit_scale=2.0)
    layout = ek.HeadLayout({f"h{i}": a for i, a in enumerate(sizes)})
    joint_old = b["old_log_probs"].sum(-1)
    old = torch.zeros_like(b["old_log_probs"])
    old[:, 0] = joint_old

    z_sb3 = b["logits"].clone().requires_grad_(True)
    dist = _sb3_distribution(sizes, z_sb3, b["masks"])
    sb3 = _sb3_train_lines(
        dist.log_prob(b["actions"]), joint_old, b["advantages"], b["values"], b["returns"], dist.entropy()
    )
    z = b["logits"].clone().requires_grad_(True)
    out = ek.ppo_loss(
        z,
        b["masks"],
        b["actions"],
        old,
        b["advantages"],
        layout=layout,
        values=b["values"],
        returns=b["returns"],
        config=sb3_config(),
        backend="reference",
    )
    m = out.metrics.to_dict()
    _close("joint old: policy_loss", out.policy_loss, sb3["policy_loss"])
    _close("joint old: loss", out.loss, sb3["loss"])
    _close("joint old: clip_fraction", torch.tensor(m["clip_fraction"]), torch.tensor(sb3["clip_fraction"]))
    _close("joint old: approx_kl", torch.tensor(m["joint_kl_k3"]), sb3["approx_kl"])
    grad, want = torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(sb3["loss"], z_sb3)[0]
    _close("joint old: d loss / d logits", grad, want)

"""Interop: ppo_loss against the loss of CleanRL's ``ppo.py`` with its invalid-action masking.

CleanRL is a set of single-file scripts, not a library, so there is nothing to import: ``_cleanrl_minibatch``
restates, in this file's own code, what one minibatch of CleanRL's ``ppo.py`` computes with its defaults
(``norm_adv=True``, ``clip_vloss=True``, ``clip_coef=0.2``, ``ent_coef=0.01``, ``vf_coef=0.5``), on the
masked categorical heads of its MultiDiscrete invalid-action-masking scripts (invalid logits replaced by
-1e8, the entropy summed over valid actions only, the log-prob and entropy summed over heads). The config is
the one docs/switching.md gives for CleanRL; everything is compared at float32 tolerance (rtol 1e-5,
atol 1e-6), gradients included.
"""

from __future__ import annotations

import pytest
import torch

import esper_kernels as ek

pytestmark = pytest.mark.interop

RTOL, ATOL = 1e-5, 1e-6
CLIP_COEF, ENT_COEF, VF_COEF = 0.2, 0.01, 0.5

#: the largest |difference| seen per quantity (never asserted on)
MEASURED: dict[str, float] = {}


def cleanrl_config() -> ek.PPOLossConfig:
    return ek.PPOLossConfig(
        clip_eps=CLIP_COEF,
        surrogate="joint",
        normalize_advantages=True,
        advantage_std="unbiased",
        advantage_eps=1e-8,
        advantage_eps_add=True,
        entropy_coef=ENT_COEF,
        value_coef=VF_COEF,
        value_clip=CLIP_COEF,  # clip_vloss reuses clip_coef
        mask_fill=-1e8,
        log_ratio_clamp=80.0,
        joint_log_ratio_clamp=None,
    )


def _close(name: str, got, want) -> None:
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    if got.numel():
        MEASURED[name] = max(MEASURED.get(name, 0.0), (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _masked_heads(logits: torch.Tensor, masks: torch.Tensor, sizes: list[int], actions: torch.Tensor):
    """Per head: a Categorical over the logits with invalid ones replaced by -1e8; the entropy sums
    -p log p over valid actions only. Returns per-head log-probs and entropies [N, H]."""
    lps, ents = [], []
    for h, (z, m) in enumerate(zip(torch.split(logits, sizes, 1), torch.split(masks, sizes, 1))):
        dist = torch.distributions.Categorical(logits=torch.where(m, z, torch.tensor(-1e8)))
        lps.append(dist.log_prob(actions[:, h]))
        ents.append(-torch.where(m, dist.logits * dist.probs, torch.tensor(0.0)).sum(-1))
    return torch.stack(lps, -1), torch.stack(ents, -1)


def _cleanrl_minibatch(newlogprob, b_logprobs, b_advantages, newvalue, b_values, b_returns, entropy):
    """One minibatch of CleanRL ppo.py's update, defaults as in the module docstring."""
    logratio = newlogprob - b_logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > CLIP_COEF).float().mean()
    adv = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP_COEF, 1 + CLIP_COEF)).mean()
    v_unclipped = (newvalue - b_returns) ** 2
    v_clipped = (b_values + torch.clamp(newvalue - b_values, -CLIP_COEF, CLIP_COEF) - b_returns) ** 2
    v_loss = 0.5 * torch.max(v_unclipped, v_clipped).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ENT_COEF * entropy_loss + v_loss * VF_COEF
    return dict(
        pg_loss=pg_loss,
        v_loss=v_loss,
        entropy=entropy_loss,
        loss=loss,
        old_approx_kl=old_approx_kl,
        approx_kl=approx_kl,
        clipfrac=clipfrac,
    )


def make_batch(sizes: list[int], n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    logits = 2.0 * torch.randn(n, S, generator=g)
    masks = torch.rand(n, S, generator=g) < 0.6
    actions, old = [], []
    off = 0
    for a in sizes:
        m = masks[:, off : off + a]
        m[torch.arange(n), torch.randint(0, a, (n,), generator=g)] = True
        z = logits[:, off : off + a].masked_fill(~m, float("-inf"))
        act = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
        actions.append(act)
        old.append(torch.log_softmax(z, -1).gather(-1, act[:, None]).squeeze(-1) + 0.2 * torch.randn(n, generator=g))
        off += a
    values = torch.randn(n, generator=g)
    return dict(
        logits=logits,
        masks=masks,
        actions=torch.stack(actions, -1),
        old=torch.stack(old, -1),
        advantages=0.3 + 1.5 * torch.randn(n, generator=g),
        values=values,
        old_values=values + 0.3 * torch.randn(n, generator=g),
        returns=2.0 * torch.randn(n, generator=g),
    )


@pytest.mark.parametrize("sizes", [[5], [6, 3, 13, 4]], ids=["single_head", "multi_head"])
def test_cleanrl_ppo_masked(sizes):
    b = make_batch(sizes, n=256, seed=5 + len(sizes))
    layout = ek.HeadLayout({f"h{i}": a for i, a in enumerate(sizes)})

    z_c = b["logits"].clone().requires_grad_(True)
    v_c = b["values"].clone().requires_grad_(True)
    head_lp, head_ent = _masked_heads(z_c, b["masks"], sizes, b["actions"])
    c = _cleanrl_minibatch(
        head_lp.sum(-1), b["old"].sum(-1), b["advantages"], v_c, b["old_values"], b["returns"], head_ent.sum(-1)
    )

    z = b["logits"].clone().requires_grad_(True)
    v = b["values"].clone().requires_grad_(True)
    out = ek.ppo_loss(
        z,
        b["masks"],
        b["actions"],
        b["old"],
        b["advantages"],
        layout=layout,
        values=v,
        returns=b["returns"],
        old_values=b["old_values"],
        config=cleanrl_config(),
        backend="reference",
    )
    m = out.metrics.to_dict()

    _close("pg_loss", out.policy_loss, c["pg_loss"])
    _close("v_loss", out.value_loss, c["v_loss"])
    _close("entropy", -out.entropy_loss, c["entropy"])
    _close("loss", out.loss, c["loss"])
    _close("log_probs per head", out.log_probs, head_lp)
    _close("entropy per head", out.entropy, head_ent)
    _close("old_approx_kl = joint_kl_k1", m["joint_kl_k1"], c["old_approx_kl"])
    _close("approx_kl = joint_kl_k3", m["joint_kl_k3"], c["approx_kl"])
    _close("clipfrac", m["clip_fraction"], c["clipfrac"])
    assert 0.0 < m["clip_fraction"] < 1.0 and 0.0 < m["value_clip_fraction"] < 1.0
    for name, ours, theirs in [
        ("pg_loss", out.policy_loss, c["pg_loss"]),
        ("v_loss", out.value_loss, c["v_loss"]),
        ("entropy", -out.entropy_loss, c["entropy"]),
        ("loss", out.loss, c["loss"]),
    ]:
        gz, gv = torch.autograd.grad(ours, (z, v), retain_graph=True, allow_unused=True)
        tz, tv = torch.autograd.grad(theirs, (z_c, v_c), retain_graph=True, allow_unused=True)
        zero_z, zero_v = torch.zeros_like(z), torch.zeros_like(v)
        _close(f"d {name} / d logits", zero_z if gz is None else gz, zero_z if tz is None else tz)
        _close(f"d {name} / d values", zero_v if gv is None else gv, zero_v if tv is None else tv)

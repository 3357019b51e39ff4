"""Interop: ppo_loss against the real TorchRL ``ClipPPOLoss`` with ``MaskedCategorical`` actors (pinned in the
Makefile's DEPS), called for real on one head (a ``MaskedCategorical``) and on several (a tensordict
``CompositeDistribution`` of ``MaskedCategorical`` heads).

The actor and critic are parameter-free tensordict modules that pass leaf tensors through, so the gradient
TorchRL's loss sends into the logits and the values can be compared with ppo_loss's. The configs are the ones
docs/switching.md gives for TorchRL; everything is compared at float32 tolerance (rtol 1e-5, atol 1e-6):
each loss term, per-step log-probs and entropies, the clip fraction, the KL (TorchRL's ``kl_approx`` is the
k1 estimator), the ratio statistics, ESS, and the gradients of each term with respect to logits and values.
"""

from __future__ import annotations

import pytest
import torch

import esper_kernels as ek

pytest.importorskip("torchrl", reason="torchrl is pinned in the Makefile's DEPS: rm .venv/.deps && make test")
from tensordict import TensorDict
from tensordict.nn import CompositeDistribution, TensorDictModule, set_composite_lp_aggregate
from torchrl.modules import MaskedCategorical, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss

pytestmark = pytest.mark.interop

RTOL, ATOL = 1e-5, 1e-6
CLIP_EPS, CRITIC_COEFF = 0.2, 0.5

#: the largest |difference| seen per quantity (never asserted on)
MEASURED: dict[str, float] = {}


def _close(name: str, got, want) -> None:
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    if got.numel():
        MEASURED[name] = max(MEASURED.get(name, 0.0), (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


class _PassThrough(torch.nn.Module):
    def forward(self, *xs):
        return xs if len(xs) > 1 else xs[0]


def make_batch(sizes: dict[str, int], n: int, seed: int, logit_scale: float = 2.0):
    """Per head: logits, masks (at least one valid action, 10% of rows with exactly one), actions sampled from
    the masked policy, old log-probs near the current ones; advantages, values, old values, returns."""
    g = torch.Generator().manual_seed(seed)
    b = {"logits": {}, "masks": {}, "actions": {}, "old": {}}
    for h, a in sizes.items():
        z = torch.randn(n, a, generator=g) * logit_scale
        m = torch.rand(n, a, generator=g) < 0.6
        m[torch.arange(n), torch.randint(0, a, (n,), generator=g)] = True
        single = torch.rand(n, generator=g) < 0.1
        keep = torch.randint(0, a, (n,), generator=g)
        m[single] = False
        m[single, keep[single]] = True
        zm = z.masked_fill(~m, float("-inf"))
        act = torch.multinomial(torch.softmax(zm, -1), 1, generator=g).squeeze(-1)
        lp = torch.log_softmax(zm, -1).gather(-1, act[:, None]).squeeze(-1)
        b["logits"][h], b["masks"][h], b["actions"][h] = z, m, act
        b["old"][h] = lp + 0.2 * torch.randn(n, generator=g)
    b["advantages"] = 0.3 + 1.5 * torch.randn(n, generator=g)
    b["values"] = torch.randn(n, generator=g)
    b["old_values"] = b["values"] + 0.3 * torch.randn(n, generator=g)
    b["returns"] = 2.0 * torch.randn(n, generator=g)
    b["valid"] = torch.rand(n, generator=g) > 0.2
    return b


def _torchrl_loss(sizes: dict[str, int], entropy_coeff, **kwargs) -> ClipPPOLoss:
    heads = list(sizes)
    if len(heads) == 1:
        module = TensorDictModule(_PassThrough(), in_keys=["obs_logits"], out_keys=["logits"])
        actor = ProbabilisticActor(
            module,
            in_keys={"logits": "logits", "mask": "action_mask"},
            out_keys=["action"],
            distribution_class=MaskedCategorical,
            return_log_prob=True,
        )
    else:
        in_keys = [("obs_logits", h) for h in heads] + [("action_mask", h) for h in heads]
        out_keys = [("params", h, "logits") for h in heads] + [("params", h, "mask") for h in heads]
        module = TensorDictModule(_PassThrough(), in_keys=in_keys, out_keys=out_keys)
        actor = ProbabilisticActor(
            module,
            in_keys=["params"],
            out_keys=[("action", h) for h in heads],
            distribution_class=CompositeDistribution,
            distribution_kwargs={
                "distribution_map": {h: MaskedCategorical for h in heads},
                "name_map": {h: ("action", h) for h in heads},
            },
            return_log_prob=True,
        )
    critic = ValueOperator(_PassThrough(), in_keys=["obs_value"])
    loss = ClipPPOLoss(
        actor,
        critic,
        clip_epsilon=CLIP_EPS,
        entropy_coeff=entropy_coeff,
        critic_coeff=CRITIC_COEFF,
        loss_critic_type="l2",
        **kwargs,
    )
    if len(heads) > 1:
        loss.set_keys(
            sample_log_prob=[("action", f"{h}_log_prob") for h in heads], action=[("action", h) for h in heads]
        )
    return loss, actor


def _tensordict(sizes, b, z, v, *, old_values: bool = False, valid_key=None) -> TensorDict:
    heads = list(sizes)
    n = b["advantages"].shape[0]
    if len(heads) == 1:
        h = heads[0]
        td = {
            "obs_logits": z[h],
            "action_mask": b["masks"][h],
            "action": b["actions"][h],
            "action_log_prob": b["old"][h],
        }
    else:
        td = {
            "obs_logits": {h: z[h] for h in heads},
            "action_mask": {h: b["masks"][h] for h in heads},
            "action": {**{h: b["actions"][h] for h in heads}, **{f"{h}_log_prob": b["old"][h] for h in heads}},
        }
    td.update({"obs_value": v[:, None], "advantage": b["advantages"][:, None], "value_target": b["returns"][:, None]})
    if old_values:
        td["state_value"] = b["old_values"][:, None]
    if valid_key is not None:
        td[valid_key] = b["valid"][:, None]
    return TensorDict(td, [n])


CASES = {
    "single_head": {"op": 6},
    "multi_head": {"op": 6, "slot": 3, "blueprint": 13, "style": 4},
}


def _run(sizes, b, config, loss_kwargs, *, old_values=False, valid_key=None, weights=None, backend="reference"):
    heads = list(sizes)
    multi = len(heads) > 1
    coeffs = {h: 0.01 * (i + 1) for i, h in enumerate(heads)}
    entropy_coeff = {("action", f"{h}_entropy"): c for h, c in coeffs.items()} if multi else 0.01
    loss_mod, actor = _torchrl_loss(sizes, entropy_coeff, **loss_kwargs)
    cfg_kwargs = dict(entropy_coef=1.0, entropy_coef_per_head=coeffs) if multi else dict(entropy_coef=0.01)
    config = ek.PPOLossConfig(**config, **cfg_kwargs)

    z_t = {h: b["logits"][h].clone().requires_grad_(True) for h in heads}
    v_t = b["values"].clone().requires_grad_(True)
    td = _tensordict(sizes, b, z_t, v_t, old_values=old_values, valid_key=valid_key)
    with set_composite_lp_aggregate(False):
        trl = loss_mod(td)
        dist = actor.get_dist(td)
        if multi:
            lp = dist.log_prob(td.select("action"))
            head_lp = torch.stack([lp["action", f"{h}_log_prob"] for h in heads], -1)
            head_ent = torch.stack([dist.dists["action", h].entropy() for h in heads], -1)
        else:
            head_lp = dist.log_prob(td["action"])[:, None]
            head_ent = dist.entropy()[:, None]

    z = {h: b["logits"][h].clone().requires_grad_(True) for h in heads}
    v = b["values"].clone().requires_grad_(True)
    out = ek.ppo_loss(
        z,
        b["masks"],
        b["actions"],
        b["old"],
        b["advantages"],
        layout=ek.HeadLayout(sizes),
        values=v,
        returns=b["returns"],
        old_values=b["old_values"] if old_values else None,
        weights=weights,
        config=config,
        backend=backend,
    )
    return trl, out, (z_t, v_t, z, v, config.entropy_coef), head_lp, head_ent


def _compare_losses_and_gradients(trl, out, leaves, heads):
    z_t, v_t, z, v, entropy_coef = leaves
    _close("loss_objective", out.policy_loss, trl["loss_objective"])
    _close("loss_entropy", entropy_coef * out.entropy_loss, trl["loss_entropy"])
    _close("loss_critic", 2 * CRITIC_COEFF * out.value_loss, trl["loss_critic"])
    pairs = [
        ("loss_objective", out.policy_loss, trl["loss_objective"]),
        ("loss_entropy", entropy_coef * out.entropy_loss, trl["loss_entropy"]),
        ("loss_critic", 2 * CRITIC_COEFF * out.value_loss, trl["loss_critic"]),
        ("total", out.loss, trl["loss_objective"] + trl["loss_entropy"] + trl["loss_critic"]),
    ]
    for name, ours, theirs in pairs:
        g = torch.autograd.grad(ours, [z[h] for h in heads] + [v], retain_graph=True, allow_unused=True)
        t = torch.autograd.grad(theirs, [z_t[h] for h in heads] + [v_t], retain_graph=True, allow_unused=True)
        for i, (gi, ti) in enumerate(zip(g, t)):
            what = heads[i] if i < len(heads) else "values"
            ref = z_t[heads[i]] if i < len(heads) else v_t
            gi = torch.zeros_like(ref) if gi is None else gi
            ti = torch.zeros_like(ref) if ti is None else ti
            _close(f"d {name} / d {what}", gi, ti)


def _backends() -> list[str]:
    return [b for b in ("reference", "cpu") if ek.available_backends()[b].available]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("normalize", [False, True], ids=["raw_adv", "normalized_adv"])
@pytest.mark.parametrize("case", list(CASES))
def test_clip_ppo_loss(case, normalize, backend):
    """ClipPPOLoss(normalize_advantage=..., loss_critic_type="l2"): losses, log-probs, entropies, clip fraction,
    kl_approx (k1), mean/max ratio, ESS and explained variance, and every gradient."""
    sizes = CASES[case]
    heads = list(sizes)
    b = make_batch(sizes, n=257, seed=3 + len(sizes) + 10 * normalize)
    config = dict(
        clip_eps=CLIP_EPS,
        surrogate="joint",
        value_coef=2 * CRITIC_COEFF,
        mask_fill=None,
        log_ratio_clamp=80.0,
        joint_log_ratio_clamp=None,
    )
    if normalize:  # TorchRL: (A - mean) / clamp_min(std (unbiased), 1e-6) over the batch
        config.update(normalize_advantages=True, advantage_std="unbiased", advantage_eps=1e-6, advantage_eps_add=False)
    trl, out, leaves, head_lp, head_ent = _run(sizes, b, config, {"normalize_advantage": normalize}, backend=backend)
    m = out.metrics.to_dict()

    _compare_losses_and_gradients(trl, out, leaves, heads)
    _close("log_probs per head", out.log_probs, head_lp)
    _close("entropy per head", out.entropy, head_ent)
    _close("entropy (logged)", out.entropy.sum(-1).mean(), trl["entropy"])
    _close("clip_fraction", m["clip_fraction"], trl["clip_fraction"])
    _close("kl_approx = joint_kl_k1", m["joint_kl_k1"], trl["kl_approx"])
    _close("mean_ratio", m["ratio_mean"], trl["mean_ratio"])
    _close("max_ratio", m["ratio_max"], trl["max_ratio"])
    r = out.joint_ratio.double()
    _close("ESS (from joint_ratio)", r.sum() ** 2 / (r * r).sum() / r.numel(), trl["ESS"])
    _close("explained_variance", m["explained_variance"], trl["explained_variance"].squeeze())
    assert 0.0 < m["clip_fraction"] < 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_clip_ppo_loss_value_clipping(case):
    """clip_value=0.2: the loss and its gradient agree; TorchRL's value_clip_fraction counts the steps where the
    clamp binds, ppo_loss's the steps where the clipped branch is the larger (docs/switching.md)."""
    sizes = CASES[case]
    b = make_batch(sizes, n=257, seed=41 + len(sizes))
    config = dict(
        clip_eps=CLIP_EPS,
        value_coef=2 * CRITIC_COEFF,
        value_clip=0.2,
        mask_fill=None,
        log_ratio_clamp=80.0,
        joint_log_ratio_clamp=None,
    )
    trl, out, leaves, _, _ = _run(sizes, b, config, {"clip_value": 0.2}, old_values=True)
    _compare_losses_and_gradients(trl, out, leaves, list(sizes))
    binds = ((b["values"] - b["old_values"]).abs() > 0.2).double().mean()
    _close("value_clip_fraction (TorchRL: the clamp binds)", binds, trl["value_clip_fraction"])
    clipped_larger = out.metrics.to_dict()["value_clip_fraction"]
    assert 0.0 < clipped_larger < binds.item(), "the clipped branch is the larger on a subset of the bound steps"


@pytest.mark.parametrize("case", list(CASES))
def test_clip_ppo_loss_validity_masks(case):
    """A validity mask: ("collector", "mask") masks every loss_* term (no advantage normalisation), and
    "shifted_valid" also normalises the advantage over the valid steps with the population std clamped at 1e-4.
    Both are ppo_loss's weights."""
    sizes = CASES[case]
    b = make_batch(sizes, n=257, seed=77 + len(sizes))
    w = b["valid"].float()
    base = dict(
        clip_eps=CLIP_EPS, value_coef=2 * CRITIC_COEFF, mask_fill=None, log_ratio_clamp=80.0, joint_log_ratio_clamp=None
    )
    trl, out, leaves, _, _ = _run(sizes, b, base, {}, valid_key=("collector", "mask"), weights=w)
    _compare_losses_and_gradients(trl, out, leaves, list(sizes))
    normalized = dict(base, normalize_advantages=True, advantage_std="population", advantage_eps=1e-4)
    trl, out, leaves, _, _ = _run(
        sizes, b, normalized, {"normalize_advantage": True}, valid_key="shifted_valid", weights=w
    )
    _compare_losses_and_gradients(trl, out, leaves, list(sizes))

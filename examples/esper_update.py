"""esper-lite's PPO update with one ``ppo_loss`` call (docs/switching.md, section "esper-lite").

esper-lite's ``PPOAgent.update`` evaluates the stored actions with ``FactoredRecurrentActorCritic``, then calls
``compute_ratio_metrics`` (per-head and joint ratios, KL, clip fractions, early stop) and ``compute_losses``
(per-head clipped surrogate over causally relevant, unforced steps; normalised masked entropy; value loss with
forced steps at weight 0.2; entropy-floor penalty). Here:

* ``TamiyoStandIn`` is a small stand-in for ``FactoredRecurrentActorCritic`` whose ``evaluate_actions``
  returns the per-head logits and the op-canonical masks (the style mask collapsed to SIGMOID_ADD when the
  op is neither GERMINATE nor SET_ALPHA_TARGET) instead of per-head log-probs and entropies: the one change
  esper's network needs.
* ``ppo_update`` replaces both functions by one ``ek.ppo_loss`` call and adds what esper computes beside the
  loss from its outputs: the KL early stop (one host sync on ``approx_kl``), the entropy-floor penalty
  (from ``out.entropy``) and the ratio-explosion diagnostic (from ``out.joint_ratio`` and ``out.log_probs``).
  It logs esper's metric names; ``legacy_ratio_metrics`` recomputes the few whose meaning differs in
  esper (all-head joint ratio over every valid step, Bessel std) from the same outputs.

``python examples/esper_update.py`` collects a random rollout with esper's shapes and runs the update.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch import nn

import esper_kernels as ek
from esper_kernels.synthetic import ESPER_RELEVANCE
from esper_kernels.telemetry import gradient_states, head_grad_norms

HEADS: dict[str, int] = dict(ek.ESPER_HEADS)  # esper's HEAD_NAMES order, 3 slots
HEAD_NAMES = tuple(HEADS)
LAYOUT = ek.HeadLayout(HEADS)
NUM_OPS = HEADS["op"]
WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE = range(NUM_OPS)  # esper's LifecycleOp
SIGMOID_ADD = 2  # esper's GerminationStyle.SIGMOID_ADD: the style forced when the style head is irrelevant
MASKED_LOGIT_VALUE = -1e4  # esper's MASKED_LOGIT_VALUE

#: esper's per-head entropy multipliers (ENTROPY_COEF_PER_HEAD in ppo_agent.py)
ENTROPY_COEF_PER_HEAD = {
    "slot": 1.0,
    "blueprint": 1.3,
    "style": 1.2,
    "tempo": 1.3,
    "alpha_target": 1.2,
    "alpha_speed": 1.2,
    "alpha_curve": 1.2,
    "op": 1.0,
}


@dataclass
class UpdateSettings:
    """The PPOAgent arguments the update reads (esper's names)."""

    clip_ratio: float = 0.2
    entropy_coef: float = 0.05  # applies to normalised entropy
    entropy_coef_per_head: dict[str, float] = field(default_factory=lambda: dict(ENTROPY_COEF_PER_HEAD))
    value_coef: float = 0.5
    clip_value: bool = False
    value_clip: float = 10.0
    target_kl: float | None = 0.015
    recurrent_n_epochs: int = 1
    max_grad_norm: float = 0.5
    entropy_floor: dict[str, float] = field(default_factory=lambda: {h: 0.1 for h in HEAD_NAMES})
    entropy_floor_penalty_coef: dict[str, float] = field(default_factory=lambda: {h: 0.1 for h in HEAD_NAMES})
    ratio_explosion_threshold: float = 5.0
    ratio_collapse_threshold: float = 0.1
    backend: str = "auto"


def esper_config(s: UpdateSettings) -> ek.PPOLossConfig:
    """The PPOLossConfig that reproduces esper's compute_ratio_metrics + compute_losses."""
    return ek.PPOLossConfig(
        clip_eps=s.clip_ratio,
        surrogate="per_head",  # sum over heads of each head's clipped surrogate, mean over its relevant steps
        log_ratio_clamp=20.0,
        joint_log_ratio_clamp=30.0,  # esper's clamps
        normalize_advantages=False,  # the rollout buffer normalised them already, once per update
        normalize_entropy=True,  # MaskedCategorical.entropy() is H / log(n_valid), 0 with one valid action
        entropy_coef=s.entropy_coef,
        entropy_coef_per_head=s.entropy_coef_per_head,
        value_coef=s.value_coef,
        value_clip=s.value_clip if s.clip_value else None,
        mask_fill=MASKED_LOGIT_VALUE,
        ratio_std="unbiased",  # esper logs joint_ratio.std(): Bessel's correction
    )


# ---------------------------------------------------------------------------------------------------------
# the network: the one change is what evaluate_actions returns
# ---------------------------------------------------------------------------------------------------------


def canonical_masks(masks: dict[str, torch.Tensor], op: torch.Tensor) -> dict[str, torch.Tensor]:
    """The op-canonical masks: where the op is neither GERMINATE nor SET_ALPHA_TARGET the style head is
    irrelevant and esper forces SIGMOID_ADD, so its mask becomes that one action."""
    style = masks["style"].clone()
    irrelevant = (op != GERMINATE) & (op != SET_ALPHA_TARGET)
    forced = torch.zeros_like(style)
    forced[..., SIGMOID_ADD] = True
    out = dict(masks)
    out["style"] = torch.where(irrelevant.unsqueeze(-1), forced, style)
    return out


@dataclass
class EvalOutput:
    logits: dict[str, torch.Tensor]  # per head [B, T, A_h], unmasked (ppo_loss applies the masks)
    masks: dict[str, torch.Tensor]  # per head [B, T, A_h], op-canonical
    values: torch.Tensor  # [B, T]: Q(s, stored op), as esper's op-conditioned value head
    hidden: tuple[torch.Tensor, torch.Tensor]


class TamiyoStandIn(nn.Module):
    """Features -> LSTM -> one Linear per head, and an op-conditioned value head (a small stand-in)."""

    def __init__(self, state_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.feature_net = nn.Sequential(nn.Linear(state_dim, hidden), nn.LayerNorm(hidden), nn.ReLU())
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, a) for name, a in HEADS.items()})
        self.value_head = nn.Linear(hidden + NUM_OPS, 1)

    def _trunk(self, states, hidden):
        out, hidden = self.lstm(self.feature_net(states), hidden)
        return out, hidden

    def _value(self, out, op):
        return self.value_head(torch.cat([out, nn.functional.one_hot(op, NUM_OPS).to(out.dtype)], -1)).squeeze(-1)

    def evaluate_actions(
        self,
        states: torch.Tensor,
        actions: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> EvalOutput:
        """Per-head logits and op-canonical masks for the stored actions (esper returned log-probs and
        entropies computed with MaskedCategorical instead)."""
        out, hidden = self._trunk(states, hidden)
        logits = {name: head(out) for name, head in self.heads.items()}
        return EvalOutput(logits, canonical_masks(masks, actions["op"]), self._value(out, actions["op"]), hidden)

    @torch.no_grad()
    def act(self, states, masks, hidden=None, generator=None):
        """Rollout: sample the op, then every head from its (op-canonical) mask; per-head log-probs with
        esper's -1e4 fill (what its buffer stores as old log-probs); Q(s, op)."""
        out, hidden = self._trunk(states, hidden)
        logits = {name: head(out) for name, head in self.heads.items()}

        def sample(name, mask):
            z = logits[name].masked_fill(~mask, MASKED_LOGIT_VALUE)
            a = torch.multinomial(torch.softmax(z, -1).reshape(-1, z.shape[-1]), 1, generator=generator)
            a = a.reshape(z.shape[:-1])
            return a, torch.log_softmax(z, -1).gather(-1, a.unsqueeze(-1)).squeeze(-1)

        actions, log_probs = {}, {}
        actions["op"], log_probs["op"] = sample("op", masks["op"])
        canon = canonical_masks(masks, actions["op"])
        for name in HEAD_NAMES:
            if name != "op":
                actions[name], log_probs[name] = sample(name, canon[name])
        return actions, log_probs, self._value(out, actions["op"]), hidden


# ---------------------------------------------------------------------------------------------------------
# a rollout with esper's shapes (what TamiyoRolloutBuffer.get_batched_sequences returns, reduced)
# ---------------------------------------------------------------------------------------------------------


def causal_masks(op: torch.Tensor) -> torch.Tensor:
    """[..., H] head relevance from the (effective) op, as esper's leyline causal masks."""
    rel = torch.zeros(*op.shape, len(HEAD_NAMES), dtype=torch.bool, device=op.device)
    for code, names in ESPER_RELEVANCE.items():
        for name in names:
            rel[..., LAYOUT.index(name)] |= op == code
    return rel


def collect_rollout(
    net: TamiyoStandIn, n_envs: int = 12, max_steps: int = 25, seed: int = 0, state_dim: int = 32
) -> dict:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n_envs, max_steps, state_dim, generator=g)
    masks = {name: torch.rand(n_envs, max_steps, a, generator=g) < 0.6 for name, a in HEADS.items()}
    for m in masks.values():  # at least one valid action per head
        m[..., 0] |= ~m.any(-1)
    masks["op"][..., WAIT] = True  # WAIT is always valid
    forced = torch.rand(n_envs, max_steps, generator=g) < 0.2  # only WAIT valid: the agent had no choice
    wait_only = torch.arange(NUM_OPS) == WAIT
    masks["op"] = torch.where(forced.unsqueeze(-1), wait_only, masks["op"])
    lengths = torch.randint(max_steps // 2, max_steps + 1, (n_envs,), generator=g)
    valid = torch.arange(max_steps)[None, :] < lengths[:, None]  # padding after each env's last step
    actions, old_log_probs, values, _ = net.act(states, masks, generator=g)
    # GAE output stand-ins, normalised as esper's buffer does (once per update, over every valid step)
    raw_adv = torch.randn(n_envs, max_steps, generator=g) + 0.2
    mean, std = raw_adv[valid].mean(), raw_adv[valid].std(correction=0)
    advantages = torch.where(valid, (raw_adv - mean) / (std + 1e-8), 0.0)
    returns = torch.where(valid, values + torch.randn(n_envs, max_steps, generator=g), 0.0)
    return dict(
        states=states,
        masks=masks,
        actions=actions,
        old_log_probs=old_log_probs,
        values=values,
        advantages=advantages,
        returns=returns,
        valid_mask=valid,
        forced_actions=forced & valid,
        effective_op_actions=actions["op"],
    )


# ---------------------------------------------------------------------------------------------------------
# what esper computes beside the loss, from ppo_loss's outputs
# ---------------------------------------------------------------------------------------------------------


def entropy_floor_penalty(
    entropy: torch.Tensor, mask: torch.Tensor, floors: dict[str, float], coefs: dict[str, float]
) -> torch.Tensor:
    """sum_h coef_h * max(0, floor_h - mean_h)^2, mean_h the mean of ``out.entropy[..., h]`` (normalised,
    differentiable) over ``mask[..., h]`` (esper: the causal mask, or the availability mask, on unforced valid
    steps). A head with no such step adds nothing (selected on the device, no host sync)."""
    terms = []
    for name, floor in floors.items():
        h = LAYOUT.index(name)
        m = mask[..., h]
        n = m.sum()
        mean_h = torch.where(m, entropy[..., h], 0.0).sum() / n.clamp(min=1)
        shortfall = torch.clamp(floor - mean_h, min=0.0)
        terms.append(torch.where(n > 0, coefs[name] * shortfall**2, 0.0))
    return torch.stack(terms).sum()


def ratio_explosion_diagnostic(
    out: ek.PPOLossOutput,
    data: dict,
    present: torch.Tensor,
    max_threshold: float,
    min_threshold: float,
    max_exemplars: int = 100,
) -> dict:
    """esper's RatioExplosionDiagnostic fields from ``out.joint_ratio`` and the op head's ``out.log_probs``
    over the ``present`` steps, indices counted among them as esper counts among its valid steps (a few host
    syncs: call it only when ratio_max or ratio_min crossed a threshold)."""
    op = LAYOUT.index("op")
    ratio = out.joint_ratio[present]
    new, old = out.log_probs[..., op].detach()[present], data["old_log_probs"]["op"][present]
    actions = data["actions"]["op"][present]
    nonfinite = ~torch.isfinite(ratio)
    bad = nonfinite | (ratio > max_threshold) | (ratio < min_threshold)
    idx = bad.nonzero().squeeze(-1)[:max_exemplars]
    diff = (new - old).abs()
    diff = diff[torch.isfinite(diff)]
    return {
        "worst_ratio_indices": idx.tolist(),
        "worst_ratio_values": ratio[idx].tolist(),
        "worst_ratio_actions": actions[idx].tolist(),
        "num_bad_total": int(bad.sum()),
        "num_nonfinite": int(nonfinite.sum()),
        "logit_diff_mean": diff.mean().item() if diff.numel() else 0.0,
        "logit_diff_max": diff.max().item() if diff.numel() else 0.0,
    }


def legacy_ratio_metrics(out: ek.PPOLossOutput, data: dict, clip_ratio: float) -> dict[str, float]:
    """esper's ratio metrics in esper's meaning, from the same outputs: the joint log-ratio sums every head's
    clamped log-ratio (relevant or not) and the statistics run over every valid step, forced ones included;
    ratio_std with Bessel's correction; head entropies averaged over every valid step (irrelevant included)."""
    valid = data["valid_mask"]
    old = torch.stack([data["old_log_probs"][n] for n in HEAD_NAMES], -1)
    lr = torch.clamp(out.log_probs.detach() - old, -20.0, 20.0)[valid]
    r = torch.exp(torch.clamp(lr.sum(-1), -30.0, 30.0))
    ent = out.entropy.detach()[valid]
    values = {
        "ratio_mean": r.mean(),
        "ratio_max": r.max(),
        "ratio_min": r.min(),
        "ratio_std": r.std(),
        "clip_fraction": ((r - 1.0).abs() > clip_ratio).float().mean(),
        "clip_fraction_positive": (r > 1.0 + clip_ratio).float().mean(),
        "clip_fraction_negative": (r < 1.0 - clip_ratio).float().mean(),
        "log_prob_min": out.log_probs.detach()[valid].min(),
        "log_prob_max": out.log_probs.detach()[valid].max(),
    }
    values.update({f"head_{n}_entropy": ent[:, h].mean() for h, n in enumerate(HEAD_NAMES)})
    values.update({f"head_{n}_ratio_max": torch.exp(lr[:, h]).max() for h, n in enumerate(HEAD_NAMES)})
    return dict(zip(values, torch.stack(list(values.values())).tolist()))


# ---------------------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------------------


def ppo_update(net: TamiyoStandIn, optimizer: torch.optim.Optimizer, data: dict, s: UpdateSettings) -> dict:
    """esper's PPOAgent.update loop over recurrent_n_epochs, with one ppo_loss call per epoch."""
    config = esper_config(s)
    valid, forced = data["valid_mask"], data["forced_actions"]
    # padding is absent (weight 0); at a forced step (only WAIT valid) no head was a free choice, so no head is
    # relevant: that removes the step from every actor term exactly as esper's actor weight 0 does, and keeps
    # the step's per-step outputs (log-probs, entropies) for esper's metrics over every valid step
    relevance = causal_masks(data["effective_op_actions"]) & ~forced.unsqueeze(-1)
    value_weights = torch.where(valid, torch.where(forced, 0.2, 1.0), 0.0)  # forced steps at 0.2 in the value loss
    heads = {name: net.heads[name] for name in HEAD_NAMES} | {"value": net.value_head}
    metrics: dict = {"early_stopped": False, "epochs": []}
    for epoch in range(s.recurrent_n_epochs):
        ev = net.evaluate_actions(data["states"], data["actions"], data["masks"])
        out = ek.ppo_loss(
            ev.logits,
            ev.masks,
            data["actions"],
            data["old_log_probs"],
            data["advantages"],
            layout=LAYOUT,
            head_relevance=relevance,
            weights=valid,
            values=ev.values,
            returns=data["returns"],
            old_values=data["values"] if s.clip_value else None,
            value_weights=value_weights,
            config=config,
            backend=s.backend,
            validate=False,
        )
        # one host sync: esper's KL early stop and its finiteness gate, before any backward
        approx_kl, all_finite = torch.stack([out.metrics["approx_kl"], out.metrics["all_finite"]]).tolist()
        if not all_finite:
            metrics.setdefault("finiteness_gate_failures", []).append(epoch)
            continue
        if s.target_kl is not None and approx_kl > 1.5 * s.target_kl:
            metrics["early_stopped"], metrics["early_stop_epoch"] = True, epoch
            metrics["epochs"].append(esper_names(out.metrics.to_dict(), None, None, None))
            break
        penalty = entropy_floor_penalty(
            out.entropy, relevance & valid.unsqueeze(-1), s.entropy_floor, s.entropy_floor_penalty_coef
        )
        optimizer.zero_grad(set_to_none=True)
        (out.loss + penalty).backward()
        grad_norms = head_grad_norms(heads)
        pre_clip = nn.utils.clip_grad_norm_(net.parameters(), s.max_grad_norm)
        optimizer.step()
        m = out.metrics.to_dict()  # one host sync for every metric
        logged = esper_names(m, grad_norms, penalty, pre_clip)
        logged["head_gradient_states"] = gradient_states(grad_norms, m)
        if m["ratio_max"] > s.ratio_explosion_threshold or m["ratio_min"] < s.ratio_collapse_threshold:
            logged["ratio_diagnostic"] = ratio_explosion_diagnostic(
                out, data, valid, s.ratio_explosion_threshold, s.ratio_collapse_threshold
            )
        logged["legacy"] = legacy_ratio_metrics(out, data, s.clip_ratio)
        metrics["epochs"].append(logged)
    return metrics


def esper_names(m: dict[str, float], grad_norms, penalty, pre_clip) -> dict:
    """ppo_loss's metrics under esper's logged names (docs/switching.md has the differences in meaning)."""
    out = {
        k: m[k]
        for k in (
            "policy_loss",
            "value_loss",
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
        )
    }
    out["entropy"] = -m["entropy_loss"]  # esper logs -entropy_loss: sum_h k_h E_h
    out["joint_ratio_max"] = m["ratio_max"]
    out["head_entropies"] = {h: m[f"head_{h}_entropy"] for h in HEAD_NAMES}
    out.update({f"head_{h}_ratio_max": m[f"head_{h}_ratio_max"] for h in HEAD_NAMES})
    out["head_nan_detected"] = {h: m[f"head_{h}_nonfinite"] > 0 for h in HEAD_NAMES}  # NaN and Inf together
    out["head_learnable_fraction"] = {h: m[f"head_{h}_learnable_fraction"] for h in HEAD_NAMES}
    if grad_norms is not None:
        extra = grad_norms.to_floats() | {"entropy_floor_penalty": penalty, "pre_clip_grad_norm": pre_clip}
        floats = dict(zip(extra, torch.stack([torch.as_tensor(v).float() for v in extra.values()]).tolist()))
        out["head_grad_norms"] = {k: floats[k] for k in grad_norms}
        out["entropy_floor_penalty"] = floats["entropy_floor_penalty"]
        out["pre_clip_grad_norm"] = floats["pre_clip_grad_norm"]
    return out


def explained_variance_before_update(data: dict) -> float:
    """esper's explained_variance: rollout values against returns over valid steps, before the update,
    unbiased variances (0 when var(returns) <= 1e-8)."""
    v, r = data["values"][data["valid_mask"]], data["returns"][data["valid_mask"]]
    var_r = r.var()
    return (1.0 - (r - v).var() / var_r).item() if var_r > 1e-8 else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=12)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--target-kl", type=float, default=0.015)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    net = TamiyoStandIn()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, eps=1e-5)
    data = collect_rollout(net, a.envs, a.steps, seed=a.seed)
    settings = UpdateSettings(recurrent_n_epochs=a.epochs, target_kl=a.target_kl, backend=a.backend)
    result = ppo_update(net, optimizer, data, settings)
    result["explained_variance"] = explained_variance_before_update(data)
    n_valid, n_forced = int(data["valid_mask"].sum()), int(data["forced_actions"].sum())
    print(
        f"esper update: {a.envs} envs x {a.steps} steps ({n_valid} valid, {n_forced} forced), "
        f"{a.epochs} epoch(s), backend {a.backend}"
    )
    for i, e in enumerate(result["epochs"]):
        line = " ".join(
            f"{k} {e[k]:.4f}"
            for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "ratio_std")
            if k in e
        )
        print(
            f"epoch {i}: {line}"
            + (f" entropy_floor_penalty {e['entropy_floor_penalty']:.4f}" if "entropy_floor_penalty" in e else "")
        )
    if result["early_stopped"]:
        print(f"early stop at epoch {result['early_stop_epoch']} (approx_kl > 1.5 * target_kl)")
    last = result["epochs"][-1] if result["epochs"] else {}
    if "head_grad_norms" in last:
        for h in HEAD_NAMES:
            print(
                f"  {h:<13} grad {last['head_grad_norms'][h]:.4f}  entropy {last['head_entropies'][h]:.3f}  "
                f"learnable {last['head_learnable_fraction'][h]:.2f}  [{last['head_gradient_states'][h]}]"
            )
    if not math.isfinite(result["explained_variance"]):
        print("explained variance: no data")
    return result


if __name__ == "__main__":
    main()

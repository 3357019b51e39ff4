"""A compact PPO agent for the seed-slot environment, whose update is ``esper_kernels.ppo_loss``.

The policy: a shared trunk, one Linear head per action head and a value head. The op is sampled first; every
other head sees the trunk's features and the chosen op (one-hot), so the joint distribution factorises as
p(op | s) * prod_h p(a_h | s, op), each head under its own validity mask. Rollouts of whole episodes, GAE,
then several epochs of minibatches, each one ``ppo_loss`` call with the per-head logits (one tensor per
head, no concatenation), the masks, the head relevance, weights (0 for forced steps, where WAIT was the only
valid op: no decision, nothing to learn) and the value loss. Telemetry: ``PPOMetrics.merge`` over the update's
minibatches and ``telemetry.head_grad_norms`` of each head's Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PPOLossConfig
from ..loss import ppo_loss
from ..metrics import PPOMetrics
from ..telemetry import GradNorms, head_grad_norms
from .env import SeedSlotEnv

__all__ = ["Policy", "PPOAgent", "AgentConfig", "Rollout", "UpdateResult"]


@dataclass(frozen=True)
class AgentConfig:
    hidden: int = 64
    lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 4
    minibatches: int = 4
    max_grad_norm: float = 1.0
    loss: PPOLossConfig = field(
        default_factory=lambda: PPOLossConfig(
            clip_eps=0.2, normalize_advantages=True, normalize_entropy=True, entropy_coef=0.01, value_coef=0.5
        )
    )


class Policy(torch.nn.Module):
    """Shared trunk; ``heads[name]`` is one Linear per action head (op from the trunk, the others from the
    trunk and the op's one-hot); ``value`` is the critic."""

    def __init__(self, obs_size: int, layout, hidden: int = 64):
        super().__init__()
        self.layout = layout
        self.num_ops = layout.sizes[layout.index("op")]
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(obs_size, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh()
        )
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(hidden if name == "op" else hidden + self.num_ops, a) for name, a in layout.items()}
        )
        self.value = torch.nn.Linear(hidden, 1)
        for head in self.heads.values():  # small initial logits: a near-uniform starting policy
            torch.nn.init.orthogonal_(head.weight, gain=0.01)
            torch.nn.init.zeros_(head.bias)
        torch.nn.init.orthogonal_(self.value.weight, gain=1.0)
        torch.nn.init.zeros_(self.value.bias)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.trunk(obs)

    def op_logits(self, feat: torch.Tensor) -> torch.Tensor:
        return self.heads["op"](feat)

    def head_logits(self, feat: torch.Tensor, op: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's logits given the op taken (the op head's too), as {name: [..., A_h]}."""
        cond = torch.cat([feat, torch.nn.functional.one_hot(op, self.num_ops).to(feat.dtype)], dim=-1)
        return {name: head(feat if name == "op" else cond) for name, head in self.heads.items()}

    def values(self, feat: torch.Tensor) -> torch.Tensor:
        return self.value(feat).squeeze(-1)


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor, fill: float = -1e4) -> torch.Tensor:
    """The loss's own masking (docs/semantics.md 2.1, 2.3): invalid actions at ``fill``, then log-softmax."""
    return torch.log_softmax(torch.where(mask, logits.float(), fill), dim=-1)


@dataclass
class Rollout:
    """One update's experience: T steps of B environments (whole episodes)."""

    obs: torch.Tensor  # [T, B, obs]
    actions: torch.Tensor  # [T, B, H]
    masks: dict[str, torch.Tensor]  # {head: [T, B, A_h]}
    relevance: torch.Tensor  # [T, B, H]
    old_log_probs: torch.Tensor  # [T, B, H]
    values: torch.Tensor  # [T, B]
    rewards: torch.Tensor  # [T, B]
    weights: torch.Tensor  # [T, B]: 0 where WAIT was the only valid op


@dataclass
class UpdateResult:
    mean_return: float  # mean episode return of the rollout
    metrics: dict[str, float]  # PPOMetrics of the whole update (every minibatch of every epoch), to_dict()
    grad_norms: GradNorms  # per head, of the update's last minibatch (before clipping)
    backend: str


class PPOAgent:
    def __init__(self, env: SeedSlotEnv, config: AgentConfig | None = None, backend: str = "auto", seed: int = 0):
        self.env = env
        self.cfg = config if config is not None else AgentConfig()
        self.backend = backend
        self.layout = env.layout
        self.device = env.device
        torch.manual_seed(seed)
        self.policy = Policy(env.obs_size, self.layout, self.cfg.hidden).to(self.device)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=self.cfg.lr, eps=1e-5)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # action sampling
        self.cpu_gen = torch.Generator().manual_seed(seed + 1)  # minibatch shuffles
        self.obs = env.reset()

    # -- acting ---------------------------------------------------------------------------------------------
    def _sample(self, logp: torch.Tensor) -> torch.Tensor:
        """Categorical samples by Gumbel-max on the masked log-probs (deterministic given the generator)."""
        u = torch.rand(logp.shape, generator=self.gen, device=logp.device).clamp_(1e-20, 1.0)
        return torch.argmax(logp - torch.log(-torch.log(u)), dim=-1)

    @torch.no_grad()
    def collect(self) -> Rollout:
        env, T = self.env, self.env.horizon
        names = self.layout.names
        obs_l, act_l, rel_l, lp_l, val_l, rew_l, w_l = [], [], [], [], [], [], []
        mask_l: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for _ in range(T):
            obs = self.obs
            feat = self.policy.features(obs)
            op_mask = env.op_mask()
            op = self._sample(masked_log_softmax(self.policy.op_logits(feat), op_mask))
            masks = env.masks(op)
            logits = self.policy.head_logits(feat, op)
            acts, lps = [], []
            for name in names:
                logp = masked_log_softmax(logits[name], masks[name])
                a = op if name == "op" else self._sample(logp)
                acts.append(a)
                lps.append(logp.gather(-1, a.unsqueeze(-1)).squeeze(-1))
                mask_l[name].append(masks[name])
            actions = torch.stack(acts, -1)
            obs_l.append(obs)
            act_l.append(actions)
            rel_l.append(env.relevance(op))
            lp_l.append(torch.stack(lps, -1))
            val_l.append(self.policy.values(feat))
            w_l.append((op_mask.sum(-1) > 1).float())
            self.obs, reward, _done = env.step(actions)
            rew_l.append(reward)
        return Rollout(
            torch.stack(obs_l),
            torch.stack(act_l),
            {n: torch.stack(m) for n, m in mask_l.items()},
            torch.stack(rel_l),
            torch.stack(lp_l),
            torch.stack(val_l),
            torch.stack(rew_l),
            torch.stack(w_l),
        )

    def advantages(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE(gamma, lambda) over whole episodes (the last step is terminal): (advantages, returns)."""
        T = ro.rewards.shape[0]
        adv = torch.zeros_like(ro.rewards)
        last = torch.zeros_like(ro.rewards[0])
        for t in reversed(range(T)):
            next_value = ro.values[t + 1] if t + 1 < T else torch.zeros_like(ro.values[t])
            delta = ro.rewards[t] + self.cfg.gamma * next_value - ro.values[t]
            last = delta + self.cfg.gamma * self.cfg.gae_lambda * last
            adv[t] = last
        return adv, adv + ro.values

    # -- learning -------------------------------------------------------------------------------------------
    def update(self, ro: Rollout) -> UpdateResult:
        cfg = self.cfg
        adv, returns = self.advantages(ro)
        n = adv.numel()
        flat = lambda t: t.reshape(n, *t.shape[2:])  # [T, B, ...] -> [N, ...]
        obs, actions, rel, old_lp = flat(ro.obs), flat(ro.actions), flat(ro.relevance), flat(ro.old_log_probs)
        masks = {k: flat(v) for k, v in ro.masks.items()}
        adv, returns, weights = flat(adv), flat(returns), flat(ro.weights)
        op_idx = self.layout.index("op")
        size = n // cfg.minibatches
        parts: list[PPOMetrics] = []
        norms = None
        backend = self.backend
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=self.cpu_gen).to(self.device)
            for k in range(cfg.minibatches):
                idx = perm[k * size : (k + 1) * size]
                feat = self.policy.features(obs[idx])
                logits = self.policy.head_logits(feat, actions[idx, op_idx])
                out = ppo_loss(
                    logits,
                    {h: m[idx] for h, m in masks.items()},
                    actions[idx],
                    old_lp[idx],
                    adv[idx],
                    layout=self.layout,
                    head_relevance=rel[idx],
                    weights=weights[idx],
                    values=self.policy.values(feat),
                    returns=returns[idx],
                    value_weights=torch.ones_like(weights[idx]),
                    config=cfg.loss,
                    backend=self.backend,
                    validate=False,
                )
                self.opt.zero_grad(set_to_none=True)
                out.loss.backward()
                norms = head_grad_norms(self.policy.heads)
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.opt.step()
                parts.append(out.metrics)
                backend = out.backend
        metrics = PPOMetrics.merge(parts).to_dict()
        mean_return = ro.rewards.sum(0).mean().item()
        return UpdateResult(mean_return, metrics, norms, backend)

    def train_iteration(self) -> UpdateResult:
        return self.update(self.collect())

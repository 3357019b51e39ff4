"""A small, deterministic, batched-in-torch environment with esper's factored action space.

A host network has ``num_slots`` slots. The agent grows "seeds" (candidate modules) in them: GERMINATE a seed
of some blueprint into an empty slot, let it train (its tempo sets for how many steps), ADVANCE it into
blending, where its blend weight alpha rises towards a target, then FOSSILIZE it (it becomes a permanent part
of the host) or PRUNE it. Each step the host improves by sum over slots of alpha * quality: a seed's quality
comes from its blueprint, style and tempo (plus a little noise), and some blueprints are harmful. Seeds in
training or blending cost upkeep, so a good policy germinates good blueprints early, advances and fossilizes
them promptly, and prunes bad ones.

Actions: one categorical per head (the ``ESPER_HEADS`` layout, ``slot`` sized to ``num_slots``). The op is
chosen first; every other head's validity mask follows from the state and the op (germinate only into an
empty slot, prune only an occupied one, fossilize only a seed whose alpha reached its target, large
blueprints only when no other seed is in training or blending, ...), and which heads matter follows from the
op (docs/background.md, ``ESPER_RELEVANCE``). Everything is a [B, ...] tensor on one device; given its seed, the
environment is deterministic.
"""

from __future__ import annotations

import torch

from ..layout import ESPER_HEADS, HeadLayout
from ..synthetic import ESPER_RELEVANCE

__all__ = [
    "SeedSlotEnv",
    "OPS",
    "WAIT",
    "GERMINATE",
    "SET_ALPHA_TARGET",
    "PRUNE",
    "FOSSILIZE",
    "ADVANCE",
    "EMPTY",
    "TRAINING",
    "BLENDING",
    "FOSSILIZED",
]

OPS = ("WAIT", "GERMINATE", "SET_ALPHA_TARGET", "PRUNE", "FOSSILIZE", "ADVANCE")
WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE = range(6)
STAGES = ("empty", "training", "blending", "fossilized")
EMPTY, TRAINING, BLENDING, FOSSILIZED = range(4)

# the task (fixed, the same for every seed): what each choice is worth
#: base quality of the 13 blueprints; the last four are "large" (valid only when no other seed is active)
BLUEPRINT_QUALITY = (0.55, -0.6, 0.25, -0.3, 0.7, -0.8, 0.1, 0.4, -0.45, 1.0, 0.8, -0.7, 0.3)
LARGE_BLUEPRINTS = (9, 10, 11, 12)
STYLE_BONUS = (-0.15, 0.0, 0.2, 0.05)
TEMPO_STEPS = (1, 2, 4)  # training steps before a seed is ready to advance
TEMPO_BONUS = (-0.1, 0.0, 0.1)
ALPHA_TARGETS = (0.5, 0.75, 1.0)
ALPHA_SPEEDS = (0.15, 0.25, 0.4, 0.6)  # alpha gained per blending step, times the curve's factor
ALPHA_CURVES = (0.6, 0.8, 1.0, 1.2, 1.4)
PRUNE_COST = (0.04, 0.03, 0.02, 0.01)  # by alpha_speed: a fast prune disturbs the host less
PRUNE_SPEEDS = (2, 3)  # the alpha_speed choices a prune accepts
GERMINATE_COST = 0.05
UPKEEP = 0.03  # per seed in training or blending, per step
REWARD_SCALE = 0.1
QUALITY_NOISE = 0.3


class SeedSlotEnv:
    """``num_envs`` copies of the seed-slot task, stepped together; episodes last ``horizon`` steps.

    ``reset() -> obs``; ``op_mask() -> [B, 6]``; ``masks(op) -> {head: [B, A_h]}``; ``relevance(op) -> [B, H]``;
    ``step(actions [B, H]) -> (obs, reward [B], done [B])`` (all episodes end together and restart).
    """

    def __init__(
        self,
        num_envs: int = 64,
        num_slots: int = 3,
        horizon: int = 25,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        self.num_envs, self.num_slots, self.horizon = num_envs, num_slots, horizon
        self.device = torch.device(device)
        self.layout = HeadLayout({**ESPER_HEADS, "slot": num_slots})
        self.head = {name: h for h, name in enumerate(self.layout.names)}
        self._gen = torch.Generator(device="cpu").manual_seed(seed)  # noise is drawn on CPU, then moved
        dev = self.device
        f32 = dict(dtype=torch.float32, device=dev)
        self._bp_quality = torch.tensor(BLUEPRINT_QUALITY, **f32)
        self._large = torch.zeros(len(BLUEPRINT_QUALITY), dtype=torch.bool, device=dev)
        self._large[list(LARGE_BLUEPRINTS)] = True
        self._style_bonus = torch.tensor(STYLE_BONUS, **f32)
        self._tempo_steps = torch.tensor(TEMPO_STEPS, dtype=torch.long, device=dev)
        self._tempo_bonus = torch.tensor(TEMPO_BONUS, **f32)
        self._alpha_targets = torch.tensor(ALPHA_TARGETS, **f32)
        self._alpha_speeds = torch.tensor(ALPHA_SPEEDS, **f32)
        self._alpha_curves = torch.tensor(ALPHA_CURVES, **f32)
        self._prune_cost = torch.tensor(PRUNE_COST, **f32)
        self._prune_speed_ok = torch.zeros(len(ALPHA_SPEEDS), dtype=torch.bool, device=dev)
        self._prune_speed_ok[list(PRUNE_SPEEDS)] = True
        rel = torch.zeros(len(OPS), self.layout.num_heads, dtype=torch.bool)
        for op, names in ESPER_RELEVANCE.items():
            for name in names:
                rel[op, self.layout.index(name)] = True
        self._relevance = rel.to(dev)
        self.obs_size = num_slots * (len(STAGES) + 5) + 2
        self.reset()

    # -- state --------------------------------------------------------------------------------------------
    def reset(self) -> torch.Tensor:
        B, S, dev = self.num_envs, self.num_slots, self.device
        self.t = 0
        self.stage = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.quality = torch.zeros(B, S, device=dev)
        self.style = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.training_left = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.alpha = torch.zeros(B, S, device=dev)
        self.alpha_target = torch.ones(B, S, device=dev)
        self.alpha_rate = torch.full((B, S), ALPHA_SPEEDS[1], device=dev)
        return self.observe()

    def observe(self) -> torch.Tensor:
        """[B, obs_size] float32: per slot the stage (one-hot), alpha, target, quality, training left, ready;
        then the time left and the fraction of slots in use."""
        stage = torch.nn.functional.one_hot(self.stage, len(STAGES)).float()
        occupied = self.stage != EMPTY
        per_slot = torch.cat(
            [
                stage,
                self.alpha.unsqueeze(-1),
                torch.where(occupied, self.alpha_target, 0.0).unsqueeze(-1),
                torch.where(occupied, self.quality, 0.0).unsqueeze(-1),
                (self.training_left.float() / max(TEMPO_STEPS)).unsqueeze(-1),
                self._ready().float().unsqueeze(-1),
            ],
            dim=-1,
        )
        B = self.num_envs
        time_left = torch.full((B, 1), 1.0 - self.t / self.horizon, device=self.device)
        used = occupied.float().mean(-1, keepdim=True)
        return torch.cat([per_slot.reshape(B, -1), time_left, used], dim=-1)

    def _ready(self) -> torch.Tensor:
        return (self.stage == TRAINING) & (self.training_left == 0)

    def _reached(self) -> torch.Tensor:
        return (self.stage == BLENDING) & (self.alpha >= self.alpha_target - 1e-6)

    def _slot_options(self) -> torch.Tensor:
        """[B, 6, S]: the slots each op can act on."""
        st = self.stage
        active = (st == TRAINING) | (st == BLENDING)
        return torch.stack(
            [torch.ones_like(active), st == EMPTY, st == BLENDING, active, self._reached(), self._ready()], dim=1
        )

    # -- masks and relevance --------------------------------------------------------------------------------
    def op_mask(self) -> torch.Tensor:
        """[B, 6] bool: an op is valid when some slot allows it (WAIT always)."""
        return self._slot_options().any(-1)

    def masks(self, op: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head [B, A_h] bool validity for the chosen op [B] (the op head's own mask is ``op_mask``)."""
        B, dev = self.num_envs, self.device
        out = {"op": self.op_mask()}
        out["slot"] = self._slot_options().gather(1, op.view(B, 1, 1).expand(B, 1, self.num_slots)).squeeze(1)
        any_active = ((self.stage == TRAINING) | (self.stage == BLENDING)).any(-1, keepdim=True)
        out["blueprint"] = ~(self._large.unsqueeze(0) & any_active)
        is_prune = (op == PRUNE).unsqueeze(-1)
        out["alpha_speed"] = ~is_prune | self._prune_speed_ok.unsqueeze(0)
        for name in ("style", "tempo", "alpha_target", "alpha_curve"):
            out[name] = torch.ones(B, self.layout.sizes[self.head[name]], dtype=torch.bool, device=dev)
        return {name: out[name] for name in self.layout.names}

    def relevance(self, op: torch.Tensor) -> torch.Tensor:
        """[B, H] bool: which heads mattered for the op taken."""
        return self._relevance[op]

    # -- dynamics -------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply ``actions`` [B, H] (head order of ``layout``; every action valid under ``masks``)."""
        a = {name: actions[:, h] for h, name in enumerate(self.layout.names)}
        B, S = self.num_envs, self.num_slots
        op, slot = a["op"], a["slot"]
        at = torch.nn.functional.one_hot(slot, S).bool()  # [B, S]: the slot acted on
        reward = torch.zeros(B, device=self.device)
        noise = (torch.randn(B, generator=self._gen) * QUALITY_NOISE).to(self.device)

        germ = at & (op == GERMINATE).unsqueeze(-1)
        q = (
            self._bp_quality[a["blueprint"]] + self._style_bonus[a["style"]] + self._tempo_bonus[a["tempo"]] + noise
        ).unsqueeze(-1)
        self.stage = torch.where(germ, TRAINING, self.stage)
        self.quality = torch.where(germ, q, self.quality)
        self.style = torch.where(germ, a["style"].unsqueeze(-1), self.style)
        self.training_left = torch.where(germ, self._tempo_steps[a["tempo"]].unsqueeze(-1), self.training_left)
        self.alpha = torch.where(germ, 0.0, self.alpha)
        self.alpha_target = torch.where(germ, self._alpha_targets[a["alpha_target"]].unsqueeze(-1), self.alpha_target)
        self.alpha_rate = torch.where(germ, ALPHA_SPEEDS[1], self.alpha_rate)
        reward = reward - GERMINATE_COST * (op == GERMINATE).float()

        retarget = at & (op == SET_ALPHA_TARGET).unsqueeze(-1)
        restyle = self._style_bonus[a["style"]].unsqueeze(-1) - self._style_bonus[self.style]
        self.quality = torch.where(retarget, self.quality + restyle, self.quality)
        self.style = torch.where(retarget, a["style"].unsqueeze(-1), self.style)
        self.alpha_target = torch.where(
            retarget, self._alpha_targets[a["alpha_target"]].unsqueeze(-1), self.alpha_target
        )
        rate = (self._alpha_speeds[a["alpha_speed"]] * self._alpha_curves[a["alpha_curve"]]).unsqueeze(-1)
        self.alpha_rate = torch.where(retarget, rate, self.alpha_rate)

        prune = at & (op == PRUNE).unsqueeze(-1)
        reward = reward - self._prune_cost[a["alpha_speed"]] * (op == PRUNE).float()
        self.stage = torch.where(prune, EMPTY, self.stage)
        self.alpha = torch.where(prune, 0.0, self.alpha)
        self.quality = torch.where(prune, 0.0, self.quality)

        fossil = at & (op == FOSSILIZE).unsqueeze(-1)
        self.stage = torch.where(fossil, FOSSILIZED, self.stage)

        advance = at & (op == ADVANCE).unsqueeze(-1)
        self.stage = torch.where(advance, BLENDING, self.stage)

        # seeds in training progress; blending seeds move alpha towards their target (at the rate last set)
        training = self.stage == TRAINING
        self.training_left = torch.where(training, (self.training_left - 1).clamp(min=0), self.training_left)
        blending = self.stage == BLENDING
        self.alpha = torch.where(blending, torch.minimum(self.alpha + self.alpha_rate, self.alpha_target), self.alpha)

        # the host's improvement this step: every blended or fossilized seed, minus upkeep of active seeds
        contributing = (self.stage == BLENDING) | (self.stage == FOSSILIZED)
        active = (self.stage == TRAINING) | (self.stage == BLENDING)
        reward = reward + torch.where(contributing, self.alpha * self.quality, 0.0).sum(-1)
        reward = reward - UPKEEP * active.float().sum(-1)
        reward = reward * REWARD_SCALE

        self.t += 1
        done = self.t >= self.horizon
        if done:
            obs = self.reset()
        else:
            obs = self.observe()
        return obs, reward, torch.full((B,), done, dtype=torch.bool, device=self.device)

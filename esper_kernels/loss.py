"""The public entry points: ppo_loss, FactoredPPOLoss and PPOLossOutput."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .backends import select_backend
from .config import PPOLossConfig
from .inputs import prepare_inputs
from .layout import HeadLayout
from .metrics import PPOMetrics
from .stats import GLOBAL_SIZE, HD, HEAD_SIZE, G

__all__ = ["PPOLossOutput", "ppo_loss", "FactoredPPOLoss", "check_data"]


@dataclass
class PPOLossOutput:
    """What ``ppo_loss`` returns. ``loss``, ``log_probs`` and ``entropy`` are differentiable."""

    loss: torch.Tensor  # 0-d float32
    policy_loss: torch.Tensor
    entropy_loss: torch.Tensor
    value_loss: torch.Tensor
    log_probs: torch.Tensor  # [..., H]: ell, the taken action's log-prob (NaN for an out-of-range action)
    entropy: torch.Tensor  # [..., H]: H_ih as used in the loss
    joint_ratio: torch.Tensor  # [...]: r_i = exp(L_i), detached
    metrics: PPOMetrics
    backend: str


def check_data(metrics: PPOMetrics) -> None:
    """``validate=True`` (docs/usage.md): one host sync, then a ValueError listing every data
    problem found."""
    s = metrics.stats.detach().cpu().tolist()
    problems = []
    for h, name in enumerate(metrics.layout.names):
        base = GLOBAL_SIZE + h * HEAD_SIZE
        bad = int(s[base + HD.INVALID_ACTION])
        if bad:
            problems.append(
                f"head {name!r}: action out of range [0, {metrics.layout.sizes[h]}) or masked out "
                f"at {bad} present step(s)"
            )
        empty = int(s[base + HD.EMPTY_MASK])
        if empty:
            problems.append(f"head {name!r}: no valid action (empty mask) at {empty} present step(s)")
    if s[G.BAD_WEIGHTS]:
        problems.append(f"weights: negative or non-finite at {int(s[G.BAD_WEIGHTS])} step(s)")
    if s[G.BAD_VALUE_WEIGHTS]:
        problems.append(f"value_weights: negative or non-finite at {int(s[G.BAD_VALUE_WEIGHTS])} step(s)")
    if problems:
        raise ValueError(
            "ppo_loss: invalid data (pass validate=False to count these in the metrics "
            "instead):\n  " + "\n  ".join(problems)
        )


#: a per-head input: one tensor ([..., S] or [..., H]), a mapping by head name, or a sequence in layout order
PerHead = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def ppo_loss(
    logits: PerHead,
    action_masks: PerHead | None,
    actions: PerHead,
    old_log_probs: PerHead,
    advantages: torch.Tensor,
    *,
    layout: HeadLayout,
    head_relevance: PerHead | None = None,
    weights: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    value_weights: torch.Tensor | None = None,
    config: PPOLossConfig | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> PPOLossOutput:
    """The factored PPO loss of docs/semantics.md section 2, its per-step outputs and its metrics, in one call.

    Inputs (leading batch dims ``...`` of any shape): ``logits`` [..., S] or per-head [..., A_h] (mapping by
    head name or sequence), ``action_masks`` like logits (True = valid; None = all valid), ``actions`` and
    ``old_log_probs`` [..., H] or per head [...], ``advantages`` [...] (or [..., H] with
    surrogate="per_head"), ``head_relevance`` [..., H] or per head (None = all relevant), ``weights`` [...]
    (w = 0: absent step), ``values``/``returns`` [...] (both or neither), ``old_values`` [...] (value
    clipping), ``value_weights`` [...] (default: weights).

    ``validate=True`` raises ValueError on data errors (after one host sync); ``validate=False`` never syncs
    and counts them in the metrics instead. Shape, dtype and device errors always raise before computing.
    """
    if config is None:
        config = PPOLossConfig()
    elif not isinstance(config, PPOLossConfig):
        raise TypeError(f"config: expected an esper_kernels.PPOLossConfig, got {type(config).__name__}")
    if not isinstance(layout, HeadLayout):
        raise TypeError(f"layout: expected an esper_kernels.HeadLayout, got {type(layout).__name__}")
    cfg = config.resolve(layout)
    inputs = prepare_inputs(
        layout,
        logits,
        action_masks,
        actions,
        old_log_probs,
        advantages,
        head_relevance=head_relevance,
        weights=weights,
        values=values,
        returns=returns,
        old_values=old_values,
        value_weights=value_weights,
        per_head_advantages_allowed=cfg.per_head,
        value_clip=config.value_clip is not None,
    )
    impl = select_backend(backend, inputs, cfg)
    raw = impl.forward(inputs, cfg)
    batch = inputs.batch_shape
    H = layout.num_heads
    metrics = PPOMetrics(raw.stats, layout, cfg, has_values=inputs.values is not None, backend=impl)
    if validate:
        check_data(metrics)
    if len(batch) == 1:  # already [N, H] and [N]
        log_probs, entropy, joint_ratio = raw.log_probs, raw.entropy, raw.joint_ratio
    else:
        log_probs, entropy = raw.log_probs.reshape(tuple(batch) + (H,)), raw.entropy.reshape(tuple(batch) + (H,))
        joint_ratio = raw.joint_ratio.reshape(batch)
    return PPOLossOutput(
        loss=raw.loss,
        policy_loss=raw.policy_loss,
        entropy_loss=raw.entropy_loss,
        value_loss=raw.value_loss,
        log_probs=log_probs,
        entropy=entropy,
        joint_ratio=joint_ratio,
        metrics=metrics,
        backend=impl.name,
    )


class FactoredPPOLoss(torch.nn.Module):
    """``ppo_loss`` as a module: ``FactoredPPOLoss(layout, config)(logits, masks, actions, old_lp, adv, ...)``."""

    def __init__(
        self, layout: HeadLayout, config: PPOLossConfig | None = None, backend: str = "auto", validate: bool = True
    ):
        super().__init__()
        if not isinstance(layout, HeadLayout):
            layout = HeadLayout(layout)
        self.layout = layout
        self.config = config if config is not None else PPOLossConfig()
        self.config.resolve(layout)  # a per-head field that does not fit the layout fails here, not later
        self.backend = backend
        self.validate = validate

    def forward(
        self,
        logits: PerHead,
        action_masks: PerHead | None,
        actions: PerHead,
        old_log_probs: PerHead,
        advantages: torch.Tensor,
        **kwargs,
    ) -> PPOLossOutput:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("validate", self.validate)
        return ppo_loss(
            logits, action_masks, actions, old_log_probs, advantages, layout=self.layout, config=self.config, **kwargs
        )

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, config={self.config!r}, backend={self.backend!r}"

"""Synthetic batches for the example, the tests and the benchmarks, and the standard benchmark cases
(benchmarks/README.md) they share.

``make_batch`` synthesises a random batch for any layout (esper's causal relevance for esper's heads).
``STANDARD_CASES`` is the one table of the named cases (esper, rl_64k, rl_1m, wide, vocab): each ``Case`` holds a
batch shape and its heads, and ``Case.make_batch`` synthesises a batch of that case. ``python -m esper_kernels
bench``, ``benchmarks/cpu_quick.py`` and the tests that run these cases all read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import ESPER_HEADS, HeadLayout

__all__ = ["ESPER_RELEVANCE", "STANDARD_CASES", "Case", "make_batch"]

#: which heads matter for each op (docs/background.md): op index -> relevant head names
ESPER_RELEVANCE = {
    0: ("op",),  # WAIT
    1: ("op", "slot", "blueprint", "style", "tempo", "alpha_target"),  # GERMINATE
    2: ("op", "slot", "style", "alpha_target", "alpha_speed", "alpha_curve"),  # SET_ALPHA_TARGET
    3: ("op", "slot", "alpha_speed", "alpha_curve"),  # PRUNE
    4: ("op", "slot"),  # FOSSILIZE
    5: ("op", "slot"),  # ADVANCE
}


@dataclass(frozen=True)
class Case:
    """A named case: the batch's leading shape (N = its product) and its heads, in order."""

    name: str
    batch_shape: tuple[int, ...]
    heads: tuple[tuple[str, int], ...]

    @property
    def n_rows(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def layout(self) -> HeadLayout:
        return HeadLayout(self.heads)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(a for _, a in self.heads)

    @property
    def head_sizes(self) -> str:
        """The sizes joined by '/', as the benchmark's CSV records them: '3/13/4/3/3/4/5/6'."""
        return "/".join(str(a) for a in self.sizes)

    def make_batch(self, **kwargs) -> dict:
        """``make_batch(self.batch_shape, self.layout, **kwargs)``: dtype, device, seed (default 0) and the rest."""
        return make_batch(self.batch_shape, self.layout, **kwargs)


_ESPER = tuple(ESPER_HEADS.items())

#: the standard benchmark cases (benchmarks/README.md), in its order
STANDARD_CASES: dict[str, Case] = {
    "esper": Case("esper", (12, 150), _ESPER),  # N = 1,800: 12 envs x 150 steps, esper's 8 heads (S = 41)
    "rl_64k": Case("rl_64k", (65536,), _ESPER),
    "rl_1m": Case("rl_1m", (1048576,), _ESPER),
    "wide": Case("wide", (16384,), (("left", 1024), ("right", 1024))),
    "vocab": Case("vocab", (8192,), (("token", 32768),)),
}


def make_batch(
    batch_shape: tuple[int, ...] = STANDARD_CASES["esper"].batch_shape,
    layout: HeadLayout | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    mask_density: float = 0.7,
    absent_fraction: float = 0.1,
    values: bool = True,
    logit_scale: float = 2.0,
    old_noise: float = 0.1,
) -> dict:
    """A random batch: ``ppo_loss(**make_batch(...), layout=layout)`` works.

    Masks keep the taken action valid and at least one action per head; esper layouts get esper's causal
    relevance from the ``op`` action, others a random relevance; absent steps (weight 0) are filled with
    garbage (NaN logits and old log-probs) to exercise the where-selection.
    """
    layout = layout or HeadLayout(ESPER_HEADS)
    g = torch.Generator().manual_seed(seed)
    H, S = layout.num_heads, layout.total
    logits = torch.randn(*batch_shape, S, generator=g) * logit_scale
    masks = torch.rand(*batch_shape, S, generator=g) < mask_density
    actions = torch.empty(*batch_shape, H, dtype=torch.int64)
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        act = torch.randint(0, a, batch_shape, generator=g)
        actions[..., h] = act
        head_mask = masks[..., off : off + a]
        head_mask.scatter_(-1, act.unsqueeze(-1), True)
    if set(layout.names) == set(ESPER_HEADS) and "op" in layout.names:
        op = actions[..., layout.index("op")]
        relevance = torch.zeros(*batch_shape, H, dtype=torch.bool)
        for code, heads in ESPER_RELEVANCE.items():
            for name in heads:
                relevance[..., layout.index(name)] |= op == code
    else:
        relevance = torch.rand(*batch_shape, H, generator=g) < 0.7
    # old log-probs near the current ones, so ratios are near 1 with some clipping
    with torch.no_grad():
        lp = []
        for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
            z = logits[..., off : off + a].masked_fill(~masks[..., off : off + a], -1e4)
            lp.append(torch.log_softmax(z, -1).gather(-1, actions[..., h : h + 1]).squeeze(-1))
        old_log_probs = torch.stack(lp, -1) + old_noise * torch.randn(*batch_shape, H, generator=g)
    advantages = torch.randn(*batch_shape, generator=g)
    weights = (torch.rand(*batch_shape, generator=g) >= absent_fraction).float()
    absent = weights == 0
    logits[absent] = float("nan")
    old_log_probs[absent] = float("nan")
    advantages[absent] = float("nan")
    out = dict(
        logits=logits.to(dtype).to(device),
        action_masks=masks.to(device),
        actions=actions.to(device),
        old_log_probs=old_log_probs.to(device),
        advantages=advantages.to(device),
        head_relevance=relevance.to(device),
        weights=weights.to(device),
    )
    if values:
        out["values"] = torch.randn(*batch_shape, generator=g).to(device)
        out["returns"] = (out["values"].cpu() + torch.randn(*batch_shape, generator=g)).to(device)
    return out

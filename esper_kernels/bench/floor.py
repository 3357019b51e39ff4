"""The bandwidth floor: the fewest bytes a forward, a backward or a full step must move (benchmarks/README.md)."""

from __future__ import annotations

import torch

from ..layout import HeadLayout

__all__ = ["floor_bytes", "floor_bytes_per_row"]


def floor_bytes_per_row(sizes: tuple[int, ...], logit_bytes: int, mode: str = "full", values: bool = True) -> int:
    """Bytes per step that ``mode`` must move at least, for make_batch's input dtypes.

    Per step: logits S * logit_bytes and masks S (bool) ("big"); the gradient S * logit_bytes, plus 4 for the
    values' gradient; the per-step inputs: actions 8 H (int64), old log-probs 4 H, relevance H (bool),
    advantages, weights, values and returns 4 each. Per-step outputs (log_probs, entropy, joint_ratio) are not
    counted. forward = big + per-step (read once); backward = big + gradient + per-step (a backward that
    computes the gradient reads the inputs again); full = big + gradient + per-step: the one-pass floor (the
    forward writes the gradient while the row is on chip, and a plain ``loss.backward()`` moves nothing more).
    The two-pass floor of earlier versions, 2 big + gradient + per-step, is in benchmarks/NOTES.md.
    """
    S, H = sum(sizes), len(sizes)
    big = S * logit_bytes + S
    per_step = 13 * H + 8 + (8 if values else 0)
    grad = S * logit_bytes + (4 if values else 0)
    return {"forward": big + per_step, "backward": big + grad + per_step, "full": big + grad + per_step}[mode]


def floor_bytes(batch: dict, layout: HeadLayout, mode: str = "full") -> int:
    """``floor_bytes_per_row`` counted from the batch's own tensors (their real dtypes): the measured rows use this."""
    big = sum(
        batch[k].numel() * batch[k].element_size() for k in ("logits", "action_masks") if batch.get(k) is not None
    )
    per_step = sum(
        t.numel() * t.element_size()
        for k, t in batch.items()
        if k not in ("logits", "action_masks") and isinstance(t, torch.Tensor)
    )
    grad = batch["logits"].numel() * batch["logits"].element_size()
    if batch.get("values") is not None:
        grad += batch["values"].numel() * 4
    return {"forward": big + per_step, "backward": big + grad + per_step, "full": big + grad + per_step}[mode]

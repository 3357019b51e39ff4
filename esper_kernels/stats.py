"""The sufficient-statistics vector every backend writes and PPOMetrics derives metrics from.

One float32 vector of ``GLOBAL_SIZE + H * HEAD_SIZE`` entries: the global block, then one block per head
(head h at ``GLOBAL_SIZE + h * HEAD_SIZE``). Each entry has a merge kind, so the statistics of a
concatenated batch follow from those of its parts (``merge``): sums add, minima and maxima reduce, and a
weighted moment (weight W, mean m, M2 = sum w (x - m)^2) combines by Chan's formula. Minima start at +inf,
maxima at -inf, and both ignore NaN. "present" = weight w > 0 (finite); "relevant" = head relevance c = 1.
"""

from __future__ import annotations

import torch

__all__ = ["G", "HD", "GLOBAL_SIZE", "HEAD_SIZE", "stats_size", "empty_stats", "merge", "KIND_SUM",
           "KIND_MIN", "KIND_MAX", "KIND_MEAN", "KIND_M2", "kinds"]

KIND_SUM, KIND_MIN, KIND_MAX, KIND_MEAN, KIND_M2 = 0, 1, 2, 3, 4


class G:
    """Global entries (all sums over present steps unless said otherwise)."""

    STEPS = 0  # count of present steps
    WEIGHT = 1  # sum w
    POLICY_NUM = 2  # joint surrogate: sum w * min(r A, clip(r) A)
    KL_K3 = 3  # sum w ((exp(L) - 1) - L)
    KL_K1 = 4  # sum w (-L)
    CLIP = 5  # sum w [r > 1 + eps_hi or r < 1 - eps_lo]
    CLIP_POS = 6  # sum w [r > 1 + eps_hi]
    CLIP_NEG = 7  # sum w [r < 1 - eps_lo]
    RATIO_MEAN = 8  # weighted mean of r (weight: WEIGHT)
    RATIO_M2 = 9  # sum w (r - mean)^2
    RATIO_MIN = 10  # min r (NaN ignored)
    RATIO_MAX = 11  # max r
    BAD_WEIGHTS = 12  # count of steps (any) whose weight is negative or non-finite
    VALUE_STEPS = 13  # count of value-present steps (value weight > 0); 0 when no values are given
    VALUE_WEIGHT = 14  # sum vw over value-present steps
    VALUE_NUM = 15  # sum vw * max((v - R)^2, clipped branch)
    VALUE_CLIP = 16  # sum vw [clipped branch > unclipped branch]
    RETURN_MEAN = 17  # weighted mean of R (weight: VALUE_WEIGHT)
    RETURN_M2 = 18
    RESID_MEAN = 19  # weighted mean of R - v (weight: VALUE_WEIGHT)
    RESID_M2 = 20
    BAD_VALUE_WEIGHTS = 21  # count of steps whose value weight is negative or non-finite


class HD:
    """Per-head entries (sums over present, relevant steps unless said otherwise)."""

    REL_WEIGHT = 0  # sum w c
    POLICY_NUM = 1  # per_head surrogate: sum w c min(r_h A_h, clip(r_h) A_h)
    ENTROPY_NUM = 2  # sum w c H (H as used in the loss)
    KL_NUM = 3  # sum w c ((exp(lr) - 1) - lr)
    CLIP_NUM = 4  # sum w c [r_h > 1 + eps_hi or r_h < 1 - eps_lo]
    RATIO_MAX = 5  # max r_h
    LOGP_MIN = 6  # min ell (NaN ignored)
    LOGP_MAX = 7  # max ell
    NONFINITE = 8  # count of present steps (relevant or not) with non-finite ell
    EMPTY_MASK = 9  # count of present steps with no valid action
    INVALID_ACTION = 10  # count of present steps whose action is out of range or masked out
    VALID_MIN = 11  # min n over present steps
    VALID_MAX = 12  # max n over present steps
    VALID_SUM = 13  # sum w n over present steps
    SINGLE = 14  # sum w [n == 1] over present steps
    LEARNABLE = 15  # sum w [c and n > 1] over present steps


GLOBAL_SIZE = 22
HEAD_SIZE = 16

_GLOBAL_KINDS = [KIND_SUM] * GLOBAL_SIZE
_GLOBAL_KINDS[G.RATIO_MEAN] = _GLOBAL_KINDS[G.RETURN_MEAN] = _GLOBAL_KINDS[G.RESID_MEAN] = KIND_MEAN
_GLOBAL_KINDS[G.RATIO_M2] = _GLOBAL_KINDS[G.RETURN_M2] = _GLOBAL_KINDS[G.RESID_M2] = KIND_M2
_GLOBAL_KINDS[G.RATIO_MIN] = KIND_MIN
_GLOBAL_KINDS[G.RATIO_MAX] = KIND_MAX
_HEAD_KINDS = [KIND_SUM] * HEAD_SIZE
for _i in (HD.LOGP_MIN, HD.VALID_MIN):
    _HEAD_KINDS[_i] = KIND_MIN
for _i in (HD.RATIO_MAX, HD.LOGP_MAX, HD.VALID_MAX):
    _HEAD_KINDS[_i] = KIND_MAX

#: moment groups: (weight index, mean index, M2 index) in the global block
MOMENTS = ((G.WEIGHT, G.RATIO_MEAN, G.RATIO_M2), (G.VALUE_WEIGHT, G.RETURN_MEAN, G.RETURN_M2),
           (G.VALUE_WEIGHT, G.RESID_MEAN, G.RESID_M2))


def stats_size(num_heads: int) -> int:
    return GLOBAL_SIZE + num_heads * HEAD_SIZE


def kinds(num_heads: int) -> list[int]:
    return _GLOBAL_KINDS + _HEAD_KINDS * num_heads


def empty_stats(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The statistics of an empty batch: sums 0, minima +inf, maxima -inf."""
    k = torch.tensor(kinds(num_heads), device=device)
    out = torch.zeros(len(k), dtype=torch.float32, device=device)
    out = torch.where(k == KIND_MIN, float("inf"), out)
    return torch.where(k == KIND_MAX, float("-inf"), out)


def merge(parts: torch.Tensor) -> torch.Tensor:
    """Statistics of the concatenation of the batches whose statistics are the rows of ``parts`` [R, K]."""
    if parts.dim() != 2:
        raise ValueError(f"merge: expected [parts, K], got shape {list(parts.shape)}")
    num_heads = (parts.shape[1] - GLOBAL_SIZE) // HEAD_SIZE
    k = torch.tensor(kinds(num_heads), device=parts.device)
    p = parts.double()
    out = torch.where(k == KIND_MIN, p.amin(0), p.sum(0))
    out = torch.where(k == KIND_MAX, p.amax(0), out)
    for wi, mi, m2i in MOMENTS:
        w = p[:, wi]
        total = w.sum()
        safe = torch.where(total > 0, total, 1.0)
        # Chan's formula, shifted by the first weighted part's mean so that equal means merge exactly (a
        # constant quantity keeps M2 = 0: explained_variance stays NaN, ratio_std stays 0)
        has = w > 0
        first = torch.argmax(has.to(torch.uint8)).reshape(1)
        m0 = torch.where(has.index_select(0, first), p[:, mi].index_select(0, first), 0.0).reshape(())
        dev = torch.where(has, p[:, mi] - m0, 0.0)
        dm = torch.where(total > 0, (w * dev).sum() / safe, 0.0)
        m2 = p[:, m2i].sum() + (w * (dev - dm) ** 2).sum()
        out[mi] = torch.where(total > 0, m0 + dm, 0.0)
        out[m2i] = m2
    return out.float()

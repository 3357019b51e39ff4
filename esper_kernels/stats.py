"""The statistics vector every backend writes and PPOMetrics derives metrics from (layout: ``schema``).

One float32 vector of ``GLOBAL_SIZE + H * HEAD_SIZE`` entries: the global block, then one block per head
(head h at ``GLOBAL_SIZE + h * HEAD_SIZE``). Each entry's kind (``esper_kernels.schema``) says how the
statistics of a concatenated batch follow from those of its parts (``merge``): sums and counts add, minima
and maxima reduce ignoring NaN, and a weighted moment (weight W, mean m, M2 = sum w (x - m)^2) combines by
Chan's formula (an infinite mean stays infinite, docs/semantics.md).
"""

from __future__ import annotations

import torch

from .schema import GLOBAL_SIZE, HD, HEAD_SIZE, MOMENTS, G, Kind, kinds, stats_size

__all__ = [
    "G",
    "HD",
    "GLOBAL_SIZE",
    "HEAD_SIZE",
    "MOMENTS",
    "Kind",
    "stats_size",
    "kinds",
    "empty_stats",
    "merge",
    "merge_moment",
]


def empty_stats(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The statistics of an empty batch: sums and counts 0, minima +inf, maxima -inf, moments 0."""
    k = torch.tensor(kinds(num_heads), device=device)
    out = torch.zeros(len(k), dtype=torch.float32, device=device)
    out = torch.where(k == Kind.MIN, float("inf"), out)
    return torch.where(k == Kind.MAX, float("-inf"), out)


def merge_moment(w: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the moments (w, mean, M2) of parts [R] into (mean, M2) of their concatenation (float64).

    Chan's formula, shifted by the first weighted part's mean so that equal means merge exactly (a constant
    quantity keeps M2 = 0: explained_variance stays NaN, ratio_std stays 0). Parts without weight are skipped.
    Non-finite means (an overflowed ratio) follow IEEE addition of the parts' means: one infinity gives that
    infinity and M2 = +inf, both infinities or a NaN give NaN.
    """
    has = w > 0
    total = w.sum()
    safe = torch.where(total > 0, total, 1.0)
    first = torch.argmax(has.to(torch.uint8)).reshape(1)
    m0 = torch.where(has.index_select(0, first), mean.index_select(0, first), 0.0).reshape(())
    finite = torch.isfinite(mean) | ~has
    dev = torch.where(has & finite, mean - m0, 0.0)
    dm = torch.where(total > 0, (w * dev).sum() / safe, 0.0)
    q = m2.sum() + (w * (dev - dm) ** 2).sum()
    out_mean = torch.where(total > 0, m0 + dm, 0.0)
    out_m2 = q
    # any non-finite mean among the weighted parts decides: their IEEE sum (inf, -inf or NaN)
    bad = torch.where(has & ~finite, mean, 0.0).sum()
    any_bad = (has & ~finite).any()
    out_mean = torch.where(any_bad, bad, out_mean)
    out_m2 = torch.where(any_bad, torch.where(torch.isnan(bad), bad, float("inf")), out_m2)
    return out_mean, out_m2


def merge(parts: torch.Tensor) -> torch.Tensor:
    """Statistics of the concatenation of the batches whose statistics are the rows of ``parts`` [R, K]."""
    if parts.dim() != 2:
        raise ValueError(f"merge: expected [parts, K], got shape {list(parts.shape)}")
    num_heads = (parts.shape[1] - GLOBAL_SIZE) // HEAD_SIZE
    k = torch.tensor(kinds(num_heads), device=parts.device)
    p = parts.double()
    nan = torch.isnan(p)
    lo = torch.where(nan, float("inf"), p).amin(0)
    hi = torch.where(nan, float("-inf"), p).amax(0)
    out = torch.where(k == Kind.MIN, lo, p.sum(0))
    out = torch.where(k == Kind.MAX, hi, out)
    for wi, mi, qi in MOMENTS:
        out[mi], out[qi] = merge_moment(p[:, wi], p[:, mi], p[:, qi])
    return out.float()

"""The reference backend: docs/semantics.md sections 1 to 5 in plain PyTorch, the truth every fused backend is tested
against.

Readable first: one head at a time, float32 throughout (float64 when the logits are float64, for gradcheck),
gradients by autograd. Absent steps (w <= 0 or non-finite w), irrelevant heads and masked actions are removed
with ``torch.where`` before any arithmetic, so NaN or Inf there never reaches the loss, a metric or a gradient.
No boolean indexing and no host synchronisation, so it runs under torch.compile and CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from .backends.base import RawOutput
from .config import ResolvedConfig
from .inputs import PPOInputs
from .schema import GLOBAL_STATS, HD, HEAD_STATS

__all__ = ["reference_forward", "masked_log_softmax", "normalize_advantages"]

_INF = float("inf")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (the loss-term convention of docs/semantics.md 2.7)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _min_ignore_nan(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep & ~torch.isnan(x), x, _INF).amin() if x.numel() else x.new_tensor(_INF)


def _max_ignore_nan(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep & ~torch.isnan(x), x, -_INF).amax() if x.numel() else x.new_tensor(-_INF)


def _moments(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and M2 = sum w (x - mean)^2 over ``keep`` (two-pass, shifted by the first kept x).

    The shift makes constant data exact: sum(w x) / sum(w) is not x in floating point, and that rounding
    would give one step (or constant returns) a variance of ~1e-14 instead of 0, so explained_variance
    (1 - var(R - v) / var(R)) and advantage normalisation ((A - mean) / max(std, 1e-8)) returned noise
    amplified by up to 1e8 instead of NaN and 0. Non-finite kept values decide alone (``stats.merge_moment``):
    their IEEE sum is the mean (inf, -inf, or NaN for both infinities or a NaN) and M2 is +inf or NaN.
    """
    if x.numel() == 0:
        return x.new_zeros(()), x.new_zeros(())
    finite = torch.isfinite(x)
    bad_keep = keep & ~finite
    keep = keep & finite
    ws = torch.where(keep, w, 0.0)
    first = torch.argmax(keep.to(torch.uint8)).reshape(1)  # first kept index (0 when none is kept)
    x0 = torch.where(keep.index_select(0, first), x.index_select(0, first), 0.0).reshape(())
    d = torch.where(keep, x - x0, 0.0)
    dm = _safe_div((ws * d).sum(), ws.sum())
    m2 = (ws * torch.where(keep, d - dm, 0.0) ** 2).sum()
    mean = x0 + dm
    bad = torch.where(bad_keep, x, 0.0).sum()
    any_bad = bad_keep.any()
    mean = torch.where(any_bad, bad, mean)
    m2 = torch.where(any_bad, torch.where(torch.isnan(bad), bad, _INF), m2)
    return mean, m2


def _log_softmax(zhat: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
    """(zhat - m) - log sum_j exp(zhat_j - m), m the row max: the rounding does not grow with the logits'
    common offset (zhat - logsumexp(zhat) rounds at the magnitude of zhat).

    m is not differentiated (the gradient is the softmax's either way, without m's rounding); rows without a
    valid action (``nonempty`` False) get a finite dummy so that nothing NaN reaches autograd from them.
    """
    m = zhat.detach().amax(-1, keepdim=True)
    zs = torch.where(nonempty, zhat - m, 0.0)
    return zs - torch.log(torch.exp(zs).sum(-1, keepdim=True))


def masked_log_softmax(z: torch.Tensor, valid: torch.Tensor, fill: float, floor: float) -> torch.Tensor:
    """docs/semantics.md 2.1-2.3: log-softmax of z over the valid actions, then esper's floor if ``floor > 0``.

    ``fill`` = -inf excludes invalid actions from the max and the sum (mask_fill None); a finite fill replaces
    their logits. Floor: p = softmax(zhat); f = min(floor, 0.99 / max(n, 1)); U = valid & p < f;
    O = valid & p >= f; s = max(1 - |U| f, 1e-8) / max(sum_O p, 1e-8); q = f on U, p s on O;
    zhat = log(max(q, 1e-8)) on valid. Rows without a valid action give finite values nobody reads.
    """
    nonempty = valid.any(-1, keepdim=True) | math.isfinite(fill)
    zhat = torch.where(valid, z, fill)
    if floor > 0:
        p = torch.exp(_log_softmax(zhat, nonempty))
        n = valid.sum(-1, keepdim=True).to(z.dtype)
        f = torch.clamp(0.99 / torch.clamp(n, min=1.0), max=floor)
        under = valid & (p < f)
        over = valid & ~(p < f)
        s = torch.clamp(1.0 - under.sum(-1, keepdim=True).to(z.dtype) * f, min=1e-8) / torch.clamp(
            torch.where(over, p, 0.0).sum(-1, keepdim=True), min=1e-8
        )
        q = torch.where(under, f, p * s)
        zhat = torch.where(valid, torch.log(torch.clamp(q, min=1e-8)), fill)
    return _log_softmax(zhat, nonempty)


def _surrogate(ratio: torch.Tensor, adv: torch.Tensor, cfg: ResolvedConfig) -> torch.Tensor:
    """min(r A, clip(r, 1 - eps_lo, 1 + eps_hi) A)."""
    return torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv)


def _clipped(ratio: torch.Tensor, cfg: ResolvedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return ratio > 1.0 + cfg.eps_high, ratio < 1.0 - cfg.eps_low


def _normalize(adv: torch.Tensor, w: torch.Tensor, present: torch.Tensor, cfg: ResolvedConfig) -> torch.Tensor:
    """(A - mean_w A) / max(std_w A, eps) over present steps (or / (std + eps) with advantage_eps_add).

    std: the weighted population std, or with advantage_std "unbiased" that times sqrt(n / (n - 1)), n the
    present steps (0 when n <= 1).
    """
    mean, m2 = _moments(adv, w, present)
    var = _safe_div(m2, torch.where(present, w, 0.0).sum())
    if cfg.advantage_std_unbiased:
        n = present.sum().to(adv.dtype)
        var = torch.where(n > 1, var * (n / torch.clamp(n - 1.0, min=1.0)), 0.0)
    std = torch.sqrt(var)
    den = std + cfg.advantage_eps if cfg.advantage_eps_add else torch.clamp(std, min=cfg.advantage_eps)
    return torch.where(present, (adv - mean) / den, 0.0)


def normalize_advantages(advantages: torch.Tensor, weights: torch.Tensor | None, cfg: ResolvedConfig) -> torch.Tensor:
    """docs/semantics.md 2.9 advantage normalisation over present steps, per column for per-head advantages [N, H]."""
    ct = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    w_raw = torch.ones(advantages.shape[0], dtype=ct, device=advantages.device) if weights is None else weights.to(ct)
    present = torch.isfinite(w_raw) & (w_raw > 0)
    w = torch.where(present, w_raw, 0.0)
    adv = advantages.detach().to(ct)
    if adv.dim() == 2:
        return torch.stack(
            [_normalize(torch.where(present, adv[:, h], 0.0), w, present, cfg) for h in range(adv.shape[1])], dim=1
        )
    return _normalize(torch.where(present, adv, 0.0), w, present, cfg)


def reference_forward(inp: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
    """The whole loss, its per-step outputs and its statistics; differentiable in logits and values only."""
    H, N = inp.layout.num_heads, inp.n
    dev = inp.device
    ct = torch.float64 if inp.logits_dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=ct, device=dev)

    def data(t: torch.Tensor | None) -> torch.Tensor | None:
        """An input that never gets a gradient (docs/semantics.md section 3): advantages, weights, old log-probs,
        returns, ..."""
        return None if t is None else t.detach()

    # steps: w > 0 and finite is present; anything else is absent (and a bad weight if < 0 or non-finite)
    w_raw = torch.ones(N, dtype=ct, device=dev) if inp.weights is None else data(inp.weights).to(ct)
    finite_w = torch.isfinite(w_raw)
    present = finite_w & (w_raw > 0)
    w = torch.where(present, w_raw, 0.0)
    W = w.sum()
    bad_weights = (~finite_w | (w_raw < 0)).sum().to(ct)

    advantages = data(inp.advantages)
    if cfg.normalize_advantages:
        adv_all = normalize_advantages(advantages, data(inp.weights), cfg)
    else:
        adv_all = torch.where(present.unsqueeze(-1) if advantages.dim() == 2 else present, advantages.to(ct), 0.0)

    log_probs, entropies, lrs = [], [], []
    head_blocks = []
    policy_terms = []
    for h in range(H):
        A_h = inp.layout.sizes[h]
        z = inp.head_logits(h).to(ct)
        m = inp.head_mask(h)
        valid = torch.ones_like(z, dtype=torch.bool) if m is None else m.bool()
        use = present.unsqueeze(-1) & valid
        logp = masked_log_softmax(z, use, cfg.mask_fill, cfg.prob_floor[h])
        p = torch.exp(logp)
        # select before multiplying: an excluded action's log-prob is -inf, and 0 * -inf would put NaN into
        # the backward even where the product is selected away
        ent = -(p * torch.where(use, logp, 0.0)).sum(-1)
        n = valid.sum(-1).to(ct)
        if cfg.normalize_entropy:
            ent = torch.where(n > 1, ent / torch.log(torch.clamp(n, min=2.0)), 0.0)

        a = data(inp.actions[h]).long()
        in_range = (a >= 0) & (a < A_h)
        a_safe = torch.where(in_range, a, 0).unsqueeze(-1)
        # an action out of range, or a row without a valid action, has no log-prob: NaN (never an index)
        ell = torch.where(in_range & (n > 0), logp.gather(-1, a_safe).squeeze(-1), float("nan"))
        taken_valid = in_range & valid.gather(-1, a_safe).squeeze(-1)

        rel = present if inp.relevance is None else present & data(inp.relevance[h]).bool()
        old = torch.where(rel, data(inp.old_log_probs[h]).to(ct), 0.0)
        lr = torch.clamp(torch.where(rel, ell, 0.0) - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        lr = torch.where(rel, lr, 0.0)
        ratio = torch.exp(lr)
        wr = torch.where(rel, w, 0.0)
        den = wr.sum()

        if cfg.per_head:
            s = _surrogate(ratio, adv_all[:, h] if adv_all.dim() == 2 else adv_all, cfg)
            num = torch.where(rel, wr * s, 0.0).sum()
            policy_terms.append(_safe_div(num, den))
        else:
            num = zero
        clip_hi, clip_lo = _clipped(ratio, cfg)
        hs = dict(
            REL_WEIGHT=den,
            POLICY_NUM=num,
            ENTROPY_NUM=torch.where(rel, wr * ent, 0.0).sum(),
            KL_NUM=torch.where(rel, wr * ((torch.exp(lr) - 1.0) - lr), 0.0).sum(),
            CLIP_NUM=torch.where(rel & (clip_hi | clip_lo), wr, 0.0).sum(),
            RATIO_MAX=_max_ignore_nan(ratio, rel),
            LOGP_MIN=_min_ignore_nan(ell, rel),
            LOGP_MAX=_max_ignore_nan(ell, rel),
            NONFINITE=(present & ~torch.isfinite(ell)).sum().to(ct),
            EMPTY_MASK=(present & (n == 0)).sum().to(ct),
            INVALID_ACTION=(present & ~taken_valid).sum().to(ct),
            VALID_MIN=_min_ignore_nan(n, present),
            VALID_MAX=_max_ignore_nan(n, present),
            VALID_SUM=torch.where(present, w * n, 0.0).sum(),
            SINGLE=torch.where(present & (n == 1), w, 0.0).sum(),
            LEARNABLE=torch.where(rel & (n > 1), w, 0.0).sum(),
        )
        head_blocks.append(torch.stack([hs[st.name] for st in HEAD_STATS]))
        log_probs.append(ell)
        entropies.append(ent)
        lrs.append(lr)

    # the TRUE joint ratio: sum of every relevant head's clamped log-ratio, clamped again
    L = torch.stack(lrs, dim=1).sum(1)
    if math.isfinite(cfg.joint_log_ratio_clamp):
        L = torch.clamp(L, -cfg.joint_log_ratio_clamp, cfg.joint_log_ratio_clamp)
    L = torch.where(present, L, 0.0)
    r = torch.exp(L)
    clip_hi, clip_lo = _clipped(r, cfg)
    if cfg.per_head:
        policy_loss = -torch.stack(policy_terms).sum()
        policy_num = zero
    else:
        adv = adv_all if adv_all.dim() == 1 else adv_all[:, 0]
        policy_num = torch.where(present, w * _surrogate(r, adv, cfg), 0.0).sum()
        policy_loss = -_safe_div(policy_num, W)

    head_block = torch.stack(head_blocks)  # [H, HEAD_SIZE]
    ent_means = _safe_div(head_block[:, HD.ENTROPY_NUM], head_block[:, HD.REL_WEIGHT])
    # per-head coefficients as Python numbers: no host-to-device copy, so the call can be graph-captured
    entropy_loss = -torch.stack([k * e for k, e in zip(cfg.entropy_coef_per_head, ent_means.unbind())]).sum()

    g = dict.fromkeys((st.name for st in GLOBAL_STATS), zero)
    value_loss = zero
    if inp.values is not None:
        vw_raw = w_raw if inp.value_weights is None else data(inp.value_weights).to(ct)
        vfinite = torch.isfinite(vw_raw)
        vpresent = vfinite & (vw_raw > 0)
        vw = torch.where(vpresent, vw_raw, 0.0)
        VW = vw.sum()
        v = torch.where(vpresent, inp.values.to(ct), 0.0)
        R = torch.where(vpresent, data(inp.returns).to(ct), 0.0)
        l1 = (v - R) ** 2
        if math.isfinite(cfg.value_clip) and inp.old_values is not None:
            vo = torch.where(vpresent, data(inp.old_values).to(ct), 0.0)
            # vo + clamp(v - vo, -d, d), but exactly v where the clamp does not bind: otherwise the rounding of
            # vo + (v - vo) makes the clipped branch "larger" by an ulp at random and value_clip_fraction counts it
            dv = v - vo
            d = cfg.value_clip
            v_clipped = torch.where(dv > d, vo + d, torch.where(dv < -d, vo - d, v))
            l2 = (v_clipped - R) ** 2
            vl = torch.maximum(l1, l2)
            g["VALUE_CLIP"] = torch.where(vpresent & (l2 > l1), vw, 0.0).sum()
        else:
            vl = l1
        value_num = torch.where(vpresent, vw * vl, 0.0).sum()
        value_loss = 0.5 * _safe_div(value_num, VW)
        g["VALUE_STEPS"] = vpresent.sum().to(ct)
        g["VALUE_WEIGHT"] = VW
        g["VALUE_NUM"] = value_num
        g["RETURN_MEAN"], g["RETURN_M2"] = _moments(R.detach(), vw, vpresent)
        g["RESID_MEAN"], g["RESID_M2"] = _moments((R - v).detach(), vw, vpresent)
        g["BAD_VALUE_WEIGHTS"] = (~vfinite | (vw_raw < 0)).sum().to(ct)

    loss = policy_loss + cfg.entropy_coef * entropy_loss + cfg.value_coef * value_loss

    g["STEPS"] = present.sum().to(ct)
    g["WEIGHT"] = W
    g["POLICY_NUM"] = policy_num
    g["KL_K3"] = torch.where(present, w * ((torch.exp(L) - 1.0) - L), 0.0).sum()
    g["KL_K1"] = torch.where(present, w * -L, 0.0).sum()
    g["CLIP"] = torch.where(present & (clip_hi | clip_lo), w, 0.0).sum()
    g["CLIP_POS"] = torch.where(present & clip_hi, w, 0.0).sum()
    g["CLIP_NEG"] = torch.where(present & clip_lo, w, 0.0).sum()
    g["RATIO_MEAN"], g["RATIO_M2"] = _moments(r.detach(), w, present)
    g["RATIO_MIN"] = _min_ignore_nan(r, present)
    g["RATIO_MAX"] = _max_ignore_nan(r, present)
    g["BAD_WEIGHTS"] = bad_weights
    stats = torch.cat([torch.stack([g[st.name] for st in GLOBAL_STATS]), head_block.reshape(-1)]).detach().float()

    return RawOutput(
        loss=loss,
        policy_loss=policy_loss,
        entropy_loss=entropy_loss,
        value_loss=value_loss,
        log_probs=torch.stack(log_probs, dim=1),
        entropy=torch.stack(entropies, dim=1),
        joint_ratio=r.detach(),
        stats=stats,
    )

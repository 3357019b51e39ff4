"""An independent second implementation of docs/semantics.md sections 2 to 5: a plain per-step, per-head Python loop.

Everything here is python floats and ``math`` in float64, written straight from the formulas of docs/semantics.md;
nothing
is imported from ``esper_kernels`` except to read the config's fields and the layout's names and sizes. The
tests compare the reference backend with this loop (``spec_loss``), so a wrong formula in either shows up.

IEEE semantics are kept where docs/semantics.md relies on them (NaN propagates through arithmetic, exp overflows to
inf, log(0) = -inf), because ``math`` raises instead.

Inputs are the packed forms only: logits / masks [..., S], actions / old log-probs / relevance [..., H],
per-step tensors [...] and advantages [...] or [..., H]. The result holds the losses, the per-step outputs
(flattened to N rows) and every metric under the ``PPOMetrics.to_dict()`` key names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

NAN = float("nan")
INF = float("inf")


# -- IEEE-faithful scalar helpers ------------------------------------------------------------------------
def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _log(x: float) -> float:
    if math.isnan(x) or x < 0:
        return NAN
    if x == 0:
        return -INF
    return math.log(x)


def _clamp(x: float, lo: float, hi: float) -> float:
    if math.isnan(x):
        return NAN
    return lo if x < lo else hi if x > hi else x


def _min(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return NAN
    return a if a <= b else b


def _max(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return NAN
    return a if a >= b else b


def _logsumexp(xs: list[float]) -> float:
    if any(math.isnan(x) for x in xs):
        return NAN
    m = max(xs)
    if math.isinf(m):
        return m  # +inf: the sum overflows; -inf: every term is 0
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _mean_w(pairs: list[tuple[float, float]], empty: float) -> float:
    """sum w x / sum w over (w, x) pairs; ``empty`` when the weight sum is 0."""
    den = sum(w for w, _ in pairs)
    if den == 0:
        return empty
    return sum(w * x for w, x in pairs) / den


def _var_w(pairs: list[tuple[float, float]]) -> float:
    """Weighted population variance, NaN without weight, by the pairwise form sum_{i<j} w_i w_j (x_i - x_j)^2 / W^2.

    (Equal to sum w (x - mean)^2 / W, and exactly 0 for constant data, which the mean-based form is not.)
    """
    den = sum(w for w, _ in pairs)
    if den == 0:
        return NAN
    bad = [x for _, x in pairs if not math.isfinite(x)]
    if bad:  # an infinity (of one sign) spreads the data without bound; NaN, or both infinities, is NaN
        return INF if all(x == bad[0] for x in bad) and not math.isnan(bad[0]) else NAN
    total = 0.0
    for i, (wi, xi) in enumerate(pairs):
        for wj, xj in pairs[i + 1 :]:
            total += wi * wj * (xi - xj) ** 2
    return total / (den * den)


def _min_ignore_nan(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return min(xs) if xs else NAN


def _max_ignore_nan(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return max(xs) if xs else NAN


# -- config ------------------------------------------------------------------------------------------------
def _per_head(value, names: tuple[str, ...], default):
    if value is None:
        return [default] * len(names)
    if isinstance(value, Mapping):
        return [value.get(n, default) for n in names]
    return list(value)


def _rows(t, n: int, width: int | None):
    """A tensor (or None) -> python list of N rows (each a list of ``width`` items, or a scalar)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype.is_floating_point:
        t = t.double()
    elif t.dtype != torch.bool:
        t = t.long()
    flat = t.reshape(n, width) if width is not None else t.reshape(n)
    return flat.tolist()


# -- the loss ----------------------------------------------------------------------------------------------
def spec_loss(batch: dict, names: tuple[str, ...], sizes: tuple[int, ...], config) -> dict:
    """docs/semantics.md sections 2 to 5 for one batch. ``config`` is a PPOLossConfig (only its fields are read)."""
    H, S = len(sizes), sum(sizes)
    offsets = [sum(sizes[:h]) for h in range(H)]
    logits_t = batch["logits"]
    batch_shape = tuple(logits_t.shape[:-1])
    N = 1
    for d in batch_shape:
        N *= int(d)

    Z = _rows(logits_t, N, S)
    M = _rows(batch.get("action_masks"), N, S)
    ACT = _rows(batch["actions"], N, H)
    OLD = _rows(batch["old_log_probs"], N, H)
    adv_t = batch["advantages"]
    per_head_adv = adv_t.dim() == len(batch_shape) + 1
    ADV = _rows(adv_t, N, H if per_head_adv else None)
    REL = _rows(batch.get("head_relevance"), N, H)
    WT = _rows(batch.get("weights"), N, None)
    V = _rows(batch.get("values"), N, None)
    R = _rows(batch.get("returns"), N, None)
    VO = _rows(batch.get("old_values"), N, None)
    VWT = _rows(batch.get("value_weights"), N, None)

    # config, read field by field
    eps_lo = float(config.clip_eps)
    eps_hi = eps_lo if config.clip_eps_high is None else float(config.clip_eps_high)
    C = float(config.log_ratio_clamp)
    CJ = None if config.joint_log_ratio_clamp is None else float(config.joint_log_ratio_clamp)
    per_head = config.surrogate == "per_head"
    exclude = config.mask_fill is None  # invalid actions excluded from every max and sum
    F = -INF if exclude else float(config.mask_fill)
    k = [float(x) for x in _per_head(config.entropy_coef_per_head, names, 1.0)]
    floors = _per_head(config.prob_floor, names, None)

    # weights: present = finite and > 0
    w_raw = [1.0] * N if WT is None else [float(x) for x in WT]
    present = [math.isfinite(x) and x > 0 for x in w_raw]
    w = [x if p else 0.0 for x, p in zip(w_raw, present)]
    W = sum(w)
    bad_weights = sum(1 for x in w_raw if not math.isfinite(x) or x < 0)

    def relevant(i: int, h: int) -> bool:
        return present[i] and (REL is None or bool(REL[i][h]))

    # advantages, normalised over present steps (per column for per-head advantages)
    def adv_of(i: int, h: int) -> float:
        return ADV[i][h] if per_head_adv else ADV[i]

    adv_cols = H if per_head_adv else 1
    adv_norm = [[0.0] * adv_cols for _ in range(N)]
    for c in range(adv_cols):
        col = [(w[i], adv_of(i, c)) for i in range(N) if present[i]]
        if config.normalize_advantages and col:
            # the mean, computed relative to one of the values so that constant advantages normalise to exactly 0
            a0 = col[0][1]
            mean = a0 + _mean_w([(w_, a - a0) for w_, a in col], 0.0)
            var = _var_w(col)  # weighted population variance; NaN stays NaN
            if config.advantage_std == "unbiased":
                var = var * len(col) / (len(col) - 1) if len(col) > 1 else 0.0
            std = math.sqrt(var) if not math.isnan(var) else NAN
            eps = float(config.advantage_eps)
            den = std + eps if config.advantage_eps_add else _max(std, eps)
        for i in range(N):
            if not present[i]:
                continue
            a = adv_of(i, c)
            adv_norm[i][c] = (a - mean) / den if config.normalize_advantages else a

    def A(i: int, h: int) -> float:
        return adv_norm[i][h if per_head_adv else 0]

    # per step, per head
    ell = [[NAN] * H for _ in range(N)]
    ent = [[NAN] * H for _ in range(N)]
    lr = [[0.0] * H for _ in range(N)]
    nvalid = [[0] * H for _ in range(N)]
    taken_ok = [[False] * H for _ in range(N)]
    for i in range(N):
        if not present[i]:
            continue  # absent: per-step outputs unspecified, nothing used
        for h in range(H):
            A_h, off = sizes[h], offsets[h]
            z = Z[i][off : off + A_h]
            valid = [True] * A_h if M is None else [bool(x) for x in M[i][off : off + A_h]]
            n = sum(valid)
            nvalid[i][h] = n
            zhat = [z[j] if valid[j] else F for j in range(A_h)]
            # with exclusion, the softmax runs over the valid actions only (an invalid one has log-prob -inf)
            over_set = [j for j in range(A_h) if valid[j] or not exclude]
            if floors[h] is not None and over_set:
                lse = _logsumexp([zhat[j] for j in over_set])
                p = [_exp(x - lse) for x in zhat]
                f = min(float(floors[h]), 0.99 / max(n, 1))
                under = [valid[j] and p[j] < f for j in range(A_h)]
                over = [valid[j] and not (p[j] < f) for j in range(A_h)]
                s = max(1.0 - sum(under) * f, 1e-8) / _max(sum(p[j] for j in range(A_h) if over[j]), 1e-8)
                q = [f if under[j] else p[j] * s for j in range(A_h)]
                zhat = [_log(_max(q[j], 1e-8)) if valid[j] else F for j in range(A_h)]
            lse = _logsumexp([zhat[j] for j in over_set]) if over_set else NAN
            logp = [x - lse if (valid[j] or not exclude) else -INF for j, x in enumerate(zhat)]
            p = [_exp(x) for x in logp]
            a = ACT[i][h]
            if 0 <= a < A_h:
                # a row without a valid action has no log-prob, as an action out of range
                ell[i][h] = logp[a] if n > 0 else NAN
                taken_ok[i][h] = valid[a]
            else:
                ell[i][h] = NAN
            e = -sum(p[j] * logp[j] for j in range(A_h) if valid[j])
            if config.normalize_entropy:
                e = e / math.log(n) if n > 1 else 0.0
            ent[i][h] = e
            if relevant(i, h):
                lr[i][h] = _clamp(ell[i][h] - OLD[i][h], -C, C)

    # joint log-ratio and ratio
    L = [0.0] * N
    r = [1.0] * N
    for i in range(N):
        if not present[i]:
            continue
        total = 0.0
        for h in range(H):
            if relevant(i, h):
                total = total + lr[i][h]
        if CJ is not None:
            total = _clamp(total, -CJ, CJ)
        L[i] = total
        r[i] = _exp(total)

    def surrogate(ratio: float, adv: float) -> float:
        return _min(ratio * adv, _clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * adv)

    def clipped(ratio: float) -> tuple[bool, bool]:
        return ratio > 1.0 + eps_hi, ratio < 1.0 - eps_lo

    # policy loss
    rel_w = [sum(w[i] for i in range(N) if relevant(i, h)) for h in range(H)]
    if per_head:
        PL = 0.0
        for h in range(H):
            terms = [(w[i], surrogate(_exp(lr[i][h]), A(i, h))) for i in range(N) if relevant(i, h)]
            PL += -_mean_w(terms, 0.0)
    else:
        PL = -_mean_w([(w[i], surrogate(r[i], A(i, 0))) for i in range(N) if present[i]], 0.0)

    # entropy loss
    E = [_mean_w([(w[i], ent[i][h]) for i in range(N) if relevant(i, h)], NAN) for h in range(H)]
    EL = -sum(k[h] * (E[h] if rel_w[h] > 0 else 0.0) for h in range(H))

    # value loss
    has_values = V is not None
    VL = 0.0
    ev = vclip_frac = NAN
    bad_vw = NAN
    value_steps = 0
    VW = 0.0
    if has_values:
        vw_raw = w_raw if VWT is None else [float(x) for x in VWT]
        vpresent = [math.isfinite(x) and x > 0 for x in vw_raw]
        vw = [x if p else 0.0 for x, p in zip(vw_raw, vpresent)]
        VW = sum(vw)
        value_steps = sum(vpresent)
        bad_vw = float(sum(1 for x in vw_raw if not math.isfinite(x) or x < 0))
        clip_on = config.value_clip is not None and VO is not None
        d = float(config.value_clip) if clip_on else None
        terms, clip_terms, resid, rets = [], [], [], []
        for i in range(N):
            if not vpresent[i]:
                continue
            l1 = (V[i] - R[i]) ** 2
            if clip_on:
                dv = V[i] - VO[i]
                # vo + clamp(v - vo, -d, d), written so that it is exactly v where the clamp does not bind
                v_clipped = VO[i] + d if dv > d else VO[i] - d if dv < -d else V[i]
                l2 = (v_clipped - R[i]) ** 2
                terms.append((vw[i], _max(l1, l2)))
                clip_terms.append((vw[i], 1.0 if l2 > l1 else 0.0))
            else:
                terms.append((vw[i], l1))
            resid.append((vw[i], R[i] - V[i]))
            rets.append((vw[i], R[i]))
        VL = 0.5 * _mean_w(terms, 0.0)
        if VW > 0:
            var_r = _var_w(rets)
            ev = 1.0 - _var_w(resid) / var_r if var_r > 0 else NAN
        if clip_on:
            vclip_frac = _mean_w(clip_terms, NAN)
    has_value_data = has_values and value_steps > 0

    loss = PL + float(config.entropy_coef) * EL + float(config.value_coef) * VL

    # -- metrics ------------------------------------------------------------------------------------------
    pres = [i for i in range(N) if present[i]]
    any_rel = sum(rel_w)
    kl_h = [[(w[i], (_exp(lr[i][h]) - 1.0) - lr[i][h]) for i in range(N) if relevant(i, h)] for h in range(H)]
    approx_kl = (sum(sum(ww * x for ww, x in kl_h[h]) for h in range(H)) / any_rel) if any_rel > 0 else NAN
    # the documented form: sum_h cov_h kl_h / sum_h cov_h over heads with cov_h > 0 (same value, checked here)
    if any_rel > 0:
        cov = [rel_w[h] / W for h in range(H)]
        alt = sum(cov[h] * _mean_w(kl_h[h], NAN) for h in range(H) if cov[h] > 0) / sum(c for c in cov if c > 0)
        assert (math.isnan(alt) and math.isnan(approx_kl)) or abs(alt - approx_kl) <= 1e-9 * (1 + abs(alt))

    def frac(pred) -> float:
        return _mean_w([(w[i], 1.0 if pred(i) else 0.0) for i in pres], NAN)

    rstd = _var_w([(w[i], r[i]) for i in pres])
    if config.ratio_std == "unbiased" and not math.isnan(rstd):  # Bessel's correction; undefined for one step
        rstd = rstd * len(pres) / (len(pres) - 1) if len(pres) > 1 else NAN
    ratio_std = math.sqrt(rstd) if not math.isnan(rstd) else NAN
    ell_rel = [ell[i][h] for i in pres for h in range(H) if relevant(i, h)]
    nonfinite = [sum(1 for i in pres if not math.isfinite(ell[i][h])) for h in range(H)]
    m: dict[str, float] = {
        "loss": loss if (W > 0 or has_value_data) else NAN,
        "policy_loss": PL if (any_rel > 0 if per_head else W > 0) else NAN,
        "entropy_loss": EL if any_rel > 0 else NAN,
        "value_loss": VL if has_value_data else NAN,
        "approx_kl": approx_kl,
        "joint_kl_k3": _mean_w([(w[i], (_exp(L[i]) - 1.0) - L[i]) for i in pres], NAN),
        "joint_kl_k1": _mean_w([(w[i], -L[i]) for i in pres], NAN),
        "clip_fraction": frac(lambda i: any(clipped(r[i]))),
        "clip_fraction_positive": frac(lambda i: clipped(r[i])[0]),
        "clip_fraction_negative": frac(lambda i: clipped(r[i])[1]),
        "ratio_mean": _mean_w([(w[i], r[i]) for i in pres], NAN),
        "ratio_std": ratio_std,
        "ratio_min": _min_ignore_nan([r[i] for i in pres]),
        "ratio_max": _max_ignore_nan([r[i] for i in pres]),
        "log_prob_min": _min_ignore_nan(ell_rel),
        "log_prob_max": _max_ignore_nan(ell_rel),
        "steps": float(len(pres)),
        "weight_sum": W,
        "all_finite": 1.0 if (sum(nonfinite) == 0 and math.isfinite(loss)) else 0.0,
        "explained_variance": ev,
        "value_clip_fraction": vclip_frac,
        "invalid_weights": float(bad_weights),
        "invalid_value_weights": bad_vw,
    }
    head: dict[str, list[float]] = {
        "entropy": E,
        "kl": [_mean_w(kl_h[h], NAN) for h in range(H)],
        "clip_fraction": [
            _mean_w([(w[i], 1.0 if any(clipped(_exp(lr[i][h]))) else 0.0) for i in range(N) if relevant(i, h)], NAN)
            for h in range(H)
        ],
        "ratio_max": [_max_ignore_nan([_exp(lr[i][h]) for i in range(N) if relevant(i, h)]) for h in range(H)],
        "nonfinite": [float(x) for x in nonfinite],
        "empty_mask": [float(sum(1 for i in pres if nvalid[i][h] == 0)) for h in range(H)],
        "invalid_action": [float(sum(1 for i in pres if not taken_ok[i][h])) for h in range(H)],
        "valid_actions_min": [float(min(nvalid[i][h] for i in pres)) if pres else NAN for h in range(H)],
        "valid_actions_max": [float(max(nvalid[i][h] for i in pres)) if pres else NAN for h in range(H)],
        "valid_actions_mean": [_mean_w([(w[i], float(nvalid[i][h])) for i in pres], NAN) for h in range(H)],
        "single_action_fraction": [frac(lambda i, h=h: nvalid[i][h] == 1) for h in range(H)],
        "relevance_fraction": [frac(lambda i, h=h: relevant(i, h)) for h in range(H)],
        "learnable_fraction": [frac(lambda i, h=h: relevant(i, h) and nvalid[i][h] > 1) for h in range(H)],
    }
    for name, vals in head.items():
        for h, hname in enumerate(names):
            m[f"head_{hname}_{name}"] = vals[h]

    return {
        "loss": loss,
        "policy_loss": PL,
        "entropy_loss": EL,
        "value_loss": VL,
        "log_probs": ell,
        "entropy": ent,
        "joint_ratio": r,
        "present": present,
        "metrics": m,
    }

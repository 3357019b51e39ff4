"""Triton kernels of the fused PPO loss; the host side (launchers, backend) is ``triton_backend.py``.

Three kernels (``docs/fused_math.md`` has the math):

* ``_ppo_fwd_kernel``: one program per block of ``BLOCK_N`` rows reads every head's logits and masks once
  and writes the per-step outputs (log-probs, entropy, joint ratio), the small per-step coefficients the
  backward needs (``SAVED`` [N, H + 1]: the unnormalised d loss / d ell of every head, then the unnormalised
  d value-loss / d value) and one row of partial statistics (``PART`` [programs, K], the layout of
  ``esper_kernels.stats``: block sums, minima, maxima and (weight, mean, M2) moments).
* ``_ppo_reduce_kernel``: merges rows of partial statistics in a fixed order (no float atomics, so the
  result is bitwise reproducible); the last stage (one program) writes the statistics vector and the four
  losses, whose global normalisers (W, den_h, the value weight) the backward reads back from the stats.
* ``_ppo_bwd_kernel``: re-reads logits and masks, recomputes the (floored) softmax and writes the gradient
  of every head in the logits' dtype, zero for absent steps and masked actions.

Per-head tensors come as tuples (one pointer, row stride and column offset per head), so packed [N, S]
logits and separate [N, A_h] tensors run the same code without a copy. A head is either *small* (its
padded width ``BLK`` fits one [BLOCK_N, BLK] register tile: loaded once, reduced along columns) or *wide*
(streamed in [BLOCK_N, BLOCK_C] column blocks with an online log-sum-exp and online entropy). Row offsets
are int64 (N x S may exceed 2^31); rows are on grid axis 0.

Only constructs the Triton compiler accepts are used (tuples indexed by ``tl.static_range`` indices,
constexpr ``if``, ``range`` loops whose carried values keep one type); NaN-sensitive selections use
``tl.where`` (never ``tl.minimum``/``tl.maximum``, whose NaN handling differs between the GPU and the
interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---- statistics layout (mirrors esper_kernels.stats; triton_backend checks these against it at import) ----
GS = tl.constexpr(22)  # GLOBAL_SIZE
HS = tl.constexpr(16)  # HEAD_SIZE
G_STEPS = tl.constexpr(0)
G_WEIGHT = tl.constexpr(1)
G_POLICY_NUM = tl.constexpr(2)
G_KL_K3 = tl.constexpr(3)
G_KL_K1 = tl.constexpr(4)
G_CLIP = tl.constexpr(5)
G_CLIP_POS = tl.constexpr(6)
G_CLIP_NEG = tl.constexpr(7)
G_RATIO_MEAN = tl.constexpr(8)
G_RATIO_M2 = tl.constexpr(9)
G_RATIO_MIN = tl.constexpr(10)
G_RATIO_MAX = tl.constexpr(11)
G_BAD_WEIGHTS = tl.constexpr(12)
G_VALUE_STEPS = tl.constexpr(13)
G_VALUE_WEIGHT = tl.constexpr(14)
G_VALUE_NUM = tl.constexpr(15)
G_VALUE_CLIP = tl.constexpr(16)
G_RETURN_MEAN = tl.constexpr(17)
G_RETURN_M2 = tl.constexpr(18)
G_RESID_MEAN = tl.constexpr(19)
G_RESID_M2 = tl.constexpr(20)
G_BAD_VALUE_WEIGHTS = tl.constexpr(21)
HD_REL_WEIGHT = tl.constexpr(0)
HD_POLICY_NUM = tl.constexpr(1)
HD_ENTROPY_NUM = tl.constexpr(2)
HD_KL_NUM = tl.constexpr(3)
HD_CLIP_NUM = tl.constexpr(4)
HD_RATIO_MAX = tl.constexpr(5)
HD_LOGP_MIN = tl.constexpr(6)
HD_LOGP_MAX = tl.constexpr(7)
HD_NONFINITE = tl.constexpr(8)
HD_EMPTY_MASK = tl.constexpr(9)
HD_INVALID_ACTION = tl.constexpr(10)
HD_VALID_MIN = tl.constexpr(11)
HD_VALID_MAX = tl.constexpr(12)
HD_VALID_SUM = tl.constexpr(13)
HD_SINGLE = tl.constexpr(14)
HD_LEARNABLE = tl.constexpr(15)


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _isfinite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp (NaN passes through)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _safe_div(num, den):
    """num / den, 0 where den <= 0 (SPEC 3.7 for loss terms)."""
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _tile_offsets(rows64, rs, co, cols):
    """int64 element offsets of a [rows, cols] tile of a row-strided head (column stride 1)."""
    return rows64[:, None] * rs + co + cols[None, :]


@triton.jit
def _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                A: tl.constexpr, HAS_MASK: tl.constexpr):
    """One [rows, cols] block of a head: masked logits zhat (F at invalid, -inf at padding) and ``use``.

    Only present rows are read; absent rows see every action invalid, so nothing of theirs is used.
    """
    col_ok = cols < A
    ld = present[:, None] & col_ok[None, :]
    z = tl.load(lg + _tile_offsets(rows64, lg_rs, lg_co, cols), mask=ld, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(mk + _tile_offsets(rows64, mk_rs, mk_co, cols), mask=ld, other=0) != 0
        use = ld & valid
    else:
        use = ld
    zhat = tl.where(use, z, mask_fill)
    zhat = tl.where(col_ok[None, :], zhat, float("-inf"))
    return zhat, use, col_ok


@triton.jit
def _log_softmax_tile(zhat):
    """logp = zhat - logsumexp(zhat) (as torch: max + log(sum(exp(x - max)))), and p = exp(logp)."""
    m = tl.max(zhat, axis=1)
    e = tl.exp(zhat - m[:, None])
    s = tl.sum(e, axis=1)
    lse = m + tl.log(s)
    logp = zhat - lse[:, None]
    p = tl.exp(logp)
    return logp, p


@triton.jit
def _div_rn(x, y):
    """x / y rounded to nearest (tl.math.div_rn does not broadcast: both operands must have one shape)."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)


@triton.jit
def _floor_params(n, floor):
    """f = min(floor, 0.99 / max(n, 1)) as the reference computes it (reciprocal, then * 0.99)."""
    return tl.minimum(_div_rn(tl.zeros_like(n) + 1.0, tl.maximum(n, 1.0)) * 0.99, floor)


@triton.jit
def _floor_tile(zhat, use, col_ok, n, floor, mask_fill):
    """esper's floor-preserving renormalisation of a whole-row tile (reference ``masked_log_softmax``)."""
    m1 = tl.max(zhat, axis=1)
    e1 = tl.exp(zhat - m1[:, None])
    s1 = tl.sum(e1, axis=1)
    p1 = _div_rn(e1, s1[:, None])
    f = _floor_params(n, floor)
    under = use & (p1 < f[:, None])
    over = use & ~(p1 < f[:, None])
    nu = tl.sum(under.to(tl.float32), axis=1)
    a_s = tl.maximum(1.0 - nu * f, 1e-8)
    po = tl.sum(tl.where(over, p1, 0.0), axis=1)
    s_f = a_s / tl.maximum(po, 1e-8)
    q = tl.where(under, f[:, None], p1 * s_f[:, None])
    z2 = tl.where(use, tl.log(tl.maximum(q, 1e-8)), mask_fill)
    z2 = tl.where(col_ok[None, :], z2, float("-inf"))
    return z2, p1, under, over, a_s, po, s_f, q


@triton.jit
def _floor_block(zhat1, use, col_ok, m1, s1, f, s_f, mask_fill):
    """The floor applied to one column block of a wide head, from the row's (m1, s1, f, s)."""
    p1 = _div_rn(tl.exp(zhat1 - m1[:, None]), s1[:, None])
    under = use & (p1 < f[:, None])
    over = use & ~(p1 < f[:, None])
    q = tl.where(under, f[:, None], p1 * s_f[:, None])
    z2 = tl.where(use, tl.log(tl.maximum(q, 1e-8)), mask_fill)
    z2 = tl.where(col_ok[None, :], z2, float("-inf"))
    return z2, p1, under, over, q


@triton.jit
def _norm_entropy(ent, n):
    return tl.where(n > 1.0, ent / tl.log(tl.maximum(n, 2.0)), 0.0)


# ------------------------------------------------------------------------------------------------------
# wide heads: streaming passes over column blocks
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _wide_lse_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill,
                   A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr):
    """Online (max, sum exp) of the un-floored masked logits, and the valid count n."""
    cols = tl.arange(0, BLOCK_C)
    zhat, use, _col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                    A, HAS_MASK)
    m = tl.max(zhat, axis=1)
    s = tl.sum(tl.exp(zhat - m[:, None]), axis=1)
    n = tl.sum(use.to(tl.float32), axis=1)
    for c0 in range(BLOCK_C, A, BLOCK_C):
        # (fresh names inside the loop: only m, s, n are loop-carried)
        cb = c0 + tl.arange(0, BLOCK_C)
        zb, ub, _okb = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cb, mask_fill, A, HAS_MASK)
        m_new = tl.maximum(m, tl.max(zb, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zb - m_new[:, None]), axis=1)
        m = m_new
        n += tl.sum(ub.to(tl.float32), axis=1)
    return m, s, n


@triton.jit
def _wide_floor_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, m1, s1, n, floor,
                     A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr):
    """The floor's row constants of a wide head: (f, a_s, P_O, s)."""
    f = _floor_params(n, floor)
    nu = tl.zeros_like(m1)
    po = tl.zeros_like(m1)
    for c0 in range(0, A, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        zhat, use, _col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                        A, HAS_MASK)
        p1 = _div_rn(tl.exp(zhat - m1[:, None]), s1[:, None])
        under = use & (p1 < f[:, None])
        over = use & ~(p1 < f[:, None])
        nu += tl.sum(under.to(tl.float32), axis=1)
        po += tl.sum(tl.where(over, p1, 0.0), axis=1)
    a_s = tl.maximum(1.0 - nu * f, 1e-8)
    s_f = a_s / tl.maximum(po, 1e-8)
    return f, a_s, po, s_f


@triton.jit
def _wide_entropy_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, a_safe,
                       m1, s1, f, s_f,
                       A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr):
    """Online log-sum-exp and entropy of the (floored) masked logits of a wide head.

    Accumulated relative to the running max m: s = sum exp(zhat - m) over all columns, sv and
    t = sum exp(zhat - m) (zhat - m) over valid columns; lse = m + log s, P_V = sv / s and
    Hraw = P_V log s - t / s. Also zhat at the taken action and whether that action is valid.
    """
    cols = tl.arange(0, BLOCK_C)
    zhat, use, col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                    A, HAS_MASK)
    if FLOOR_ON:
        zhat, _p1, _under, _over, _q = _floor_block(zhat, use, col_ok, m1, s1, f, s_f, mask_fill)
    hit = cols[None, :] == a_safe[:, None]
    m = tl.max(zhat, axis=1)
    e = tl.exp(zhat - m[:, None])
    s = tl.sum(e, axis=1)
    sv = tl.sum(tl.where(use, e, 0.0), axis=1)
    t = tl.sum(tl.where(use, e * (zhat - m[:, None]), 0.0), axis=1)
    zsel = tl.sum(tl.where(hit, zhat, 0.0), axis=1)
    taken = tl.sum((hit & use).to(tl.float32), axis=1)
    for c0 in range(BLOCK_C, A, BLOCK_C):
        # (fresh names inside the loop: only the row accumulators are loop-carried)
        cb = c0 + tl.arange(0, BLOCK_C)
        zb, ub, okb = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cb, mask_fill, A, HAS_MASK)
        if FLOOR_ON:
            zb, _p1b, _underb, _overb, _qb = _floor_block(zb, ub, okb, m1, s1, f, s_f, mask_fill)
        hb = cb[None, :] == a_safe[:, None]
        m_new = tl.maximum(m, tl.max(zb, axis=1))
        alpha = tl.exp(m - m_new)
        eb = tl.exp(zb - m_new[:, None])
        t = alpha * (t + (m - m_new) * sv) + tl.sum(tl.where(ub, eb * (zb - m_new[:, None]), 0.0), axis=1)
        s = alpha * s + tl.sum(eb, axis=1)
        sv = alpha * sv + tl.sum(tl.where(ub, eb, 0.0), axis=1)
        m = m_new
        zsel += tl.sum(tl.where(hb, zb, 0.0), axis=1)
        taken += tl.sum((hb & ub).to(tl.float32), axis=1)
    logs = tl.log(s)
    lse = m + logs
    pv = sv / s
    hraw = pv * logs - t / s
    return lse, hraw, pv, zsel, taken


@triton.jit
def _wide_row_stats(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, a_safe, floor,
                    A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr):
    """Every row constant of a wide head: (lse, Hraw, P_V, zhat[a], taken valid, n, floor constants)."""
    m1, s1, n = _wide_lse_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, A, BLOCK_C, HAS_MASK)
    if FLOOR_ON:
        f, a_s, po, s_f = _wide_floor_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill,
                                           m1, s1, n, floor, A, BLOCK_C, HAS_MASK)
    else:
        f = m1
        a_s = m1
        po = m1
        s_f = m1
    lse, hraw, pv, zsel, taken = _wide_entropy_pass(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill,
                                                    a_safe, m1, s1, f, s_f, A, BLOCK_C, HAS_MASK, FLOOR_ON)
    return lse, hraw, pv, zsel, taken, n, m1, s1, f, a_s, po, s_f


# ------------------------------------------------------------------------------------------------------
# per-head forward: (ell, entropy as used in the loss, n, taken action valid)
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_head_small(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, a_safe, in_range, floor, mask_fill,
                    A: tl.constexpr, BLK: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr,
                    NORM_ENT: tl.constexpr):
    cols = tl.arange(0, BLK)
    zhat, use, col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                    A, HAS_MASK)
    n = tl.sum(use.to(tl.float32), axis=1)
    if FLOOR_ON:
        zhat, _p1, _under, _over, _a_s, _po, _s_f, _q = _floor_tile(zhat, use, col_ok, n, floor, mask_fill)
    logp, p = _log_softmax_tile(zhat)
    ent = -tl.sum(tl.where(use, p * logp, 0.0), axis=1)
    if NORM_ENT:
        ent = _norm_entropy(ent, n)
    hit = cols[None, :] == a_safe[:, None]
    ell = tl.where(in_range, tl.sum(tl.where(hit, logp, 0.0), axis=1), float("nan"))
    if HAS_MASK:
        taken = in_range & (tl.sum((hit & use).to(tl.int32), axis=1) > 0)
    else:
        taken = in_range
    return ell, ent, n, taken


@triton.jit
def _fwd_head_wide(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, a_safe, in_range, floor, mask_fill,
                   A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr,
                   NORM_ENT: tl.constexpr):
    lse, hraw, _pv, zsel, taken_n, n, _m1, _s1, _f, _a_s, _po, _s_f = _wide_row_stats(
        lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, a_safe, floor, A, BLOCK_C, HAS_MASK,
        FLOOR_ON)
    ent = hraw
    if NORM_ENT:
        ent = _norm_entropy(ent, n)
    ell = tl.where(in_range, zsel - lse, float("nan"))
    if HAS_MASK:
        taken = in_range & (taken_n > 0)
    else:
        taken = in_range
    return ell, ent, n, taken


# ------------------------------------------------------------------------------------------------------
# per-head backward: writes d loss / d logits of one head for BLOCK_N rows
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_head_small(lg, lg_rs, lg_co, mk, mk_rs, mk_co, gr, gr_rs, gr_co, rows64, row_ok, present, a_safe,
                    gL, gE, floor, mask_fill,
                    A: tl.constexpr, BLK: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr,
                    NORM_ENT: tl.constexpr):
    cols = tl.arange(0, BLK)
    zhat, use, col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                    A, HAS_MASK)
    n = tl.sum(use.to(tl.float32), axis=1)
    if FLOOR_ON:
        zhat, p1, _under, over, _a_s, po, s_f, q = _floor_tile(zhat, use, col_ok, n, floor, mask_fill)
    logp, p = _log_softmax_tile(zhat)
    if NORM_ENT:
        ghr = tl.where(n > 1.0, gE / tl.log(tl.maximum(n, 2.0)), 0.0)
    else:
        ghr = gE
    ng = -ghr
    hit = cols[None, :] == a_safe[:, None]
    # autograd's order: d/d logp of ell (one-hot) and of -sum_V p logp (directly and through p = exp(logp)),
    # then the log-softmax: d zhat = g - p * sum(g)
    g = tl.where(hit, gL[:, None], 0.0) + tl.where(use, ng[:, None] * p + (ng[:, None] * logp) * p, 0.0)
    sig = tl.sum(g, axis=1)
    gz = g - p * sig[:, None]
    if FLOOR_ON:
        # back through the floor (docs/fused_math.md); where no 1e-8 clamp binds, the chain simplifies exactly to
        # [k in O] (g_k - p1_k sum_O g / P_O), g = d/d logp (the log-softmax's sum(g) term and the under-floor
        # actions drop out): accurate near a uniform distribution, where the chain's float32 terms (O(1) in the
        # incoming gradients) cancel to ~1e-6 noise
        gq = tl.where(use & (q >= 1e-8), gz / tl.maximum(q, 1e-8), 0.0)
        T = tl.sum(tl.where(over, gq * p1, 0.0), axis=1)
        pc = tl.maximum(po, 1e-8)
        g_po = tl.where(po >= 1e-8, -T * (s_f / pc), 0.0)
        g_p1 = tl.where(over, gq * s_f[:, None] + g_po[:, None], 0.0)
        sig1 = tl.sum(g_p1 * p1, axis=1)
        g_o = tl.sum(tl.where(over, g, 0.0), axis=1)
        n_bad = tl.sum((over & (q < 1e-8)).to(tl.float32), axis=1)
        regular = (po >= 1e-8) & (n_bad == 0.0)
        closed = tl.where(over, g - p1 * (g_o / pc)[:, None], 0.0)
        gz = tl.where(regular[:, None], closed, p1 * (g_p1 - sig1[:, None]))
    grad = tl.where(use, gz, 0.0)
    st = row_ok[:, None] & col_ok[None, :]
    tl.store(gr + _tile_offsets(rows64, gr_rs, gr_co, cols), grad.to(gr.dtype.element_ty), mask=st)


@triton.jit
def _bwd_head_wide(lg, lg_rs, lg_co, mk, mk_rs, mk_co, gr, gr_rs, gr_co, rows64, row_ok, present, a_safe,
                   gL, gE, floor, mask_fill,
                   A: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR_ON: tl.constexpr,
                   NORM_ENT: tl.constexpr):
    lse, hraw, pv, _zsel, _taken_n, n, m1, s1, f, _a_s, po, s_f = _wide_row_stats(
        lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, mask_fill, a_safe, floor, A, BLOCK_C, HAS_MASK,
        FLOOR_ON)
    if NORM_ENT:
        ghr = tl.where(n > 1.0, gE / tl.log(tl.maximum(n, 2.0)), 0.0)
    else:
        ghr = gE
    ng = -ghr
    # sum_k d/d logp_k = gL + ng (P_V - Hraw) in closed form (sum_V p logp = -Hraw)
    sig = gL + ng * (pv - hraw)
    if FLOOR_ON:
        # the row sums of the floor's backward (T = sum_O gq p1, G_O = sum_O g, clamped q in O; see
        # _bwd_head_small) need their own pass before the gradient can be written
        T = tl.zeros_like(lse)
        g_o = tl.zeros_like(lse)
        n_bad = tl.zeros_like(lse)
        for c0 in range(0, A, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            zhat1, use, col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                             A, HAS_MASK)
            zhat, p1, _under, over, q = _floor_block(zhat1, use, col_ok, m1, s1, f, s_f, mask_fill)
            logp = zhat - lse[:, None]
            p = tl.exp(logp)
            hit = cols[None, :] == a_safe[:, None]
            g = tl.where(hit, gL[:, None], 0.0) + tl.where(use, ng[:, None] * p + (ng[:, None] * logp) * p, 0.0)
            gz = g - p * sig[:, None]
            gq = tl.where(use & (q >= 1e-8), gz / tl.maximum(q, 1e-8), 0.0)
            T += tl.sum(tl.where(over, gq * p1, 0.0), axis=1)
            g_o += tl.sum(tl.where(over, g, 0.0), axis=1)
            n_bad += tl.sum((over & (q < 1e-8)).to(tl.float32), axis=1)
        pc = tl.maximum(po, 1e-8)
        g_po = tl.where(po >= 1e-8, -T * (s_f / pc), 0.0)
        sig1 = s_f * T + g_po * po
        regular = (po >= 1e-8) & (n_bad == 0.0)
        go_po = g_o / pc
    for c0 in range(0, A, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        zhat, use, col_ok = _load_block(lg, lg_rs, lg_co, mk, mk_rs, mk_co, rows64, present, cols, mask_fill,
                                        A, HAS_MASK)
        if FLOOR_ON:
            zhat, p1, _under, over, q = _floor_block(zhat, use, col_ok, m1, s1, f, s_f, mask_fill)
        logp = zhat - lse[:, None]
        p = tl.exp(logp)
        hit = cols[None, :] == a_safe[:, None]
        g = tl.where(hit, gL[:, None], 0.0) + tl.where(use, ng[:, None] * p + (ng[:, None] * logp) * p, 0.0)
        gz = g - p * sig[:, None]
        if FLOOR_ON:
            gq = tl.where(use & (q >= 1e-8), gz / tl.maximum(q, 1e-8), 0.0)
            g_p1 = tl.where(over, gq * s_f[:, None] + g_po[:, None], 0.0)
            closed = tl.where(over, g - p1 * go_po[:, None], 0.0)
            gz = tl.where(regular[:, None], closed, p1 * (g_p1 - sig1[:, None]))
        grad = tl.where(use, gz, 0.0)
        st = row_ok[:, None] & col_ok[None, :]
        tl.store(gr + _tile_offsets(rows64, gr_rs, gr_co, cols), grad.to(gr.dtype.element_ty), mask=st)


# ------------------------------------------------------------------------------------------------------
# one-reduction statistics of a row block: tl.reduce over tuples (one shared-memory exchange per tuple
# instead of one per entry); the operands are in the order of the statistics layout
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _head_combine(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                  b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15):
    """HD layout: sums, except RATIO_MAX (5), LOGP_MIN (6), LOGP_MAX (7), VALID_MIN (11), VALID_MAX (12)."""
    return (a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, tl.maximum(a5, b5), tl.minimum(a6, b6),
            tl.maximum(a7, b7), a8 + b8, a9 + b9, a10 + b10, tl.minimum(a11, b11), tl.maximum(a12, b12),
            a13 + b13, a14 + b14, a15 + b15)


@triton.jit
def _global_combine(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                    a20, a21,
                    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, b16, b17, b18, b19,
                    b20, b21):
    """G layout: sums; RATIO_MIN (10) and RATIO_MAX (11); weighted moments merged by Chan's formula:
    RATIO_MEAN/M2 (8, 9) weighted by WEIGHT (1), RETURN_MEAN/M2 (17, 18) and RESID_MEAN/M2 (19, 20) by
    VALUE_WEIGHT (14). (Written out: a helper call per element is slow in the interpreter.)"""
    w = a1 + b1
    pos = w > 0
    ws = tl.where(pos, w, 1.0)
    f_b = tl.where(pos, b1 / ws, 0.0)
    f_ab = tl.where(pos, (a1 * b1) / ws, 0.0)
    d = b8 - a8
    m8 = tl.where(pos, a8 + d * f_b, 0.0)
    m9 = a9 + b9 + (d * d) * f_ab
    v = a14 + b14
    vpos = v > 0
    vs = tl.where(vpos, v, 1.0)
    g_b = tl.where(vpos, b14 / vs, 0.0)
    g_ab = tl.where(vpos, (a14 * b14) / vs, 0.0)
    d17 = b17 - a17
    m17 = tl.where(vpos, a17 + d17 * g_b, 0.0)
    m18 = a18 + b18 + (d17 * d17) * g_ab
    d19 = b19 - a19
    m19 = tl.where(vpos, a19 + d19 * g_b, 0.0)
    m20 = a20 + b20 + (d19 * d19) * g_ab
    return (a0 + b0, w, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7, m8, m9,
            tl.minimum(a10, b10), tl.maximum(a11, b11), a12 + b12, a13 + b13, v, a15 + b15, a16 + b16,
            m17, m18, m19, m20, a21 + b21)


# ------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N"])
def _ppo_fwd_kernel(
    LG, LG_RS, LG_CO, MK, MK_RS, MK_CO,  # per-head tuples: logits / masks pointers, row strides, column offsets
    ACT, ACT_S, OLD, OLD_S, REL, REL_S, FLOOR,  # per-head tuples: actions, old log-probs, relevance, floors
    ADV, ADV_SN, ADV_SH, WT, WT_S,  # advantages [N] or [N, H]; weights
    VAL, VAL_S, RET, RET_S, OVAL, OVAL_S, VWT, VWT_S,  # values, returns, old values, value weights
    LOGP, ENT, JR, SAVED, PART,  # outputs: [N, H], [N, H], [N], [N, H + 1], [programs, K]
    N, mask_fill, log_clamp, joint_clamp, clip_lo, clip_hi, value_clip,
    H: tl.constexpr, SIZES: tl.constexpr, BLKS: tl.constexpr, WIDE: tl.constexpr, FLOOR_ON: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REL: tl.constexpr, HAS_W: tl.constexpr, HAS_V: tl.constexpr,
    HAS_VCLIP: tl.constexpr, HAS_VW: tl.constexpr, PER_HEAD: tl.constexpr, ADV_PER_HEAD: tl.constexpr,
    NORM_ENT: tl.constexpr, HAS_JCLAMP: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    part = PART + pid.to(tl.int64) * K
    saved = SAVED + rows64 * (H + 1)

    # steps: present = finite w > 0; anything else is absent (and a bad weight if < 0 or non-finite)
    if HAS_W:
        w_raw = tl.load(WT + rows64 * WT_S, mask=row_ok, other=0).to(tl.float32)
    else:
        w_raw = tl.where(row_ok, 1.0, 0.0)
    w_fin = _isfinite(w_raw)
    present = row_ok & w_fin & (w_raw > 0)
    w = tl.where(present, w_raw, 0.0)
    bad_w = row_ok & (~w_fin | (w_raw < 0))
    adv0 = tl.where(present, tl.load(ADV + rows64 * ADV_SN, mask=present, other=0).to(tl.float32), 0.0)

    Lsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    flags = tl.zeros([BLOCK_N], dtype=tl.int32)
    for h in tl.static_range(H):
        a = tl.load(ACT[h] + rows64 * ACT_S[h], mask=row_ok, other=0)
        in_range = (a >= 0) & (a < SIZES[h])
        a_safe = tl.where(in_range, a, 0).to(tl.int32)
        if HAS_REL:
            rel = present & (tl.load(REL[h] + rows64 * REL_S[h], mask=present, other=0) != 0)
        else:
            rel = present
        if WIDE[h]:
            ell, ent, n, taken = _fwd_head_wide(LG[h], LG_RS[h], LG_CO[h], MK[h], MK_RS[h], MK_CO[h], rows64,
                                                present, a_safe, in_range, FLOOR[h], mask_fill, SIZES[h], BLOCK_C,
                                                HAS_MASK, FLOOR_ON[h], NORM_ENT)
        else:
            ell, ent, n, taken = _fwd_head_small(LG[h], LG_RS[h], LG_CO[h], MK[h], MK_RS[h], MK_CO[h], rows64,
                                                 present, a_safe, in_range, FLOOR[h], mask_fill, SIZES[h], BLKS[h],
                                                 HAS_MASK, FLOOR_ON[h], NORM_ENT)
        tl.store(LOGP + rows64 * H + h, ell, mask=row_ok)
        tl.store(ENT + rows64 * H + h, ent, mask=row_ok)

        # clamped log-ratio of relevant present steps (old log-probs of the others are never used)
        old = tl.load(OLD[h] + rows64 * OLD_S[h], mask=rel, other=0).to(tl.float32)
        d = tl.where(rel, ell - old, 0.0)
        inside = (d >= -log_clamp) & (d <= log_clamp)
        lr = tl.where(rel, _clamp(d, -log_clamp, log_clamp), 0.0)
        ratio = tl.exp(lr)
        Lsum += lr
        wr = tl.where(rel, w, 0.0)

        if PER_HEAD:
            if ADV_PER_HEAD:
                adv = tl.where(present, tl.load(ADV + rows64 * ADV_SN + h * ADV_SH, mask=present,
                                                other=0).to(tl.float32), 0.0)
            else:
                adv = adv0
            s1 = ratio * adv
            s2 = _clamp(ratio, clip_lo, clip_hi) * adv
            surr = tl.where((s1 <= s2) | (s1 != s1), s1, s2)
            pol = tl.where(rel, wr * surr, 0.0)
            # d PL / d ell times den_h (divided out in the backward); torch.minimum's branch rule, NaN included
            u = tl.where(rel & inside & ~(s1 > s2), -(w * adv) * ratio, 0.0)
            tl.store(saved + h, u, mask=row_ok)
        else:
            pol = tl.zeros([BLOCK_N], dtype=tl.float32)
            flags = flags | tl.where(rel & inside, 1 << h, 0)

        # per-head statistics of this row block (HD layout), in one reduction
        ok_ell = rel & (ell == ell)
        hs = tl.reduce((
            wr,
            pol,
            tl.where(rel, wr * ent, 0.0),
            tl.where(rel, wr * ((ratio - 1.0) - lr), 0.0),
            tl.where(rel & ((ratio > clip_hi) | (ratio < clip_lo)), wr, 0.0),
            tl.where(rel & (ratio == ratio), ratio, float("-inf")),
            tl.where(ok_ell, ell, float("inf")),
            tl.where(ok_ell, ell, float("-inf")),
            (present & ~_isfinite(ell)).to(tl.float32),
            (present & (n == 0.0)).to(tl.float32),
            (present & ~taken).to(tl.float32),
            tl.where(present, n, float("inf")),
            tl.where(present, n, float("-inf")),
            tl.where(present, w * n, 0.0),
            tl.where(present & (n == 1.0), w, 0.0),
            tl.where(rel & (n > 1.0), w, 0.0),
        ), 0, _head_combine)
        for j in tl.static_range(HS):
            tl.store(part + GS + h * HS + j, hs[j])

    # the TRUE joint ratio
    if HAS_JCLAMP:
        jin = (Lsum >= -joint_clamp) & (Lsum <= joint_clamp)
        L = _clamp(Lsum, -joint_clamp, joint_clamp)
    else:
        jin = rows >= 0
        L = Lsum
    L = tl.where(present, L, 0.0)
    r = tl.exp(L)
    tl.store(JR + rows64, r, mask=row_ok)
    if PER_HEAD:
        gpol = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        s1 = r * adv0
        s2 = _clamp(r, clip_lo, clip_hi) * adv0
        surr = tl.where((s1 <= s2) | (s1 != s1), s1, s2)
        gpol = tl.where(present, w * surr, 0.0)
        base = tl.where(present & jin & ~(s1 > s2), -(w * adv0) * r, 0.0)
        for h in tl.static_range(H):
            tl.store(saved + h, tl.where(((flags >> h) & 1) != 0, base, 0.0), mask=row_ok)

    # value loss terms
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_V:
        if HAS_VW:
            vw_raw = tl.load(VWT + rows64 * VWT_S, mask=row_ok, other=0).to(tl.float32)
        else:
            vw_raw = w_raw
        vw_fin = _isfinite(vw_raw)
        vpres = row_ok & vw_fin & (vw_raw > 0)
        vw = tl.where(vpres, vw_raw, 0.0)
        v = tl.where(vpres, tl.load(VAL + rows64 * VAL_S, mask=vpres, other=0).to(tl.float32), 0.0)
        R = tl.where(vpres, tl.load(RET + rows64 * RET_S, mask=vpres, other=0).to(tl.float32), 0.0)
        d1 = v - R
        l1 = d1 * d1
        dl1 = 2.0 * d1
        if HAS_VCLIP:
            vo = tl.where(vpres, tl.load(OVAL + rows64 * OVAL_S, mask=vpres, other=0).to(tl.float32), 0.0)
            dv = v - vo
            # vo + clamp(v - vo, -d, d), exactly v where the clamp does not bind (as the reference)
            v_clipped = tl.where(dv > value_clip, vo + value_clip, tl.where(dv < -value_clip, vo - value_clip, v))
            d2 = v_clipped - R
            l2 = d2 * d2
            vl = tl.where((l1 != l1) | (l1 >= l2), l1, l2)
            vclip = tl.where(vpres & (l2 > l1), vw, 0.0)
            dl2 = tl.where((dv >= -value_clip) & (dv <= value_clip), 2.0 * d2, 0.0)
            dvl = tl.where(l1 > l2, dl1, tl.where(l2 > l1, dl2, 0.5 * dl1 + 0.5 * dl2))
        else:
            vl = l1
            vclip = zero
            dvl = dl1
        tl.store(saved + H, tl.where(vpres, vw * dvl, 0.0), mask=row_ok)
        vsteps = vpres.to(tl.float32)
        vnum = tl.where(vpres, vw * vl, 0.0)
        ret = R
        res = tl.where(vpres, R - v, 0.0)
        bad_vw = (row_ok & (~vw_fin | (vw_raw < 0))).to(tl.float32)
    else:
        vsteps = zero
        vw = zero
        vnum = zero
        vclip = zero
        ret = zero
        res = zero
        bad_vw = zero

    # global statistics of this row block (G layout), in one reduction; a moment's per-row part is
    # (its weight, the value, M2 = 0)
    c_hi = r > clip_hi
    c_lo = r < clip_lo
    gs = tl.reduce((
        present.to(tl.float32),
        w,
        gpol,
        tl.where(present, w * ((r - 1.0) - L), 0.0),
        tl.where(present, w * -L, 0.0),
        tl.where(present & (c_hi | c_lo), w, 0.0),
        tl.where(present & c_hi, w, 0.0),
        tl.where(present & c_lo, w, 0.0),
        tl.where(present, r, 0.0),
        zero,
        tl.where(present & (r == r), r, float("inf")),
        tl.where(present & (r == r), r, float("-inf")),
        bad_w.to(tl.float32),
        vsteps,
        vw,
        vnum,
        vclip,
        ret,
        zero,
        res,
        zero,
        bad_vw,
    ), 0, _global_combine)
    for j in tl.static_range(GS):
        tl.store(part + j, gs[j])


# ------------------------------------------------------------------------------------------------------
# deterministic reduction of partial statistics (fixed order; the last stage also writes the losses)
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _merge_moments(wa, ma, qa, wb, mb, qb):
    """(mean, M2) of two parts with weighted moments (wa, ma, qa) and (wb, mb, qb) (Chan et al.); exact when
    either weight is 0, so a single step keeps M2 = 0 (the same formula as _global_combine's)."""
    w = wa + wb
    pos = w > 0
    ws = tl.where(pos, w, 1.0)
    d = mb - ma
    mean = tl.where(pos, ma + d * tl.where(pos, wb / ws, 0.0), 0.0)
    m2 = qa + qb + (d * d) * tl.where(pos, (wa * wb) / ws, 0.0)
    return mean, m2


@triton.jit
def _moments_combine(aw, am1, aq1, av, am2, aq2, am3, aq3, bw, bm1, bq1, bv, bm2, bq2, bm3, bq3):
    """Three weighted moments: (m1, q1) weighted by w, (m2, q2) and (m3, q3) by v (written out for speed in the
    interpreter; the formula of _merge_moments)."""
    w = aw + bw
    pos = w > 0
    ws = tl.where(pos, w, 1.0)
    f_b = tl.where(pos, bw / ws, 0.0)
    f_ab = tl.where(pos, (aw * bw) / ws, 0.0)
    d1 = bm1 - am1
    v = av + bv
    vpos = v > 0
    vs = tl.where(vpos, v, 1.0)
    g_b = tl.where(vpos, bv / vs, 0.0)
    g_ab = tl.where(vpos, (av * bv) / vs, 0.0)
    d2 = bm2 - am2
    d3 = bm3 - am3
    return (w, tl.where(pos, am1 + d1 * f_b, 0.0), aq1 + bq1 + (d1 * d1) * f_ab,
            v, tl.where(vpos, am2 + d2 * g_b, 0.0), aq2 + bq2 + (d2 * d2) * g_ab,
            tl.where(vpos, am3 + d3 * g_b, 0.0), aq3 + bq3 + (d3 * d3) * g_ab)


@triton.jit
def _column(tile, cols, idx):
    return tl.sum(tl.where(cols[None, :] == idx, tile, 0.0), axis=1)


@triton.jit(do_not_specialize=["n_in"])
def _ppo_reduce_kernel(IN, n_in, OUT, LOSSES, entropy_coef, value_coef, KCOEF,
                       H: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_P: tl.constexpr, FINAL: tl.constexpr, PER_HEAD: tl.constexpr):
    """Program p folds partial rows [p * ROWS, (p + 1) * ROWS) of IN [n_in, K] into OUT[p].

    (ROWS is a compile-time constant: the trip count is static, and loops with run-time bounds do not run
    in Triton's interpreter under numpy 2.)
    """
    pid = tl.program_id(0)
    start = pid * ROWS
    cols = tl.arange(0, KPAD)
    cok = cols < K
    is_head = cols >= GS
    hc = tl.where(is_head, cols - GS, 0) % HS
    is_min = (cols == G_RATIO_MIN) | (is_head & ((hc == HD_LOGP_MIN) | (hc == HD_VALID_MIN)))
    is_max = (cols == G_RATIO_MAX) | (is_head & ((hc == HD_RATIO_MAX) | (hc == HD_LOGP_MAX) | (hc == HD_VALID_MAX)))

    acc = tl.zeros([KPAD], dtype=tl.float32)
    mn = tl.full([KPAD], float("inf"), dtype=tl.float32)
    mx = tl.full([KPAD], float("-inf"), dtype=tl.float32)
    zero = tl.sum(tl.zeros([BLOCK_P], dtype=tl.float32), axis=0)
    rw, rmean, rm2 = zero, zero, zero  # ratio moments (weight G_WEIGHT)
    vw, tmean, tm2, emean, em2 = zero, zero, zero, zero, zero  # return and residual moments (G_VALUE_WEIGHT)
    for p0 in range(0, ROWS, BLOCK_P):
        prow = start + p0 + tl.arange(0, BLOCK_P)
        pm = prow < n_in
        offs = prow.to(tl.int64)[:, None] * K + cols[None, :]
        tile = tl.load(IN + offs, mask=pm[:, None] & cok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
        mn = tl.minimum(mn, tl.min(tl.where(pm[:, None], tile, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(pm[:, None], tile, float("-inf")), axis=0))
        # the moments: the chunk's rows merged pairwise (tl.reduce), then merged into the running moments
        cw, cm1, cq1, cv, cm2, cq2, cm3, cq3 = tl.reduce((
            _column(tile, cols, G_WEIGHT), _column(tile, cols, G_RATIO_MEAN), _column(tile, cols, G_RATIO_M2),
            _column(tile, cols, G_VALUE_WEIGHT), _column(tile, cols, G_RETURN_MEAN),
            _column(tile, cols, G_RETURN_M2), _column(tile, cols, G_RESID_MEAN), _column(tile, cols, G_RESID_M2),
        ), 0, _moments_combine)
        rmean, rm2 = _merge_moments(rw, rmean, rm2, cw, cm1, cq1)
        tmean, tm2 = _merge_moments(vw, tmean, tm2, cv, cm2, cq2)
        emean, em2 = _merge_moments(vw, emean, em2, cv, cm3, cq3)
        rw += cw
        vw += cv
    res = tl.where(is_min, mn, tl.where(is_max, mx, acc))
    res = tl.where(cols == G_RATIO_MEAN, rmean, res)
    res = tl.where(cols == G_RATIO_M2, rm2, res)
    res = tl.where(cols == G_RETURN_MEAN, tmean, res)
    res = tl.where(cols == G_RETURN_M2, tm2, res)
    res = tl.where(cols == G_RESID_MEAN, emean, res)
    res = tl.where(cols == G_RESID_M2, em2, res)
    tl.store(OUT + pid.to(tl.int64) * K + cols, res, mask=cok)

    if FINAL:
        # the losses from the statistics just stored (read back after a barrier: a head's entry and its
        # den_h sit in different columns of `res`)
        tl.debug_barrier()
        W = tl.load(OUT + G_WEIGHT)
        head = tl.where(is_head, cols - GS, 0) // HS  # the head of each column (where is_head)
        kvec = tl.zeros([KPAD], dtype=tl.float32)
        for h in tl.static_range(H):
            kvec = tl.where(is_head & (head == h), KCOEF[h], kvec)
        ent_col = is_head & cok & (hc == HD_ENTROPY_NUM)
        den_e = tl.load(OUT + tl.where(ent_col, cols - HD_ENTROPY_NUM + HD_REL_WEIGHT, 0), mask=ent_col, other=0.0)
        el = -tl.sum(tl.where(ent_col & (den_e > 0), kvec * (res / tl.where(den_e > 0, den_e, 1.0)), 0.0), axis=0)
        if PER_HEAD:
            pol_col = is_head & cok & (hc == HD_POLICY_NUM)
            den_p = tl.load(OUT + tl.where(pol_col, cols - HD_POLICY_NUM + HD_REL_WEIGHT, 0), mask=pol_col,
                            other=0.0)
            pl = -tl.sum(tl.where(pol_col & (den_p > 0), res / tl.where(den_p > 0, den_p, 1.0), 0.0), axis=0)
        else:
            pl = -_safe_div(tl.load(OUT + G_POLICY_NUM), W)
        vl = 0.5 * _safe_div(tl.load(OUT + G_VALUE_NUM), tl.load(OUT + G_VALUE_WEIGHT))
        tl.store(LOSSES + 0, pl + entropy_coef * el + value_coef * vl)
        tl.store(LOSSES + 1, pl)
        tl.store(LOSSES + 2, el)
        tl.store(LOSSES + 3, vl)


# ------------------------------------------------------------------------------------------------------
# metric table
# ------------------------------------------------------------------------------------------------------
N_GLOBAL_METRICS = tl.constexpr(23)  # esper_kernels.metrics.GLOBAL_METRICS


@triton.jit
def _gated(num, den, gate):
    """num / den where gate > 0, else NaN (a metric without data)."""
    return tl.where(gate > 0, num / den, float("nan"))


@triton.jit
def _ppo_metrics_kernel(STATS, OUT, entropy_coef, value_coef, KCOEF, H: tl.constexpr, HPAD: tl.constexpr,
                        PER_HEAD: tl.constexpr, HAS_V: tl.constexpr, HAS_VCLIP: tl.constexpr):
    """One program: the metric table of esper_kernels.metrics._derive_table from the statistics vector."""
    hrow = tl.arange(0, HPAD)
    hok = hrow < H
    hb = STATS + GS + hrow * HS
    rw = tl.load(hb + HD_REL_WEIGHT, mask=hok, other=0.0)
    pos = hok & (rw > 0)
    rw1 = tl.where(pos, rw, 1.0)
    W = tl.load(STATS + G_WEIGHT)
    steps = tl.load(STATS + G_STEPS)
    VW = tl.load(STATS + G_VALUE_WEIGHT)
    any_rel = tl.sum(rw, axis=0)
    kvec = tl.zeros([HPAD], dtype=tl.float32)
    for h in tl.static_range(H):
        kvec = tl.where(hrow == h, KCOEF[h], kvec)
    if PER_HEAD:
        pl = -tl.sum(tl.where(pos, tl.load(hb + HD_POLICY_NUM, mask=hok, other=0.0) / rw1, 0.0), axis=0)
    else:
        pl = -_safe_div(tl.load(STATS + G_POLICY_NUM), W)
    ent_num = tl.load(hb + HD_ENTROPY_NUM, mask=hok, other=0.0)
    # a head without relevant steps adds 0 (select, never multiply: a NaN entropy must stay NaN)
    el = -tl.sum(tl.where(pos, kvec * (ent_num / rw1), 0.0), axis=0)
    vl = 0.5 * _safe_div(tl.load(STATS + G_VALUE_NUM), VW)
    loss = pl + entropy_coef * el + value_coef * vl
    zero = tl.sum(tl.zeros([HPAD], dtype=tl.float32), axis=0)
    if HAS_V:
        hvd = tl.load(STATS + G_VALUE_STEPS)
    else:
        hvd = zero
    rmax = tl.load(STATS + G_RATIO_MAX)
    has_ratio = tl.where(rmax > float("-inf"), steps, 0.0)
    # torch.amin / amax over the heads: NaN propagates
    lmin_h = tl.load(hb + HD_LOGP_MIN, mask=hok, other=float("inf"))
    lmax_h = tl.load(hb + HD_LOGP_MAX, mask=hok, other=float("-inf"))
    lmin = tl.where(tl.sum((lmin_h != lmin_h).to(tl.int32), axis=0) > 0, float("nan"), tl.min(lmin_h, axis=0))
    lmax = tl.where(tl.sum((lmax_h != lmax_h).to(tl.int32), axis=0) > 0, float("nan"), tl.max(lmax_h, axis=0))
    has_logp = tl.where(lmin < float("inf"), any_rel, 0.0)
    nonfinite = tl.load(hb + HD_NONFINITE, mask=hok, other=0.0)
    all_finite = tl.where((tl.sum(nonfinite, axis=0) == 0) & _isfinite(loss), 1.0, 0.0)
    kl_h = tl.load(hb + HD_KL_NUM, mask=hok, other=0.0)
    tl.store(OUT + 0, _gated(loss, 1.0, W + hvd))
    if PER_HEAD:
        tl.store(OUT + 1, _gated(pl, 1.0, any_rel))
    else:
        tl.store(OUT + 1, _gated(pl, 1.0, W))
    tl.store(OUT + 2, _gated(el, 1.0, any_rel))
    tl.store(OUT + 3, _gated(vl, 1.0, hvd))
    tl.store(OUT + 4, _gated(tl.sum(kl_h, axis=0), any_rel, any_rel))
    tl.store(OUT + 5, _gated(tl.load(STATS + G_KL_K3), W, W))
    tl.store(OUT + 6, _gated(tl.load(STATS + G_KL_K1), W, W))
    tl.store(OUT + 7, _gated(tl.load(STATS + G_CLIP), W, W))
    tl.store(OUT + 8, _gated(tl.load(STATS + G_CLIP_POS), W, W))
    tl.store(OUT + 9, _gated(tl.load(STATS + G_CLIP_NEG), W, W))
    tl.store(OUT + 10, _gated(tl.load(STATS + G_RATIO_MEAN), 1.0, W))
    tl.store(OUT + 11, _gated(tl.sqrt(tl.load(STATS + G_RATIO_M2) / W), 1.0, W))
    tl.store(OUT + 12, _gated(tl.load(STATS + G_RATIO_MIN), 1.0, has_ratio))
    tl.store(OUT + 13, _gated(rmax, 1.0, has_ratio))
    tl.store(OUT + 14, _gated(lmin, 1.0, has_logp))
    tl.store(OUT + 15, _gated(lmax, 1.0, has_logp))
    tl.store(OUT + 16, steps)
    tl.store(OUT + 17, W)
    tl.store(OUT + 18, all_finite)
    rt_m2 = tl.load(STATS + G_RETURN_M2)
    tl.store(OUT + 19, _gated(1.0 - tl.load(STATS + G_RESID_M2) / rt_m2, 1.0, hvd * rt_m2))
    if HAS_VCLIP:
        tl.store(OUT + 20, _gated(tl.load(STATS + G_VALUE_CLIP), VW, VW))
    else:
        tl.store(OUT + 20, float("nan"))
    tl.store(OUT + 21, tl.load(STATS + G_BAD_WEIGHTS))
    if HAS_V:
        tl.store(OUT + 22, tl.load(STATS + G_BAD_VALUE_WEIGHTS))
    else:
        tl.store(OUT + 22, float("nan"))
    # per head, metric-major (OUT[23 + m * H + h])
    hm = OUT + N_GLOBAL_METRICS + hrow
    rmax_h = tl.load(hb + HD_RATIO_MAX, mask=hok, other=0.0)
    Wv = W + tl.zeros([HPAD], dtype=tl.float32)
    sv = steps + tl.zeros([HPAD], dtype=tl.float32)
    tl.store(hm + 0 * H, _gated(ent_num, rw, rw), mask=hok)
    tl.store(hm + 1 * H, _gated(kl_h, rw, rw), mask=hok)
    tl.store(hm + 2 * H, _gated(tl.load(hb + HD_CLIP_NUM, mask=hok, other=0.0), rw, rw), mask=hok)
    tl.store(hm + 3 * H, _gated(rmax_h, 1.0, tl.where(rmax_h > float("-inf"), rw, 0.0)), mask=hok)
    tl.store(hm + 4 * H, nonfinite, mask=hok)
    tl.store(hm + 5 * H, tl.load(hb + HD_EMPTY_MASK, mask=hok, other=0.0), mask=hok)
    tl.store(hm + 6 * H, tl.load(hb + HD_INVALID_ACTION, mask=hok, other=0.0), mask=hok)
    tl.store(hm + 7 * H, _gated(tl.load(hb + HD_VALID_MIN, mask=hok, other=0.0), 1.0, sv), mask=hok)
    tl.store(hm + 8 * H, _gated(tl.load(hb + HD_VALID_MAX, mask=hok, other=0.0), 1.0, sv), mask=hok)
    tl.store(hm + 9 * H, _gated(tl.load(hb + HD_VALID_SUM, mask=hok, other=0.0), Wv, Wv), mask=hok)
    tl.store(hm + 10 * H, _gated(tl.load(hb + HD_SINGLE, mask=hok, other=0.0), Wv, Wv), mask=hok)
    tl.store(hm + 11 * H, _gated(rw, Wv, Wv), mask=hok)
    tl.store(hm + 12 * H, _gated(tl.load(hb + HD_LEARNABLE, mask=hok, other=0.0), Wv, Wv), mask=hok)


# ------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N"])
def _ppo_bwd_kernel(
    LG, LG_RS, LG_CO, MK, MK_RS, MK_CO, GR, GR_RS, GR_CO,  # per-head tuples: logits, masks, gradients
    ACT, ACT_S, REL, REL_S, FLOOR, KCOEF,  # per-head tuples: actions, relevance, floors, entropy coefficients
    WT, WT_S, SAVED, STATS, GLOSS, GLOSS_S, GLP, GLP_S0, GLP_S1, GENT, GENT_S0, GENT_S1, GV,
    N, mask_fill, entropy_coef, value_coef,
    H: tl.constexpr, SIZES: tl.constexpr, BLKS: tl.constexpr, WIDE: tl.constexpr, FLOOR_ON: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REL: tl.constexpr, HAS_W: tl.constexpr, HAS_V: tl.constexpr,
    HAS_GLOSS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, PER_HEAD: tl.constexpr,
    NORM_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    saved = SAVED + rows64 * (H + 1)

    if HAS_W:
        w_raw = tl.load(WT + rows64 * WT_S, mask=row_ok, other=0).to(tl.float32)
    else:
        w_raw = tl.where(row_ok, 1.0, 0.0)
    present = row_ok & _isfinite(w_raw) & (w_raw > 0)
    w = tl.where(present, w_raw, 0.0)

    if HAS_GLOSS:
        g0 = tl.load(GLOSS).to(tl.float32)
        g1 = tl.load(GLOSS + GLOSS_S).to(tl.float32)
        g2 = tl.load(GLOSS + 2 * GLOSS_S).to(tl.float32)
        g3 = tl.load(GLOSS + 3 * GLOSS_S).to(tl.float32)
    else:
        g0 = tl.load(STATS) * 0.0
        g1 = g0
        g2 = g0
        g3 = g0
    g_pol = g0 + g1
    g_ent = entropy_coef * g0 + g2
    g_val = value_coef * g0 + g3
    if not PER_HEAD:
        pscale = _safe_div(g_pol, tl.load(STATS + G_WEIGHT))

    for h in tl.static_range(H):
        a = tl.load(ACT[h] + rows64 * ACT_S[h], mask=row_ok, other=0)
        in_range = (a >= 0) & (a < SIZES[h])
        a_safe = tl.where(in_range, a, 0).to(tl.int32)
        if HAS_REL:
            rel = present & (tl.load(REL[h] + rows64 * REL_S[h], mask=present, other=0) != 0)
        else:
            rel = present
        den = tl.load(STATS + GS + h * HS + HD_REL_WEIGHT)
        if PER_HEAD:
            pscale_h = _safe_div(g_pol, den)
        else:
            pscale_h = pscale
        u = tl.load(saved + h, mask=row_ok, other=0.0)
        gL = u * pscale_h
        if HAS_GLP:
            gL += tl.load(GLP + rows64 * GLP_S0 + h * GLP_S1, mask=row_ok, other=0).to(tl.float32)
        gL = tl.where(in_range, gL, 0.0)
        ecoef = _safe_div(g_ent * -KCOEF[h], den)
        gE = tl.where(rel, ecoef * w, 0.0)
        if HAS_GENT:
            gE += tl.load(GENT + rows64 * GENT_S0 + h * GENT_S1, mask=row_ok, other=0).to(tl.float32)
        if WIDE[h]:
            _bwd_head_wide(LG[h], LG_RS[h], LG_CO[h], MK[h], MK_RS[h], MK_CO[h], GR[h], GR_RS[h], GR_CO[h],
                           rows64, row_ok, present, a_safe, gL, gE, FLOOR[h], mask_fill, SIZES[h], BLOCK_C,
                           HAS_MASK, FLOOR_ON[h], NORM_ENT)
        else:
            _bwd_head_small(LG[h], LG_RS[h], LG_CO[h], MK[h], MK_RS[h], MK_CO[h], GR[h], GR_RS[h], GR_CO[h],
                            rows64, row_ok, present, a_safe, gL, gE, FLOOR[h], mask_fill, SIZES[h], BLKS[h],
                            HAS_MASK, FLOOR_ON[h], NORM_ENT)

    if HAS_V:
        vscale = _safe_div(g_val * 0.5, tl.load(STATS + G_VALUE_WEIGHT))
        tl.store(GV + rows64, tl.load(saved + H, mask=row_ok, other=0.0) * vscale, mask=row_ok)

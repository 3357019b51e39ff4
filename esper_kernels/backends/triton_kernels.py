"""Triton kernels of the fused PPO loss, one-pass design; the host side (plan, launches) is ``triton_backend.py``.

A training step is three launches (``docs/fused_math.md`` has the math, ``docs/semantics.md`` the decisions):

* ``_ppo_pre_kernel``: the normalisers that depend only on per-step inputs (present steps and weight, each
  head's relevant weight, the value weight, bad-weight counts, and the advantage mean and divisor of
  ``normalize_advantages``, per column for per-head advantages). Each program reduces its rows to one partial
  row; the last program to finish (an atomic ticket) merges them in a fixed order into ``NORM``.
* ``_ppo_main_kernel`` as the forward (``FIXUP=False``): per row block, every head's log-sum-exp, entropy and
  taken log-prob from one pass over the logits (running max m, s = sum e, t = sum e (z - m)), the log-ratios,
  the true joint ratio, the per-step outputs, and, when a gradient is needed, d loss / d logits for an upstream
  gradient of 1 on ``loss`` while the row is still in registers. Each program reduces its rows' statistics to
  one partial row (``PART``, the layout of ``esper_kernels.schema``); the last program (a two-level ticket:
  groups of ``GROUP`` programs, then the groups) merges them in a fixed order by each statistic's kind and
  writes the statistics vector, the four losses and the metric table.
* ``_ppo_main_kernel`` as the fix-up (``FIXUP=True``): reads the incoming gradients on the device. A plain
  ``loss.backward()`` (upstream (1, 0, 0, 0), no gradient on the per-step outputs) returns at once; an upstream
  (g, 0, 0, 0) with a finite g rescales the forward's gradient in place; anything else recomputes the gradient
  from the logits (``HOLDS=False``: the buffers do not hold the forward's gradient, e.g. a second backward).

Small heads (every head at most ``SMALL_MAX`` actions): one program lane owns one row. A head's (or a group of
packed heads') [rows, width] tile is loaded as one 2-D tile, which the compiler reads coalesced, and split
(``tl.split`` tree) into one register column per action: a single layout conversion per tile moves it into
the row-per-lane layout, and every per-row value after that stays in that one layout (no tile-to-row
conversions). The head loop is unrolled from compile-time head sizes. Wide heads (more than ``SMALL_MAX``
actions): ``BN`` rows per program, the row streamed in [BN, BLOCK_C] chunks with an online softmax; a head of
at most ``BLOCK_C`` actions is one chunk kept in registers between the statistics and the gradient, a longer
one (vocab) is read a second time for the gradient (from L2: the row was just read).

Everything is float32 (inputs upcast on load); partial statistics are float32 with moments merged by Chan's
formula (exact for constant data, infinite values as docs/semantics.md says). No floating-point atomics: the
only atomics are the integer tickets. Only constructs both the Triton compiler and its interpreter accept are
used (tuples indexed by compile-time indices, constexpr ``if``, ``while`` loops for run-time trip counts);
NaN-sensitive selections use ``tl.where`` (``tl.maximum``'s NaN handling differs between the GPU and the
interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import schema as _schema
from ..schema import HD, Form, G, Kind, Over

# ---- statistics layout, from esper_kernels.schema (every index and kind is read from there) ------------------
GS = tl.constexpr(_schema.GLOBAL_SIZE)
HS = tl.constexpr(_schema.HEAD_SIZE)
G_STEPS = tl.constexpr(G.STEPS)
G_WEIGHT = tl.constexpr(G.WEIGHT)
G_POLICY_NUM = tl.constexpr(G.POLICY_NUM)
G_KL_K3 = tl.constexpr(G.KL_K3)
G_KL_K1 = tl.constexpr(G.KL_K1)
G_CLIP = tl.constexpr(G.CLIP)
G_CLIP_POS = tl.constexpr(G.CLIP_POS)
G_CLIP_NEG = tl.constexpr(G.CLIP_NEG)
G_RATIO_MEAN = tl.constexpr(G.RATIO_MEAN)
G_RATIO_M2 = tl.constexpr(G.RATIO_M2)
G_RATIO_MIN = tl.constexpr(G.RATIO_MIN)
G_RATIO_MAX = tl.constexpr(G.RATIO_MAX)
G_BAD_WEIGHTS = tl.constexpr(G.BAD_WEIGHTS)
G_VALUE_STEPS = tl.constexpr(G.VALUE_STEPS)
G_VALUE_WEIGHT = tl.constexpr(G.VALUE_WEIGHT)
G_VALUE_NUM = tl.constexpr(G.VALUE_NUM)
G_VALUE_CLIP = tl.constexpr(G.VALUE_CLIP)
G_RETURN_MEAN = tl.constexpr(G.RETURN_MEAN)
G_RETURN_M2 = tl.constexpr(G.RETURN_M2)
G_RESID_MEAN = tl.constexpr(G.RESID_MEAN)
G_RESID_M2 = tl.constexpr(G.RESID_M2)
G_BAD_VALUE_WEIGHTS = tl.constexpr(G.BAD_VALUE_WEIGHTS)
HD_REL_WEIGHT = tl.constexpr(HD.REL_WEIGHT)
HD_POLICY_NUM = tl.constexpr(HD.POLICY_NUM)
HD_ENTROPY_NUM = tl.constexpr(HD.ENTROPY_NUM)
HD_KL_NUM = tl.constexpr(HD.KL_NUM)
HD_CLIP_NUM = tl.constexpr(HD.CLIP_NUM)
HD_RATIO_MAX = tl.constexpr(HD.RATIO_MAX)
HD_LOGP_MIN = tl.constexpr(HD.LOGP_MIN)
HD_LOGP_MAX = tl.constexpr(HD.LOGP_MAX)
HD_NONFINITE = tl.constexpr(HD.NONFINITE)
HD_EMPTY_MASK = tl.constexpr(HD.EMPTY_MASK)
HD_INVALID_ACTION = tl.constexpr(HD.INVALID_ACTION)
HD_VALID_MIN = tl.constexpr(HD.VALID_MIN)
HD_VALID_MAX = tl.constexpr(HD.VALID_MAX)
HD_VALID_SUM = tl.constexpr(HD.VALID_SUM)
HD_SINGLE = tl.constexpr(HD.SINGLE)
HD_LEARNABLE = tl.constexpr(HD.LEARNABLE)

#: every statistic of the schema must have its per-row term here: adding one to the schema without a kernel
#: term fails at import, not with a wrong number
_IMPLEMENTED_GLOBAL = {n[2:] for n in dir() if n.startswith("G_")}
_IMPLEMENTED_HEAD = {n[3:] for n in dir() if n.startswith("HD_")}
if {s.name for s in _schema.GLOBAL_STATS} != _IMPLEMENTED_GLOBAL or {
    s.name for s in _schema.HEAD_STATS
} != _IMPLEMENTED_HEAD:
    raise ImportError("triton_kernels: the statistics of esper_kernels.schema and the kernels' per-row terms differ")

#: fields of a head's row state (``_small_stats`` / ``_wide_stats``): m (row max of the masked, floored logits),
#: log s, Hraw, P_V, n (valid actions), zhat[a] - m, taken action valid, the floor's m1, s1, f, rescale s, P_O,
#: and s = sum exp(zhat - m)
S_M, S_LOGS, S_HRAW, S_PV, S_N, S_DA, S_TAKEN, S_M1, S_S1, S_F, S_SF, S_PO, S_S = (tl.constexpr(i) for i in range(13))

K_SUM = tl.constexpr(int(Kind.SUM))
K_COUNT = tl.constexpr(int(Kind.COUNT))
K_MIN = tl.constexpr(int(Kind.MIN))
K_MAX = tl.constexpr(int(Kind.MAX))
K_MEAN = tl.constexpr(int(Kind.MEAN))
K_M2 = tl.constexpr(int(Kind.M2))

#: statistics that depend only on per-step inputs: the pre-pass computes them (``NORM``), the forward copies them
PRE_GLOBAL = ("STEPS", "WEIGHT", "BAD_WEIGHTS", "VALUE_STEPS", "VALUE_WEIGHT", "BAD_VALUE_WEIGHTS")
PRE_HEAD = ("REL_WEIGHT",)
for _name in PRE_GLOBAL + PRE_HEAD:
    _stat = next(s for s in _schema.GLOBAL_STATS + _schema.HEAD_STATS if s.name == _name)
    if _stat.kind not in (Kind.SUM, Kind.COUNT):
        raise ImportError(f"triton_kernels: the pre-pass sums {_name}, whose kind is {_stat.kind.name}")
NPG = tl.constexpr(len(PRE_GLOBAL))
#: NORM layout: PRE_GLOBAL (in that order), each head's REL_WEIGHT, then the advantage mean and divisor per
#: column (H columns; column 0 for shared advantages)
PRE_G_IDX = tl.constexpr(tuple(getattr(G, n) for n in PRE_GLOBAL))
N_STEPS = tl.constexpr(PRE_GLOBAL.index("STEPS"))
N_WEIGHT = tl.constexpr(PRE_GLOBAL.index("WEIGHT"))
N_BAD_W = tl.constexpr(PRE_GLOBAL.index("BAD_WEIGHTS"))
N_VSTEPS = tl.constexpr(PRE_GLOBAL.index("VALUE_STEPS"))
N_VWEIGHT = tl.constexpr(PRE_GLOBAL.index("VALUE_WEIGHT"))
N_BAD_VW = tl.constexpr(PRE_GLOBAL.index("BAD_VALUE_WEIGHTS"))


def norm_size(num_heads: int) -> int:
    """Length of the pre-pass output ``NORM``."""
    return len(PRE_GLOBAL) + 3 * num_heads


def _kind_split(stats, pre):
    """(sum-kind indices, extreme-kind indices, whether each extreme is a MIN) of the statistics the forward
    reduces itself (the pre-pass ones and the moments excluded)."""
    sums = tuple(i for i, s in enumerate(stats) if s.kind in (Kind.SUM, Kind.COUNT) and s.name not in pre)
    ext = tuple(i for i, s in enumerate(stats) if s.kind in (Kind.MIN, Kind.MAX))
    neg = tuple(int(stats[i].kind == Kind.MIN) for i in ext)
    return sums, ext, neg


_FG = _kind_split(_schema.GLOBAL_STATS, PRE_GLOBAL)
_FH = _kind_split(_schema.HEAD_STATS, PRE_HEAD)
FG_SUM, FG_EXT, FG_NEG = (tl.constexpr(x) for x in _FG)
FH_SUM, FH_EXT, FH_NEG = (tl.constexpr(x) for x in _FH)


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _chunks(n: int) -> tuple[tuple[int, int], ...]:
    """(start, width) power-of-two pieces of n columns, widest first (10 -> (0, 8), (8, 2))."""
    out, start = [], 0
    while n:
        width = 1 << (n.bit_length() - 1)
        out.append((start, width))
        start, n = start + width, n - width
    return tuple(out)


#: their counts, and the power-of-two pieces the per-program reductions join into tiles
NFG_SUM, NFG_EXT, NFH_SUM, NFH_EXT = (tl.constexpr(len(x)) for x in (_FG[0], _FG[1], _FH[0], _FH[1]))
CH_FG_SUM, CH_FG_EXT, CH_FH_SUM, CH_FH_EXT = (tl.constexpr(_chunks(len(x))) for x in (_FG[0], _FG[1], _FH[0], _FH[1]))
NCH_FG_SUM, NCH_FG_EXT, NCH_FH_SUM, NCH_FH_EXT = (
    tl.constexpr(len(_chunks(len(x)))) for x in (_FG[0], _FG[1], _FH[0], _FH[1])
)
NMOM = tl.constexpr(len(_schema.MOMENTS))
#: the global moments (weight, mean, M2 indices)
MOM_W = tl.constexpr(tuple(w for w, _, _ in _schema.MOMENTS))
MOM_M = tl.constexpr(tuple(m for _, m, _ in _schema.MOMENTS))
MOM_Q = tl.constexpr(tuple(q for _, _, q in _schema.MOMENTS))
if any(s.kind == Kind.MEAN for s in _schema.HEAD_STATS):
    raise ImportError("triton_kernels: per-head moments are not implemented")
#: kind of every statistic (global block, then one head block)
KIND_G = tl.constexpr(tuple(int(s.kind) for s in _schema.GLOBAL_STATS))
KIND_H = tl.constexpr(tuple(int(s.kind) for s in _schema.HEAD_STATS))

# ---- metric table layout (esper_kernels.schema.GLOBAL_METRICS / HEAD_METRICS) ------------------------------------
F_MEAN = tl.constexpr(int(Form.MEAN))
F_COUNT = tl.constexpr(int(Form.COUNT))
F_EXTREME = tl.constexpr(int(Form.EXTREME))
F_VALUE = tl.constexpr(int(Form.VALUE))
F_SPECIAL = tl.constexpr(int(Form.SPECIAL))
O_ONE = tl.constexpr(int(Over.ONE))
O_WEIGHT = tl.constexpr(int(Over.WEIGHT))
O_STEPS = tl.constexpr(int(Over.STEPS))
O_VALUE_WEIGHT = tl.constexpr(int(Over.VALUE_WEIGHT))
O_REL_WEIGHT = tl.constexpr(int(Over.REL_WEIGHT))


def _stat_index(stats, name):
    return next(i for i, s in enumerate(stats) if s.name == name) if name else -1


def _stat_kind(stats, name):
    return int(next(s.kind for s in stats if s.name == name)) if name else -1


NGM = tl.constexpr(len(_schema.GLOBAL_METRICS))
NHM = tl.constexpr(len(_schema.HEAD_METRICS))
GM_FORM = tl.constexpr(tuple(int(m.form) for m in _schema.GLOBAL_METRICS))
GM_STAT = tl.constexpr(tuple(_stat_index(_schema.GLOBAL_STATS, m.stat) for m in _schema.GLOBAL_METRICS))
GM_OVER = tl.constexpr(tuple(int(m.over) for m in _schema.GLOBAL_METRICS))
GM_KIND = tl.constexpr(tuple(_stat_kind(_schema.GLOBAL_STATS, m.stat) for m in _schema.GLOBAL_METRICS))
HM_FORM = tl.constexpr(tuple(int(m.form) for m in _schema.HEAD_METRICS))
HM_STAT = tl.constexpr(tuple(_stat_index(_schema.HEAD_STATS, m.stat) for m in _schema.HEAD_METRICS))
HM_OVER = tl.constexpr(tuple(int(m.over) for m in _schema.HEAD_METRICS))
HM_KIND = tl.constexpr(tuple(_stat_kind(_schema.HEAD_STATS, m.stat) for m in _schema.HEAD_METRICS))
#: the SPECIAL rows, by name; each is written out in _metric_table
SPECIAL_NAMES = (
    "loss",
    "policy_loss",
    "entropy_loss",
    "value_loss",
    "approx_kl",
    "ratio_std",
    "log_prob_min",
    "log_prob_max",
    "all_finite",
    "explained_variance",
    "value_clip_fraction",
    "invalid_value_weights",
)
if {m.name for m in _schema.GLOBAL_METRICS if m.form == Form.SPECIAL} != set(SPECIAL_NAMES):
    raise ImportError("triton_kernels: the schema's SPECIAL metric rows and the kernel's differ")
_GMI = {m.name: i for i, m in enumerate(_schema.GLOBAL_METRICS)}
SP_LOSS = tl.constexpr(_GMI["loss"])
SP_POLICY = tl.constexpr(_GMI["policy_loss"])
SP_ENTROPY = tl.constexpr(_GMI["entropy_loss"])
SP_VALUE = tl.constexpr(_GMI["value_loss"])
SP_KL = tl.constexpr(_GMI["approx_kl"])
SP_RATIO_STD = tl.constexpr(_GMI["ratio_std"])
SP_LOGP_MIN = tl.constexpr(_GMI["log_prob_min"])
SP_LOGP_MAX = tl.constexpr(_GMI["log_prob_max"])
SP_ALL_FINITE = tl.constexpr(_GMI["all_finite"])
SP_EXPL_VAR = tl.constexpr(_GMI["explained_variance"])
SP_VCLIP = tl.constexpr(_GMI["value_clip_fraction"])
SP_BAD_VW = tl.constexpr(_GMI["invalid_value_weights"])

#: counters (int32) of one (device, stream): [0] the pre-pass ticket, [1] the forward's group ticket, then one
#: ticket per group of forward programs
C_PRE = tl.constexpr(0)
C_FINAL = tl.constexpr(1)
C_GROUP0 = tl.constexpr(2)


# ------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _isfinite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp (NaN passes through)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _safe_div(num, den):
    """num / den, 0 where den <= 0 (loss terms without data)."""
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


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
def _norm_entropy(ent, n):
    return tl.where(n > 1.0, ent / tl.log(tl.maximum(n, 2.0)), 0.0)


@triton.jit
def _chan(wa, ma, qa, wb, mb, qb):
    """Chan's merge of two weighted moments (weight, mean, M2). Exact when either side is empty or both means are
    equal (constant data keeps M2 = 0); a side whose mean is not finite decides (IEEE sum of the non-finite
    means, M2 = +inf, or NaN for NaN or both infinities: docs/semantics.md)."""
    w = wa + wb
    ha = wa > 0
    hb = wb > 0
    ws = tl.where(ha & hb, w, 1.0)
    d = mb - ma
    mean = tl.where(ha, tl.where(hb, ma + d * (wb / ws), ma), tl.where(hb, mb, 0.0))
    m2 = qa + qb + tl.where(ha & hb, (d * d) * ((wa * wb) / ws), 0.0)
    bad_a = ha & ~_isfinite(ma)
    bad_b = hb & ~_isfinite(mb)
    bad = tl.where(bad_a, ma, 0.0) + tl.where(bad_b, mb, 0.0)
    anybad = bad_a | bad_b
    mean = tl.where(anybad, bad, mean)
    m2 = tl.where(anybad, tl.where(bad != bad, float("nan"), float("inf")), m2)
    return w, mean, m2


@triton.jit
def _moment_leaf(keep, w, x):
    """One row's (weight, mean, M2): M2 = 0 for a finite value, +inf for an infinite one, NaN for NaN."""
    q = tl.where(_isfinite(x), 0.0, tl.where(x != x, float("nan"), float("inf")))
    return tl.where(keep, w, 0.0), tl.where(keep, x, 0.0), tl.where(keep, q, 0.0)


@triton.jit
def _moments(w, x, q, idx):
    """The merged (weight, mean, M2) of parts (w, x, q) along axis 0 (rows, or parts: a row is a part of
    M2 q = 0), as ``stats.merge_moment``: shifted by the first weighted part's mean, so constant data merges
    exactly (M2 = 0); a non-finite weighted mean decides alone (their IEEE sum; M2 +inf, or NaN). ``idx`` is
    each part's position (broadcast like w). Sums only: no per-pair divisions, and fast in the interpreter."""
    keep = w > 0
    first = tl.min(tl.where(keep, idx, 2147483647), axis=0)
    x0 = tl.sum(tl.where(keep & (idx == first), x, 0.0), axis=0)
    fin = _isfinite(x)
    good = keep & fin
    dev = tl.where(good, x - x0, 0.0)
    W = tl.sum(tl.where(keep, w, 0.0), axis=0)
    pos = W > 0
    dm = tl.where(pos, tl.sum(tl.where(good, w * dev, 0.0), axis=0) / tl.where(pos, W, 1.0), 0.0)
    d = dev - dm
    m2 = tl.sum(tl.where(keep, q, 0.0), axis=0) + tl.sum(tl.where(good, w * (d * d), 0.0), axis=0)
    mean = tl.where(pos, x0 + dm, 0.0)
    bad = tl.sum(tl.where(keep & ~fin, x, 0.0), axis=0)
    anybad = tl.sum((keep & ~fin).to(tl.int32), axis=0) > 0
    mean = tl.where(anybad, bad, mean)
    m2 = tl.where(anybad, tl.where(bad != bad, float("nan"), float("inf")), m2)
    return W, mean, m2


@triton.jit
def _row_moments(keep, w, x):
    """(weight, mean, M2) of one program's rows (the ``keep`` ones), shifted by their largest finite value so that
    constant data gives M2 = 0 exactly; non-finite values decide as in ``_moments``. Five sums / maxima."""
    fin = _isfinite(x)
    good = keep & fin
    x0 = tl.max(tl.where(good, x, float("-inf")), axis=0)
    x0 = tl.where(x0 == float("-inf"), 0.0, x0)
    d = tl.where(good, x - x0, 0.0)
    W = tl.sum(tl.where(keep, w, 0.0), axis=0)
    pos = W > 0
    dm = tl.where(pos, tl.sum(tl.where(good, w * d, 0.0), axis=0) / tl.where(pos, W, 1.0), 0.0)
    e = d - dm
    m2 = tl.sum(tl.where(good, w * (e * e), 0.0), axis=0)
    mean = tl.where(pos, x0 + dm, 0.0)
    bad = tl.sum(tl.where(keep & ~fin, x, 0.0), axis=0)  # an IEEE sum of infinities / NaN: finite iff none
    anybad = ~_isfinite(bad)
    mean = tl.where(anybad, bad, mean)
    m2 = tl.where(anybad, tl.where(bad != bad, float("nan"), float("inf")), m2)
    return W, mean, m2


@triton.jit
def _index_vec(IDX: tl.constexpr, NI: tl.constexpr, P: tl.constexpr):
    """The int32 vector [IDX[0], ..., IDX[NI - 1], 0, ...] of length P (a compile-time table)."""
    cols = tl.arange(0, P)
    out = tl.zeros([P], dtype=tl.int32)
    for k in tl.static_range(NI):
        out = tl.where(cols == k, IDX[k], out)
    return out


# ------------------------------------------------------------------------------------------------------------
# columns: a [BN, W] tile <-> W register columns [BN] (tl.split / tl.join trees: the compiler moves the tile into
# a layout where each lane holds whole rows with one conversion per tile)
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _cols(x, BN: tl.constexpr, W: tl.constexpr):
    """[BN, W] -> tuple of W columns [BN], in column order (a tl.split tree: tile i of a level holds the columns
    i, i + n, i + 2n, ... of the n tiles of that level)."""
    parts = (x,)
    for _level in tl.static_range(12):
        if parts[0].shape[1] > 2:
            evens = ()
            odds = ()
            for i in tl.static_range(tl.constexpr(len(parts))):
                e, o = tl.split(tl.reshape(parts[i], [BN, parts[i].shape[1] // 2, 2]))
                evens = evens + (e,)
                odds = odds + (o,)
            parts = evens + odds
    evens = ()
    odds = ()
    for i in tl.static_range(tl.constexpr(len(parts))):
        e, o = tl.split(parts[i])
        evens = evens + (e,)
        odds = odds + (o,)
    return evens + odds


@triton.jit
def _join_cols(cs, BN: tl.constexpr, W: tl.constexpr):
    """The W columns of the tuple ``cs`` -> a [BN, W] tile (inverse of _cols)."""
    n: tl.constexpr = W // 2
    parts = ()
    for i in tl.static_range(n):
        parts = parts + (tl.join(cs[i], cs[i + n]),)
    for _level in tl.static_range(12):
        if len(parts) > 1:
            nxt = ()
            for i in tl.static_range(tl.constexpr(len(parts) // 2)):
                t = tl.join(parts[i], parts[i + len(parts) // 2])
                nxt = nxt + (tl.reshape(t, [BN, t.shape[1] * 2]),)
            parts = nxt
    return parts[0]


@triton.jit
def _pad(cs, value, P: tl.constexpr):
    """The tuple ``cs`` padded with ``value`` columns to length P."""
    out = cs
    for _ in tl.static_range(tl.constexpr(P - len(cs))):
        out = out + (value,)
    return out


@triton.jit
def _reduce_cols(
    cols,
    IDX: tl.constexpr,
    NEG: tl.constexpr,
    CHUNKS: tl.constexpr,
    NCH: tl.constexpr,
    IS_MAX: tl.constexpr,
    part,
    BN: tl.constexpr,
):
    """Reduce each [BN] column of ``cols`` over the rows (sum, or max with the NEG columns negated back) and store
    it at part[IDX[k]]. Power-of-two chunks of columns are joined into [BN, width] tiles (one reduction each, no
    padding columns); a chunk of one column is reduced alone."""
    for c in tl.static_range(NCH):
        if CHUNKS[c][1] == 1:
            if IS_MAX:
                v = tl.max(cols[CHUNKS[c][0]], axis=0)
                if NEG[CHUNKS[c][0]]:
                    v = -v
            else:
                v = tl.sum(cols[CHUNKS[c][0]], axis=0)
            tl.store(part + IDX[CHUNKS[c][0]], v)
        else:
            piece = ()
            for j in tl.static_range(tl.constexpr(CHUNKS[c][1])):
                piece = piece + (cols[CHUNKS[c][0] + j],)
            tile = _join_cols(piece, BN, CHUNKS[c][1])
            k = tl.arange(0, CHUNKS[c][1])
            idx = tl.zeros_like(k)
            neg = k < 0
            for j in tl.static_range(tl.constexpr(CHUNKS[c][1])):
                idx = tl.where(k == j, IDX[CHUNKS[c][0] + j], idx)
                if IS_MAX:
                    if NEG[CHUNKS[c][0] + j]:
                        neg = neg | (k == j)
            if IS_MAX:
                v = tl.max(tile, axis=0)
                v = tl.where(neg, -v, v)
            else:
                v = tl.sum(tile, axis=0)
            tl.store(part + idx, v)


# ------------------------------------------------------------------------------------------------------------
# small heads: one lane per row, one register column per action
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _zhat_cols(zs, vs, mask_fill, A: tl.constexpr):
    """Masked logits: z at valid actions, the fill elsewhere (-inf with exclusion)."""
    out = ()
    for j in tl.static_range(A):
        out = out + (tl.where(vs[j], zs[j], mask_fill),)
    return out


@triton.jit
def _lse_cols(zh, vs, A: tl.constexpr, EXCL: tl.constexpr):
    """(m, s): the row maximum of the masked logits and sum exp(zhat - m) over the row (valid actions only with
    exclusion, every action with a fill)."""
    m = zh[0]  # (with exclusion an invalid action's zhat is -inf: it never raises the maximum)
    for j in tl.static_range(1, A):
        m = tl.where(zh[j] > m, zh[j], m)
    s = tl.zeros_like(m)
    for j in tl.static_range(A):
        e = tl.exp(zh[j] - m)
        if EXCL:
            e = tl.where(vs[j], e, 0.0)
        s += e
    return m, s


@triton.jit
def _floor_cols(zs, vs, n, floor, mask_fill, A: tl.constexpr, EXCL: tl.constexpr):
    """esper's floor-preserving renormalisation (reference ``masked_log_softmax``): the floored masked logits
    log(max(q, 1e-8)) and what the gradient needs (the un-floored m1, log s1, f, the rescale s and P_O)."""
    zh1 = _zhat_cols(zs, vs, mask_fill, A)
    m1, s1 = _lse_cols(zh1, vs, A, EXCL)
    logs1 = tl.log(s1)
    f = _floor_params(n, floor)
    nu = tl.zeros_like(m1)
    po = tl.zeros_like(m1)
    p1s = ()
    for j in tl.static_range(A):
        p1 = tl.exp((zh1[j] - m1) - logs1)
        under = vs[j] & (p1 < f)
        nu += under.to(tl.float32)
        po += tl.where(vs[j] & ~(p1 < f), p1, 0.0)
        p1s = p1s + (p1,)
    a_s = tl.maximum(1.0 - nu * f, 1e-8)
    s_f = a_s / tl.maximum(po, 1e-8)
    zh = ()
    for j in tl.static_range(A):
        q = tl.where(p1s[j] < f, f, p1s[j] * s_f)
        zh = zh + (tl.where(vs[j], tl.log(tl.maximum(q, 1e-8)), mask_fill),)
    return zh, m1, s1, f, s_f, po


@triton.jit
def _small_stats(zs, vs, a_safe, mask_fill, floor, A: tl.constexpr, EXCL: tl.constexpr, FLOOR_ON: tl.constexpr):
    """One head's row statistics from its columns (one exp per logit without a floor):
    m (row max of the masked logits), log s, Hraw = -sum_V p log p, P_V = sum_V p, n = |V|, zhat[a] - m, and
    whether the taken action is valid; with a floor also the floor's (m1, s1, f, s, P_O); last, s."""
    n = vs[0].to(tl.float32)
    taken = (a_safe == 0) & vs[0]
    for j in tl.static_range(1, A):
        n += vs[j].to(tl.float32)
        taken = taken | ((a_safe == j) & vs[j])
    if FLOOR_ON:
        zh, m1, s1, f, s_f, po = _floor_cols(zs, vs, n, floor, mask_fill, A, EXCL)
    else:
        zh = _zhat_cols(zs, vs, mask_fill, A)
    m = zh[0]  # (a running maximum: a NaN leaves it and reaches the row through exp; with exclusion an invalid
    # action's zhat is -inf and never raises it)
    for j in tl.static_range(1, A):
        m = tl.where(zh[j] > m, zh[j], m)
    s = tl.zeros_like(m)
    sv = tl.zeros_like(m)
    t = tl.zeros_like(m)
    da = tl.zeros_like(m)
    for j in tl.static_range(A):
        d = zh[j] - m
        e = tl.exp(d)
        if EXCL:
            e = tl.where(vs[j], e, 0.0)
        else:
            sv += tl.where(vs[j], e, 0.0)
        s += e
        t += tl.where(vs[j], e * d, 0.0)
        da = tl.where(a_safe == j, d, da)
    if EXCL:
        sv = s
    logs = tl.log(s)
    pv = sv / s
    hraw = tl.where(n > 0.0, pv * logs - t / s, 0.0)
    if not FLOOR_ON:
        m1 = m
        s1 = m
        f = m
        s_f = m
        po = m
    return m, logs, hraw, pv, n, da, taken, m1, s1, f, s_f, po, s


@triton.jit
def _small_grad(
    zs,
    vs,
    st,
    a_safe,
    gL,
    gE,
    mask_fill,
    A: tl.constexpr,
    EXCL: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    NORM_ENT: tl.constexpr,
):
    """d loss / d logits of one head's columns (docs/fused_math.md), from the row statistics ``st`` and the
    upstream gL (on ell) and gE (on the entropy output): one exp per logit (two more and a log with a floor).
    Valid actions of a row whose upstream is not finite get NaN; masked actions exactly 0."""
    m = st[S_M]
    logs = st[S_LOGS]
    n = st[S_N]
    m1 = st[S_M1]
    s1 = st[S_S1]
    f = st[S_F]
    s_f = st[S_SF]
    po = st[S_PO]
    s2 = st[S_S]
    if NORM_ENT:
        ghr = tl.where(n > 1.0, gE / tl.log(tl.maximum(n, 2.0)), 0.0)
    else:
        ghr = gE
    ng = -ghr
    if FLOOR_ON:
        zh1 = _zhat_cols(zs, vs, mask_fill, A)
        logs1 = tl.log(s1)
        p1s = ()
        zh = ()
        for j in tl.static_range(A):
            p1 = tl.exp((zh1[j] - m1) - logs1)
            q = tl.where(p1 < f, f, p1 * s_f)
            p1s = p1s + (p1,)
            zh = zh + (tl.where(vs[j], tl.log(tl.maximum(q, 1e-8)), mask_fill),)
    else:
        zh = _zhat_cols(zs, vs, mask_fill, A)
    # autograd's order: g = d/d logp (the one-hot of ell, and -sum_V p logp through logp and p = exp(logp)),
    # then the log-softmax: d zhat = g - p sum(g)
    ps = ()
    gs = ()
    sig = tl.zeros_like(m)
    for j in tl.static_range(A):
        lp = (zh[j] - m) - logs
        p = tl.exp(lp)
        if EXCL:
            p = tl.where(vs[j], p, 0.0)
        g = tl.where(a_safe == j, gL, 0.0) + tl.where(vs[j], ng * p + (ng * lp) * p, 0.0)
        sig += g
        ps = ps + (p,)
        gs = gs + (g,)
    out = ()
    if FLOOR_ON:
        # back through the floor (docs/fused_math.md). Where no 1e-8 clamp binds, the closed form
        # [k in O] (g_k - p1_k G_O / P_O): accurate near a uniform distribution, where the chain's float32 terms
        # cancel to noise, and 0 where the true gradient is (exactly under the floor; for an action alone over
        # it up to the rounding of p1_k G_O / P_O, which the GPU compiler may fuse into the subtraction). Where a
        # clamp binds, the chain in the reference's autograd order.
        ds = tl.zeros_like(m)
        g_o = tl.zeros_like(m)
        n_bad = tl.zeros_like(m)
        nsig2 = -sig / s2
        dpss = ()
        for j in tl.static_range(A):
            under = vs[j] & (p1s[j] < f)
            over = vs[j] & ~(p1s[j] < f)
            q = tl.where(p1s[j] < f, f, p1s[j] * s_f)
            e2 = tl.exp(zh[j] - m)
            if EXCL:
                e2 = tl.where(vs[j], e2, 0.0)
            dlq = tl.where(vs[j], gs[j] + nsig2 * e2, 0.0)
            dq = tl.where(q >= 1e-8, dlq / tl.maximum(q, 1e-8), 0.0)
            dps = tl.where(under, 0.0, dq)
            ds += dps * p1s[j]
            g_o += tl.where(over, gs[j], 0.0)
            n_bad += (over & (q < 1e-8)).to(tl.float32)
            dpss = dpss + (dps,)
        den = tl.maximum(po, 1e-8)
        dsum_o = tl.where(po >= 1e-8, -ds * (s_f / den), 0.0)
        dl1s = ()
        sum1 = tl.zeros_like(m)
        for j in tl.static_range(A):
            over = vs[j] & ~(p1s[j] < f)
            dl1 = (dpss[j] * s_f + tl.where(over, dsum_o, 0.0)) * p1s[j]
            sum1 += dl1
            dl1s = dl1s + (dl1,)
        nsum1 = -sum1 / s1
        regular = (po >= 1e-8) & (n_bad == 0.0)
        go_po = g_o / den
        for j in tl.static_range(A):
            over = vs[j] & ~(p1s[j] < f)
            closed = tl.where(over, gs[j] - p1s[j] * go_po, 0.0)
            e1 = tl.exp(zh1[j] - m1)
            if EXCL:
                e1 = tl.where(vs[j], e1, 0.0)
            chain = dl1s[j] + nsum1 * e1
            out = out + (tl.where(regular, closed, chain),)
    else:
        for j in tl.static_range(A):
            out = out + (gs[j] - ps[j] * sig,)
    fin = _isfinite(gL) & _isfinite(gE)
    res = ()
    for j in tl.static_range(A):
        res = res + (tl.where(vs[j], tl.where(fin, out[j], float("nan")), 0.0),)
    return res


@triton.jit
def _rebase(ptrs, strides, row0, H: tl.constexpr):
    """Per-head pointers moved to row ``row0``."""
    out = ()
    for h in tl.static_range(H):
        out = out + (ptrs[h] + row0 * strides[h],)
    return out


@triton.jit
def _load_tile(base, rs, co, rl, ld, cols, other):
    return tl.load(base + rl[:, None] * rs + co + cols[None, :], mask=ld, other=other)


@triton.jit
def _store_cols(base, rs, co, rl, row_ok, gs, A: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr):
    """Store A gradient columns at base[row, co + j] (the logits' dtype): one [BN, W] tile (joined columns; the
    compiler stores it coalesced), or one column at a time."""
    if TILE:
        zero = tl.zeros_like(gs[0])
        cols = tl.arange(0, W)
        t = _join_cols(_pad(gs, zero, W), BN, W)
        tl.store(
            base + rl[:, None] * rs + co + cols[None, :],
            t.to(base.dtype.element_ty),
            mask=row_ok[:, None] & (cols[None, :] < A),
        )
    else:
        for j in tl.static_range(A):
            tl.store(base + rl * rs + co + j, gs[j].to(base.dtype.element_ty), mask=row_ok)


@triton.jit
def _scale_tile(base, rs, co, rl, row_ok, scale, A: tl.constexpr, W: tl.constexpr):
    """base[row, co + j] *= scale over a [BN, W] tile (the fix-up's rescale: no layout change, coalesced)."""
    cols = tl.arange(0, W)
    ptr = base + rl[:, None] * rs + co + cols[None, :]
    ok = row_ok[:, None] & (cols[None, :] < A)
    x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptr, (x * scale).to(base.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------------------
# wide heads: [BN, BLOCK_C] chunks of BN rows, online softmax
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A: tl.constexpr, HAS_MASK: tl.constexpr):
    """One chunk of a wide head: masked logits zhat (the fill at invalid actions, -inf at padding columns), the
    valid actions (absent rows: none) and the actions the mask marks valid (absent rows too)."""
    col_ok = cols < A
    ld = present[:, None] & col_ok[None, :]
    z = _load_tile(lg, rs, co, rl, ld, cols, 0.0).to(tl.float32)
    if HAS_MASK:
        lm = row_ok[:, None] & col_ok[None, :]
        marked = lm & (_load_tile(mk, mrs, mco, rl, lm, cols, 0) != 0)
    else:
        marked = row_ok[:, None] & col_ok[None, :]
    valid = ld & marked
    zhat = tl.where(valid, z, mask_fill)
    return tl.where(col_ok[None, :], zhat, float("-inf")), valid, marked


@triton.jit
def _wide_floored(zhat1, valid, m1, logs1, f, s_f):
    """The floored masked logits of one chunk, from the row's un-floored (m1, log s1) and floor (f, s); invalid
    and padding columns keep their fill / -inf."""
    p1 = tl.exp((zhat1 - m1[:, None]) - logs1[:, None])
    q = tl.where(p1 < f[:, None], f[:, None], p1 * s_f[:, None])
    return tl.where(valid, tl.log(tl.maximum(q, 1e-8)), zhat1), p1, q


@triton.jit
def _online(zhat, valid, m, s, sv, t, EXCL: tl.constexpr):
    """Fold one chunk into the row's running (m, s = sum e, sv = sum_V e, t = sum_V e (zhat - m))."""
    cm = tl.max(zhat, axis=1)
    m_new = tl.where(cm > m, cm, m)
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    d = zhat - m_new[:, None]
    e = tl.exp(d)
    if EXCL:
        e = tl.where(valid, e, 0.0)
    ev = tl.where(valid, e, 0.0)
    shift = tl.where(sv == 0.0, 0.0, (m - m_new) * sv)
    t = alpha * (t + shift) + tl.sum(tl.where(valid, e * d, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    sv = alpha * sv + tl.sum(ev, axis=1)
    return m_new, s, sv, t


@triton.jit
def _wide_stats(
    lg,
    rs,
    co,
    mk,
    mrs,
    mco,
    rl,
    row_ok,
    present,
    a_safe,
    mask_fill,
    floor,
    A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EXCL: tl.constexpr,
    FLOOR_ON: tl.constexpr,
):
    """A wide head's row statistics (the ``_small_stats`` tuple) from one streaming pass over the row (three
    with a floor); the first chunk's (zhat, valid) is returned too, so a head of at most BLOCK_C actions is read
    once for the statistics and the gradient. Also the number of actions the mask marks valid (absent rows
    included: their log-prob output follows the reference's)."""
    cols0 = tl.arange(0, BLOCK_C)
    z0, v0, m0 = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols0, mask_fill, A, HAS_MASK)
    zero = tl.sum(tl.zeros_like(z0), axis=1)
    ninf = zero + float("-inf")
    hit0 = cols0[None, :] == a_safe[:, None]
    n = tl.sum(v0.to(tl.float32), axis=1)
    n_mask = tl.sum(m0.to(tl.float32), axis=1)
    zsel = tl.sum(tl.where(hit0, z0, 0.0), axis=1)
    taken = tl.sum((hit0 & v0).to(tl.float32), axis=1)
    m, s, sv, t = _online(z0, v0, ninf, zero, zero, zero, EXCL)
    for c0 in range(BLOCK_C, A, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        zb, vb, mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
        hb = cols[None, :] == a_safe[:, None]
        n += tl.sum(vb.to(tl.float32), axis=1)
        n_mask += tl.sum(mb.to(tl.float32), axis=1)
        zsel += tl.sum(tl.where(hb, zb, 0.0), axis=1)
        taken += tl.sum((hb & vb).to(tl.float32), axis=1)
        m, s, sv, t = _online(zb, vb, m, s, sv, t, EXCL)
    if FLOOR_ON:
        # (m, s) so far are the un-floored ones: (2) the floor's sums, (3) the floored statistics
        m1 = m
        s1 = s
        logs1 = tl.log(s)
        f = _floor_params(n, floor)
        nu = zero
        po = zero
        for c0 in range(0, A, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            zb, vb, _mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
            p1 = tl.exp((zb - m1[:, None]) - logs1[:, None])
            nu += tl.sum((vb & (p1 < f[:, None])).to(tl.float32), axis=1)
            po += tl.sum(tl.where(vb & ~(p1 < f[:, None]), p1, 0.0), axis=1)
        a_s = tl.maximum(1.0 - nu * f, 1e-8)
        s_f = a_s / tl.maximum(po, 1e-8)
        m = ninf
        s = zero
        sv = zero
        t = zero
        zsel = zero
        for c0 in range(0, A, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            zb, vb, _mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
            z2, _p1, _q = _wide_floored(zb, vb, m1, logs1, f, s_f)
            m, s, sv, t = _online(z2, vb, m, s, sv, t, EXCL)
            zsel += tl.sum(tl.where(cols[None, :] == a_safe[:, None], z2, 0.0), axis=1)
    else:
        m1 = m
        s1 = m
        f = m
        s_f = m
        po = m
    if EXCL:
        sv = s
    logs = tl.log(s)
    pv = sv / s
    hraw = tl.where(n > 0.0, pv * logs - t / s, 0.0)
    st = (m, logs, hraw, pv, n, zsel - m, taken > 0.0, m1, s1, f, s_f, po, s)
    return st, z0, v0, n_mask


@triton.jit
def _wide_g(zhat1, valid, cols, st, a_safe, gL, ng, FLOOR_ON: tl.constexpr, EXCL: tl.constexpr):
    """One chunk: the floored zhat, p1, q (with a floor), p, and g = d/d logp."""
    m = st[S_M]
    logs = st[S_LOGS]
    m1 = st[S_M1]
    s1 = st[S_S1]
    f = st[S_F]
    s_f = st[S_SF]
    if FLOOR_ON:
        zhat, p1, q = _wide_floored(zhat1, valid, m1, tl.log(s1), f, s_f)
    else:
        zhat = zhat1
        p1 = zhat1
        q = zhat1
    lp = (zhat - m[:, None]) - logs[:, None]
    p = tl.exp(lp)
    if EXCL:
        p = tl.where(valid, p, 0.0)
    hit = cols[None, :] == a_safe[:, None]
    g = tl.where(hit, gL[:, None], 0.0) + tl.where(valid, ng[:, None] * p + (ng[:, None] * lp) * p, 0.0)
    return zhat, p1, q, p, g


@triton.jit
def _wide_dps(zhat, valid, p1, q, g, st, sig, EXCL: tl.constexpr):
    """The chain's d/d (p1 s) of one chunk (autograd's order, see _small_grad) and whether each column is over."""
    m = st[S_M]
    f = st[S_F]
    s2 = st[S_S]
    e2 = tl.exp(zhat - m[:, None])
    if EXCL:
        e2 = tl.where(valid, e2, 0.0)
    dlq = tl.where(valid, g + (-sig / s2)[:, None] * e2, 0.0)
    dq = tl.where(q >= 1e-8, dlq / tl.maximum(q, 1e-8), 0.0)
    under = valid & (p1 < f[:, None])
    return tl.where(under, 0.0, dq), valid & ~(p1 < f[:, None])


@triton.jit
def _wide_grad_chunk(zhat1, valid, cols, st, a_safe, gL, ng, sig, fin, fl, EXCL: tl.constexpr, FLOOR_ON: tl.constexpr):
    """d loss / d logits of one chunk (valid actions; 0 elsewhere)."""
    zhat, p1, q, p, g = _wide_g(zhat1, valid, cols, st, a_safe, gL, ng, FLOOR_ON, EXCL)
    gz = g - p * sig[:, None]
    if FLOOR_ON:
        m1 = st[S_M1]
        s_f = st[S_SF]
        regular, dsum_o, nsum1, go_po = fl
        dps, over = _wide_dps(zhat, valid, p1, q, g, st, sig, EXCL)
        dl1 = (dps * s_f[:, None] + tl.where(over, dsum_o[:, None], 0.0)) * p1
        e1 = tl.exp(zhat1 - m1[:, None])
        if EXCL:
            e1 = tl.where(valid, e1, 0.0)
        chain = dl1 + nsum1[:, None] * e1
        closed = tl.where(over, g - p1 * go_po[:, None], 0.0)
        gz = tl.where(regular[:, None], closed, chain)
    return tl.where(valid, tl.where(fin[:, None], gz, float("nan")), 0.0)


@triton.jit
def _wide_grad(
    lg,
    rs,
    co,
    mk,
    mrs,
    mco,
    gr,
    grs,
    gco,
    rl,
    row_ok,
    present,
    a_safe,
    st,
    z0,
    v0,
    gL,
    gE,
    mask_fill,
    A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EXCL: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    NORM_ENT: tl.constexpr,
    REUSE0: tl.constexpr,
):
    """Write a wide head's gradient: the first chunk from registers (REUSE0), the others read again (with a
    floor, two more passes for the floor's row sums)."""
    m = st[S_M]
    hraw = st[S_HRAW]
    pv = st[S_PV]
    n = st[S_N]
    s1 = st[S_S1]
    s_f = st[S_SF]
    po = st[S_PO]
    if NORM_ENT:
        ghr = tl.where(n > 1.0, gE / tl.log(tl.maximum(n, 2.0)), 0.0)
    else:
        ghr = gE
    ng = -ghr
    # sum_k d/d logp_k = gL + ng (P_V - Hraw) in closed form (sum_V p logp = -Hraw)
    sig = gL + ng * (pv - hraw)
    fin = _isfinite(gL) & _isfinite(gE)
    if FLOOR_ON:
        # the floor's row sums (autograd's order, see _small_grad): ds, G_O, clamped q in O; then sum1
        ds = tl.zeros_like(m)
        g_o = tl.zeros_like(m)
        n_bad = tl.zeros_like(m)
        for c0 in range(0, A, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            zb, vb, _mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
            zhat, p1, q, _p, g = _wide_g(zb, vb, cols, st, a_safe, gL, ng, FLOOR_ON, EXCL)
            dps, over = _wide_dps(zhat, vb, p1, q, g, st, sig, EXCL)
            ds += tl.sum(dps * p1, axis=1)
            g_o += tl.sum(tl.where(over, g, 0.0), axis=1)
            n_bad += tl.sum((over & (q < 1e-8)).to(tl.float32), axis=1)
        den = tl.maximum(po, 1e-8)
        dsum_o = tl.where(po >= 1e-8, -ds * (s_f / den), 0.0)
        sum1 = tl.zeros_like(m)
        for c0 in range(0, A, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            zb, vb, _mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
            zhat, p1, q, _p, g = _wide_g(zb, vb, cols, st, a_safe, gL, ng, FLOOR_ON, EXCL)
            dps, over = _wide_dps(zhat, vb, p1, q, g, st, sig, EXCL)
            sum1 += tl.sum((dps * s_f[:, None] + tl.where(over, dsum_o[:, None], 0.0)) * p1, axis=1)
        fl = ((po >= 1e-8) & (n_bad == 0.0), dsum_o, -sum1 / s1, g_o / den)
    else:
        fl = (fin, m, m, m)
    cols0 = tl.arange(0, BLOCK_C)
    if REUSE0:
        zc = z0
        vc = v0
    else:
        zc, vc, _mc = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols0, mask_fill, A, HAS_MASK)
    gz = _wide_grad_chunk(zc, vc, cols0, st, a_safe, gL, ng, sig, fin, fl, EXCL, FLOOR_ON)
    tl.store(
        gr + rl[:, None] * grs + gco + cols0[None, :],
        gz.to(gr.dtype.element_ty),
        mask=row_ok[:, None] & (cols0[None, :] < A),
    )
    for c0 in range(BLOCK_C, A, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        zb, vb, _mb = _wide_load(lg, rs, co, mk, mrs, mco, rl, row_ok, present, cols, mask_fill, A, HAS_MASK)
        gz = _wide_grad_chunk(zb, vb, cols, st, a_safe, gL, ng, sig, fin, fl, EXCL, FLOOR_ON)
        tl.store(
            gr + rl[:, None] * grs + gco + cols[None, :],
            gz.to(gr.dtype.element_ty),
            mask=row_ok[:, None] & (cols[None, :] < A),
        )


# ------------------------------------------------------------------------------------------------------------
# per-row statistics terms, by statistic (schema index): the leaves of the per-program reductions
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _head_stats(part_h, present, rel, w, ell, ent, lograt, ratio, n, taken, pol, clip_lo, clip_hi, BN: tl.constexpr):
    """One head's partial statistics over the program's rows: each statistic's per-row term (by schema index),
    reduced by its kind and stored at its index of ``part_h``."""
    fin_ell = (ell == ell) & (tl.abs(ell) != float("inf"))
    ok_ell = rel & (ell == ell)
    sums = ()
    for k in tl.static_range(NFH_SUM):
        if FH_SUM[k] == HD_POLICY_NUM:
            x = pol
        elif FH_SUM[k] == HD_ENTROPY_NUM:
            x = tl.where(rel, w * ent, 0.0)
        elif FH_SUM[k] == HD_KL_NUM:
            x = tl.where(rel, w * ((ratio - 1.0) - lograt), 0.0)
        elif FH_SUM[k] == HD_CLIP_NUM:
            x = tl.where(rel & ((ratio > clip_hi) | (ratio < clip_lo)), w, 0.0)
        elif FH_SUM[k] == HD_NONFINITE:
            x = (present & ~fin_ell).to(tl.float32)
        elif FH_SUM[k] == HD_EMPTY_MASK:
            x = (present & (n == 0.0)).to(tl.float32)
        elif FH_SUM[k] == HD_INVALID_ACTION:
            x = (present & ~taken).to(tl.float32)
        elif FH_SUM[k] == HD_VALID_SUM:
            x = tl.where(present, w * n, 0.0)
        elif FH_SUM[k] == HD_SINGLE:
            x = tl.where(present & (n == 1.0), w, 0.0)
        elif FH_SUM[k] == HD_LEARNABLE:
            x = tl.where(rel & (n > 1.0), w, 0.0)
        else:
            tl.static_assert(False, "a per-head sum statistic without a per-row term")
        sums = sums + (x,)
    # extremes for a max-reduction: maxima as they are, minima negated (NaN ignored)
    exts = ()
    for k in tl.static_range(NFH_EXT):
        if FH_EXT[k] == HD_RATIO_MAX:
            x = tl.where(rel & (ratio == ratio), ratio, float("-inf"))
        elif FH_EXT[k] == HD_LOGP_MIN:
            x = tl.where(ok_ell, -ell, float("-inf"))
        elif FH_EXT[k] == HD_LOGP_MAX:
            x = tl.where(ok_ell, ell, float("-inf"))
        elif FH_EXT[k] == HD_VALID_MIN:
            x = tl.where(present, -n, float("-inf"))
        elif FH_EXT[k] == HD_VALID_MAX:
            x = tl.where(present, n, float("-inf"))
        else:
            tl.static_assert(False, "a per-head extreme statistic without a per-row term")
        exts = exts + (x,)
    _reduce_cols(sums, FH_SUM, FH_SUM, CH_FH_SUM, NCH_FH_SUM, False, part_h, BN)
    _reduce_cols(exts, FH_EXT, FH_NEG, CH_FH_EXT, NCH_FH_EXT, True, part_h, BN)


@triton.jit
def _global_stats(part, present, w, r, L, gpol, clip_lo, clip_hi, vpres, vw, vnum, vclip, R, v, BN: tl.constexpr):
    """The program's global partial statistics (the pre-pass's excepted), by schema index and kind."""
    sums = ()
    for k in tl.static_range(NFG_SUM):
        if FG_SUM[k] == G_POLICY_NUM:
            x = gpol
        elif FG_SUM[k] == G_KL_K3:
            x = tl.where(present, w * ((r - 1.0) - L), 0.0)
        elif FG_SUM[k] == G_KL_K1:
            x = tl.where(present, w * -L, 0.0)
        elif FG_SUM[k] == G_CLIP:
            x = tl.where(present & ((r > clip_hi) | (r < clip_lo)), w, 0.0)
        elif FG_SUM[k] == G_CLIP_POS:
            x = tl.where(present & (r > clip_hi), w, 0.0)
        elif FG_SUM[k] == G_CLIP_NEG:
            x = tl.where(present & (r < clip_lo), w, 0.0)
        elif FG_SUM[k] == G_VALUE_NUM:
            x = vnum
        elif FG_SUM[k] == G_VALUE_CLIP:
            x = vclip
        else:
            tl.static_assert(False, "a global sum statistic without a per-row term")
        sums = sums + (x,)
    exts = ()
    for k in tl.static_range(NFG_EXT):
        if FG_EXT[k] == G_RATIO_MIN:
            x = tl.where(present & (r == r), -r, float("-inf"))
        elif FG_EXT[k] == G_RATIO_MAX:
            x = tl.where(present & (r == r), r, float("-inf"))
        else:
            tl.static_assert(False, "a global extreme statistic without a per-row term")
        exts = exts + (x,)
    _reduce_cols(sums, FG_SUM, FG_SUM, CH_FG_SUM, NCH_FG_SUM, False, part, BN)
    _reduce_cols(exts, FG_EXT, FG_NEG, CH_FG_EXT, NCH_FG_EXT, True, part, BN)
    for k in tl.static_range(NMOM):
        # the moments: (keep, weight, value) of the moment whose MEAN statistic is MOM_M[k]
        if MOM_M[k] == G_RATIO_MEAN:
            keep, mw, mx = present, w, r
        elif MOM_M[k] == G_RETURN_MEAN:
            keep, mw, mx = vpres, vw, R
        elif MOM_M[k] == G_RESID_MEAN:
            keep, mw, mx = vpres, vw, R - v
        else:
            tl.static_assert(False, "a moment without a per-row term")
        cw, cm, cq = _row_moments(keep, mw, mx)
        tl.store(part + MOM_W[k], cw)
        tl.store(part + MOM_M[k], cm)
        tl.store(part + MOM_Q[k], cq)


# ------------------------------------------------------------------------------------------------------------
# one row block: the forward (statistics, outputs, gradient for an upstream 1) or the fix-up's recompute
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _policy_head(
    st,
    in_range,
    rel,
    w,
    old,
    adv,
    den,
    g_pol,
    log_clamp,
    clip_lo,
    clip_hi,
    NORM_ENT: tl.constexpr,
    PER_HEAD: tl.constexpr,
):
    """ell, the entropy as used in the loss, the clamped log-ratio and per-head ratio, whether the log-ratio's
    clamp passes the gradient, the per-head surrogate term and (per_head) d loss / d ell."""
    logs = st[S_LOGS]
    hraw = st[S_HRAW]
    n = st[S_N]
    da = st[S_DA]
    ell = tl.where(in_range & (n > 0.0), da - logs, float("nan"))
    if NORM_ENT:
        ent = _norm_entropy(hraw, n)
    else:
        ent = hraw
    d = tl.where(rel, ell - old, 0.0)
    inside = rel & (d >= -log_clamp) & (d <= log_clamp)
    lograt = tl.where(rel, _clamp(d, -log_clamp, log_clamp), 0.0)
    ratio = tl.exp(lograt)
    if PER_HEAD:
        s1 = ratio * adv
        s2 = _clamp(ratio, clip_lo, clip_hi) * adv
        surr = tl.where((s1 <= s2) | (s1 != s1), s1, s2)
        pol = tl.where(rel, w * surr, 0.0)
        # torch.minimum's branch (a tie inside the clip range gives the same gradient either way)
        # (selected after the product: a row outside the surrogate's gradient gets exactly 0 even when the
        # upstream is infinite, as the reference's masked_fill)
        gl = tl.where(inside & ~(s1 > s2), (-(w * adv) * ratio) * _safe_div(g_pol, den), 0.0)
    else:
        pol = tl.zeros_like(ell)
        gl = pol
    return ell, ent, lograt, ratio, inside, pol, gl


@triton.jit
def _head_fwd(
    HI: tl.constexpr,
    WIDE: tl.constexpr,
    group,
    LG,
    LG_RS,
    LG_CO,
    MK,
    MK_RS,
    MK_CO,
    GR,
    GR_RS,
    GR_CO,
    ACT,
    ACT_S,
    OLD,
    OLD_S,
    REL,
    REL_S,
    FLOOR,
    KCOEF,
    ADV,
    ADV_SN,
    ADV_SH,
    LOGP,
    ENT,
    NORM,
    part,
    GLP,
    GLP_S0,
    GLP_S1,
    GENT,
    GENT_S0,
    GENT_S1,
    rl,
    row_ok,
    present,
    w,
    adv0,
    g_pol,
    g_ent,
    mask_fill,
    log_clamp,
    clip_lo,
    clip_hi,
    H: tl.constexpr,
    A: tl.constexpr,
    BLK: tl.constexpr,
    HOFF: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REL: tl.constexpr,
    PER_HEAD: tl.constexpr,
    ADV_PER_HEAD: tl.constexpr,
    NORM_ADV: tl.constexpr,
    NORM_ENT: tl.constexpr,
    EXCL: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    GRAD_ON: tl.constexpr,
    OUT_ON: tl.constexpr,
    TILE_STORE: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Head HI of one row block: statistics, outputs, partial statistics, and (per_head) its gradient; returns
    the clamped log-ratio and what the joint surrogate's gradient needs of this head."""
    a = tl.load(ACT[HI] + rl * ACT_S[HI], mask=row_ok, other=0)
    in_range = (a >= 0) & (a < A)
    a_safe = tl.where(in_range, a, 0).to(tl.int32)
    if HAS_REL:
        rel = present & (tl.load(REL[HI] + rl * REL_S[HI], mask=present, other=0) != 0)
    else:
        rel = present
    if WIDE:
        st, zs, vs, n_mask = _wide_stats(
            LG[HI],
            LG_RS[HI],
            LG_CO[HI],
            MK[HI],
            MK_RS[HI],
            MK_CO[HI],
            rl,
            row_ok,
            present,
            a_safe,
            mask_fill,
            FLOOR[HI],
            A,
            BLOCK_C,
            HAS_MASK,
            EXCL,
            FLOOR_ON,
        )
    else:
        zs = ()
        vs = ()
        n_mask = tl.zeros_like(w) + A
        if HAS_MASK:
            n_mask = tl.zeros_like(w)
        for j in tl.static_range(A):
            zs = zs + (group[0][HOFF + j].to(tl.float32),)
            if HAS_MASK:
                marked = group[1][HOFF + j] != 0
                n_mask += marked.to(tl.float32)
                vs = vs + (present & marked,)
            else:
                vs = vs + (present,)
        st = _small_stats(zs, vs, a_safe, mask_fill, FLOOR[HI], A, EXCL, FLOOR_ON)
    old = tl.load(OLD[HI] + rl * OLD_S[HI], mask=rel, other=0).to(tl.float32)
    if ADV_PER_HEAD:
        adv = tl.load(ADV + rl * ADV_SN + HI * ADV_SH, mask=present, other=0).to(tl.float32)
        if NORM_ADV:
            adv = (adv - tl.load(NORM + NPG + H + HI)) / tl.load(NORM + NPG + 2 * H + HI)
        adv = tl.where(present, adv, 0.0)
    else:
        adv = adv0
    den = tl.load(NORM + NPG + HI)
    ell, ent, lograt, ratio, inside, pol, gl = _policy_head(
        st, in_range, rel, w, old, adv, den, g_pol, log_clamp, clip_lo, clip_hi, NORM_ENT, PER_HEAD
    )
    if OUT_ON:
        # an absent step's log-prob is the reference's: no action is used, so every action has -log A (NaN when
        # the mask has no valid action or the action is out of range)
        absent = tl.where(in_range & (n_mask > 0.0), -tl.log(tl.zeros_like(w) + A), float("nan"))
        tl.store(LOGP + rl * H + HI, tl.where(present, ell, absent), mask=row_ok)
        tl.store(ENT + rl * H + HI, ent, mask=row_ok)
        _head_stats(
            part + GS + HI * HS,
            present,
            rel,
            w,
            ell,
            ent,
            lograt,
            ratio,
            st[S_N],
            st[S_TAKEN] & in_range,
            pol,
            clip_lo,
            clip_hi,
            BN,
        )
    keep = ()
    if GRAD_ON:
        gE = tl.where(rel, _safe_div(g_ent * -KCOEF[HI], den) * w, 0.0)
        if HAS_GENT:
            gE += tl.load(GENT + rl * GENT_S0 + HI * GENT_S1, mask=row_ok, other=0).to(tl.float32)
        if HAS_GLP:
            glp = tl.load(GLP + rl * GLP_S0 + HI * GLP_S1, mask=row_ok, other=0).to(tl.float32)
        else:
            glp = tl.zeros_like(gE)
        if PER_HEAD:
            gL = tl.where(in_range, gl + glp, 0.0)
            _head_grad(
                WIDE,
                zs,
                vs,
                st,
                a_safe,
                gL,
                gE,
                LG[HI],
                LG_RS[HI],
                LG_CO[HI],
                MK[HI],
                MK_RS[HI],
                MK_CO[HI],
                GR[HI],
                GR_RS[HI],
                GR_CO[HI],
                rl,
                row_ok,
                present,
                mask_fill,
                A,
                BLK,
                HAS_MASK,
                EXCL,
                FLOOR_ON,
                NORM_ENT,
                TILE_STORE,
                BN,
                BLOCK_C,
            )
        else:
            keep = (zs, vs, st, a_safe, in_range, inside, gE, glp)
    return lograt, keep


@triton.jit
def _head_grad(
    WIDE: tl.constexpr,
    zs,
    vs,
    st,
    a_safe,
    gL,
    gE,
    lg,
    lg_rs,
    lg_co,
    mk,
    mk_rs,
    mk_co,
    gr,
    gr_rs,
    gr_co,
    rl,
    row_ok,
    present,
    mask_fill,
    A: tl.constexpr,
    BLK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EXCL: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    NORM_ENT: tl.constexpr,
    TILE_STORE: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    if WIDE:
        _wide_grad(
            lg,
            lg_rs,
            lg_co,
            mk,
            mk_rs,
            mk_co,
            gr,
            gr_rs,
            gr_co,
            rl,
            row_ok,
            present,
            a_safe,
            st,
            zs,
            vs,
            gL,
            gE,
            mask_fill,
            A,
            BLOCK_C,
            HAS_MASK,
            EXCL,
            FLOOR_ON,
            NORM_ENT,
            True,
        )
    else:
        gz = _small_grad(zs, vs, st, a_safe, gL, gE, mask_fill, A, EXCL, FLOOR_ON, NORM_ENT)
        _store_cols(gr, gr_rs, gr_co, rl, row_ok, gz, A, BLK, BN, TILE_STORE)


@triton.jit
def _load_group(
    GI_H0: tl.constexpr,
    WIDE: tl.constexpr,
    LG,
    LG_RS,
    LG_CO,
    MK,
    MK_RS,
    MK_CO,
    rl,
    row_ok,
    present,
    W: tl.constexpr,
    WID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BN: tl.constexpr,
):
    """A group of small heads (packed side by side): one [BN, W] tile of logits (present rows) and of masks
    (every row: an absent step's log-prob output needs its mask count), as columns."""
    if WIDE:
        out = ()
    else:
        cols = tl.arange(0, W)
        ld = present[:, None] & (cols[None, :] < WID)
        zall = _cols(_load_tile(LG[GI_H0], LG_RS[GI_H0], LG_CO[GI_H0], rl, ld, cols, 0.0), BN, W)
        if HAS_MASK:
            lm = row_ok[:, None] & (cols[None, :] < WID)
            vall = _cols(_load_tile(MK[GI_H0], MK_RS[GI_H0], MK_CO[GI_H0], rl, lm, cols, 0), BN, W)
        else:
            vall = zall
        out = (zall, vall)
    return out


@triton.jit
def _rows(
    pid,
    LG,
    LG_RS,
    LG_CO,
    MK,
    MK_RS,
    MK_CO,
    GR,
    GR_RS,
    GR_CO,
    ACT,
    ACT_S,
    OLD,
    OLD_S,
    REL,
    REL_S,
    FLOOR,
    KCOEF,
    ADV,
    ADV_SN,
    ADV_SH,
    WT,
    WT_S,
    VAL,
    VAL_S,
    RET,
    RET_S,
    OVAL,
    OVAL_S,
    VWT,
    VWT_S,
    LOGP,
    ENT,
    JR,
    GV,
    NORM,
    part,
    GLP,
    GLP_S0,
    GLP_S1,
    GENT,
    GENT_S0,
    GENT_S1,
    g0,
    g1,
    g2,
    g3,
    N,
    mask_fill,
    log_clamp,
    joint_clamp,
    clip_lo,
    clip_hi,
    value_clip,
    entropy_coef,
    value_coef,
    H: tl.constexpr,
    SIZES: tl.constexpr,
    BLKS: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    NG: tl.constexpr,
    GH0: tl.constexpr,
    GNH: tl.constexpr,
    GW: tl.constexpr,
    GWID: tl.constexpr,
    GWIDE: tl.constexpr,
    HOFF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REL: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_V: tl.constexpr,
    HAS_VCLIP: tl.constexpr,
    HAS_VW: tl.constexpr,
    PER_HEAD: tl.constexpr,
    ADV_PER_HEAD: tl.constexpr,
    NORM_ADV: tl.constexpr,
    NORM_ENT: tl.constexpr,
    HAS_JCLAMP: tl.constexpr,
    EXCL: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    GRAD_ON: tl.constexpr,
    VGRAD_ON: tl.constexpr,
    OUT_ON: tl.constexpr,
    TILE_STORE: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    # every pointer moved to the block's first row (int64, once per tensor), so that per-element offsets are
    # int32 (local row x stride + column): no 64-bit address arithmetic per element
    row0 = (pid * BN).to(tl.int64)
    LG, MK, GR, ACT, OLD, REL = (
        _rebase(LG, LG_RS, row0, H),
        _rebase(MK, MK_RS, row0, H),
        _rebase(GR, GR_RS, row0, H),
        _rebase(ACT, ACT_S, row0, H),
        _rebase(OLD, OLD_S, row0, H),
        _rebase(REL, REL_S, row0, H),
    )
    ADV = ADV + row0 * ADV_SN
    if HAS_W:
        WT = WT + row0 * WT_S
    if HAS_V:
        VAL = VAL + row0 * VAL_S
        RET = RET + row0 * RET_S
    if HAS_VCLIP:
        OVAL = OVAL + row0 * OVAL_S
    if HAS_VW:
        VWT = VWT + row0 * VWT_S
    if OUT_ON:
        LOGP = LOGP + row0 * H
        ENT = ENT + row0 * H
        JR = JR + row0
    if VGRAD_ON:
        GV = GV + row0
    if HAS_GLP:
        GLP = GLP + row0 * GLP_S0
    if HAS_GENT:
        GENT = GENT + row0 * GENT_S0
    rl = tl.arange(0, BN)  # local rows
    zero = tl.zeros([BN], dtype=tl.float32)

    # steps: present = finite w > 0
    if HAS_W:
        w_raw = tl.load(WT + rl * WT_S, mask=row_ok, other=0).to(tl.float32)
    else:
        w_raw = tl.where(row_ok, 1.0, 0.0)
    present = row_ok & _isfinite(w_raw) & (w_raw > 0)
    w = tl.where(present, w_raw, 0.0)
    W = tl.load(NORM + N_WEIGHT)
    if ADV_PER_HEAD:
        adv0 = zero
    else:
        adv0 = tl.load(ADV + rl * ADV_SN, mask=present, other=0).to(tl.float32)
        if NORM_ADV:
            adv0 = (adv0 - tl.load(NORM + NPG + H)) / tl.load(NORM + NPG + 2 * H)
        adv0 = tl.where(present, adv0, 0.0)
    g_pol = g0 + g1
    g_ent = entropy_coef * g0 + g2
    g_val = value_coef * g0 + g3

    Lsum = zero
    keep = ()
    for gi in tl.static_range(NG):
        group = _load_group(
            GH0[gi], GWIDE[gi], LG, LG_RS, LG_CO, MK, MK_RS, MK_CO, rl, row_ok, present, GW[gi], GWID[gi], HAS_MASK, BN
        )
        for i in tl.static_range(tl.constexpr(GNH[gi])):
            lograt, kh = _head_fwd(
                GH0[gi] + i,
                GWIDE[gi],
                group,
                LG,
                LG_RS,
                LG_CO,
                MK,
                MK_RS,
                MK_CO,
                GR,
                GR_RS,
                GR_CO,
                ACT,
                ACT_S,
                OLD,
                OLD_S,
                REL,
                REL_S,
                FLOOR,
                KCOEF,
                ADV,
                ADV_SN,
                ADV_SH,
                LOGP,
                ENT,
                NORM,
                part,
                GLP,
                GLP_S0,
                GLP_S1,
                GENT,
                GENT_S0,
                GENT_S1,
                rl,
                row_ok,
                present,
                w,
                adv0,
                g_pol,
                g_ent,
                mask_fill,
                log_clamp,
                clip_lo,
                clip_hi,
                H,
                SIZES[GH0[gi] + i],
                BLKS[GH0[gi] + i],
                HOFF[GH0[gi] + i],
                FLOOR_ON[GH0[gi] + i],
                HAS_MASK,
                HAS_REL,
                PER_HEAD,
                ADV_PER_HEAD,
                NORM_ADV,
                NORM_ENT,
                EXCL,
                HAS_GLP,
                HAS_GENT,
                GRAD_ON,
                OUT_ON,
                TILE_STORE,
                BN,
                BLOCK_C,
            )
            Lsum += lograt
            keep = keep + (kh,)

    # the TRUE joint ratio
    if HAS_JCLAMP:
        jin = (Lsum >= -joint_clamp) & (Lsum <= joint_clamp)
        L = _clamp(Lsum, -joint_clamp, joint_clamp)
    else:
        jin = rows >= 0
        L = Lsum
    L = tl.where(present, L, 0.0)
    r = tl.exp(L)
    if OUT_ON:
        tl.store(JR + rl, r, mask=row_ok)
    if PER_HEAD:
        gpol = zero
    else:
        s1 = r * adv0
        s2 = _clamp(r, clip_lo, clip_hi) * adv0
        surr = tl.where((s1 <= s2) | (s1 != s1), s1, s2)
        gpol = tl.where(present, w * surr, 0.0)
        if GRAD_ON:
            base = tl.where(present & jin & ~(s1 > s2), (-(w * adv0) * r) * _safe_div(g_pol, W), 0.0)
            # phase 2: every head's gradient from the joint coefficient (the rows are still in registers)
            for gi in tl.static_range(NG):
                for i in tl.static_range(tl.constexpr(GNH[gi])):
                    zs, vs, st, a_safe, in_range, inside, gE, glp = keep[GH0[gi] + i]
                    gL = tl.where(in_range, tl.where(inside, base, 0.0) + glp, 0.0)
                    _head_grad(
                        GWIDE[gi],
                        zs,
                        vs,
                        st,
                        a_safe,
                        gL,
                        gE,
                        LG[GH0[gi] + i],
                        LG_RS[GH0[gi] + i],
                        LG_CO[GH0[gi] + i],
                        MK[GH0[gi] + i],
                        MK_RS[GH0[gi] + i],
                        MK_CO[GH0[gi] + i],
                        GR[GH0[gi] + i],
                        GR_RS[GH0[gi] + i],
                        GR_CO[GH0[gi] + i],
                        rl,
                        row_ok,
                        present,
                        mask_fill,
                        SIZES[GH0[gi] + i],
                        BLKS[GH0[gi] + i],
                        HAS_MASK,
                        EXCL,
                        FLOOR_ON[GH0[gi] + i],
                        NORM_ENT,
                        TILE_STORE,
                        BN,
                        BLOCK_C,
                    )

    # value loss terms
    if HAS_V:
        if HAS_VW:
            vw_raw = tl.load(VWT + rl * VWT_S, mask=row_ok, other=0).to(tl.float32)
        else:
            vw_raw = w_raw
        vpres = row_ok & _isfinite(vw_raw) & (vw_raw > 0)
        vw = tl.where(vpres, vw_raw, 0.0)
        v = tl.where(vpres, tl.load(VAL + rl * VAL_S, mask=vpres, other=0).to(tl.float32), 0.0)
        R = tl.where(vpres, tl.load(RET + rl * RET_S, mask=vpres, other=0).to(tl.float32), 0.0)
        d1 = v - R
        l1 = d1 * d1
        dl1 = 2.0 * d1
        if HAS_VCLIP:
            vo = tl.where(vpres, tl.load(OVAL + rl * OVAL_S, mask=vpres, other=0).to(tl.float32), 0.0)
            dv = v - vo
            # vo + clamp(v - vo, -d, d), exactly v where the clamp does not bind (as the reference)
            v_clipped = tl.where(dv > value_clip, vo + value_clip, tl.where(dv < -value_clip, vo - value_clip, v))
            d2 = v_clipped - R
            l2 = d2 * d2
            vl = tl.where((l1 != l1) | (l1 >= l2), l1, l2)
            vclip = tl.where(vpres & (l2 > l1), vw, 0.0)
            dl2 = 2.0 * d2
            inside_v = (dv >= -value_clip) & (dv <= value_clip)
        else:
            vl = l1
            vclip = zero
        vnum = tl.where(vpres, vw * vl, 0.0)
        if VGRAD_ON:
            # the reference's chain: the upstream u = (g 0.5 / VW) vw times each branch's local derivative, so a
            # clamp that blocks gives exactly 0 even for an infinite upstream (torch.maximum halves at a tie)
            u = vw * _safe_div(g_val * 0.5, tl.load(NORM + N_VWEIGHT))
            if HAS_VCLIP:
                t1 = u * dl1
                t2 = tl.where(inside_v, u * dl2, 0.0)
                gv = tl.where(l1 > l2, t1, tl.where(l2 > l1, t2, 0.5 * t1 + 0.5 * t2))
            else:
                gv = u * dl1
            tl.store(GV + rl, tl.where(vpres, gv, 0.0), mask=row_ok)
    else:
        vpres = row_ok & (rows < 0)
        vw = zero
        vnum = zero
        vclip = zero
        R = zero
        v = zero
    if OUT_ON:
        _global_stats(part, present, w, r, L, gpol, clip_lo, clip_hi, vpres, vw, vnum, vclip, R, v, BN)


@triton.jit
def _rescale(
    pid,
    GR,
    GR_RS,
    GR_CO,
    GV,
    N,
    scale,
    SIZES: tl.constexpr,
    NG: tl.constexpr,
    GH0: tl.constexpr,
    GW: tl.constexpr,
    GWID: tl.constexpr,
    GWIDE: tl.constexpr,
    GRAD_ON: tl.constexpr,
    VGRAD_ON: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The fix-up when only the loss's upstream scalar differs from 1: the forward's gradient times it, in place
    (the buffers' own coalesced tiles, no layout change)."""
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    row0 = (pid * BN).to(tl.int64)
    rl = tl.arange(0, BN)
    GV = GV + row0
    if GRAD_ON:
        GR = _rebase(GR, GR_RS, row0, len(GR))
        for gi in tl.static_range(NG):
            if GWIDE[gi]:
                for c0 in range(0, SIZES[GH0[gi]], BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    ptr = GR[GH0[gi]] + rl[:, None] * GR_RS[GH0[gi]] + GR_CO[GH0[gi]] + cols[None, :]
                    ok = row_ok[:, None] & (cols[None, :] < SIZES[GH0[gi]])
                    x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
                    tl.store(ptr, (x * scale).to(GR[GH0[gi]].dtype.element_ty), mask=ok)
            else:
                _scale_tile(GR[GH0[gi]], GR_RS[GH0[gi]], GR_CO[GH0[gi]], rl, row_ok, scale, GWID[gi], GW[gi])
    if VGRAD_ON:
        gv = tl.load(GV + rl, mask=row_ok, other=0.0)
        tl.store(GV + rl, gv * scale, mask=row_ok)


# ------------------------------------------------------------------------------------------------------------
# merging partial statistics (the last program of a launch; fixed order, by each statistic's kind)
# ------------------------------------------------------------------------------------------------------------
#: global statistics the forward's programs do not write: the pre-pass ones that are not a moment's weight
_SKIP_G = tuple(getattr(G, n) for n in PRE_GLOBAL if getattr(G, n) not in [w for w, _, _ in _schema.MOMENTS])
SKIP_G = tl.constexpr(_SKIP_G)
NSKIP_G = tl.constexpr(len(_SKIP_G))
SKIP_H = tl.constexpr(tuple(getattr(HD, n) for n in PRE_HEAD))
NSKIP_H = tl.constexpr(len(PRE_HEAD))
PMOM = tl.constexpr(_pow2(len(_schema.MOMENTS)))


@triton.jit
def _kinds(cols):
    """The kind of each statistic column (schema order: global block, then head blocks)."""
    kg = tl.zeros_like(cols)
    for j in tl.static_range(GS):
        kg = tl.where(cols == j, KIND_G[j], kg)
    hc = tl.where(cols >= GS, cols - GS, 0) % HS
    kh = tl.zeros_like(cols)
    for j in tl.static_range(HS):
        kh = tl.where(hc == j, KIND_H[j], kh)
    return tl.where(cols < GS, kg, kh)


@triton.jit
def _skipped(cols):
    """Columns the forward's programs leave unwritten (filled from the pre-pass at the end)."""
    out = cols < 0
    for j in tl.static_range(NSKIP_G):
        out = out | (cols == SKIP_G[j])
    hc = tl.where(cols >= GS, cols - GS, 0) % HS
    for j in tl.static_range(NSKIP_H):
        out = out | ((cols >= GS) & (hc == SKIP_H[j]))
    return out


@triton.jit
def _merge_rows(SRC, row0, nrows, K: tl.constexpr, KPAD: tl.constexpr, CH: tl.constexpr):
    """Statistics of the concatenation of rows [row0, row0 + nrows) of SRC [*, K]: sums and counts add, minima
    and maxima reduce, moments merge by Chan's formula; chunks of CH rows in order (bitwise reproducible)."""
    cols = tl.arange(0, KPAD)
    lok = (cols < K) & ~_skipped(cols)
    kind = _kinds(cols)
    pm = tl.arange(0, PMOM)
    mok = pm < NMOM
    widx = _index_vec(MOM_W, NMOM, PMOM)
    midx = _index_vec(MOM_M, NMOM, PMOM)
    qidx = _index_vec(MOM_Q, NMOM, PMOM)
    acc = tl.zeros([KPAD], dtype=tl.float32)
    mn = acc + float("inf")
    mx = acc + float("-inf")
    aw = tl.zeros([PMOM], dtype=tl.float32)
    am = aw
    aq = aw
    c = nrows * 0
    while c < nrows:
        rr = c + tl.arange(0, CH)
        rok = rr < nrows
        base = SRC + (row0 + rr).to(tl.int64)[:, None] * K
        tile = tl.load(base + cols[None, :], mask=rok[:, None] & lok[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(tile, axis=0)
        mn = tl.minimum(mn, tl.min(tl.where(rok[:, None], tile, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(rok[:, None], tile, float("-inf")), axis=0))
        mload = rok[:, None] & mok[None, :]
        tw = tl.load(base + widx[None, :], mask=mload, other=0.0, cache_modifier=".cg")
        tm = tl.load(base + midx[None, :], mask=mload, other=0.0, cache_modifier=".cg")
        tq = tl.load(base + qidx[None, :], mask=mload, other=0.0, cache_modifier=".cg")
        cw, cm, cq = _moments(tw, tm, tq, rr[:, None] + tl.zeros([CH, PMOM], dtype=tl.int32))
        aw, am, aq = _chan(aw, am, aq, cw, cm, cq)
        c += CH
    res = tl.where(kind == K_MIN, mn, tl.where(kind == K_MAX, mx, acc))
    for k in tl.static_range(NMOM):
        res = tl.where(cols == MOM_M[k], tl.sum(tl.where(pm == k, am, 0.0), axis=0), res)
        res = tl.where(cols == MOM_Q[k], tl.sum(tl.where(pm == k, aq, 0.0), axis=0), res)
    return res


@triton.jit
def _metric_table(
    STATS,
    OUT,
    LOSSES,
    entropy_coef,
    value_coef,
    KCOEF,
    H: tl.constexpr,
    HPAD: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_V: tl.constexpr,
    M_VCLIP: tl.constexpr,
    RATIO_UNBIASED: tl.constexpr,
    WRITE_LOSSES: tl.constexpr,
):
    """The metric table of esper_kernels.metrics._derive_table (rows from the schema) from the statistics vector;
    with WRITE_LOSSES also the four losses."""
    hrow = tl.arange(0, HPAD)
    hok = hrow < H
    hb = STATS + GS + hrow * HS
    rel_w = tl.load(hb + HD_REL_WEIGHT, mask=hok, other=0.0)
    rel_pos = hok & (rel_w > 0)
    rw1 = tl.where(rel_pos, rel_w, 1.0)
    W = tl.load(STATS + G_WEIGHT)
    steps = tl.load(STATS + G_STEPS)
    VW = tl.load(STATS + G_VALUE_WEIGHT)
    any_rel = tl.sum(rel_w, axis=0)
    kvec = tl.zeros([HPAD], dtype=tl.float32)
    for h in tl.static_range(H):
        kvec = tl.where(hrow == h, KCOEF[h], kvec)
    if PER_HEAD:
        pl = -tl.sum(tl.where(rel_pos, tl.load(hb + HD_POLICY_NUM, mask=hok, other=0.0) / rw1, 0.0), axis=0)
    else:
        pl = -_safe_div(tl.load(STATS + G_POLICY_NUM), W)
    ent_num = tl.load(hb + HD_ENTROPY_NUM, mask=hok, other=0.0)
    # a head without relevant steps adds 0 (select, never multiply: a NaN entropy must stay NaN)
    el = -tl.sum(tl.where(rel_pos, kvec * (ent_num / rw1), 0.0), axis=0)
    vl = 0.5 * _safe_div(tl.load(STATS + G_VALUE_NUM), VW)
    loss = pl + entropy_coef * el + value_coef * vl
    if WRITE_LOSSES:
        tl.store(LOSSES + 0, loss)
        tl.store(LOSSES + 1, pl)
        tl.store(LOSSES + 2, el)
        tl.store(LOSSES + 3, vl)
    zero = tl.sum(tl.zeros([HPAD], dtype=tl.float32), axis=0)  # (constants: W may be inf or NaN)
    one = zero + 1.0
    if HAS_V:
        hvd = tl.load(STATS + G_VALUE_STEPS)
    else:
        hvd = zero
    # torch.amin / amax over the heads: NaN propagates
    lmin_h = tl.load(hb + HD_LOGP_MIN, mask=hok, other=float("inf"))
    lmax_h = tl.load(hb + HD_LOGP_MAX, mask=hok, other=float("-inf"))
    lmin = tl.where(tl.sum((lmin_h != lmin_h).to(tl.int32), axis=0) > 0, float("nan"), tl.min(lmin_h, axis=0))
    lmax = tl.where(tl.sum((lmax_h != lmax_h).to(tl.int32), axis=0) > 0, float("nan"), tl.max(lmax_h, axis=0))
    has_logp = tl.where(lmin < float("inf"), any_rel, 0.0)
    var = tl.load(STATS + G_RATIO_M2) / W
    if RATIO_UNBIASED:
        var = var * (steps / (steps - 1.0))
    nonfinite = tl.sum(tl.load(hb + HD_NONFINITE, mask=hok, other=0.0), axis=0)
    rt_m2 = tl.load(STATS + G_RETURN_M2)
    for i in tl.static_range(NGM):
        if GM_FORM[i] == F_SPECIAL:
            if i == SP_LOSS:
                num, den, gate = loss, one, W + hvd
            elif i == SP_POLICY:
                if PER_HEAD:
                    num, den, gate = pl, one, any_rel
                else:
                    num, den, gate = pl, one, W
            elif i == SP_ENTROPY:
                num, den, gate = el, one, any_rel
            elif i == SP_VALUE:
                num, den, gate = vl, one, hvd
            elif i == SP_KL:
                kl = tl.sum(tl.load(hb + HD_KL_NUM, mask=hok, other=0.0), axis=0)
                num, den, gate = kl, any_rel, any_rel
            elif i == SP_RATIO_STD:
                num, den, gate = tl.sqrt_rn(var), one, W
            elif i == SP_LOGP_MIN:
                num, den, gate = lmin, one, has_logp
            elif i == SP_LOGP_MAX:
                num, den, gate = lmax, one, has_logp
            elif i == SP_ALL_FINITE:
                num, den, gate = tl.where((nonfinite == 0) & _isfinite(loss), 1.0, 0.0), one, one
            elif i == SP_EXPL_VAR:
                num, den, gate = 1.0 - tl.load(STATS + G_RESID_M2) / rt_m2, one, hvd * rt_m2
            elif i == SP_VCLIP:
                if M_VCLIP:
                    num, den, gate = tl.load(STATS + G_VALUE_CLIP), VW, VW
                else:
                    num, den, gate = one, one, zero
            else:
                if HAS_V:
                    num, den, gate = tl.load(STATS + G_BAD_VALUE_WEIGHTS), one, one
                else:
                    num, den, gate = one, one, zero
        else:
            # (num, den, gate) of a row of one statistic x and normaliser d (esper_kernels.metrics._row)
            x = tl.load(STATS + GM_STAT[i])
            if GM_OVER[i] == O_WEIGHT:
                d = W
            elif GM_OVER[i] == O_STEPS:
                d = steps
            elif GM_OVER[i] == O_VALUE_WEIGHT:
                d = VW
            else:
                d = one
            if GM_FORM[i] == F_MEAN:
                num, den, gate = x, d, d
            elif GM_FORM[i] == F_COUNT:
                num, den, gate = x, one, one
            elif GM_FORM[i] == F_VALUE:
                num, den, gate = x, one, d
            elif GM_KIND[i] == K_MIN:  # EXTREME: x where there is data and x is not the empty sentinel
                num, den, gate = x, one, tl.where(x < float("inf"), d, 0.0)
            else:
                num, den, gate = x, one, tl.where(x > float("-inf"), d, 0.0)
        tl.store(OUT + i, tl.where(gate > 0, num / den, float("nan")))
    onev = tl.zeros([HPAD], dtype=tl.float32) + 1.0
    for mi in tl.static_range(NHM):
        x = tl.load(hb + HM_STAT[mi], mask=hok, other=0.0)
        if HM_OVER[mi] == O_REL_WEIGHT:
            d = rel_w
        elif HM_OVER[mi] == O_WEIGHT:
            d = onev * W
        elif HM_OVER[mi] == O_STEPS:
            d = onev * steps
        elif HM_OVER[mi] == O_VALUE_WEIGHT:
            d = onev * VW
        else:
            d = onev
        if HM_FORM[mi] == F_MEAN:
            num, den, gate = x, d, d
        elif HM_FORM[mi] == F_COUNT:
            num, den, gate = x, onev, onev
        elif HM_FORM[mi] == F_VALUE:
            num, den, gate = x, onev, d
        elif HM_KIND[mi] == K_MIN:
            num, den, gate = x, onev, tl.where(x < float("inf"), d, 0.0)
        else:
            num, den, gate = x, onev, tl.where(x > float("-inf"), d, 0.0)
        tl.store(OUT + NGM + mi * H + hrow, tl.where(gate > 0, num / den, float("nan")), mask=hok)


@triton.jit
def _finalize(
    res,
    NORM,
    STATS,
    LOSSES,
    TABLE,
    entropy_coef,
    value_coef,
    KCOEF,
    H: tl.constexpr,
    K: tl.constexpr,
    KPAD: tl.constexpr,
    HPAD: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_V: tl.constexpr,
    M_VCLIP: tl.constexpr,
    RATIO_UNBIASED: tl.constexpr,
):
    """The merged statistics with the pre-pass's normalisers filled in, then the losses and the metric table."""
    cols = tl.arange(0, KPAD)
    for k in tl.static_range(NPG):
        res = tl.where(cols == PRE_G_IDX[k], tl.load(NORM + k), res)
    is_rw = (cols >= GS) & (cols < K) & ((tl.where(cols >= GS, cols - GS, 0) % HS) == HD_REL_WEIGHT)
    head = tl.where(is_rw, (cols - GS) // HS, 0)
    res = tl.where(is_rw, tl.load(NORM + NPG + head, mask=is_rw, other=0.0), res)
    tl.store(STATS + cols, res, mask=cols < K)
    tl.debug_barrier()
    _metric_table(
        STATS, TABLE, LOSSES, entropy_coef, value_coef, KCOEF, H, HPAD, PER_HEAD, HAS_V, M_VCLIP, RATIO_UNBIASED, True
    )


@triton.jit
def _last_program(
    pid,
    n_prog,
    PART,
    CNT,
    NORM,
    STATS,
    LOSSES,
    TABLE,
    entropy_coef,
    value_coef,
    KCOEF,
    H: tl.constexpr,
    K: tl.constexpr,
    KPAD: tl.constexpr,
    HPAD: tl.constexpr,
    GROUP: tl.constexpr,
    CH: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_V: tl.constexpr,
    M_VCLIP: tl.constexpr,
    RATIO_UNBIASED: tl.constexpr,
):
    """Two-level ticket: the last program of each group of GROUP programs merges the group's partial rows into a
    group row (after the programs' rows), the last group merger merges the group rows and finalises. Tickets
    reset themselves; rows merge in index order, so the result does not depend on which program is last."""
    tl.debug_barrier()  # every lane's partial-statistics stores before the ticket (release, below)
    n_groups = (n_prog + GROUP - 1) // GROUP
    g = pid // GROUP
    first = g * GROUP
    count = tl.minimum(n_prog - first, GROUP)
    t = tl.atomic_add(CNT + C_GROUP0 + g, 1, sem="acq_rel", scope="gpu")
    if t == count - 1:
        tl.store(CNT + C_GROUP0 + g, 0)
        res = _merge_rows(PART, first, count, K, KPAD, CH)
        if n_groups == 1:
            _finalize(
                res,
                NORM,
                STATS,
                LOSSES,
                TABLE,
                entropy_coef,
                value_coef,
                KCOEF,
                H,
                K,
                KPAD,
                HPAD,
                PER_HEAD,
                HAS_V,
                M_VCLIP,
                RATIO_UNBIASED,
            )
        else:
            cols = tl.arange(0, KPAD)
            tl.store(PART + (n_prog + g).to(tl.int64) * K + cols, res, mask=cols < K)
            tl.debug_barrier()
            t2 = tl.atomic_add(CNT + C_FINAL, 1, sem="acq_rel", scope="gpu")
            if t2 == n_groups - 1:
                tl.store(CNT + C_FINAL, 0)
                res2 = _merge_rows(PART, n_prog, n_groups, K, KPAD, CH)
                _finalize(
                    res2,
                    NORM,
                    STATS,
                    LOSSES,
                    TABLE,
                    entropy_coef,
                    value_coef,
                    KCOEF,
                    H,
                    K,
                    KPAD,
                    HPAD,
                    PER_HEAD,
                    HAS_V,
                    M_VCLIP,
                    RATIO_UNBIASED,
                )


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "n_prog"])
def _ppo_main_kernel(
    LG,
    LG_RS,
    LG_CO,
    MK,
    MK_RS,
    MK_CO,
    GR,
    GR_RS,
    GR_CO,  # per-head tuples: logits, masks, gradient buffers
    ACT,
    ACT_S,
    OLD,
    OLD_S,
    REL,
    REL_S,
    FLOOR,
    KCOEF,  # per-head tuples
    ADV,
    ADV_SN,
    ADV_SH,
    WT,
    WT_S,
    VAL,
    VAL_S,
    RET,
    RET_S,
    OVAL,
    OVAL_S,
    VWT,
    VWT_S,
    LOGP,
    ENT,
    JR,
    GV,
    NORM,
    PART,
    CNT,
    STATS,
    LOSSES,
    TABLE,
    GLOSS,
    GLOSS_S,
    GLP,
    GLP_S0,
    GLP_S1,
    GENT,
    GENT_S0,
    GENT_S1,
    N,
    n_prog,
    mask_fill,
    log_clamp,
    joint_clamp,
    clip_lo,
    clip_hi,
    value_clip,
    entropy_coef,
    value_coef,
    H: tl.constexpr,
    SIZES: tl.constexpr,
    BLKS: tl.constexpr,
    FLOOR_ON: tl.constexpr,
    NG: tl.constexpr,
    GH0: tl.constexpr,
    GNH: tl.constexpr,
    GW: tl.constexpr,
    GWID: tl.constexpr,
    GWIDE: tl.constexpr,
    HOFF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REL: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_V: tl.constexpr,
    HAS_VCLIP: tl.constexpr,
    HAS_VW: tl.constexpr,
    PER_HEAD: tl.constexpr,
    ADV_PER_HEAD: tl.constexpr,
    NORM_ADV: tl.constexpr,
    NORM_ENT: tl.constexpr,
    HAS_JCLAMP: tl.constexpr,
    EXCL: tl.constexpr,
    FIXUP: tl.constexpr,
    HOLDS: tl.constexpr,
    HAS_GLOSS: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    GRAD_ON: tl.constexpr,
    VGRAD_ON: tl.constexpr,
    TILE_STORE: tl.constexpr,
    M_VCLIP: tl.constexpr,
    RATIO_UNBIASED: tl.constexpr,
    K: tl.constexpr,
    KPAD: tl.constexpr,
    HPAD: tl.constexpr,
    GROUP: tl.constexpr,
    MERGE_CH: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The forward (FIXUP=False) or the backward's fix-up (FIXUP=True) of one block of BN rows."""
    pid = tl.program_id(0)
    if FIXUP:
        if HAS_GLOSS:
            g0 = tl.load(GLOSS).to(tl.float32)
            g1 = tl.load(GLOSS + GLOSS_S).to(tl.float32)
            g2 = tl.load(GLOSS + 2 * GLOSS_S).to(tl.float32)
            g3 = tl.load(GLOSS + 3 * GLOSS_S).to(tl.float32)
        else:
            g0 = tl.sum(tl.zeros([2], dtype=tl.float32), axis=0)
            g1 = g0
            g2 = g0
            g3 = g0
        recompute = True  # (a fix-up without held buffers, or with gradients on other outputs: recompute)
        if HOLDS and not HAS_GLP and not HAS_GENT:
            # the buffers hold the gradient for the upstream (1, 0, 0, 0): keep it, rescale it, or recompute
            only_loss = (g1 == 0.0) & (g2 == 0.0) & (g3 == 0.0)
            scalable = only_loss & _isfinite(g0)
            if scalable & (g0 != 1.0):
                _rescale(
                    pid, GR, GR_RS, GR_CO, GV, N, g0, SIZES, NG, GH0, GW, GWID, GWIDE, GRAD_ON, VGRAD_ON, BN, BLOCK_C
                )
            recompute = ~scalable
        if recompute:
            _rows(
                pid,
                LG,
                LG_RS,
                LG_CO,
                MK,
                MK_RS,
                MK_CO,
                GR,
                GR_RS,
                GR_CO,
                ACT,
                ACT_S,
                OLD,
                OLD_S,
                REL,
                REL_S,
                FLOOR,
                KCOEF,
                ADV,
                ADV_SN,
                ADV_SH,
                WT,
                WT_S,
                VAL,
                VAL_S,
                RET,
                RET_S,
                OVAL,
                OVAL_S,
                VWT,
                VWT_S,
                LOGP,
                ENT,
                JR,
                GV,
                NORM,
                PART,
                GLP,
                GLP_S0,
                GLP_S1,
                GENT,
                GENT_S0,
                GENT_S1,
                g0,
                g1,
                g2,
                g3,
                N,
                mask_fill,
                log_clamp,
                joint_clamp,
                clip_lo,
                clip_hi,
                value_clip,
                entropy_coef,
                value_coef,
                H,
                SIZES,
                BLKS,
                FLOOR_ON,
                NG,
                GH0,
                GNH,
                GW,
                GWID,
                GWIDE,
                HOFF,
                HAS_MASK,
                HAS_REL,
                HAS_W,
                HAS_V,
                HAS_VCLIP,
                HAS_VW,
                PER_HEAD,
                ADV_PER_HEAD,
                NORM_ADV,
                NORM_ENT,
                HAS_JCLAMP,
                EXCL,
                HAS_GLP,
                HAS_GENT,
                GRAD_ON,
                VGRAD_ON,
                False,
                TILE_STORE,
                BN,
                BLOCK_C,
            )
    else:
        part = PART + pid.to(tl.int64) * K
        _rows(
            pid,
            LG,
            LG_RS,
            LG_CO,
            MK,
            MK_RS,
            MK_CO,
            GR,
            GR_RS,
            GR_CO,
            ACT,
            ACT_S,
            OLD,
            OLD_S,
            REL,
            REL_S,
            FLOOR,
            KCOEF,
            ADV,
            ADV_SN,
            ADV_SH,
            WT,
            WT_S,
            VAL,
            VAL_S,
            RET,
            RET_S,
            OVAL,
            OVAL_S,
            VWT,
            VWT_S,
            LOGP,
            ENT,
            JR,
            GV,
            NORM,
            part,
            GLP,
            GLP_S0,
            GLP_S1,
            GENT,
            GENT_S0,
            GENT_S1,
            1.0,
            0.0,
            0.0,
            0.0,
            N,
            mask_fill,
            log_clamp,
            joint_clamp,
            clip_lo,
            clip_hi,
            value_clip,
            entropy_coef,
            value_coef,
            H,
            SIZES,
            BLKS,
            FLOOR_ON,
            NG,
            GH0,
            GNH,
            GW,
            GWID,
            GWIDE,
            HOFF,
            HAS_MASK,
            HAS_REL,
            HAS_W,
            HAS_V,
            HAS_VCLIP,
            HAS_VW,
            PER_HEAD,
            ADV_PER_HEAD,
            NORM_ADV,
            NORM_ENT,
            HAS_JCLAMP,
            EXCL,
            False,
            False,
            GRAD_ON,
            VGRAD_ON,
            True,
            TILE_STORE,
            BN,
            BLOCK_C,
        )
        _last_program(
            pid,
            n_prog,
            PART,
            CNT,
            NORM,
            STATS,
            LOSSES,
            TABLE,
            entropy_coef,
            value_coef,
            KCOEF,
            H,
            K,
            KPAD,
            HPAD,
            GROUP,
            MERGE_CH,
            PER_HEAD,
            HAS_V,
            M_VCLIP,
            RATIO_UNBIASED,
        )


@triton.jit(do_not_specialize=["N", "n_prog", "rows_per_prog"])
def _ppo_pre_kernel(
    REL,
    REL_S,
    ADV,
    ADV_SN,
    ADV_SH,
    WT,
    WT_S,
    VWT,
    VWT_S,
    PREP,
    CNT,
    NORM,
    N,
    n_prog,
    rows_per_prog,
    adv_eps,
    H: tl.constexpr,
    HAS_REL: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_V: tl.constexpr,
    HAS_VW: tl.constexpr,
    NORM_ADV: tl.constexpr,
    ADV_COLS: tl.constexpr,
    STD_UNBIASED: tl.constexpr,
    EPS_ADD: tl.constexpr,
    PK: tl.constexpr,
    PKP: tl.constexpr,
    CH: tl.constexpr,
    MCH: tl.constexpr,
):
    """The per-step normalisers. Program p sums rows [p * rows_per_prog, ...) into PREP[p] = (PRE_GLOBAL sums,
    each head's relevant weight, then (mean, M2) of each advantage column weighted by WEIGHT); the last program
    merges the rows in order into NORM (the advantage columns as (mean, divisor) of normalize_advantages)."""
    pid = tl.program_id(0)
    zero = tl.sum(tl.zeros([2], dtype=tl.float32), axis=0)
    sums = ()
    for _k in tl.static_range(NPG + H):
        sums = sums + (zero,)
    mom = ()
    for _c in tl.static_range(ADV_COLS):
        mom = mom + ((zero, zero, zero),)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    i = start
    while i < end:
        rows = i + tl.arange(0, CH)
        row_ok = rows < end
        r64 = rows.to(tl.int64)
        if HAS_W:
            w_raw = tl.load(WT + r64 * WT_S, mask=row_ok, other=0).to(tl.float32)
        else:
            w_raw = tl.where(row_ok, 1.0, 0.0)
        w_fin = _isfinite(w_raw)
        present = row_ok & w_fin & (w_raw > 0)
        w = tl.where(present, w_raw, 0.0)
        bad_w = (row_ok & (~w_fin | (w_raw < 0))).to(tl.float32)
        if HAS_V:
            if HAS_VW:
                vw_raw = tl.load(VWT + r64 * VWT_S, mask=row_ok, other=0).to(tl.float32)
            else:
                vw_raw = w_raw
            vw_fin = _isfinite(vw_raw)
            vpres = row_ok & vw_fin & (vw_raw > 0)
            vsteps = tl.sum(vpres.to(tl.float32), axis=0)
            vws = tl.sum(tl.where(vpres, vw_raw, 0.0), axis=0)
            bad_vw = tl.sum((row_ok & (~vw_fin | (vw_raw < 0))).to(tl.float32), axis=0)
        else:
            vsteps = zero
            vws = zero
            bad_vw = zero
        block = ()
        for k in tl.static_range(NPG):
            if k == N_STEPS:
                x = tl.sum(present.to(tl.float32), axis=0)
            elif k == N_WEIGHT:
                x = tl.sum(w, axis=0)
            elif k == N_BAD_W:
                x = tl.sum(bad_w, axis=0)
            elif k == N_VSTEPS:
                x = vsteps
            elif k == N_VWEIGHT:
                x = vws
            else:
                x = bad_vw
            block = block + (sums[k] + x,)
        for h in tl.static_range(H):
            if HAS_REL:
                rel = present & (tl.load(REL[h] + r64 * REL_S[h], mask=present, other=0) != 0)
            else:
                rel = present
            block = block + (sums[NPG + h] + tl.sum(tl.where(rel, w, 0.0), axis=0),)
        sums = block
        if NORM_ADV:
            new = ()
            for c in tl.static_range(ADV_COLS):
                a = tl.load(ADV + r64 * ADV_SN + c * ADV_SH, mask=present, other=0).to(tl.float32)
                lw, lm, lq = _moment_leaf(present, w, a)
                cw, cm, cq = _moments(lw, lm, lq, tl.arange(0, CH))
                aw, am, aq = mom[c]
                new = new + (_chan(aw, am, aq, cw, cm, cq),)
            mom = new
        i += CH
    row = PREP + pid.to(tl.int64) * PK
    for k in tl.static_range(NPG + H):
        tl.store(row + k, sums[k])
    if NORM_ADV:
        for c in tl.static_range(ADV_COLS):
            aw, am, aq = mom[c]
            tl.store(row + NPG + H + 2 * c, am)
            tl.store(row + NPG + H + 2 * c + 1, aq)

    tl.debug_barrier()
    t = tl.atomic_add(CNT + C_PRE, 1, sem="acq_rel", scope="gpu")
    if t == n_prog - 1:
        tl.store(CNT + C_PRE, 0)
        cols = tl.arange(0, PKP)
        acc = tl.zeros([PKP], dtype=tl.float32)
        mw = ()
        for _c in tl.static_range(ADV_COLS):
            mw = mw + ((zero, zero, zero),)
        p = n_prog * 0
        while p < n_prog:
            pr = p + tl.arange(0, MCH)
            pok = pr < n_prog
            base = PREP + pr.to(tl.int64) * PK
            tile = tl.load(
                base[:, None] + cols[None, :],
                mask=pok[:, None] & (cols[None, :] < NPG + H),
                other=0.0,
                cache_modifier=".cg",
            )
            acc += tl.sum(tile, axis=0)
            if NORM_ADV:
                new = ()
                for c in tl.static_range(ADV_COLS):
                    tw = tl.load(base + N_WEIGHT, mask=pok, other=0.0, cache_modifier=".cg")
                    tm = tl.load(base + NPG + H + 2 * c, mask=pok, other=0.0, cache_modifier=".cg")
                    tq = tl.load(base + NPG + H + 2 * c + 1, mask=pok, other=0.0, cache_modifier=".cg")
                    cw, cm, cq = _moments(tw, tm, tq, pr)
                    aw, am, aq = mw[c]
                    new = new + (_chan(aw, am, aq, cw, cm, cq),)
                mw = new
            p += MCH
        tl.store(NORM + cols, acc, mask=cols < NPG + H)
        steps = tl.sum(tl.where(cols == N_STEPS, acc, 0.0), axis=0)
        for c in tl.static_range(H):
            if NORM_ADV and c < ADV_COLS:
                aw, am, aq = mw[c]
                var = _safe_div(aq, aw)
                if STD_UNBIASED:
                    var = tl.where(steps > 1.0, var * (steps / tl.maximum(steps - 1.0, 1.0)), 0.0)
                std = tl.sqrt_rn(var)
                if EPS_ADD:
                    den = std + adv_eps
                else:
                    den = tl.maximum(std, adv_eps)
                tl.store(NORM + NPG + H + c, am)
                tl.store(NORM + NPG + 2 * H + c, den)
            else:
                tl.store(NORM + NPG + H + c, 0.0)
                tl.store(NORM + NPG + 2 * H + c, 1.0)


@triton.jit
def _ppo_metrics_kernel(
    STATS,
    OUT,
    entropy_coef,
    value_coef,
    KCOEF,
    H: tl.constexpr,
    HPAD: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_V: tl.constexpr,
    M_VCLIP: tl.constexpr,
    RATIO_UNBIASED: tl.constexpr,
):
    """One program: the metric table of any statistics vector (the forward writes its own table; this serves
    merged or all-reduced statistics)."""
    _metric_table(
        STATS, OUT, STATS, entropy_coef, value_coef, KCOEF, H, HPAD, PER_HEAD, HAS_V, M_VCLIP, RATIO_UNBIASED, False
    )

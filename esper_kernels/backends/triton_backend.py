"""The ``triton`` backend: the fused PPO loss as Triton kernels (``triton_kernels.py``), host side.

One-pass protocol (``fused.py``): a training step is three launches, none of which syncs with the host.

* forward = ``_ppo_pre_kernel`` (the per-step normalisers, ``NORM``) + ``_ppo_main_kernel`` (one pass over the
  logits: statistics, per-step outputs, and, when a gradient is needed, d loss / d logits and d loss / d values
  for an upstream gradient of 1 on ``loss``, written into the buffers the caller passes; the last program
  merges the partial statistics and writes the statistics vector, the losses and the metric table);
* backward = ``_ppo_main_kernel`` as the fix-up, which reads the incoming gradients on the device: nothing to do
  for a plain ``loss.backward()``, an in-place rescale when only the loss's upstream scalar differs from 1, a
  recompute from the logits otherwise (or when the buffers do not hold the forward's gradient).

Saved between forward and backward (``saved_shape``): ``NORM``, float32 [6 + 3 H] (pre-pass sums, each head's
relevant weight, the advantage mean and divisor per column). Nothing per step: the recompute re-derives
everything from the inputs.

Tickets: the kernels' last-program merges count finished programs in an int32 buffer per (device, stream) that
the last program resets, so consecutive launches on one stream (and CUDA-graph replays) reuse it; two streams
must not run this loss concurrently with one buffer, hence one per stream.

Triton is imported lazily (``_kernels``), so this module imports without Triton and ``unavailable_reasons``
says why the backend cannot run. Without a CUDA device the backend runs on CPU tensors in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before the kernels are first used (the tests do this).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import warnings
import weakref

import torch

from ..config import ResolvedConfig
from ..schema import GLOBAL_METRICS, HEAD_METRICS, stats_size
from .base import Supports, device_capability
from .fused import FusedBackend, FusedCall, register_fused

__all__ = ["TritonBackend", "BACKENDS"]

# ---- tuning (module globals, read at every call; the interpreter tests lower them to reach every path) -------
#: heads of more than this many actions are "wide" (streamed per row in chunks); the others run one row per lane
SMALL_MAX = 32
#: warps of a small-head program (rows per program = 32 x warps on a GPU); fewer when the batch is small
SMALL_WARPS = 4
#: rows per program for small heads; 0 = 32 x warps (the interpreter tests set a few rows to get many programs)
ROWS_PER_PROGRAM = 0
#: packed small heads side by side share one loaded tile while their total width is at most this (0: a tile per
#: head); the tile is split into per-action register columns with one layout conversion
GROUP_MAX = 16
#: store the gradient of small heads as joined [rows, width] tiles (coalesced) instead of one column at a time
TILE_STORE = True
#: the same for the backward's fix-up; off: its recompute (rare: only when outputs other than the loss carry a
#: gradient) holds the row's gradient columns in fewer registers (ptxas spilled the joined tiles at rl_1m)
FIXUP_TILE_STORE = False
#: rows per program when a head is wide, and the widest chunk (columns) of a wide head
WIDE_ROWS = 2
MAX_BLOCK_C = 2048
#: programs per merge group (the last of each group merges the group's partial rows; the last group merger
#: merges the groups), and rows per merge chunk
MERGE_GROUP = 64
MERGE_CHUNK = 16
#: pre-pass: rows per chunk, most programs, rows per merge chunk
PRE_CHUNK = 1024
PRE_PROGRAMS = 256
PRE_MERGE_CHUNK = 64
#: register cap per thread of the main kernel (ptxas otherwise settles below 255 with spills in some variants)
MAXNREG = 255
#: more heads than this are refused (kernel-parameter space, compile time)
MAX_HEADS = 24
#: oldest supported CUDA compute capability (Triton's requirement), and the oldest with native bf16
MIN_CAPABILITY = (7, 5)
BF16_CAPABILITY = (8, 0)
#: ticket buffer size: 2 + the most merge groups one launch may have
COUNTERS = 2 + 4096

_KERNELS = None
_SM_COUNT: dict[int, int] = {}
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _kernels():
    """The kernel module (imports Triton on first use)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels as k

        _KERNELS = k
    return _KERNELS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: oldest Triton with tuple kernel arguments in the compiler and the interpreter
MIN_TRITON = (3, 3)


def _find_triton() -> str | None:
    """Why Triton cannot be used (looked up once, without importing it), or None."""
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'triton>=3.3')"
        version = importlib.metadata.version("triton")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return "triton is not installed (pip install 'triton>=3.3')"
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None  # a development build: assume recent
    if (major, minor) < MIN_TRITON:
        return f"triton {version} is too old: tuple kernel arguments need triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]}"
    return None


_TRITON_PROBLEM = _find_triton()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2_ceil(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _counters(device: torch.device, groups: int) -> torch.Tensor:
    """The int32 ticket buffer of the current stream (zero between launches: the last program resets it)."""
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    buf = _COUNTERS.get(key)
    need = max(COUNTERS, 2 + groups)
    if buf is None or buf.numel() < need:
        buf = _COUNTERS[key] = torch.zeros(need, dtype=torch.int32, device=device)
    return buf


class _Plan:
    """Tile sizes of one call: which heads are wide, the head groups sharing a tile, rows per program."""

    __slots__ = (
        "blks",
        "block_c",
        "bn",
        "gh0",
        "gnh",
        "gw",
        "gwid",
        "gwide",
        "hoff",
        "n_groups",
        "num_warps",
        "programs",
        "wide",
    )

    def __init__(
        self, sizes: tuple[int, ...], n: int, device: torch.device, groupable: bool, floors: tuple[bool, ...] = ()
    ):
        H = len(sizes)
        self.wide = tuple(a > SMALL_MAX for a in sizes)
        self.blks = tuple(max(2, _pow2_ceil(a)) for a in sizes)
        # groups: consecutive small heads side by side in one tile (packed logits and masks), wide heads alone
        gh0, gnh, gw, gwid, gwide, hoff = [], [], [], [], [], [0] * H
        h = 0
        while h < H:
            if self.wide[h]:
                gh0.append(h), gnh.append(1), gw.append(2), gwid.append(sizes[h]), gwide.append(True)
                h += 1
                continue
            width, k = sizes[h], 1
            while groupable and h + k < H and not self.wide[h + k] and width + sizes[h + k] <= GROUP_MAX:
                hoff[h + k] = width
                width += sizes[h + k]
                k += 1
            gh0.append(h), gnh.append(k), gw.append(max(2, _pow2_ceil(width))), gwid.append(width)
            gwide.append(False)
            h += k
        self.gh0, self.gnh, self.gw, self.gwid = tuple(gh0), tuple(gnh), tuple(gw), tuple(gwid)
        self.gwide, self.hoff = tuple(gwide), tuple(hoff)
        if any(self.wide):
            widest = max(a for a, w in zip(sizes, self.wide) if w)
            self.block_c = min(_pow2_ceil(MAX_BLOCK_C), _pow2_ceil(widest))
            if any(w and f for w, f in zip(self.wide, floors)):
                self.block_c = max(2, self.block_c // 2)  # the floor's passes hold more chunk tiles
            self.bn = max(2, _pow2_ceil(WIDE_ROWS))
            self.num_warps = 4 if self.bn * self.block_c <= 2048 else 8
        else:
            self.block_c = 2
            warps = max(1, SMALL_WARPS)
            if device.type == "cuda":  # fewer rows per program when the batch does not fill the device
                while warps > 1 and _cdiv(n, 32 * warps) < 2 * _sm_count(device):
                    warps //= 2
            self.num_warps = warps
            self.bn = _pow2_ceil(ROWS_PER_PROGRAM) if ROWS_PER_PROGRAM else 32 * warps
            self.bn = max(2, self.bn)
        self.programs = max(1, _cdiv(n, self.bn))
        self.n_groups = _cdiv(self.programs, MERGE_GROUP)


def _u8(t: torch.Tensor) -> torch.Tensor:
    """bool tensors are read as uint8 (same bytes, no copy)."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _head_table(tensors: list[torch.Tensor], offsets: tuple[int, ...], num_heads: int):
    """(pointers, row strides, column offsets) per head, for packed [N, S] or per-head [N, A_h] tensors."""
    if len(tensors) == 1:
        t = _u8(tensors[0])
        return (t,) * num_heads, (t.stride(0),) * num_heads, tuple(offsets)
    ts = tuple(_u8(t) for t in tensors)
    return ts, tuple(t.stride(0) for t in ts), (0,) * num_heads


def _step_table(tensors: list[torch.Tensor]):
    ts = tuple(_u8(t) for t in tensors)
    return ts, tuple(t.stride(0) for t in ts)


@contextlib.contextmanager
def _launch_context(device: torch.device):
    """The tensors' CUDA device as the current one; in the interpreter, numpy's warnings about the inf/NaN
    arithmetic that the kernels select away (``tl.where``) silenced."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if _interpreting():
            import numpy as np

            stack.enter_context(np.errstate(all="ignore"))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice" of rows the kernels discard
        yield


_SUPPORTS = Supports(
    devices=("cuda",),
    max_heads=MAX_HEADS,
    min_capability=MIN_CAPABILITY,
    dtype_capability={torch.bfloat16: BF16_CAPABILITY},
)
_SUPPORTS_INTERPRETED = Supports(
    devices=("cuda", "cpu"),
    max_heads=MAX_HEADS,
    min_capability=MIN_CAPABILITY,
    dtype_capability={torch.bfloat16: BF16_CAPABILITY},
)


class _Encoded:
    """A call's kernel arguments that do not change between its forward and its backward."""

    __slots__ = ("consts", "fixup_consts", "inputs", "plan", "pre_args", "pre_consts", "scalars")


def _encode(call: FusedCall) -> _Encoded:
    enc = call.cache.get("triton")
    if enc is not None:
        return enc
    cfg = call.cfg
    N, H = call.n, call.num_heads
    dev = call.logits[0].device
    offsets = call.offsets
    groupable = call.packed and (not call.masks or len(call.masks) == 1)
    plan = _Plan(call.head_sizes, N, dev, groupable, tuple(f > 0 for f in cfg.prob_floor))
    lg = _head_table(call.logits, offsets, H)
    mk = _head_table(call.masks, offsets, H) if call.masks else lg
    act = _step_table(call.actions)
    old = _step_table(call.old_log_probs)
    rel = _step_table(call.relevance) if call.relevance else act
    adv = call.advantages
    adv_ph = adv.dim() == 2
    w = call.weights
    v, R, vo, vw = call.values, call.returns, call.old_values, call.value_weights
    has_v = v is not None
    has_vclip = has_v and vo is not None and math.isfinite(cfg.value_clip)
    has_vw = has_v and vw is not None
    jc = cfg.joint_log_ratio_clamp
    floors = tuple(max(float(f), 0.0) for f in cfg.prob_floor)
    kcoef = tuple(float(x) for x in cfg.entropy_coef_per_head)
    K = stats_size(H)
    enc = _Encoded()
    enc.plan = plan
    enc.inputs = (
        *lg,
        *mk,
        *act,
        *old,
        *rel,
        floors,
        kcoef,
        adv,
        adv.stride(0),
        adv.stride(1) if adv_ph else 0,
        None if w is None else _u8(w),
        0 if w is None else w.stride(0),
        v,
        v.stride(0) if has_v else 0,
        R,
        R.stride(0) if has_v else 0,
        vo if has_vclip else None,
        vo.stride(0) if has_vclip else 0,
        _u8(vw) if has_vw else None,
        vw.stride(0) if has_vw else 0,
    )
    enc.scalars = (
        cfg.mask_fill,
        cfg.log_ratio_clamp,
        jc if math.isfinite(jc) else 0.0,
        1.0 - cfg.eps_low,
        1.0 + cfg.eps_high,
        cfg.value_clip if has_vclip else 0.0,
        cfg.entropy_coef,
        cfg.value_coef,
    )
    enc.consts = dict(
        H=H,
        SIZES=tuple(call.head_sizes),
        BLKS=plan.blks,
        FLOOR_ON=tuple(f > 0 for f in floors),
        NG=len(plan.gh0),
        GH0=plan.gh0,
        GNH=plan.gnh,
        GW=plan.gw,
        GWID=plan.gwid,
        GWIDE=plan.gwide,
        HOFF=plan.hoff,
        HAS_MASK=bool(call.masks),
        HAS_REL=bool(call.relevance),
        HAS_W=w is not None,
        HAS_V=has_v,
        HAS_VCLIP=has_vclip,
        HAS_VW=has_vw,
        PER_HEAD=bool(cfg.per_head),
        ADV_PER_HEAD=adv_ph,
        NORM_ADV=bool(cfg.normalize_advantages),
        NORM_ENT=bool(cfg.normalize_entropy),
        HAS_JCLAMP=math.isfinite(jc),
        EXCL=bool(cfg.mask_exclude),
        TILE_STORE=bool(TILE_STORE),
        M_VCLIP=has_v and math.isfinite(cfg.value_clip),
        RATIO_UNBIASED=bool(cfg.ratio_std_unbiased),
        K=K,
        KPAD=_pow2_ceil(K),
        HPAD=max(2, _pow2_ceil(H)),
        GROUP=MERGE_GROUP,
        MERGE_CH=MERGE_CHUNK,
        BN=plan.bn,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
        maxnreg=MAXNREG,
    )
    enc.fixup_consts = {**enc.consts, "TILE_STORE": bool(FIXUP_TILE_STORE)}
    # the pre-pass
    norm_adv = bool(cfg.normalize_advantages)
    pk = _kernels().NPG + H + 2 * (H if adv_ph else 1)
    rows_per_prog = max(PRE_CHUNK, _pow2_ceil(_cdiv(max(N, 1), PRE_PROGRAMS)))
    enc.pre_args = (
        *rel,
        adv,
        adv.stride(0),
        adv.stride(1) if adv_ph else 0,
        None if w is None else _u8(w),
        0 if w is None else w.stride(0),
        _u8(vw) if has_vw else None,
        vw.stride(0) if has_vw else 0,
    )
    enc.pre_consts = dict(
        rows_per_prog=rows_per_prog,
        programs=max(1, _cdiv(N, rows_per_prog)),
        pk=pk,
        consts=dict(
            H=H,
            HAS_REL=bool(call.relevance),
            HAS_W=w is not None,
            HAS_V=has_v,
            HAS_VW=has_vw,
            NORM_ADV=norm_adv,
            ADV_COLS=H if adv_ph else 1,
            STD_UNBIASED=bool(cfg.advantage_std_unbiased),
            EPS_ADD=bool(cfg.advantage_eps_add),
            PK=pk,
            PKP=_pow2_ceil(pk),
            CH=PRE_CHUNK,
            MCH=PRE_MERGE_CHUNK,
            num_warps=4,
        ),
    )
    call.cache["triton"] = enc
    return enc


class TritonBackend(FusedBackend):
    """The fused loss in Triton: CUDA tensors on a GPU, or CPU tensors in Triton's interpreter."""

    name = "triton"
    one_pass = True

    def __init__(self):
        #: data_ptr of a forward's statistics -> (weak reference to them, version, table, config, has_values)
        self._tables: dict[int, tuple] = {}

    @property
    def supports(self) -> Supports:  # type: ignore[override]
        """CUDA tensors; CPU tensors too in Triton's interpreter (TRITON_INTERPRET=1)."""
        return _SUPPORTS_INTERPRETED if _interpreting() else _SUPPORTS

    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        return [_kernels().norm_size(num_heads)]

    def unavailable_reasons(self) -> list[str]:
        if _TRITON_PROBLEM:
            return [_TRITON_PROBLEM]
        if _interpreting():
            return []
        if not torch.cuda.is_available():
            return [
                "no CUDA device (set TRITON_INTERPRET=1 before the first call to run Triton's interpreter "
                "on CPU tensors)"
            ]
        if torch.version.hip is None:
            cap = device_capability(torch.device("cuda"))
            if cap < MIN_CAPABILITY:
                return [
                    f"GPU compute capability {cap[0]}.{cap[1]} is older than the "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} Triton needs"
                ]
        return []

    # ---- the pre-pass ---------------------------------------------------------------------------------------
    @staticmethod
    def _pre(k, call: FusedCall, enc: _Encoded, norm: torch.Tensor, cnt: torch.Tensor) -> None:
        pc = enc.pre_consts
        prep = torch.empty((pc["programs"], pc["pk"]), dtype=torch.float32, device=norm.device)
        k._ppo_pre_kernel[(pc["programs"],)](
            *enc.pre_args,
            prep,
            cnt,
            norm,
            call.n,
            pc["programs"],
            pc["rows_per_prog"],
            call.cfg.advantage_eps,
            **pc["consts"],
        )

    def _main(
        self,
        k,
        call: FusedCall,
        enc: _Encoded,
        norm,
        *,
        grads,
        grad_values,
        log_probs,
        entropy,
        joint_ratio,
        part,
        cnt,
        stats,
        losses,
        table,
        fixup: bool,
        holds: bool = False,
        grad_losses=None,
        grad_log_probs=None,
        grad_entropy=None,
    ) -> None:
        H = call.num_heads
        gr = _head_table(grads, call.offsets, H) if grads is not None else enc.inputs[:3]
        gl, glp, gent = grad_losses, grad_log_probs, grad_entropy
        dummy = norm
        k._ppo_main_kernel[(enc.plan.programs,)](
            *enc.inputs[:6],
            *gr,
            *enc.inputs[6:],
            dummy if log_probs is None else log_probs,
            dummy if entropy is None else entropy,
            dummy if joint_ratio is None else joint_ratio,
            dummy if grad_values is None else grad_values,
            norm,
            dummy if part is None else part,
            cnt,
            dummy if stats is None else stats,
            dummy if losses is None else losses,
            dummy if table is None else table,
            dummy if gl is None else gl,
            0 if gl is None else gl.stride(0),
            dummy if glp is None else glp,
            0 if glp is None else glp.stride(0),
            0 if glp is None else glp.stride(1),
            dummy if gent is None else gent,
            0 if gent is None else gent.stride(0),
            0 if gent is None else gent.stride(1),
            call.n,
            enc.plan.programs,
            *enc.scalars,
            FIXUP=fixup,
            HOLDS=holds,
            HAS_GLOSS=gl is not None,
            HAS_GLP=glp is not None,
            HAS_GENT=gent is not None,
            GRAD_ON=grads is not None,
            VGRAD_ON=grad_values is not None,
            **(enc.fixup_consts if fixup else enc.consts),
        )

    # ---- forward ------------------------------------------------------------------------------------------
    def kernel_forward(
        self, call: FusedCall, grads: list[torch.Tensor] | None = None, grad_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        k = _kernels()
        N, H = call.n, call.num_heads
        dev = call.logits[0].device
        f32 = dict(dtype=torch.float32, device=dev)
        K = stats_size(H)
        losses = torch.empty(4, **f32)
        log_probs = torch.empty((N, H), **f32)
        entropy = torch.empty((N, H), **f32)
        joint_ratio = torch.empty(N, **f32)
        stats = torch.empty(K, **f32)
        norm = torch.empty(k.norm_size(H), **f32)
        table = torch.empty(len(GLOBAL_METRICS) + len(HEAD_METRICS) * H, **f32)
        enc = _encode(call)
        plan = enc.plan
        part = torch.empty((plan.programs + plan.n_groups) * K, **f32)
        with _launch_context(dev):
            cnt = _counters(dev, plan.n_groups)
            self._pre(k, call, enc, norm, cnt)
            self._main(
                k,
                call,
                enc,
                norm,
                grads=grads,
                grad_values=grad_values,
                log_probs=log_probs,
                entropy=entropy,
                joint_ratio=joint_ratio,
                part=part,
                cnt=cnt,
                stats=stats,
                losses=losses,
                table=table,
                fixup=False,
            )
        return losses, log_probs, entropy, joint_ratio, stats, norm, table

    # ---- backward: the fix-up -------------------------------------------------------------------------------
    def kernel_backward(
        self,
        call: FusedCall,
        stats: torch.Tensor,
        saved: torch.Tensor,
        grad_losses: torch.Tensor | None,
        grad_log_probs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
        *,
        grads: list[torch.Tensor] | None = None,
        grad_values: torch.Tensor | None = None,
        holds: bool = False,
    ) -> None:
        if call.n == 0 or (grads is None and grad_values is None):
            return
        k = _kernels()
        enc = _encode(call)
        dev = call.logits[0].device
        with _launch_context(dev):
            self._main(
                k,
                call,
                enc,
                saved,
                grads=grads,
                grad_values=grad_values,
                log_probs=None,
                entropy=None,
                joint_ratio=None,
                part=None,
                cnt=saved,
                stats=None,
                losses=None,
                table=None,
                fixup=True,
                holds=holds,
                grad_losses=grad_losses,
                grad_log_probs=grad_log_probs,
                grad_entropy=grad_entropy,
            )

    # ---- metric table --------------------------------------------------------------------------------------
    has_metric_table = True

    def remember_table(self, stats: torch.Tensor, table: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> None:
        """The forward wrote the metric table of ``stats``: ``metric_table`` returns it instead of a launch while
        these statistics are alive and unmodified."""
        if stats.is_inference():  # no version counter: the table is derived again when asked
            return
        key = stats.data_ptr()

        def forget(ref, key=key, tables=self._tables):
            entry = tables.get(key)
            if entry is not None and entry[0] is ref:
                del tables[key]

        self._tables[key] = (weakref.ref(stats, forget), stats._version, table, cfg, has_values)

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        entry = None if stats.is_inference() else self._tables.get(stats.data_ptr())
        if entry is not None:
            ref, version, table, tcfg, thv = entry
            orig = ref()
            if (
                orig is not None
                and orig._version == version
                and stats._version == version
                and tcfg == cfg
                and thv == has_values
                and orig.data_ptr() == stats.data_ptr()
            ):
                return table
        k = _kernels()
        H = (stats.numel() - int(k.GS)) // int(k.HS)
        out = torch.empty(len(GLOBAL_METRICS) + len(HEAD_METRICS) * H, dtype=torch.float32, device=stats.device)
        with _launch_context(stats.device):
            k._ppo_metrics_kernel[(1,)](
                stats,
                out,
                cfg.entropy_coef,
                cfg.value_coef,
                tuple(float(x) for x in cfg.entropy_coef_per_head),
                H=H,
                HPAD=max(2, _pow2_ceil(H)),
                PER_HEAD=bool(cfg.per_head),
                HAS_V=has_values,
                M_VCLIP=has_values and math.isfinite(cfg.value_clip),
                RATIO_UNBIASED=bool(cfg.ratio_std_unbiased),
                num_warps=1,
            )
        return out


BACKENDS = {"triton": register_fused(TritonBackend())}

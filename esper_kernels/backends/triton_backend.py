"""The ``triton`` backend: the fused PPO loss as Triton kernels (``triton_kernels.py``), host side.

Per call: forward = ``_ppo_fwd_kernel`` (one pass over logits and masks, one program per BLOCK_N rows, one
row of partial statistics per program) + ``_ppo_reduce_kernel`` (one launch when the forward ran at most 256
programs, as esper's batches do; two up to 32,768 programs, e.g. rl_1m's 8,192; three beyond); backward = one
``_ppo_bwd_kernel`` launch. No host synchronisation, no torch op besides allocations and dtype views (bool as
uint8), so the ops can be captured in CUDA graphs.

Saved between forward and backward (``saved_shape``): float32 [N, H + 1]; column h holds the unnormalised
d policy-loss / d ell_ih (the global normaliser, W or den_h, is read back from the statistics vector by the
backward), column H the unnormalised d value-loss / d v_i. Everything else the backward needs (the softmax,
the entropy, the floor) it recomputes from the logits.

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

import torch

from ..config import ResolvedConfig
from ..metrics import GLOBAL_METRICS, HEAD_METRICS
from ..stats import GLOBAL_SIZE, HD, HEAD_SIZE, G, stats_size
from .base import Supports, device_capability
from .fused import FusedBackend, FusedCall, register_fused

__all__ = ["TritonBackend", "BACKENDS"]

# ---- tuning (module globals, read at every call; the interpreter tests lower them to reach every path) ----
#: elements of one [rows, columns] register tile; a head whose padded width is more than MAX_TILE / MIN_ROWS
#: is "wide" and streamed in column blocks of MAX_TILE / MIN_ROWS
MAX_TILE = 8192
#: rows per program for small heads (fewer when the batch is too small to fill the device)
MAX_ROWS = 128
#: small heads are padded to the widest small head's width when that is at most this (0: each its own width)
UNIFORM_WIDTH = 0
#: fewest rows per program (tl.arange(0, 1) is avoided: 2 is the narrowest tile dimension)
MIN_ROWS = 2
#: below this many rows per program, small batches do not split further to fill the device
FILL_MIN_ROWS = 16
#: elements of one reduction chunk
REDUCE_TILE = 4096
#: the last reduction stage (one program) takes at most this many partial rows; earlier stages fold
#: REDUCE_ROWS_PER_PROGRAM rows each
REDUCE_FINAL_ROWS = 256
REDUCE_ROWS_PER_PROGRAM = 128
#: more heads than this are refused (kernel-parameter space, per-head flags in an int32)
MAX_HEADS = 24
#: oldest supported CUDA compute capability (Triton's requirement), and the oldest with native bf16
MIN_CAPABILITY = (7, 5)
BF16_CAPABILITY = (8, 0)

_KERNELS = None
_SM_COUNT: dict[int, int] = {}


def _kernels():
    """The kernel module (imports Triton on first use)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels as k

        _check_layout(k)
        _KERNELS = k
    return _KERNELS


def _check_layout(k) -> None:
    """The kernels hard-code the statistics layout; make sure it is esper_kernels.stats'."""
    assert int(k.GS) == GLOBAL_SIZE and int(k.HS) == HEAD_SIZE
    for name in dir(G):
        if name.isupper():
            assert int(getattr(k, f"G_{name}")) == getattr(G, name), name
    for name in dir(HD):
        if name.isupper():
            assert int(getattr(k, f"HD_{name}")) == getattr(HD, name), name


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


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Plan:
    """Tile sizes of one call: per-head padded widths, which heads stream, rows per program."""

    __slots__ = ("blks", "block_c", "block_n", "num_warps", "programs", "wide")

    def __init__(self, sizes: tuple[int, ...], n: int, device: torch.device, floors: tuple[bool, ...] = ()):
        max_tile = _pow2_floor(MAX_TILE)
        min_rows = max(2, _pow2_floor(MIN_ROWS))
        blks = tuple(max(2, _pow2_ceil(a)) for a in sizes)
        self.wide = tuple(b * min_rows > max_tile for b in blks)
        # small heads padded to one common width (up to UNIFORM_WIDTH): every [rows, width] tile then has the same
        # register layout, so per-row values pass from head to head without layout conversions
        common = max((b for b, w in zip(blks, self.wide) if not w), default=2)
        if common <= UNIFORM_WIDTH:
            blks = tuple(b if w else common for b, w in zip(blks, self.wide))
        self.blks = blks
        if any(self.wide):
            self.block_n = min_rows
            self.block_c = max(2, max_tile // min_rows)
            if any(w and f for w, f in zip(self.wide, floors)):
                self.block_c = max(2, self.block_c // 2)  # the floor's passes hold more [rows, block] tiles
            widest = self.block_c
        else:
            widest = max(self.blks)
            block_n = max(min_rows, min(_pow2_floor(MAX_ROWS), max_tile // widest))
            target = 2 * _sm_count(device) if device.type == "cuda" else 1  # programs to fill the device
            while block_n > max(min_rows, FILL_MIN_ROWS) and _cdiv(n, block_n) < target:
                block_n //= 2
            self.block_n = block_n
            self.block_c = 2  # unused
        tile = self.block_n * widest
        self.num_warps = 4 if tile <= 2048 else 8
        self.programs = _cdiv(n, self.block_n)


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


_SUPPORTS = Supports(devices=("cuda",), max_heads=MAX_HEADS, min_capability=MIN_CAPABILITY,
                     dtype_capability={torch.bfloat16: BF16_CAPABILITY})
_SUPPORTS_INTERPRETED = Supports(devices=("cuda", "cpu"), max_heads=MAX_HEADS, min_capability=MIN_CAPABILITY,
                                 dtype_capability={torch.bfloat16: BF16_CAPABILITY})


class TritonBackend(FusedBackend):
    """The fused loss in Triton: CUDA tensors on a GPU, or CPU tensors in Triton's interpreter."""

    name = "triton"

    @property
    def supports(self) -> Supports:  # type: ignore[override]
        """CUDA tensors; CPU tensors too in Triton's interpreter (TRITON_INTERPRET=1)."""
        return _SUPPORTS_INTERPRETED if _interpreting() else _SUPPORTS

    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        return [n, num_heads + 1]

    def unavailable_reasons(self) -> list[str]:
        if _TRITON_PROBLEM:
            return [_TRITON_PROBLEM]
        if _interpreting():
            return []
        if not torch.cuda.is_available():
            return ["no CUDA device (set TRITON_INTERPRET=1 before the first call to run Triton's interpreter "
                    "on CPU tensors)"]
        if torch.version.hip is None:
            cap = device_capability(torch.device("cuda"))
            if cap < MIN_CAPABILITY:
                return [f"GPU compute capability {cap[0]}.{cap[1]} is older than the "
                        f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} Triton needs"]
        return []

    # ---- forward ------------------------------------------------------------------------------------------
    def kernel_forward(self, call: FusedCall) -> tuple[torch.Tensor, ...]:
        k = _kernels()
        cfg = call.cfg
        N, H = call.n, call.num_heads
        dev = call.logits[0].device
        f32 = dict(dtype=torch.float32, device=dev)
        K = stats_size(H)
        losses = torch.empty(4, **f32)
        log_probs = torch.empty((N, H), **f32)
        entropy = torch.empty((N, H), **f32)
        joint_ratio = torch.empty(N, **f32)
        saved = torch.empty((N, H + 1), **f32)
        stats = torch.empty(K, **f32)
        plan = _Plan(call.head_sizes, N, dev, tuple(f > 0 for f in cfg.prob_floor))
        part = torch.empty((max(plan.programs, 1), K), **f32)

        with _launch_context(dev):
            if N > 0:
                offsets = call.offsets
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
                k._ppo_fwd_kernel[(plan.programs,)](
                    *lg, *mk, *act, *old, *rel, tuple(max(f, 0.0) for f in cfg.prob_floor),
                    adv, adv.stride(0), adv.stride(1) if adv_ph else 0,
                    None if w is None else _u8(w), 0 if w is None else w.stride(0),
                    v, v.stride(0) if has_v else 0, R, R.stride(0) if has_v else 0,
                    vo if has_vclip else None, vo.stride(0) if has_vclip else 0,
                    _u8(vw) if has_vw else None, vw.stride(0) if has_vw else 0,
                    log_probs, entropy, joint_ratio, saved, part,
                    N, cfg.mask_fill, cfg.log_ratio_clamp, jc if math.isfinite(jc) else 0.0,
                    1.0 - cfg.eps_low, 1.0 + cfg.eps_high, cfg.value_clip if has_vclip else 0.0,
                    H=H, SIZES=tuple(call.head_sizes), BLKS=plan.blks, WIDE=plan.wide,
                    FLOOR_ON=tuple(f > 0 for f in cfg.prob_floor), HAS_MASK=bool(call.masks),
                    HAS_REL=bool(call.relevance), HAS_W=w is not None, HAS_V=has_v, HAS_VCLIP=has_vclip,
                    HAS_VW=has_vw, PER_HEAD=bool(cfg.per_head), ADV_PER_HEAD=adv_ph,
                    NORM_ENT=bool(cfg.normalize_entropy), HAS_JCLAMP=math.isfinite(jc), K=K,
                    BLOCK_N=plan.block_n, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
                )
            self._reduce(k, part, plan.programs, stats, losses, H, cfg)
        return losses, log_probs, entropy, joint_ratio, stats, saved

    @staticmethod
    def _reduce(k, part: torch.Tensor, rows: int, stats: torch.Tensor, losses: torch.Tensor, H: int,
                cfg: ResolvedConfig) -> None:
        """Fold the partial-statistics rows in a fixed order: stats (and losses) bitwise reproducible."""
        K = stats.numel()
        kpad = _pow2_ceil(K)
        block_p = max(2, min(64, _pow2_floor(max(REDUCE_TILE // kpad, 1))))
        common = dict(H=H, K=K, KPAD=kpad, BLOCK_P=block_p, PER_HEAD=bool(cfg.per_head), num_warps=8)
        kcoef = tuple(float(x) for x in cfg.entropy_coef_per_head)
        per = max(2 * block_p, _pow2_ceil(REDUCE_ROWS_PER_PROGRAM))
        while rows > max(1, int(REDUCE_FINAL_ROWS)):
            programs = _cdiv(rows, per)
            out = torch.empty((programs, K), dtype=torch.float32, device=part.device)
            k._ppo_reduce_kernel[(programs,)](part, rows, out, losses, cfg.entropy_coef, cfg.value_coef, kcoef,
                                              ROWS=per, FINAL=False, **common)
            part, rows = out, programs
        # the last stage's trip count is a power of two (few compiled variants), rows past n_in are masked
        k._ppo_reduce_kernel[(1,)](part, rows, stats, losses, cfg.entropy_coef, cfg.value_coef, kcoef,
                                   ROWS=max(block_p, _pow2_ceil(rows)), FINAL=True, **common)

    # ---- metric table --------------------------------------------------------------------------------------
    has_metric_table = True

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        k = _kernels()
        H = (stats.numel() - GLOBAL_SIZE) // HEAD_SIZE
        out = torch.empty(len(GLOBAL_METRICS) + len(HEAD_METRICS) * H, dtype=torch.float32, device=stats.device)
        with _launch_context(stats.device):
            k._ppo_metrics_kernel[(1,)](
                stats, out, cfg.entropy_coef, cfg.value_coef, tuple(float(x) for x in cfg.entropy_coef_per_head),
                H=H, HPAD=max(2, _pow2_ceil(H)), PER_HEAD=bool(cfg.per_head), HAS_V=has_values,
                HAS_VCLIP=has_values and math.isfinite(cfg.value_clip), num_warps=1)
        return out

    # ---- backward -----------------------------------------------------------------------------------------
    def kernel_backward(self, call: FusedCall, stats: torch.Tensor, saved: torch.Tensor,
                        grad_losses: torch.Tensor | None, grad_log_probs: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        cfg = call.cfg
        N, H = call.n, call.num_heads
        dev = call.logits[0].device
        grads = [torch.empty(t.shape, dtype=t.dtype, device=dev) for t in call.logits]
        has_v = call.values is not None
        grad_values = torch.empty(N, dtype=torch.float32, device=dev) if has_v else None
        if N == 0:
            return grads, grad_values
        k = _kernels()
        plan = _Plan(call.head_sizes, N, dev, tuple(f > 0 for f in cfg.prob_floor))
        offsets = call.offsets
        lg = _head_table(call.logits, offsets, H)
        mk = _head_table(call.masks, offsets, H) if call.masks else lg
        gr = _head_table(grads, offsets, H)
        act = _step_table(call.actions)
        rel = _step_table(call.relevance) if call.relevance else act
        w = call.weights
        gl, glp, gent = grad_losses, grad_log_probs, grad_entropy
        with _launch_context(dev):
            k._ppo_bwd_kernel[(plan.programs,)](
                *lg, *mk, *gr, *act, *rel, tuple(max(f, 0.0) for f in cfg.prob_floor),
                tuple(float(x) for x in cfg.entropy_coef_per_head),
                None if w is None else _u8(w), 0 if w is None else w.stride(0), saved, stats,
                gl, 0 if gl is None else gl.stride(0),
                glp, 0 if glp is None else glp.stride(0), 0 if glp is None else glp.stride(1),
                gent, 0 if gent is None else gent.stride(0), 0 if gent is None else gent.stride(1),
                grad_values, N, cfg.mask_fill, cfg.entropy_coef, cfg.value_coef,
                H=H, SIZES=tuple(call.head_sizes), BLKS=plan.blks, WIDE=plan.wide,
                FLOOR_ON=tuple(f > 0 for f in cfg.prob_floor), HAS_MASK=bool(call.masks),
                HAS_REL=bool(call.relevance), HAS_W=w is not None, HAS_V=has_v, HAS_GLOSS=gl is not None,
                HAS_GLP=glp is not None, HAS_GENT=gent is not None, PER_HEAD=bool(cfg.per_head),
                NORM_ENT=bool(cfg.normalize_entropy), BLOCK_N=plan.block_n, BLOCK_C=plan.block_c,
                num_warps=plan.num_warps,
            )
        return grads, grad_values


BACKENDS = {"triton": register_fused(TritonBackend())}

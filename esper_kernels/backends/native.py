"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension ``esper_kernels._C`` (``csrc/``), host side.

The extension takes plain integers (data pointers, element strides, dtype codes, sizes) and floats (the
config), never torch objects, so it does not link libtorch and survives PyTorch upgrades. This module
allocates every output with torch, fills one named ``_C.Params`` per call (the PPOParams struct of
``csrc/ppo_params.h``, field by field; ``_C.pyi``) and runs:

* ``cpu``: ``_C.cpu_forward`` / ``_C.cpu_backward`` with ``torch.get_num_threads()`` threads; results are
  bitwise independent of the thread count (fixed row chunks, partials merged in a fixed order).
* ``cuda``: ``_C.cuda_onepass_forward`` / ``_C.cuda_onepass_backward`` on ``torch.cuda.current_stream(device)``
  under the tensors' device, through fused.py's one-pass protocol: three launches a step (pre-pass, forward that
  also writes the gradient, fix-up); its scratch (normalisers, per-block partials, tickets) comes from torch's
  allocator, so calls are capturable in CUDA graphs. ``CudaHostEmulation`` runs the same kernels' code on the
  CPU (tests).

Per-head inputs are read in place: packed ``[N, S]`` logits and masks become H pointers into one buffer
(column offset, common row stride), separate ``[N, A_h]`` tensors H pointers with their own row strides; bool
tensors are read as bytes (no copy). The ``cpu`` backend saves between forward and backward (``saved_shape``)
float32 ``[N, H + 1]``, column h the unnormalised d policy-loss / d ell_ih (the backward divides by W or den_h
read from the statistics vector), column H the unnormalised d value-loss / d v_i, then each (step, head)'s row
maximum m and log sum exp(z - m), ``[N, H]`` each, so that its backward needs one exp per logit and no max/sum
pass (never their sum, the log-sum-exp, which rounds at the magnitude of the logits). The ``cuda`` backend saves
only its normalisers and two ticket counters (``[4 + 3H + 2]``): its fix-up recomputes from the logits when it
has to.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..config import ResolvedConfig
from ..metrics import GLOBAL_METRICS, HEAD_METRICS
from ..schema import GLOBAL_SIZE, HEAD_SIZE, fingerprint, stats_size
from .base import Supports
from .fused import FusedBackend, FusedCall, register_fused

__all__ = ["CpuBackend", "CudaBackend", "CudaHostEmulation", "BACKENDS", "forward_params", "backward_params"]

try:
    from .. import _C
except ImportError as e:  # the extension is not built (or not importable): say why, never crash the registry
    _C = None
    _IMPORT_ERROR = (
        f"the C++ extension esper_kernels._C is not built or cannot be imported ({e}); build it "
        "with `pip install --no-build-isolation -e .` (see README)"
    )
else:
    _IMPORT_ERROR = ""
    if _C.LAYOUT_FINGERPRINT != fingerprint():
        _IMPORT_ERROR = (
            f"the C++ extension esper_kernels._C was built from another statistics layout (schema "
            f"fingerprint {_C.LAYOUT_FINGERPRINT}, the package has {fingerprint()}); rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
        _C = None

#: dtype codes of csrc/ppo_params.h (enum DType)
_DT = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.bool: 4,
    torch.uint8: 4,
    torch.int32: 5,
    torch.int64: 6,
}
MAX_HEADS = 32 if _C is None else int(_C.MAX_HEADS)
#: oldest GPU the CUDA part is built for (sm_80 machine code, compute_90 PTX)
MIN_CAPABILITY = (8, 0)
_NONE3 = (0, 0, 0)
_NONE4 = (0, 0, 0, 0)


def _vec(t: torch.Tensor | None) -> tuple[int, int, int]:
    """A per-step vector as (pointer, element stride, dtype code); (0, 0, 0) = not given."""
    return _NONE3 if t is None else (t.data_ptr(), t.stride(0), _DT[t.dtype])


def _col(t: torch.Tensor, h: int) -> tuple[int, int, int]:
    """Column h of an [N, H] tensor as a strided vector."""
    return (t.data_ptr() + h * t.stride(1) * t.element_size(), t.stride(0), _DT[t.dtype])


def _mat(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return _NONE4 if t is None else (t.data_ptr(), t.stride(0), t.stride(1), _DT[t.dtype])


def _head_ptrs(tensors: list[torch.Tensor], offsets: tuple[int, ...], num_heads: int) -> list[tuple[int, int]]:
    """(pointer, row stride) per head, for packed [N, S] or per-head [N, A_h] tensors."""
    if not tensors:
        return [(0, 0)] * num_heads
    if len(tensors) == 1:
        t = tensors[0]
        base, rs, es = t.data_ptr(), t.stride(0), t.element_size()
        return [(base + off * es, rs) for off in offsets]
    return [(t.data_ptr(), t.stride(0)) for t in tensors]


#: _C.Params templates with everything but the call's pointers and N set, by _template_key (a few per run)
_TEMPLATES: dict[tuple, object] = {}


def _template_key(call: FusedCall) -> tuple:
    cfg = call.cfg
    has_v = call.values is not None
    return (
        cfg,
        call.head_sizes,
        call.logits[0].dtype,
        bool(call.masks),
        bool(call.relevance),
        call.advantages.dim() == 2,
        has_v,
        has_v and call.old_values is not None,
    )


def _template(call: FusedCall):
    """The call's ``_C.Params`` without pointers: flags, config numbers and head sizes (cached)."""
    key = _template_key(call)
    p = _TEMPLATES.get(key)
    if p is not None:
        return p
    cfg = call.cfg
    has_v = call.values is not None
    has_vclip = has_v and call.old_values is not None and math.isfinite(cfg.value_clip)
    p = _C.Params()
    p.num_heads = call.num_heads
    p.logits_dtype = _DT[call.logits[0].dtype]
    p.has_mask = int(bool(call.masks))
    p.has_rel = int(bool(call.relevance))
    p.per_head = int(cfg.per_head)
    p.adv_per_head = int(call.advantages.dim() == 2)
    p.normalize_entropy = int(cfg.normalize_entropy)
    p.has_values = int(has_v)
    p.has_vclip = int(has_vclip)
    p.has_jclamp = int(math.isfinite(cfg.joint_log_ratio_clamp))
    p.mask_exclude = int(cfg.mask_exclude)
    p.normalize_adv = int(cfg.normalize_advantages)
    p.adv_std_unbiased = int(cfg.advantage_std_unbiased)
    p.adv_eps_add = int(cfg.advantage_eps_add)
    p.eps_low = cfg.eps_low
    p.eps_high = cfg.eps_high
    p.log_clamp = cfg.log_ratio_clamp
    p.joint_clamp = cfg.joint_log_ratio_clamp if p.has_jclamp else 0.0
    p.entropy_coef = cfg.entropy_coef
    p.value_coef = cfg.value_coef
    p.value_clip = cfg.value_clip if has_vclip else 0.0
    p.mask_fill = cfg.mask_fill  # -inf with mask_exclude
    p.adv_eps = cfg.advantage_eps
    p.sizes = list(call.head_sizes)
    p.floor = [max(float(f), 0.0) for f in cfg.prob_floor]
    p.kcoef = list(cfg.entropy_coef_per_head)
    if len(_TEMPLATES) >= 64:
        _TEMPLATES.clear()
    _TEMPLATES[key] = p
    return p


def _input_params(call: FusedCall):
    """A ``_C.Params`` with every input and the config set by name; outputs and gradients not yet."""
    H = call.num_heads
    adv = call.advantages
    adv_ph = adv.dim() == 2
    has_v = call.values is not None
    p = _template(call).copy()
    p.n = call.n
    ps = call.packed_steps
    if (
        call.packed
        and len(call.masks) <= 1
        and "actions" in ps
        and "old_log_probs" in ps
        and (not call.relevance or "relevance" in ps)
    ):
        # the common case: packed logits and masks, [N, H] step inputs: every head's pointers set in C++
        t = call.logits[0]
        p.set_packed("logits", t.data_ptr(), t.stride(0), t.element_size())
        if call.masks:
            m = call.masks[0]
            p.set_packed("masks", m.data_ptr(), m.stride(0), m.element_size())
        for name, fld in (("actions", "actions"), ("old_log_probs", "old_lp"), ("relevance", "rel")):
            t = ps.get(name)
            if t is not None and (fld != "rel" or call.relevance):
                p.set_columns(fld, t.data_ptr(), t.stride(0), t.stride(1), _DT[t.dtype])
        p.set_columns("adv", adv.data_ptr(), adv.stride(0), adv.stride(1) if adv_ph else 0, _DT[adv.dtype])
    else:
        lg = _head_ptrs(call.logits, call.offsets, H)
        mk = _head_ptrs(call.masks, call.offsets, H)
        adv0 = None if adv_ph else _vec(adv)
        for h in range(H):
            p.set_head(
                h,
                logits=lg[h][0],
                logits_rs=lg[h][1],
                masks=mk[h][0],
                masks_rs=mk[h][1],
                actions=_vec(call.actions[h]),
                old_lp=_vec(call.old_log_probs[h]),
                rel=_vec(call.relevance[h]) if call.relevance else _NONE3,
                adv=_col(adv, h) if adv_ph else adv0,
            )
    p.weights = _vec(call.weights)
    if has_v:
        p.values = _vec(call.values)
        p.returns = _vec(call.returns)
        p.value_weights = _vec(call.value_weights)
        if p.has_vclip:
            p.old_values = _vec(call.old_values)
    return p


def forward_params(call: FusedCall, outputs: tuple[torch.Tensor, ...]):
    """The forward's ``_C.Params``: the inputs (encoded once per call, ``call.cache``) and the outputs
    (losses, log_probs, entropy, joint_ratio, stats, saved)."""
    p = call.cache.get("native")
    if p is None:
        p = call.cache["native"] = _input_params(call)
    p = p.copy()
    p.losses, p.log_probs, p.entropy, p.joint_ratio, p.stats, p.saved = (t.data_ptr() for t in outputs)
    return p


def backward_params(
    call: FusedCall,
    stats: torch.Tensor,
    saved: torch.Tensor,
    grads: list[torch.Tensor],
    grad_losses: torch.Tensor | None,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_values: torch.Tensor | None,
):
    """The backward's ``_C.Params``: the forward's inputs, its statistics and saved values, the incoming
    gradients and the gradient outputs."""
    p = call.cache.get("native")
    if p is None:
        p = call.cache["native"] = _input_params(call)
    p = p.copy()
    p.stats, p.saved = stats.data_ptr(), saved.data_ptr()
    if len(grads) == 1 and call.num_heads:
        p.set_packed("grads", grads[0].data_ptr(), grads[0].stride(0), grads[0].element_size())
    else:
        for h, (ptr, rs) in enumerate(_head_ptrs(grads, call.offsets, call.num_heads)):
            p.set_grad(h, ptr, rs)
    p.grad_losses = _vec(grad_losses)
    p.grad_log_probs = _mat(grad_log_probs)
    p.grad_entropy = _mat(grad_entropy)
    p.grad_values = 0 if grad_values is None else grad_values.data_ptr()
    return p


def _forward_outputs(call: FusedCall, saved_shape: list[int]) -> tuple[torch.Tensor, ...]:
    N, H = call.n, call.num_heads
    f32 = dict(dtype=torch.float32, device=call.logits[0].device)
    return (
        torch.empty(4, **f32),
        torch.empty((N, H), **f32),
        torch.empty((N, H), **f32),
        torch.empty(N, **f32),
        torch.empty(stats_size(H), **f32),
        torch.empty(saved_shape, **f32),
    )


def _backward_outputs(call: FusedCall) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    dev = call.logits[0].device
    grads = [torch.empty(t.shape, dtype=t.dtype, device=dev) for t in call.logits]
    gv = None if call.values is None else torch.empty(call.n, dtype=torch.float32, device=dev)
    return grads, gv


def _metrics_size(num_heads: int) -> int:
    return len(GLOBAL_METRICS) + len(HEAD_METRICS) * num_heads


def _metrics_call(stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool):
    """The ``_C.MetricsCfg`` of ``_C.derive_metrics`` / ``_C.cuda_derive_metrics`` and the table they fill."""
    H = (stats.numel() - GLOBAL_SIZE) // HEAD_SIZE
    out = torch.empty(len(GLOBAL_METRICS) + len(HEAD_METRICS) * H, dtype=torch.float32, device=stats.device)
    c = _C.MetricsCfg()
    c.num_heads = H
    c.per_head = int(cfg.per_head)
    c.has_values = int(has_values)
    c.has_vclip = int(has_values and math.isfinite(cfg.value_clip))
    c.ratio_std_unbiased = int(cfg.ratio_std_unbiased)
    c.entropy_coef = cfg.entropy_coef
    c.value_coef = cfg.value_coef
    c.kcoef = list(cfg.entropy_coef_per_head)
    return c, out


class _NativeBackend(FusedBackend):
    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        return [n, num_heads + 1]

    def unavailable_reasons(self) -> list[str]:
        return [_IMPORT_ERROR] if _C is None else []


class CpuBackend(_NativeBackend):
    """The fused loss in multi-threaded C++ on CPU tensors."""

    name = "cpu"
    supports = Supports(devices=("cpu",), max_heads=MAX_HEADS)
    has_metric_table = _C is not None and hasattr(_C, "derive_metrics")

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        c, out = _metrics_call(stats, cfg, has_values)
        _C.derive_metrics(c, stats.data_ptr(), out.data_ptr())
        return out

    #: heads of at most 32 actions run 16 rows at a time in SIMD lanes (with AVX-512, floored heads too), wider
    #: heads without a floor 16 columns at a time (AVX-512); False forces the row-by-row code the CUDA kernels
    #: share (the tests check both)
    vectorise = True

    #: the kernels normalise the advantages in their own pre-pass (csrc/cpu/driver.cpp): no torch op, so the
    #: result is bitwise the same for any thread count and a forked child cannot hang in libgomp
    normalizes_advantages = True

    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        # [N, H + 1] coefficients (as the cuda backend), then each (step, head)'s row maximum [N, H] and log-sum
        # [N, H] for the AVX-512 backward: N * (3H + 1) floats, read flat by csrc/cpu/ (cpu_internal.h)
        return [n, 3 * num_heads + 1]

    def kernel_forward(self, call: FusedCall) -> tuple[torch.Tensor, ...]:
        outs = _forward_outputs(call, self.saved_shape(call.n, call.num_heads))
        _C.cpu_forward(forward_params(call, outs), torch.get_num_threads(), self.vectorise)
        return outs

    def kernel_backward(
        self,
        call: FusedCall,
        stats: torch.Tensor,
        saved: torch.Tensor,
        grad_losses: torch.Tensor | None,
        grad_log_probs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        grads, gv = _backward_outputs(call)
        p = backward_params(call, stats, saved, grads, grad_losses, grad_log_probs, grad_entropy, gv)
        _C.cpu_backward(p, torch.get_num_threads(), self.vectorise)
        return grads, gv


#: shared-memory limits assumed by the host emulation (an H100/H200: 132 multiprocessors, 227 KB per block)
_HOST_MACHINE = dict(sm_count=132, cc_major=9, smem_optin=227 * 1024, smem_per_sm=228 * 1024)
#: the fix-up's and the forward's ticket counters (uint32, csrc/ppo_onepass.h CTL_SIZE), after the normalisers
_CTL_SIZE = 2


def _norms_size(num_heads: int) -> int:
    return 4 + 3 * num_heads  # csrc/ppo_onepass.h norms_size


class CudaBackend(_NativeBackend):
    """The fused loss as CUDA kernels (csrc/ppo_cuda.cu, csrc/ppo_onepass.h) on CUDA tensors.

    The one-pass protocol of ``fused.py`` (``one_pass = True``). A step is three launches on the current stream,
    none of which synchronises with the host: the pre-pass (the normalisers of the per-step inputs), the forward
    (outputs, statistics, the metric table, and, when the caller passes gradient buffers, d loss / d logits for an
    upstream of 1 on ``loss`` while the rows are on chip) and the fix-up (the backward: nothing for
    ``loss.backward()``, an in-place rescale when only the loss's scalar differs, else a recompute from the
    logits; it reads the incoming gradients on the device). Scratch comes from torch's allocator, so the step can
    be captured in a CUDA graph. ``saved`` is the normalisers then two ticket counters (float32
    ``[4 + 3H + 2]``).
    """

    name = "cuda"
    supports = Supports(devices=("cuda",), max_heads=MAX_HEADS, min_capability=MIN_CAPABILITY)
    one_pass = True
    has_metric_table = _C is not None and hasattr(_C, "cuda_derive_metrics")

    #: > 0: at most this many main blocks (clusters on the wide path); tests use it to force many tiles per block
    max_blocks = 0

    def __init__(self):
        self._plans: dict[tuple, dict] = {}
        self._mcfgs: dict[tuple, object] = {}
        #: data_ptr of a forward's statistics -> (weak reference to them, version, table, config, has_values)
        self._tables: dict[int, tuple] = {}

    # -- the launches (the host emulation overrides these four) ----------------------------------------------------
    def _device_index(self, dev: torch.device) -> int:
        return dev.index if dev.index is not None else torch.cuda.current_device()

    def _plan(self, p, dev: torch.device, fixup: bool, write_grad: bool) -> dict:
        return _C.cuda_onepass_plan(
            p, self._device_index(dev), fixup=fixup, write_grad=write_grad, max_blocks=self.max_blocks
        )

    def _launch_forward(self, p, mcfg, dev: torch.device, **kw) -> None:
        idx = self._device_index(dev)
        _C.cuda_onepass_forward(
            p, mcfg, stream=torch.cuda.current_stream(idx).cuda_stream, device=idx, max_blocks=self.max_blocks, **kw
        )

    def _launch_backward(self, p, dev: torch.device, **kw) -> None:
        idx = self._device_index(dev)
        _C.cuda_onepass_backward(
            p, stream=torch.cuda.current_stream(idx).cuda_stream, device=idx, max_blocks=self.max_blocks, **kw
        )

    def _table_kernel(self, c, stats: torch.Tensor, out: torch.Tensor) -> None:
        idx = self._device_index(stats.device)
        _C.cuda_derive_metrics(c, stats.data_ptr(), out.data_ptr(), torch.cuda.current_stream(idx).cuda_stream, idx)

    # -- availability ------------------------------------------------------------------------------------------
    def unavailable_reasons(self) -> list[str]:
        if _C is None:
            return [_IMPORT_ERROR]
        if not _C.has_cuda:
            return [
                "the extension esper_kernels._C was built without its CUDA part (no nvcc found at build time, "
                "or ESPER_CUDA=OFF); rebuild with nvcc on PATH (ESPER_CUDA=ON makes a missing nvcc an error)"
            ]
        if not torch.cuda.is_available():
            return ["no CUDA device (torch.cuda.is_available() is False)"]
        status = _C.cuda_status()
        return [status] if status else []

    # -- shared pieces -----------------------------------------------------------------------------------------
    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        return [_norms_size(num_heads) + _CTL_SIZE]  # the normalisers, then the tickets (uint32 bit patterns)

    def _mcfg(self, cfg: ResolvedConfig, has_values: bool, num_heads: int):
        key = (cfg, has_values)
        c = self._mcfgs.get(key)
        if c is None:
            c = _C.MetricsCfg()
            c.num_heads = num_heads
            c.per_head = int(cfg.per_head)
            c.has_values = int(has_values)
            c.has_vclip = int(has_values and math.isfinite(cfg.value_clip))
            c.ratio_std_unbiased = int(cfg.ratio_std_unbiased)
            c.entropy_coef = cfg.entropy_coef
            c.value_coef = cfg.value_coef
            c.kcoef = list(cfg.entropy_coef_per_head)
            if len(self._mcfgs) > 64:
                self._mcfgs.clear()
            self._mcfgs[key] = c
        return c

    def _plan_cached(self, call: FusedCall, p, fixup: bool, write_grad: bool) -> dict:
        dev = call.logits[0].device
        key = (dev, call.n, call.head_sizes, p.logits_dtype, p.has_mask, p.per_head, fixup, write_grad, self.max_blocks)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(p, dev, fixup, write_grad)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # -- the one-pass protocol (fused.py) ----------------------------------------------------------------------
    def kernel_forward(
        self, call: FusedCall, grads: list[torch.Tensor] | None = None, grad_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Pre-pass + forward: (losses, log_probs, entropy, joint_ratio, stats, saved, table); with ``grads`` /
        ``grad_values`` the forward also fills them for an upstream (1, 0, 0, 0) on the losses."""
        N, H = call.n, call.num_heads
        dev = call.logits[0].device
        p = call.cache.get("native")
        if p is None:
            p = call.cache["native"] = _input_params(call)
        p = p.copy()
        write_grad = grads is not None
        plan = self._plan_cached(call, p, False, write_grad)
        K, M = plan["stats_size"], plan["metrics_size"]
        f32 = dict(dtype=torch.float32, device=dev)
        losses = torch.empty(4, **f32)
        log_probs = torch.empty((N, H), **f32)
        entropy = torch.empty((N, H), **f32)
        joint_ratio = torch.empty(N, **f32)
        stats = torch.empty(K, **f32)
        table = torch.empty(M, **f32)
        saved = torch.empty(plan["norms_size"] + _CTL_SIZE, **f32)
        npre = plan["grid_pre"] * plan["pre_size"]
        scratch = torch.empty(npre + plan["nparts"] * K, **f32)  # pre-pass partials, then the forward's partials
        p.losses, p.log_probs, p.entropy, p.joint_ratio, p.stats = (
            losses.data_ptr(),
            log_probs.data_ptr(),
            entropy.data_ptr(),
            joint_ratio.data_ptr(),
            stats.data_ptr(),
        )
        if write_grad:
            for h, (ptr, rs) in enumerate(_head_ptrs(grads, call.offsets, H)):
                p.set_grad(h, ptr, rs)
        base = scratch.data_ptr()
        self._launch_forward(
            p,
            self._mcfg(call.cfg, call.values is not None, H),
            dev,
            write_grad=write_grad,
            norms=saved.data_ptr(),
            pre_parts=base,
            parts=base + 4 * npre,
            ctl=saved.data_ptr() + 4 * plan["norms_size"],
            table=table.data_ptr(),
            gv=0 if grad_values is None else grad_values.data_ptr(),
        )
        return losses, log_probs, entropy, joint_ratio, stats, saved, table

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
        """The fix-up, in place on ``grads`` / ``grad_values``: holds=True, they hold what ``kernel_forward``
        wrote (left as they are, rescaled or recomputed after the incoming gradients, read on the device);
        holds=False, recomputed."""
        if call.n == 0 or (grads is None and grad_values is None):
            return
        dev = call.logits[0].device
        gl = None if grad_losses is None else grad_losses.detach().to(torch.float32).contiguous().reshape(4)
        g4 = (0, 0, 0, 0) if gl is None else tuple(gl.data_ptr() + 4 * k for k in range(4))
        p = backward_params(
            call, stats, saved, grads if grads is not None else [], None, grad_log_probs, grad_entropy, None
        )
        norms_size = _norms_size(call.num_heads)
        self._launch_backward(
            p,
            dev,
            write_grad=grads is not None,
            force_recompute=not holds,
            norms=saved.data_ptr(),
            ctl=saved.data_ptr() + 4 * norms_size,
            gv=0 if grad_values is None else grad_values.data_ptr(),
            grad_losses=g4,
        )

    # -- the metric table --------------------------------------------------------------------------------------
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
                and stats.device == table.device
                and stats.numel() == orig.numel()
            ):
                return table
        c, out = _metrics_call(stats, cfg, has_values)
        self._table_kernel(c, stats, out)
        return out


class CudaHostEmulation(CudaBackend):
    """The cuda backend's kernels run on the CPU (``_C.onepass_host_*``: the same block bodies, block by block):
    the tests' way to check the one-pass kernels' math, tiling and merges without a GPU. Not registered; a test
    puts it in place of "cuda" (CPU tensors). ``max_blocks`` > 0 caps the main grid (many tiles per block)."""

    supports = Supports(devices=("cpu",), max_heads=MAX_HEADS)
    has_metric_table = _C is not None

    def __init__(self, max_blocks: int = 0, sm_count: int | None = None):
        super().__init__()
        self.machine = dict(_HOST_MACHINE, max_blocks=max_blocks)
        if sm_count is not None:
            self.machine["sm_count"] = sm_count

    def unavailable_reasons(self) -> list[str]:
        return [_IMPORT_ERROR] if _C is None else []

    def _plan(self, p, dev, fixup, write_grad):
        return _C.onepass_plan(p, fixup=fixup, write_grad=write_grad, **self.machine)

    def _plan_cached(self, call, p, fixup, write_grad):
        return self._plan(p, call.logits[0].device, fixup, write_grad)

    def _launch_forward(self, p, mcfg, dev, **kw):
        _C.onepass_host_forward(p, mcfg, **kw, **self.machine)

    def _launch_backward(self, p, dev, **kw):
        _C.onepass_host_backward(p, **kw, **self.machine)

    def _table_kernel(self, c, stats, out):
        _C.derive_metrics(c, stats.data_ptr(), out.data_ptr())


BACKENDS = {"cpu": register_fused(CpuBackend()), "cuda": register_fused(CudaBackend())}

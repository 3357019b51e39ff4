"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension ``esper_kernels._C`` (``csrc/``), host side.

The extension takes plain integers (data pointers, element strides, dtype codes, sizes) and floats (the
config), never torch objects, so it does not link libtorch and survives PyTorch upgrades. This module
allocates every output with torch, fills one named ``_C.Params`` per call (the PPOParams struct of
``csrc/ppo_params.h``, field by field; ``_C.pyi``) and runs:

* ``cpu``: ``_C.cpu_forward`` / ``_C.cpu_backward`` with ``torch.get_num_threads()`` threads; results are
  bitwise independent of the thread count (fixed row chunks, partials merged in a fixed order).
* ``cuda``: ``_C.cuda_onepass_forward`` / ``_C.cuda_onepass_backward`` on ``torch.cuda.current_stream(device)``
  under the tensors' device: three launches a step (pre-pass, forward that also writes the gradient, fix-up); its
  scratch (normalisers, per-block partials, tickets) comes from torch's allocator, so calls are capturable in CUDA
  graphs. ``CudaHostEmulation`` runs the same kernels' code on the CPU (tests).

Per-head inputs are read in place: packed ``[N, S]`` logits and masks become H pointers into one buffer
(column offset, common row stride), separate ``[N, A_h]`` tensors H pointers with their own row strides; bool
tensors are read as bytes (no copy). The ``cpu`` backend saves between forward and backward (``saved_shape``)
float32 ``[N, H + 1]``, column h the unnormalised d policy-loss / d ell_ih (the backward divides by W or den_h
read from the statistics vector), column H the unnormalised d value-loss / d v_i, then each (step, head)'s
log-sum-exp ``[N, H]``, so that its backward needs one exp per logit and no max/sum pass. The ``cuda`` backend
saves only its normalisers (``[4 + 3H]``): its fix-up recomputes from the logits when it has to.
"""

from __future__ import annotations

import math

import torch

from ..config import ResolvedConfig
from ..inputs import PPOInputs
from ..metrics import GLOBAL_METRICS, HEAD_METRICS
from ..reference import RawOutput
from ..schema import GLOBAL_SIZE, HEAD_SIZE, fingerprint, stats_size
from .fused import FusedBackend, FusedCall, _refuse_double_backward, register_fused

__all__ = ["CpuBackend", "CudaBackend", "CudaHostEmulation", "BACKENDS", "forward_params", "backward_params"]

try:
    from .. import _C
except ImportError as e:  # the extension is not built (or not importable): say why, never crash the registry
    _C = None
    _IMPORT_ERROR = (f"the C++ extension esper_kernels._C is not built or cannot be imported ({e}); build it "
                     "with `pip install --no-build-isolation -e .` (see README)")
else:
    _IMPORT_ERROR = ""
    if _C.LAYOUT_FINGERPRINT != fingerprint():
        _IMPORT_ERROR = (f"the C++ extension esper_kernels._C was built from another statistics layout (schema "
                         f"fingerprint {_C.LAYOUT_FINGERPRINT}, the package has {fingerprint()}); rebuild it with "
                         "`pip install --no-build-isolation -e .`")
        _C = None

#: dtype codes of csrc/ppo_params.h (enum DType)
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.bool: 4, torch.uint8: 4,
       torch.int32: 5, torch.int64: 6}
MAX_HEADS = 32 if _C is None else int(_C.MAX_HEADS)
#: oldest GPU the CUDA part is built for (sm_80 machine code, compute_90 PTX)
MIN_CAPABILITY = (8, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}
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


def _input_params(call: FusedCall):
    """A ``_C.Params`` with every input and the config set by name; outputs and gradients not yet."""
    cfg = call.cfg
    H = call.num_heads
    adv = call.advantages
    adv_ph = adv.dim() == 2
    has_v = call.values is not None
    has_vclip = has_v and call.old_values is not None and math.isfinite(cfg.value_clip)
    p = _C.Params()
    p.n = call.n
    p.num_heads = H
    p.logits_dtype = _DT[call.logits[0].dtype]
    p.has_mask = int(bool(call.masks))
    p.has_rel = int(bool(call.relevance))
    p.per_head = int(cfg.per_head)
    p.adv_per_head = int(adv_ph)
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
    lg = _head_ptrs(call.logits, call.offsets, H)
    mk = _head_ptrs(call.masks, call.offsets, H)
    adv0 = None if adv_ph else _vec(adv)
    for h in range(H):
        p.set_head(h, logits=lg[h][0], logits_rs=lg[h][1], masks=mk[h][0], masks_rs=mk[h][1],
                   actions=_vec(call.actions[h]), old_lp=_vec(call.old_log_probs[h]),
                   rel=_vec(call.relevance[h]) if call.relevance else _NONE3,
                   adv=_col(adv, h) if adv_ph else adv0)
    p.weights = _vec(call.weights)
    if has_v:
        p.values = _vec(call.values)
        p.returns = _vec(call.returns)
        p.value_weights = _vec(call.value_weights)
        if has_vclip:
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


def backward_params(call: FusedCall, stats: torch.Tensor, saved: torch.Tensor, grads: list[torch.Tensor],
                    grad_losses: torch.Tensor | None, grad_log_probs: torch.Tensor | None,
                    grad_entropy: torch.Tensor | None, grad_values: torch.Tensor | None):
    """The backward's ``_C.Params``: the forward's inputs, its statistics and saved values, the incoming
    gradients and the gradient outputs."""
    p = call.cache.get("native")
    if p is None:
        p = call.cache["native"] = _input_params(call)
    p = p.copy()
    p.stats, p.saved = stats.data_ptr(), saved.data_ptr()
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
    return (torch.empty(4, **f32), torch.empty((N, H), **f32), torch.empty((N, H), **f32), torch.empty(N, **f32),
            torch.empty(stats_size(H), **f32), torch.empty(saved_shape, **f32))


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

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        reasons = super().not_supported_reasons(inputs, cfg)
        if inputs.layout.num_heads > MAX_HEADS:
            reasons.append(f"at most {MAX_HEADS} heads (got {inputs.layout.num_heads})")
        return reasons


class CpuBackend(_NativeBackend):
    """The fused loss in multi-threaded C++ on CPU tensors."""

    name = "cpu"
    devices = ("cpu",)
    has_metric_table = _C is not None and hasattr(_C, "derive_metrics")

    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        c, out = _metrics_call(stats, cfg, has_values)
        _C.derive_metrics(c, stats.data_ptr(), out.data_ptr())
        return out

    #: heads of at most 32 actions run 16 rows at a time in SIMD lanes (with AVX-512, floored heads too), wider
    #: heads without a floor 16 columns at a time (AVX-512); False forces the row-by-row code the CUDA kernels
    #: share (the tests check both)
    vectorise = True

    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        # [N, H + 1] coefficients (as the cuda backend), then each (step, head)'s log-sum-exp [N, H] for the
        # backward's small heads: N * (2H + 1) floats, read flat by csrc/ppo_cpu.cpp
        return [n, 2 * num_heads + 1]

    def kernel_forward(self, call: FusedCall) -> tuple[torch.Tensor, ...]:
        outs = _forward_outputs(call, self.saved_shape(call.n, call.num_heads))
        _C.cpu_forward(forward_params(call, outs), torch.get_num_threads(), self.vectorise)
        return outs

    def kernel_backward(self, call: FusedCall, stats: torch.Tensor, saved: torch.Tensor,
                        grad_losses: torch.Tensor | None, grad_log_probs: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        grads, gv = _backward_outputs(call)
        p = backward_params(call, stats, saved, grads, grad_losses, grad_log_probs, grad_entropy, gv)
        _C.cpu_backward(p, torch.get_num_threads(), self.vectorise)
        return grads, gv


class _OnePassState:
    """What one eager forward of the cuda backend leaves for its backward: the gradient buffers it wrote (for an
    upstream of 1 on ``loss``), the normalisers and tickets. The first backward hands the buffers over to autograd
    (which may keep them as ``.grad`` without a copy); a later backward (``retain_graph=True``) recomputes into
    fresh ones."""

    __slots__ = ("ctl", "grads", "gv", "norms", "scratch")

    def __init__(self, grads, gv, norms, ctl, scratch):
        self.grads, self.gv, self.norms, self.ctl, self.scratch = grads, gv, norms, ctl, scratch


class _OnePass(torch.autograd.Function):
    """The cuda backend's eager step: pre-pass + forward (which writes the gradient while the rows are on chip),
    then a device-side fix-up as the backward."""

    @staticmethod
    def forward(ctx, impl, call, want_logits, want_values, values, *logits):
        outs, state = impl._onepass_forward(call, want_logits, want_values)
        ctx.impl, ctx.call, ctx.state = impl, call, state
        ctx.values_dtype = None if values is None else values.dtype
        ctx.want = (want_logits, want_values)
        # every input is saved, so that an in-place change before backward raises as with the custom op
        ctx.save_for_backward(*call.logits, *call.masks, *call.actions, *call.old_log_probs, call.advantages,
                              *call.relevance, call.weights, values, call.returns, call.old_values,
                              call.value_weights)
        losses, log_probs, entropy, joint_ratio, stats = outs
        ctx.mark_non_differentiable(joint_ratio, stats)
        ctx.set_materialize_grads(False)
        # the four losses as separate outputs: a plain loss.backward() hands the fix-up one scalar, with no
        # select-backward (zero fill and copy) kernels in between
        return losses[0], losses[1], losses[2], losses[3], log_probs, entropy, joint_ratio, stats

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_entropy_loss, g_value, g_log_probs, g_entropy, *_):
        _refuse_double_backward(ctx.impl.name)
        ctx.saved_tensors  # noqa: B018 (raises if an input was modified in place)
        grads, gv = ctx.impl._onepass_backward(ctx.call, ctx.state, ctx.want,
                                               (g_loss, g_policy, g_entropy_loss, g_value), g_log_probs, g_entropy)
        if gv is not None and ctx.values_dtype is not None and gv.dtype != ctx.values_dtype:
            gv = gv.to(ctx.values_dtype)
        return (None, None, None, None, gv, *(grads if grads is not None else [None] * len(ctx.call.logits)))


#: shared-memory limits assumed by the host emulation (an H100/H200: 132 multiprocessors, 227 KB per block)
_HOST_MACHINE = dict(sm_count=132, cc_major=9, smem_optin=227 * 1024, smem_per_sm=228 * 1024)


class CudaBackend(_NativeBackend):
    """The fused loss as CUDA kernels (csrc/ppo_cuda.cu, csrc/ppo_onepass.h) on CUDA tensors.

    A step is three launches on the current stream, none of which synchronises with the host: the pre-pass (the
    normalisers of the per-step inputs), the forward (outputs, statistics, the metric table, and, when a gradient
    is wanted, d loss / d logits for an upstream of 1 while the rows are on chip) and the fix-up (the backward:
    nothing for ``loss.backward()``, an in-place rescale when only the loss's scalar differs, else a recompute
    from the logits). Scratch comes from torch's allocator, so the step can be captured in a CUDA graph.

    Eager calls run this through ``_OnePass``; under torch.compile the shared custom ops of ``fused.py`` call
    ``kernel_forward`` (no gradient written) and ``kernel_backward`` (the fix-up's recompute into fresh buffers).
    """

    name = "cuda"
    devices = ("cuda",)
    has_metric_table = _C is not None and hasattr(_C, "cuda_derive_metrics")

    #: > 0: at most this many main blocks (clusters on the wide path); tests use it to force many tiles per block
    max_blocks = 0

    def __init__(self):
        self._plans: dict[tuple, dict] = {}
        self._mcfgs: dict[tuple, object] = {}
        # the forwards' statistics+table buffers, most recent last (held: their memory cannot be reused while
        # listed, so a statistics vector at one of these addresses is that buffer's)
        self._tables: dict[int, torch.Tensor] = {}

    # -- the launches (the host emulation overrides these four) ----------------------------------------------------
    def _device_index(self, dev: torch.device) -> int:
        return dev.index if dev.index is not None else torch.cuda.current_device()

    def _plan(self, p, dev: torch.device, fixup: bool, write_grad: bool) -> dict:
        return _C.cuda_onepass_plan(p, self._device_index(dev), fixup=fixup, write_grad=write_grad,
                                    max_blocks=self.max_blocks)

    def _launch_forward(self, p, mcfg, dev: torch.device, **kw) -> None:
        idx = self._device_index(dev)
        _C.cuda_onepass_forward(p, mcfg, stream=torch.cuda.current_stream(idx).cuda_stream, device=idx,
                                max_blocks=self.max_blocks, **kw)

    def _launch_backward(self, p, dev: torch.device, **kw) -> None:
        idx = self._device_index(dev)
        _C.cuda_onepass_backward(p, stream=torch.cuda.current_stream(idx).cuda_stream, device=idx,
                                 max_blocks=self.max_blocks, **kw)

    def _table_kernel(self, c, stats: torch.Tensor, out: torch.Tensor) -> None:
        idx = self._device_index(stats.device)
        _C.cuda_derive_metrics(c, stats.data_ptr(), out.data_ptr(), torch.cuda.current_stream(idx).cuda_stream, idx)

    # -- availability ------------------------------------------------------------------------------------------
    def unavailable_reasons(self) -> list[str]:
        if _C is None:
            return [_IMPORT_ERROR]
        if not _C.has_cuda:
            return ["the extension esper_kernels._C was built without its CUDA part (no nvcc found at build time, "
                    "or ESPER_CUDA=OFF); rebuild with nvcc on PATH (ESPER_CUDA=ON makes a missing nvcc an error)"]
        if not torch.cuda.is_available():
            return ["no CUDA device (torch.cuda.is_available() is False)"]
        status = _C.cuda_status()
        return [status] if status else []

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        reasons = super().not_supported_reasons(inputs, cfg)
        if inputs.device.type == "cuda" and torch.version.hip is None:
            idx = inputs.device.index if inputs.device.index is not None else torch.cuda.current_device()
            if idx not in _CAPABILITY:  # a driver query per call otherwise
                _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
            cap = _CAPABILITY[idx]
            if cap < MIN_CAPABILITY:
                reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is older than the "
                               f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} the CUDA kernels are built for")
        return reasons

    # -- shared pieces -----------------------------------------------------------------------------------------
    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        return [4 + 3 * num_heads]  # the normalisers (csrc/ppo_onepass.h norms_size)

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
        key = (dev, call.n, call.head_sizes, p.logits_dtype, p.has_mask, p.per_head, fixup, write_grad,
               self.max_blocks)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(p, dev, fixup, write_grad)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _forward(self, call: FusedCall, want_logits: bool, want_values: bool, with_table: bool):
        """Pre-pass + forward: (losses, log_probs, entropy, joint_ratio, stats) and the backward's state."""
        N, H = call.n, call.num_heads
        dev = call.logits[0].device
        p = call.cache.get("native")
        if p is None:
            p = call.cache["native"] = _input_params(call)
        p = p.copy()
        plan = self._plan_cached(call, p, False, want_logits)
        K, M = plan["stats_size"], plan["metrics_size"]
        f32 = dict(dtype=torch.float32, device=dev)
        losses = torch.empty(4, **f32)
        log_probs = torch.empty((N, H), **f32)
        entropy = torch.empty((N, H), **f32)
        joint_ratio = torch.empty(N, **f32)
        st_tab = torch.empty(K + (M if with_table else 0), **f32)
        stats = st_tab[:K] if with_table else st_tab
        npre, npart = plan["grid_pre"] * plan["pre_size"], plan["nparts"] * K
        norms = torch.empty(plan["norms_size"], **f32)
        scratch = torch.empty(npre + npart + 4, **f32)  # pre-pass partials, partials, 2 tickets (uint32)
        base = scratch.data_ptr()
        grads = [torch.empty(t.shape, dtype=t.dtype, device=dev) for t in call.logits] if want_logits else None
        gv = torch.empty(N, **f32) if want_values else None
        p.losses, p.log_probs, p.entropy, p.joint_ratio, p.stats = (
            losses.data_ptr(), log_probs.data_ptr(), entropy.data_ptr(), joint_ratio.data_ptr(), stats.data_ptr())
        if grads is not None:
            for h, (ptr, rs) in enumerate(_head_ptrs(grads, call.offsets, H)):
                p.set_grad(h, ptr, rs)
        ctl = base + 4 * (npre + npart)
        self._launch_forward(
            p, self._mcfg(call.cfg, call.values is not None, H), dev, write_grad=want_logits, norms=norms.data_ptr(),
            pre_parts=base, parts=base + 4 * npre, ctl=ctl,
            table=st_tab.data_ptr() + 4 * K if with_table else 0, gv=0 if gv is None else gv.data_ptr())
        if with_table:
            self._tables[stats.data_ptr()] = st_tab
            if len(self._tables) > 16:
                del self._tables[next(iter(self._tables))]
        return (losses, log_probs, entropy, joint_ratio, stats), _OnePassState(grads, gv, norms, ctl, scratch)

    def _backward(self, call: FusedCall, state: _OnePassState, want: tuple[bool, bool], g4, g_log_probs, g_entropy):
        """The fix-up: (grads, grad_values); the buffers written by the forward when it has them. g4: the incoming
        gradients of the four losses (0-d tensors or None)."""
        want_logits, want_values = want
        dev = call.logits[0].device
        fresh = state.grads is None and state.gv is None
        grads, gv = state.grads, state.gv
        if want_logits and grads is None:
            grads = [torch.empty(t.shape, dtype=t.dtype, device=dev) for t in call.logits]
        if want_values and gv is None:
            gv = torch.empty(call.n, dtype=torch.float32, device=dev)
        g4 = [None if g is None else g.detach().to(torch.float32).reshape(()) for g in g4]
        p = backward_params(call, state.norms, state.norms, grads if grads is not None else [], None, g_log_probs,
                            g_entropy, None)
        self._launch_backward(p, dev, write_grad=grads is not None, force_recompute=fresh,
                              norms=state.norms.data_ptr(), ctl=state.ctl, gv=0 if gv is None else gv.data_ptr(),
                              grad_losses=tuple(0 if g is None else g.data_ptr() for g in g4))
        return grads, gv

    # -- the eager one-pass protocol -------------------------------------------------------------------------
    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        if torch.compiler.is_compiling():
            return super().forward(inputs, cfg)  # the shared custom ops (kernel_forward / kernel_backward)
        call = FusedCall(list(inputs.logits), list(inputs.masks or ()), list(inputs.actions),
                         list(inputs.old_log_probs), inputs.advantages, list(inputs.relevance or ()), inputs.weights,
                         inputs.values, inputs.returns, inputs.old_values, inputs.value_weights, inputs.layout.sizes,
                         cfg)
        grad_on = torch.is_grad_enabled()
        want_logits = grad_on and any(t.requires_grad for t in call.logits)
        want_values = grad_on and inputs.values is not None and inputs.values.requires_grad
        loss, pl, el, vl, log_probs, entropy, joint_ratio, stats = _OnePass.apply(
            self, call, want_logits, want_values, inputs.values, *call.logits)
        return RawOutput(loss=loss, policy_loss=pl, entropy_loss=el, value_loss=vl, log_probs=log_probs,
                         entropy=entropy, joint_ratio=joint_ratio.detach(), stats=stats.detach())

    def _onepass_forward(self, call: FusedCall, want_logits: bool, want_values: bool):
        return self._forward(call, want_logits, want_values, with_table=True)

    def _onepass_backward(self, call: FusedCall, state: _OnePassState, want, g4, g_log_probs, g_entropy):
        grads, gv = self._backward(call, state, want, g4, g_log_probs, g_entropy)
        # hand the buffers over: autograd may keep them as .grad (no copy); a later backward recomputes
        state.grads = state.gv = None
        return grads, gv

    # -- the shared custom ops' protocol (fused.py; torch.compile) ---------------------------------------------
    def kernel_forward(self, call: FusedCall) -> tuple[torch.Tensor, ...]:
        (losses, log_probs, entropy, joint_ratio, stats), state = self._forward(call, False, False, False)
        return losses, log_probs, entropy, joint_ratio, stats, state.norms

    def kernel_backward(self, call: FusedCall, stats: torch.Tensor, saved: torch.Tensor,
                        grad_losses: torch.Tensor | None, grad_log_probs: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        # fresh buffers: the fix-up recomputes and keeps no scale state (so it takes no ticket either)
        state = _OnePassState(None, None, saved, saved.data_ptr(), None)
        g4 = (None,) * 4 if grad_losses is None else tuple(grad_losses.to(torch.float32).unbind())
        return self._backward(call, state, (True, call.values is not None), g4, grad_log_probs, grad_entropy)

    # -- the metric table --------------------------------------------------------------------------------------
    def metric_table(self, stats: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> torch.Tensor:
        H = (stats.numel() - GLOBAL_SIZE) // HEAD_SIZE
        base = self._tables.get(stats.data_ptr())
        if base is not None and stats.numel() + _metrics_size(H) == base.numel() and stats.device == base.device:
            return base[stats.numel():]  # written by the forward's last block
        c, out = _metrics_call(stats, cfg, has_values)
        self._table_kernel(c, stats, out)
        return out


class CudaHostEmulation(CudaBackend):
    """The cuda backend's kernels run on the CPU (``_C.onepass_host_*``: the same block bodies, block by block):
    the tests' way to check the one-pass kernels' math, tiling and merges without a GPU. Not registered; a test
    puts it in place of "cuda" (``devices`` = cpu). ``max_blocks`` > 0 caps the main grid (many tiles per block)."""

    devices = ("cpu",)
    has_metric_table = _C is not None

    def __init__(self, max_blocks: int = 0, sm_count: int | None = None):
        super().__init__()
        self.machine = dict(_HOST_MACHINE, max_blocks=max_blocks)
        if sm_count is not None:
            self.machine["sm_count"] = sm_count

    def unavailable_reasons(self) -> list[str]:
        return [_IMPORT_ERROR] if _C is None else []

    def not_supported_reasons(self, inputs: PPOInputs, cfg: ResolvedConfig) -> list[str]:
        return _NativeBackend.not_supported_reasons(self, inputs, cfg)

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

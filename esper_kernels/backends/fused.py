"""Shared plumbing of the fused backends: one custom-op pair (forward, backward) serving every fused backend.

A fused backend implements its kernels' host sides under one of two protocols, chosen by the class attribute
``one_pass``.

**Two-pass** (``one_pass = False``; the ``cpu`` and ``cuda`` backends today):

* ``kernel_forward(call) -> (losses[4], log_probs[N, H], entropy[N, H], joint_ratio[N], stats[K], saved)``
  with ``losses = (loss, policy_loss, entropy_loss, value_loss)`` (float32), per-step outputs in float32,
  ``stats`` the vector of ``esper_kernels.stats`` and ``saved`` whatever small per-step coefficients its
  backward needs (shape ``saved_shape(n, H)``, float32; never an [N, S] intermediate).
* ``kernel_backward(call, stats, saved, grad_losses[4] | None, grad_log_probs[N, H] | None,
  grad_entropy[N, H] | None) -> (grad_logits, grad_values)``: ``grad_logits`` is a list shaped and typed
  like ``call.logits`` (the logits' dtype); ``grad_values`` is [N] float32 or None. Gradients of absent
  steps and of masked actions are exactly 0, whatever the incoming gradients hold.
* Advantage normalisation runs before the kernels (``reference.normalize_advantages``), so they always see
  ``cfg.normalize_advantages == False``.

**One-pass** (``one_pass = True``; the ``triton`` backend): the forward writes the gradient while the rows
are in registers, and the backward is a device-side fix-up.

* ``kernel_forward(call, grads=None, grad_values=None) -> (losses, log_probs, entropy, joint_ratio, stats,
  saved, table)``: the two-pass outputs, plus ``table``, the metric table (``PPOMetrics`` order, float32) of
  ``stats`` when the kernels wrote it (else None). ``grads``: None, or a list of buffers shaped and typed like
  ``call.logits`` (contiguous, packed like the logits: one [N, S] buffer for packed logits, one [N, A_h] per
  head otherwise) to fill with d loss / d logits for the upstream gradient (1, 0, 0, 0) on ``losses`` and
  none on ``log_probs`` / ``entropy``; ``grad_values``: None or an [N] float32 buffer to fill likewise with
  d loss / d values. Every element is written (0 at absent steps and masked actions). The caller passes
  buffers only when a gradient will be needed (grad mode on and the logits / values require grad), so a
  forward under ``no_grad`` or ``inference_mode`` writes none. ``cfg.normalize_advantages`` reaches the
  kernels: they normalise in their own pre-pass. No host synchronisation.
* ``kernel_backward(call, stats, saved, grad_losses, grad_log_probs, grad_entropy, *, grads, grad_values,
  holds) -> None``: the fix-up, in place on ``grads`` / ``grad_values`` (either may be None: not needed).
  ``holds=True``: the buffers hold what ``kernel_forward`` wrote into them; the kernel reads the incoming
  gradients on the device and leaves the buffers as they are when ``grad_losses`` is (1, 0, 0, 0) and
  ``grad_log_probs`` / ``grad_entropy`` are None, rescales them by g when it is (g, 0, 0, 0) with a finite g,
  and recomputes them from the logits otherwise. ``holds=False``: the buffers are uninitialised and are
  recomputed. ``grad_losses`` None means (0, 0, 0, 0). The recompute follows the same rules as the two-pass
  backward (absent steps and masked actions exactly 0; a row whose upstream is not finite gets NaN at its
  valid actions).
* Eager (``_EagerFused``): the forward allocates the buffers when ``ctx.needs_input_grad`` says so and keeps
  them in ``ctx``; the first backward fixes them up (``holds=True``) and hands them to autograd, dropping its
  reference (autograd can then take them as ``.grad`` without a copy). A later backward through the same graph
  (``retain_graph=True``) finds no buffers, allocates fresh ones and recomputes (``holds=False``), so two
  backward calls with different upstream gradients are both right, and accumulation into an existing ``.grad``
  is autograd's.
* Under ``torch.compile`` the custom ops below keep the two-pass form (an op's output may not alias its input,
  so the forward's buffers could not be returned without a copy, which would move more bytes than the
  recompute): ``fused_forward`` calls ``kernel_forward(call)`` without buffers, ``fused_backward`` calls
  ``kernel_backward(..., holds=False)`` with fresh buffers.

``grad_losses[k]`` is the incoming gradient of ``losses[k]``: loss = PL + entropy_coef * EL + value_coef * VL,
so d/d ell gets ``g0 + g1`` times dPL/d ell, d/d H gets ``entropy_coef * g0 + g2`` times dEL/dH, and d/d v gets
``value_coef * g0 + g3`` times dVL/dv.

Both kernels are registered as ``torch.library`` custom ops with fake (meta) implementations and autograd,
so ``torch.compile(fullgraph=True)`` and CUDA graphs see one opaque op per direction. A two-pass backend's
kernels see ``cfg.normalize_advantages == False`` (the advantages are normalised before the op in torch), unless
the backend's ``normalizes_advantages`` says that its kernels do it themselves (the ``cpu`` backend's pre-pass);
one-pass backends always normalise in their own pre-pass.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import ResolvedConfig
from ..inputs import HeadColumns, PPOInputs
from ..reference import normalize_advantages
from ..stats import stats_size
from .base import Backend, RawOutput

__all__ = ["FusedBackend", "FusedCall", "cfg_to_list", "cfg_from_list", "register_fused"]

_FUSED: dict[str, FusedBackend] = {}


def cfg_to_list(cfg: ResolvedConfig) -> list[float]:
    """ResolvedConfig -> flat floats (the custom op's config argument): its fields in order, per-head tuples
    flattened (their length is the number of heads)."""
    out: list[float] = []
    for value in cfg:
        out.extend(float(x) for x in value) if isinstance(value, tuple) else out.append(float(value))
    return out


def cfg_from_list(values: list[float], num_heads: int) -> ResolvedConfig:
    """The inverse of ``cfg_to_list`` (each field's type from ResolvedConfig's annotations)."""
    it = iter(values)
    fields = {}
    for name, kind in _CFG_TYPES.items():
        if typing.get_origin(kind) is tuple:
            fields[name] = tuple(next(it) for _ in range(num_heads))
        else:
            v = next(it)
            fields[name] = bool(v) if kind is bool else v
    return ResolvedConfig(**fields)


_CFG_TYPES = typing.get_type_hints(ResolvedConfig)


@dataclass
class FusedCall:
    """One call's inputs as the kernels see them (N rows, H heads)."""

    logits: list[torch.Tensor]  # [N, S] (packed, head h at column offsets[h]) or H tensors [N, A_h]
    masks: list[torch.Tensor]  # like logits (bool/uint8) or empty = all valid
    actions: Sequence[torch.Tensor]  # H x [N] int32/int64 (any stride)
    old_log_probs: Sequence[torch.Tensor]  # H x [N] float (any stride)
    advantages: torch.Tensor  # [N] or [N, H]
    relevance: Sequence[torch.Tensor]  # H x [N] bool/uint8, or empty = all relevant
    weights: torch.Tensor | None
    values: torch.Tensor | None
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    value_weights: torch.Tensor | None
    head_sizes: tuple[int, ...]
    cfg: ResolvedConfig
    #: what a backend derives from the call once and reuses in its backward (e.g. encoded arguments)
    cache: dict = field(default_factory=dict, repr=False)
    #: PPOInputs.packed_steps: the [N, H] tensors whose columns are actions, old_log_probs, relevance (by those
    #: names; empty when they came per head, or through the custom ops)
    packed_steps: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.logits[0].shape[0]

    @property
    def num_heads(self) -> int:
        return len(self.head_sizes)

    @property
    def packed(self) -> bool:
        return len(self.logits) == 1

    @property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for a in self.head_sizes[:-1]:
            out.append(out[-1] + a)
        return tuple(out)


class FusedBackend(Backend):
    """A backend whose forward and backward are its own kernels, called through the shared custom ops."""

    #: the kernels normalise the advantages themselves (they get ``cfg.normalize_advantages`` as it is)
    normalizes_advantages: bool = False
    #: the protocol (module docstring): False = forward, then a backward that computes the gradient; True = a
    #: forward that writes the gradient for an upstream 1 and a backward that fixes it up on the device
    one_pass: bool = False

    def saved_shape(self, n: int, num_heads: int) -> list[int]:
        """Shape of the float32 tensor saved between forward and backward."""
        return [n, num_heads]

    def kernel_forward(self, call: FusedCall, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def kernel_backward(
        self,
        call: FusedCall,
        stats: torch.Tensor,
        saved: torch.Tensor,
        grad_losses: torch.Tensor | None,
        grad_log_probs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
        **kwargs,
    ):
        raise NotImplementedError

    def remember_table(self, stats: torch.Tensor, table: torch.Tensor, cfg: ResolvedConfig, has_values: bool) -> None:
        """One-pass backends whose forward writes the metric table keep it for ``metric_table`` (optional)."""

    def forward(self, inputs: PPOInputs, cfg: ResolvedConfig) -> RawOutput:
        adv = inputs.advantages
        kcfg = cfg
        if cfg.normalize_advantages and not (self.one_pass or self.normalizes_advantages):
            adv = normalize_advantages(adv, inputs.weights, cfg)
            kcfg = cfg._replace(normalize_advantages=False)
        if torch.compiler.is_compiling():
            # the custom op: one opaque node per direction for the compiler (fake implementations below)
            losses, log_probs, entropy, joint_ratio, stats, _ = torch.ops.esper_kernels.fused_forward(
                self.name,
                list(inputs.logits),
                list(inputs.masks or ()),
                list(inputs.actions),
                list(inputs.old_log_probs),
                adv,
                list(inputs.relevance or ()),
                inputs.weights,
                inputs.values,
                inputs.returns,
                inputs.old_values,
                inputs.value_weights,
                list(inputs.layout.sizes),
                cfg_to_list(kcfg),
            )
        else:
            # eager: the same kernels through a plain autograd.Function (the custom-op dispatch, argument
            # flattening and config round trip cost several hundred microseconds per call)
            call = FusedCall(
                list(inputs.logits),
                list(inputs.masks or ()),
                _heads(inputs.actions),
                _heads(inputs.old_log_probs),
                adv,
                _heads(inputs.relevance),
                inputs.weights,
                inputs.values,
                inputs.returns,
                inputs.old_values,
                inputs.value_weights,
                inputs.layout.sizes,
                kcfg,
                packed_steps=inputs.packed_steps,
            )
            if self.one_pass:
                losses, log_probs, entropy, joint_ratio, stats, _, table = _EagerOnePass.apply(
                    self, call, torch.is_grad_enabled(), inputs.values, *call.logits
                )
                stats = stats.detach()
                if table is not None:
                    self.remember_table(stats, table.detach(), cfg, inputs.values is not None)
                return RawOutput(
                    loss=losses[0],
                    policy_loss=losses[1],
                    entropy_loss=losses[2],
                    value_loss=losses[3],
                    log_probs=log_probs,
                    entropy=entropy,
                    joint_ratio=joint_ratio.detach(),
                    stats=stats,
                )
            losses, log_probs, entropy, joint_ratio, stats, _ = _EagerFused.apply(
                self, call, inputs.values, *call.logits
            )
        return RawOutput(
            loss=losses[0],
            policy_loss=losses[1],
            entropy_loss=losses[2],
            value_loss=losses[3],
            log_probs=log_probs,
            entropy=entropy,
            joint_ratio=joint_ratio.detach(),
            stats=stats.detach(),
        )


def _heads(views: Sequence[torch.Tensor] | None) -> Sequence[torch.Tensor]:
    """Per-head views for a FusedCall: HeadColumns as they are (their views are made only if a backend reads
    them), others as a list."""
    return views if isinstance(views, HeadColumns) else list(views or ())


def _guarded_inputs(call: FusedCall, values: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Every input, for save_for_backward, so that an in-place change before backward raises as with the custom
    op: the [N, H] tensors of call.packed_steps in place of their column views (views share their base's version
    counter), which saves 3 H - 3 tensors a call."""
    steps: list[torch.Tensor] = []
    for name, views in (
        ("actions", call.actions),
        ("old_log_probs", call.old_log_probs),
        ("relevance", call.relevance),
    ):
        whole = call.packed_steps.get(name)
        steps.extend((whole,) if whole is not None and views else views)
    return (
        *call.logits,
        *call.masks,
        *steps,
        call.advantages,
        call.weights,
        values,
        call.returns,
        call.old_values,
        call.value_weights,
    )


def _refuse_double_backward(name: str) -> None:
    """Backward with create_graph=True (grad mode on) would need the gradient's own gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend {name!r}: the fused backends do not support double backward (a gradient "
            "of the gradient, create_graph=True); the 'reference' backend does"
        )


class _EagerFused(torch.autograd.Function):
    """Eager path of a fused backend: forward and backward kernels with the custom ops' semantics."""

    @staticmethod
    def forward(ctx, impl: FusedBackend, call: FusedCall, values: torch.Tensor | None, *logits: torch.Tensor):
        outs = tuple(impl.kernel_forward(call))
        ctx.impl, ctx.call = impl, call
        ctx.values_dtype = None if values is None else values.dtype
        # every input is saved, so that an in-place change before backward raises as with the custom op
        ctx.save_for_backward(*_guarded_inputs(call, values), outs[4], outs[5])
        ctx.mark_non_differentiable(outs[3], outs[4], outs[5])
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, g_losses, g_log_probs, g_entropy, *_):
        _refuse_double_backward(ctx.impl.name)
        *_, stats, saved = ctx.saved_tensors
        grads, gv = ctx.impl.kernel_backward(ctx.call, stats, saved, g_losses, g_log_probs, g_entropy)
        if gv is not None and ctx.values_dtype is not None:
            gv = gv.to(ctx.values_dtype)
        return (None, None, gv, *grads)


class _EagerOnePass(torch.autograd.Function):
    """Eager path of a one-pass backend: the forward writes the gradient for an upstream 1 into buffers kept in
    ``ctx``; the first backward fixes them up in place and hands them over, a later one recomputes."""

    @staticmethod
    def forward(
        ctx, impl: FusedBackend, call: FusedCall, grad_on: bool, values: torch.Tensor | None, *logits: torch.Tensor
    ):
        # (grad mode is off inside forward, and needs_input_grad does not see no_grad: the caller's grad_on does)
        need = ctx.needs_input_grad
        grads = None
        if grad_on and any(need[4:]):
            grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in call.logits]
        gv = torch.empty(call.n, dtype=torch.float32, device=call.logits[0].device) if grad_on and need[3] else None
        outs = tuple(impl.kernel_forward(call, grads, gv))
        ctx.impl, ctx.call = impl, call
        ctx.grads, ctx.gv = grads, gv
        ctx.values_dtype = None if values is None else values.dtype
        # every input is saved, so that an in-place change before backward raises as with the custom op
        ctx.save_for_backward(*_guarded_inputs(call, values), outs[4], outs[5])
        ctx.mark_non_differentiable(*(t for t in outs[3:] if t is not None))
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, g_losses, g_log_probs, g_entropy, *_):
        _refuse_double_backward(ctx.impl.name)
        *_, stats, saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads, gv = ctx.grads, ctx.gv
        holds = grads is not None or gv is not None
        ctx.grads = ctx.gv = None  # handed over below (no copy); a second backward recomputes
        call = ctx.call
        if not holds:
            if any(need[4:]):
                grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in call.logits]
            if need[3]:
                gv = torch.empty(call.n, dtype=torch.float32, device=call.logits[0].device)
        ctx.impl.kernel_backward(
            call, stats, saved, g_losses, g_log_probs, g_entropy, grads=grads, grad_values=gv, holds=holds
        )
        if gv is not None and ctx.values_dtype is not None:
            gv = gv.to(ctx.values_dtype)
        out_grads = (
            [g if n else None for g, n in zip(grads, need[4:])] if grads is not None else [None] * len(call.logits)
        )
        return (None, None, None, gv if need[3] else None, *out_grads)


def register_fused(backend: FusedBackend) -> FusedBackend:
    """Make ``backend`` reachable from the custom ops under its name."""
    _FUSED[backend.name] = backend
    return backend


def _call(
    backend,
    logits,
    masks,
    actions,
    old_log_probs,
    advantages,
    relevance,
    weights,
    values,
    returns,
    old_values,
    value_weights,
    head_sizes,
    cfg,
) -> tuple[FusedBackend, FusedCall]:
    if backend not in _FUSED:
        raise RuntimeError(f"esper_kernels: fused backend {backend!r} is not registered")
    call = FusedCall(
        list(logits),
        list(masks),
        list(actions),
        list(old_log_probs),
        advantages,
        list(relevance),
        weights,
        values,
        returns,
        old_values,
        value_weights,
        tuple(head_sizes),
        cfg_from_list(cfg, len(head_sizes)),
    )
    return _FUSED[backend], call


Tensor = torch.Tensor


@torch.library.custom_op("esper_kernels::fused_forward", mutates_args=())
def fused_forward(
    backend: str,
    logits: list[Tensor],
    masks: list[Tensor],
    actions: list[Tensor],
    old_log_probs: list[Tensor],
    advantages: Tensor,
    relevance: list[Tensor],
    weights: Tensor | None,
    values: Tensor | None,
    returns: Tensor | None,
    old_values: Tensor | None,
    value_weights: Tensor | None,
    head_sizes: list[int],
    cfg: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl, call = _call(
        backend,
        logits,
        masks,
        actions,
        old_log_probs,
        advantages,
        relevance,
        weights,
        values,
        returns,
        old_values,
        value_weights,
        head_sizes,
        cfg,
    )
    return tuple(impl.kernel_forward(call))[:6]


@fused_forward.register_fake
def _(
    backend,
    logits,
    masks,
    actions,
    old_log_probs,
    advantages,
    relevance,
    weights,
    values,
    returns,
    old_values,
    value_weights,
    head_sizes,
    cfg,
):
    n, H = logits[0].shape[0], len(head_sizes)
    like = logits[0]
    f32 = dict(dtype=torch.float32, device=like.device)
    saved_shape = _FUSED[backend].saved_shape(n, H) if backend in _FUSED else [n, H]
    return (
        like.new_empty(4, **f32),
        like.new_empty((n, H), **f32),
        like.new_empty((n, H), **f32),
        like.new_empty((n,), **f32),
        like.new_empty((stats_size(H),), **f32),
        like.new_empty(saved_shape, **f32),
    )


@torch.library.custom_op("esper_kernels::fused_backward", mutates_args=())
def fused_backward(
    backend: str,
    logits: list[Tensor],
    masks: list[Tensor],
    actions: list[Tensor],
    old_log_probs: list[Tensor],
    advantages: Tensor,
    relevance: list[Tensor],
    weights: Tensor | None,
    values: Tensor | None,
    returns: Tensor | None,
    old_values: Tensor | None,
    value_weights: Tensor | None,
    head_sizes: list[int],
    cfg: list[float],
    stats: Tensor,
    saved: Tensor,
    grad_losses: Tensor | None,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
) -> tuple[list[Tensor], Tensor]:
    impl, call = _call(
        backend,
        logits,
        masks,
        actions,
        old_log_probs,
        advantages,
        relevance,
        weights,
        values,
        returns,
        old_values,
        value_weights,
        head_sizes,
        cfg,
    )
    if impl.one_pass:
        dev = logits[0].device
        grads = [torch.empty(t.shape, dtype=t.dtype, device=dev) for t in logits]
        grad_values = None if values is None else torch.empty(call.n, dtype=torch.float32, device=dev)
        impl.kernel_backward(
            call,
            stats,
            saved,
            grad_losses,
            grad_log_probs,
            grad_entropy,
            grads=grads,
            grad_values=grad_values,
            holds=False,
        )
    else:
        grads, grad_values = impl.kernel_backward(call, stats, saved, grad_losses, grad_log_probs, grad_entropy)
    if grad_values is None:
        grad_values = stats.new_empty(0)
    return list(grads), grad_values


@fused_backward.register_fake
def _(
    backend,
    logits,
    masks,
    actions,
    old_log_probs,
    advantages,
    relevance,
    weights,
    values,
    returns,
    old_values,
    value_weights,
    head_sizes,
    cfg,
    stats,
    saved,
    grad_losses,
    grad_log_probs,
    grad_entropy,
):
    grad_values = stats.new_empty(0) if values is None else values.new_empty(values.shape, dtype=torch.float32)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in logits], grad_values


_ARG_NAMES = (
    "backend",
    "logits",
    "masks",
    "actions",
    "old_log_probs",
    "advantages",
    "relevance",
    "weights",
    "values",
    "returns",
    "old_values",
    "value_weights",
    "head_sizes",
    "cfg",
)


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_ARG_NAMES, inputs))
    ctx.backend = args["backend"]
    ctx.head_sizes = args["head_sizes"]
    ctx.cfg = args["cfg"]
    ctx.counts = (len(args["logits"]), len(args["masks"]), len(args["actions"]), len(args["relevance"]))
    ctx.values_dtype = None if args["values"] is None else args["values"].dtype
    tensors = [
        *args["logits"],
        *args["masks"],
        *args["actions"],
        *args["old_log_probs"],
        args["advantages"],
        *args["relevance"],
        args["weights"],
        args["values"],
        args["returns"],
        args["old_values"],
        args["value_weights"],
        output[4],
        output[5],
    ]
    ctx.save_for_backward(*tensors)


def _backward(ctx, g_losses, g_log_probs, g_entropy, g_joint_ratio, g_stats, g_saved):
    _refuse_double_backward(ctx.backend)
    t = list(ctx.saved_tensors)
    nl, nm, na, nr = ctx.counts

    def take(k: int) -> list[Tensor]:
        out = t[:k]
        del t[:k]
        return out

    logits, masks, actions, olp = take(nl), take(nm), take(na), take(na)
    (adv,) = take(1)
    rel = take(nr)
    weights, values, returns, old_values, value_weights, stats, saved = t
    grads, grad_values = torch.ops.esper_kernels.fused_backward(
        ctx.backend,
        logits,
        masks,
        actions,
        olp,
        adv,
        rel,
        weights,
        values,
        returns,
        old_values,
        value_weights,
        ctx.head_sizes,
        ctx.cfg,
        stats,
        saved,
        g_losses,
        g_log_probs,
        g_entropy,
    )
    gv = None if values is None else grad_values.to(ctx.values_dtype)
    # list inputs take a list of Nones (torch.library checks the structure of what backward returns)
    return (
        None,
        list(grads),
        [None] * nm,
        [None] * na,
        [None] * na,
        None,
        [None] * nr,
        None,
        gv,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("esper_kernels::fused_forward", _backward, setup_context=_setup_context)

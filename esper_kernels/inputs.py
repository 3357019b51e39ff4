"""Input forms of docs/semantics.md section 1 -> one canonical PPOInputs; shape, dtype and device errors.

Per-head inputs come as one tensor (``[..., S]`` for logits and masks, ``[..., H]`` for actions, old
log-probs and relevance), a mapping by head name, or a sequence in layout order. Leading batch dims
(from the logits) are flattened to N. Per-head tensors stay views of what the caller passed (no copy,
no concatenation) except where a view is impossible (a batch that cannot be flattened, or logits
whose last dim is not contiguous).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .layout import HeadLayout

__all__ = ["PPOInputs", "prepare_inputs", "LOGIT_DTYPES"]

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: reference only
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTION_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.bool, torch.uint8)


class HeadColumns(Sequence):
    """The H columns of an [N, H] tensor as per-head [N] views, made on first use (one ``unbind``): a backend
    that reads the [N, H] tensor whole (``PPOInputs.packed_steps``) never pays for the views."""

    __slots__ = ("_views", "whole")

    def __init__(self, whole: torch.Tensor):
        self.whole = whole
        self._views: tuple[torch.Tensor, ...] | None = None

    def _all(self) -> tuple[torch.Tensor, ...]:
        if self._views is None:
            self._views = self.whole.unbind(1)
        return self._views

    def __len__(self) -> int:
        return self.whole.shape[1]

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._all())

    def __repr__(self) -> str:
        return f"HeadColumns({len(self)} x [{self.whole.shape[0]}])"


@dataclass
class PPOInputs:
    """Canonical inputs: per-head tuples of [N, A_h] / [N] tensors, per-step [N] tensors, N = prod(batch)."""

    layout: HeadLayout
    batch_shape: torch.Size
    n: int
    device: torch.device
    logits: tuple[torch.Tensor, ...]  # one [N, S] tensor (packed) or H tensors [N, A_h]; stride(-1) == 1
    masks: tuple[torch.Tensor, ...] | None  # same form as logits, bool or uint8; None = all valid
    actions: Sequence[torch.Tensor]  # H tensors [N], int32/int64 (HeadColumns when given as [N, H])
    old_log_probs: Sequence[torch.Tensor]  # H tensors [N], float
    advantages: torch.Tensor  # [N] or [N, H] (per-head advantages)
    relevance: Sequence[torch.Tensor] | None  # H tensors [N], bool/uint8; None = all relevant
    weights: torch.Tensor | None  # [N] float or bool; None = all 1
    values: torch.Tensor | None  # [N]
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    value_weights: torch.Tensor | None
    #: the [N, H] tensors that actions, old_log_probs and relevance were given as (their columns are the per-head
    #: views above), by those names; a backend may read them whole instead of H views
    packed_steps: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        """True when the logits are one [N, S] tensor (head h in columns offsets[h]:offsets[h]+A_h)."""
        return len(self.logits) == 1

    @property
    def logits_dtype(self) -> torch.dtype:
        return self.logits[0].dtype

    def head_logits(self, h: int) -> torch.Tensor:
        """[N, A_h] view of head h's logits."""
        if len(self.logits) == 1:
            return self.logits[0].narrow(1, self.layout.offsets[h], self.layout.sizes[h])
        return self.logits[h]

    def head_mask(self, h: int) -> torch.Tensor | None:
        if self.masks is None:
            return None
        if len(self.masks) == 1:
            return self.masks[0].narrow(1, self.layout.offsets[h], self.layout.sizes[h])
        return self.masks[h]


def _shape(s) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def _not_a_tensor(name: str, t: object, expected: str) -> TypeError:
    module = type(t).__module__
    kind = type(t).__name__ if module == "builtins" else f"{module}.{type(t).__name__}"
    hint = " (convert it with torch.from_numpy or torch.as_tensor)" if module == "numpy" else ""
    return TypeError(f"{name}: expected a torch.Tensor {expected}, got {kind}{hint}")


def _expect(name: str, t: object, shape: tuple, what: str, dtypes: tuple, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _not_a_tensor(name, t, f"of shape {_shape(shape)} ({what})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {_shape(shape)} ({what}), got {_shape(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the logits' device), got {t.device}")
    return t


def _flat(t: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """Flatten the leading batch dims (a view when the strides allow it)."""
    if batch_ndim == 1:
        return t
    return t.reshape((-1,) + tuple(t.shape[batch_ndim:]))


def _per_head(
    name: str,
    value,
    layout: HeadLayout,
    batch: torch.Size,
    device: torch.device,
    dtypes: tuple,
    what: str,
    packed_last: int | None,
    head_last,
) -> tuple[torch.Tensor, ...]:
    """A per-head input -> one tensor [..., packed_last] (given packed) or H per-head tensors."""
    h_count = layout.num_heads
    if isinstance(value, torch.Tensor):
        shape = tuple(batch) + ((packed_last,) if packed_last is not None else ())
        _expect(name, value, shape, what, dtypes, device)
        return (value,)
    if isinstance(value, Mapping):
        missing = [n for n in layout.names if n not in value]
        extra = [k for k in value if k not in layout.names]
        if missing or extra:
            raise ValueError(
                f"{name}: expected one entry per head {list(layout.names)}; missing {missing}, unknown {extra}"
            )
        items = [value[n] for n in layout.names]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != h_count:
            raise ValueError(
                f"{name}: expected {h_count} per-head tensors (layout order {list(layout.names)}), got {len(value)}"
            )
        items = list(value)
    else:
        raise TypeError(
            f"{name}: expected a tensor, a mapping by head name or a sequence of per-head tensors, "
            f"got {type(value).__name__}"
        )
    out = []
    for h, (hname, t) in enumerate(zip(layout.names, items)):
        shape = tuple(batch) + head_last(h)
        out.append(_expect(f"{name}[{hname!r}]", t, shape, what, dtypes, device))
    return tuple(out)


def prepare_inputs(
    layout: HeadLayout,
    logits,
    action_masks,
    actions,
    old_log_probs,
    advantages,
    *,
    head_relevance=None,
    weights=None,
    values=None,
    returns=None,
    old_values=None,
    value_weights=None,
    per_head_advantages_allowed: bool = False,
    value_clip: bool = False,
) -> PPOInputs:
    """Check every input's type, shape, dtype and device against the layout; flatten to N rows."""
    if not isinstance(layout, HeadLayout):
        raise TypeError(f"layout: expected an esper_kernels.HeadLayout, got {type(layout).__name__}")
    H, S = layout.num_heads, layout.total
    # the batch shape and device come from the logits
    if not isinstance(logits, (torch.Tensor, Mapping, Sequence)) or isinstance(logits, (str, bytes)):
        raise _not_a_tensor("logits", logits, f"[*batch, {S}] or per-head tensors [*batch, A_h]")
    if isinstance(logits, torch.Tensor):
        if logits.dim() < 2:
            raise ValueError(
                f"logits: expected shape [*batch, {S}] (S = sum of head sizes), got {_shape(logits.shape)}"
            )
        batch, device = logits.shape[:-1], logits.device
    else:
        first = (
            next(iter(logits.values()))
            if isinstance(logits, Mapping) and logits
            else (logits[0] if isinstance(logits, Sequence) and len(logits) else None)
        )
        if not isinstance(first, torch.Tensor) or first.dim() < 2:
            raise ValueError(
                f"logits: expected [*batch, {S}] or per-head tensors [*batch, A_h] for heads "
                f"{layout.items()}, got {type(logits).__name__}"
            )
        batch, device = first.shape[:-1], first.device
    bnd = len(batch)
    if bnd == 0:
        raise ValueError("logits: expected at least one batch dim")
    sizes = layout.sizes
    lg = _per_head(
        "logits",
        logits,
        layout,
        batch,
        device,
        LOGIT_DTYPES,
        f"*batch, S = {S}" if isinstance(logits, torch.Tensor) else "*batch, A_h",
        S,
        lambda h: (sizes[h],),
    )
    dtypes = {t.dtype for t in lg}
    if len(dtypes) > 1:
        raise TypeError(f"logits: expected one dtype for every head, got {sorted(str(d) for d in dtypes)}")
    masks = None
    if action_masks is not None:
        masks = _per_head(
            "action_masks", action_masks, layout, batch, device, MASK_DTYPES, "like logits", S, lambda h: (sizes[h],)
        )
    acts = _per_head("actions", actions, layout, batch, device, ACTION_DTYPES, f"*batch, H = {H}", H, lambda h: ())
    olp = _per_head(
        "old_log_probs", old_log_probs, layout, batch, device, FLOAT_DTYPES, f"*batch, H = {H}", H, lambda h: ()
    )
    rel = None
    if head_relevance is not None:
        rel = _per_head(
            "head_relevance", head_relevance, layout, batch, device, MASK_DTYPES, f"*batch, H = {H}", H, lambda h: ()
        )

    if not isinstance(advantages, torch.Tensor):
        raise _not_a_tensor("advantages", advantages, f"of shape {_shape(batch)}")
    if per_head_advantages_allowed and tuple(advantages.shape) == tuple(batch) + (H,) and H > 0:
        _expect("advantages", advantages, tuple(batch) + (H,), "per-head advantages", FLOAT_DTYPES, device)
    else:
        what = "*batch" + (
            ", or [*batch, H] per head"
            if per_head_advantages_allowed
            else "; per-head advantages [*batch, H] need surrogate='per_head'"
        )
        _expect("advantages", advantages, tuple(batch), what, FLOAT_DTYPES, device)

    def step(name: str, t, dtypes=FLOAT_DTYPES):
        if t is None:
            return None
        return _flat(_expect(name, t, tuple(batch), "*batch", dtypes, device), bnd)

    w = step("weights", weights, FLOAT_DTYPES + (torch.bool,))
    vw = step("value_weights", value_weights, FLOAT_DTYPES + (torch.bool,))
    v, R, vo = step("values", values), step("returns", returns), step("old_values", old_values)
    if (v is None) != (R is None):
        raise ValueError(
            f"values, returns: expected both or neither, got {'values' if v is not None else 'returns'} only"
        )
    if v is None and (vo is not None or vw is not None):
        raise ValueError("old_values, value_weights: given without values and returns")
    if value_clip and v is not None and vo is None:
        raise ValueError(
            "old_values: config.value_clip is set, so old_values [*batch] are required for the clipped value loss"
        )

    def flat_logits(ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = []
        for t in ts:
            t = _flat(t, bnd)
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                t = t.contiguous()
            out.append(t)
        return tuple(out)

    lg = flat_logits(lg)
    if masks is not None:
        masks = flat_logits(masks)
    n = 1
    for d in batch:
        n *= int(d)

    packed_steps: dict[str, torch.Tensor] = {}

    def heads_1d(name: str, ts: tuple[torch.Tensor, ...], packed: bool) -> Sequence[torch.Tensor]:
        if packed:
            whole = packed_steps[name] = _flat(ts[0], bnd)
            return HeadColumns(whole)  # H column views, made on first use (one op, not H indexing calls)
        return tuple(_flat(t, bnd) if bnd > 1 else t for t in ts)

    return PPOInputs(
        layout=layout,
        batch_shape=torch.Size(batch),
        n=n,
        device=device,
        logits=lg,
        masks=masks,
        actions=heads_1d("actions", acts, isinstance(actions, torch.Tensor)),
        old_log_probs=heads_1d("old_log_probs", olp, isinstance(old_log_probs, torch.Tensor)),
        advantages=_flat(advantages, bnd),
        relevance=None if rel is None else heads_1d("relevance", rel, isinstance(head_relevance, torch.Tensor)),
        weights=w,
        values=v,
        returns=R,
        old_values=vo,
        value_weights=vw,
        packed_steps=packed_steps,
    )

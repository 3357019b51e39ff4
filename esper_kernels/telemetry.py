"""Per-head gradient telemetry that cannot hide a missing gradient (the lessons of the telemetry-freeze bug).

* ``head_grad_norms(heads)``: the L2 norm of each head's parameter gradients, NaN (never 0.0) when no
  parameter of the head has a gradient; one device tensor underneath, no host sync.
* ``gradient_states(grad_norms, metrics)``: per head ``"finite"``, ``"missing"`` (no gradient at all),
  ``"nonfinite"`` (NaN or Inf in a gradient) or ``"not_learnable"`` (learnable_fraction is 0: no present,
  relevant step with more than one valid action, so a zero gradient is expected, not a bug).
* ``head_report(metrics, grad_norms)``: one line per head, e.g. ``slot: grad=0.000 (0% learnable) ...``
  beside ``op: grad=0.016 (70% learnable) ...``, with entropy, KL, clip fraction and non-finite count.

>>> report = head_report(out.metrics, head_grad_norms({"op": policy.op_head, "slot": policy.slot_head}))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from .metrics import PPOMetrics

__all__ = ["GradNorms", "head_grad_norms", "gradient_states", "head_report", "GRADIENT_STATES"]

#: the values ``gradient_states`` returns
GRADIENT_STATES = ("finite", "missing", "nonfinite", "not_learnable")


class GradNorms(dict):
    """``{head: 0-d tensor}`` from ``head_grad_norms``; also knows which heads had no gradient at all.

    ``missing`` separates the NaN sentinel (no parameter of the head has a ``.grad``) from a NaN that a
    gradient really holds; ``tensor`` is the [H] device tensor the 0-d values are views of.
    """

    def __init__(
        self, values: Mapping[str, torch.Tensor], missing: Iterable[str] = (), tensor: torch.Tensor | None = None
    ):
        super().__init__(values)
        self.missing = frozenset(missing)
        self.tensor = tensor

    def to_floats(self) -> dict[str, float]:
        """The norms as floats (one host sync)."""
        return _floats(self)


def _params(head) -> list[torch.Tensor]:
    if isinstance(head, torch.nn.Module):
        return list(head.parameters())
    if isinstance(head, torch.Tensor):
        return [head]
    return list(head)


def head_grad_norms(heads: Mapping[str, torch.nn.Module | Iterable[torch.Tensor]]) -> GradNorms:
    """Per head, the L2 norm of the gradients of its parameters (all of them together), as 0-d tensors.

    ``heads`` maps a head name to its module or to an iterable of its parameters. A head none of whose
    parameters has a ``.grad`` gets NaN, never 0.0, and is listed in the result's ``missing``; a head with
    some gradients gets the norm of those. One ``torch._foreach_norm`` over every gradient and one
    norm of norms per head: device work only (no host synchronisation, CUDA-graph safe). Norms are float32.
    """
    names = list(heads)
    per_head: list[list[torch.Tensor]] = []
    missing = []
    device = None
    for name in names:
        params = _params(heads[name])
        got = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
        if not got:
            missing.append(name)
        per_head.append(got)
        if device is None and params:
            device = params[0].device
    flat = [g for got in per_head for g in got]
    if flat:
        device = flat[0].device
    elif device is None:
        device = torch.device("cpu")
    # one fused norm per device over every gradient, then a norm of the norms per head: device ops only (no
    # host sync, no host-to-device copy, so it also runs inside a CUDA graph capture)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(flat):
        by_device.setdefault(g.device, []).append(i)
    norms_flat: list[torch.Tensor] = [None] * len(flat)  # type: ignore[list-item]
    for idx in by_device.values():
        for i, n in zip(idx, torch._foreach_norm([flat[i] for i in idx], 2, dtype=torch.float32)):
            norms_flat[i] = n.to(device)
    values = []
    start = 0
    for got in per_head:
        if got:
            values.append(torch.linalg.vector_norm(torch.stack(norms_flat[start : start + len(got)])))
        else:
            values.append(torch.full((), float("nan"), dtype=torch.float32, device=device))
        start += len(got)
    norms = torch.stack(values) if values else torch.empty(0, dtype=torch.float32, device=device)
    return GradNorms(dict(zip(names, norms.unbind())), missing, norms)


def _floats(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """A mapping of 0-d tensors or numbers -> floats, with at most one host sync."""
    names = list(values)
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return {n: float(values[n]) for n in names}
    dev = tensors[0].device
    stacked = torch.stack(
        [
            v.detach().reshape(()).float().to(dev)
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), device=dev)
            for v in values.values()
        ]
    )
    return dict(zip(names, stacked.tolist()))


def _metric_dict(metrics: PPOMetrics | Mapping[str, float]) -> Mapping[str, float]:
    if isinstance(metrics, PPOMetrics):
        return metrics.to_dict()
    return metrics


def _state(norm: float, missing: bool, learnable: float | None) -> str:
    if missing:
        return "missing"
    if not math.isfinite(norm):
        return "nonfinite"
    if learnable is not None and not learnable > 0:  # 0, or NaN when no step was present
        return "not_learnable"
    return "finite"


def gradient_states(
    grad_norms: Mapping[str, torch.Tensor | float], metrics: PPOMetrics | Mapping[str, float] | None = None
) -> dict[str, str]:
    """Per head of ``grad_norms``: ``finite``, ``missing``, ``nonfinite`` or ``not_learnable``.

    ``missing``: no parameter of the head has a gradient (``GradNorms.missing``; for a plain mapping, a NaN
    norm is read as the missing-gradient sentinel). ``nonfinite``: the gradient holds NaN or Inf.
    ``not_learnable``: a finite gradient on a head whose ``learnable_fraction`` in ``metrics`` is 0 (or NaN:
    no present step), so a zero gradient is expected. ``metrics`` is a PPOMetrics or its ``to_dict()``;
    without it no head is ``not_learnable``. One host sync at most per argument.
    """
    norms = _floats(grad_norms)
    known_missing = getattr(grad_norms, "missing", None)
    m = _metric_dict(metrics) if metrics is not None else None
    out = {}
    for name, v in norms.items():
        missing = name in known_missing if known_missing is not None else math.isnan(v)
        learnable = None if m is None else m.get(f"head_{name}_learnable_fraction")
        out[name] = _state(v, missing, learnable)
    return out


def _fmt(v: float, spec: str) -> str:
    if math.isnan(v):
        return "nan"
    text = format(v, spec)
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text  # no "-0.0000"


def head_report(
    metrics: PPOMetrics | Mapping[str, float],
    grad_norms: Mapping[str, torch.Tensor | float] | None = None,
    heads: Iterable[str] | None = None,
) -> str:
    """One line per head: gradient norm, learnable fraction, entropy, KL, clip fraction, non-finite count, state.

    ``slot: grad=0.000 (0% learnable) entropy=0.000 kl=0.0000 clip=0.000 nonfinite=0 [not_learnable]``

    ``metrics``: a PPOMetrics (one host sync) or its ``to_dict()``; ``grad_norms``: from ``head_grad_norms``
    (or any mapping of head name to norm), optional; ``heads``: which heads and in which order (default: the
    metrics' layout, or the heads of ``grad_norms``).
    """
    if heads is None:
        if isinstance(metrics, PPOMetrics):
            heads = metrics.layout.names
        elif grad_norms is not None:
            heads = list(grad_norms)
        else:
            suffix = "_learnable_fraction"
            heads = [k[len("head_") : -len(suffix)] for k in metrics if k.startswith("head_") and k.endswith(suffix)]
    heads = list(heads)
    m = _metric_dict(metrics)
    states = gradient_states(grad_norms, m) if grad_norms is not None else {}
    norms = _floats(grad_norms) if grad_norms is not None else {}
    lines = []
    for name in heads:
        key = f"head_{name}_"
        if key + "learnable_fraction" not in m:
            raise KeyError(f"head_report: no metrics for head {name!r}")
        lf = m[key + "learnable_fraction"]
        learn = "no present steps" if math.isnan(lf) else f"{100.0 * lf:.0f}% learnable"
        grad = f"grad={_fmt(norms[name], '.3f')} " if name in norms else ""
        nonfinite = m[key + "nonfinite"]
        line = (
            f"{name}: {grad}({learn}) entropy={_fmt(m[key + 'entropy'], '.3f')} "
            f"kl={_fmt(m[key + 'kl'], '.4f')} clip={_fmt(m[key + 'clip_fraction'], '.3f')} "
            f"nonfinite={_fmt(nonfinite, '.0f')}"
        )
        if name in states:
            line += f" [{states[name]}]"
        lines.append(line)
    return "\n".join(lines)

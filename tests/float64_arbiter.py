"""check_arbitrated: harness.check_backend with the float64 reference as the arbiter of gradient mismatches
(shared by every fused backend's tier; check_triton is its triton form).

The float32 reference is not exact either: where its gradient is ill-conditioned (a probability floor near a
uniform distribution: the chain's float32 terms, O(1) in the incoming gradients, cancel to ~1e-6 noise), it can
be farther from the float64 gradient than the fp32 tolerance of docs/semantics.md section 7 (rtol 1e-5, atol 1e-6). A
gradient mismatch
is then re-judged: every element must be as close to the float64 reference's gradient as the float32
reference's is, plus that tolerance (and one unit of the input dtype for bf16/fp16 logits). Everything else
(losses, per-step outputs, metrics, the exact zero of absent steps) is check_backend's verdict alone.
"""

from __future__ import annotations

import math

import torch
from harness import ATOL, COUNT_KEYS, COUNT_SUFFIXES, RTOL, check_backend, compare_metrics, run
from harness import _ulp as ulp

import esper_kernels as ek

__all__ = ["assert_grad_vs_float64", "check_arbitrated", "check_triton"]


def _to_float64(logits):
    if isinstance(logits, torch.Tensor):
        return logits.double()
    if isinstance(logits, dict):
        return {k: v.double() for k, v in logits.items()}
    return [v.double() for v in logits]


def _grads_vs_float64(backend, batch, layout, config, grad_seed=0):
    """Where the float32 reference's gradient is itself ill-conditioned (floors near a uniform distribution:
    its chain of float32 terms cancels to ~1e-6 noise), the float64 reference arbitrates: every element of our
    gradient must be as close to the float64 gradient as the float32 reference's is, plus the tolerance of
    docs/semantics.md section 7
    (and one unit of the input dtype for bf16/fp16 logits)."""
    _, got = run(backend, batch, layout, config, grad_seed=grad_seed)
    _, ref32 = run("reference", batch, layout, config, upcast=True, grad_seed=grad_seed)
    _, ref64 = run("reference", dict(batch, logits=_to_float64(batch["logits"])), layout, config, grad_seed=grad_seed)
    for k, truth in ref64.items():
        if truth is None:
            assert got[k] is None, k
            continue
        assert_grad_vs_float64(f"grad {k}", got[k], ref32[k], truth)


def assert_grad_vs_float64(name, got, ref32, ref64):
    """Every element of ``got`` as close to the float64 reference's gradient ``ref64`` as the float32 reference's
    ``ref32`` is, plus the tolerance (and one unit of the input dtype for bf16/fp16); non-finite where it is."""
    t = ref64.detach().cpu().double()
    g = got.detach().cpu().double()
    r = ref32.detach().cpu().double()
    unit = ulp(got.detach().cpu(), got.dtype) if got.dtype in (torch.bfloat16, torch.float16) else 0.0
    tol = (r - t).abs() + ATOL + RTOL * t.abs() + unit
    # non-finite where the float64 truth is non-finite (docs/semantics.md section 3: NaN or +-inf)
    bad = ~((g - t).abs() <= tol) & ~(~torch.isfinite(g) & ~torch.isfinite(t))
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} element(s) farther from the float64 reference than "
        f"the float32 reference is: got {g[bad][:4].tolist()}, float64 {t[bad][:4].tolist()}, "
        f"float32 reference {r[bad][:4].tolist()}"
    )


def _metrics_vs_float64(backend, batch, layout, config):
    """A metric that cancels (joint_kl_k1 = mean of -L near 0, with L a sum of log-probs of magnitude 30) carries
    one float32 ulp of those log-probs in the float32 reference too: re-judged against the float64 reference,
    every metric must be as close to it as the float32 reference's, plus the tolerance; counts stay exact."""
    got = run(backend, batch, layout, config, grad_seed=None)[0].metrics.to_dict()
    ref32 = run("reference", batch, layout, config, upcast=True, grad_seed=None)[0].metrics.to_dict()
    ref64 = run("reference", dict(batch, logits=_to_float64(batch["logits"])), layout, config, grad_seed=None)[
        0
    ].metrics.to_dict()
    for k, t in ref64.items():
        g, r = got[k], ref32[k]
        if k in COUNT_KEYS or k.endswith(COUNT_SUFFIXES) or not (math.isfinite(t) and math.isfinite(r)):
            compare_metrics({k: g}, {k: r})  # exact, or the NaN/inf pattern: never re-judged
            continue
        tol = abs(r - t) + ATOL + RTOL * abs(t)
        assert abs(g - t) <= tol, (
            f"metric {k}: got {g!r}, float64 reference {t!r}, float32 reference {r!r}: "
            "farther from float64 than the float32 reference is"
        )


def check_arbitrated(backend, batch, layout, config=None, **kw):
    """harness.check_backend; a gradient or metric mismatch is re-judged against the float64 reference."""
    config = config or ek.PPOLossConfig()
    try:
        return check_backend(backend, batch, layout, config, **kw)
    except AssertionError as e:
        msg = str(e)
        if msg.startswith("metric ") and "want exactly" not in msg:  # (counts are never re-judged)
            _metrics_vs_float64(backend, batch, layout, config)
            return check_arbitrated(backend, batch, layout, config, **dict(kw, check_metrics=False))
        if not msg.startswith("grad ") or "absent steps" in msg:
            raise
        _grads_vs_float64(backend, batch, layout, config, grad_seed=kw.get("grad_seed", 0))
        return run(backend, batch, layout, config, grad_seed=None)[0], None


def check_triton(batch, layout, config=None, **kw):
    return check_arbitrated("triton", batch, layout, config, **kw)

"""Shared test harness: run a backend and the reference on the same inputs and compare per docs/semantics.md section 7.

The reference runs in float32 on the upcast inputs; the backend runs on the inputs as given. Losses,
per-step outputs (present steps) and metrics must agree within rtol 1e-5, atol 1e-6 (counts exactly);
float32 gradients within rtol 1e-5, atol 1e-6; bf16/fp16 gradients within one unit in the last place of the
reference gradient rounded to that dtype. Gradients use random incoming gradients on loss, log_probs and
entropy, so the per-step outputs' backward paths are checked too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

import esper_kernels as ek

RTOL, ATOL = 1e-5, 1e-6
# metrics that are counts (or min/max of counts): compared exactly
COUNT_SUFFIXES = ("nonfinite", "empty_mask", "invalid_action", "valid_actions_min", "valid_actions_max")
COUNT_KEYS = ("steps", "invalid_weights", "invalid_value_weights", "all_finite")


def _map_logits(logits, fn):
    if isinstance(logits, torch.Tensor):
        return fn(logits)
    if isinstance(logits, Mapping):
        return {k: fn(v) for k, v in logits.items()}
    return [fn(v) for v in logits]


def _leaves(logits) -> list[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        return [logits]
    if isinstance(logits, Mapping):
        return list(logits.values())
    return list(logits)


def _present(batch: dict, shape) -> torch.Tensor:
    w = batch.get("weights")
    if w is None:
        return torch.ones(shape, dtype=torch.bool)
    w = w.detach().cpu().double()
    return torch.isfinite(w) & (w > 0)


def run(
    backend: str,
    batch: dict,
    layout: ek.HeadLayout,
    config: ek.PPOLossConfig,
    *,
    upcast: bool = False,
    grad_seed: int | None = 0,
    leaf_fn=None,
):
    """One call of ``backend`` with random incoming gradients; returns (output, {name: grad})."""
    b = dict(batch)
    make = (lambda t: t.detach().float().clone()) if upcast else (lambda t: t.detach().clone())
    if leaf_fn is not None:
        logits = leaf_fn(b["logits"], make)
    else:
        logits = _map_logits(b["logits"], make)
    leaves = _leaves(logits)
    for t in leaves:
        if t.is_leaf:
            t.requires_grad_(True)
    b["logits"] = logits
    if b.get("values") is not None:
        b["values"] = b["values"].detach().clone().requires_grad_(True)
    out = ek.ppo_loss(**b, layout=layout, config=config, backend=backend, validate=False)
    grads = {}
    if grad_seed is not None:
        g = torch.Generator().manual_seed(grad_seed)
        dev = out.loss.device
        gl = torch.randn((), generator=g).to(dev)
        glp = torch.randn(out.log_probs.shape, generator=g).to(dev)
        gent = torch.randn(out.entropy.shape, generator=g).to(dev)
        wrt = [t for t in leaves if t.requires_grad]
        if b.get("values") is not None:
            wrt.append(b["values"])
        res = torch.autograd.grad([out.loss, out.log_probs, out.entropy], wrt, [gl, glp, gent], allow_unused=True)
        for i, r in enumerate(res[: len(leaves)]):
            grads[f"logits{i}"] = r
        if b.get("values") is not None:
            grads["values"] = res[-1]
    return out, grads


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (x already rounded to dtype), as float64."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    min_exp = {torch.bfloat16: -126, torch.float16: -14}[dtype]
    ax = x.abs().double()
    e = torch.floor(torch.log2(torch.where(ax > 0, ax, 1.0)))
    e = torch.clamp(torch.where(ax > 0, e, float(min_exp)), min=min_exp)
    return torch.exp2(e - mant)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL, atol: float = ATOL):
    torch.testing.assert_close(
        got.detach().cpu().double(),
        want.detach().cpu().double(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def assert_same_non_finite(name: str, got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """The gradient rule of docs/semantics.md section 3: where the upstream gradient is not finite, the fused
    backends write NaN and the reference's autograd NaN or +-inf; so the *non-finite* pattern must be equal
    (and infinities of one sign must match where both are infinite). Returns the mask of non-finite elements."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    bad_g, bad_w = ~torch.isfinite(g), ~torch.isfinite(w)
    if not torch.equal(bad_g, bad_w):
        i = (bad_g != bad_w).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: non-finite pattern differs at {int((bad_g != bad_w).sum())} element(s); "
            f"first at {i}: got {g[tuple(i)].item()}, want {w[tuple(i)].item()}"
        )
    return bad_g


def assert_grad_close(name: str, got: torch.Tensor, want_fp32: torch.Tensor, dtype: torch.dtype):
    if got is None or want_fp32 is None:
        assert got is None and want_fp32 is None, f"{name}: one gradient is None"
        return
    assert got.dtype == dtype, f"{name}: gradient dtype {got.dtype}, expected the input dtype {dtype}"
    # (rounded to the logits' dtype: a float32 gradient beyond float16's range is +-inf in float16)
    non_finite = assert_same_non_finite(name, got, want_fp32.detach().cpu().to(dtype))
    if dtype == torch.float32:
        keep = ~non_finite
        assert_close(name, got.detach().cpu()[keep], want_fp32.detach().cpu()[keep])
        return
    want = want_fp32.detach().cpu().to(dtype)
    got_d, want_d = got.detach().cpu().double(), want.double()
    err = torch.where(non_finite, 0.0, (got_d - want_d).abs())
    # one ulp of the rounded reference, plus the float32 tolerance for the difference of the unrounded values:
    # where the gradient cancels to ~0, both float32 results are rounding noise (~1e-8) and the reference's
    # rounding to fp16/bf16 can even have the wrong sign
    # (non-finite elements were compared as a pattern above; their bound would be NaN)
    bound = (
        _ulp(want.nan_to_num(0.0, 0.0, 0.0), dtype)
        + ATOL
        + RTOL * want_fp32.detach().cpu().double().abs().nan_to_num(0.0)
    )
    bad = ~non_finite & ~(err <= bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} element(s) differ by more than 1 ulp of {dtype}; first at "
            f"{i}: got {got_d[tuple(i)].item()}, want {want_d[tuple(i)].item()} "
            f"(fp32 {want_fp32.detach().cpu()[tuple(i)].item()})"
        )


def compare_metrics(got: dict[str, float], want: dict[str, float], rtol: float = RTOL, atol: float = ATOL):
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        if math.isnan(w) or math.isnan(g):
            assert math.isnan(w) and math.isnan(g), f"metric {k}: got {g}, want {w}"
        elif k in COUNT_KEYS or k.endswith(COUNT_SUFFIXES):
            assert g == w, f"metric {k}: got {g}, want exactly {w}"
        elif math.isinf(w) or math.isinf(g):
            assert g == w, f"metric {k}: got {g}, want {w}"
        else:
            assert abs(g - w) <= atol + rtol * abs(w), f"metric {k}: got {g!r}, want {w!r}"


def check_backend(
    backend: str,
    batch: dict,
    layout: ek.HeadLayout,
    config: ek.PPOLossConfig | None = None,
    *,
    grad_seed: int | None = 0,
    check_grads: bool = True,
    leaf_fn=None,
    check_metrics: bool = True,
):
    """Assert ``backend`` equals the reference (float32 on upcast inputs) on ``batch``; returns both outputs."""
    config = config or ek.PPOLossConfig()
    out, grads = run(backend, batch, layout, config, grad_seed=grad_seed if check_grads else None, leaf_fn=leaf_fn)
    ref, ref_grads = run(
        "reference", batch, layout, config, upcast=True, grad_seed=grad_seed if check_grads else None, leaf_fn=leaf_fn
    )
    assert out.backend == backend
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        got = getattr(out, k)
        assert got.dtype == torch.float32 and got.dim() == 0, f"{k}: expected a 0-d float32 tensor"
        assert_close(k, got, getattr(ref, k))
    shape = out.joint_ratio.shape
    present = _present(batch, shape)
    for k in ("log_probs", "entropy"):
        got, want = getattr(out, k), getattr(ref, k)
        assert got.shape == want.shape and got.dtype == torch.float32, f"{k}: shape/dtype {got.shape} {got.dtype}"
        assert_close(k, got.detach().cpu()[present], want.detach().cpu()[present])
    assert_close("joint_ratio", out.joint_ratio.cpu()[present], ref.joint_ratio.cpu()[present])
    assert not out.joint_ratio.requires_grad
    if check_metrics:
        compare_metrics(out.metrics.to_dict(), ref.metrics.to_dict())
    if check_grads:
        leaves = _leaves(batch["logits"])
        for i, t in enumerate(leaves):
            assert_grad_close(f"grad logits{i}", grads[f"logits{i}"], ref_grads[f"logits{i}"], t.dtype)
            g = grads[f"logits{i}"]
            if g is not None:
                absent = ~present.reshape(tuple(present.shape) + (1,) * (g.dim() - present.dim()))
                assert (g.detach().cpu()[absent.expand_as(g.cpu())] == 0).all(), (
                    f"grad logits{i}: absent steps must get exactly 0"
                )
        if "values" in grads:
            assert_close("grad values", grads["values"], ref_grads["values"])
    return out, ref


def per_head(logits: torch.Tensor, layout: ek.HeadLayout, as_mapping: bool = False) -> Sequence | Mapping:
    """Split packed [..., S] logits/masks into per-head views (a sequence, or a mapping by head name)."""
    parts = list(torch.split(logits, list(layout.sizes), dim=-1))
    return dict(zip(layout.names, parts)) if as_mapping else parts


def check_output_grads_only(backend: str, batch: dict, layout: ek.HeadLayout) -> None:
    """Only ``log_probs`` and ``entropy`` reach the objective (the losses get no incoming gradient): the
    backend's logits gradient equals the reference's."""
    present = _present(batch, batch["weights"].shape)
    grads = []
    for name in (backend, "reference"):
        logits = batch["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(batch, logits=logits), layout=layout, backend=name, validate=False)
        keep = present.to(out.log_probs.device).unsqueeze(-1)
        torch.where(keep, out.log_probs * 0.3 + out.entropy, 0.0).sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=RTOL, atol=ATOL, equal_nan=True)


def leaf_batch(batch: dict) -> dict:
    """The batch with fresh leaf copies of its logits and values (requires_grad), the other tensors shared."""
    b = dict(batch)
    b["logits"] = batch["logits"].detach().clone().requires_grad_(True)
    if b.get("values") is not None:
        b["values"] = batch["values"].detach().clone().requires_grad_(True)
    return b


def grads_after(backend: str, batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig, backward):
    """``backward(out)`` after one call of ``backend``; returns (out, logits.grad, values.grad)."""
    b = leaf_batch(batch)
    out = ek.ppo_loss(**b, layout=layout, config=config, backend=backend, validate=False)
    backward(out)
    return out, b["logits"].grad, None if b.get("values") is None else b["values"].grad

"""The triton backend on a CUDA device: equal to the reference (docs/semantics.md section 7) at the standard cases'
sizes.

Cases: esper (N = 1,800, 8 heads) in fp32, bf16 and fp16; rl_64k (N = 65,536) in bf16 (many programs, two levels
of merge tickets) and bitwise determinism there; rl_1m in bf16; esper's per_head surrogate with floors, normalised
entropy, value clipping and advantage normalisation; per-head separate tensors; wide (N = 16,384, two heads of
1,024) in fp32; vocab (N = 8,192, one head of 32,768, the row read twice) in bf16; a batch of more than 2^31 logits
(N = 16,500, one head of 131,072, bf16: int64 offsets); actions out of range. The one-pass paths: the fix-up's
fast path, in-place rescale and recompute, two backward calls through one graph, accumulation into .grad, no
gradient written under no_grad, three launches per step, and the tickets on two streams. Skipped without CUDA
(conftest). Run alone:

    python -m pytest -q -m gpu tests/test_gpu_triton.py

Each distinct (layout, dtype, options, tile) compiles a kernel pair once (a few seconds each), so the case list
is kept to about ten compilations.
"""

from __future__ import annotations

import math

import pytest
import torch
from float64_arbiter import check_triton
from harness import assert_close, assert_grad_close, run
from triton_launches import Launches

import esper_kernels as ek
from esper_kernels.synthetic import STANDARD_CASES, make_batch

pytestmark = pytest.mark.gpu

ESPER = ek.HeadLayout(ek.ESPER_HEADS)
JOINT = ek.PPOLossConfig(entropy_coef=0.01)
PER_HEAD = ek.PPOLossConfig(
    surrogate="per_head",
    normalize_entropy=True,
    entropy_coef=0.05,
    clip_eps_high=0.28,
    prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.1},
    value_clip=0.2,
    entropy_coef_per_head={"op": 2.0, "tempo": 0.5},
)


@pytest.fixture(autouse=True)
def _triton_on_cuda():
    info = ek.available_backends()["triton"]
    if not info.available or "cuda" not in info.devices:
        pytest.skip(f"triton does not run on CUDA here: {'; '.join(info.reasons) or info.devices}")


def device_batch(
    n: int, layout: ek.HeadLayout, dtype: torch.dtype, seed: int = 0, masks: bool = True, values: bool = True
) -> dict:
    """A make_batch-like batch generated on the GPU (fast for wide heads): NaN garbage in absent steps."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    H, S = layout.num_heads, layout.total
    logits = torch.randn(n, S, generator=g, device=dev) * 2.0
    actions = torch.stack([torch.randint(0, a, (n,), generator=g, device=dev) for a in layout.sizes], -1)
    mask = None
    if masks:
        mask = torch.rand(n, S, generator=g, device=dev) < 0.7
        for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
            mask[:, off : off + a].scatter_(-1, actions[:, h : h + 1], True)
    with torch.no_grad():
        lp = []
        for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
            z = logits[:, off : off + a]
            if mask is not None:
                z = z.masked_fill(~mask[:, off : off + a], -1e4)
            lp.append(torch.log_softmax(z, -1).gather(-1, actions[:, h : h + 1]).squeeze(-1))
        old = torch.stack(lp, -1) + 0.1 * torch.randn(n, H, generator=g, device=dev)
    weights = (torch.rand(n, generator=g, device=dev) >= 0.1).float()
    absent = weights == 0
    logits[absent] = float("nan")
    old[absent] = float("nan")
    adv = torch.randn(n, generator=g, device=dev)
    adv[absent] = float("nan")
    out = dict(
        logits=logits.to(dtype),
        action_masks=mask,
        actions=actions,
        old_log_probs=old,
        advantages=adv,
        head_relevance=torch.rand(n, H, generator=g, device=dev) < 0.7,
        weights=weights,
    )
    if values:
        out["values"] = torch.randn(n, generator=g, device=dev)
        out["returns"] = out["values"] + torch.randn(n, generator=g, device=dev)
    return out


def test_rl_64k_bf16_and_deterministic():
    b = STANDARD_CASES["rl_64k"].make_batch(dtype=torch.bfloat16, device="cuda", seed=4)
    check_triton(b, ESPER, JOINT)
    (o1, g1), (o2, g2) = (run("triton", b, ESPER, JOINT, grad_seed=5) for _ in range(2))
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats, o2.metrics.stats)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_wide_fp32():
    case = STANDARD_CASES["wide"]
    check_triton(device_batch(case.n_rows, case.layout, torch.float32, seed=6), case.layout, JOINT)


def test_vocab_bf16_streaming():
    case = STANDARD_CASES["vocab"]
    check_triton(
        device_batch(case.n_rows, case.layout, torch.bfloat16, seed=7),
        case.layout,
        ek.PPOLossConfig(entropy_coef=0.01, normalize_entropy=True),
    )


def test_more_than_2_31_logits():
    """N x S = 16,500 x 131,072 > 2^31 bf16 logits (4.3 GB; the gradient as much again): per-step outputs and the
    gradient of rows past the 2^31st element equal the reference run on those rows alone (the incoming gradients
    are on log_probs and entropy only, so every row's gradient is its own)."""
    n, a = 16500, 131072
    assert n * a > 2**31
    layout = ek.HeadLayout({"token": a})
    g = torch.Generator(device="cuda").manual_seed(8)
    logits = torch.randn(n, a, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    actions = torch.randint(0, a, (n, 1), generator=g, device="cuda")
    old = -math.log(a) + 0.5 * torch.randn(n, 1, generator=g, device="cuda")
    adv = torch.randn(n, generator=g, device="cuda")
    g_lp = torch.randn(n, 1, generator=g, device="cuda")
    g_ent = torch.randn(n, 1, generator=g, device="cuda")
    out = ek.ppo_loss(logits, None, actions, old, adv, layout=layout, backend="triton", validate=False)
    torch.autograd.backward([out.log_probs, out.entropy], [g_lp, g_ent])
    assert math.isfinite(out.loss.item()) and out.metrics.to_dict()["steps"] == n
    rows = torch.cat([torch.arange(0, 16), torch.arange(n - 112, n)]).cuda()  # rows >= 16,384 start past 2^31
    sub = logits.detach()[rows].float().requires_grad_(True)
    ref = ek.ppo_loss(
        sub, None, actions[rows], old[rows], adv[rows], layout=layout, backend="reference", validate=False
    )
    torch.autograd.backward([ref.log_probs, ref.entropy], [g_lp[rows], g_ent[rows]])
    assert_close("log_probs", out.log_probs.detach()[rows], ref.log_probs.detach())
    assert_close("entropy", out.entropy.detach()[rows], ref.entropy.detach())
    assert_close("joint_ratio", out.joint_ratio[rows], ref.joint_ratio)
    assert_grad_close("grad logits", logits.grad[rows], sub.grad, torch.bfloat16)


def test_rl_1m_bf16():
    """8,192 programs: 128 merge groups (two ticket levels) at the benchmark's largest small-head case."""
    check_triton(
        make_batch((1 << 20,), ESPER, dtype=torch.bfloat16, device="cuda", seed=10), ESPER, JOINT, check_grads=False
    )


def _leaf(batch):
    b = dict(batch)
    b["logits"] = batch["logits"].detach().clone().requires_grad_(True)
    b["values"] = batch["values"].detach().clone().requires_grad_(True)
    return b


def _grads(backend, batch, config, backward):
    b = _leaf(batch)
    out = ek.ppo_loss(**b, layout=ESPER, config=config, backend=backend, validate=False)
    backward(out)
    return b["logits"].grad, b["values"].grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fix_up_infinite_upstream(dtype):
    """An infinite upstream on ``loss`` (recomputed): NaN at every valid action, exactly 0 at masked actions and
    absent steps, as the reference's pattern, at the device's scale (no floors: their exact zeros differ from the
    reference's float32 noise). The smaller cases on every backend: test_conformance."""
    batch = make_batch((12, 150), ESPER, dtype=dtype, device="cuda", seed=11)

    def backward(out):
        out.loss.backward(torch.tensor(math.inf, device="cuda"))

    got, _ = _grads("triton", batch, JOINT, backward)
    want, _ = _grads("reference", dict(batch, logits=batch["logits"].float()), JOINT, backward)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want.to(dtype)))
    assert torch.equal(got == 0, want == 0)


def test_launches_and_no_gradient_without_grad():
    """A step (forward, loss.backward(), metrics read) is three launches of the backend's kernels; under no_grad
    the forward writes no gradient."""
    b = _leaf(make_batch((12, 150), ESPER, device="cuda", seed=13))
    with Launches().recording() as rec:
        out = ek.ppo_loss(**b, layout=ESPER, config=JOINT, backend="triton", validate=False)
        out.loss.backward()
        out.metrics.to_dict()
    assert rec.names == ["_ppo_pre_kernel", "_ppo_main_kernel", "_ppo_main_kernel"]
    with Launches().recording() as rec, torch.no_grad():
        ek.ppo_loss(**b, layout=ESPER, config=JOINT, backend="triton", validate=False)
    (fwd,) = rec.main(fixup=False)
    assert not fwd["GRAD_ON"] and not fwd["VGRAD_ON"]


def test_tickets_on_two_streams():
    """Each stream has its own ticket buffer; calls on two streams (and back) give the same statistics."""
    batch = make_batch((4096,), ESPER, device="cuda", seed=14)
    want = ek.ppo_loss(**batch, layout=ESPER, config=JOINT, backend="triton", validate=False).metrics.stats
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ek.ppo_loss(**batch, layout=ESPER, config=JOINT, backend="triton", validate=False).metrics.stats
    torch.cuda.current_stream().wait_stream(side)
    again = ek.ppo_loss(**batch, layout=ESPER, config=JOINT, backend="triton", validate=False).metrics.stats
    assert torch.equal(got, want) and torch.equal(again, want)

"""Numerics of every path of the ``cpu`` backend (issue 11; docs/semantics.md sections 2-5).

The backend has several paths for the same math (csrc/cpu/): the AVX-512 small-head path (floored or not), the
auto-vectorised block path (CPUs without AVX-512), the row-by-row path (``vectorise=False``, and floored heads
without AVX-512), the AVX-512 wide path, and the row path for floored wide heads. Each test runs on each path it
concerns (``PATHS``: the environment variable ``ESPER_KERNELS_CPU_AVX512=0`` gives a CPU with AVX-512 the paths
of one without):

* log-probs, joint log-probs, entropies and gradients at a common logit offset of 50 and 1e4 against the float64
  reference (logp = (z - m) - log sum exp(z - m), never z - lse);
* invalid actions excluded (``mask_fill=None``): shift invariance at any scale, an excluded taken action has
  ell = -inf, an empty mask gives NaN / 0 / exactly-0 gradients and leaks nowhere, in both mask modes;
* a non-finite upstream gradient makes every valid action of its row NaN (masked ones and absent steps 0);
* an overflowed joint ratio (and infinite returns) give infinite, never NaN, moments, wherever they sit;
* 32 heads (fast_plan shifted by 32: undefined behaviour that ``make sanitize`` catches);
* advantage normalisation in the kernels' pre-pass: equal to the reference, no torch op, bitwise the same for
  1 and 2 threads at N = 100,000, and a forked child does not hang.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import pytest
import torch
from float64_arbiter import check_arbitrated
from harness import assert_close, assert_grad_close, check_backend, run

import esper_kernels as ek
from esper_kernels.schema import G
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.native

SMALL, WIDE = (3, 13, 5), (3, 300)
#: name: (head sizes, probability floor, vectorise, AVX-512 paths allowed)
PATHS = {
    "avx512_small": (SMALL, None, True, True),
    "avx512_small_floor": (SMALL, 0.05, True, True),
    "block": (SMALL, None, True, False),
    "row": (SMALL, None, False, True),
    "row_floor": (SMALL, 0.05, False, True),
    "avx512_wide": (WIDE, None, True, True),
    "row_wide": (WIDE, None, False, True),
    "row_wide_floor": (WIDE, 0.01, True, True),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def cpu_path(vectorise: bool, avx512: bool):
    from esper_kernels.backends import native

    backend = native.BACKENDS["cpu"]
    before = os.environ.get("ESPER_KERNELS_CPU_AVX512")
    backend.vectorise = vectorise
    if not avx512:
        os.environ["ESPER_KERNELS_CPU_AVX512"] = "0"
    try:
        yield
    finally:
        backend.vectorise = True
        if before is None:
            os.environ.pop("ESPER_KERNELS_CPU_AVX512", None)
        else:
            os.environ["ESPER_KERNELS_CPU_AVX512"] = before


def _path(name: str):
    sizes, floor, vectorise, avx512 = PATHS[name]
    layout = ek.HeadLayout({f"h{i}": a for i, a in enumerate(sizes)})
    return layout, floor, cpu_path(vectorise, avx512)


def _batch(
    n: int, layout: ek.HeadLayout, *, offset: float = 0.0, dtype=torch.float32, seed: int = 2, scale: float = 2.0
) -> dict:
    """Logits exact in float32 (multiples of 1/256) plus ``offset``; masks with the taken action valid."""
    g = torch.Generator().manual_seed(seed)
    S, H = layout.total, layout.num_heads
    z = (torch.round(torch.randn(n, S, generator=g) * scale * 256) / 256 + offset).to(dtype)
    masks = torch.rand(n, S, generator=g) < 0.7
    actions = torch.stack([torch.randint(0, a, (n,), generator=g) for a in layout.sizes], -1)
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        masks[:, off : off + a].scatter_(-1, actions[:, h : h + 1], True)
    return dict(
        logits=z,
        action_masks=masks,
        actions=actions,
        old_log_probs=-torch.rand(n, H, generator=g) * 2.0,
        advantages=torch.randn(n, generator=g),
        weights=(torch.rand(n, generator=g) > 0.1).float(),
    )


def _config(layout: ek.HeadLayout, floor: float | None, **kw) -> ek.PPOLossConfig:
    return ek.PPOLossConfig(prob_floor=None if floor is None else [floor] * layout.num_heads, **kw)


def _loss_and_grad(backend: str, batch: dict, layout, config, logits: torch.Tensor):
    z = logits.clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=config, backend=backend, validate=False)
    out.loss.backward()
    return out, z.grad


# -- log-probs from the shifted logits ------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [50.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", list(PATHS))
def test_accurate_at_a_large_logit_offset(path, dtype, offset):
    """Float32 log-probs, joint log-probs and entropies, and N x the gradient (fp32; 1 ulp for 16-bit logits),
    within rtol 1e-5, atol 1e-6 of the float64 reference when every logit carries the same large offset (with
    z - lse they were off by 2e-6 at +50 and 5e-4 at +1e4)."""
    layout, floor, ctx = _path(path)
    n = 4096 if layout.total < 100 else 1024
    batch = _batch(n, layout, offset=offset, dtype=dtype)
    config = _config(layout, floor, entropy_coef=0.1)
    want, want_grad = _loss_and_grad("reference", batch, layout, config, batch["logits"].double())
    with ctx:
        got, grad = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
    p = batch["weights"] > 0
    assert_close("log_probs", got.log_probs[p], want.log_probs[p])
    assert_close("joint log-prob", got.log_probs[p].sum(-1), want.log_probs[p].sum(-1))
    assert_close("entropy", got.entropy[p], want.entropy[p])
    if dtype == torch.float32:
        assert_close("N x grad", n * grad, n * want_grad)
    else:
        assert_grad_close("grad", grad, want_grad.float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", list(PATHS))
def test_huge_equal_logits(path, dtype):
    """Logits all equal to 1e8 (3e4 in fp16): log-prob -log(A) and entropy log(A) exactly as for 0 logits."""
    layout, floor, ctx = _path(path)
    big = 3e4 if dtype == torch.float16 else 1e8
    n = 5
    H = layout.num_heads
    batch = dict(
        logits=torch.full((n, layout.total), big).to(dtype),
        action_masks=None,
        actions=torch.zeros(n, H, dtype=torch.long),
        old_log_probs=torch.zeros(n, H),
        advantages=torch.zeros(n),
    )
    with ctx:
        out = ek.ppo_loss(**batch, layout=layout, config=_config(layout, floor), backend="cpu", validate=False)
    sizes = torch.tensor(layout.sizes, dtype=torch.float64)
    assert_close("log_probs", out.log_probs, (-torch.log(sizes)).expand(n, -1))
    assert_close("entropy", out.entropy, torch.log(sizes).expand(n, -1))


@pytest.mark.parametrize("mask_fill", [None, -1e4], ids=["exclude", "fill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_block_path_is_bitwise_the_row_path(dtype, mask_fill):
    """The auto-vectorised block path (a CPU without AVX-512) runs row_forward / row_backward's operations in the
    same order, rows in SIMD lanes: bitwise the row path's outputs and gradients."""
    layout = ek.HeadLayout({"a": 3, "b": 13, "c": 1, "d": 32, "e": 5})
    batch = _batch(300, layout, seed=12, dtype=dtype)
    config = ek.PPOLossConfig(entropy_coef=0.1, normalize_entropy=True, mask_fill=mask_fill)
    with cpu_path(True, False):
        block, gb = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
    with cpu_path(False, False):
        row, gr = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
    p = batch["weights"] > 0
    assert torch.equal(block.log_probs[p], row.log_probs[p]) and torch.equal(block.entropy[p], row.entropy[p])
    assert torch.equal(block.loss, row.loss) and torch.equal(block.metrics.stats, row.metrics.stats)
    assert torch.equal(gb, gr)


# -- invalid actions excluded -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", list(PATHS))
def test_exclusion_is_shift_invariant_far_below_the_fill(path, dtype):
    """With exclusion (mask_fill=None) the outputs and gradients of logits z - 2e4 are bitwise those of z (z - m
    is exact for these inputs); with esper's fill of -1e4 the masked actions take over (the old behaviour)."""
    layout, floor, ctx = _path(path)
    batch = _batch(512, layout, seed=4)
    low = batch["logits"] - 2e4  # exact in float32 (multiples of 1/256 below 2^15)
    if dtype != torch.float32:
        batch = dict(batch, logits=torch.round(batch["logits"] / 64) * 64)  # exact in bf16 both ways
        low = batch["logits"] - 16384.0
    batch = dict(batch, logits=batch["logits"].to(dtype))
    low = low.to(dtype)
    config = _config(layout, floor, entropy_coef=0.1)
    p = batch["weights"] > 0
    with ctx:
        a, ga = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
        b, gb = _loss_and_grad("cpu", batch, layout, config, low)
        filled = ek.ppo_loss(
            **dict(batch, logits=low),
            layout=layout,
            validate=False,
            backend="cpu",
            config=_config(layout, floor, mask_fill=-1e4),
        )
    assert torch.equal(a.log_probs[p], b.log_probs[p]) and torch.equal(a.entropy[p], b.entropy[p])
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    if dtype == torch.float32:  # (bf16 logits exact at this scale are too coarse to tell the fill apart)
        # (with a floor every valid action falls under it when the fill dominates: log-probs log f instead)
        assert (filled.log_probs[p] - a.log_probs[p]).abs().max() > (100 if floor is None else 1)


def _invalid_data_batch(layout: ek.HeadLayout, seed: int = 7) -> tuple[dict, dict]:
    """Present steps whose taken action is masked out, empty masks on irrelevant heads and at absent steps
    (NaN garbage there), and nothing else out of the ordinary; returns (batch, rows by kind)."""
    n, H = 48, layout.num_heads
    batch = _batch(n, layout, seed=seed)
    z, m, acts, w = batch["logits"], batch["action_masks"], batch["actions"], batch["weights"]
    rel = torch.ones(n, H, dtype=torch.bool)
    w[:12] = 1.0
    w[12:16] = 0.0
    rows = dict(masked_taken=[0, 1, 2], empty_irrelevant=[3, 4, 5], absent=[12, 13, 14, 15])
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        cols = slice(off, off + a)
        for r in rows["masked_taken"]:
            m[r, off + int(acts[r, h])] = False
        for r in rows["empty_irrelevant"] + rows["absent"]:
            m[r, cols] = False
            rel[r, h] = False
    z[12:16] = float("nan")
    batch["head_relevance"] = rel
    return batch, rows


@pytest.mark.parametrize("mask_fill", [None, -1e4], ids=["exclude", "fill"])
@pytest.mark.parametrize("path", list(PATHS))
def test_masked_taken_actions_and_empty_masks(path, mask_fill):
    """An excluded taken action has ell = -inf (a fill: finite), counted in invalid_action and nonfinite; a row
    without a valid action has ell = NaN, entropy 0 and an exactly 0 gradient in both mask modes; on irrelevant
    heads and absent steps it leaks into nothing (finite loss, finite gradients everywhere); all as the
    reference (metrics, counts and gradients included)."""
    layout, floor, ctx = _path(path)
    batch, rows = _invalid_data_batch(layout)
    config = _config(layout, floor, entropy_coef=0.1, mask_fill=mask_fill)
    with ctx:
        out, _ = check_arbitrated("cpu", batch, layout, config)
        _, grad = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
    ell = out.log_probs
    taken = ell[rows["masked_taken"]]
    if mask_fill is None:
        assert (taken == -math.inf).all(), taken
    else:
        assert torch.isfinite(taken).all(), taken
    empty = rows["empty_irrelevant"]
    assert torch.isnan(ell[empty]).all() and (out.entropy[empty] == 0).all()
    assert (grad[empty] == 0).all() and (grad[rows["absent"]] == 0).all()
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    m = out.metrics.to_dict()
    for h in layout.names:
        assert m[f"head_{h}_invalid_action"] == 6 and m[f"head_{h}_empty_mask"] == 3
        assert m[f"head_{h}_nonfinite"] == (6 if mask_fill is None else 3)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_relevant_empty_mask_makes_the_loss_nan(path):
    """On a present, relevant step an empty mask is an out-of-range action: NaN log-prob and loss (as the
    reference), and the row's own gradient is exactly 0."""
    layout, floor, ctx = _path(path)
    batch, rows = _invalid_data_batch(layout)
    r = rows["empty_irrelevant"][0]
    batch["head_relevance"][r, 1] = True
    config = _config(layout, floor, entropy_coef=0.1)
    with ctx:
        out, grad = _loss_and_grad("cpu", batch, layout, config, batch["logits"])
    ref = ek.ppo_loss(**batch, layout=layout, config=config, backend="reference", validate=False)
    assert math.isnan(out.loss.item()) and math.isnan(ref.loss.item())
    assert (grad[r] == 0).all()


# -- a non-finite upstream gradient -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_non_finite_upstream_gives_nan_at_every_valid_action(path):
    """NaN or inf reaching ell_ih or H_ih (a NaN loss through the joint ratio, or a non-finite gradient on the
    log_probs / entropy outputs): NaN at every valid action of that row, 0 at its masked actions and at absent
    steps; a non-finite gradient on the log-prob of an out-of-range action reaches nothing. Other rows equal the
    reference. (The floored closed form gave 0 under the floor.)"""
    layout, floor, ctx = _path(path)
    n, H = 40, layout.num_heads
    batch = _batch(n, layout, seed=8)
    batch["weights"][:6] = 1.0
    batch["actions"][5, 0] = 99  # out of range, relevant: the step's loss term, so its other heads' rows, NaN
    config = _config(layout, floor, entropy_coef=0.1, joint_log_ratio_clamp=None)
    g = torch.Generator().manual_seed(0)
    glp = torch.randn(n, H, generator=g)
    gent = torch.randn(n, H, generator=g)
    glp[1, 1] = math.nan
    gent[2, 0] = math.inf
    glp[5, 0] = math.nan  # the out-of-range action's log-prob: reaches nothing
    glp[batch["weights"] == 0, 0] = math.nan  # absent steps: nothing either
    grads = {}
    for backend in ("reference", "cpu"):
        with ctx if backend == "cpu" else contextlib.nullcontext():
            z = batch["logits"].clone().requires_grad_(True)
            out = ek.ppo_loss(**dict(batch, logits=z), layout=layout, config=config, backend=backend, validate=False)
            (grads[backend],) = torch.autograd.grad(
                [out.loss, out.log_probs, out.entropy], [z], [torch.ones(()), glp, gent]
            )
    got, want = grads["cpu"], grads["reference"]
    valid = batch["action_masks"]
    bad_rows = {(1, 1), (2, 0)} | {(5, h) for h in range(1, H)}
    for h, (off, a) in enumerate(zip(layout.offsets, layout.sizes)):
        for i in range(n):
            row, v = got[i, off : off + a], valid[i, off : off + a]
            if (i, h) in bad_rows:
                assert torch.isnan(row[v]).all(), (i, h, row)
                assert (row[~v] == 0).all(), (i, h, row)
            else:
                assert torch.isfinite(row).all(), (i, h, row)
    assert (got[batch["weights"] == 0] == 0).all()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert_close("finite gradients", got[fin], want[fin])


# -- infinite moments --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vectorise", [True, False])
@pytest.mark.parametrize("where", [0, 300, 999])
def test_overflowed_joint_ratio_and_infinite_returns(where, vectorise, threads):
    """N = 1,000 (8 chunks of 128): one joint ratio overflows to +inf (no joint clamp): ratio_mean, ratio_std,
    ratio_max read +inf wherever it sits (the chunk's shifted sum and the merge of partials gave inf - inf = NaN);
    a return of +inf makes the returns' mean +inf and M2 +inf, +inf and -inf together make both NaN."""
    layout = ek.HeadLayout({f"h{i}": 2 for i in range(6)})
    n = 1000
    old = torch.full((n, 6), -math.log(2.0))
    old[where] = -60.0  # lr clamps at +20 in every head: L = 120, r = inf
    v = torch.linspace(-1.0, 1.0, n)
    returns = v + 0.5
    returns[(where + 500) % n] = math.inf
    batch = dict(
        logits=torch.zeros(n, 12),
        action_masks=None,
        actions=torch.zeros(n, 6, dtype=torch.long),
        old_log_probs=old,
        advantages=torch.ones(n),
        values=v,
        returns=returns,
    )
    config = ek.PPOLossConfig(joint_log_ratio_clamp=None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_path(vectorise, True):
            out = ek.ppo_loss(**batch, layout=layout, config=config, backend="cpu", validate=False)
            returns2 = returns.clone()
            returns2[(where + 700) % n] = -math.inf
            out2 = ek.ppo_loss(
                **dict(batch, returns=returns2), layout=layout, config=config, backend="cpu", validate=False
            )
    finally:
        torch.set_num_threads(before)
    m = out.metrics.to_dict()
    assert m["ratio_max"] == math.inf and m["ratio_mean"] == math.inf and m["ratio_std"] == math.inf, m
    s, s2 = out.metrics.stats, out2.metrics.stats
    assert s[G.RETURN_MEAN] == math.inf and s[G.RETURN_M2] == math.inf
    assert math.isnan(s2[G.RETURN_MEAN]) and math.isnan(s2[G.RETURN_M2])
    ref = ek.ppo_loss(**batch, layout=layout, config=config, backend="reference", validate=False)
    for k in ("RATIO_MEAN", "RATIO_M2", "RETURN_MEAN", "RETURN_M2", "RESID_MEAN", "RESID_M2"):
        i = getattr(G, k)
        assert torch.equal(s[i].isnan(), ref.metrics.stats[i].isnan()) and (
            s[i] == ref.metrics.stats[i] or not torch.isfinite(ref.metrics.stats[i])
        ), k


# -- many heads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_heads", [15, 16, 32])
@pytest.mark.parametrize("surrogate", ["joint", "per_head"])
def test_up_to_32_heads(num_heads, surrogate):
    """The AVX-512 plan's column masks (1 << H, 2 << H) at the limits: H + 1 = 16 rows of columns, and 32 heads
    (a shift by 32, undefined behaviour that the sanitizer build reports)."""
    sizes = [2 + (h % 5) for h in range(num_heads)]
    layout = ek.HeadLayout({f"h{h}": a for h, a in enumerate(sizes)})
    batch = _batch(70, layout, seed=num_heads)
    check_backend("cpu", batch, layout, ek.PPOLossConfig(surrogate=surrogate, entropy_coef=0.1))


# -- advantage normalisation in the kernels -------------------------------------------------------------------
@pytest.mark.parametrize("std", ["population", "unbiased"])
@pytest.mark.parametrize("eps_add", [False, True])
@pytest.mark.parametrize("per_head_adv", [False, True])
@pytest.mark.parametrize("path", ["avx512_small", "row", "avx512_wide"])
def test_normalized_advantages_equal_the_reference(path, per_head_adv, eps_add, std):
    """The pre-pass's weighted mean and std over present steps (NaN advantages at absent steps never read), with
    the population or unbiased std and max(std, eps) or std + eps; the constant and one-step corners too."""
    layout, _, ctx = _path(path)
    n = 300
    batch = _batch(n, layout, seed=11)
    g = torch.Generator().manual_seed(3)
    batch["weights"] = torch.where(torch.rand(n, generator=g) < 0.3, torch.rand(n, generator=g) * 2, batch["weights"])
    surrogate = "per_head" if per_head_adv else "joint"
    if per_head_adv:
        batch["advantages"] = torch.randn(n, layout.num_heads, generator=g) * 3 + 1
    batch["advantages"][batch["weights"] == 0] = math.nan
    config = ek.PPOLossConfig(
        normalize_advantages=True,
        advantage_std=std,
        advantage_eps_add=eps_add,
        surrogate=surrogate,
        entropy_coef=0.1,
        advantage_eps=1e-3 if eps_add else 1e-8,
    )
    with ctx:
        check_backend("cpu", batch, layout, config)
        const = dict(batch, advantages=torch.where(batch["advantages"].isnan(), math.nan, 0.7))
        check_backend("cpu", const, layout, config)
        one = dict(batch, weights=torch.zeros(n))
        one["weights"][17] = 0.5
        check_backend("cpu", one, layout, config)


def test_the_cpu_backend_normalizes_without_torch_ops(monkeypatch):
    """normalize_advantages never reaches the torch normalisation for the cpu backend (its kernels' pre-pass
    does it; torch's reductions could hang in a forked child)."""
    from esper_kernels.backends import fused

    def refuse(*a, **k):
        raise AssertionError("the cpu backend normalised the advantages with torch ops")

    monkeypatch.setattr(fused, "normalize_advantages", refuse)
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((64,), layout, seed=1)
    out = ek.ppo_loss(
        **b, layout=layout, config=ek.PPOLossConfig(normalize_advantages=True), backend="cpu", validate=False
    )
    assert torch.isfinite(out.loss)


def _all_outputs(batch, layout, config, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run("cpu", batch, layout, config, grad_seed=1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("surrogate", ["joint", "per_head"])
def test_normalized_advantages_bitwise_for_any_thread_count(surrogate):
    """N = 100,000 with normalize_advantages: bitwise equal outputs, statistics and gradients with 1 and 2
    threads (torch's normalisation differed in the last bits)."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((100_000,), layout, seed=0)
    config = ek.PPOLossConfig(normalize_advantages=True, surrogate=surrogate)
    (o1, g1), (o2, g2) = (_all_outputs(b, layout, config, t) for t in (1, 2))
    for k in ("loss", "policy_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k), getattr(o2, k)), k
    assert torch.equal(o1.metrics.stats.nan_to_num(7.0), o2.metrics.stats.nan_to_num(7.0))
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork (Linux)")
def test_a_forked_child_does_not_hang_with_normalized_advantages():
    """A forked child (after the parent ran torch ops on 2 threads) computes ppo_loss with normalize_advantages
    at N = 40,000 and exits within a timeout (torch's reductions hung in libgomp there)."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((40_000,), layout, seed=1)
    config = ek.PPOLossConfig(normalize_advantages=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1 << 22)
        (x * 2).sum()
        torch.sort(x)
        ek.ppo_loss(**b, layout=layout, config=config, backend="cpu", validate=False)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                out = ek.ppo_loss(**b, layout=layout, config=config, backend="cpu", validate=False)
                out.loss.backward() if out.loss.requires_grad else None
                code = 0 if torch.isfinite(out.loss) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0, status
                return
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish ppo_loss within 60 s")
    finally:
        torch.set_num_threads(before)

"""The ``cuda`` backend's one-pass kernels (csrc/ppo_cuda.cu, csrc/ppo_onepass.h) on a GPU (gpu marker).

    python -m pytest -m gpu -q tests/test_gpu_cuda.py

The kernels' math, tiling, merges and the one-pass protocol run on the CPU in tests/test_cuda_onepass_host.py
(the same block bodies through a host execution policy). This tier checks what only a GPU runs: threads and
barriers, warp shuffles, the shared-memory tiles and 16-byte loads, the atomic ticket and the last block's merge
with many blocks, clusters and their distributed shared memory (vocab rows over 8 blocks), the device-side fix-up
decision, three launches a step, CUDA graphs, streams and dtypes; against the reference at the standard cases' sizes.
Skipped without a CUDA device (conftest).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from float64_arbiter import check_arbitrated
from harness import assert_close, per_head, run
from ref_cases import layout_of, random_batch

import esper_kernels as ek
from esper_kernels.backends import native
from esper_kernels.synthetic import STANDARD_CASES, make_batch

pytestmark = pytest.mark.gpu

ESPER = ek.HeadLayout(ek.ESPER_HEADS)
#: the standard benchmark cases (benchmarks/README.md) this tier runs
CASES = {name: STANDARD_CASES[name] for name in ("esper", "rl_64k", "wide", "vocab")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NM_SCALE = 3  # csrc/ppo_onepass.h: the fix-up's scale state in the normalisers


@pytest.fixture(autouse=True)
def _cuda_available():
    info = ek.available_backends()["cuda"]
    if not info.available:
        pytest.fail(f"cuda backend unavailable on a GPU machine: {info.reasons}")


@pytest.fixture
def states():
    """Every kernel_forward of the cuda backend, in order: the addresses of the gradient buffers fused.py's one-pass
    protocol passed (None: none; no reference kept, so autograd can take them as .grad) and the ``saved`` tensor
    (the normalisers, NM_SCALE the fix-up's scale state)."""
    backend = native.BACKENDS["cuda"]
    seen = []
    forward = backend.kernel_forward

    def spy(call, grads=None, grad_values=None):
        outs = forward(call, grads, grad_values)
        seen.append(
            SimpleNamespace(
                grads=None if grads is None else [g.data_ptr() for g in grads],
                gv=None if grad_values is None else grad_values.data_ptr(),
                norms=outs[5],
            )
        )
        return outs

    backend.kernel_forward = spy
    yield seen
    del backend.kernel_forward


def _batch(case: str, dtype: torch.dtype, seed: int = 0) -> tuple[dict, ek.HeadLayout]:
    shape, layout = CASES[case].batch_shape, CASES[case].layout
    if case == "vocab" and dtype != torch.float32:
        # the same 32,768-wide rows, a quarter of them: the harness compares on the host in float64, and
        # 268 M elements per dtype would take most of the GPU tier's time budget
        shape = (2048,)
    return make_batch(shape, layout, dtype=dtype, device="cuda", seed=seed), layout


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_spec_sizes_equal_reference(case, dtype):
    batch, layout = _batch(case, dtype)
    config = ek.PPOLossConfig(entropy_coef=0.01)
    if case in ("esper", "wide"):  # esper's own settings on two of the cases
        config = ek.PPOLossConfig(
            surrogate="per_head", normalize_entropy=True, entropy_coef=0.05, clip_eps_high=0.28, value_clip=0.2
        )
        batch["old_values"] = batch["values"] + 0.3 * torch.randn_like(batch["values"])
    check_arbitrated("cuda", batch, layout, config)


@pytest.mark.parametrize("case", ["rl_64k", "wide", "vocab"])
def test_deterministic(case):
    """Bitwise equal outputs, statistics and gradients on repeated calls (no float atomics; fixed merge order)."""
    batch, layout = _batch(case, torch.float32, seed=1)
    if case == "vocab":
        batch = {k: (v[:512] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
    config = ek.PPOLossConfig(entropy_coef=0.01, normalize_advantages=True)
    (o1, g1), (o2, g2) = (run("cuda", batch, layout, config, grad_seed=3) for _ in range(2))
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats.nan_to_num(7.0), o2.metrics.stats.nan_to_num(7.0))
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("max_blocks", [1, 3, 0])
def test_last_block_merge_with_many_blocks(max_blocks):
    """The same result through 1, 3 or every block (the partials merged by the last block to finish) and the
    reference; 65,536 rows are 1,024 tiles."""
    backend = native.BACKENDS["cuda"]
    batch, layout = _batch("rl_64k", torch.float32, seed=4)
    try:
        backend.max_blocks = max_blocks
        check_arbitrated("cuda", batch, layout, ek.PPOLossConfig(entropy_coef=0.02, normalize_advantages=True))
    finally:
        backend.max_blocks = 0


@pytest.mark.parametrize("floor", [None, 0.02])
def test_floor_wide_and_small_heads(floor):
    """Floors on a wide (cluster-per-row) head and on small heads, value clipping, per-head surrogate."""
    layout = ek.HeadLayout({"a": 3, "wide": 1000, "b": 33, "c": 5})
    batch = random_batch(
        list(layout.sizes),
        (300,),
        seed=11,
        mask_density=0.5,
        values=True,
        old_values=True,
        value_weights=True,
        logit_scale=3.0,
        messy=True,
    )
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    config = ek.PPOLossConfig(
        surrogate="per_head",
        normalize_entropy=True,
        entropy_coef=0.1,
        value_clip=0.5,
        prob_floor=None if floor is None else {"wide": floor, "a": 0.1, "b": 0.01},
    )
    check_arbitrated("cuda", batch, layout, config)
    check_arbitrated(
        "cuda",
        batch,
        layout,
        ek.PPOLossConfig(entropy_coef=0.1, normalize_advantages=True, prob_floor=[0.1, floor, None, 0.3]),
    )


@pytest.mark.parametrize(
    "sizes,n", [([9000], 64), ([40000], 16), ([16, 32, 8], 3000)], ids=["cluster_of_3", "streamed", "small_w32"]
)
def test_cluster_streamed_and_width_classes(sizes, n):
    """A row over a cluster of 3 blocks, a row too wide for shared memory (re-read through L2), the 32-wide
    small-head kernel."""
    layout = layout_of(sizes)
    batch = random_batch(sizes, (n,), seed=5, values=True, messy=True)
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    check_arbitrated("cuda", batch, layout, ek.PPOLossConfig(entropy_coef=0.05, prob_floor=[0.01] * len(sizes)))


def test_per_head_tensors_strides_and_int32():
    """Separate per-head bf16 tensors (a mapping), uint8 masks, int32 actions, strided old log-probs, rows with
    a padded stride; out-of-range actions at present steps."""
    sizes = [6, 3, 130, 4]
    layout = layout_of(sizes)
    b = random_batch(sizes, (257,), seed=5, weights="bool", values=True, messy=True, dtype=torch.bfloat16)
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    logits = {n: t.clone() for n, t in per_head(b["logits"], layout, as_mapping=True).items()}
    masks = [t.to(torch.uint8) for t in per_head(b["action_masks"], layout)]
    actions = [b["actions"][:, h].clamp(-(2**31), 2**31 - 1).to(torch.int32) for h in range(len(sizes))]
    old_cols = torch.randn(257, 2 * len(sizes), device="cuda")
    old_cols[:, ::2] = b["old_log_probs"]
    old = [old_cols[:, 2 * h] for h in range(len(sizes))]
    batch = dict(b, logits=logits, action_masks=masks, actions=actions, old_log_probs=old)
    check_arbitrated("cuda", batch, layout, ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.2))
    S = layout.total
    wide = torch.full((257, S + 5), float("nan"), device="cuda", dtype=torch.bfloat16)
    wide[:, 2 : 2 + S] = b["logits"]
    check_arbitrated("cuda", dict(b, logits=wide[:, 2 : 2 + S]), layout, ek.PPOLossConfig(entropy_coef=0.05))
    # small heads only, per-head tensors and padded rows: the small path's segment loads
    small = ek.HeadLayout({"p": 6, "q": 3, "r": 4})
    s = make_batch((1000,), small, device="cuda", seed=7)
    padded = torch.full((1000, 20), float("nan"), device="cuda")
    padded[:, 3:16] = s["logits"]
    check_arbitrated("cuda", dict(s, logits=padded[:, 3:16]), small, ek.PPOLossConfig(entropy_coef=0.05))
    check_arbitrated("cuda", dict(s, logits=per_head(s["logits"].clone(), small)), small)


def test_other_stream():
    """A call on a side stream equals the reference (empty and all-absent batches: test_conformance)."""
    s = torch.cuda.Stream()
    b = make_batch((300,), ESPER, device="cuda", seed=3)
    with torch.cuda.stream(s):
        check_arbitrated("cuda", b, ESPER, ek.PPOLossConfig(entropy_coef=0.1))
    torch.cuda.synchronize()


# -- the one-pass protocol on the device --------------------------------------------------------------------
CFG = ek.PPOLossConfig(entropy_coef=0.05)


def _leaf(n=3000, seed=4):
    b = make_batch((n,), ESPER, device="cuda", seed=seed)
    b["logits"] = b["logits"].clone().requires_grad_(True)
    b["values"] = b["values"].clone().requires_grad_(True)
    return b


def _ref_grads(b, scale=1.0):
    z = b["logits"].detach().clone().requires_grad_(True)
    v = b["values"].detach().clone().requires_grad_(True)
    out = ek.ppo_loss(**dict(b, logits=z, values=v), layout=ESPER, config=CFG, backend="reference", validate=False)
    (scale * out.loss).backward()
    return z.grad, v.grad


def test_fast_rescale_and_recompute_paths(states):
    # fast: the forward's buffer becomes .grad (no copy); the scale state stays 1
    b = _leaf()
    out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
    ptr = states[-1].grads[0]
    out.loss.backward()
    want, want_v = _ref_grads(b)
    assert_close("fast", b["logits"].grad, want)
    assert_close("fast values", b["values"].grad, want_v)
    assert b["logits"].grad.data_ptr() == ptr
    assert states[-1].norms[NM_SCALE].item() == 1.0
    # rescale: in place, by the device's decision
    b = _leaf()
    out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
    (0.25 * out.loss).backward()
    want, want_v = _ref_grads(b, 0.25)
    assert_close("rescale", b["logits"].grad, want)
    assert_close("rescale values", b["values"].grad, want_v)
    assert states[-1].norms[NM_SCALE].item() == 0.25
    # recompute: log_probs and value_loss carry gradients
    b = _leaf()
    grads = []
    for name in ("cuda", "reference"):
        z = b["logits"].detach().clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(b, logits=z), layout=ESPER, config=CFG, backend=name, validate=False)
        (out.loss + 0.3 * out.log_probs.nan_to_num().sum() - out.value_loss).backward()
        grads.append(z.grad)
    assert_close("recompute", grads[0], grads[1])
    assert math.isnan(states[-1].norms[NM_SCALE].item())


def test_no_grad_writes_no_gradient(states):
    b = make_batch((2000,), ESPER, device="cuda", seed=6)
    with torch.no_grad():
        z = b["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(b, logits=z), layout=ESPER, backend="cuda", validate=False)
    assert states[-1].grads is None and states[-1].gv is None
    ref = ek.ppo_loss(**b, layout=ESPER, backend="reference", validate=False)
    assert_close("loss", out.loss, ref.loss)


def test_three_launches_a_step():
    """pre-pass + forward, then the fix-up, and nothing else of ours (the metric table came from the forward).
    Besides them, torch's own: autograd's fill of the loss's upstream 1 and, since fused.py returns the four losses
    as one [4] tensor, select-backward's zero fill and copy into it (elementwise kernels, no host sync)."""
    from torch.profiler import ProfilerActivity, profile

    b = _leaf()
    ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False).loss.backward()  # warm-up
    b = _leaf(seed=5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = ek.ppo_loss(**b, layout=ESPER, config=CFG, backend="cuda", validate=False)
        out.loss.backward()
        out.metrics.tensors()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    ours = [
        n for n in names if any(k in n for k in ("prepass_kernel", "small_kernel", "wide_kernel", "metrics_kernel"))
    ]
    others = [n for n in names if n not in ours and "Memcpy" not in n and "Memset" not in n]
    assert len(ours) == 3, ours
    assert len(others) <= 3, others
    assert all("elementwise" in n or "fill" in n.lower() or "copy" in n.lower() for n in others), others


def test_cuda_graph_of_a_step_is_replayable():
    """A forward + backward captured once and replayed on new data equals eager calls (tickets reset by the
    pre-pass; scratch from the graph's pool)."""
    data = [make_batch((1800,), ESPER, device="cuda", seed=20 + k) for k in range(3)]
    static = {k: v.clone() for k, v in data[0].items()}
    z = static["logits"].clone().requires_grad_(True)

    def step():
        z.grad = None
        out = ek.ppo_loss(**dict(static, logits=z), layout=ESPER, config=CFG, backend="cuda", validate=False)
        out.loss.backward()
        return out.loss.detach(), out.metrics.stats

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, stats = step()
        grad = z.grad
    for d in data:
        for k, v in d.items():
            static[k].copy_(v)
        z.data.copy_(d["logits"])
        graph.replay()
        zz = d["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(d, logits=zz), layout=ESPER, config=CFG, backend="cuda", validate=False)
        out.loss.backward()
        torch.cuda.synchronize()
        assert_close("loss", loss, out.loss)
        assert_close("stats", stats, out.metrics.stats)
        assert_close("grad", grad, zz.grad)

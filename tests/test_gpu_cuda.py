"""The ``cuda`` backend (csrc/ppo_cuda.cu) on a GPU against the reference at the SPEC's sizes (gpu marker).

    python -m pytest -m gpu -q tests/test_gpu_cuda.py

The per-row math is csrc/ppo_core.h, shared with the cpu backend (tests/test_native.py checks it on many
hypothesis-drawn batches); this tier checks the CUDA kernels' tiling (small heads through shared-memory
tiles, wide heads a block per row), block reductions, the deterministic multi-block merge of the statistics,
the dtype handling and the stream/device plumbing. Skipped without a CUDA device (conftest).
"""

from __future__ import annotations

import pytest
import torch
from float64_arbiter import check_arbitrated
from harness import per_head, run
from hypothesis import HealthCheck, given, settings
from ref_cases import check_metric_table, layout_of, random_batch, stats_cases

import esper_kernels as ek
from esper_kernels.synthetic import SPEC_CASES, make_batch

pytestmark = pytest.mark.gpu

ESPER = ek.HeadLayout(ek.ESPER_HEADS)
#: the SPEC section 7 cases this tier runs
CASES = {name: SPEC_CASES[name] for name in ("esper", "rl_64k", "wide", "vocab")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _cuda_available():
    info = ek.available_backends()["cuda"]
    if not info.available:
        pytest.fail(f"cuda backend unavailable on a GPU machine: {info.reasons}")


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
        config = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05,
                                  clip_eps_high=0.28, value_clip=0.2)
        batch["old_values"] = batch["values"] + 0.3 * torch.randn_like(batch["values"])
    check_arbitrated("cuda", batch, layout, config)


@pytest.mark.parametrize("case", ["rl_64k", "wide"])
def test_deterministic(case):
    """Bitwise equal outputs, statistics and gradients on repeated calls (no float atomics)."""
    batch, layout = _batch(case, torch.float32, seed=1)
    config = ek.PPOLossConfig(entropy_coef=0.01)
    (o1, g1), (o2, g2) = (run("cuda", batch, layout, config, grad_seed=3) for _ in range(2))
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss", "log_probs", "entropy", "joint_ratio"):
        assert torch.equal(getattr(o1, k).nan_to_num(7.0), getattr(o2, k).nan_to_num(7.0)), k
    assert torch.equal(o1.metrics.stats.nan_to_num(7.0), o2.metrics.stats.nan_to_num(7.0))
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("floor", [None, 0.02])
def test_floor_wide_and_small_heads(floor):
    """Floors on a wide (block-per-row) head and on small (tiled) heads, value clipping, per-head surrogate."""
    layout = ek.HeadLayout({"a": 3, "wide": 1000, "b": 33, "c": 5})
    batch = random_batch(list(layout.sizes), (300,), seed=11, mask_density=0.5, values=True, old_values=True,
                         value_weights=True, logit_scale=3.0, messy=True)
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    config = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.1, value_clip=0.5,
                              prob_floor=None if floor is None else {"wide": floor, "a": 0.1, "b": 0.01})
    check_arbitrated("cuda", batch, layout, config)
    check_arbitrated("cuda", batch, layout, ek.PPOLossConfig(entropy_coef=0.1, normalize_advantages=True,
                                                          prob_floor=[0.1, floor, None, 0.3]))


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
    wide[:, 2:2 + S] = b["logits"]
    check_arbitrated("cuda", dict(b, logits=wide[:, 2:2 + S]), layout, ek.PPOLossConfig(entropy_coef=0.05))


def test_empty_and_all_absent_and_other_stream():
    b = make_batch((0,), ESPER, device="cuda", seed=1)
    out, _ = check_arbitrated("cuda", b, ESPER, check_grads=False)
    assert out.metrics.to_dict()["steps"] == 0
    b = make_batch((5,), ESPER, device="cuda", seed=2)
    b["weights"].zero_()
    check_arbitrated("cuda", b, ESPER, ek.PPOLossConfig(entropy_coef=0.1))
    s = torch.cuda.Stream()
    b = make_batch((300,), ESPER, device="cuda", seed=3)
    with torch.cuda.stream(s):
        check_arbitrated("cuda", b, ESPER, ek.PPOLossConfig(entropy_coef=0.1))
    torch.cuda.synchronize()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=stats_cases(max_heads=32))
def test_metric_table_kernel_equals_the_torch_derivation(case):
    """The one-thread metric-table kernel on the GPU: the table of ``esper_kernels.metrics``."""
    from esper_kernels.backends.native import BACKENDS

    check_metric_table(lambda s, cfg, hv: BACKENDS["cuda"].metric_table(s.cuda(), cfg, hv), case)

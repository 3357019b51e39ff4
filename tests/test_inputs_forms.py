"""docs/semantics.md section 1: every input form gives the same results and gradients, and per-head views are not
copied.

Packed [..., S] vs mapping vs sequence per-head logits/masks/actions/old log-probs/relevance; non-contiguous
rows; int32 actions; uint8 masks and relevance; bool weights; [B, T] batches; and (via prepare_inputs) that
per-head views of one buffer reach the backend as views of that buffer.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import per_head
from ref_cases import (
    layout_of,
    random_batch,
    single_thread,  # noqa: F401
)

import esper_kernels as ek
from esper_kernels.inputs import prepare_inputs

pytestmark = pytest.mark.reference

SIZES = [3, 1, 5, 4]
CONFIG = ek.PPOLossConfig(
    surrogate="per_head",
    entropy_coef=0.1,
    prob_floor=[0.05, None, 0.02, None],
    value_clip=0.2,
    normalize_advantages=True,
)


def _batch(shape=(3, 4), seed=0, **kw):
    return random_batch(SIZES, shape, seed, values=True, old_values=True, **kw)


def _split_last(t: torch.Tensor, layout, as_mapping: bool):
    """[..., H] -> per-head [...] tensors (views), as a mapping or a sequence."""
    parts = [t[..., h] for h in range(layout.num_heads)]
    return dict(zip(layout.names, parts)) if as_mapping else parts


def _run(batch: dict, layout, config=CONFIG, logits_leaves=None):
    """ppo_loss and the gradients of a fixed combination of outputs w.r.t. the given logits leaves and values."""
    b = dict(batch)
    v = b.pop("values").detach().clone().requires_grad_(True)
    out = ek.ppo_loss(**b, values=v, layout=layout, config=config, backend="reference", validate=False)
    g = torch.Generator().manual_seed(0)
    shape = out.log_probs.shape
    obj = (
        out.loss
        + (out.log_probs.nan_to_num(0.0) * torch.randn(shape, generator=g)).sum()
        + (out.entropy.nan_to_num(0.0) * torch.randn(shape, generator=g)).sum()
    )
    grads = torch.autograd.grad(obj, list(logits_leaves) + [v])
    return out, grads[:-1], grads[-1]


def _assert_equal_outputs(a, b):
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    for k in ("log_probs", "entropy", "joint_ratio"):
        ta, tb = getattr(a, k).detach(), getattr(b, k).detach()
        assert ta.shape == tb.shape, k
        assert torch.allclose(ta, tb, rtol=0, atol=0, equal_nan=True), k
    ma, mb = a.metrics.to_dict(), b.metrics.to_dict()
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == mb[k] or (math.isnan(ma[k]) and math.isnan(mb[k])), k


@pytest.mark.parametrize("form", ["mapping", "sequence"])
def test_per_head_forms_equal_packed(form):
    layout = layout_of(SIZES)
    batch = _batch()
    z = batch["logits"].clone().requires_grad_(True)
    packed, (gz,), gv = _run({**batch, "logits": z}, layout, logits_leaves=[z])

    as_map = form == "mapping"
    leaves = [t.detach().clone().requires_grad_(True) for t in per_head(batch["logits"], layout)]
    b = dict(batch)
    b["logits"] = dict(zip(layout.names, leaves)) if as_map else leaves
    b["action_masks"] = per_head(batch["action_masks"], layout, as_mapping=as_map)
    for k in ("actions", "old_log_probs", "head_relevance"):
        b[k] = _split_last(batch[k], layout, as_map)
    out, g_heads, gv2 = _run(b, layout, logits_leaves=leaves)
    _assert_equal_outputs(packed, out)
    assert torch.equal(torch.cat(g_heads, -1), gz)
    assert torch.equal(gv, gv2)


def test_per_head_views_of_a_packed_leaf_accumulate_into_it():
    layout = layout_of(SIZES)
    batch = _batch()
    z = batch["logits"].clone().requires_grad_(True)
    packed, (gz,), _ = _run({**batch, "logits": z}, layout, logits_leaves=[z])
    z2 = batch["logits"].clone().requires_grad_(True)
    out, (g2,), _ = _run({**batch, "logits": per_head(z2, layout)}, layout, logits_leaves=[z2])
    _assert_equal_outputs(packed, out)
    assert torch.equal(g2, gz)


def test_mixed_forms_in_one_call():
    """Packed logits with per-head actions, a mapping of masks and a sequence of relevance, all at once."""
    layout = layout_of(SIZES)
    batch = _batch()
    z = batch["logits"].clone().requires_grad_(True)
    packed, (gz,), _ = _run({**batch, "logits": z}, layout, logits_leaves=[z])
    b = dict(batch)
    b["action_masks"] = per_head(batch["action_masks"], layout, as_mapping=True)
    b["actions"] = _split_last(batch["actions"], layout, as_mapping=True)
    b["head_relevance"] = _split_last(batch["head_relevance"], layout, as_mapping=False)
    z2 = batch["logits"].clone().requires_grad_(True)
    out, (g2,), _ = _run({**b, "logits": z2}, layout, logits_leaves=[z2])
    _assert_equal_outputs(packed, out)
    assert torch.equal(g2, gz)


@pytest.mark.parametrize("kind", ["row_slice_of_wider_buffer", "strided_rows", "bxt_strided", "transposed"])
def test_non_contiguous_logits(kind):
    layout = layout_of(SIZES)
    S = sum(SIZES)
    batch = _batch()
    base = batch["logits"]  # [3, 4, S]
    if kind == "row_slice_of_wider_buffer":
        wide = torch.full((3, 4, S + 7), float("nan"))
        wide[..., 3 : 3 + S] = base
        leaf = wide.requires_grad_(True)
        view = lambda t: t[..., 3 : 3 + S]
    elif kind == "strided_rows":
        wide = torch.full((3, 8, S), float("nan"))
        wide[:, ::2] = base
        leaf = wide.requires_grad_(True)
        view = lambda t: t[:, ::2]
    elif kind == "bxt_strided":
        wide = torch.full((6, 4, S), float("nan"))
        wide[::2] = base
        leaf = wide.requires_grad_(True)
        view = lambda t: t[::2]
    else:
        wide = base.transpose(-1, -2).contiguous()  # [3, S, 4]
        leaf = wide.requires_grad_(True)
        view = lambda t: t.transpose(-1, -2)
    assert not view(leaf).is_contiguous()
    z = base.clone().requires_grad_(True)
    ref, (gz,), _ = _run({**batch, "logits": z}, layout, logits_leaves=[z])
    out, (gw,), _ = _run({**batch, "logits": view(leaf)}, layout, logits_leaves=[leaf])
    _assert_equal_outputs(ref, out)
    assert torch.equal(view(gw), gz)
    if kind != "transposed":
        untouched = torch.ones_like(gw, dtype=torch.bool)
        view(untouched).fill_(False)
        assert (gw[untouched] == 0).all()  # the rest of the buffer (NaN) gets exactly 0


def test_non_contiguous_per_head_views_of_a_wide_buffer():
    """One Linear per head writing into slices of one wide buffer with a row stride larger than S."""
    layout = layout_of(SIZES)
    batch = _batch()
    S = sum(SIZES)
    z = batch["logits"].clone().requires_grad_(True)
    ref, (gz,), _ = _run({**batch, "logits": z}, layout, logits_leaves=[z])
    wide = torch.full((3, 4, S + 10), float("nan"))
    wide[..., 10:] = batch["logits"]
    wide.requires_grad_(True)
    heads = per_head(wide[..., 10:], layout)
    out, (gw,), _ = _run({**batch, "logits": heads}, layout, logits_leaves=[wide])
    _assert_equal_outputs(ref, out)
    assert torch.equal(gw[..., 10:], gz) and (gw[..., :10] == 0).all()


def test_dtype_variants_int32_actions_uint8_masks_and_relevance_bool_weights():
    layout = layout_of(SIZES)
    batch = _batch(weights="bool")
    assert batch["weights"].dtype == torch.bool
    z = batch["logits"].clone().requires_grad_(True)
    ref, (gz,), _ = _run({**batch, "logits": z}, layout, logits_leaves=[z])
    b = dict(batch)
    b["actions"] = batch["actions"].to(torch.int32)
    b["action_masks"] = batch["action_masks"].to(torch.uint8)
    b["head_relevance"] = batch["head_relevance"].to(torch.uint8)
    b["weights"] = batch["weights"].float()
    z2 = batch["logits"].clone().requires_grad_(True)
    out, (g2,), _ = _run({**b, "logits": z2}, layout, logits_leaves=[z2])
    _assert_equal_outputs(ref, out)
    assert torch.equal(g2, gz)


def test_uint8_mask_values_other_than_one_mean_valid():
    layout = layout_of(SIZES)
    batch = _batch()
    b = dict(batch)
    b["action_masks"] = batch["action_masks"].to(torch.uint8) * 7
    a = ek.ppo_loss(**batch, layout=layout, config=CONFIG, backend="reference", validate=False)
    o = ek.ppo_loss(**b, layout=layout, config=CONFIG, backend="reference", validate=False)
    _assert_equal_outputs(a, o)


@pytest.mark.parametrize("shape", [(12,), (3, 4), (2, 3, 2)])
def test_batch_shapes_flatten_to_the_same_result(shape):
    layout = layout_of(SIZES)
    flat = _batch(shape=(12,))
    b = {k: (v.reshape(*shape, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in flat.items()}
    a = ek.ppo_loss(**flat, layout=layout, config=CONFIG, backend="reference", validate=False)
    o = ek.ppo_loss(**b, layout=layout, config=CONFIG, backend="reference", validate=False)
    assert o.log_probs.shape == (*shape, 4) and o.entropy.shape == (*shape, 4) and o.joint_ratio.shape == shape
    for k in ("loss", "policy_loss", "entropy_loss", "value_loss"):
        assert torch.equal(getattr(a, k), getattr(o, k)), k
    assert torch.allclose(a.log_probs, o.log_probs.reshape(12, 4), rtol=0, atol=0, equal_nan=True)
    assert a.metrics.to_dict().keys() == o.metrics.to_dict().keys()


# -- no copies ------------------------------------------------------------------------------------------------------
def _prepare(batch, layout, **kw):
    return prepare_inputs(
        layout,
        batch["logits"],
        batch["action_masks"],
        batch["actions"],
        batch["old_log_probs"],
        batch["advantages"],
        head_relevance=batch.get("head_relevance"),
        weights=batch.get("weights"),
        **kw,
    )


def _shares(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_packed_inputs_are_not_copied():
    layout = layout_of(SIZES)
    batch = _batch()
    inp = _prepare(batch, layout)
    assert inp.packed and inp.logits[0].data_ptr() == batch["logits"].data_ptr()
    assert inp.masks[0].data_ptr() == batch["action_masks"].data_ptr()
    for h in range(layout.num_heads):
        assert inp.head_logits(h).data_ptr() == batch["logits"].data_ptr() + layout.offsets[h] * 4
        assert inp.actions[h].data_ptr() == batch["actions"].data_ptr() + h * 8
        assert _shares(inp.old_log_probs[h], batch["old_log_probs"])
        assert _shares(inp.relevance[h], batch["head_relevance"])
    assert inp.weights.data_ptr() == batch["weights"].data_ptr()
    assert inp.advantages.data_ptr() == batch["advantages"].data_ptr()


def test_per_head_views_of_one_buffer_are_not_copied():
    layout = layout_of(SIZES)
    batch = _batch()
    wide = torch.randn(3, 4, sum(SIZES) + 5)
    buf = wide[..., 5:]  # non-contiguous rows: row stride S + 5
    heads = per_head(buf, layout)
    masks = per_head(batch["action_masks"], layout, as_mapping=True)
    inp = _prepare(
        {**batch, "logits": heads, "action_masks": masks, "actions": _split_last(batch["actions"], layout, False)},
        layout,
    )
    assert not inp.packed
    for h, (off, _a) in enumerate(zip(layout.offsets, layout.sizes)):
        t = inp.logits[h]
        assert t.data_ptr() == wide.data_ptr() + (5 + off) * 4, f"head {h} logits were copied"
        assert t.stride() == (sum(SIZES) + 5, 1)
        assert inp.masks[h].data_ptr() == batch["action_masks"].data_ptr() + off
        assert inp.actions[h].data_ptr() == batch["actions"].data_ptr() + h * 8
        assert torch.equal(inp.head_logits(h), buf.reshape(12, -1)[:, off : off + _a])


def test_views_whose_batch_cannot_flatten_are_copied_correctly():
    """[B, T] rows strided in B and T by different amounts cannot be one [N, S] view: a copy, same values."""
    layout = layout_of(SIZES)
    batch = _batch()
    wide = torch.randn(3, 8, sum(SIZES))
    inp = _prepare({**batch, "logits": wide[:, ::2]}, layout)
    assert torch.equal(inp.logits[0], wide[:, ::2].reshape(12, -1))

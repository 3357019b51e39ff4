"""docs/semantics.md sections 4 and 5: PPOMetrics keeps sufficient statistics, so the metrics of parts of a batch
merge into the metrics of the
whole batch (stats.merge: sums, minima, maxima, Chan's weighted moments); to_dict() / tensors() / head() shapes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from harness import compare_metrics
from hypothesis import given, settings
from ref_cases import (
    check_metric_table,
    layout_of,
    random_batch,
    single_thread,  # noqa: F401
    stats_cases,
)

import esper_kernels as ek
from esper_kernels.stats import empty_stats, merge, stats_size

pytestmark = pytest.mark.reference

SIZES = [3, 1, 6, 4]
# normalize_advantages is left out: it normalises per call, so two halves normalise differently than the whole
CONFIGS = {
    "joint": ek.PPOLossConfig(entropy_coef=0.1, value_clip=0.2, clip_eps_high=0.28),
    "per_head": ek.PPOLossConfig(
        surrogate="per_head",
        entropy_coef=0.05,
        normalize_entropy=True,
        prob_floor=[0.05, None, 0.02, None],
        value_clip=0.5,
    ),
}


def _metrics(batch, layout, config):
    return ek.ppo_loss(**batch, layout=layout, config=config, backend="reference", validate=False).metrics


def _rows(batch: dict, sl) -> dict:
    return {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("cuts", [(4,), (1,), (3, 3, 9), (0, 6)], ids=["4+9", "1+12", "3+0+6+4", "0+6+7"])
def test_merge_of_parts_equals_the_whole(config_name, cuts):
    config = CONFIGS[config_name]
    layout = layout_of(SIZES)
    batch = random_batch(
        SIZES,
        (13,),
        seed=2,
        weights="float",
        values=True,
        old_values=True,
        value_weights=True,
        per_head_adv=config.surrogate == "per_head",
        old_noise=0.4,
    )
    whole = _metrics(batch, layout, config)
    bounds = (0, *cuts, 13)
    parts = [_metrics(_rows(batch, slice(a, b)), layout, config) for a, b in itertools.pairwise(bounds)]
    merged = ek.PPOMetrics.merge(parts)
    compare_metrics(merged.to_dict(), whole.to_dict())
    m = whole.to_dict()
    assert 0 < m["clip_fraction"] < 1 and math.isfinite(m["explained_variance"]) and m["steps"] > 3


def test_merge_of_bxt_halves():
    config = CONFIGS["joint"]
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (5, 6), seed=9, weights="float", values=True, old_values=True)
    whole = _metrics(batch, layout, config)
    merged = ek.PPOMetrics.merge(
        [_metrics(_rows(batch, slice(0, 2)), layout, config), _metrics(_rows(batch, slice(2, 5)), layout, config)]
    )
    compare_metrics(merged.to_dict(), whole.to_dict())


def test_merge_is_order_independent_and_merging_an_empty_part_changes_nothing():
    config = CONFIGS["per_head"]
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (10,), seed=4, weights="float", values=True, old_values=True, per_head_adv=True)
    a = _metrics(_rows(batch, slice(0, 3)), layout, config)
    b = _metrics(_rows(batch, slice(3, 10)), layout, config)
    compare_metrics(ek.PPOMetrics.merge([a, b]).to_dict(), ek.PPOMetrics.merge([b, a]).to_dict())
    empty = _metrics(_rows(batch, slice(0, 0)), layout, config)
    assert torch.equal(empty.stats, empty_stats(len(SIZES)))  # the statistics of no step
    compare_metrics(ek.PPOMetrics.merge([empty, a, empty]).to_dict(), a.to_dict(), rtol=0, atol=0)


def test_stats_merge_kinds():
    """merge() directly: sums add, minima/maxima reduce, weighted moments combine (Chan)."""
    from esper_kernels.stats import GLOBAL_SIZE, HD, HEAD_SIZE, G

    H = 1
    a, b = empty_stats(H).clone(), empty_stats(H).clone()
    # ratio moments: part a = {1, 3} with weights {1, 1}; part b = {5} with weight 2
    a[G.WEIGHT], a[G.RATIO_MEAN], a[G.RATIO_M2], a[G.STEPS] = 2.0, 2.0, 2.0, 2
    b[G.WEIGHT], b[G.RATIO_MEAN], b[G.RATIO_M2], b[G.STEPS] = 2.0, 5.0, 0.0, 1
    a[G.RATIO_MIN], a[G.RATIO_MAX], b[G.RATIO_MIN], b[G.RATIO_MAX] = 1.0, 3.0, 5.0, 5.0
    a[GLOBAL_SIZE + HD.VALID_MIN], b[GLOBAL_SIZE + HD.VALID_MIN] = 2.0, 1.0
    a[GLOBAL_SIZE + HD.LOGP_MAX] = -0.5
    m = merge(torch.stack([a, b]))
    assert m.shape == (stats_size(H),) and m.dtype == torch.float32 and HEAD_SIZE == len(m) - GLOBAL_SIZE
    assert m[G.STEPS] == 3 and m[G.WEIGHT] == 4
    # {1, 3, 5, 5} equally weighted: mean 3.5, M2 = 6.25 + 0.25 + 2.25 + 2.25 = 11
    assert m[G.RATIO_MEAN] == 3.5 and m[G.RATIO_M2] == 11.0
    assert m[G.RATIO_MIN] == 1.0 and m[G.RATIO_MAX] == 5.0
    assert m[GLOBAL_SIZE + HD.VALID_MIN] == 1.0 and m[GLOBAL_SIZE + HD.LOGP_MAX] == -0.5
    assert m[GLOBAL_SIZE + HD.LOGP_MIN] == math.inf  # nothing measured: stays +inf (metrics turn it into NaN)
    # equal means merge exactly (a constant keeps M2 = 0)
    c = empty_stats(H).clone()
    c[G.WEIGHT], c[G.RATIO_MEAN] = 0.3, 0.7
    d = c.clone()
    d[G.WEIGHT] = 1.9
    e = merge(torch.stack([c, d, c]))
    assert e[G.RATIO_M2] == 0.0 and e[G.RATIO_MEAN] == pytest.approx(0.7, abs=0)
    with pytest.raises(ValueError, match="merge: expected"):
        merge(a)


def test_merge_rejects_parts_of_another_layout_or_config():
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (4,), seed=1)
    a = _metrics(batch, layout, CONFIGS["joint"])
    with pytest.raises(ValueError, match="share the layout and the config"):
        ek.PPOMetrics.merge([a, _metrics(batch, layout, CONFIGS["per_head"])])
    other = layout_of([3, 1, 6, 4][::-1])
    with pytest.raises(ValueError, match="share the layout and the config"):
        ek.PPOMetrics.merge([a, _metrics(random_batch([4, 6, 1, 3], (4,), seed=1), other, CONFIGS["joint"])])
    with pytest.raises(ValueError, match="at least one"):
        ek.PPOMetrics.merge([])


def test_merged_metrics_detect_a_wrong_merge():
    """The comparison is not a tautology: the metrics of one part differ from the whole."""
    layout = layout_of(SIZES)
    batch = random_batch(SIZES, (13,), seed=2, weights="float", values=True, old_values=True)
    whole = _metrics(batch, layout, CONFIGS["joint"])
    part = _metrics(_rows(batch, slice(0, 7)), layout, CONFIGS["joint"])
    with pytest.raises(AssertionError):
        compare_metrics(ek.PPOMetrics.merge([part, part]).to_dict(), whole.to_dict())


# -- the dict / tensor views ------------------------------------------------------------------------------------
def test_to_dict_keys_and_values():
    layout = ek.HeadLayout({"slot": 3, "op": 6})
    batch = random_batch([3, 6], (5,), seed=0)
    metrics = _metrics(batch, layout, ek.PPOLossConfig())
    d = metrics.to_dict()
    expected = list(ek.GLOBAL_METRICS) + [f"head_{n}_{m}" for m in ek.HEAD_METRICS for n in layout.names]
    assert sorted(d) == sorted(expected) and len(d) == len(expected)
    assert list(d)[: len(ek.GLOBAL_METRICS)] == list(ek.GLOBAL_METRICS)
    assert all(type(v) is float for v in d.values())
    # every metric of docs/semantics.md section 5 is there
    for k in (
        "policy_loss",
        "entropy_loss",
        "value_loss",
        "loss",
        "approx_kl",
        "joint_kl_k3",
        "joint_kl_k1",
        "clip_fraction",
        "clip_fraction_positive",
        "clip_fraction_negative",
        "ratio_mean",
        "ratio_std",
        "ratio_min",
        "ratio_max",
        "log_prob_min",
        "log_prob_max",
        "steps",
        "weight_sum",
        "all_finite",
        "explained_variance",
        "value_clip_fraction",
    ):
        assert k in ek.GLOBAL_METRICS, k
    for k in (
        "entropy",
        "kl",
        "clip_fraction",
        "ratio_max",
        "nonfinite",
        "empty_mask",
        "invalid_action",
        "valid_actions_min",
        "valid_actions_max",
        "valid_actions_mean",
        "single_action_fraction",
        "relevance_fraction",
        "learnable_fraction",
    ):
        assert k in ek.HEAD_METRICS, k
    h = metrics.head("op")
    assert sorted(h) == sorted(ek.HEAD_METRICS) and all(h[k] == d[f"head_op_{k}"] or h[k] != h[k] for k in h)
    with pytest.raises(KeyError, match="unknown head 'nope'"):
        metrics.head("nope")


def test_tensors_are_0d_device_tensors_equal_to_to_dict():
    layout = ek.HeadLayout({"slot": 3, "op": 6})
    metrics = _metrics(random_batch([3, 6], (5,), seed=0), layout, ek.PPOLossConfig())
    t = metrics.tensors()
    d = metrics.to_dict()
    assert t.keys() == d.keys()
    for k, v in t.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.device == metrics.stats.device, k
        assert v.item() == d[k] or (math.isnan(d[k]) and math.isnan(v.item())), k
    assert metrics["clip_fraction"].dim() == 0
    with pytest.raises(KeyError, match="unknown metric"):
        metrics["nope"]


def test_to_dict_syncs_once(monkeypatch):
    """to_dict derives every metric on the device and moves them with a single tolist()."""
    layout = ek.HeadLayout({"slot": 3, "op": 6})
    metrics = _metrics(random_batch([3, 6], (5,), seed=0), layout, ek.PPOLossConfig())
    calls = {"tolist": 0, "item": 0}
    orig_tolist, orig_item = torch.Tensor.tolist, torch.Tensor.item

    def tolist(self):
        calls["tolist"] += 1
        return orig_tolist(self)

    def item(self):
        calls["item"] += 1
        return orig_item(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    metrics.to_dict()
    assert calls == {"tolist": 1, "item": 0}


@settings(deadline=None)
@given(case=stats_cases())
def test_numpy_and_torch_derivations_agree(case):
    """CPU statistics derive on the host (numpy), device statistics with torch ops: the same table, the same
    numbers, on random statistics sprinkled with zeros, negatives, infinities and NaN."""
    import numpy as np

    from esper_kernels.metrics import _derive_table, _NumpyOps

    def numpy_table(s, cfg, has_values):
        with np.errstate(all="ignore"):
            return torch.from_numpy(
                _derive_table(s.numpy(), len(cfg.entropy_coef_per_head), cfg, has_values, xp=_NumpyOps)
            )

    check_metric_table(numpy_table, case)

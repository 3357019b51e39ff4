"""docs/usage.md and docs/semantics.md: every validation error and its message.

* shape, dtype and device errors name the argument and the expected shape, and are raised before any backend
  runs (whatever ``validate`` says);
* ``validate=True`` data errors raise ValueError naming the head (or the weights), the problem and the number
  of steps; ``validate=False`` counts them in the metrics instead;
* PPOLossConfig rejects bad values at construction; unknown and unavailable backends raise with the reasons.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from ref_cases import single_thread  # noqa: F401

import esper_kernels as ek
from esper_kernels.backends.reference_backend import ReferenceBackend

pytestmark = pytest.mark.reference

LAYOUT = ek.HeadLayout({"a": 2, "b": 3})  # S = 5, H = 2
N = 4


def _batch(shape=(N,), **over) -> dict:
    g = torch.Generator().manual_seed(0)
    b = dict(
        logits=torch.randn(*shape, 5, generator=g),
        action_masks=torch.ones(*shape, 5, dtype=torch.bool),
        actions=torch.zeros(*shape, 2, dtype=torch.long),
        old_log_probs=torch.full((*shape, 2), -0.7),
        advantages=torch.randn(*shape, generator=g),
    )
    b.update(over)
    return b


def _call(batch, config=None, validate=True, backend="reference", layout=LAYOUT):
    return ek.ppo_loss(**batch, layout=layout, config=config, backend=backend, validate=validate)


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if a backend's forward runs: input errors must be raised before any computing."""

    def forbidden(self, inputs, cfg):
        raise AssertionError("the backend ran before the input error was raised")

    monkeypatch.setattr(ReferenceBackend, "forward", forbidden)


# -- shape / dtype / device -----------------------------------------------------------------------------------
SHAPE_ERRORS = [
    # (overrides, exception, message regex)
    (dict(logits=torch.zeros(N, 6)), ValueError, r"logits: expected shape \[4, 5\] \(\*batch, S = 5\), got \[4, 6\]"),
    (dict(logits=torch.zeros(5)), ValueError, r"logits: expected shape \[\*batch, 5\] \(S = sum of head sizes\)"),
    (
        dict(logits=torch.zeros(N, 5, dtype=torch.int64)),
        TypeError,
        r"logits: expected dtype float32, bfloat16, float16, float64, got int64",
    ),
    (
        dict(logits={"a": torch.zeros(N, 2), "b": torch.zeros(N, 2)}),
        ValueError,
        r"logits\['b'\]: expected shape \[4, 3\] \(\*batch, A_h\), got \[4, 2\]",
    ),
    (
        dict(logits={"a": torch.zeros(N, 2)}),
        ValueError,
        r"logits: expected one entry per head \['a', 'b'\]; missing \['b'\], unknown \[\]",
    ),
    (
        dict(logits={"a": torch.zeros(N, 2), "b": torch.zeros(N, 3), "c": torch.zeros(N, 1)}),
        ValueError,
        r"logits: expected one entry per head \['a', 'b'\]; missing \[\], unknown \['c'\]",
    ),
    (
        dict(logits=[torch.zeros(N, 2), torch.zeros(N, 3), torch.zeros(N, 1)]),
        ValueError,
        r"logits: expected 2 per-head tensors \(layout order \['a', 'b'\]\), got 3",
    ),
    (dict(logits="zeros"), TypeError, r"logits: expected a torch.Tensor \[\*batch, 5\] or per-head tensors"),
    (
        dict(action_masks=torch.ones(N, 4, dtype=torch.bool)),
        ValueError,
        r"action_masks: expected shape \[4, 5\] \(like logits\), got \[4, 4\]",
    ),
    (dict(action_masks=torch.ones(N, 5)), TypeError, r"action_masks: expected dtype bool, uint8, got float32"),
    (
        dict(action_masks={"a": torch.ones(N, 2, dtype=torch.bool)}),
        ValueError,
        r"action_masks: expected one entry per head \['a', 'b'\]; missing \['b'\]",
    ),
    (
        dict(actions=torch.zeros(N, dtype=torch.long)),
        ValueError,
        r"actions: expected shape \[4, 2\] \(\*batch, H = 2\), got \[4\]",
    ),
    (dict(actions=torch.zeros(N, 2)), TypeError, r"actions: expected dtype int64, int32, got float32"),
    (
        dict(actions=[torch.zeros(N, dtype=torch.long)]),
        ValueError,
        r"actions: expected 2 per-head tensors \(layout order \['a', 'b'\]\), got 1",
    ),
    (
        dict(actions={"a": torch.zeros(N, dtype=torch.long), "b": torch.zeros(N + 1, dtype=torch.long)}),
        ValueError,
        r"actions\['b'\]: expected shape \[4\] \(\*batch, H = 2\), got \[5\]",
    ),
    (
        dict(old_log_probs=torch.zeros(N, 3)),
        ValueError,
        r"old_log_probs: expected shape \[4, 2\] \(\*batch, H = 2\), got \[4, 3\]",
    ),
    (dict(old_log_probs=torch.zeros(N, 2, dtype=torch.long)), TypeError, r"old_log_probs: expected dtype float32"),
    (
        dict(advantages=torch.zeros(N, 1)),
        ValueError,
        r"advantages: expected shape \[4\] \(\*batch; per-head "
        r"advantages \[\*batch, H\] need surrogate='per_head'\), got \[4, 1\]",
    ),
    (dict(advantages=torch.zeros(N, 2)), ValueError, r"per-head advantages \[\*batch, H\] need surrogate='per_head'"),
    (dict(advantages=[0.0] * N), TypeError, r"advantages: expected a torch.Tensor of shape \[4\], got list"),
    (dict(advantages=torch.zeros(N, dtype=torch.long)), TypeError, r"advantages: expected dtype float32"),
    (
        dict(head_relevance=torch.ones(N, 3, dtype=torch.bool)),
        ValueError,
        r"head_relevance: expected shape \[4, 2\] \(\*batch, H = 2\), got \[4, 3\]",
    ),
    (dict(head_relevance=torch.ones(N, 2)), TypeError, r"head_relevance: expected dtype bool, uint8, got float32"),
    (
        dict(head_relevance={"a": torch.ones(N, dtype=torch.bool), "x": torch.ones(N, dtype=torch.bool)}),
        ValueError,
        r"head_relevance: expected one entry per head \['a', 'b'\]; missing \['b'\], unknown \['x'\]",
    ),
    (dict(weights=torch.ones(N + 1)), ValueError, r"weights: expected shape \[4\] \(\*batch\), got \[5\]"),
    (dict(weights=torch.ones(N, dtype=torch.long)), TypeError, r"weights: expected dtype .*bool, got int64"),
    (dict(values=torch.zeros(N)), ValueError, r"values, returns: expected both or neither, got values only"),
    (dict(returns=torch.zeros(N)), ValueError, r"values, returns: expected both or neither, got returns only"),
    (
        dict(values=torch.zeros(N), returns=torch.zeros(N + 2)),
        ValueError,
        r"returns: expected shape \[4\] \(\*batch\), got \[6\]",
    ),
    (dict(old_values=torch.zeros(N)), ValueError, r"old_values, value_weights: given without values and returns"),
    (dict(value_weights=torch.ones(N)), ValueError, r"old_values, value_weights: given without values and returns"),
    (
        dict(values=torch.zeros(N), returns=torch.zeros(N), value_weights=torch.ones(N, 1)),
        ValueError,
        r"value_weights: expected shape \[4\] \(\*batch\), got \[4, 1\]",
    ),
    (
        dict(actions=torch.zeros(N, 2, dtype=torch.long, device="meta")),
        ValueError,
        r"actions: expected a tensor on cpu \(the logits' device\), got meta",
    ),
    (
        dict(weights=torch.ones(N, device="meta")),
        ValueError,
        r"weights: expected a tensor on cpu \(the logits' device\), got meta",
    ),
]


@pytest.mark.parametrize("over,exc,message", SHAPE_ERRORS, ids=[f"{i}" for i in range(len(SHAPE_ERRORS))])
@pytest.mark.parametrize("validate", [True, False])
def test_input_errors_name_the_argument_and_shape(no_compute, over, exc, message, validate):
    with pytest.raises(exc, match=message):
        _call(_batch(**over), validate=validate)


def test_batch_dims_must_agree(no_compute):
    b = _batch(shape=(2, 3))
    b["weights"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"weights: expected shape \[2, 3\] \(\*batch\), got \[2\]"):
        _call(b)
    b = _batch(shape=(2, 3))
    b["actions"] = torch.zeros(3, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 3, 2\] \(\*batch, H = 2\), got \[3, 2, 2\]"):
        _call(b)


def test_per_head_advantages_are_accepted_with_the_per_head_surrogate():
    out = _call(_batch(advantages=torch.zeros(N, 2)), config=ek.PPOLossConfig(surrogate="per_head"))
    assert math.isfinite(out.loss.item())


def test_value_clip_needs_old_values(no_compute):
    with pytest.raises(
        ValueError,
        match=r"old_values: config.value_clip is set, so old_values \[\*batch\] are "
        r"required",
    ):
        _call(_batch(values=torch.zeros(N), returns=torch.zeros(N)), config=ek.PPOLossConfig(value_clip=0.2))


def test_per_head_config_must_fit_the_layout(no_compute):
    with pytest.raises(
        ValueError,
        match=r"PPOLossConfig.entropy_coef_per_head: expected 2 values \(one per head, "
        r"in layout order \['a', 'b'\]\), got 3",
    ):
        _call(_batch(), config=ek.PPOLossConfig(entropy_coef_per_head=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"PPOLossConfig.prob_floor: unknown head\(s\) \['c'\]"):
        _call(_batch(), config=ek.PPOLossConfig(prob_floor={"c": 0.1}))
    with pytest.raises(ValueError, match=r"entropy_coef_per_head: expected 2 values"):
        ek.FactoredPPOLoss(LAYOUT, ek.PPOLossConfig(entropy_coef_per_head=[1.0]))


def test_layout_and_config_types(no_compute):
    with pytest.raises(TypeError, match=r"layout: expected an esper_kernels.HeadLayout, got dict"):
        ek.ppo_loss(**_batch(), layout={"a": 2, "b": 3}, backend="reference")
    with pytest.raises(TypeError, match=r"config: expected an esper_kernels.PPOLossConfig, got dict"):
        _call(_batch(), config={"clip_eps": 0.2})


# -- data errors ----------------------------------------------------------------------------------------------
def _with_action(value, dtype=torch.long, steps=(1,)):
    b = _batch()
    acts = b["actions"].to(dtype).clone()
    for i in steps:
        acts[i, 1] = value
    b["actions"] = acts
    return b


@pytest.mark.parametrize("value", [3, 4, -1, 10**9, -(10**9), 2**62])
def test_action_out_of_range(value):
    b = _with_action(value, steps=(1, 2))
    with pytest.raises(ValueError, match=r"head 'b': action out of range \[0, 3\) or masked out at 2 present step"):
        _call(b)
    out = _call(b, validate=False)
    assert torch.isnan(out.log_probs[1, 1]) and torch.isnan(out.log_probs[2, 1])
    assert torch.isfinite(out.log_probs[0]).all() and torch.isfinite(out.log_probs[:, 0]).all()
    m = out.metrics.to_dict()
    assert m["head_b_invalid_action"] == 2.0 and m["head_a_invalid_action"] == 0.0
    assert m["head_b_nonfinite"] == 2.0 and m["all_finite"] == 0.0


@pytest.mark.parametrize("value", [2**31 - 1, -(2**31), 3])
def test_int32_action_out_of_range(value):
    b = _with_action(value, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"head 'b': action out of range \[0, 3\) or masked out at 1 present step"):
        _call(b)
    assert torch.isnan(_call(b, validate=False).log_probs[1, 1])


def test_masked_out_action():
    b = _batch()
    b["action_masks"] = b["action_masks"].clone()
    b["action_masks"][3, 2] = False  # head b, action 0 (the taken one) invalid at step 3
    with pytest.raises(ValueError, match=r"head 'b': action out of range \[0, 3\) or masked out at 1 present step"):
        _call(b)
    out = _call(b, validate=False)
    assert out.metrics.to_dict()["head_b_invalid_action"] == 1.0
    assert out.log_probs[3, 1].item() < -1000  # the mask fill's log-prob: finite, hugely negative


def test_empty_mask_on_a_present_step():
    b = _batch()
    b["action_masks"] = b["action_masks"].clone()
    b["action_masks"][0, :2] = False  # head a: no valid action at step 0
    with pytest.raises(ValueError) as e:
        _call(b)
    assert "head 'a': no valid action (empty mask) at 1 present step(s)" in str(e.value)
    assert "head 'a': action out of range [0, 2) or masked out at 1 present step(s)" in str(e.value)
    m = _call(b, validate=False).metrics.to_dict()
    assert m["head_a_empty_mask"] == 1.0 and m["head_a_valid_actions_min"] == 0.0


def test_data_errors_on_absent_steps_are_ignored():
    b = _with_action(7, steps=(1,))
    b["action_masks"] = b["action_masks"].clone()
    b["action_masks"][2, :2] = False
    b["weights"] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = _call(b)  # validate=True does not raise
    m = out.metrics.to_dict()
    assert m["head_b_invalid_action"] == 0.0 and m["head_a_empty_mask"] == 0.0 and m["all_finite"] == 1.0


@pytest.mark.parametrize(
    "bad,count", [([-1.0, 1.0, 1.0, 1.0], 1), ([float("nan"), 1.0, -0.5, 1.0], 2), ([float("inf"), 1.0, 1.0, 1.0], 1)]
)
def test_bad_weights(bad, count):
    b = _batch(weights=torch.tensor(bad))
    with pytest.raises(ValueError, match=rf"weights: negative or non-finite at {count} step\(s\)"):
        _call(b)
    out = _call(b, validate=False)
    m = out.metrics.to_dict()
    assert m["invalid_weights"] == count and m["steps"] == 4 - count  # a bad weight makes its step absent
    assert math.isfinite(out.loss.item())


def test_bad_value_weights():
    b = _batch(values=torch.zeros(N), returns=torch.ones(N), value_weights=torch.tensor([1.0, -2.0, float("nan"), 1.0]))
    with pytest.raises(ValueError) as e:
        _call(b)
    assert "value_weights: negative or non-finite at 2 step(s)" in str(e.value)
    assert "weights: negative" not in str(e.value).replace("value_weights: negative", "")
    m = _call(b, validate=False).metrics.to_dict()
    assert m["invalid_value_weights"] == 2.0 and m["invalid_weights"] == 0.0
    assert m["value_loss"] == pytest.approx(0.5)  # the two good steps: 0.5 * mean((0 - 1)^2)


def test_every_problem_is_listed_in_one_error():
    b = _with_action(5, steps=(0, 1, 2))
    b["weights"] = torch.tensor([1.0, 1.0, 1.0, -1.0])
    with pytest.raises(ValueError) as e:
        _call(b)
    msg = str(e.value)
    assert "pass validate=False" in msg
    assert "head 'b': action out of range [0, 3) or masked out at 3 present step(s)" in msg
    assert "weights: negative or non-finite at 1 step(s)" in msg


def test_valid_data_does_not_raise():
    out = _call(_batch(values=torch.zeros(N), returns=torch.ones(N), weights=torch.tensor([1.0, 0.0, 0.5, 2.0])))
    assert out.metrics.to_dict()["all_finite"] == 1.0


# -- config -----------------------------------------------------------------------------------------------------
BAD_CONFIGS = [
    (dict(clip_eps=0.0), ValueError, r"clip_eps: expected > 0.0"),
    (dict(clip_eps=1.0), ValueError, r"clip_eps: expected < 1.0"),
    (dict(clip_eps=-0.1), ValueError, r"clip_eps"),
    (dict(clip_eps=float("nan")), ValueError, r"clip_eps: expected a finite number"),
    (dict(clip_eps="0.2"), TypeError, r"clip_eps: expected a number, got str"),
    (dict(clip_eps=True), TypeError, r"clip_eps: expected a number, got bool"),
    (dict(clip_eps_high=0.0), ValueError, r"clip_eps_high: expected > 0.0"),
    (dict(clip_eps_high=float("inf")), ValueError, r"clip_eps_high: expected a finite number"),
    (dict(log_ratio_clamp=0.0), ValueError, r"log_ratio_clamp: expected > 0.0"),
    (dict(log_ratio_clamp=81.0), ValueError, r"log_ratio_clamp: expected <= 80.0"),
    (dict(log_ratio_clamp=float("inf")), ValueError, r"log_ratio_clamp: expected a finite number"),
    (dict(joint_log_ratio_clamp=0.0), ValueError, r"joint_log_ratio_clamp: expected > 0.0"),
    (dict(joint_log_ratio_clamp=1000.0), ValueError, r"joint_log_ratio_clamp: expected <= 80.0"),
    (dict(surrogate="ppo"), ValueError, r"surrogate: expected 'joint' or 'per_head', got 'ppo'"),
    (dict(normalize_advantages=1), TypeError, r"normalize_advantages: expected a bool"),
    (dict(normalize_entropy="yes"), TypeError, r"normalize_entropy: expected a bool"),
    (dict(entropy_coef=-0.01), ValueError, r"entropy_coef: expected >= 0.0"),
    (dict(entropy_coef=float("nan")), ValueError, r"entropy_coef: expected a finite number"),
    (dict(value_coef=-1.0), ValueError, r"value_coef: expected >= 0.0"),
    (dict(value_clip=0.0), ValueError, r"value_clip: expected > 0.0"),
    (dict(value_clip=-0.2), ValueError, r"value_clip"),
    (dict(mask_fill=0.0), ValueError, r"mask_fill: expected <= -1.0"),
    (dict(mask_fill=-0.5), ValueError, r"mask_fill: expected <= -1.0"),
    (dict(mask_fill=float("-inf")), ValueError, r"mask_fill: expected a finite number"),
    (dict(entropy_coef_per_head=[1.0, -1.0]), ValueError, r"entropy_coef_per_head\[1\]: expected >= 0.0"),
    (dict(entropy_coef_per_head={"a": float("nan")}), ValueError, r"entropy_coef_per_head\['a'\]: expected a finite"),
    (
        dict(entropy_coef_per_head="ab"),
        TypeError,
        r"entropy_coef_per_head: expected a mapping by head name or a "
        r"sequence",
    ),
    (dict(entropy_coef_per_head={1: 0.5}), TypeError, r"entropy_coef_per_head: keys must be head names"),
    (dict(prob_floor=[0.0, None]), ValueError, r"prob_floor\[0\]: expected > 0.0"),
    (dict(prob_floor=[None, 1.0]), ValueError, r"prob_floor\[1\]: expected < 1.0"),
    (dict(prob_floor={"a": -0.1}), ValueError, r"prob_floor\['a'\]: expected > 0.0"),
    (dict(prob_floor=0.1), TypeError, r"prob_floor: expected a mapping by head name or a sequence"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_raises_at_construction(kwargs, exc, message):
    with pytest.raises(exc, match=r"PPOLossConfig\." + message):
        ek.PPOLossConfig(**kwargs)


def test_good_configs_construct_and_are_frozen():
    c = ek.PPOLossConfig(
        clip_eps=0.1,
        clip_eps_high=0.28,
        log_ratio_clamp=80.0,
        joint_log_ratio_clamp=None,
        surrogate="per_head",
        normalize_advantages=True,
        normalize_entropy=True,
        entropy_coef=0.0,
        entropy_coef_per_head={"a": 0.0},
        prob_floor=[None, 0.5],
        value_coef=0.0,
        value_clip=10.0,
        mask_fill=-1.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.clip_eps = 0.3  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.entropy_coef_per_head["a"] = 1.0  # type: ignore[index]
    r = c.resolve(LAYOUT)
    assert r.entropy_coef_per_head == (0.0, 1.0) and r.prob_floor == (-1.0, 0.5)
    assert r.eps_low == 0.1 and r.eps_high == 0.28 and math.isinf(r.joint_log_ratio_clamp)


# -- backends ------------------------------------------------------------------------------------------------------
def test_available_backends_lists_all_four_with_reasons():
    info = ek.available_backends()
    assert list(info) == ["reference", "triton", "cuda", "cpu"]
    assert info["reference"].available and info["reference"].reasons == ()
    for name, b in info.items():
        assert b.name == name
        assert b.available == (not b.reasons), f"{name}: available={b.available} but reasons {b.reasons}"
        if not b.available:
            assert all(isinstance(r, str) and r for r in b.reasons)
            assert "unavailable: " in str(b)


def test_unknown_backend(no_compute):
    with pytest.raises(
        ValueError,
        match=r"backend: unknown backend 'fused'; expected one of \['reference', "
        r"'triton', 'cuda', 'cpu', 'auto'\]",
    ):
        _call(_batch(), backend="fused")


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_a_backend_that_cannot_run_raises_with_its_reasons(name):
    info = ek.available_backends()[name]
    if not info.available:
        with pytest.raises(ek.BackendUnavailableError, match=rf"backend '{name}' cannot run") as e:
            _call(_batch(), backend=name)
        for reason in info.reasons:
            assert reason in str(e.value)
        return
    # available here: a call on a device it does not run on is refused with the reason (never computed)
    if "meta" in info.devices:
        pytest.skip(f"{name} runs on every device type")
    b = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    with pytest.raises(ek.BackendUnavailableError, match=rf"backend '{name}' cannot run this call:\n.*meta"):
        _call(b, backend=name, validate=False)


def test_auto_on_cpu_tensors_takes_cpu_then_the_reference():
    """auto on CPU tensors: the fused cpu backend when it can run the call, else the reference (float64 logits
    are the reference's alone)."""
    out = _call(_batch(), backend="auto", validate=False)
    assert out.backend == ("cpu" if ek.available_backends()["cpu"].available else "reference")
    b = _batch()
    b["logits"] = b["logits"].double()
    assert _call(b, backend="auto", validate=False).backend == "reference"


def test_backend_unavailable_error_is_a_runtime_error():
    """Code that catches RuntimeError around a loss call also catches a backend that cannot run."""
    b = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run"):
        _call(b, backend="cpu", validate=False)

"""esper_kernels.telemetry: per-head gradient norms (NaN, never 0.0, when missing), gradient states, the report."""

import math

import pytest
import torch

import esper_kernels as ek
from esper_kernels.synthetic import ESPER_RELEVANCE
from esper_kernels.telemetry import GRADIENT_STATES, GradNorms, gradient_states, head_grad_norms, head_report

pytestmark = pytest.mark.reference


def test_head_grad_norms_values_and_missing_sentinel():
    torch.manual_seed(0)
    a, b, unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2), torch.nn.Linear(4, 5)
    x = torch.randn(6, 4)
    (a(x).pow(2).sum() + 0.0 * b(x).sum()).backward()
    extra = torch.nn.Parameter(torch.randn(3))
    extra.grad = torch.full((3,), 2.0)
    no_grad = torch.nn.Parameter(torch.randn(2))  # part of a head, but without a gradient
    norms = head_grad_norms({"a": a, "b": b, "unused": unused, "params": [extra, no_grad]})
    assert isinstance(norms, GradNorms) and list(norms) == ["a", "b", "unused", "params"]
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 for v in norms.values())
    want_a = torch.cat([a.weight.grad.flatten(), a.bias.grad]).norm()
    torch.testing.assert_close(norms["a"], want_a)
    assert norms["b"].item() == 0.0  # a measured zero gradient stays 0.0
    assert math.isnan(norms["unused"].item())  # no gradient at all: NaN, never 0.0
    torch.testing.assert_close(norms["params"], torch.tensor(math.sqrt(12.0)))  # the parameters with a grad
    assert norms.missing == {"unused"}
    assert norms.tensor.shape == (4,)
    assert gradient_states(norms) == {"a": "finite", "b": "finite", "unused": "missing", "params": "finite"}


def test_head_grad_norms_syncs_nothing():
    """Meta tensors have no data: any host read (item, tolist, bool of a tensor) would raise."""
    heads = {
        "op": torch.nn.Linear(8, 6, device="meta"),
        "slot": torch.nn.Linear(8, 3, device="meta"),
        "none": torch.nn.Linear(8, 2, device="meta"),
    }
    for m in (heads["op"], heads["slot"]):
        for p in m.parameters():
            p.grad = torch.empty_like(p)
    norms = head_grad_norms(heads)
    assert norms.tensor.device.type == "meta" and norms.tensor.shape == (3,)
    assert norms.missing == {"none"}


def test_nonfinite_gradient_is_not_missing():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    a.weight.grad[0, 0] = float("nan")
    for p in b.parameters():
        p.grad = torch.zeros_like(p)
    b.bias.grad[1] = float("inf")
    norms = head_grad_norms({"a": a, "b": b})
    assert norms.missing == frozenset()
    assert gradient_states(norms) == {"a": "nonfinite", "b": "nonfinite"}
    # a plain mapping of floats: NaN is read as the missing-gradient sentinel, Inf as non-finite
    assert gradient_states({"a": float("nan"), "b": float("inf"), "c": 0.5}) == {
        "a": "missing",
        "b": "nonfinite",
        "c": "finite",
    }


class _Policy(torch.nn.Module):
    """A shared trunk and one Linear head per action head (the shape of esper's Tamiyo policy)."""

    def __init__(self, layout: ek.HeadLayout, obs: int = 5):
        super().__init__()
        self.trunk = torch.nn.Linear(obs, 16)
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(16, a) for n, a in layout.items()})

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        return {n: h(z) for n, h in self.heads.items()}


def _collapsed_batch(layout: ek.HeadLayout, n: int = 40, seed: int = 0):
    """The telemetry-freeze report's situation: the slot mask always has one valid action (mask collapse)."""
    g = torch.Generator().manual_seed(seed)
    H = layout.num_heads
    masks = {name: torch.rand(n, a, generator=g) < 0.7 for name, a in layout.items()}
    masks["slot"] = torch.zeros(n, layout.sizes[layout.index("slot")], dtype=torch.bool)
    masks["slot"][:, 1] = True
    actions = torch.empty(n, H, dtype=torch.int64)
    for h, (name, a) in enumerate(layout.items()):
        act = torch.randint(0, a, (n,), generator=g) if name != "slot" else torch.ones(n, dtype=torch.int64)
        masks[name][torch.arange(n), act] = True
        actions[:, h] = act
    op = torch.tensor([1, 2, 3, 0, 4, 5, 0, 1, 3, 2] * (n // 10))  # 30% WAIT: op relevant only
    actions[:, layout.index("op")] = op
    masks["op"][torch.arange(n), op] = True
    relevance = torch.zeros(n, H, dtype=torch.bool)
    for code, names in ESPER_RELEVANCE.items():
        for name in names:
            relevance[:, layout.index(name)] |= op == code
    return masks, actions, relevance


def test_states_and_report_on_a_policy_with_mask_collapse():
    torch.manual_seed(0)
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    policy = _Policy(layout)
    frozen = torch.nn.Linear(16, 2)  # a head that never enters the loss: its gradient is missing
    masks, actions, relevance = _collapsed_batch(layout)
    n = actions.shape[0]
    logits = policy(torch.randn(n, 5))
    with torch.no_grad():
        old = torch.stack(
            [
                torch.log_softmax(logits[k].masked_fill(~masks[k], -1e4), -1)
                .gather(-1, actions[:, h : h + 1])
                .squeeze(-1)
                for h, k in enumerate(layout.names)
            ],
            -1,
        )
    old = old + 0.3 * torch.randn(old.shape)
    out = ek.ppo_loss(
        logits,
        masks,
        actions,
        old,
        torch.randn(n),
        layout=layout,
        head_relevance=relevance,
        config=ek.PPOLossConfig(entropy_coef=0.01),
        backend="reference",
    )
    out.loss.backward()
    heads = {**policy.heads, "frozen": frozen}
    norms = head_grad_norms(heads)
    m = out.metrics.to_dict()
    states = gradient_states(norms, out.metrics)
    assert set(states.values()) <= set(GRADIENT_STATES)
    assert m["head_slot_learnable_fraction"] == 0.0 and m["head_slot_relevance_fraction"] > 0.5
    assert norms["slot"].item() == 0.0  # one valid action: log-prob 0, a true zero gradient
    assert states["slot"] == "not_learnable"
    assert states["op"] == "finite" and norms["op"].item() > 0
    assert states["frozen"] == "missing"
    assert gradient_states(norms, m) == states  # the to_dict() form works the same

    report = head_report(out.metrics, norms)
    lines = report.splitlines()
    assert len(lines) == layout.num_heads  # the metrics' heads, in layout order
    assert lines[0].startswith("slot: grad=0.000 (0% learnable) entropy=")
    assert lines[0].endswith("[not_learnable]")
    op_line = lines[layout.index("op")]
    pct = round(100 * m["head_op_learnable_fraction"])
    assert op_line.startswith(f"op: grad={norms['op'].item():.3f} ({pct}% learnable) entropy=")
    for word in ("kl=", "clip=", "nonfinite=0", "[finite]"):
        assert word in op_line
    # the missing head is reported as nan with its state, from a to_dict() and an explicit head list
    frozen_line = head_report(
        {**m, **{f"head_frozen_{k}": float("nan") for k in ek.HEAD_METRICS}}, norms, heads=["frozen"]
    )
    assert frozen_line == ("frozen: grad=nan (no present steps) entropy=nan kl=nan clip=nan nonfinite=nan [missing]")
    assert head_report(m, heads=["op"]).startswith(f"op: ({pct}% learnable) entropy=")
    with pytest.raises(KeyError, match="frozen"):
        head_report(out.metrics, norms, heads=["frozen"])

"""torch.compile(fullgraph=True) of a training step that calls ppo_loss(validate=False): no graph break, and the
loss, the metrics and the gradients equal eager; torch.library.opcheck of the fused backends' custom ops.

Compiles are slow on a small CPU, so the CPU tests use the ``aot_eager`` compiler (Dynamo's whole-graph
capture and AOTAutograd's forward/backward split through the custom ops' fake implementations, without
Inductor's code generation) on a three-head layout; the Inductor compile runs on the GPU tier.
"""

import copy

import pytest
import torch
from harness import assert_close

import esper_kernels as ek
from esper_kernels import backends as ek_backends
from esper_kernels.synthetic import make_batch

pytestmark = pytest.mark.slow

LAYOUT = ek.HeadLayout({"slot": 3, "style": 4, "op": 6})
CONFIG = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.01, normalize_entropy=True)
OBS = 6


class Policy(torch.nn.Module):
    def __init__(self, layout: ek.HeadLayout):
        super().__init__()
        self.trunk = torch.nn.Linear(OBS, 16)
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(16, a) for n, a in layout.items()})
        self.value = torch.nn.Linear(16, 1)

    def forward(self, obs):
        z = torch.tanh(self.trunk(obs))
        return {n: h(z) for n, h in self.heads.items()}, self.value(z).squeeze(-1)


def step(policy, obs, batch, backend):
    """A training step's forward: the policy, then the loss with per-head logits (no host sync anywhere)."""
    logits, values = policy(obs)
    out = ek.ppo_loss(
        logits,
        batch["action_masks"],
        batch["actions"],
        batch["old_log_probs"],
        batch["advantages"],
        layout=LAYOUT,
        head_relevance=batch["head_relevance"],
        weights=batch["weights"],
        values=values,
        returns=batch["returns"],
        config=CONFIG,
        backend=backend,
        validate=False,
    )
    return out.loss, out.log_probs, out.metrics.stats, out.metrics["clip_fraction"]


def _case(device: str, seed: int = 0):
    torch.manual_seed(seed)
    policy = Policy(LAYOUT).to(device)
    b = make_batch((4, 5), LAYOUT, seed=seed, device=device)
    b["action_masks"] = dict(zip(LAYOUT.names, torch.split(b["action_masks"], list(LAYOUT.sizes), dim=-1)))
    obs = torch.randn(4, 5, OBS, device=device)
    return policy, obs, b


def _device_for(name: str) -> str:
    info = ek.available_backends()[name]
    if not info.available:
        pytest.skip(f"backend {name!r} is unavailable here: {'; '.join(info.reasons)}")
    if "cuda" in info.devices and torch.cuda.is_available():
        return "cuda"
    if "cpu" in info.devices:
        return "cpu"  # the triton backend without a GPU: the interpreter (TRITON_INTERPRET=1, set by conftest)
    pytest.skip(f"backend {name!r} runs on {info.devices}, and this machine has no such device")


def _compare_step(name: str, device: str, compiler: str):
    policy, obs, b = _case(device)
    policy_c = copy.deepcopy(policy)
    try:
        eager = step(policy, obs, b, name)
    except ek.BackendUnavailableError as e:
        pytest.skip(f"backend {name!r} cannot run this call on {device}: {e}")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(policy_c, obs, b, name)
    for k, got, want in zip(("loss", "log_probs", "stats", "clip_fraction"), compiled, eager):
        assert_close(k, got, want)
    eager[0].backward()
    compiled[0].backward()
    for (pname, p), pc in zip(policy.named_parameters(), policy_c.parameters()):
        assert pc.grad is not None, f"{pname}: no gradient through the compiled step"
        assert_close(f"grad {pname}", pc.grad, p.grad)


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_compiled_step_equals_eager(name):
    _compare_step(name, _device_for(name), "aot_eager")


def test_auto_backend_selection_traces_without_graph_breaks(monkeypatch):
    """'auto' loads the fused backends on first use: that import must not break the graph either."""
    policy, obs, b = _case("cpu", seed=1)
    want = step(policy, obs, b, "auto")
    monkeypatch.setattr(ek_backends, "_cache", {})  # nothing loaded
    monkeypatch.setattr(ek_backends, "_RUNNABLE", set())
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="eager")(policy, obs, b, "auto")
    assert_close("loss", got[0], want[0])
    assert_close("stats", got[2], want[2])


def _op_args(name: str, device: str):
    """The arguments FusedBackend.forward passes to esper_kernels::fused_forward, for a small batch."""
    from esper_kernels.backends.fused import cfg_to_list
    from esper_kernels.inputs import prepare_inputs

    b = make_batch((2, 3), LAYOUT, seed=3, device=device)
    for k in ("logits", "old_log_probs", "advantages"):  # finite everywhere, so opcheck compares plain numbers
        b[k] = torch.nan_to_num(b[k], nan=0.5)
    b["logits"].requires_grad_(True)
    b["values"].requires_grad_(True)
    cfg = CONFIG.resolve(LAYOUT)
    inp = prepare_inputs(
        LAYOUT,
        b["logits"],
        b["action_masks"],
        b["actions"],
        b["old_log_probs"],
        b["advantages"],
        head_relevance=b["head_relevance"],
        weights=b["weights"],
        values=b["values"],
        returns=b["returns"],
        per_head_advantages_allowed=cfg.per_head,
    )
    return (
        name,
        list(inp.logits),
        list(inp.masks),
        list(inp.actions),
        list(inp.old_log_probs),
        inp.advantages,
        list(inp.relevance),
        inp.weights,
        inp.values,
        inp.returns,
        inp.old_values,
        inp.value_weights,
        list(LAYOUT.sizes),
        cfg_to_list(cfg),
    )


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_opcheck_fused_ops(name):
    device = _device_for(name)
    args = _op_args(name, device)
    torch.library.opcheck(torch.ops.esper_kernels.fused_forward.default, args)
    with torch.no_grad():
        out = torch.ops.esper_kernels.fused_forward(*args)
    g = torch.Generator().manual_seed(0)
    n, H = out[1].shape
    grads = (
        torch.randn(4, generator=g).to(device),
        torch.randn(n, H, generator=g).to(device),
        torch.randn(n, H, generator=g).to(device),
    )

    def detach(a):
        if isinstance(a, list):
            return [detach(t) for t in a]
        return a.detach() if isinstance(a, torch.Tensor) else a

    detached = tuple(detach(a) for a in args)
    torch.library.opcheck(torch.ops.esper_kernels.fused_backward.default, (*detached, out[4], out[5], *grads))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_inductor_compiled_step_equals_eager_cuda(name):
    info = ek.available_backends()[name]
    if not info.available or "cuda" not in info.devices:
        pytest.skip(f"backend {name!r} does not run on CUDA here: {'; '.join(info.reasons) or info.devices}")
    _compare_step(name, "cuda", "inductor")

"""A whole training step (policy forward, ppo_loss, backward, per-head gradient norms, optimizer step) captured in
a torch.cuda.CUDAGraph and replayed on new data equals the same steps run eagerly, for the reference and every
fused backend that runs on CUDA here. For the triton backend (one pass: the forward writes the gradient, the
backward is a device-side fix-up) each fix-up path is captured: a plain ``loss.backward()``, a scaled loss (the
in-place rescale) and a gradient on the per-step entropy (the recompute); the tickets of its last-program merges
reset themselves, so every replay merges afresh. Skipped without a CUDA device (conftest)."""

import copy

import pytest
import torch
from harness import assert_close

import esper_kernels as ek
from esper_kernels.synthetic import STANDARD_CASES, make_batch
from esper_kernels.telemetry import head_grad_norms

pytestmark = pytest.mark.gpu

LAYOUT = ek.HeadLayout(ek.ESPER_HEADS)
CONFIG = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.01, normalize_entropy=True)
OBS, SHAPE, WARMUP, REPLAYS = 10, STANDARD_CASES["esper"].batch_shape, 3, 4


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(OBS, 64), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(64, a) for n, a in LAYOUT.items()})
        self.value = torch.nn.Linear(64, 1)

    def forward(self, obs):
        z = self.trunk(obs)
        return {n: h(z) for n, h in self.heads.items()}, self.value(z).squeeze(-1)


def _data(i: int) -> dict:
    b = make_batch(SHAPE, LAYOUT, seed=100 + i, device="cuda")
    b.pop("logits")
    b.pop("values")
    b["action_masks"] = dict(zip(LAYOUT.names, torch.split(b["action_masks"], list(LAYOUT.sizes), dim=-1)))
    b["obs"] = torch.randn(*SHAPE, OBS, generator=torch.Generator().manual_seed(i)).cuda()
    return b


def _train_step(policy, opt, d: dict, backend: str, upstream: str = "plain"):
    logits, values = policy(d["obs"])
    out = ek.ppo_loss(
        logits,
        d["action_masks"],
        d["actions"],
        d["old_log_probs"],
        d["advantages"],
        layout=LAYOUT,
        head_relevance=d["head_relevance"],
        weights=d["weights"],
        values=values,
        returns=d["returns"],
        config=CONFIG,
        backend=backend,
        validate=False,
    )
    if upstream == "plain":
        out.loss.backward()  # the one-pass backends' fix-up leaves the forward's gradient as it is
    elif upstream == "scaled":
        (out.loss * 1024.0).backward()  # a loss scaler: the fix-up rescales in place
    else:
        # a penalty on the per-step entropy (esper's entropy floor): the fix-up recomputes
        (out.loss + 0.01 * torch.relu(0.5 - out.entropy).mean()).backward()
    norms = head_grad_norms(policy.heads).tensor
    opt.step()
    return out.loss.detach(), out.metrics.stats, norms


@pytest.mark.parametrize(
    "name,upstream",
    [("reference", "plain"), ("triton", "plain"), ("triton", "scaled"), ("triton", "outputs"), ("cuda", "plain")],
)
def test_cuda_graph_training_step_equals_eager(name, upstream):
    info = ek.available_backends()[name]
    if not info.available or "cuda" not in info.devices:
        pytest.skip(f"backend {name!r} does not run on CUDA here: {'; '.join(info.reasons) or info.devices}")
    torch.manual_seed(0)
    policy = Policy().cuda()
    policy_eager = copy.deepcopy(policy)
    initial = policy.heads["op"].weight.detach().clone()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3, capturable=True)
    opt_eager = torch.optim.Adam(policy_eager.parameters(), lr=3e-3, capturable=True)
    data = [_data(i) for i in range(REPLAYS)]
    static = {
        k: ({h: m.clone() for h, m in v.items()} if isinstance(v, dict) else v.clone()) for k, v in data[0].items()
    }

    # warm-up on a side stream (allocator, autograd, optimizer state), then capture one whole step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(WARMUP):
            opt.zero_grad(set_to_none=True)
            _train_step(policy, opt, static, name, upstream)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = _train_step(policy, opt, static, name, upstream)

    for _ in range(WARMUP):
        opt_eager.zero_grad(set_to_none=True)
        _train_step(policy_eager, opt_eager, data[0], name, upstream)
    for i, d in enumerate(data):
        for k, v in d.items():
            if isinstance(v, dict):
                for h, m in v.items():
                    static[k][h].copy_(m)
            else:
                static[k].copy_(v)
        graph.replay()
        opt_eager.zero_grad(set_to_none=True)
        want = _train_step(policy_eager, opt_eager, d, name, upstream)
        torch.cuda.synchronize()
        for what, got, ref in zip(("loss", "stats", "head grad norms"), static_out, want):
            assert_close(f"replay {i}: {what}", got, ref, rtol=1e-4, atol=1e-5)
    for (pname, p), pe in zip(policy.named_parameters(), policy_eager.parameters()):
        assert_close(f"parameter {pname} after {REPLAYS} replays", p, pe, rtol=1e-4, atol=1e-5)
    assert not torch.equal(policy.heads["op"].weight, initial)  # the replays did train

"""The demo: the environment's masks and relevance follow its state, a short run works and prints its final line,
the run is deterministic, it learns, and a fused backend gives the reference's learning curve."""

import math
import re

import pytest
import torch

import esper_kernels as ek
from esper_kernels.demo import main, train
from esper_kernels.demo.agent import masked_log_softmax
from esper_kernels.demo.env import (
    ADVANCE,
    BLENDING,
    EMPTY,
    FOSSILIZE,
    FOSSILIZED,
    GERMINATE,
    PRUNE,
    SET_ALPHA_TARGET,
    TRAINING,
    WAIT,
    SeedSlotEnv,
)
from esper_kernels.synthetic import ESPER_RELEVANCE

pytestmark = pytest.mark.slow

SMALL = dict(num_envs=16, horizon=10)


@pytest.fixture(autouse=True)
def _one_thread():
    """As the demo's CLI does (--threads 1): this model's small ops run fastest, and run alike, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_valid_actions(env: SeedSlotEnv, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Uniform actions among the valid ones: the op first, then every head under the op's masks."""
    op = torch.multinomial(env.op_mask().float(), 1, generator=g).squeeze(-1)
    masks = env.masks(op)
    acts = [
        op if n == "op" else torch.multinomial(masks[n].float(), 1, generator=g).squeeze(-1) for n in env.layout.names
    ]
    return torch.stack(acts, -1), masks


def test_env_masks_and_relevance_follow_the_state():
    env = SeedSlotEnv(num_envs=32, num_slots=3, horizon=30, seed=0)
    g = torch.Generator().manual_seed(0)
    slot = env.layout.index("slot")
    seen_ops = set()
    for _ in range(60):  # two episodes of random valid play
        stage = env.stage.clone()
        actions, masks = _random_valid_actions(env, g)
        op = actions[:, env.layout.index("op")]
        seen_ops.update(op.tolist())
        assert masks["op"][:, WAIT].all()
        want_slots = {
            GERMINATE: stage == EMPTY,
            SET_ALPHA_TARGET: stage == BLENDING,
            PRUNE: (stage == TRAINING) | (stage == BLENDING),
            FOSSILIZE: env._reached(),
            ADVANCE: env._ready(),
        }
        for code, want in want_slots.items():
            rows = op == code
            assert torch.equal(masks["slot"][rows], want[rows]), f"slot mask for op {code}"
            assert torch.equal(masks["op"][:, code], want.any(-1)), f"op mask for op {code}"
        assert all(m.gather(-1, actions[:, h : h + 1]).all() for h, m in enumerate(masks.values()))
        rel = env.relevance(op)
        for code, names in ESPER_RELEVANCE.items():
            want = torch.tensor([n in names for n in env.layout.names])
            assert (rel[op == code] == want).all()
        acted = stage.gather(1, actions[:, slot : slot + 1]).squeeze(1)
        _obs, reward, _done = env.step(actions)
        assert torch.isfinite(reward).all()
        after = env.stage.gather(1, actions[:, slot : slot + 1]).squeeze(1) if env.t else None
        if after is not None:  # not the reset step
            assert (after[op == GERMINATE] == TRAINING).all() and (acted[op == GERMINATE] == EMPTY).all()
            assert (after[op == PRUNE] == EMPTY).all()
            assert (after[op == FOSSILIZE] == FOSSILIZED).all()
            assert (after[op == ADVANCE] == BLENDING).all()
    assert seen_ops == set(range(6))


def test_env_is_deterministic():
    def run(seed):
        env = SeedSlotEnv(num_envs=8, seed=seed)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(30):
            actions, _ = _random_valid_actions(env, g)
            out.append(env.step(actions)[1])
        return torch.stack(out)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))  # the quality noise follows the seed


def test_short_run_prints_report_and_final_line(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert (
        main(
            [
                "--updates",
                "3",
                "--envs",
                "16",
                "--horizon",
                "10",
                "--backend",
                "reference",
                "--device",
                "cpu",
                "--report-every",
                "2",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"final mean return -?\d+\.\d{3} \(first -?\d+\.\d{3}\)", lines[-1]), lines[-1]
    assert any(line.startswith("[") and "3/3" in line for line in lines)  # the progress bar
    assert sum(line.startswith("op: grad=") for line in lines) == 2  # the report at updates 2 and 3
    assert any(re.match(r"slot: grad=\d+\.\d{3} \(\d+% learnable\)", line) for line in lines)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_curve_and_it_learns():
    a = train(12, backend="reference", seed=3, num_envs=64, verbose=False)
    b = train(3, backend="reference", seed=3, num_envs=64, verbose=False)
    assert a.returns[:3] == b.returns  # bitwise: the env, the sampling and the shuffles are seeded
    assert a.entropy["op"][:3] == b.entropy["op"]
    assert a.final > a.first + 1.5, a.returns  # it learns within a few updates
    assert all(0.0 <= x <= 1.0 for x in a.learnable["slot"])
    assert a.learnable["op"][0] > 0.5 and a.learnable["blueprint"][0] < a.learnable["op"][0]


def _compare_curves(fused: str, device: str):
    info = ek.available_backends()[fused]
    if not info.available or device not in info.devices:
        pytest.skip(f"backend {fused!r} does not run on {device} here: {'; '.join(info.reasons) or info.devices}")
    ref = train(4, backend="reference", seed=5, device=device, verbose=False, **SMALL)
    got = train(4, backend=fused, seed=5, device=device, verbose=False, **SMALL)
    assert got.backend == fused and ref.backend == "reference"
    for i, (x, y) in enumerate(zip(got.returns, ref.returns)):
        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5), f"update {i}: return {x} vs reference {y}"
    for name in ref.entropy:
        for i, (x, y) in enumerate(zip(got.entropy[name], ref.entropy[name])):
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), (
                f"update {i}: head {name} entropy {x} vs reference {y}"
            )
    for i, (x, y) in enumerate(zip(got.losses, ref.losses)):
        assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), f"update {i}: loss {x} vs reference {y}"


def test_fused_cpu_backend_gives_the_reference_learning_curve():
    _compare_curves("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["triton", "cuda"])
def test_fused_cuda_backend_gives_the_reference_learning_curve(fused):
    _compare_curves(fused, "cuda")


def test_masked_log_softmax_matches_the_loss():
    """The agent's rollout log-probs use the loss's own masking, so the first epoch's ratios are exactly ~1."""
    z = torch.randn(5, 4)
    m = torch.rand(5, 4) < 0.6
    m[:, 0] = True
    lp = masked_log_softmax(z, m)
    out = ek.ppo_loss(
        z,
        m,
        torch.zeros(5, 1, dtype=torch.long),
        lp[:, :1],
        torch.ones(5),
        layout=ek.HeadLayout({"a": 4}),
        backend="reference",
    )
    torch.testing.assert_close(out.log_probs[:, 0], lp[:, 0])

"""``python -m esper_kernels example``: the loss on an esper-shaped batch, its gradient and its telemetry."""

from __future__ import annotations

import torch

from .config import PPOLossConfig
from .layout import ESPER_HEADS, HeadLayout
from .loss import ppo_loss
from .metrics import HEAD_METRICS
from .synthetic import make_batch

_COLUMNS = (
    ("entropy", "entropy", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("clip", "clip_fraction", "{:.3f}"),
    ("ratio_max", "ratio_max", "{:.2f}"),
    ("valid", "valid_actions_mean", "{:.2f}"),
    ("single", "single_action_fraction", "{:.2f}"),
    ("relevant", "relevance_fraction", "{:.2f}"),
    ("learnable", "learnable_fraction", "{:.2f}"),
    ("nonfinite", "nonfinite", "{:.0f}"),
    ("grad", None, "{:.4f}"),
)


def head_table(metrics: dict[str, float], names, grad_norms: dict[str, float] | None = None) -> str:
    """The per-head telemetry as a text table."""
    assert all(c[1] is None or c[1] in HEAD_METRICS for c in _COLUMNS)
    header = f"{'head':<13}" + "".join(f"{c[0]:>11}" for c in _COLUMNS if c[1] or grad_norms)
    rows = [header]
    for name in names:
        cells = []
        for _label, key, fmt in _COLUMNS:
            if key is None:
                if grad_norms is None:
                    continue
                value = grad_norms[name]
            else:
                value = metrics[f"head_{name}_{key}"]
            cells.append(f"{fmt.format(value):>11}")
        rows.append(f"{name:<13}" + "".join(cells))
    return "\n".join(rows)


def run_example(backend: str = "auto", device: str = "cpu", seed: int = 0) -> None:
    layout = HeadLayout(ESPER_HEADS)
    batch = make_batch((12, 150), layout, device=device, seed=seed)
    logits = batch.pop("logits").requires_grad_(True)
    values = batch.pop("values").requires_grad_(True)
    config = PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05)
    out = ppo_loss(logits, values=values, layout=layout, config=config, backend=backend, **batch)
    out.loss.backward()
    m = out.metrics.to_dict()
    # gradient norm of each head's logit columns: the telemetry a policy's per-head parameters would see
    grad = logits.grad.reshape(-1, layout.total)
    norms = {n: grad[:, o : o + a].norm().item() for n, o, a in zip(layout.names, layout.offsets, layout.sizes)}
    print(f"backend {out.backend}, batch {list(logits.shape[:-1])}, heads {dict(layout.items())}")
    print(
        f"loss {m['loss']:.5f} = policy {m['policy_loss']:.5f} + 0.05 * entropy {m['entropy_loss']:.5f} "
        f"+ 0.5 * value {m['value_loss']:.5f}"
    )
    print(
        f"steps {m['steps']:.0f}  joint ratio mean {m['ratio_mean']:.4f} std {m['ratio_std']:.4f} "
        f"[{m['ratio_min']:.3f}, {m['ratio_max']:.3f}]  clip fraction {m['clip_fraction']:.3f}  "
        f"approx_kl {m['approx_kl']:.5f}  explained variance {m['explained_variance']:.3f}  "
        f"all_finite {bool(m['all_finite'])}"
    )
    print(head_table(m, layout.names, norms))
    if values.grad is not None:
        print(f"value gradient norm {values.grad.norm().item():.4f}")


def run_example_cli(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m esper_kernels example", description=__doc__)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run_example(a.backend, a.device, a.seed)

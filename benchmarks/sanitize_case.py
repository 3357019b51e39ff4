"""Small, hostile inputs for ``compute-sanitizer --tool memcheck``: forward + backward through ``ppo_loss``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \\
        python benchmarks/sanitize_case.py --backend triton

(Without PyTorch's caching allocator every tensor is its own cudaMalloc, so a read or write past a tensor's end
is past an allocation's end, which memcheck sees.) Cases, each with validate=False:

* packed esper layout, int64 actions out of range at present steps (A_h, -1, 2**62, -2**62, int64 min/max),
  empty masks at present steps, NaN/Inf garbage (logits, old log-probs, advantages, out-of-range actions) in
  absent steps, values, returns and old values with value clipping;
* per-head separate tensors: a dict of [N, A_h] bf16 logits in separate allocations, uint8 masks, int32 actions
  with int32 min/max, old log-probs as strided columns, per-head relevance, per_head surrogate with
  normalize_advantages, normalize_entropy and a probability floor;
* a wide head (5,000 actions) next to a small one, the per-head logits as views of one wider buffer with a
  common row stride (a padded row), fp16, odd N;
* N = 1 and an all-absent batch (every weight 0);
* many blocks (N = 1,500 esper steps: tiles over many blocks, the last block's merge of their partials, advantage
  normalisation from the pre-pass's partials) and a row over a cluster (one head of 9,000 actions: three blocks);
* the fused backends' backward paths on one batch: ``loss.backward()`` (the cuda backend's fix-up returns at once),
  an upstream of 0.5 (rescale in place), a gradient on log_probs (recompute), and a second backward on the same
  graph (``retain_graph=True``).

``--cases race`` runs the small ones only (esper with bad actions, many blocks, the cluster, the backward paths),
for ``compute-sanitizer --tool racecheck`` (shared-memory hazards: the tiles, the statistics folds, the cluster's
exchange), which is slow.

Besides memcheck's report, it checks that the gradient of every absent step's logits is exactly 0 (docs/semantics.md
section 1) and
that the forward ran: exit 0 when every case ran and passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

I64 = torch.iinfo(torch.int64)
I32 = torch.iinfo(torch.int32)


def _esper_bad(device: str) -> tuple[dict, ek.HeadLayout, ek.PPOLossConfig]:
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = make_batch((5, 7), layout, seed=1, device="cpu")  # N = 35
    acts = b["actions"].view(-1, layout.num_heads)
    w = b["weights"].view(-1)
    w[:4] = 1.0
    w[30:] = 0.0
    bad = [layout.sizes[0], -1, 2**62, -(2**62), I64.max, I64.min, layout.sizes[6], 10**9]
    for h, v in enumerate(bad):
        acts[h % 4, h] = v  # present steps 0..3
    acts[31, :] = I64.max  # absent steps: out of range too
    acts[32, :] = -1
    masks = b["action_masks"].view(-1, layout.total)
    off, a = layout.offsets[4], layout.sizes[4]
    masks[5, off : off + a] = False  # empty mask, present step
    w[5] = 1.0
    masks[31, :] = False  # empty masks at an absent step
    b["logits"].view(-1, layout.total)[30:] = float("nan")
    b["logits"].view(-1, layout.total)[33, :3] = float("inf")
    b["old_log_probs"].view(-1, layout.num_heads)[30:] = float("-inf")
    b["advantages"].view(-1)[30:] = float("inf")
    b["old_values"] = b["values"] + 0.3 * torch.randn(b["values"].shape)
    cfg = ek.PPOLossConfig(entropy_coef=0.01, value_clip=0.2)
    return {k: v.to(device) for k, v in b.items()}, layout, cfg


def _per_head_separate(device: str) -> tuple[dict, ek.HeadLayout, ek.PPOLossConfig]:
    layout = ek.HeadLayout({"op": 6, "slot": 3, "blueprint": 13, "style": 4})
    n = 23
    g = torch.Generator().manual_seed(2)
    logits = {name: (torch.randn(n, a, generator=g) * 2).to(torch.bfloat16).to(device) for name, a in layout.items()}
    masks = {name: (torch.rand(n, a, generator=g) < 0.6).to(torch.uint8) for name, a in layout.items()}
    actions = {name: torch.randint(0, a, (n,), generator=g, dtype=torch.int32) for name, a in layout.items()}
    for name in layout.names:
        masks[name][torch.arange(n), actions[name].long()] = 1
    actions["op"][0] = I32.max
    actions["slot"][1] = I32.min
    actions["blueprint"][2] = -1
    actions["style"][3] = 4
    masks["slot"][4] = 0  # empty mask
    old_cols = torch.randn(n, 2 * layout.num_heads, generator=g) - 1.0
    rel = {name: torch.rand(n, generator=g) < 0.7 for name in layout.names}
    w = (torch.rand(n, generator=g) > 0.25).float()
    w[:5] = 1.0
    absent = w == 0
    for name in layout.names:
        logits[name][absent.to(device)] = float("nan")
    old_cols[absent] = float("nan")
    old_cols = old_cols.to(device)
    old = {name: old_cols[:, 2 * h] for h, name in enumerate(layout.names)}  # stride-2 columns, on the device
    adv = torch.randn(n, layout.num_heads, generator=g)
    adv[absent] = float("nan")
    mv = lambda d: {k: v.to(device) for k, v in d.items()}
    batch = dict(
        logits=logits,
        action_masks=mv(masks),
        actions=mv(actions),
        old_log_probs=old,
        advantages=adv.to(device),
        head_relevance=mv(rel),
        weights=w.to(device),
    )
    cfg = ek.PPOLossConfig(
        surrogate="per_head",
        normalize_advantages=True,
        normalize_entropy=True,
        entropy_coef=0.05,
        prob_floor={"op": 0.05, "slot": 0.1, "blueprint": 0.01, "style": None},
    )
    return batch, layout, cfg


def _wide_strided(device: str) -> tuple[dict, ek.HeadLayout, ek.PPOLossConfig]:
    layout = ek.HeadLayout({"wide": 5000, "small": 3})
    n, pad = 19, 37
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(n, layout.total + pad, generator=g).to(torch.float16).to(device)
    mbuf = torch.rand(n, layout.total + pad, generator=g) < 0.3
    actions = torch.stack([torch.randint(0, a, (n,), generator=g) for a in layout.sizes], -1)
    mbuf[torch.arange(n), actions[:, 0]] = True
    mbuf[torch.arange(n), 5000 + pad + actions[:, 1]] = True
    mbuf = mbuf.to(device)
    masks = [mbuf[:, :5000], mbuf[:, 5000 + pad :]]
    actions[0, 0] = 5000
    actions[1, 0] = -5000
    actions[2, 1] = 3
    w = torch.ones(n)
    w[-3:] = 0.0
    old = torch.randn(n, 2, generator=g) - 3.0
    buf[-3:] = float("nan")
    batch = dict(
        logits=("buffer", buf, pad),
        action_masks=masks,
        actions=actions.to(device),
        old_log_probs=old.to(device),
        advantages=torch.randn(n, generator=g).to(device),
        weights=w.to(device),
        values=torch.randn(n, generator=g).to(device),
        returns=torch.randn(n, generator=g).to(device),
    )
    return batch, layout, ek.PPOLossConfig(entropy_coef=0.01, clip_eps_high=0.28)


def _tiny_and_absent(device: str) -> list[tuple[str, dict, ek.HeadLayout, ek.PPOLossConfig]]:
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    one = {k: v.to(device) for k, v in make_batch((1,), layout, seed=4, absent_fraction=0.0).items()}
    none = {k: v.to(device) for k, v in make_batch((9,), layout, seed=5).items()}
    none["weights"].zero_()
    none["logits"].fill_(float("nan"))
    return [("N=1", one, layout, ek.PPOLossConfig()), ("all absent", none, layout, ek.PPOLossConfig())]


def _many_blocks_and_cluster(device: str) -> list[tuple[str, dict, ek.HeadLayout, ek.PPOLossConfig]]:
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    many = {k: v.to(device) for k, v in make_batch((1500,), layout, seed=6).items()}
    cfg = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.02, normalize_advantages=True)
    wide = ek.HeadLayout({"token": 9000})
    row = {k: v.to(device) for k, v in make_batch((4,), wide, seed=7).items()}
    return [("many blocks", many, layout, cfg), ("cluster row", row, wide, ek.PPOLossConfig(entropy_coef=0.01))]


def run_backward_paths(backend: str, device: str) -> bool:
    """One forward, then backward calls on its graph: a plain loss.backward(), an upstream of 0.5, a gradient on
    log_probs; each compared with a fresh reference gradient on the host (finite, same shape)."""
    layout = ek.HeadLayout(ek.ESPER_HEADS)
    b = {k: v.to(device) for k, v in make_batch((300,), layout, seed=8).items()}
    ok = True
    for what in ("loss", "half", "log_probs"):
        z = b["logits"].clone().requires_grad_(True)
        out = ek.ppo_loss(**dict(b, logits=z), layout=layout, backend=backend, validate=False)
        obj = (
            out.loss
            if what == "loss"
            else (0.5 * out.loss if what == "half" else out.loss + 0.1 * torch.nan_to_num(out.log_probs).sum())
        )
        obj.backward(retain_graph=True)
        out.loss.backward()  # a second backward on the same graph
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        g = z.grad.float().cpu()
        absent = (b["weights"].reshape(-1) <= 0).cpu()
        ok = ok and bool(torch.isfinite(g).all()) and bool((g[absent] == 0).all())
    print(f"  {'backward paths':<22} fast / rescale / recompute + retain_graph: {'ok' if ok else 'NOT OK'}", flush=True)
    return ok


def _logits_and_leaves(lg, layout: ek.HeadLayout):
    """(logits to pass, the leaf tensors whose gradients are checked); a ("buffer", buf, pad) entry means the
    per-head logits are views of buf with a common row stride."""
    if isinstance(lg, tuple) and lg[0] == "buffer":
        _, buf, pad = lg
        base = buf.detach().requires_grad_(True)
        a0 = layout.sizes[0]
        return [base[:, :a0], base[:, a0 + pad :]], [base]
    if isinstance(lg, dict):
        lg = {k: v.detach().requires_grad_(True) for k, v in lg.items()}
        return lg, list(lg.values())
    lg = lg.detach().requires_grad_(True)
    return lg, [lg]


def run_case(name: str, batch: dict, layout: ek.HeadLayout, cfg: ek.PPOLossConfig, backend: str) -> bool:
    b = dict(batch)
    lg, leaves = _logits_and_leaves(b.pop("logits"), layout)
    if b.get("values") is not None:
        b["values"] = b["values"].detach().requires_grad_(True)
    masks, actions, old, adv = (b.pop(k) for k in ("action_masks", "actions", "old_log_probs", "advantages"))
    out = ek.ppo_loss(lg, masks, actions, old, adv, layout=layout, config=cfg, backend=backend, validate=False, **b)
    total = out.loss + 0.1 * torch.nan_to_num(out.log_probs).sum() + 0.1 * torch.nan_to_num(out.entropy).sum()
    total.backward()
    metrics = out.metrics.to_dict()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ok = True
    w = batch.get("weights")
    if w is not None:
        absent = (w.reshape(-1) <= 0).cpu()
        for leaf in leaves:
            if leaf.grad is None:
                ok = False
                continue
            g = leaf.grad.reshape(-1, leaf.shape[-1]).float().cpu()
            if absent.any() and not bool((g[absent] == 0).all()):
                ok = False
    inv = sum(int(metrics.get(f"head_{h}_invalid_action", 0)) for h in layout.names)
    empty = sum(int(metrics.get(f"head_{h}_empty_mask", 0)) for h in layout.names)
    print(
        f"  {name:<22} loss={metrics['loss']:.4g} steps={metrics['steps']:.0f} invalid_action={inv} "
        f"empty_mask={empty} absent-step logit grads exactly 0: {'yes' if ok else 'NO'}",
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", help="reference, triton, cuda, cpu or auto")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument(
        "--cases", default="all", choices=("all", "race"), help="all (default), or race: the small ones (for racecheck)"
    )
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sanitize_case: backend={a.backend} device={device} cases={a.cases}", flush=True)
    cases = [("esper, bad actions", *_esper_bad(device))]
    if a.cases == "all":
        cases += [
            ("per-head separate", *_per_head_separate(device)),
            ("wide head, strided", *_wide_strided(device)),
            *_tiny_and_absent(device),
        ]
    cases += _many_blocks_and_cluster(device)
    failed = 0
    for name, batch, layout, cfg in cases:
        try:
            if not run_case(name, batch, layout, cfg, a.backend):
                failed += 1
        except Exception as e:
            failed += 1
            print(f"  {name:<22} FAILED: {type(e).__name__}: {e}", flush=True)
    total = len(cases) + 1
    try:
        if not run_backward_paths(a.backend, device):
            failed += 1
    except Exception as e:
        failed += 1
        print(f"  {'backward paths':<22} FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"sanitize_case: {total - failed}/{total} cases ran and passed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Random batches and hypothesis strategies for the reference tier (tests/test_reference_*.py and friends).

``random_batch`` builds a ``ppo_loss`` keyword dict (packed forms) from a seed and a few knobs; ``cases`` is a
hypothesis strategy drawing the knobs, a head layout and a PPOLossConfig covering every config field.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

import esper_kernels as ek
from esper_kernels.stats import stats_size

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread while a reference-tier module runs (restored after it).

    These tests run thousands of tiny ops; on a loaded 2-core machine torch's thread pool makes each op ~7x
    slower than one thread does. Import this fixture into a test module to use it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layout_of(sizes) -> ek.HeadLayout:
    return ek.HeadLayout({f"h{i}": int(a) for i, a in enumerate(sizes)})


def random_batch(
    sizes,
    batch_shape=(6,),
    seed=0,
    *,
    dtype=torch.float32,
    mask_density: float | None = 0.6,
    relevance: bool = True,
    weights: str = "float",
    old_noise: float = 0.3,
    per_head_adv: bool = False,
    values: bool = False,
    old_values: bool = False,
    value_weights: bool = False,
    logit_scale: float = 2.0,
    messy: bool = False,
    garbage: bool = True,
) -> dict:
    """A packed-form batch. ``weights``: "none", "ones", "bool" or "float" (zeros and fractions).

    ``messy`` adds data errors (actions out of range or masked out, empty masks, negative/NaN weights);
    ``garbage`` puts NaN/Inf where docs/semantics.md says nothing is read (masked logits, absent steps).
    """
    g = torch.Generator().manual_seed(int(seed))
    bs = tuple(batch_shape)
    H, S = len(sizes), sum(sizes)
    offsets = [sum(sizes[:h]) for h in range(H)]

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    logits = randn(*bs, S) * logit_scale
    actions = torch.stack([torch.randint(0, a, bs, generator=g) for a in sizes], -1) if bs else None
    masks = None
    if mask_density is not None:
        masks = rand(*bs, S) < mask_density
        for h, (off, a) in enumerate(zip(offsets, sizes)):
            masks[..., off : off + a].scatter_(-1, actions[..., h : h + 1], True)
    if weights == "none":
        w = None
    elif weights == "ones":
        w = torch.ones(bs, dtype=torch.float64)
    elif weights == "bool":
        w = rand(*bs) > 0.3
    else:
        u = rand(*bs)
        w = torch.where(u < 0.25, 0.0, torch.where(u < 0.5, 1.0, rand(*bs) * 2.0))
    rel = (rand(*bs, H) < 0.6) if relevance else None

    # old log-probs near the current ones (exact masked log-softmax in float64), plus noise
    with torch.no_grad():
        lp = []
        for h, (off, a) in enumerate(zip(offsets, sizes)):
            z = logits[..., off : off + a]
            if masks is not None:
                z = z.masked_fill(~masks[..., off : off + a], -1e4)
            lp.append(torch.log_softmax(z, -1).gather(-1, actions[..., h : h + 1]).squeeze(-1))
        old = torch.stack(lp, -1) + old_noise * randn(*bs, H)
    adv = randn(*bs, H) * 2.0 if per_head_adv else randn(*bs) * 2.0

    if messy:
        n_el = actions[..., 0].numel()
        flat_a = actions.reshape(n_el, H)
        for h, a in enumerate(sizes):
            pick = rand(n_el) < 0.2
            bad = torch.tensor([-1, a, a + 3, 10**6], dtype=torch.int64)[torch.randint(0, 4, (n_el,), generator=g)]
            flat_a[:, h] = torch.where(pick, bad, flat_a[:, h])
        if masks is not None:
            flat_m = masks.reshape(n_el, S)
            for off, a in zip(offsets, sizes):
                flat_m[:, off : off + a] &= rand(n_el, 1) > 0.15  # some empty masks
                flat_m[:, off : off + a] &= rand(n_el, a) > 0.1  # some taken actions masked out
        if w is not None and w.dtype != torch.bool:
            flat_w = w.reshape(n_el)
            u = rand(n_el)
            flat_w[:] = torch.where(u < 0.1, -0.5, torch.where(u < 0.15, NAN, flat_w))

    out = dict(
        logits=logits,
        action_masks=masks,
        actions=actions,
        old_log_probs=old,
        advantages=adv,
        head_relevance=rel,
        weights=w,
    )
    vw = None
    if values:
        v = randn(*bs)
        out["values"] = v
        out["returns"] = v + randn(*bs)
        if old_values:
            out["old_values"] = v + 0.5 * randn(*bs)
        if value_weights:
            u = rand(*bs)
            vw = torch.where(u < 0.3, 0.0, rand(*bs) + 0.25)
            out["value_weights"] = vw

    if garbage:
        present = torch.ones(bs, dtype=torch.bool) if w is None else (w.double() > 0) & torch.isfinite(w.double())
        absent = ~present
        fill = torch.where(rand(*bs) < 0.5, NAN, INF)
        out["logits"] = torch.where(absent.unsqueeze(-1), fill.unsqueeze(-1), out["logits"])
        out["old_log_probs"] = torch.where(absent.unsqueeze(-1), -fill.unsqueeze(-1), out["old_log_probs"])
        if per_head_adv:
            out["advantages"] = torch.where(absent.unsqueeze(-1), fill.unsqueeze(-1), out["advantages"])
        else:
            out["advantages"] = torch.where(absent, fill, out["advantages"])
        if masks is not None:
            out["logits"] = torch.where(masks, out["logits"], torch.where(rand(*bs, S) < 0.5, NAN, -INF))
        if values:
            vw_eff = vw if vw is not None else w
            if vw_eff is not None:
                vabsent = ~((vw_eff.double() > 0) & torch.isfinite(vw_eff.double()))
                for k in ("values", "returns", "old_values"):
                    if k in out:
                        out[k] = torch.where(vabsent, fill, out[k])
        if relevance:
            out["old_log_probs"] = torch.where(rel, out["old_log_probs"], NAN)

    # dtypes: logits as asked, the other float inputs float32 (old log-probs/advantages as a rollout stores them)
    out["logits"] = out["logits"].to(dtype)
    other = torch.float64 if dtype == torch.float64 else torch.float32
    for k in ("old_log_probs", "advantages", "values", "returns", "old_values", "value_weights"):
        if out.get(k) is not None:
            out[k] = out[k].to(other)
    if out["weights"] is not None and out["weights"].dtype != torch.bool:
        out["weights"] = out["weights"].to(other)
    return {k: v for k, v in out.items() if v is not None or k in ("action_masks",)}


# -- hypothesis --------------------------------------------------------------------------------------------
head_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=5)
batch_shapes = st.one_of(st.tuples(st.integers(1, 10)), st.tuples(st.integers(1, 4), st.integers(1, 4)))


@st.composite
def configs(draw, num_heads: int) -> ek.PPOLossConfig:
    names = [f"h{i}" for i in range(num_heads)]
    surrogate = draw(st.sampled_from(["joint", "per_head"]))

    def per_head_field(values):
        form = draw(st.sampled_from(["none", "seq", "map"]))
        if form == "none":
            return None
        vals = [draw(values) for _ in names]
        if form == "seq":
            return vals
        return {n: v for n, v in zip(names, vals) if draw(st.booleans())}  # partial mapping: others default

    return ek.PPOLossConfig(
        clip_eps=draw(st.sampled_from([0.1, 0.2, 0.3])),
        clip_eps_high=draw(st.sampled_from([None, 0.28, 0.5])),
        log_ratio_clamp=draw(st.sampled_from([0.5, 5.0, 20.0])),
        joint_log_ratio_clamp=draw(st.sampled_from([None, 0.7, 30.0])),
        surrogate=surrogate,
        normalize_advantages=draw(st.booleans()),
        normalize_entropy=draw(st.booleans()),
        entropy_coef=draw(st.sampled_from([0.0, 0.01, 0.5])),
        entropy_coef_per_head=per_head_field(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        # floors whose 1 - k f never lands on a clip bound (1 - 0.3 = 0.7 would: a ratio exactly at a kink)
        prob_floor=per_head_field(st.sampled_from([None, 0.001, 0.045, 0.27])),
        value_coef=draw(st.sampled_from([0.0, 0.5, 1.0])),
        value_clip=draw(st.sampled_from([None, 0.2, 1.0])),
        mask_fill=draw(st.sampled_from([None, -1e4, -30.0])),
        advantage_std=draw(st.sampled_from(["population", "unbiased"])),
        advantage_eps=draw(st.sampled_from([1e-8, 1e-6])),
        advantage_eps_add=draw(st.booleans()),
        ratio_std=draw(st.sampled_from(["population", "unbiased"])),
    )


@st.composite
def cases(draw, messy: bool | None = False):
    """(sizes, batch kwargs for random_batch, config)."""
    sizes = draw(head_sizes)
    config = draw(configs(len(sizes)))
    values = draw(st.booleans())
    kw = dict(
        batch_shape=draw(batch_shapes),
        seed=draw(st.integers(0, 2**31 - 1)),
        mask_density=draw(st.sampled_from([None, 0.3, 0.8])),
        relevance=draw(st.booleans()),
        weights=draw(st.sampled_from(["none", "ones", "bool", "float"])),
        old_noise=draw(st.sampled_from([0.0, 0.1, 1.0, 40.0])),
        per_head_adv=config.surrogate == "per_head" and draw(st.booleans()),
        values=values,
        old_values=values and (config.value_clip is not None or draw(st.booleans())),
        value_weights=values and draw(st.booleans()),
        logit_scale=draw(st.sampled_from([0.5, 3.0, 12.0])),
        messy=draw(st.booleans()) if messy is None else messy,
    )
    return sizes, kw, config


def per_head_forms_case(n: int = 9, seed: int = 5):
    """Every per-head input form at once: logits as a mapping of separate tensors, uint8 masks and relevance as
    sequences, int32 and int64 actions, old log-probs as stride-2 columns of a wider buffer, bool weights.
    Returns (batch, layout, per_head config with floors)."""
    from harness import per_head

    sizes = [6, 3, 13, 4]
    layout = layout_of(sizes)
    b = random_batch(sizes, (n,), seed=seed, weights="bool", values=True)
    g = torch.Generator().manual_seed(0)
    logits = {name: t.clone() for name, t in per_head(b["logits"], layout, as_mapping=True).items()}
    masks = [t.to(torch.uint8) for t in per_head(b["action_masks"], layout)]
    actions = [b["actions"][:, h].to(torch.int32 if h % 2 else torch.int64) for h in range(len(sizes))]
    old_cols = torch.randn(n, 2 * len(sizes), generator=g)
    old_cols[:, ::2] = b["old_log_probs"]
    old = [old_cols[:, 2 * h] for h in range(len(sizes))]
    rel = [b["head_relevance"][:, h] for h in range(len(sizes))]
    batch = dict(b, logits=logits, action_masks=masks, actions=actions, old_log_probs=old, head_relevance=rel)
    config = ek.PPOLossConfig(surrogate="per_head", entropy_coef=0.2, prob_floor=[0.05, None, 0.01, 0.2])
    return batch, layout, config


def strided_rows_case():
    """Logits and masks as column slices of wider buffers (row stride > S, NaN in the padding), actions and
    values as strided views, a 2-D batch shape. Returns (batch, layout)."""
    sizes = [3, 5, 2]
    layout = layout_of(sizes)
    b = random_batch(sizes, (2, 5), seed=8, values=True)
    S = layout.total
    wide = torch.full((2, 5, S + 7), float("nan"))
    wide[..., 3 : 3 + S] = b["logits"]
    mwide = torch.zeros((2, 5, S + 5), dtype=torch.bool)
    mwide[..., 1 : 1 + S] = b["action_masks"]
    acts = torch.zeros((2, 5, 2 * len(sizes)), dtype=torch.int64)
    acts[..., ::2] = b["actions"]
    vals = torch.zeros((2, 5, 3))
    vals[..., 1] = b["values"]
    batch = dict(
        b, logits=wide[..., 3 : 3 + S], action_masks=mwide[..., 1 : 1 + S], actions=acts[..., ::2], values=vals[..., 1]
    )
    assert batch["logits"].stride(-2) == S + 7
    return batch, layout


# no negative or huge finite values: metric tables sum over heads in different orders (torch, numpy, C++,
# Triton), and only sums without cancellation or overflow are equal to a few ulp whatever the order
_SPECIAL = [0.0, -0.0, 1.0, 2.5, 1e-30, math.inf, -math.inf, math.nan]


@st.composite
def stats_cases(draw, max_heads: int = 5):
    """(stats, num_heads, resolved config, has_values): a random statistics vector sprinkled with zeros,
    negatives, infinities and NaN, for checking a metric-table derivation against ``_derive_table``."""
    heads = draw(st.integers(1, max_heads))
    seed = draw(st.integers(0, 2**31 - 1))
    special = draw(st.floats(0.0, 0.6))
    g = torch.Generator().manual_seed(seed)
    k = stats_size(heads)
    s = torch.rand(k, generator=g) * 10
    pick = torch.rand(k, generator=g) < special
    idx = torch.randint(len(_SPECIAL), (k,), generator=g)
    s = torch.where(pick, torch.tensor(_SPECIAL)[idx], s)
    layout = ek.HeadLayout({f"h{i}": 2 for i in range(heads)})
    coefs = draw(st.booleans())
    cfg = ek.PPOLossConfig(
        surrogate=draw(st.sampled_from(["joint", "per_head"])),
        value_clip=draw(st.sampled_from([None, 0.2])),
        entropy_coef=0.1,
        entropy_coef_per_head=[0.5 + i for i in range(heads)] if coefs else None,
    )
    return s, heads, cfg.resolve(layout), draw(st.booleans())


def check_metric_table(table_fn, case) -> None:
    """``table_fn(stats, cfg, has_values)`` equals the torch derivation (``_derive_table``)."""
    from esper_kernels.metrics import _derive_table

    s, heads, cfg, has_values = case
    want = _derive_table(s, heads, cfg, has_values)
    got = table_fn(s, cfg, has_values).cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0, equal_nan=True)


#: the configs of the backward-path tests (fast, rescale, recompute): the joint surrogate with value clipping, and
#: the per-head surrogate with floors, normalised entropy and advantages, per-head entropy coefficients
PATH_CONFIGS = {
    "joint": ek.PPOLossConfig(entropy_coef=0.01, value_clip=0.2),
    "per_head_floor_norm": ek.PPOLossConfig(
        surrogate="per_head",
        normalize_entropy=True,
        entropy_coef=0.05,
        clip_eps_high=0.28,
        prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.2},
        normalize_advantages=True,
        entropy_coef_per_head={"op": 2.0, "tempo": 0.0},
    ),
}


def wide_config(floor: float | None) -> ek.PPOLossConfig:
    """The wide-head tests' config: per-head surrogate, normalised entropy, value clipping, and a floor on the
    head named "wide" (and 0.1 on "a") when ``floor`` is given."""
    return ek.PPOLossConfig(
        surrogate="per_head",
        normalize_entropy=True,
        entropy_coef=0.1,
        value_clip=0.5,
        prob_floor=None if floor is None else {"wide": floor, "a": 0.1},
    )

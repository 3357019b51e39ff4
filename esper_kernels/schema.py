"""The one definition of the statistics vector and of the metric table; every backend follows it.

A loss call reduces its batch to one float32 *statistics vector*: the global block (``GLOBAL_STATS``), then one
block per head (``HEAD_STATS``; head h at ``GLOBAL_SIZE + h * HEAD_SIZE``). Each statistic has a *kind*, and the
kind alone says how two batches' statistics merge into the statistics of their concatenation:

* ``SUM`` and ``COUNT`` add (a count is a sum of 0/1 terms, kept apart because it is compared exactly);
* ``MIN`` and ``MAX`` reduce, ignoring NaN; the empty batch holds +inf and -inf;
* ``MEAN`` and ``M2`` form a weighted moment with the ``SUM`` statistic named as its weight: the weighted mean
  and M2 = sum w (x - mean)^2 merge by Chan's formula. A moment whose values include an infinity has that
  infinity as its mean and M2 = +inf; NaN values, or both infinities, give NaN mean and M2 (docs/semantics.md).

The *metric table* (``PPOMetrics``) is derived from the statistics: global metrics, then each per-head metric for
every head (metric-major: metric m of head h at ``len(GLOBAL_METRICS) + m * H + h``). Most rows are one of four
forms over one statistic and one normaliser (``Metric``); the rest are ``SPECIAL`` and written out in each
derivation (the losses, approx_kl, ratio_std, ...).

This module imports nothing beyond the standard library: the build runs it as a script to write the C++ header
``ppo_layout.h`` (``python esper_kernels/schema.py --header OUT``), and the Triton kernels read their constants
from it at import. Adding a per-head sum statistic and its metric is one ``Stat`` and one ``Metric`` here, plus
its per-row term in each backend (docs/architecture.md has the checklist).
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

__all__ = [
    "Kind",
    "Form",
    "Over",
    "Stat",
    "Metric",
    "GLOBAL_STATS",
    "HEAD_STATS",
    "GLOBAL_METRICS",
    "HEAD_METRICS",
    "G",
    "HD",
    "GM",
    "HM",
    "GLOBAL_SIZE",
    "HEAD_SIZE",
    "MOMENTS",
    "stats_size",
    "kinds",
    "fingerprint",
    "render_header",
]


class Kind(enum.IntEnum):
    """How a statistic merges across batches."""

    SUM = 0  # add
    COUNT = 1  # add (an exact count)
    MIN = 2  # minimum, NaN ignored (+inf when empty)
    MAX = 3  # maximum, NaN ignored (-inf when empty)
    MEAN = 4  # weighted mean of a moment (weight: the Stat named in ``weight``)
    M2 = 5  # sum w (x - mean)^2 of the moment whose MEAN is the Stat just before it


@dataclass(frozen=True)
class Stat:
    """One entry of the statistics vector: its constant name, merge kind and meaning."""

    name: str
    kind: Kind
    doc: str
    weight: str = ""  # MEAN only: the SUM statistic (same block) that weights the moment


# "present" = finite w > 0; "relevant" = present and head relevance c = 1; sums are w-weighted unless a count
GLOBAL_STATS: tuple[Stat, ...] = (
    Stat("STEPS", Kind.COUNT, "present steps"),
    Stat("WEIGHT", Kind.SUM, "sum w over present steps"),
    Stat("POLICY_NUM", Kind.SUM, "joint surrogate: sum w min(r A, clip(r) A)"),
    Stat("KL_K3", Kind.SUM, "sum w ((exp(L) - 1) - L)"),
    Stat("KL_K1", Kind.SUM, "sum w (-L)"),
    Stat("CLIP", Kind.SUM, "sum w [r > 1 + eps_hi or r < 1 - eps_lo]"),
    Stat("CLIP_POS", Kind.SUM, "sum w [r > 1 + eps_hi]"),
    Stat("CLIP_NEG", Kind.SUM, "sum w [r < 1 - eps_lo]"),
    Stat("RATIO_MEAN", Kind.MEAN, "weighted mean of the joint ratio r", weight="WEIGHT"),
    Stat("RATIO_M2", Kind.M2, "sum w (r - mean)^2"),
    Stat("RATIO_MIN", Kind.MIN, "min r over present steps"),
    Stat("RATIO_MAX", Kind.MAX, "max r over present steps"),
    Stat("BAD_WEIGHTS", Kind.COUNT, "steps (any) whose weight is negative or non-finite"),
    Stat("VALUE_STEPS", Kind.COUNT, "value-present steps (value weight finite and > 0); 0 without values"),
    Stat("VALUE_WEIGHT", Kind.SUM, "sum vw over value-present steps"),
    Stat("VALUE_NUM", Kind.SUM, "sum vw max((v - R)^2, clipped branch)"),
    Stat("VALUE_CLIP", Kind.SUM, "sum vw [clipped branch > unclipped branch]"),
    Stat("RETURN_MEAN", Kind.MEAN, "weighted mean of the returns R", weight="VALUE_WEIGHT"),
    Stat("RETURN_M2", Kind.M2, "sum vw (R - mean)^2"),
    Stat("RESID_MEAN", Kind.MEAN, "weighted mean of the residuals R - v", weight="VALUE_WEIGHT"),
    Stat("RESID_M2", Kind.M2, "sum vw (R - v - mean)^2"),
    Stat("BAD_VALUE_WEIGHTS", Kind.COUNT, "steps whose value weight is negative or non-finite"),
)

HEAD_STATS: tuple[Stat, ...] = (
    Stat("REL_WEIGHT", Kind.SUM, "sum w over relevant steps (the head's normaliser)"),
    Stat("POLICY_NUM", Kind.SUM, "per_head surrogate: sum w min(r_h A_h, clip(r_h) A_h) over relevant steps"),
    Stat("ENTROPY_NUM", Kind.SUM, "sum w H over relevant steps (H as used in the loss)"),
    Stat("KL_NUM", Kind.SUM, "sum w ((exp(lr) - 1) - lr) over relevant steps"),
    Stat("CLIP_NUM", Kind.SUM, "sum w [r_h > 1 + eps_hi or r_h < 1 - eps_lo] over relevant steps"),
    Stat("RATIO_MAX", Kind.MAX, "max r_h over relevant steps"),
    Stat("LOGP_MIN", Kind.MIN, "min ell over relevant steps"),
    Stat("LOGP_MAX", Kind.MAX, "max ell over relevant steps"),
    Stat("NONFINITE", Kind.COUNT, "present steps (relevant or not) with a non-finite ell"),
    Stat("EMPTY_MASK", Kind.COUNT, "present steps with no valid action"),
    Stat("INVALID_ACTION", Kind.COUNT, "present steps whose action is out of range or masked out"),
    Stat("VALID_MIN", Kind.MIN, "min n (valid actions) over present steps"),
    Stat("VALID_MAX", Kind.MAX, "max n over present steps"),
    Stat("VALID_SUM", Kind.SUM, "sum w n over present steps"),
    Stat("SINGLE", Kind.SUM, "sum w [n == 1] over present steps"),
    Stat("LEARNABLE", Kind.SUM, "sum w [relevant and n > 1] over present steps"),
)


class Form(enum.IntEnum):
    """How a metric row reads its statistic ``x`` and normaliser ``d`` (gated: NaN where there is no data)."""

    MEAN = 0  # x / d where d > 0
    COUNT = 1  # x, always (a measured count; 0 on an empty batch)
    EXTREME = 2  # x where d > 0 and x is not the empty sentinel (+-inf of a MIN/MAX statistic)
    VALUE = 3  # x where d > 0
    SPECIAL = 4  # computed by name in each derivation (see GLOBAL_METRICS)


class Over(enum.IntEnum):
    """A metric row's normaliser or data gate."""

    ONE = 0
    WEIGHT = 1  # global WEIGHT
    STEPS = 2  # global STEPS
    VALUE_WEIGHT = 3  # global VALUE_WEIGHT
    REL_WEIGHT = 4  # the head's REL_WEIGHT (per-head rows only)


@dataclass(frozen=True)
class Metric:
    """One row of the metric table. ``stat`` names a statistic of the row's block (global, or the head's)."""

    name: str
    form: Form
    stat: str = ""
    over: Over = Over.ONE
    doc: str = ""


S, M, C, E, V = Form.SPECIAL, Form.MEAN, Form.COUNT, Form.EXTREME, Form.VALUE
GLOBAL_METRICS: tuple[Metric, ...] = (
    Metric("loss", S, doc="policy_loss + entropy_coef * entropy_loss + value_coef * value_loss"),
    Metric("policy_loss", S, doc="-(joint surrogate mean), or -sum_h (per-head surrogate mean)"),
    Metric("entropy_loss", S, doc="-sum_h k_h E_h over heads with relevant steps"),
    Metric("value_loss", S, doc="0.5 mean_vw of the (clipped) squared error"),
    Metric("approx_kl", S, doc="sum_h KL_NUM_h / sum_h REL_WEIGHT_h (coverage-weighted per-head KL)"),
    Metric("joint_kl_k3", M, "KL_K3", Over.WEIGHT),
    Metric("joint_kl_k1", M, "KL_K1", Over.WEIGHT),
    Metric("clip_fraction", M, "CLIP", Over.WEIGHT),
    Metric("clip_fraction_positive", M, "CLIP_POS", Over.WEIGHT),
    Metric("clip_fraction_negative", M, "CLIP_NEG", Over.WEIGHT),
    Metric("ratio_mean", V, "RATIO_MEAN", Over.WEIGHT),
    Metric(
        "ratio_std",
        S,
        doc="sqrt(RATIO_M2 / WEIGHT), times STEPS / (STEPS - 1) under the root when config.ratio_std == 'unbiased'",
    ),
    Metric("ratio_min", E, "RATIO_MIN", Over.STEPS),
    Metric("ratio_max", E, "RATIO_MAX", Over.STEPS),
    Metric("log_prob_min", S, doc="min over heads of LOGP_MIN (NaN propagates), gated by any relevant data"),
    Metric("log_prob_max", S, doc="max over heads of LOGP_MAX"),
    Metric("steps", C, "STEPS"),
    Metric("weight_sum", C, "WEIGHT"),
    Metric("all_finite", S, doc="1 when no head counts a non-finite ell and the loss is finite, else 0"),
    Metric("explained_variance", S, doc="1 - RESID_M2 / RETURN_M2 with values and RETURN_M2 > 0"),
    Metric("value_clip_fraction", S, doc="VALUE_CLIP / VALUE_WEIGHT with value clipping on"),
    Metric("invalid_weights", C, "BAD_WEIGHTS"),
    Metric("invalid_value_weights", S, doc="BAD_VALUE_WEIGHTS with values, NaN without"),
)

HEAD_METRICS: tuple[Metric, ...] = (
    Metric("entropy", M, "ENTROPY_NUM", Over.REL_WEIGHT),
    Metric("kl", M, "KL_NUM", Over.REL_WEIGHT),
    Metric("clip_fraction", M, "CLIP_NUM", Over.REL_WEIGHT),
    Metric("ratio_max", E, "RATIO_MAX", Over.REL_WEIGHT),
    Metric("nonfinite", C, "NONFINITE"),
    Metric("empty_mask", C, "EMPTY_MASK"),
    Metric("invalid_action", C, "INVALID_ACTION"),
    Metric("valid_actions_min", E, "VALID_MIN", Over.STEPS),
    Metric("valid_actions_max", E, "VALID_MAX", Over.STEPS),
    Metric("valid_actions_mean", M, "VALID_SUM", Over.WEIGHT),
    Metric("single_action_fraction", M, "SINGLE", Over.WEIGHT),
    Metric("relevance_fraction", M, "REL_WEIGHT", Over.WEIGHT),
    Metric("learnable_fraction", M, "LEARNABLE", Over.WEIGHT),
)
del S, M, C, E, V


def _index(stats: tuple[Stat, ...]) -> SimpleNamespace:
    return SimpleNamespace(**{s.name: i for i, s in enumerate(stats)})


#: index of each global statistic (``G.WEIGHT``) and of each per-head statistic within a head's block
G = _index(GLOBAL_STATS)
HD = _index(HEAD_STATS)
#: position of each global metric in the table, and of each per-head metric among HEAD_METRICS
GM = SimpleNamespace(**{m.name.upper(): i for i, m in enumerate(GLOBAL_METRICS)})
HM = SimpleNamespace(**{m.name.upper(): i for i, m in enumerate(HEAD_METRICS)})
GLOBAL_SIZE = len(GLOBAL_STATS)
HEAD_SIZE = len(HEAD_STATS)


def _moments(stats: tuple[Stat, ...], index: SimpleNamespace) -> tuple[tuple[int, int, int], ...]:
    out = []
    for i, s in enumerate(stats):
        if s.kind == Kind.MEAN:
            out.append((getattr(index, s.weight), i, i + 1))
    return tuple(out)


#: the global moments as (weight index, mean index, M2 index)
MOMENTS = _moments(GLOBAL_STATS, G)


def stats_size(num_heads: int) -> int:
    """Length of the statistics vector for ``num_heads`` heads."""
    return GLOBAL_SIZE + num_heads * HEAD_SIZE


def kinds(num_heads: int) -> list[int]:
    """The kind of every entry of the statistics vector."""
    return [int(s.kind) for s in GLOBAL_STATS] + [int(s.kind) for s in HEAD_STATS] * num_heads


def _check() -> None:
    for block, stats in (("global", GLOBAL_STATS), ("head", HEAD_STATS)):
        names = [s.name for s in stats]
        if len(set(names)) != len(names):
            raise AssertionError(f"schema: duplicate {block} statistic names")
        for i, s in enumerate(stats):
            if s.kind == Kind.MEAN:
                if s.weight not in names or stats[names.index(s.weight)].kind != Kind.SUM:
                    raise AssertionError(f"schema: {s.name}'s weight must be a SUM statistic of its block")
                if i + 1 >= len(stats) or stats[i + 1].kind != Kind.M2:
                    raise AssertionError(f"schema: {s.name} must be followed by its M2")
            elif s.kind == Kind.M2 and (i == 0 or stats[i - 1].kind != Kind.MEAN):
                raise AssertionError(f"schema: {s.name} (M2) must follow its MEAN")
    for block, rows, stats in (("global", GLOBAL_METRICS, GLOBAL_STATS), ("head", HEAD_METRICS, HEAD_STATS)):
        names = [s.name for s in stats]
        for m in rows:
            if m.form == Form.SPECIAL:
                if block == "head":
                    raise AssertionError(f"schema: per-head metric {m.name} cannot be SPECIAL")
                continue
            if m.stat not in names:
                raise AssertionError(f"schema: metric {m.name} reads unknown {block} statistic {m.stat!r}")
            if m.over == Over.REL_WEIGHT and block == "global":
                raise AssertionError(f"schema: global metric {m.name} cannot be over REL_WEIGHT")
            if m.form == Form.EXTREME and stats[names.index(m.stat)].kind not in (Kind.MIN, Kind.MAX):
                raise AssertionError(f"schema: EXTREME metric {m.name} needs a MIN or MAX statistic")


_check()


def fingerprint() -> str:
    """A short hash of the layout (statistics, kinds, metric rows): the extension and the package must agree."""
    parts = [f"{s.name}:{int(s.kind)}:{s.weight}" for s in GLOBAL_STATS + HEAD_STATS]
    parts += [f"{m.name}:{int(m.form)}:{m.stat}:{int(m.over)}" for m in GLOBAL_METRICS + HEAD_METRICS]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def render_header() -> str:
    """``csrc/ppo_layout.h``: the statistics and metric layout for the C++/CUDA code (X-macro lists)."""

    def lines(macro: str, rows: list[str]) -> list[str]:
        return [f"#define {macro}(X) \\"] + [f"  {r} \\" for r in rows] + [""]

    out = [
        "// esper_kernels: the statistics vector and metric-table layout. GENERATED from esper_kernels/schema.py",
        "// at build time (do not edit; edit the schema). Each list is an X-macro: X(NAME, KIND) per statistic,",
        "// X(INDEX, FORM, STAT, OVER) per metric row (STAT is -1 for SPECIAL rows).",
        "#pragma once",
        "",
        f"#define ESPER_GLOBAL_SIZE {GLOBAL_SIZE}",
        f"#define ESPER_HEAD_SIZE {HEAD_SIZE}",
        f"#define ESPER_N_GLOBAL_METRICS {len(GLOBAL_METRICS)}",
        f"#define ESPER_N_HEAD_METRICS {len(HEAD_METRICS)}",
        f'#define ESPER_LAYOUT_FINGERPRINT "{fingerprint()}"',
        "",
        "// statistic kinds (esper_kernels.schema.Kind)",
    ]
    out += [f"#define ESPER_KIND_{k.name} {int(k)}" for k in Kind] + [""]
    out += ["// metric forms and normalisers (esper_kernels.schema.Form / Over)"]
    out += [f"#define ESPER_FORM_{f.name} {int(f)}" for f in Form]
    out += [f"#define ESPER_OVER_{o.name} {int(o)}" for o in Over] + [""]
    out += lines("ESPER_GLOBAL_STATS", [f"X({s.name}, ESPER_KIND_{s.kind.name})" for s in GLOBAL_STATS])
    out += lines("ESPER_HEAD_STATS", [f"X({s.name}, ESPER_KIND_{s.kind.name})" for s in HEAD_STATS])
    out += ["// moments: X(WEIGHT, MEAN, M2) (global statistic names)"]
    out += lines(
        "ESPER_GLOBAL_MOMENTS",
        [f"X({GLOBAL_STATS[w].name}, {GLOBAL_STATS[m].name}, {GLOBAL_STATS[q].name})" for w, m, q in MOMENTS],
    )

    def metric_rows(rows: tuple[Metric, ...], prefix: str) -> list[str]:
        res = []
        for i, m in enumerate(rows):
            stat = f"{prefix}{m.stat}" if m.stat else "-1"
            res.append(f"X({i}, {m.name.upper()}, ESPER_FORM_{m.form.name}, {stat}, ESPER_OVER_{m.over.name})")
        return res

    out += ["// metric rows: X(INDEX, NAME, FORM, STAT, OVER); STAT is a GlobalStat (G_*) or HeadStat (HD_*)"]
    out += lines("ESPER_GLOBAL_METRICS", metric_rows(GLOBAL_METRICS, "G_"))
    out += lines("ESPER_HEAD_METRICS", metric_rows(HEAD_METRICS, "HD_"))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header", type=Path, help="write the C++ layout header here")
    parser.add_argument("--fingerprint", action="store_true", help="print the layout fingerprint")
    args = parser.parse_args(argv)
    if args.header:
        text = render_header()
        if not args.header.exists() or args.header.read_text() != text:  # unchanged: keep the mtime (no rebuild)
            args.header.parent.mkdir(parents=True, exist_ok=True)
            args.header.write_text(text)
    if args.fingerprint:
        print(fingerprint())
    return 0


if __name__ == "__main__":
    sys.exit(main())

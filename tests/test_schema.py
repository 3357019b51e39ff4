"""The statistics/metric schema: one definition, and every consumer built from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper_kernels import schema
from esper_kernels.metrics import GLOBAL_METRICS, HEAD_METRICS
from esper_kernels.stats import empty_stats, merge

pytestmark = pytest.mark.reference

ROOT = Path(__file__).resolve().parents[1]


def test_indices_follow_the_declaration_order():
    assert [getattr(schema.G, s.name) for s in schema.GLOBAL_STATS] == list(range(schema.GLOBAL_SIZE))
    assert [getattr(schema.HD, s.name) for s in schema.HEAD_STATS] == list(range(schema.HEAD_SIZE))
    assert schema.stats_size(3) == schema.GLOBAL_SIZE + 3 * schema.HEAD_SIZE
    assert GLOBAL_METRICS == tuple(m.name for m in schema.GLOBAL_METRICS)
    assert HEAD_METRICS == tuple(m.name for m in schema.HEAD_METRICS)


def test_every_moment_is_mean_then_m2_with_a_sum_weight():
    for w, m, q in schema.MOMENTS:
        assert schema.GLOBAL_STATS[w].kind == schema.Kind.SUM
        assert schema.GLOBAL_STATS[m].kind == schema.Kind.MEAN
        assert schema.GLOBAL_STATS[q].kind == schema.Kind.M2 and q == m + 1


def test_the_script_writes_the_header_the_module_renders(tmp_path):
    out = tmp_path / "ppo_layout.h"
    subprocess.run([sys.executable, str(ROOT / "esper_kernels" / "schema.py"), "--header", str(out)], check=True)
    text = out.read_text()
    assert text == schema.render_header()
    assert f"#define ESPER_GLOBAL_SIZE {schema.GLOBAL_SIZE}" in text
    for s in schema.HEAD_STATS:
        assert f"X({s.name}, ESPER_KIND_{s.kind.name})" in text


def test_the_schema_script_imports_no_torch():
    """The build runs it in an environment that may lack torch."""
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
        "assert 'torch' not in sys.modules, 'schema.py imported torch'"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT / "esper_kernels" / "schema.py")], check=True)


def test_the_built_extension_has_this_layout():
    _C = pytest.importorskip("esper_kernels._C")
    assert _C.LAYOUT_FINGERPRINT == schema.fingerprint()
    assert (_C.GLOBAL_SIZE, _C.HEAD_SIZE) == (schema.GLOBAL_SIZE, schema.HEAD_SIZE)


def test_merge_follows_each_kind():
    """Two parts merged: sums and counts add, minima/maxima reduce ignoring NaN, moments combine (Chan)."""
    H = 2
    a, b = empty_stats(H).clone(), empty_stats(H).clone()
    kinds = schema.kinds(H)
    for i, k in enumerate(kinds):
        if k in (schema.Kind.SUM, schema.Kind.COUNT):
            a[i], b[i] = 2.0, 3.0
        elif k == schema.Kind.MIN:
            a[i], b[i] = 1.0, float("nan")
        elif k == schema.Kind.MAX:
            a[i], b[i] = float("nan"), 7.0
    for w, m, q in schema.MOMENTS:
        a[w], a[m], a[q] = 1.0, 0.0, 0.0
        b[w], b[m], b[q] = 3.0, 4.0, 6.0
    out = merge(torch.stack([a, b]))
    for i, k in enumerate(kinds):
        if any(i in mom for mom in schema.MOMENTS):
            continue
        want = {schema.Kind.SUM: 5.0, schema.Kind.COUNT: 5.0, schema.Kind.MIN: 1.0, schema.Kind.MAX: 7.0}[k]
        assert out[i].item() == want, (i, k)
    for _w, m, q in schema.MOMENTS:
        # mean (0 * 1 + 4 * 3) / 4 = 3; M2 = 6 + (4 - 0)^2 * 1 * 3 / 4 = 18
        assert out[m].item() == 3.0 and out[q].item() == 18.0


@pytest.mark.parametrize(
    "means,want_mean,want_m2",
    [
        ((1.0, float("inf")), float("inf"), float("inf")),
        ((float("-inf"), 2.0), float("-inf"), float("inf")),
        ((float("inf"), float("-inf")), float("nan"), float("nan")),
        ((float("nan"), 2.0), float("nan"), float("nan")),
    ],
)
def test_merging_an_infinite_moment_keeps_it(means, want_mean, want_m2):
    """An overflowed joint ratio reads as inf after a merge (never inf - inf = NaN, docs/semantics.md)."""
    from esper_kernels.stats import merge_moment

    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mean, m2 = merge_moment(w, torch.tensor(means, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(mean, torch.tensor(want_mean, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(m2, torch.tensor(want_m2, dtype=torch.float64), equal_nan=True)

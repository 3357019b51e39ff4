"""``python -m esper_kernels bench``: the benchmark matrix of benchmarks/README.md on whatever device is here.

Cases (``CASES``): esper (N = 1,800, esper's 8 heads, S = 41), rl_64k, rl_1m (same heads), wide (two heads of
1,024), vocab (one head of 32,768), and ``tiny`` (N = 16, esper heads), whose rows are the host overhead of one
call (CPU-side wall time, validate=False, no device sync inside the timed region). Dtypes fp32 and bf16 (of the
logits; every other input in the dtype ``synthetic.make_batch`` gives it). Modes:

* ``forward``: ``ppo_loss`` on logits that require grad (the graph a training step builds), metrics not derived;
* ``backward``: ``loss.backward(retain_graph=True)`` of a forward done before the timed region;
* ``full``: forward + backward + ``metrics.tensors()``, as a training step uses it.

Providers: ``reference`` (eager), ``reference_compile`` (torch.compile, default mode), ``reference_compile_ro``
(mode="reduce-overhead", GPU only), the fused backends ``triton``/``cuda``/``cpu`` where
``available_backends()`` says they run on this device, and on the GPU ``<fused>_graph``: a CUDA graph of the
call replayed (GPU time without host overhead; ``reference_graph`` only when asked for by name).

Timing: on the GPU ``triton.testing.do_bench`` (median, 20th and 80th percentiles; it flushes L2 before each
call) over input sets rotated call by call (enough sets to exceed twice the L2); on the CPU, providers are
interleaved call by call and the percentiles taken over the calls. The floor: the fewest bytes the mode must move
(``floor_bytes``) over the copy bandwidth measured in the same run (a large device-to-device copy or, on the
CPU, a large memcpy; bytes read plus written); ``floor_fraction = floor_ms / median_ms`` (NaN for ``tiny``,
whose median is host time). ``peak_extra_mb``: MiB allocated above the inputs at the peak of three calls on one
input set (``torch.cuda.max_memory_allocated``; includes outputs, saved tensors, the gradient and, for the
graph and reduce-overhead providers, the graph pools); NaN on the CPU, where PyTorch keeps no allocator
statistics.

Output: ``bench_<device>.csv`` (columns ``COLUMNS``, one row per case, provider, mode and dtype measured) and
``bench_<device>.png`` in ``--out`` (default ``benchmarks/results``), and a summary table printed last.

Modules: ``cases`` (the cases, modes and dtypes; the standard cases are ``esper_kernels.synthetic.STANDARD_CASES``),
``floor`` (the floor's bytes), ``providers`` (the provider table, which run here), ``runners`` (``Runner``: eager,
compiled and CUDA-graph calls), ``input_sets`` (the rotated input sets), ``timing`` (GPU and interleaved host
timing, the copy bandwidth), ``matrix`` (``Bench``: one run of the matrix), ``results`` (the CSV schema, reading
and writing it), ``summary`` (the printed table), ``plots`` (the PNG), ``provenance`` (device, commit, versions,
date) and ``cli`` (``main``).
"""

from .cases import CASES, DTYPES, MODES, QUICK_CASES, Case
from .cli import main, parse_args
from .floor import floor_bytes, floor_bytes_per_row
from .plots import plot
from .provenance import device_slug
from .providers import PROVIDERS, resolve_providers
from .results import COLUMNS, read_csv, write_csv
from .summary import summary_text
from .timing import copy_bandwidth

__all__ = [
    "CASES",
    "COLUMNS",
    "DTYPES",
    "MODES",
    "PROVIDERS",
    "QUICK_CASES",
    "Case",
    "copy_bandwidth",
    "device_slug",
    "floor_bytes",
    "floor_bytes_per_row",
    "main",
    "parse_args",
    "plot",
    "read_csv",
    "resolve_providers",
    "summary_text",
    "write_csv",
]

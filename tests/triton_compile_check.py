"""Compile the triton backend's kernels for an NVIDIA GPU on a machine without one (no launch, no driver), and
measure them statically.

    python tests/triton_compile_check.py [--arch 90] [--markdown] [--spill-check] [CASE ...]   (default: every case)

Triton's whole compiler (frontend, TritonGPU passes, LLVM, ptxas) runs on the CPU: a stand-in driver reports the
target, and ``JITFunction.warmup`` compiles without launching. This catches what the interpreter
(TRITON_INTERPRET=1) cannot: constructs the GPU compiler rejects (shape rules the interpreter's numpy broadcasting
forgives, loop-carried types, tuple arguments), and register spills. The cases are the kernel variants a step
launches at the benchmark's sizes (tile plan of the real N on a 132-SM H100/H200): the pre-pass, the forward
(writing the gradient), the fix-up (``HOLDS``: keep / rescale / recompute decided on the device; and with
gradients on the per-step outputs) and the metric-table kernel.

Per kernel it reports, statically, for the compiled sm_XX cubin: registers, stack bytes and spill instructions
(LDL/STL), layout conversions (``ttg.convert_layout`` in the TTGIR), SASS instructions (``cuobjdump -sass``,
NOPs excluded) per program and per row, barriers (BAR), shuffles (SHFL), shared-memory and global loads/stores and
MUFU (exp/log/rcp) instructions. Exits 1 when a compile fails, and with ``--spill-check`` when a kernel of a
small-head case spills.

Relies on Triton internals (``triton.runtime.driver.set_active``, ``JITFunction.warmup``, ``kernel.asm``), checked
with triton 3.6. Must run without TRITON_INTERPRET (it unsets it before importing Triton).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import ClassVar

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import esper_kernels as ek
from esper_kernels.backends import triton_backend as tb
from esper_kernels.backends import triton_kernels as tk
from esper_kernels.backends.fused import FusedCall
from esper_kernels.inputs import prepare_inputs
from esper_kernels.synthetic import STANDARD_CASES, make_batch

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")
SM_COUNT = 132  # H100 SXM / H200: the tile plan of the GPU tests and the benchmark
KERNELS = ("_ppo_pre_kernel", "_ppo_main_kernel", "_ppo_metrics_kernel")


class _Driver:
    """Just enough of a driver for the JIT to pick a target and compile."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _sass(cubin: bytes) -> tuple[list[str], dict]:
    """The SASS opcodes of a cubin (NOPs excluded) and its resource usage (cuobjdump)."""
    if not os.path.exists(CUOBJDUMP):
        return [], {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m and not m.group(1).startswith("NOP"):
            ops.append(m.group(1))
    usage = {}
    for line in res.splitlines():
        if "REG:" in line:
            usage = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return ops, usage


class Record:
    """One compiled kernel variant and its static measurements."""

    def __init__(self, case, name, variant, kernel, grid, seconds, rows_per_program):
        self.case, self.name, self.variant, self.grid, self.seconds = case, name, variant, grid, seconds
        self.warps = kernel.metadata.num_warps
        self.rows = rows_per_program
        ops, usage = _sass(kernel.asm["cubin"])
        c = collections.Counter(o.split(".")[0] for o in ops)
        self.sass = len(ops)
        # the forward's per-row part: the instructions before its first atomic (the merge ticket); what follows is
        # the last program's merge, losses and metric table, run once per launch
        first_atom = next((i for i, o in enumerate(ops) if o.startswith("ATOM")), None)
        self.hot = first_atom if (name == "_ppo_main_kernel" and variant == "forward") else None
        self.regs = int(usage.get("REG", -1))
        self.stack = int(usage.get("STACK", -1))
        self.spills = c["LDL"] + c["STL"]
        self.conv = kernel.asm["ttgir"].count("ttg.convert_layout")
        self.counts = {k: c[k] for k in ("BAR", "SHFL", "LDS", "STS", "LDG", "STG", "MUFU")}

    @property
    def per_row(self) -> str:
        """SASS per row of the per-row part, for row-per-lane kernels (a warp's instruction serves its 32 rows); a
        wide-row program loops over column chunks, which a static count does not multiply out ("-")."""
        if self.rows < 32 * self.warps:
            return "-"
        count = self.hot if self.hot is not None else self.sass
        return f"{count / (self.rows / self.warps):.0f}"

    def line(self) -> str:
        cs = " ".join(f"{k} {v}" for k, v in self.counts.items())
        hot = "" if self.hot is None else f", {self.hot} before the ticket"
        return (
            f"{self.case:<16} {self.name:<20} {self.variant:<22} {self.seconds:6.1f}s grid {self.grid:>7} x "
            f"{self.warps} warps  regs {self.regs} stack {self.stack} spills {self.spills} conv {self.conv} "
            f"sass {self.sass}{hot} (/row {self.per_row})  {cs}"
        )

    def markdown(self) -> str:
        c = self.counts
        hot = "" if self.hot is None else f" ({self.hot:,})"
        return (
            f"| {self.name} ({self.case}, {self.variant}) | {self.grid} x {self.warps} | {self.regs} | "
            f"{self.stack} B / {self.spills} | {self.conv} | {self.sass:,}{hot} | {self.per_row} | {c['BAR']} | "
            f"{c['SHFL']} | {c['LDS']} + {c['STS']} | {c['LDG']} + {c['STG']} | {c['MUFU']} |"
        )


class _Warmup:
    """Stands in for a kernel: ``kernel[grid](...)`` compiles (warmup) instead of launching."""

    log: ClassVar[list[Record]] = []
    case = ""
    rows = 0

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            t = time.time()
            k = self.fn.warmup(*args, grid=grid, **kwargs)
            if self.name == "_ppo_main_kernel":
                variant = ("fix-up" if kwargs["FIXUP"] else "forward") + (
                    "" if not kwargs["FIXUP"] else (" +outputs' grads" if kwargs["HAS_GLP"] else " (held)")
                )
                rows = kwargs["BN"]
            else:
                variant, rows = "-", 0
            _Warmup.log.append(Record(_Warmup.case, self.name, variant, k, grid[0], time.time() - t, rows))

        return compile_only


def compile_case(name: str, batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig, n_real: int) -> None:
    """Compile the pre-pass, the forward, both fix-up variants and the metric table for ``batch``'s form with the
    tile plan of n_real rows."""
    _Warmup.case = name
    cfg = config.resolve(layout)
    inp = prepare_inputs(
        layout,
        batch["logits"],
        batch.get("action_masks"),
        batch["actions"],
        batch["old_log_probs"],
        batch["advantages"],
        head_relevance=batch.get("head_relevance"),
        weights=batch.get("weights"),
        values=batch.get("values"),
        returns=batch.get("returns"),
        old_values=batch.get("old_values"),
        per_head_advantages_allowed=cfg.per_head,
        value_clip=config.value_clip is not None,
    )

    def new_call():
        return FusedCall(
            list(inp.logits),
            list(inp.masks or ()),
            list(inp.actions),
            list(inp.old_log_probs),
            inp.advantages,
            list(inp.relevance or ()),
            inp.weights,
            inp.values,
            inp.returns,
            inp.old_values,
            inp.value_weights,
            tuple(layout.sizes),
            cfg,
        )

    plan_init = tb._Plan.__init__

    def real_plan(self, sizes, n, device, groupable, floors=()):
        plan_init(self, sizes, n_real, torch.device("cuda"), groupable, floors)

    tb._Plan.__init__ = real_plan
    try:
        backend = tb.TritonBackend()
        call = new_call()
        grads = [torch.empty(t.shape, dtype=t.dtype) for t in call.logits]
        gv = None if call.values is None else torch.empty(call.n)
        _, _, _, _, stats, saved, _ = backend.kernel_forward(call, grads, gv)
        n, h = call.n, call.num_heads
        backend.kernel_backward(call, stats, saved, torch.ones(4), None, None, grads=grads, grad_values=gv, holds=True)
        backend.kernel_backward(
            call,
            stats,
            saved,
            torch.ones(4),
            torch.ones(n, h),
            torch.ones(n, h),
            grads=grads,
            grad_values=gv,
            holds=True,
        )
        backend.metric_table(stats.clone(), cfg, call.values is not None)
    finally:
        tb._Plan.__init__ = plan_init


def cases() -> dict:
    from harness import per_head

    esper = ek.HeadLayout(ek.ESPER_HEADS)
    joint = ek.PPOLossConfig(entropy_coef=0.01)
    per_head_cfg = ek.PPOLossConfig(
        surrogate="per_head",
        normalize_entropy=True,
        entropy_coef=0.05,
        clip_eps_high=0.28,
        prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.1},
        value_clip=0.2,
        entropy_coef_per_head={"op": 2.0, "tempo": 0.5},
        normalize_advantages=True,
    )

    def esper_batch(dtype=torch.float32, **kw):
        return make_batch((8,), esper, dtype=dtype, **kw)

    def with_old_values(b):
        b["old_values"] = b["values"] + 0.1
        return b

    def separate():
        b = esper_batch(torch.bfloat16)
        b["logits"] = {k: v.clone() for k, v in per_head(b["logits"], esper, as_mapping=True).items()}
        b["action_masks"] = [m.to(torch.uint8) for m in per_head(b["action_masks"], esper)]
        b["actions"] = [b["actions"][..., h].to(torch.int32) for h in range(esper.num_heads)]
        return b

    def big():
        layout = ek.HeadLayout({"token": 131072})
        b = make_batch((8,), layout, dtype=torch.bfloat16, values=False)
        return dict(
            logits=b["logits"],
            action_masks=None,
            actions=b["actions"],
            old_log_probs=b["old_log_probs"],
            advantages=b["advantages"],
        ), layout

    n = {name: case.n_rows for name, case in STANDARD_CASES.items()}  # the N each standard case plans its kernels for
    wide2 = STANDARD_CASES["wide"].layout
    vocab = STANDARD_CASES["vocab"].layout
    wide_floor = ek.HeadLayout({"a": 3, "w": 40000, "b": 5})
    return {
        "esper_fp32": lambda: (esper_batch(), esper, joint, n["esper"]),
        "esper_bf16": lambda: (esper_batch(torch.bfloat16), esper, joint, n["esper"]),
        "esper_fp16": lambda: (esper_batch(torch.float16), esper, joint, n["esper"]),
        "esper_per_head": lambda: (with_old_values(esper_batch()), esper, per_head_cfg, n["esper"]),
        "separate_bf16": lambda: (separate(), esper, joint, n["esper"]),
        "rl_1m_fp32": lambda: (esper_batch(), esper, joint, n["rl_1m"]),
        "rl_1m_bf16": lambda: (esper_batch(torch.bfloat16), esper, joint, n["rl_1m"]),
        "rl_1m_per_head": lambda: (with_old_values(esper_batch()), esper, per_head_cfg, n["rl_1m"]),
        "wide_fp32": lambda: (make_batch((8,), wide2), wide2, joint, n["wide"]),
        "vocab_bf16": lambda: (
            make_batch((8,), vocab, dtype=torch.bfloat16),
            vocab,
            ek.PPOLossConfig(entropy_coef=0.01, normalize_entropy=True),
            n["vocab"],
        ),
        "big_bf16": lambda: (*big(), ek.PPOLossConfig(), 16500),
        "wide_floor_bf16": lambda: (
            with_old_values(make_batch((8,), wide_floor, dtype=torch.bfloat16)),
            wide_floor,
            ek.PPOLossConfig(
                surrogate="per_head", normalize_entropy=True, value_clip=0.2, prob_floor={"w": 0.01, "a": 0.1}
            ),
            4096,
        ),
    }


#: cases whose heads are all small (a spill there fails --spill-check)
SMALL_CASES = (
    "esper_fp32",
    "esper_bf16",
    "esper_fp16",
    "esper_per_head",
    "separate_bf16",
    "rl_1m_fp32",
    "rl_1m_bf16",
    "rl_1m_per_head",
)

MARKDOWN_HEADER = (
    "| kernel (case, variant) | grid x warps | regs | stack / spill instr. | layout conversions | "
    "SASS / warp (before the ticket) | SASS / row | BAR | SHFL | LDS + STS | LDG + STG | MUFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90: H100/H200)")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table (benchmarks/NOTES.md)")
    p.add_argument("--spill-check", action="store_true", help="exit 1 when a small-head case's kernel spills")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a tuning knob of triton_backend (e.g. GROUP_MAX=0, SMALL_WARPS=1, TILE_STORE=0)",
    )
    p.add_argument("cases", nargs="*", help="default: all")
    a = p.parse_args(argv)
    for item in a.set:
        knob, value = item.split("=", 1)
        if not hasattr(tb, knob):
            p.error(f"--set: triton_backend has no knob {knob!r}")
        setattr(tb, knob, type(getattr(tb, knob))(int(value)) if not isinstance(getattr(tb, knob), str) else value)
    driver.set_active(_Driver(a.arch))
    tb._sm_count = lambda device: SM_COUNT
    for name in KERNELS:
        setattr(tk, name, _Warmup(getattr(tk, name), name))
    tb._KERNELS = tk
    all_cases = cases()
    failed = []
    t0 = time.time()
    for name in a.cases or list(all_cases):
        try:
            compile_case(name, *all_cases[name]())
        except Exception as e:  # report and go on
            failed.append(name)
            print(f"{name}: COMPILE FAILED: {type(e).__name__}: {e}", flush=True)
    seen = set()
    unique = []
    for r in _Warmup.log:
        key = (r.case, r.name, r.variant)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    for r in unique:
        print(r.line())
    spilled = [r for r in unique if r.case in SMALL_CASES and (r.spills or r.stack > 0)]
    if a.markdown:
        print("\n" + MARKDOWN_HEADER)
        for r in unique:
            print(r.markdown())
    print(
        f"sm_{a.arch}: {len(_Warmup.log)} kernel compiles in {time.time() - t0:.0f}s"
        + (f", FAILED: {failed}" if failed else ", all compiled")
        + (
            f"; SPILLS in small-head kernels: {[(r.case, r.name, r.variant) for r in spilled]}"
            if spilled
            else "; no spills in small-head kernels"
        )
    )
    return 1 if failed or (a.spill_check and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())

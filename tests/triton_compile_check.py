"""Compile the triton backend's kernels for an NVIDIA GPU on a machine without one (no launch, no driver).

    python tests/triton_compile_check.py [--arch 90] [CASE ...]        (default: every case)

Triton's whole compiler (frontend, TritonGPU passes, LLVM, ptxas) runs on the CPU: a stand-in driver reports the
target, and ``JITFunction.warmup`` compiles without launching. This catches what the interpreter
(TRITON_INTERPRET=1) cannot: constructs the GPU compiler rejects (shape rules the interpreter's numpy broadcasting
forgives, loop-carried types, tuple arguments), and register spills. The cases are the kernel variants
tests/test_gpu_triton.py launches (layouts, dtypes, options and tile sizes at the real N). Prints, per kernel,
the compile time, warps, grid and the cubin's registers / stack (cuobjdump); exits 1 when a compile fails.

Relies on Triton internals (``triton.runtime.driver.set_active``, ``JITFunction.warmup``, ``kernel.asm``), checked
with triton 3.6. Must run without TRITON_INTERPRET (it unsets it before importing Triton).
"""

from __future__ import annotations

import argparse
import os
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
from esper_kernels.synthetic import SPEC_CASES, make_batch

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SM_COUNT = 132  # H100 SXM: the tile plan of the GPU tests


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


def _resources(cubin: bytes) -> str:
    if not os.path.exists(CUOBJDUMP):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
            return f"regs {fields.get('REG')} stack {fields.get('STACK')} shared {fields.get('SHARED')}"
    return ""


class _Warmup:
    """Stands in for a kernel: ``kernel[grid](...)`` compiles (warmup) instead of launching."""

    log: ClassVar[list[tuple]] = []
    case = ""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            t = time.time()
            k = self.fn.warmup(*args, grid=grid, **kwargs)
            _Warmup.log.append((_Warmup.case, self.fn.fn.__name__, time.time() - t, k.metadata.num_warps, grid[0],
                                _resources(k.asm["cubin"])))
        return compile_only


def compile_case(name: str, batch: dict, layout: ek.HeadLayout, config: ek.PPOLossConfig, n_real: int) -> None:
    """Compile forward, every reduction stage, backward and the metric table for ``batch``'s form with the tile
    plan of n_real rows."""
    _Warmup.case = name
    cfg = config.resolve(layout)
    inp = prepare_inputs(layout, batch["logits"], batch.get("action_masks"), batch["actions"], batch["old_log_probs"],
                         batch["advantages"], head_relevance=batch.get("head_relevance"),
                         weights=batch.get("weights"), values=batch.get("values"), returns=batch.get("returns"),
                         old_values=batch.get("old_values"), per_head_advantages_allowed=cfg.per_head,
                         value_clip=config.value_clip is not None)
    call = FusedCall(list(inp.logits), list(inp.masks or ()), list(inp.actions), list(inp.old_log_probs),
                     inp.advantages, list(inp.relevance or ()), inp.weights, inp.values, inp.returns, inp.old_values,
                     inp.value_weights, tuple(layout.sizes), cfg)
    plan_init = tb._Plan.__init__

    def real_plan(self, sizes, n, device, floors=()):
        plan_init(self, sizes, n_real, torch.device("cuda"), floors)

    tb._Plan.__init__ = real_plan
    try:
        backend = tb.TritonBackend()
        losses, _, _, _, stats, saved = backend.kernel_forward(call)
        plan = tb._Plan(layout.sizes, n_real, None)
        part = torch.empty((max(plan.programs, 1), stats.numel()))
        tb.TritonBackend._reduce(tk, part, plan.programs, stats, losses, layout.num_heads, cfg)  # n_real's stages
        n, h = call.n, call.num_heads
        backend.kernel_backward(call, stats, saved, torch.ones(4), torch.ones(n, h), torch.ones(n, h))
        backend.metric_table(stats, cfg, call.values is not None)
    finally:
        tb._Plan.__init__ = plan_init


def cases() -> dict:
    from harness import per_head

    esper = ek.HeadLayout(ek.ESPER_HEADS)
    joint = ek.PPOLossConfig(entropy_coef=0.01)
    per_head_cfg = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05,
                                    clip_eps_high=0.28, prob_floor={"op": 0.05, "blueprint": 0.02, "slot": 0.1},
                                    value_clip=0.2, entropy_coef_per_head={"op": 2.0, "tempo": 0.5})

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
        return dict(logits=b["logits"], action_masks=None, actions=b["actions"], old_log_probs=b["old_log_probs"],
                    advantages=b["advantages"]), layout

    n = {name: case.n_rows for name, case in SPEC_CASES.items()}  # the N each SPEC case plans its kernels for
    wide2 = SPEC_CASES["wide"].layout
    vocab = SPEC_CASES["vocab"].layout
    wide_floor = ek.HeadLayout({"a": 3, "w": 40000, "b": 5})
    return {
        "esper_fp32": lambda: (esper_batch(), esper, joint, n["esper"]),
        "esper_bf16": lambda: (esper_batch(torch.bfloat16), esper, joint, n["esper"]),
        "esper_fp16": lambda: (esper_batch(torch.float16), esper, joint, n["esper"]),
        "esper_per_head": lambda: (with_old_values(esper_batch()), esper, per_head_cfg, n["esper"]),
        "separate_bf16": lambda: (separate(), esper, joint, n["esper"]),
        "rl_64k_bf16": lambda: (esper_batch(torch.bfloat16), esper, joint, n["rl_64k"]),
        "wide_fp32": lambda: (make_batch((8,), wide2), wide2, joint, n["wide"]),
        "vocab_bf16": lambda: (make_batch((8,), vocab, dtype=torch.bfloat16), vocab,
                               ek.PPOLossConfig(entropy_coef=0.01, normalize_entropy=True), n["vocab"]),
        "big_bf16": lambda: (*big(), ek.PPOLossConfig(), 16500),
        "wide_floor_bf16": lambda: (with_old_values(make_batch((8,), wide_floor, dtype=torch.bfloat16)), wide_floor,
                                    ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, value_clip=0.2,
                                                     prob_floor={"w": 0.01, "a": 0.1}), 4096),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90: H100)")
    p.add_argument("cases", nargs="*", help="default: all")
    a = p.parse_args(argv)
    driver.set_active(_Driver(a.arch))
    tb._sm_count = lambda device: SM_COUNT
    for name in ("_ppo_fwd_kernel", "_ppo_bwd_kernel", "_ppo_reduce_kernel", "_ppo_metrics_kernel"):
        setattr(tk, name, _Warmup(getattr(tk, name)))
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
    for case, kernel, seconds, warps, grid, res in _Warmup.log:
        print(f"{case:<16} {kernel:<20} {seconds:6.1f}s  warps {warps}  grid {grid:>6}  {res}")
    print(f"sm_{a.arch}: {len(_Warmup.log)} kernel compiles in {time.time() - t0:.0f}s"
          + (f", FAILED: {failed}" if failed else ", all compiled"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

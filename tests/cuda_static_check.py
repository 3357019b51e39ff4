"""Compile the cuda backend's kernels for sm_90 (no GPU needed) and report, per kernel, registers, stack, spills,
shared memory and SASS instruction counts; and the SASS per row of the small-head path from probe kernels.

    python tests/cuda_static_check.py [--arch 90] [--markdown]

Needs nvcc (and a cuobjdump: on PATH, or the one in Triton's package). ``ppo_layout.h`` is generated from
esper_kernels/schema.py into a temporary folder first (as the build does).

Kernels: csrc/ppo_cuda.cu as built (``small_kernel<8|16|32>``: the small-head path by widest head width class;
``wide_kernel<1|0>``: a cluster per row, staged / re-read; ``prepass_kernel``; ``metrics_kernel``, the metric table
of merged statistics). SASS counts are static counts of each kernel's whole code (every path).

Probes (a .cu written here, compiled the same way): one thread's work on one row of esper's heads (3, 13, 4, 3, 3,
4, 5, 6; packed fp32 logits and masks, relevance, values, no floor), forward with the gradient, the configuration's
flags and dtypes fixed as constants (the uniform branches the kernel takes), the head loop unrolled with each head at
its padded width as in the kernel: the straight-line code a row-thread executes, so its SASS count is the
warp-instructions per 32 rows (both sides of data-dependent branches counted: an upper bound). The tile phases
around it (staging, the statistics' tile folds, the gradient's store) are loops; they are counted from their own
probes, which run one thread's share of one 64-row tile with the trip counts of esper's tile fixed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
#: the kernels whose registers must not spill (the small-head path and the pre-pass)
NO_SPILL = ("small_kernel<8>", "small_kernel<16>", "small_kernel<32>", "prepass_kernel")

PROBE = r"""
#include "ppo_cuda_exec.cuh"  // the kernels' own device policy (DevSmallX)
using namespace esper;
using DevX = esper::cudaexec::DevSmallX;

namespace {
constexpr int R = 64, S = 41, PITCH = 41, RS = R + 8;

// esper's call with the run-time configuration's flags and dtypes fixed (uniform branches the real kernel takes);
// the head sizes and offsets stay run-time values, so each head runs its padded width (W = 4, 16, 4, 4, 4, 4, 8, 8)
__device__ __forceinline__ void fix_config(PPOParams& P, op::OnePass& O, int per_head) {
  P.num_heads = 8;
#pragma unroll
  for (int h = 0; h < 8; ++h) {
    P.floor[h] = 0.f;
    P.actions[h].dtype = DT_I64;
    P.old_lp[h].dtype = DT_F32;
    P.rel[h].dtype = DT_U8;
    P.adv[h].dtype = DT_F32;
  }
  P.logits_dtype = DT_F32;
  P.has_mask = 1;
  P.has_rel = 1;
  P.per_head = per_head;
  P.adv_per_head = 0;
  P.normalize_entropy = 0;
  P.has_values = 1;
  P.has_vclip = 0;
  P.has_jclamp = 1;
  P.mask_exclude = 1;
  P.normalize_adv = 0;
  P.weights.dtype = DT_F32;
  P.values.dtype = DT_F32;
  P.returns.dtype = DT_F32;
  P.value_weights.ptr = 0;
  P.grad_log_probs.ptr = 0;
  P.grad_entropy.ptr = 0;
  O.fixup = 0;
  O.write_grad = 1;
  O.joint_c = !per_head;
  O.pitch = PITCH;
  O.rows = R;
}
}  // namespace

// one row-thread's forward with the gradient on esper's heads
template <int PER_HEAD>
__global__ void __launch_bounds__(R, 1) probe_row(const __grid_constant__ PPOParams P0,
                                                   const __grid_constant__ op::OnePass O0) {
  extern __shared__ __align__(16) unsigned char smem[];
  PPOParams P = P0;
  op::OnePass O = O0;
  fix_config(P, O, PER_HEAD);
  const op::SmallSmem sm = op::small_carve(smem, 8, R, PITCH, !PER_HEAD, true, true);
  const int r = threadIdx.x;
  const int64_t i = (int64_t)blockIdx.x * R + r;
  const op::StepIn s = op::step_in(P, i);
  const op::Up up = op::upstream_of(P, sm.b.g4);
  float L = 0.f;
  uint32_t jf = 0u;
  op::HeadC hc[8];
  op::small_head_w<4>(P, O, sm, up, 0, i, r, s, L, jf, hc[0].v, 1);
  op::small_head_w<16>(P, O, sm, up, 1, i, r, s, L, jf, hc[1].v, 1);
  op::small_head_w<4>(P, O, sm, up, 2, i, r, s, L, jf, hc[2].v, 1);
  op::small_head_w<4>(P, O, sm, up, 3, i, r, s, L, jf, hc[3].v, 1);
  op::small_head_w<4>(P, O, sm, up, 4, i, r, s, L, jf, hc[4].v, 1);
  op::small_head_w<4>(P, O, sm, up, 5, i, r, s, L, jf, hc[5].v, 1);
  op::small_head_w<8>(P, O, sm, up, 6, i, r, s, L, jf, hc[6].v, 1);
  op::small_head_w<8>(P, O, sm, up, 7, i, r, s, L, jf, hc[7].v, 1);
  op::GlobC gc;
  const op::GlobalTerms g = op::global_terms(P, sm.b.nm, up, i, s, L, gc.v, 1, sm.b.hc);
  reinterpret_cast<float*>(P.joint_ratio)[i] = g.r;
  reinterpret_cast<float*>(O.gv)[i] = g.gv;
#pragma unroll
  for (int m = 0; m < op::NMOM; ++m) {
    gc.mw[m] = g.mom[m].w;
    gc.mx[m] = g.mom[m].m;
  }
  // the warps' statistics of the row (per warp: a warp-instruction each)
  DevX x;
  const int K = op::stats_k(8);
#pragma unroll
  for (int h = 0; h < 8; ++h) {
    DevX::Local<op::HeadC> l{hc[h]};
    x.warp_head_stats(l, sm.wacc, K, ESPER_GLOBAL_SIZE + h * ESPER_HEAD_SIZE);
  }
  DevX::Local<op::GlobC> lg{gc};
  x.warp_global_stats(lg, sm.wacc, sm.wmom, K);
  if (!PER_HEAD && g.gbase != 0.f) {  // small_joint_pass with esper's sizes unrolled (its dynamic work)
    const int SZ[8] = {3, 13, 4, 3, 3, 4, 5, 6};
    const int OFF[8] = {0, 3, 16, 20, 23, 26, 30, 35};  // (the real pass loops over the run-time sizes)
    const bool fin = is_finite(g.gbase);
#pragma unroll
    for (int h = 0; h < 8; ++h) {
      if (!((jf >> h) & 1u)) continue;
      float* G = sm.zt + r * PITCH + OFF[h];
      const float* Cf = sm.ct + r * PITCH + OFF[h];
      const uint8_t* U = sm.ut + r * PITCH + OFF[h];
#pragma unroll
      for (int j = 0; j < SZ[h]; ++j)
        if (U[j]) G[j] = fin ? G[j] + g.gbase * Cf[j] : f_nan();
    }
  }
}

// one thread's share of staging one tile (esper: 64 x 41 fp32 logits and bool masks, 16-byte loads)
__global__ void __launch_bounds__(R, 1) probe_stage(const float* __restrict__ z, const uint8_t* __restrict__ m) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* zt = reinterpret_cast<float*>(smem);
  uint8_t* ut = smem + sizeof(float) * R * PITCH;
  op::Seg sz{(uintptr_t)z, S, 0, S, ((1ull << 40) + S - 1) / S};
  // R * S / 4 = 656 vectors over 64 threads: 10 (+1 for 16 threads); 164 mask vectors: 2 (+1 for 36)
#pragma unroll
  for (int it = 0; it < 10; ++it) {
    const int64_t v = threadIdx.x + it * R;
    const op::V16 x = op::ld16(sz.ptr + (uintptr_t)(v * 16));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = v * 4 + k;
      const int rr = op::div_magic(e, sz);
      zt[rr * PITCH + (int)(e - (int64_t)rr * S)] = op::v16_elem<4>(x, k, DT_F32);
    }
  }
#pragma unroll
  for (int it = 0; it < 3; ++it) {
    const int64_t v = threadIdx.x + it * R;
    const op::V16 x = op::ld16((uintptr_t)m + (uintptr_t)(v * 16));
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int64_t e = v * 16 + k;
      const int rr = op::div_magic(e, sz);
      ut[rr * PITCH + (int)(e - (int64_t)rr * S)] = op::v16_elem<1>(x, k, DT_U8) != 0.f ? 1 : 0;
    }
  }
}

// one thread's share of the gradient's store (10 vectors of 4 floats)
__global__ void __launch_bounds__(R, 1) probe_store(float* __restrict__ g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const float* zt = reinterpret_cast<const float*>(smem);
  op::Seg sg{(uintptr_t)g, S, 0, S, ((1ull << 40) + S - 1) / S};
#pragma unroll
  for (int it = 0; it < 10; ++it) {
    const int64_t v = threadIdx.x + it * R;
    op::V16 x{{0u, 0u, 0u, 0u}};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = v * 4 + k;
      const int rr = op::div_magic(e, sg);
      x.w[k] = op::f_bits(zt[rr * PITCH + (int)(e - (int64_t)rr * S)], DT_F32);
    }
    op::st16(sg.ptr + (uintptr_t)(v * 16), x);
  }
}

template __global__ void probe_row<0>(const __grid_constant__ PPOParams, const __grid_constant__ op::OnePass);
template __global__ void probe_row<1>(const __grid_constant__ PPOParams, const __grid_constant__ op::OnePass);
""".replace("RV_", "op::RV")

KERNEL_NAMES = [
    (r"small_kernelILi8E", "small_kernel<8>"),
    (r"small_kernelILi16E", "small_kernel<16>"),
    (r"small_kernelILi32E", "small_kernel<32>"),
    (r"wide_kernelILb1E", "wide_kernel<staged>"),
    (r"wide_kernelILb0E", "wide_kernel<streamed>"),
    (r"prepass_kernel", "prepass_kernel"),
    (r"metrics_kernel", "metrics_kernel"),
    (r"probe_rowILi0E", "probe_row<joint>"),
    (r"probe_rowILi1E", "probe_row<per_head>"),
    (r"probe_stage", "probe_stage"),
    (r"probe_store", "probe_store"),
]


def _short(mangled: str) -> str:
    for pat, name in KERNEL_NAMES:
        if re.search(pat, mangled):
            return name
    return mangled


def find_cuobjdump() -> str | None:
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import triton
    except ImportError:
        return None
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return exe if os.path.exists(exe) else None


def compile_cubin(src: Path, out: Path, include: list[Path], arch: int) -> str:
    """nvcc -cubin with -Xptxas -v; returns ptxas's report."""
    cmd = [
        "nvcc",
        "-std=c++17",
        f"-arch=sm_{arch}",
        "-O3",
        "--expt-relaxed-constexpr",
        "-Xptxas",
        "-v",
        "-cubin",
        *[f"-I{p}" for p in include],
        str(src),
        "-o",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stderr[-6000:]}")
    return r.stderr


def parse_ptxas(report: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    cur = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = _short(m.group(1))
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            out[cur]["static_smem"] = int(m.group(1))
    return out


def sass_counts(cubin: Path, cuobjdump: str) -> dict[str, Counter]:
    r = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {r.stderr[-2000:]}")
    res = {}
    for part in re.split(r"\n\s*Function : ", r.stdout)[1:]:
        name = _short(part.split("\n", 1)[0].strip())
        ins = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+([^;]*);", part)
        ops = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in ins]
        ops = [o for o in ops if o != "NOP"]  # (alignment padding after the last instruction)
        c = Counter(ops)
        c["TOTAL"] = len(ops)
        res[name] = c
    return res


def run(arch: int = 90) -> dict:
    """Compile and measure; returns {"kernels": {name: {...}}, "probes": {name: {...}}}."""
    cuobjdump = find_cuobjdump()
    if shutil.which("nvcc") is None or cuobjdump is None:
        raise RuntimeError("needs nvcc and cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = tmp / "generated"
        subprocess.run(
            [sys.executable, str(ROOT / "esper_kernels" / "schema.py"), "--header", str(gen / "ppo_layout.h")],
            check=True,
        )
        inc = [gen, CSRC]
        rep = compile_cubin(CSRC / "ppo_cuda.cu", tmp / "ppo_cuda.cubin", inc, arch)
        kernels = parse_ptxas(rep)
        for name, c in sass_counts(tmp / "ppo_cuda.cubin", cuobjdump).items():
            kernels.setdefault(name, {})["sass"] = c
        (tmp / "probe.cu").write_text(PROBE)
        rep = compile_cubin(tmp / "probe.cu", tmp / "probe.cubin", inc, arch)
        probes = parse_ptxas(rep)
        for name, c in sass_counts(tmp / "probe.cubin", cuobjdump).items():
            probes.setdefault(name, {})["sass"] = c
    return {"kernels": kernels, "probes": probes}


def per_row(probes: dict, surrogate: str = "joint") -> dict[str, float]:
    """Warp-instructions per row of the small path's forward with the gradient on esper's heads (R = 64)."""
    row = probes[f"probe_row<{surrogate}>"]["sass"]["TOTAL"] / 32.0  # one thread's row: a warp does 32 of them
    # the tile phases: per thread per 64-row tile; 2 warps per tile, so per row = per-thread count * 2 / 64
    tile = {k: probes[k]["sass"]["TOTAL"] * 2 / 64.0 for k in ("probe_stage", "probe_store")}
    out = {"row (compute + warp statistics)": row, **{k.replace("probe_", "tile "): v for k, v in tile.items()}}
    out["total"] = sum(out.values())
    return out


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def report(res: dict, markdown: bool = False) -> str:
    lines = []
    head = [
        "kernel",
        "regs",
        "stack B",
        "spill st/ld B",
        "SASS",
        "MUFU",
        "LDG",
        "STG",
        "LDS",
        "STS",
        "SHFL",
        "BAR",
        "DADD/DFMA",
        "CALL",
    ]  # (generic LD/ST to global memory are counted apart: LD, ST)
    rows = []
    for name, k in res["kernels"].items():
        c = k.get("sass", Counter())
        spill = f"{k.get('spill_st', '?')}/{k.get('spill_ld', '?')}"
        rows.append(
            [
                name,
                k.get("regs", "?"),
                k.get("stack", "?"),
                spill,
                c["TOTAL"],
                c["MUFU"],
                c["LDG"],
                c["STG"],
                c["LDS"],
                c["STS"],
                c["SHFL"],
                c["BAR"],
                c["DADD"] + c["DFMA"],
                c["CALL"],
            ]
        )
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            lines.append("| " + " | ".join(_fmt(x) if isinstance(x, (int, float)) else str(x) for x in r) + " |")
    else:
        lines.append(" ".join(f"{h:>13}" for h in head))
        for r in rows:
            lines.append(" ".join(f"{(_fmt(x) if isinstance(x, (int, float)) else str(x)):>13}" for x in r))
    lines.append("")
    for s in ("joint", "per_head"):
        pr = per_row(res["probes"], s)
        lines.append(
            f"SASS per row, esper heads, {s} surrogate, forward with gradient (warp-instructions): "
            + ", ".join(f"{k} {v:.1f}" for k, v in pr.items())
        )
    probe_regs = {k: (v.get("regs"), v.get("sass", {}).get("TOTAL")) for k, v in res["probes"].items()}
    lines.append("probes (regs, SASS): " + ", ".join(f"{k} {v}" for k, v in probe_regs.items()))
    return "\n".join(lines)


def spills(res: dict) -> list[str]:
    """The no-spill kernels that spill (or use a stack frame)."""
    bad = []
    for name in NO_SPILL:
        k = res["kernels"].get(name)
        if k is None:
            bad.append(f"{name}: not found")
        elif k.get("spill_st", 1) or k.get("spill_ld", 1) or k.get("stack", 1):
            bad.append(
                f"{name}: {k.get('spill_st')} B spill stores, {k.get('spill_ld')} B spill loads, "
                f"{k.get('stack')} B stack"
            )
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    res = run(a.arch)
    print(report(res, a.markdown))
    bad = spills(res)
    if bad:
        print("SPILLS: " + "; ".join(bad))
        return 1
    print("no spills in " + ", ".join(NO_SPILL))
    return 0


if __name__ == "__main__":
    sys.exit(main())

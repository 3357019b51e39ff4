"""The CPU backend's AVX-512 code stays inside its AVX-512 files (csrc/cpu/, csrc/CMakeLists.txt).

The AVX-512 paths are separate translation units built with -mavx512f -mavx512bw -mavx512vl -mavx512dq; the
driver calls them only on a CPU with AVX-512. An inline function with external linkage that such a file uses
(from a shared header) would be emitted there as an AVX-512 COMDAT copy, and the linker keeps one copy for every
caller: a generic caller could then run AVX-512 instructions on a CPU without them (SIGILL). Checked on the
object files of the build in this checkout (build/<wheel tag>/csrc/CMakeFiles/_C.dir):

* an AVX-512 object defines no symbol the linker could share: nothing weak, and nothing global outside the
  entry points (namespace esper::cpu::avx512) -- with nm, which also reads GCC's LTO objects;
* a generic object (driver, block path, bindings) has no AVX-512 instruction (a zmm or mask register, or
  xmm/ymm16-31) outside the AVX-512 clones of target_clones functions -- with objdump on the machine code
  that GCC builds keep beside the LTO bytecode (-ffat-lto-objects).

``python tests/test_cpu_isa.py [OBJ_DIR]`` runs the same checks and prints what it found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.native

ROOT = Path(__file__).resolve().parents[1]
AVX512_FILES = ("avx512_small.cpp.o", "avx512_wide.cpp.o")
GENERIC_FILES = ("driver.cpp.o", "block.cpp.o")
ENTRY_PREFIX = "esper::cpu::avx512::"
# operands only AVX-512 has: zmm registers, opmask registers, the upper 16 xmm/ymm registers
AVX512_OPERAND = re.compile(r"%zmm\d+|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
CLONE = "[clone .avx512f"  # target_clones' AVX-512 variant (dispatched at load time by CPU features)


def object_dirs() -> list[Path]:
    return sorted(p for p in ROOT.glob("build/*/csrc/CMakeFiles/_C.dir") if (p / "cpu").is_dir())


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def shared_symbols(obj: Path) -> list[str]:
    """Problems with the symbols an AVX-512 object defines: weak ones, and global ones not entry points."""
    bad = []
    for line in _run("nm", "-C", "--defined-only", str(obj)).splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) < 3:
            continue
        _, kind, name = parts
        if kind in "VvWwu":
            bad.append(f"weak {kind} {name}")
        elif kind.isupper() and not name.startswith(ENTRY_PREFIX):
            bad.append(f"global {kind} {name}")
    return bad


def avx512_instructions(obj: Path) -> tuple[int, list[str]]:
    """(instructions read, the functions of a generic object that use AVX-512 operands outside clones)."""
    out = _run("objdump", "-d", "-C", "--no-show-raw-insn", str(obj))
    fn, count, bad = "", 0, {}
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        if "\t" not in line:
            continue
        count += 1
        if AVX512_OPERAND.search(line) and CLONE not in fn:
            bad.setdefault(fn, line.strip())
    return count, [f"{f}: {i}" for f, i in bad.items()]


def check_dir(d: Path) -> list[str]:
    problems = []
    cpu = d / "cpu"
    avx = [cpu / f for f in AVX512_FILES if (cpu / f).exists()]
    for obj in avx:
        problems += [f"{obj.name}: {p}" for p in shared_symbols(obj)]
    for obj in [cpu / f for f in GENERIC_FILES] + [d / "bindings.cpp.o"]:
        if not obj.exists():
            problems.append(f"{obj}: missing")
            continue
        count, bad = avx512_instructions(obj)
        if count == 0 and not avx:  # (a build without the AVX-512 paths and without machine code: nothing to read)
            continue
        if count == 0:
            problems.append(f"{obj.name}: no machine code to read (an LTO object built without -ffat-lto-objects)")
        problems += [f"{obj.name}: {p}" for p in bad]
    return problems


def _tools_or_skip():
    missing = [t for t in ("nm", "objdump") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"binutils not found: {missing}")


def test_avx512_code_stays_in_the_avx512_files():
    _tools_or_skip()
    dirs = object_dirs()
    if not dirs:
        pytest.skip("no in-place build of the extension in this checkout (build/*/csrc/CMakeFiles/_C.dir)")
    problems = [f"{d}: {p}" for d in dirs for p in check_dir(d)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_shared_inline_function(tmp_path):
    """The symbol check flags what the pitfall leaves in an AVX-512 object: an inline function with external
    linkage from a shared header (a weak symbol), and any global symbol that is not an entry point."""
    _tools_or_skip()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "avx512_small.cpp"
    src.write_text(
        "inline float shared(float x) { return x * 2.f; }\n"
        "static inline float own(float x) { return x + 1.f; }\n"
        "namespace esper { namespace cpu { namespace avx512 {\n"
        "float entry(float x) { return shared(x) + own(x); }\n"
        "} } }\n"
        "float helper(float x) { return x; }\n"
    )
    obj = tmp_path / "avx512_small.cpp.o"
    subprocess.run([cxx, "-O0", "-c", str(src), "-o", str(obj)], check=True)
    found = shared_symbols(obj)
    assert any("weak" in p and "shared(float)" in p for p in found), found
    assert any("global" in p and "helper(float)" in p for p in found), found
    assert not any("entry(float)" in p or "own(float)" in p for p in found), found


if __name__ == "__main__":
    dirs = [Path(a) for a in sys.argv[1:]] or object_dirs()
    if not dirs:
        sys.exit("no object directory found (build/*/csrc/CMakeFiles/_C.dir)")
    failed = False
    for d in dirs:
        problems = check_dir(d)
        print(f"{d}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print("  " + p)
        failed |= bool(problems)
    sys.exit(1 if failed else 0)

"""Packaging: ``python -m build`` gives an sdist and a wheel, and the wheel works in a fresh virtual environment.

The build is the one a user runs: isolated (scikit-build-core and pybind11 fetched into a throwaway environment
without torch, which the extension never needs) and through the sdist, so a file missing from the sdist fails
the wheel build. ``ESPER_CUDA`` defaults to OFF here (set ESPER_CUDA=ON on a machine with nvcc to build and test
the CUDA wheel).

The fresh environment is ``python -m venv --without-pip`` plus the test environment's own torch: a ``.pth`` file
adds a directory of links to every distribution installed next to torch except esper_kernels, so the venv
already has torch without a second download and unpacking of it (seconds instead of about a minute), and pip
(run from outside with ``--python``) resolves the wheel's requirements from it with ``--no-index``. In that
venv, from a directory outside the source tree: import, ``python -m esper_kernels info`` (the cpu backend must
load), ``python -m esper_kernels example`` and examples/esper_update.py. The extension's DT_NEEDED entries are
read from the ELF file in the wheel: no libtorch, libc10 or libshm, which is what lets one wheel serve every
PyTorch version.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.packaging, pytest.mark.skipif(sys.platform != "linux", reason="ELF/Linux wheel checks")]

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env=None, timeout=1200) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, ESPER_CUDA=os.environ.get("ESPER_CUDA", "OFF"))
    _run([sys.executable, "-m", "build", "--outdir", out, ROOT], cwd=ROOT, env=env)
    return out


def dt_needed(elf: bytes) -> list[str]:
    """The DT_NEEDED entries of a little-endian ELF64 shared object (its .dynamic section and the string
    table that section links to)."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "expected a little-endian ELF64 file"
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            tag, val = struct.unpack_from("<qQ", elf, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = elf.index(b"\0", strtab_offset + val)
                needed.append(elf[strtab_offset + val : end].decode())
    return needed


def test_build_gives_sdist_and_wheel(dist):
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "pyproject.toml",
        "CMakeLists.txt",
        "csrc/CMakeLists.txt",
        "csrc/bindings.cpp",
        "csrc/cpu/driver.cpp",
        "csrc/cpu/avx512_small.cpp",
        "esper_kernels/schema.py",
        "esper_kernels/__init__.py",
        "README.md",
    ):
        assert needed in names, f"sdist lacks {needed}"
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
    assert any(re.fullmatch(r"esper_kernels/_C\..*\.so", n) for n in names), names
    assert "esper_kernels/__init__.py" in names and "esper_kernels/demo/env.py" in names


def test_extension_links_no_libtorch(dist):
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        so = [n for n in whl.namelist() if re.fullmatch(r"esper_kernels/_C\..*\.so", n)]
        assert len(so) == 1
        needed = dt_needed(whl.read(so[0]))
    assert any(n.startswith("libc.so") for n in needed), f"the ELF reader found no libc: {needed}"
    # the same reader sees libtorch in torch's own extension module
    (torch_c,) = Path(torch.__file__).parent.glob("_C.*.so")
    assert any(re.match(r"libtorch", n) for n in dt_needed(torch_c.read_bytes())), dt_needed(torch_c.read_bytes())
    linked = [n for n in needed if re.match(r"lib(torch|c10|shm)", n)]
    assert not linked, f"_C links {linked}; DT_NEEDED: {needed}"


def _fresh_venv_with_torch(tmp: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, timeout=300)  # pip runs from outside
    site = Path(torch.__file__).resolve().parent.parent
    shared = tmp / "installed-next-to-torch"
    shared.mkdir()
    for entry in site.iterdir():
        if "esper_kernels" in entry.name.lower():  # the package, its metadata, an editable install's hooks
            continue
        (shared / entry.name).symlink_to(entry)
    py = venv / "bin" / "python"
    venv_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    (venv_site / "installed-next-to-torch.pth").write_text(f"{shared}\n")
    return py


def test_wheel_in_fresh_venv(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    py = _fresh_venv_with_torch(tmp_path)
    work = tmp_path / "elsewhere"  # not the source tree: the import must come from the installed wheel
    work.mkdir()
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", wheel], cwd=work, timeout=600)
    where = _run(
        [py, "-c", "import esper_kernels, torch; print(esper_kernels.__file__); print(torch.__version__)"], cwd=work
    ).split()
    assert Path(where[0]).resolve().is_relative_to((tmp_path / "venv").resolve()), where
    assert where[1] == torch.__version__
    info = _run([py, "-m", "esper_kernels", "info"], cwd=work)
    assert re.search(r"^cpu\s+available", info, re.MULTILINE), info
    example = _run([py, "-m", "esper_kernels", "example", "--device", "cpu"], cwd=work)
    assert example.startswith("backend cpu,") and "all_finite True" in example, example
    update = _run([py, ROOT / "examples" / "esper_update.py", "--envs", "4", "--steps", "10"], cwd=work)
    assert "esper update:" in update and "epoch 1:" in update, update

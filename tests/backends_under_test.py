"""The fused backends the conformance suite (tests/test_conformance.py) runs every behaviour on, as data.

``BACKENDS`` is the table: one ``BackendUnderTest`` row per backend configuration. A row says which name is passed
to ``ppo_loss``, on which device its tensors live, the context that puts it in place (``setup``), its tier marks,
and how much work the slower ones can afford (``scale`` for batch sizes, hypothesis example counts). Adding a
backend to the suite is adding one row.

Also here, because more than one module uses them: ``_Emulated`` (the cuda backend's host emulation installed as
"cuda" for CPU tensors) and the triton backend's ``tuning`` knobs (``TINY``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch

import esper_kernels as ek

HAS_CUDA = torch.cuda.is_available()


# -- the cuda backend's host emulation in place of "cuda" ---------------------------------------------------
class _Forward:
    """One recorded kernel_forward: the addresses of the gradient buffers the caller passed (None: none; no
    reference is kept, so that autograd can still take them as .grad without a copy) and the ``saved`` tensor it
    returned (the normalisers, whose NM_SCALE entry is the fix-up's scale state, then the tickets)."""

    def __init__(self, grads, gv, saved):
        self.grads = None if grads is None else [g.data_ptr() for g in grads]
        self.gv = None if gv is None else gv.data_ptr()
        self.norms = saved


class _Emulated:
    """The emulation in place of the "cuda" backend (registry and fused custom ops), restored afterwards; it
    records every kernel_forward (``states``) and the ``holds`` of every kernel_backward (``holds``)."""

    def __init__(self, emulation):
        self.emu = emulation
        self.states: list[_Forward] = []
        self.holds: list[bool] = []

    def __enter__(self):
        from esper_kernels import backends as ek_backends
        from esper_kernels.backends import fused

        self.saved = (ek_backends._cache.get("cuda"), "cuda" in ek_backends._RUNNABLE, fused._FUSED.get("cuda"))
        ek_backends._cache["cuda"] = self.emu
        ek_backends._RUNNABLE.add("cuda")
        fused._FUSED["cuda"] = self.emu
        forward, backward = self.emu.kernel_forward, self.emu.kernel_backward

        def spy_forward(call, grads=None, grad_values=None):
            outs = forward(call, grads, grad_values)
            self.states.append(_Forward(grads, grad_values, outs[5]))
            return outs

        def spy_backward(*args, **kw):
            self.holds.append(kw.get("holds", False))
            return backward(*args, **kw)

        self.emu.kernel_forward, self.emu.kernel_backward = spy_forward, spy_backward
        return self

    def __exit__(self, *exc):
        from esper_kernels import backends as ek_backends
        from esper_kernels.backends import fused

        cache, runnable, fz = self.saved
        if cache is None:
            ek_backends._cache.pop("cuda", None)
        else:
            ek_backends._cache["cuda"] = cache
        if not runnable:
            ek_backends._RUNNABLE.discard("cuda")
        if fz is None:
            fused._FUSED.pop("cuda", None)
        else:
            fused._FUSED["cuda"] = fz
        del self.emu.kernel_forward, self.emu.kernel_backward


def emulated(max_blocks: int = 0) -> _Emulated:
    """A fresh ``CudaHostEmulation`` (at most ``max_blocks`` main blocks; 0: the device's grid) as "cuda"."""
    from esper_kernels.backends import native

    return _Emulated(native.CudaHostEmulation(max_blocks=max_blocks))


# -- the triton backend's tuning knobs ---------------------------------------------------------------------------
#: tiny tiles: heads of more than 8 actions are wide and stream in chunks of 16 columns, 4 rows per program for
#: small heads, merge groups of 2 programs (two ticket levels from 3 programs on), a pre-pass of 4-row chunks
#: over several programs, one tile per head
TINY = dict(
    SMALL_MAX=8,
    ROWS_PER_PROGRAM=4,
    MAX_BLOCK_C=16,
    MERGE_GROUP=2,
    MERGE_CHUNK=2,
    PRE_CHUNK=4,
    PRE_PROGRAMS=3,
    PRE_MERGE_CHUNK=2,
    GROUP_MAX=0,
)


@contextlib.contextmanager
def tuning(**knobs):
    """The triton backend's module-level tuning knobs set for the duration (restored afterwards)."""
    from esper_kernels.backends import triton_backend as tb

    with mock.patch.multiple(tb, **knobs):
        yield


# -- the table ----------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class BackendUnderTest:
    """One fused backend configuration under test.

    ``name`` is what ``ppo_loss(backend=...)`` gets; ``device`` where the tests put the tensors; ``setup`` a
    factory of the context that puts the backend in place (entered around each test); ``variants`` other named
    configurations of the same backend that reach other internal paths (tile sizes, block counts), each a context
    factory entered inside ``setup`` by the tests that cover them; ``scale`` multiplies the row count of the
    fixed-size batches (below 1 where every call is slow); ``examples`` and ``table_examples`` are the hypothesis
    budgets of the equals-reference and metric-table tests; ``table_heads`` the most heads in the latter;
    ``on_unavailable`` "skip" or "fail" when the machine has the device but the backend does not run."""

    id: str
    name: str
    device: str
    marks: tuple = ()
    setup: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    variants: Mapping[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)
    scale: float = 1.0
    examples: int = 60
    hypothesis_dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    table_examples: int = 30
    table_heads: int = 32
    on_unavailable: str = "skip"
    #: fixed-case tests run every variant too (False: only the hypothesis test draws them, for time)
    sweep_variants: bool = True
    impl: Callable[[], object] = lambda: None

    def rows(self, n: int, keep: int = 0) -> int:
        """``n`` rows scaled by ``scale`` (at least ``min(n, keep)``, and at least 1 if ``n`` is)."""
        if n == 0:
            return 0
        return max(min(n, keep), 1, round(n * self.scale))

    def shape(self, *shape: int) -> tuple[int, ...]:
        """A batch shape with its last dimension scaled."""
        return (*shape[:-1], self.rows(shape[-1]))

    def to(self, batch):
        """A batch (or a tensor, sequence or mapping of tensors) on this backend's device."""
        if isinstance(batch, torch.Tensor):
            if batch.device.type == torch.device(self.device).type:
                return batch
            if batch._base is not None and not batch.is_contiguous():  # a strided view stays a strided view
                base = batch._base.to(self.device)
                return base.as_strided(batch.shape, batch.stride(), batch.storage_offset())
            return batch.to(self.device)
        if isinstance(batch, Mapping):
            return {k: self.to(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to(v) for v in batch)
        return batch

    def tensor(self, value) -> torch.Tensor:
        return torch.tensor(value, device=self.device)

    def backend_object(self):
        """The object that runs the calls (for its ``supports`` and ``metric_table``); valid inside ``setup``."""
        return self.impl()

    def require(self) -> None:
        """Skip (or fail, where the machine has the device) when the backend cannot run here."""
        if self.setup is not contextlib.nullcontext:  # (an installed stand-in: needs what its setup needs)
            info = ek.available_backends()["cpu"]
            if info.available:
                return
        else:
            info = ek.available_backends()[self.name]
            if info.available and self.device in info.devices:
                return
        why = f"{self.id} does not run on {self.device} tensors here: {'; '.join(info.reasons) or info.devices}"
        if self.on_unavailable == "fail" and self.device == "cuda" and HAS_CUDA:
            pytest.fail(why)
        pytest.skip(why)

    def skip_unless_supported(self, dtype: torch.dtype | None = None, heads: int | None = None) -> None:
        """Skip, with the backend's own ``Supports`` data as the reason, what the backend declares it cannot run."""
        s = self.backend_object().supports
        if dtype is not None and dtype not in s.dtypes:
            pytest.skip(f"{self.id}: Supports.dtypes has no {dtype}")
        if heads is not None and s.max_heads is not None and heads > s.max_heads:
            pytest.skip(f"{self.id}: Supports.max_heads is {s.max_heads}")

    def contexts(self):
        """(variant name, context factory) of the default configuration and of every variant."""
        extra = list(self.variants.items()) if self.sweep_variants else []
        return [("default", contextlib.nullcontext), *extra]

    def drawn_contexts(self):
        """The default configuration and every variant, for the hypothesis test to draw from."""
        return [("default", contextlib.nullcontext), *self.variants.items()]


def _cpu_impl():
    from esper_kernels.backends import native

    return native.BACKENDS["cpu"]


def _cuda_impl():
    from esper_kernels.backends import native

    return native.BACKENDS["cuda"]


def _triton_impl():
    from esper_kernels.backends import triton_backend

    return triton_backend.BACKENDS["triton"]


def _cuda_host_impl():
    from esper_kernels.backends import fused

    return fused._FUSED["cuda"]  # the emulation _Emulated installed


#: hypothesis examples of the equals-reference test (environment overrides as before the suite was merged)
NATIVE_EXAMPLES = int(os.environ.get("NATIVE_EXAMPLES", "60"))
INTERPRETER_EXAMPLES = int(os.environ.get("TRITON_INTERPRET_EXAMPLES", "12"))

BACKENDS: list[BackendUnderTest] = [
    BackendUnderTest(
        "cpu", "cpu", "cpu", marks=(pytest.mark.native,), impl=_cpu_impl, examples=NATIVE_EXAMPLES, table_examples=200
    ),
    # Triton: CUDA tensors on a GPU; without one, CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by
    # conftest), where each kernel op is a numpy call: small batches, few examples, the tiny tiles as a variant to
    # reach on tiny batches the paths large batches take on a GPU
    BackendUnderTest(
        "triton",
        "triton",
        "cuda" if HAS_CUDA else "cpu",
        marks=(pytest.mark.gpu,) if HAS_CUDA else (pytest.mark.interpreter,),
        variants={"tiny": lambda: tuning(**TINY)},
        impl=_triton_impl,
        scale=1.0 if HAS_CUDA else 0.05,
        examples=25 if HAS_CUDA else INTERPRETER_EXAMPLES,
        sweep_variants=HAS_CUDA,
        table_examples=30 if HAS_CUDA else 6,
        table_heads=9,
    ),
    BackendUnderTest(
        "cuda", "cuda", "cuda", marks=(pytest.mark.gpu,), impl=_cuda_impl, examples=25, on_unavailable="fail"
    ),
    # the cuda backend's one-pass kernels run block by block on the host (csrc/ppo_onepass_host.h), installed as
    # "cuda" for CPU tensors; the variant caps the grid at two main blocks (many tiles per block)
    BackendUnderTest(
        "cuda_host",
        "cuda",
        "cpu",
        marks=(pytest.mark.native,),
        setup=emulated,
        variants={"two_blocks": lambda: emulated(max_blocks=2)},
        impl=_cuda_host_impl,
        examples=NATIVE_EXAMPLES,
        table_examples=50,
    ),
]


def params():
    """``BACKENDS`` as pytest params (ids and tier marks)."""
    return [pytest.param(b, id=b.id, marks=list(b.marks)) for b in BACKENDS]

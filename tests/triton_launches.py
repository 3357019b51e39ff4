"""Launch recording for the triton backend's tests (interpreter and GPU tiers): every ``kernel[grid](...)`` of
``esper_kernels.backends.triton_kernels`` made inside ``Launches().recording()`` is recorded with its grid and
keyword arguments (the compile-time flags: FIXUP, HOLDS, GRAD_ON, ...) and then run as usual."""

from __future__ import annotations

import contextlib
from unittest import mock

__all__ = ["Launches"]


class Launches:
    """Records every launch of the triton backend's kernels: (kernel name, grid, keyword arguments)."""

    NAMES = ("_ppo_pre_kernel", "_ppo_main_kernel", "_ppo_metrics_kernel")

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def _wrap(self, name, kernel):
        rec = self

        class Wrapped:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    rec.calls.append((name, grid, kwargs))
                    return launch(*args, **kwargs)

                return run

        return Wrapped()

    @contextlib.contextmanager
    def recording(self):
        from esper_kernels.backends import triton_kernels as tk

        with mock.patch.multiple(tk, **{n: self._wrap(n, getattr(tk, n)) for n in self.NAMES}):
            yield self

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def main(self, fixup: bool) -> list[dict]:
        """Keyword arguments of the main kernel's forward (fixup=False) or fix-up (fixup=True) launches."""
        return [kw for name, _, kw in self.calls if name == "_ppo_main_kernel" and kw["FIXUP"] == fixup]

"""HeadLayout: the names and sizes of a factored action space's categorical heads."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

__all__ = ["HeadLayout", "ESPER_HEADS"]

#: Esper's Tamiyo policy heads (3 slots), the running example of docs/semantics.md and docs/background.md.
ESPER_HEADS: dict[str, int] = {
    "slot": 3,
    "blueprint": 13,
    "style": 4,
    "tempo": 3,
    "alpha_target": 3,
    "alpha_speed": 4,
    "alpha_curve": 5,
    "op": 6,
}


class HeadLayout:
    """Ordered heads ``name -> A_h``; head h owns columns ``offsets[h] : offsets[h] + sizes[h]`` of S.

    >>> HeadLayout({"op": 6, "slot": 3}).total
    9
    """

    __slots__ = ("_names", "_offsets", "_sizes")

    def __init__(self, heads: Mapping[str, int] | Iterable[tuple[str, int]]):
        items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
        if not items:
            raise ValueError("HeadLayout: expected at least one head, got none")
        names: list[str] = []
        sizes: list[int] = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"HeadLayout: expected (name, size) pairs, got {item!r}")
            name, size = item
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"HeadLayout: head name {name!r} must be a Python identifier")
            if name in names:
                raise ValueError(f"HeadLayout: head name {name!r} appears twice")
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"HeadLayout: head {name!r} size must be an int >= 1, got {size!r}")
            names.append(name)
            sizes.append(int(size))  # numpy integers too, stored as Python ints
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self._names = tuple(names)
        self._sizes = tuple(sizes)
        self._offsets = tuple(offsets)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def offsets(self) -> tuple[int, ...]:
        return self._offsets

    @property
    def num_heads(self) -> int:
        return len(self._names)

    @property
    def total(self) -> int:
        """S = sum_h A_h."""
        return sum(self._sizes)

    def index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"unknown head {name!r}; heads are {list(self._names)}") from None

    def items(self) -> list[tuple[str, int]]:
        return list(zip(self._names, self._sizes))

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self):
        return iter(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeadLayout) and self.items() == other.items()

    def __hash__(self) -> int:
        return hash(tuple(self.items()))

    def __repr__(self) -> str:
        return f"HeadLayout({dict(self.items())!r})"

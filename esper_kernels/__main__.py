"""Command line: ``python -m esper_kernels {info,example,bench,demo}``."""

from __future__ import annotations

import sys

_COMMANDS = {
    "info": "versions, devices and which backends can run here (and why not)",
    "example": "the loss, its gradient and per-head telemetry on an esper-shaped batch",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print("usage: python -m esper_kernels COMMAND [options]\n")
        for name, what in _COMMANDS.items():
            print(f"  {name:<8} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from .info import info_text

        print(info_text())
    elif cmd == "example":
        from .example import run_example_cli

        run_example_cli(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``python -m esper_kernels {info,example,bench,demo}``."""

from __future__ import annotations

import sys

_COMMANDS = {
    "info": "versions, devices and which backends can run here (and why not)",
    "example": "the loss, its gradient and per-head telemetry on an esper-shaped batch",
    "demo": "train a PPO agent on the built-in factored environment (the main job)",
    "bench": "benchmark the backends (quick subset; --full for the full matrix)",
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
    elif cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest) or 0
    elif cmd == "bench":
        from .bench import main as bench_main

        return bench_main(rest) or 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

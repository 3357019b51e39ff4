"""``python -m esper_kernels.bench``: the same as ``python -m esper_kernels bench``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``tinyvit info``: versions and which backends can run here."""
from __future__ import annotations

import platform


def run_info(args) -> int:
    import einops
    import numpy
    import scipy

    from . import __version__
    from .backend import cupy_available

    print(f"tinyvit {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"numpy {numpy.__version__}, scipy {scipy.__version__}, einops {einops.__version__}")
    ok, why = cupy_available()
    print("backends: numpy" + (", cupy" if ok else f" (cupy unavailable: {why})"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions and available backends")
    p.set_defaults(func=run_info)

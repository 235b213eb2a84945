"""The ``tinyvit`` command. Each subcommand lives in the module that does the work;
a module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands with ``set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

COMMAND_MODULES = (
    "tinyvit.cli",
    "tinyvit.training.train",
    "tinyvit.pretrained.predict",
    "tinyvit.training.evaluate",
    "tinyvit.benchmark",
    "tinyvit.gradcheck",
    "tinyvit.quantize",
)


def run_info(args) -> int:
    """``tinyvit info``: versions, which backends can run here, and which CPU kernels float32 layers run."""
    import einops
    import numpy
    import scipy

    from . import __version__
    from .backend import cupy_available

    print(f"tinyvit {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"numpy {numpy.__version__}, scipy {scipy.__version__}, einops {einops.__version__}")
    ok, why = cupy_available()
    print("backends: numpy" + (", cupy" if ok else f" (cupy unavailable: {why})"))
    from .layers import kernels

    print(f"CPU kernels (float32): {kernels.path()}: {kernels.describe()}")
    from .distributed.comm import describe

    print(f"data parallel (mpiexec -n K python3 -m tinyvit train): {describe()}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions and available backends")
    p.set_defaults(func=run_info)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="tinyvit", description="A Vision Transformer with hand-written backward passes.")
    parser.add_argument("--version", action="version", version=f"tinyvit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as exc:
        print(f"tinyvit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permission denied, a path that is a file: one line, not a traceback
        print(f"tinyvit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during training, or Ctrl-C elsewhere
        print(f"tinyvit {args.command}: interrupted; nothing more was written (files written before are complete: "
              f"every write is atomic)", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message, or its type when it has none."""
    text = " ".join(str(exc).split()) if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())

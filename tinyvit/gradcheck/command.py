"""``tinyvit gradcheck``: every case of the registry (:mod:`tinyvit.gradcheck.cases`), one row each.

Each row: the case, its mode, the worst error against finite differences (or random
directions) and against PyTorch autograd, the tolerance, PASS/FAIL; a failing row prints
the report's table under it. The last line is ``N passed, M failed``; the exit status is
0 only when every case passed.
"""
from __future__ import annotations

import time
import warnings

from .cases import Skip, select
from .check import DIRECTIONAL, FINITE_DIFFERENCES, MODES, PYTORCH, GradcheckWarning, check_backward


def _cell(row) -> str:
    return "—" if row is None else f"{row.max_rel:.1e}"


def run_cases(cases, backend, dtype: str, mode: str | None = None, seed: int = 0, stream=print) -> tuple:
    """Run ``cases`` and print a row per case through ``stream``; return ``(passed, failed, skipped)``."""
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    stream(f"tinyvit gradcheck: backend {backend.name}, backward in {dtype}, references (finite differences, "
           f"PyTorch autograd) in float64, random dout (seed {seed})")
    if not have_torch:
        stream("PyTorch is not installed: the pytorch column is skipped (pip install torch==2.13.0, the CPU build)")
    stream("vs fd / vs torch: the worst argument's max |got - expected| / max |expected|; a case passes when every "
           "element is within atol * max(1, max|expected|) + rtol * |expected| (+ the differences' own rounding)")
    width = max(len(c.name) for c in cases)
    stream(f"{'case':<{width}}  {'mode':<11}  {'dtype':<7}  {'vs fd':>8}  {'vs torch':>8}  {'rtol fd/torch':>13}  "
           f"{'time':>6}  result")
    passed = failed = skipped = 0
    for case in cases:
        case_dtype = case.dtype or dtype
        case_mode = mode or case.mode
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradcheckWarning)  # the header says which dtype runs
            try:
                report = check_backward(**case.build(backend, case_dtype), mode=case_mode, seed=seed)
                error = None
            except Skip as exc:
                skipped += 1
                stream(f"{case.name:<{width}}  {'':<11}  {case_dtype:<7}  SKIP: {exc}")
                continue
            except Exception as exc:  # a case that cannot even run is a failure, not a crash of the command
                report, error = None, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if report is None:
            failed += 1
            stream(f"{case.name:<{width}}  {case_mode:<11}  {case_dtype:<7}  {'':>8}  {'':>8}  {'':>13}  "
                   f"{seconds:>5.1f}s  FAIL ({error})")
            continue
        fd = report.worst(DIRECTIONAL if case_mode == DIRECTIONAL else FINITE_DIFFERENCES)
        th = report.worst(PYTORCH)
        tol = f"{fd.rtol:g}/{th.rtol:g}" if fd and th else (f"{fd.rtol:g}/—" if fd else "—")
        stream(f"{case.name:<{width}}  {case_mode:<11}  {case_dtype:<7}  {_cell(fd):>8}  "
               f"{_cell(th) if have_torch else 'n/a':>8}  {tol:>13}  {seconds:>5.1f}s  "
               f"{'PASS' if report.ok else 'FAIL'}")
        if report.ok:
            passed += 1
        else:
            failed += 1
            stream("    " + str(report).replace("\n", "\n    "))
    return passed, failed, skipped


def run(args) -> int:
    from ..backend import check_dtype_name, get_backend

    backend = get_backend(args.backend)
    dtype = check_dtype_name(args.dtype)
    names = [n.strip() for n in (args.layers or "").split(",") if n.strip()]
    cases = select(names)
    if args.list:
        for c in cases:
            print(f"{c.name:<20} {c.mode:<11} covers {', '.join(c.covers) or '(the model)'}  {c.about}")
        return 0
    start = time.perf_counter()
    passed, failed, skipped = run_cases(cases, backend, dtype, args.mode, args.seed)
    if skipped:
        print(f"({skipped} skipped)")
    print(f"total {time.perf_counter() - start:.1f}s")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def register(subparsers) -> None:
    from ..backend import BACKENDS, DTYPES

    p = subparsers.add_parser(
        "gradcheck", help="check every layer's backward against finite differences and PyTorch",
        description="Check every layer's hand-written backward (and the whole model, in directional mode) against "
                    "central finite differences and, where PyTorch is installed, autograd. Exit status 0 only when "
                    "every case passes.")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="array backend (default $TINYVIT_BACKEND or numpy)")
    p.add_argument("--dtype", choices=DTYPES, default="float64",
                   help="dtype the backward runs in (default float64; float32 is checked at float32 tolerances)")
    p.add_argument("--layers", default="", help="comma-separated case names (default: all; --list shows them)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="every case in this mode (default: each case's own: full for layers, directional for the model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random upstream gradient and directions")
    p.add_argument("--list", action="store_true", help="list the cases and what they cover, then exit")
    p.set_defaults(func=run)

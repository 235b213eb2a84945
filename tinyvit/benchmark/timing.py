"""Timers and memory meters for the benchmarks: CPU wall clock, CUDA events, tracemalloc,
CuPy's memory pool and PyTorch's allocator counters.

Every timer warms up first, then times ``repeats`` calls and keeps all of them, so a
report can give the median and the min-max. GPU work is timed with CUDA events recorded
on the stream and read after a synchronise (the same as ``cupyx.profiler.benchmark``'s
GPU times), so queued kernels are never mistaken for finished ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds per call, one entry per repeat."""

    times: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "times_s": list(self.times)}


def _cuda_event_time(fn, xp) -> float:
    start, stop = xp.cuda.Event(), xp.cuda.Event()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return xp.cuda.get_elapsed_time(start, stop) / 1e3


def time_calls(fns: dict, repeats: int, warmup: int = 1, xp_of=None) -> dict:
    """Time several callables interleaved: ``{name: fn} -> {name: Timing}``.

    Round ``r`` calls every function once, in turn, so a machine that gets busier or
    quieter during the run affects all of them alike (the fair way on a shared machine).
    ``xp_of(name)`` returns the CuPy module for functions that run on a GPU (timed with
    CUDA events), or None for CPU functions (timed with ``time.perf_counter``).
    """
    xp_of = xp_of or (lambda name: None)
    for _ in range(warmup):
        for name, fn in fns.items():
            fn()
            xp = xp_of(name)
            if xp is not None:
                xp.cuda.get_current_device().synchronize()
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            xp = xp_of(name)
            if xp is not None:
                out[name].times.append(_cuda_event_time(fn, xp))
            else:
                start = time.perf_counter()
                fn()
                out[name].times.append(time.perf_counter() - start)
    return out


# ---------------------------------------------------------------- peak memory
def numpy_peak_bytes(fn) -> int:
    """Peak bytes that ``fn()`` allocates through NumPy (and Python), measured with tracemalloc.

    NumPy reports every array buffer to tracemalloc, so this is the high-water mark of
    the arrays the call created (its temporaries and what it returns or keeps), above
    whatever was allocated before the call.
    """
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.clear_traces()
    tracemalloc.reset_peak()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak


def cupy_peak_bytes(fn, xp) -> int:
    """Peak bytes of CuPy's default memory pool during ``fn()``, above its use before.

    The pool keeps no peak counter of its own, so the pool is emptied first and its
    ``total_bytes()`` (held from the driver, which the pool never gives back inside the
    call) read after: the bytes the call needed at its high-water mark.
    """
    pool = xp.get_default_memory_pool()
    xp.cuda.get_current_device().synchronize()
    pool.free_all_blocks()
    before = pool.used_bytes()
    fn()
    xp.cuda.get_current_device().synchronize()
    return pool.total_bytes() - before


def torch_cuda_peak_bytes(fn, torch) -> int:
    """Peak bytes of PyTorch's CUDA caching allocator during ``fn()`` (its own counters)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


NATIVE_LOG_PREFIXES = ("USDT:", "STAGE:")


@contextlib.contextmanager
def quiet_profiler_logs():
    """PyTorch's profiler (kineto) writes ``USDT: ... profiler_start/stop`` and ``STAGE:`` lines
    straight to file descriptor 2 from C++, whatever the log level. Inside this block fd 2 goes
    to a temporary file; afterwards every other line is passed on to stderr, so a real error
    still shows, and the bench output is the tables."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line and not line.startswith(NATIVE_LOG_PREFIXES):
                    print(line, file=sys.stderr)


def torch_cpu_peak_bytes(fn, torch) -> int:
    """Peak bytes PyTorch's CPU allocator handed out during ``fn()``.

    PyTorch keeps this count for the profiler (``profile_memory=True``): every allocation
    and free is an event carrying the allocator's running "Total Allocated", counted from
    the start of profiling, so the maximum is the call's high-water mark above what was
    allocated before.
    """
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_logs(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0)

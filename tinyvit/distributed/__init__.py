"""Data-parallel training on MPI (mpi4py) and NCCL (cupy.cuda.nccl).

Derivation: docs/data_parallel.md (the learners' tour: examples/12_data_parallel.py)

- comm.py       the communicators: one process, MPI, NCCL; :func:`world` picks one
- allreduce.py  the bucketed gradient all-reduce, started from the backward's per-block hook

``mpiexec -n K python -m tinyvit train ...`` splits each global batch over the K ranks;
``tinyvit.training.train`` uses :func:`world`, :class:`GradientAllReduce` and
:func:`check_start`. Random draws are per sample (tinyvit/training/randomness.py), so K
ranks compute what one process computes, up to the order of the sums.
"""
from __future__ import annotations

from .allreduce import DEFAULT_BUCKET_MB, GradientAllReduce
from .comm import DistributedError, MpiCommunicator, NcclCommunicator, SingleProcess, launched_size, world

__all__ = ["DEFAULT_BUCKET_MB", "DistributedError", "GradientAllReduce", "MpiCommunicator", "NcclCommunicator",
           "SingleProcess", "check_start", "launched_size", "world"]


def check_start(comm, settings: dict, global_batch: int, error: BaseException | None = None) -> None:
    """Every rank calls this once before the first step; all of them raise the same
    :class:`DistributedError` if any rank failed to set up (``error``), if the ranks' ``settings``
    (config, data fingerprint, resume file) differ, or if ``global_batch`` does not split over the ranks.
    Rank 0 writes the message; one process (K = 1) re-raises ``error`` as it is."""
    if comm.size == 1:
        if error is not None:
            raise error
        return
    reports = comm.gather_object((settings, None if error is None else f"{type(error).__name__}: {error}"))
    message = None
    if comm.rank == 0:
        message = _compose(reports, global_batch, comm.size)
    message = comm.bcast_object(message)
    if message:
        raise DistributedError(message)


def _compose(reports, global_batch, size) -> str | None:
    errors = {}
    for rank, (_, err) in enumerate(reports):
        if err is not None:
            errors.setdefault(err, []).append(rank)
    if errors:
        return "; ".join(f"{err} (on {'every rank' if len(r) == size else 'rank ' + ', '.join(map(str, r))})"
                         for err, r in errors.items())
    problems = []
    if global_batch % size:
        fits = [k for k in range(2, min(global_batch, 64) + 1) if global_batch % k == 0]
        problems.append(f"the global batch of {global_batch} images does not split over {size} ranks: use a "
                        f"--batch-size that is a multiple of {size} (e.g. {global_batch - global_batch % size or size}"
                        f"), or run on {fits[:6]} ranks")
    base = reports[0][0]
    for rank, (other, _) in enumerate(reports[1:], 1):
        keys = sorted(set(base) | set(other))
        diff = [f"{k}: {other.get(k)!r} (rank 0: {base.get(k)!r})" for k in keys if other.get(k) != base.get(k)]
        if diff:
            problems.append(f"rank {rank} was started with a different configuration than rank 0: " + ", ".join(diff))
    if problems:
        return "; ".join(problems) + "; every rank stopped before the first step"
    return None

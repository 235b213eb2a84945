"""The gradient all-reduce, overlapped with the hand-written backward.

Data parallelism in one line: every rank computes the mean gradient of its share of the
global batch, and the mean over the ranks of those means is the gradient of the whole
batch (the shares are equal), so every rank takes the same optimiser step.

The backward runs from the head down to the patch embedding, and it knows when each
block's gradients are final (``model.backward(..., grad_ready=hook)``). So, as PyTorch DDP
does with its 25 MB buckets and Horovod with its fusion buffer, gradients are packed into
buckets in the order they become ready, and each full bucket's all-reduce starts at once,
running while the earlier blocks' backward is still computing::

    compute:  head+norm | block 3 bwd | block 2 bwd | block 1 bwd | block 0 bwd | embed | wait | step
    network:                 [bucket: head..block 3]   [bucket: block 2]  ...   [last bucket]

``finish`` waits for what is still in flight, unpacks and divides by K. Only the time spent
waiting there is exposed; the rest is hidden behind the backward.
"""
from __future__ import annotations

import time

from ..backend import array_module

DEFAULT_BUCKET_MB = 0.25  # measured in bench/data_parallel.py (docs/data_parallel.md): one block of the default model


class GradientAllReduce:
    """Average gradients over ``comm``'s ranks, bucket by bucket, as the backward finishes them.

    ``model.backward(dlogits, grad_ready=reducer.grads_ready)`` then
    ``grads = reducer.finish(model.grads)``. ``bucket_mb``: a bucket is sent once it holds
    this many MiB (0: at every hook, i.e. one bucket per block). ``overlap=False`` sends every
    bucket only after the backward (the baseline the overlap is measured against).
    ``stats``: steps, buckets and bytes sent, seconds spent waiting in ``finish``.
    """

    def __init__(self, comm, bucket_mb: float = DEFAULT_BUCKET_MB, overlap: bool = True):
        self.comm, self.overlap = comm, overlap
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self._ready, self._ready_bytes, self._in_flight = [], 0, []
        self.stats = {"steps": 0, "buckets": 0, "bytes": 0, "wait_s": 0.0}

    def grads_ready(self, grads: dict) -> None:
        """The backward's hook: these ``{key: grad}`` are final; send a bucket once it is full."""
        if self.comm.size == 1:
            return
        self._ready += grads.items()
        self._ready_bytes += sum(g.nbytes for g in grads.values())
        if self.overlap and self._ready_bytes >= self.bucket_bytes:
            self._send()
        for *_, handle in self._in_flight:
            handle.test()  # MPI progresses non-blocking operations inside its calls

    def _send(self) -> None:
        keys = [k for k, _ in self._ready]
        shapes = [g.shape for _, g in self._ready]
        xp = array_module(self._ready[0][1])
        bucket = xp.concatenate([g.reshape(-1) for _, g in self._ready])  # one flat buffer: one message
        self._in_flight.append((keys, shapes, bucket, self.comm.allreduce_start(bucket)))
        self.stats["buckets"] += 1
        self.stats["bytes"] += bucket.nbytes
        self._ready, self._ready_bytes = [], 0

    def finish(self, grads: dict) -> dict:
        """Wait for every bucket; ``-> {key: mean over ranks}`` in ``grads``' order (K = 1: ``grads`` itself)."""
        if self.comm.size == 1:
            return grads
        t0 = time.perf_counter()
        seen = {k for k, _ in self._ready} | {k for keys, *_ in self._in_flight for k in keys}
        late = [(k, g) for k, g in reversed(list(grads.items())) if k not in seen]  # no hook: send them now
        self._ready += late
        if self._ready:
            self._send()
        out, scale = {}, 1.0 / self.comm.size
        for keys, shapes, bucket, handle in self._in_flight:
            handle.wait()
            bucket *= scale  # the sum over ranks -> the mean
            offset = 0
            for key, shape in zip(keys, shapes):
                n = _numel(shape)
                out[key] = bucket[offset:offset + n].reshape(shape)
                offset += n
        self._in_flight = []
        self.stats["steps"] += 1
        self.stats["wait_s"] += time.perf_counter() - t0
        return {k: out[k] for k in grads}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n

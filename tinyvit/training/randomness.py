"""Random numbers that belong to samples, not to a stream: K ranks draw what one process draws.

A generator that hands out numbers one after another (``numpy.random.Generator``) gives
sample 40 of a batch of 64 a different dropout mask when the batch is split over two
ranks (rank 1 starts its stream at its own sample 0). So training draws every number as a
function of *where it is used*, as counter-based generators (Philox in cuRAND and JAX) do:

    u(seed, step, g, k, e) = hash(key(seed, step, g) + k-th draw of the step, element e)

with ``g`` the sample's position in the global batch, ``k`` the call number within the
step's forward (the same on every rank: the model calls its dropout sites in a fixed
order) and ``e`` the element's index inside that sample. Each rank evaluates the hash for
its own samples only; concatenating the ranks' numbers gives one process's numbers bit for
bit (tests/test_randomness.py).

The hash is Chris Wellons' ``lowbias32`` (two multiply-xorshift rounds; passes
PractRand to gigabytes as a counter hash), on ``uint32`` arrays of the backend: no host
trip, the same code on NumPy and CuPy. ``random`` returns uniform floats in [0, 1) on the
grid of 2^-23 (the hash's top 23 bits as a float32 mantissa in [1, 2), minus 1).

Augmentation (host NumPy) takes the same view with ordinary generators:
:func:`sample_generator` seeds one ``numpy.random.Generator`` per (seed, step, sample).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module

_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters before hashing


def lowbias32(x, xp=None, tmp=None):
    """Hash a ``uint32`` array elementwise, in place: ``x -> x`` (``tmp``: scratch of x's shape, or None)."""
    xp = xp or array_module(x)
    for shift, multiplier in ((16, _M1), (15, _M2), (16, None)):
        t = xp.right_shift(x, shift) if tmp is None else xp.right_shift(x, shift, out=tmp)
        x ^= t
        if multiplier is not None:
            x *= multiplier
    return x


def sample_keys(seed: int, step: int, positions) -> np.ndarray:
    """``positions: (b,)`` global-batch positions -> ``(b,)`` uint32 keys of (seed, step, position), on the host."""
    positions = np.asarray(positions, dtype=np.int64)
    words = (seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, step >> 32)
    key = np.zeros(positions.shape, dtype=np.uint32)
    for word in words:  # a sponge: absorb each 32-bit word, then hash
        key ^= np.uint32(word)
        key = lowbias32(key + np.uint32(_GOLDEN), np)
    key ^= (positions & 0xFFFFFFFF).astype(np.uint32)
    return lowbias32(key, np)


class SampleRandom:
    """A per-sample generator for dropout and drop path: pass it as ``model.forward(x, rng=...)``.

    ``SampleRandom(backend, seed, step, positions)``: ``positions: (b,)`` are this rank's
    samples' places in the global batch. ``random(shape)`` needs the sample axis first
    (``shape[0] == b``), as every dropout site has: ``(B, N, D)``, ``(B, NH, N, N)``,
    ``(B, 1, 1)``. A new SampleRandom per step; each ``random`` call is the next draw ``k``.
    """

    def __init__(self, backend, seed: int, step: int, positions):
        self.xp = backend.xp
        self.batch = len(positions)
        self._keys = backend.asarray(sample_keys(seed, step, positions))  # (b,) uint32: one host-to-device copy
        self.draws = 0
        self._counter_cache = {}

    def random(self, shape, dtype="float32"):
        """``(b, ...)`` uniform floats in [0, 1), 23 random bits each."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != self.batch:
            raise ValueError(f"SampleRandom draws per sample: shape must start with the batch ({self.batch}), "
                             f"got {shape}")
        xp = self.xp
        site = lowbias32(np.full(1, (self.draws * _GOLDEN + 1) & 0xFFFFFFFF, dtype=np.uint32), np)[0]  # the k-th draw
        self.draws += 1
        size = int(np.prod(shape[1:], dtype=np.int64))
        keys = lowbias32(self._keys ^ int(site), xp)  # (b,) this draw's key per sample
        x = self._counters(size)[None, :] + keys[:, None]  # (b, E) uint32: key + e * golden, wrapping
        tmp = xp.empty_like(x)
        lowbias32(x, xp, tmp)
        bits = xp.right_shift(x, 9, out=tmp)  # (b, E): the top 23 bits ...
        bits |= 0x3F800000  # ... as the mantissa of a float32 in [1, 2) (exponent 0): no int -> float conversion
        out = bits.view(xp.float32)
        out -= 1.0  # [0, 1), exact: multiples of 2^-23
        return (out if np.dtype(dtype) == np.float32 else out.astype(dtype)).reshape(shape)

    def _counters(self, size):
        """``(E,)`` uint32 ``e * golden``, made once per size per step."""
        if size not in self._counter_cache:
            e = self.xp.arange(size, dtype=self.xp.uint32)
            e *= _GOLDEN
            self._counter_cache[size] = e
        return self._counter_cache[size]

    def __getattr__(self, name):
        raise AttributeError(f"SampleRandom has no {name}(): training draws every random number per sample, with "
                             f"random(shape) and the sample axis first, so that K ranks equal one process")


def sample_generator(seed: int, step: int, position: int) -> np.random.Generator:
    """The host generator of one sample's augmentation at one step (crop, flip, RandAugment)."""
    return np.random.default_rng([seed, 4, step, position])

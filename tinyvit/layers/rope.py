"""2D rotary position embedding (RoPE-ViT, Heo et al. 2024), axial and mixed, forward and backward.

Derivation: docs/rope.md (the learners' tour: examples/15_rope.py)

Shapes: ``B`` batch, ``NH`` heads, ``N = T + Np`` tokens (``T`` prefix tokens, ``Np`` patches
on a ``gh x gw`` grid, row-major), ``hs`` head size, ``hs/2`` pairs. ``NHf`` is the heads axis
of a frequency or angle table: ``NH``, or 1 for a table every head shares (axial). An angle
table ``(NHf, Np, hs/2)`` serves the whole batch; with patch dropout each image keeps other
patches, so positions ``(B, 2, K)`` and angles ``(B, NHf, K, hs/2)`` come per image.

Each head's query (and key) is read as ``hs/2`` pairs ``(a_j, b_j) = (x[2j], x[2j+1])``, the
complex number ``a_j + i b_j`` (the paper's ``view_as_complex``). The patch token at column
``cx`` and row ``cy`` has pair ``j`` turned by the angle::

    theta_j = cx * fx_j + cy * fy_j                    (freqs (2, NHf, hs/2): fx, fy)

    axial (fixed, theta = 100):  fx = [w_0 .. w_{hs/4-1}, 0 .. 0],  fy = [0 .. 0, w_0 .. w_{hs/4-1}],
                                 w_i = theta ** (-4 i / hs): x on the first half of the pairs, y on the rest
    mixed (learned per block and head, theta = 10): (fx_j, fy_j) = w_{j mod hs/4} (cos phi_j, sin phi_j),
                                 phi_j = phi (first half) or phi + pi/2 (second half), phi ~ U[0, 2 pi)

The class (and distillation) token is not turned. As q and k turn by the same rule,
``q_m . k_n`` sees position only through ``theta(m) - theta(n) = (cx_m - cx_n) fx + (cy_m - cy_n) fy``:
a relative position, which is why a RoPE model reads a larger grid than it was trained on.

Forward (``c = cos theta``, ``s = sin theta``), per pair::

    out_a = a c - b s
    out_b = a s + b c

Backward: the rotation is orthogonal, so the input gradient is the turn back by ``-theta``;
``d out_a / d theta = -out_b`` and ``d out_b / d theta = out_a``, so::

    da = dout_a c + dout_b s
    db = dout_b c - dout_a s
    dtheta = sum over the batch (and over heads if the table is shared) of (dout_b out_a - dout_a out_b)

Angles backward (``theta = cx fx + cy fy`` is linear in the frequencies)::

    dfx_j = sum_n cx(n) dtheta_j(n),   dfy_j = sum_n cy(n) dtheta_j(n)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import array_module

ROPE_KINDS = ("rope_axial", "rope_mixed")
DEFAULT_THETA = {"rope_axial": 100.0, "rope_mixed": 10.0}  # the paper's: axial 100, mixed 10


def check_rope_head_size(head_size: int) -> None:
    """RoPE-ViT splits each head's pairs into an x half and a y half: ``hs`` must be a multiple of 4."""
    if head_size % 4:
        raise ValueError(f"2D RoPE needs a head size (dim / heads) divisible by 4, got {head_size}")


def rope_positions(grid_h: int, grid_w: int) -> np.ndarray:
    """Patch coordinates, host float64 ``(2, Np)``: row 0 the column ``cx``, row 1 the row ``cy``,
    in the patch order of patch_embed (row-major); integer patch units, as the paper and timm."""
    n = np.arange(grid_h * grid_w)
    return np.stack([n % grid_w, n // grid_w]).astype(np.float64)


def _magnitudes(head_size: int, theta: float) -> np.ndarray:
    check_rope_head_size(head_size)
    if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 0):
        raise ValueError(f"rope theta must be a finite float > 0, got {theta!r}")
    return 1.0 / float(theta) ** (np.arange(0, head_size, 4) / head_size)  # (hs/4,): w_i = theta^(-4i/hs)


def rope_axial_freqs(head_size: int, theta: float = 100.0) -> np.ndarray:
    """Fixed axial frequencies, host float64 ``(2, 1, hs/2)``: x on the first hs/4 pairs, y on the rest."""
    mag = _magnitudes(head_size, theta)
    zero = np.zeros_like(mag)
    return np.stack([np.concatenate([mag, zero]), np.concatenate([zero, mag])])[:, None, :]


def rope_mixed_freqs(head_size: int, heads: int, depth: int, theta: float = 10.0, rng=None) -> np.ndarray:
    """Initial learnable mixed frequencies, host float64 ``(2, depth, NH, hs/2)`` (timm's ``rope.freqs``
    layout): per block and head a random direction ``phi``; the first hs/4 pairs point along ``phi``,
    the rest along ``phi + pi/2``, with the axial magnitudes."""
    mag = _magnitudes(head_size, theta)
    rng = np.random.default_rng(rng)
    phi = rng.uniform(0.0, 2.0 * np.pi, (depth, heads, 1))  # (depth, NH, 1)
    fx = np.concatenate([mag * np.cos(phi), mag * np.cos(phi + np.pi / 2)], axis=-1)  # (depth, NH, hs/2)
    fy = np.concatenate([mag * np.sin(phi), mag * np.sin(phi + np.pi / 2)], axis=-1)
    return np.stack([fx, fy])


class RopeAnglesCache(NamedTuple):
    pos: object  # (2, Np): cx, cy


def rope_angles_forward(freqs, pos):
    """``freqs: (2, NHf, hs/2), pos: (2, Np) -> angles: (NHf, Np, hs/2) = cx fx + cy fy``;
    per-image positions ``pos: (B, 2, K)`` (patch dropout) give ``angles: (B, NHf, K, hs/2)``."""
    if freqs.ndim != 3 or freqs.shape[0] != 2:
        raise ValueError(f"rope freqs must be (2, heads, hs/2), got {tuple(freqs.shape)}")
    if pos.ndim not in (2, 3) or pos.shape[-2] != 2:
        raise ValueError(f"rope positions must be (2, Np) or per image (B, 2, Np), got {tuple(pos.shape)}")
    cx, cy = pos[..., 0, None, :, None], pos[..., 1, None, :, None]  # ([B,] 1, Np, 1)
    angles = cx * freqs[0][:, None, :] + cy * freqs[1][:, None, :]  # ([B,] NHf, Np, hs/2)
    return angles, RopeAnglesCache(pos)


def rope_angles_backward(dangles, cache: RopeAnglesCache):
    """``dangles: ([B,] NHf, Np, hs/2) -> dfreqs: (2, NHf, hs/2)``: ``dfx = sum_n cx dangles``, same for y
    (and summed over the images when the positions were per image)."""
    xp = array_module(dangles)
    rule = "bhnj,ban->ahj" if dangles.ndim == 4 else "hnj,an->ahj"
    return xp.einsum(rule, dangles, cache.pos.astype(dangles.dtype))


class RopeCache(NamedTuple):
    cos: object  # ([B,] NHf, Np, hs/2)
    sin: object  # ([B,] NHf, Np, hs/2)
    out: object  # (B, NH, N, hs): the rotated tensor (attention keeps it anyway as its q or k)
    num_prefix: int


def _check_rope_input(x, angles, num_prefix):
    if x.ndim != 4:
        raise ValueError(f"rope input must be (B, NH, N, hs), got {x.ndim}-D {tuple(x.shape)}")
    if angles.ndim not in (3, 4):
        raise ValueError(f"rope angles must be (heads or 1, Np, hs/2) or per image (B, heads or 1, Np, hs/2), "
                         f"got {tuple(angles.shape)}")
    batch, heads, tokens, head_size = x.shape
    if angles.ndim == 4 and angles.shape[0] != batch:
        raise ValueError(f"rope angles are for {angles.shape[0]} images but the input has {batch}")
    if head_size % 2 or angles.shape[-1] != head_size // 2:
        raise ValueError(f"rope angles have {angles.shape[-1]} pairs per head but the head size is {head_size} "
                         f"(expected {head_size // 2} pairs)")
    if angles.shape[-3] not in (1, heads):
        raise ValueError(f"rope angles are for {angles.shape[-3]} heads but the input has {heads}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, (int, np.integer)) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0, got {num_prefix!r}")
    if tokens - num_prefix != angles.shape[-2]:
        raise ValueError(f"rope angles are for {angles.shape[-2]} patches but the input has {tokens} tokens with "
                         f"{num_prefix} prefix tokens ({tokens - num_prefix} patches); build the angles for "
                         f"this image's patch grid")


def rope_forward(x, angles, num_prefix: int = 1):
    """Turn each pair of ``x`` by its angle; the first ``num_prefix`` tokens (class token) pass unturned.

    ``x: (B, NH, N, hs), angles: (NHf, Np, hs/2) with N = num_prefix + Np -> out: (B, NH, N, hs)``;
    angles per image ``(B, NHf, Np, hs/2)`` are taken as they come (patch dropout).
    """
    _check_rope_input(x, angles, num_prefix)
    xp = array_module(x)
    t = num_prefix
    cos, sin = xp.cos(angles), xp.sin(angles)  # ([B,] NHf, Np, hs/2), broadcast over the batch and heads
    a, b = x[:, :, t:, 0::2], x[:, :, t:, 1::2]  # (B, NH, Np, hs/2) each
    out = xp.empty_like(x)
    out[:, :, :t] = x[:, :, :t]
    out[:, :, t:, 0::2] = a * cos - b * sin
    out[:, :, t:, 1::2] = a * sin + b * cos
    return out, RopeCache(cos, sin, out, t)


def rope_backward(dout, cache: RopeCache):
    """``dout: (B, NH, N, hs) -> dx: (B, NH, N, hs), dangles`` shaped as the forward's angles."""
    xp = array_module(dout)
    t, cos, sin = cache.num_prefix, cache.cos, cache.sin
    da, db = dout[:, :, t:, 0::2], dout[:, :, t:, 1::2]  # (B, NH, Np, hs/2) each
    dx = xp.empty_like(dout)
    dx[:, :, :t] = dout[:, :, :t]
    dx[:, :, t:, 0::2] = da * cos + db * sin  # the turn back by -theta
    dx[:, :, t:, 1::2] = db * cos - da * sin
    out_a, out_b = cache.out[:, :, t:, 0::2], cache.out[:, :, t:, 1::2]
    dangles = db * out_a - da * out_b  # (B, NH, Np, hs/2)
    if cos.ndim == 3:
        dangles = dangles.sum(axis=0)  # one table for the batch: (NH, Np, hs/2)
    if cos.shape[-3] == 1:
        dangles = dangles.sum(axis=-3, keepdims=True)  # one table shared by every head
    return dx, dangles

"""Head gates (Michel et al., 2019): a scalar ``xi_h`` on the output of each attention head.

Derivation: docs/head_pruning.md (the learners' tour: examples/13_fewer_tokens.py)

Shapes: ``D`` width, ``NH`` heads, ``hs`` head size, ``E = NH hs`` (``= D`` unless heads were pruned).

The attention's output is ``out = y W_proj^T + b`` with ``y = [y_1 | ... | y_NH]`` (B, N, E), the
heads side by side. Gating head ``h`` multiplies ``y_h`` by ``xi_h``; since ``y_h`` only meets the
columns ``W_proj[:, h]`` of its head, that is the same as scaling those columns::

    out = (y * xi_cols) W_proj^T = y (W_proj * xi_cols)^T        xi_cols = repeat(xi, hs)   (E,)

so the gate is applied to the weight (a (D, E) multiply instead of a (B, N, E) one) and the
attention itself does not change. Backward, from ``dW_eff`` = the gradient of the gated weight::

    dW_proj = dW_eff * xi_cols
    dxi_h   = sum_{i, j in h} W_proj[i, j] dW_eff[i, j]    (= sum_{b,n} y_h . dy_h, Michel's I_h)

The second line is Michel et al.'s ``sum O_h . dO_h`` rewritten: ``dW_eff = dout^T y`` and
``dy = dout W_eff``, so both sums are ``sum_{b,n,i,j in h} dout[b,n,i] W[i,j] y[b,n,j]``.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module


class HeadGateCache(NamedTuple):
    proj_w: object  # (D, E): the ungated weight
    gate_cols: object  # (E,): each head's gate repeated over its hs columns
    heads: int


def head_gate_forward(proj_w, gate, heads: int):
    """``proj_w: (D, E), gate: (NH,) -> proj_w_eff: (D, E)``, the columns of head h times ``gate[h]``."""
    xp = array_module(proj_w)
    head_size = proj_w.shape[1] // heads
    gate_cols = xp.repeat(gate, head_size)  # (E,)
    return proj_w * gate_cols[None, :], HeadGateCache(proj_w, gate_cols, heads)


def head_gate_backward(dproj_w_eff, cache: HeadGateCache):
    """``dproj_w_eff: (D, E) -> dproj_w: (D, E), dgate: (NH,)``."""
    dim, inner = dproj_w_eff.shape
    dproj_w = dproj_w_eff * cache.gate_cols[None, :]
    dgate = (dproj_w_eff * cache.proj_w).reshape(dim, cache.heads, inner // cache.heads).sum(axis=(0, 2))  # (NH,)
    return dproj_w, dgate

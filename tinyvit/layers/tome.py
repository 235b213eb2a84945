"""Token merging (ToMe, Bolya et al., ICLR 2023): each block merges ``r`` pairs of similar tokens.

Derivation: docs/tome.md (the learners' tour: examples/13_fewer_tokens.py)

Shapes: ``B`` batch, ``N`` tokens in, ``N' = N - r`` tokens out, ``T`` prefix tokens (class
token, DeiT's distillation token), ``C`` width of the similarity metric, ``D`` width.

Matching (:func:`tome_match`, bipartite soft matching, as ToMe's ``bipartite_soft_matching``)::

    metric = k averaged over the heads                 (B, N, C)   the block's attention keys
    a, b   = metric[:, 0::2], metric[:, 1::2]          alternating split, cosine similarity
    scores = a_hat @ b_hat^T                           (B, Na, Nb); prefix tokens get -inf
    each a-token's best b-partner; the r a-tokens with the most similar partners are merged
    into them, the other a-tokens and all b-tokens stay

The matching is a function of the keys only and is held fixed within a step (argmax and argsort
have no gradient), so the merge itself is a **linear map** ``M (N', N)`` of the tokens:
``M[j, i] = 1`` when input token ``i`` goes to output token ``j``. With token sizes ``s``
(how many patches a token already stands for), the merge is the size-weighted average::

    out  = (M (s * x)) / s'        s' = M s            (B, N', D), (B, N', 1)
    dx   = s * M^T (dout / s')                         M^T is a gather: dx[i] = g[dest(i)]

The sizes also give proportional attention: ``log s`` is added to every row of the next
block's attention scores (a key that stands for s tokens gets s times the weight), and a
mean pool at the end weights each token by its size. The class (and distillation) token is
never merged and stays in front.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module


def tome_max_r(num_tokens: int, num_prefix: int, depth: int) -> int:
    """The largest ``r`` that every one of ``depth`` blocks can merge: block ``i`` sees
    ``N - i r`` tokens and can merge at most half of its ``N - i r - T`` non-prefix tokens."""
    r = 0
    while all(r + 1 <= (num_tokens - i * (r + 1) - num_prefix) // 2 for i in range(depth)):
        r += 1
    return r


def tome_token_counts(num_tokens: int, r: int, depth: int) -> list:
    """Tokens after each block: ``[N - r, N - 2r, ..., N - depth r]``."""
    return [num_tokens - (i + 1) * r for i in range(depth)]


class TomeMatch(NamedTuple):
    """The matching of one block: integer index arrays, constants of the step."""

    keep: object  # (B, N'): for each output token, the input token it starts from
    src: object  # (B, r): the input tokens merged away (a-tokens)
    src_dest: object  # (B, r): the output token each of them is merged into
    dest: object  # (B, N): the output token of every input token (the gather of the backward)


def tome_match(metric, r: int, num_prefix: int = 1) -> TomeMatch:
    """Bipartite soft matching. ``metric: (B, N, C)`` (the head-averaged keys) -> :class:`TomeMatch`.

    ``r`` must be at most half of the ``N - T`` non-prefix tokens (ValueError otherwise).
    Output order: the prefix tokens, the unmerged a-tokens in order, then the b-tokens in order
    (ToMe's order when only a class token is present)."""
    xp = array_module(metric)
    batch, tokens, _ = metric.shape
    largest = (tokens - num_prefix) // 2
    if r > largest:
        raise ValueError(f"ToMe r={r} is more than half of the {tokens - num_prefix} mergeable tokens this block "
                         f"sees ({tokens} tokens, {num_prefix} prefix); the largest r here is {largest}")
    metric = metric / xp.sqrt((metric * metric).sum(axis=-1, keepdims=True))  # cosine similarity below
    a, b = metric[:, 0::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C): token 2i is a[i], token 2i+1 is b[i]
    scores = a @ b.swapaxes(-1, -2)  # (B, Na, Nb)
    for t in range(num_prefix):  # a prefix token neither merges (row) nor receives (column)
        if t % 2 == 0:
            scores[:, t // 2, :] = -float("inf")
        else:
            scores[:, :, t // 2] = -float("inf")
    node_max = scores.max(axis=-1)  # (B, Na): each a-token's best similarity
    node_idx = scores.argmax(axis=-1)  # (B, Na): and its b-partner
    edge = xp.argsort(-node_max, axis=-1)  # (B, Na): most similar first
    src_a = edge[:, :r]  # (B, r): a-tokens merged away
    unm_a = xp.sort(edge[:, r:], axis=-1)  # (B, Na - r): a-tokens kept, in order
    dst_b = xp.take_along_axis(node_idx, src_a, axis=-1)  # (B, r): their b-partners

    num_b = tokens // 2
    b_pos = xp.broadcast_to(xp.arange(num_b)[None, :] * 2 + 1, (batch, num_b))
    keep = xp.concatenate([unm_a * 2, b_pos], axis=1)  # (B, N'): input positions, ToMe's order
    out_tokens = keep.shape[1]
    # prefix tokens to the front (a distillation token is b[0]): sort by (prefix position - T) or own index
    order = xp.where(keep < num_prefix, keep - num_prefix, xp.arange(out_tokens)[None, :])
    keep = xp.take_along_axis(keep, xp.argsort(order, axis=-1), axis=-1)
    src = src_a * 2  # (B, r): input positions
    # invert: perm = [keep | src] is a permutation of the N positions; inv[i] = where i sits in perm
    inv = xp.argsort(xp.concatenate([keep, src], axis=1), axis=-1)  # (B, N)
    src_dest = xp.take_along_axis(inv, dst_b * 2 + 1, axis=-1)  # (B, r): output slot of each partner
    slot = xp.concatenate([xp.broadcast_to(xp.arange(out_tokens)[None, :], (batch, out_tokens)), src_dest], axis=1)
    dest = xp.take_along_axis(slot, inv, axis=-1)  # (B, N)
    return TomeMatch(keep, src, src_dest, dest)


class TomeMergeCache(NamedTuple):
    dest: object  # (B, N) int: output token of each input token
    size: object  # (B, N, 1): sizes in
    size_out: object  # (B, N', 1): sizes out


def _merge_sum(x, match: TomeMatch):
    """``x: (B, N, E) -> (B, N', E)``: ``M x``, each output the sum of the inputs sent to it."""
    xp = array_module(x)
    out = xp.take_along_axis(x, match.keep[..., None], axis=1)  # (B, N', E): each output's own token
    if match.src.shape[1]:
        out_tokens = match.keep.shape[1]
        onehot = (match.src_dest[:, None, :] == xp.arange(out_tokens)[None, :, None]).astype(x.dtype)  # (B, N', r)
        out = out + onehot @ xp.take_along_axis(x, match.src[..., None], axis=1)  # + the merged tokens
    return out


def tome_merge_forward(x, size, match: TomeMatch):
    """Size-weighted merge. ``x: (B, N, D), size: (B, N, 1) | None (all ones) -> out: (B, N', D)``;
    cache: the destination of every token and both sizes (the new sizes ``(B, N', 1)`` are ``cache.size_out``)."""
    xp = array_module(x)
    if size is None:
        size = xp.ones(x.shape[:2] + (1,), dtype=x.dtype)
    size_out = _merge_sum(size, match)  # (B, N', 1)
    out = _merge_sum(x * size, match) / size_out  # (B, N', D)
    return out, TomeMergeCache(match.dest, size, size_out)


def tome_merge_backward(dout, cache: TomeMergeCache):
    """``dout: (B, N', D) -> dx: (B, N, D)``: ``s * M^T (dout / s')``, ``M^T`` a gather by ``dest``."""
    xp = array_module(dout)
    g = dout / cache.size_out  # (B, N', D)
    return xp.take_along_axis(g, cache.dest[..., None], axis=1) * cache.size  # (B, N, D)


def size_bias(size):
    """Proportional attention: ``size: (B, N, 1) -> (B, 1, 1, N)``, ``log s`` added to every score row."""
    xp = array_module(size)
    return xp.log(size)[:, None, None, :, 0]


class WeightedPoolCache(NamedTuple):
    weight: object  # (B, N, 1): size / total size of the patch tokens, 0 on the prefix tokens


def weighted_mean_pool_forward(x, size, num_prefix: int):
    """``x: (B, N, D), size: (B, N, 1) -> out: (B, D)``: ``sum_i s_i x_i / sum_i s_i`` over the
    patch tokens, the mean of the original patches when every token is the average of its patches."""
    xp = array_module(x)
    weight = size * (xp.arange(x.shape[1]) >= num_prefix)[None, :, None]  # (B, N, 1): prefix tokens 0
    weight = weight / weight.sum(axis=1, keepdims=True)
    return (x * weight).sum(axis=1), WeightedPoolCache(weight)


def weighted_mean_pool_backward(dout, cache: WeightedPoolCache):
    """``dout: (B, D) -> dx: (B, N, D) = w_i dout``."""
    return cache.weight * dout[:, None, :]

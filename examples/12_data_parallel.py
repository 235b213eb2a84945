"""Chapter 12: data parallelism: K processes, one global batch, the same step as one process.

``mpiexec -n K python -m tinyvit train`` splits every global batch of B images into K shares
of b = B / K. Each rank runs the forward and the hand-written backward on its share, which
gives the gradient of the *mean* loss over its b images; the all-reduce sums the K gradients
and every rank divides by K::

    (1/K) sum_r  (1/b) sum_{i in share r} dL_i/dW  =  (1/B) sum_{i=1..B} dL_i/dW

the gradient of the whole batch (the shares are equal). Every rank then takes the same
optimiser step from the same weights, so the weights stay identical everywhere, and equal to
one process's, up to the order of the floating-point sums.

That needs one more thing: every random number must belong to a *sample*, not to a rank's
stream. If rank 1 drew its dropout masks from its own generator, its samples would get other
masks than in one process. tinyvit draws dropout with a counter-based hash of (seed, step,
sample's place in the global batch, draw, element) (``tinyvit/training/randomness.py``), and
crop/flip/RandAugment from a generator per (seed, step, sample); Mixup draws once per step and
pairs place g with place B-1-g, so a rank also prepares its samples' partners.

Part 1 proves the equality in one process (the K shares simulated), and shows what breaks
with per-rank generators. Part 2 times the backward block by block and draws the overlap:
each bucket's all-reduce starts as soon as its block's backward is done (the ``grad_ready``
hook), so only the last bucket waits after the backward.

Derivation: docs/data_parallel.md. Run: ``python3 examples/12_data_parallel.py``;
on processes for real: ``mpiexec -n 2 python3 -m tinyvit train`` (README: Data parallel).
Picture: ``docs/images/12_data_parallel.png``.
"""
from __future__ import annotations

import time

import _tour
import numpy as np

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import get_backend
from tinyvit.distributed import GradientAllReduce, SingleProcess
from tinyvit.training.randomness import SampleRandom
from tinyvit.training.train import TrainConfig, augment_batch


def share_gradient(model, x_all, t_all, positions, step, rng=None):
    """One rank's work: forward + backward on its share -> its mean-loss gradient."""
    rng = rng if rng is not None else SampleRandom(model.backend, 0, step, positions)
    logits = model.forward(x_all[positions], train=True, rng=rng)  # (b, K)
    _, dlogits = softmax_cross_entropy(logits, t_all[positions], 0.1)
    model.backward(dlogits)
    return {k: v.copy() for k, v in model.grads.items()}


def part1_equal(quick: bool) -> dict:
    _tour.banner("what is averaged, and why K ranks equal one process")
    images, labels = _tour.digits()
    B, step = 16, 7
    cfg = TrainConfig(crop_padding=1, flip=True, mixup=0.4, seed=0)
    batch = np.random.default_rng(0).permutation(len(labels))[:B]  # the global batch (indices)
    x, t = augment_batch(cfg, images, labels, batch, np.arange(B), step, 10, 0.0)
    print(f"global batch: images {x.shape}, soft targets {t.shape} (crop, flip and Mixup on)")
    model = VisionTransformer(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
                              channels=1, dtype="float64", dropout=0.1, drop_path_rate=0.2, seed=0)
    x, t = x.astype(np.float64), t.astype(np.float64)
    whole = share_gradient(model, x, t, np.arange(B), step)
    results = {}
    for K in (2, 4):
        b = B // K
        shares = [share_gradient(model, x, t, np.arange(r * b, (r + 1) * b), step) for r in range(K)]
        mean = {k: sum(s[k] for s in shares) / K for k in whole}  # what the all-reduce + divide gives
        err = max(_tour.max_err(mean[k], whole[k])[1] for k in whole)
        # the same, had every rank drawn its dropout from its own generator (seeded by its rank)
        naive = [share_gradient(model, x, t, np.arange(r * b, (r + 1) * b), step, np.random.default_rng([0, r]))
                 for r in range(K)]
        naive_err = max(_tour.max_err(sum(s[k] for s in naive) / K, whole[k])[1] for k in whole)
        # and each rank's share alone, with its own augmentation (what a rank sees: x (b, C, H, W))
        xs, ts = augment_batch(cfg, images, labels, batch, np.arange(b, 2 * b), step, 10, 0.0)
        same_aug = np.array_equal(xs, x[b:2 * b].astype(np.float32)) and np.array_equal(ts, t[b:2 * b])
        print(f"K={K}: shares of {(b,) + x.shape[1:]}; mean of the {K} share gradients vs the whole batch's: "
              f"{err:.1e} relative (per-sample draws) | {naive_err:.1e} (per-rank dropout generators); "
              f"rank 1 augments its share alone exactly as in the whole batch: {same_aug}")
        assert err < 1e-13 and same_aug and naive_err > 1e-3
        results[K] = (err, naive_err)
    return results


def part2_timeline(quick: bool):
    _tour.banner("the overlap: each bucket is sent as soon as its block's backward is done")
    cfg = TrainConfig()  # the default tinyvit train model: 4 blocks, width 96
    b = 32  # one of 2 ranks' share of the global batch of 64
    model = VisionTransformer(image_size=8, patch_size=cfg.patch_size, num_classes=10, dim=cfg.dim, depth=cfg.depth,
                              heads=cfg.heads, mlp_dim=cfg.mlp_dim, channels=1, pool=cfg.pool, gelu=cfg.gelu,
                              dropout=cfg.dropout, drop_path_rate=cfg.drop_path, seed=0)
    x = np.random.default_rng(1).standard_normal((b, 1, 8, 8)).astype(np.float32)
    y = np.arange(b) % 10
    events = []  # (seconds since the backward started, which gradients, bytes)

    def hook(grads):
        events.append((time.perf_counter() - t0, _name(grads), sum(g.nbytes for g in grads.values())))

    best = None
    for _ in range(3 if quick else 15):  # keep the fastest backward (the machine is shared)
        logits = model.forward(x, train=True, rng=SampleRandom(get_backend("numpy"), 0, 0, np.arange(b)))
        _, d = softmax_cross_entropy(logits, y, 0.1)
        events.clear()
        t0 = time.perf_counter()
        model.backward(d, grad_ready=hook)
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, list(events))
    total, events = best
    print(f"x {x.shape} -> backward {total * 1e3:.2f} ms; grad_ready fired {len(events)} times:")
    for at, name, nbytes in events:
        print(f"  at {at * 1e3:6.2f} ms  {name:28s} {nbytes / 1024:7.1f} KiB")
    # the buckets GradientAllReduce sends (here: one per hook, bucket_mb=0), on a SingleProcess: nothing moves
    reducer = GradientAllReduce(SingleProcess(), 0.0)
    assert reducer.finish(model.grads) is model.grads  # K = 1: the gradients as they are
    # a link whose all-reduce of all the gradients takes as long as the backward: the case where overlap matters
    total_bytes = sum(n for *_, n in events)
    link = total_bytes / total  # bytes per second
    timelines = {}
    for overlap in (False, True):
        free, spans = 0.0, []
        for at, name, nbytes in events:
            start = max(at if overlap else total, free)  # one message at a time on the link
            free = start + nbytes / link
            spans.append((start, free, name))
        timelines[overlap] = spans
        exposed = max(free - total, 0.0)
        print(f"{'overlapped' if overlap else 'after the backward'}: step waits {exposed * 1e3:.2f} ms for the "
              f"all-reduce ({exposed / total:.0%} of the backward)")
    return total, events, timelines


def _name(grads) -> str:
    keys = list(grads)
    if keys[0].startswith("blocks."):
        return f"block {keys[0].split('.')[1]} ({len(keys)} tensors)"
    if keys[0].startswith("head"):
        return "head + final norm"
    return "embeddings"


def main():
    args = _tour.parse_args(__doc__)
    part1_equal(args.quick)
    total, events, timelines = part2_timeline(args.quick)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.4))
    starts = [0.0] + [at for at, *_ in events[:-1]]
    colors = plt.cm.tab10.colors
    for j, ((at, name, _), s) in enumerate(zip(events, starts)):
        ax.barh(2, (at - s) * 1e3, left=s * 1e3, color=colors[j % 10], edgecolor="k")
        if at - s > 0.08 * total:  # label the bars wide enough to hold one
            ax.text((s + at) / 2 * 1e3, 2, name.split(" (")[0], ha="center", va="center", fontsize=7)
    for row, overlap in ((1, True), (0, False)):
        for j, (a, e, name) in enumerate(timelines[overlap]):
            ax.barh(row, (e - a) * 1e3, left=a * 1e3, color=colors[j % 10], edgecolor="k", alpha=0.8)
        end = timelines[overlap][-1][1]
        ax.annotate(f"waits {max(end - total, 0) * 1e3:.2f} ms", (end * 1e3, row), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.axvline(total * 1e3, color="k", ls="--", lw=1)
    ax.set_yticks([0, 1, 2], ["all-reduce after\nthe backward", "all-reduce overlapped\n(grad_ready hook)",
                              "backward (compute)"])
    ax.set_xlabel("ms since the backward started (one rank's share: batch 32, the default model)")
    ax.set_title("One bucket per block, sent when its gradients are final; the link is assumed as slow as the "
                 "backward (all gradients in one backward's time)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _tour.save(fig, args, "12_data_parallel.png")


if __name__ == "__main__":
    main()

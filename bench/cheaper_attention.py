"""Measurements for cheaper attention (issue 12): a ViT-Ti/16 training step (forward, loss,
backward, batch 8, float32, NumPy) with plain, flash and windowed attention, per image size;
time (median, min-max of interleaved repeats) and peak memory (tracemalloc), each against
plain attention's in the same run. Writes results_cheaper_attention.json next to this file as
it goes; the numbers are copied into bench/README.md ("Cheaper attention").

    python3 bench/cheaper_attention.py                       # 224, 448 (checked) and 640 px
    python3 bench/cheaper_attention.py --sizes 224 --repeats 5
    python3 bench/cheaper_attention.py --layer                # the attention layer alone, plain vs flash tiles

This is ``tinyvit bench --attention`` (tinyvit/benchmark/models.py: attention_sweep) with the
sizes run one by one and written down as each finishes, since a 640 px step takes minutes on a
shared 2-core machine. Flash is checked equal to plain (logits, every gradient) before it is
timed at every size up to ``--check-up-to`` tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def layer_sweep(args) -> None:
    """Attention forward + backward alone (ViT-Ti/16 shapes: D 192, NH 3, batch 8), plain against flash
    at several tile sides, interleaved, per token count: where (if anywhere) flash gets faster."""
    import numpy as np

    from tinyvit.benchmark import set_threads, timing
    from tinyvit.layers.attention import attention_backward, attention_forward
    from tinyvit.layers.flash_attention import flash_attention_backward, flash_attention_forward

    set_threads(args.threads)
    rng = np.random.default_rng(0)
    out = {"load_before": os.getloadavg(), "rows": []}
    for size in args.sizes:
        n = (size // 16) ** 2 + 1
        x = rng.standard_normal((args.batch, n, 192)).astype(np.float32)
        w = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in ((576, 192), (576,), (192, 192), (192,))]
        d = rng.standard_normal((args.batch, n, 192)).astype(np.float32)
        fns = {"plain": lambda: attention_backward(d, attention_forward(x, *w, 3)[1])}
        for block in args.blocks:
            fns[f"flash {block}"] = (lambda b=block: flash_attention_backward(d, flash_attention_forward(x, *w, 3, b)[1]))
        times = timing.time_calls(fns, args.repeats, warmup=1)
        base = times["plain"].median
        for name, t in times.items():
            out["rows"].append({"image_size": size, "tokens": n, "variant": name, **t.to_dict(), "vs_plain": t.median / base,
                                "load": os.getloadavg()})
            print(f"{size} px N={n:5d} {name:10s} {t.median * 1e3:8.1f} ms ({t.min * 1e3:.1f}-{t.max * 1e3:.1f}) "
                  f"{t.median / base:.2f}x plain", flush=True)
        with open(args.out.replace(".json", "_layer.json"), "w") as f:
            json.dump(out, f, indent=1)


def main() -> None:
    from tinyvit.benchmark import models, report, set_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 640])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, nargs="*", default=[7, 8])
    p.add_argument("--variants", nargs="*", default=None, help="plain always; flash, window (default: all)")
    p.add_argument("--check-up-to", type=int, default=800, help="check flash == plain up to this many tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results_cheaper_attention.json"))
    p.add_argument("--layer", action="store_true", help="the attention layer alone, plain vs flash tiles")
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256])
    args = p.parse_args()
    if args.layer:
        return layer_sweep(args)
    threads = set_threads(args.threads)
    info = report.machine_info()
    results = {"machine": info, "threads": threads, "batch": args.batch, "repeats": args.repeats,
               "load_before": os.getloadavg(), "rows": []}
    print(f"{info['cpu']}, {info['cores']} cores, {threads} thread(s), load {os.getloadavg()}, "
          f"{platform.python_version()}", flush=True)
    for size in args.sizes:
        start = time.perf_counter()
        tokens = (size // 16) ** 2 + 1
        rows = models.attention_sweep("vit_ti16", [size], args.batch, "float32", args.repeats, args.windows,
                                      torch=False, check=tokens <= args.check_up_to, variants=args.variants)
        for r in rows:
            r["load"] = os.getloadavg()
        results["rows"] += rows
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(report.attention_table(rows), flush=True)
        print(f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()})\n", flush=True)


if __name__ == "__main__":
    main()

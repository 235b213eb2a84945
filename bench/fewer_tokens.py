"""Measurements for fewer tokens and fewer heads (issue 13) on ViT-Ti/S/B at 224 px: inference
images/s of ToMe at several r, of half the heads pruned and of PyTorch eager, and a training step
of ToMe and PatchDropout 0.5, each against the plain model in the same run (NumPy float32, batch
8, one thread, interleaved repeats). Writes results_fewer_tokens.json next to this file after each
model; the numbers are copied into bench/README.md and docs/tome.md.

    python3 bench/fewer_tokens.py                          # ViT-Ti, S, B; r = 0, 8, 12, 13, 15
    python3 bench/fewer_tokens.py --models vit_ti16 --repeats 5

This is ``tinyvit bench --fewer`` (tinyvit/benchmark/fewer.py) run model by model and written down
as each finishes, since a ViT-B training step takes seconds on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    from tinyvit.benchmark import report, set_threads
    from tinyvit.benchmark.fewer import fewer_sweep, fewer_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_ti16,vit_s16,vit_b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tome-r", default=None, help="comma list (default: 0, 8, 12, 13 and the largest)")
    p.add_argument("--out", default=os.path.join(HERE, "results_fewer_tokens.json"))
    args = p.parse_args()
    threads = set_threads(args.threads)
    info = report.machine_info()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    data = {"machine": info, "threads": threads, "batch": args.batch, "repeats": args.repeats, "rows": [],
            "load_average_at_start": load}
    rs = tuple(int(r) for r in args.tome_r.split(",")) if args.tome_r else None
    for name in args.models.split(","):
        rows = fewer_sweep(name, args.batch, "float32", args.repeats, rs)
        data["rows"] += rows
        try:
            data["load_average_at_end"] = os.getloadavg()
        except OSError:
            pass
        print(fewer_table(rows) + "\n", flush=True)
        report.write_json(args.out, data)


if __name__ == "__main__":
    main()

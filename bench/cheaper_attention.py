"""Measurements for cheaper attention (issue 12): a ViT-Ti/16 training step (forward, loss,
backward, batch 8, float32, NumPy) with plain, flash and windowed attention, per image size;
time (median, min-max of interleaved repeats) and peak memory (tracemalloc), each against
plain attention's in the same run. Writes results_cheaper_attention.json next to this file as
it goes; the numbers are copied into bench/README.md ("Cheaper attention").

    python3 bench/cheaper_attention.py                       # 224, 448 (checked) and 640 px
    python3 bench/cheaper_attention.py --sizes 224 --repeats 5

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
    args = p.parse_args()
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

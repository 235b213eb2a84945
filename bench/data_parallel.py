"""Data-parallel training measured: 1 against 2 ranks, the all-reduce with and without overlap.

    python3 bench/data_parallel.py                  # the runs below, interleaved, ~3 min here
    python3 bench/data_parallel.py --paper          # 8 GPUs x ViT-B/16 on paper (no run)

Each run is ``mpiexec -n K python3 bench/data_parallel.py --worker ...``: the default
``tinyvit train`` model (4 blocks, width 96, 302,506 parameters, float32) on the bundled
digits, global batch 64, one BLAS thread per rank, ``--steps`` training steps of the real
loop's pieces (per-sample dropout, forward, loss, backward with the grad_ready hook, the
bucketed all-reduce, clipping, AdamW). Per step the worker times the whole step and the
time spent waiting in ``GradientAllReduce.finish`` (the exposed communication); it also
times a blocking ``Allreduce`` of all the gradients in one message (the communication
itself). The variants run in rounds (round r runs each once), so a machine that gets
busier affects all alike; medians and min-max over the rounds are printed and written to
``bench/results_data_parallel.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [  # (label, ranks, extra worker flags)
    ("1 process", 1, []),
    ("2 ranks, overlap, bucket 0.25 MiB", 2, ["--bucket-mb", "0.25"]),
    ("2 ranks, overlap, bucket 0 (one per block)", 2, ["--bucket-mb", "0"]),
    ("2 ranks, overlap, bucket 25 MiB (one bucket)", 2, ["--bucket-mb", "25"]),
    ("2 ranks, no overlap", 2, ["--bucket-mb", "0.25", "--no-overlap"]),
]


def worker(args) -> None:
    import numpy as np
    from threadpoolctl import threadpool_limits

    sys.path.insert(0, str(ROOT))
    from tinyvit.distributed import GradientAllReduce, world
    from tinyvit.layers.loss import softmax_cross_entropy
    from tinyvit.training.data import Normalizer, epoch_order, load_dataset, split
    from tinyvit.training.optim import build_optimizer, clip_grad_norm
    from tinyvit.training.randomness import SampleRandom
    from tinyvit.training.train import TrainConfig, _build_model, augment_batch

    threadpool_limits(1, user_api="blas")
    comm = world("numpy")
    cfg = TrainConfig(bucket_mb=args.bucket_mb, overlap=not args.no_overlap)
    train_set, _ = split(load_dataset(None), cfg.test_fraction, cfg.split_seed)
    norm = Normalizer.fit(train_set.images)
    model = _build_model(cfg, train_set)
    opt = build_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay)
    share = cfg.batch_size // comm.size
    positions = np.arange(comm.rank * share, (comm.rank + 1) * share)
    reducer = GradientAllReduce(comm, cfg.bucket_mb, cfg.overlap)
    order = epoch_order(len(train_set.labels), cfg.seed, 0)
    step_s, wait_s, compute_s = [], [], []
    for step in range(args.warmup + args.steps):
        i = step % (len(order) // cfg.batch_size)
        batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        comm.barrier()  # every rank starts the step together: the step time is the slowest rank's
        t0 = time.perf_counter()
        xb, t = augment_batch(cfg, train_set.images, train_set.labels, batch, positions, step, 10, 0.0)
        x = model.backend.asarray(norm(xb), dtype=cfg.dtype)
        t = model.backend.asarray(t, dtype=cfg.dtype)
        logits = model.forward(x, train=True, rng=SampleRandom(model.backend, cfg.seed, step, positions))
        loss, dlogits = softmax_cross_entropy(logits, t, cfg.label_smoothing)
        model.backward(dlogits, grad_ready=reducer.grads_ready)
        t1 = time.perf_counter()
        before = reducer.stats["wait_s"]
        grads = reducer.finish(model.grads)
        waited = reducer.stats["wait_s"] - before
        grads, _ = clip_grad_norm(grads, cfg.clip_grad)
        opt.step(model.params, grads, 1e-3)
        t2 = time.perf_counter()
        if step >= args.warmup:
            step_s.append(t2 - t0)
            wait_s.append(waited)
            compute_s.append(t1 - t0)
    flat = np.concatenate([g.reshape(-1) for g in model.grads.values()])
    one_message = []
    if comm.size > 1:
        for _ in range(args.steps):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_start(flat.copy()).wait()
            one_message.append(time.perf_counter() - t0)
    times = comm.gather_object({"step_s": step_s, "wait_s": wait_s, "compute_s": compute_s})
    if comm.rank == 0:
        slowest = [max(r["step_s"][j] for r in times) for j in range(len(step_s))]
        print(json.dumps({
            "ranks": comm.size, "batch": cfg.batch_size, "params": model.num_params(),
            "grad_bytes": int(flat.nbytes), "buckets_per_step": reducer.stats["buckets"] / max(reducer.stats["steps"], 1),
            "step_ms": 1e3 * statistics.median(slowest),
            "images_per_s": cfg.batch_size / statistics.median(slowest),
            "exposed_comm_ms": 1e3 * statistics.median(times[0]["wait_s"]),
            "compute_ms": 1e3 * statistics.median(times[0]["compute_s"]),
            "allreduce_one_message_ms": 1e3 * statistics.median(one_message) if one_message else 0.0,
        }))


def mpiexec() -> str:
    import sysconfig
    import shutil

    for c in (Path(sysconfig.get_path("scripts")) / "mpiexec", Path(sys.executable).parent / "mpiexec"):
        if c.exists():
            return str(c)
    found = shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec: pip install 'tinyvit[mpi]'")
    return found


def drive(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", TINYVIT_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = {label: [] for label, *_ in VARIANTS}
    for r in range(args.rounds):
        for label, ranks, extra in VARIANTS:
            cmd = [mpiexec(), "-n", str(ranks), sys.executable, __file__, "--worker", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if out.returncode:
                raise SystemExit(f"{label}: {out.stderr[-2000:]}")
            rows[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {label}: {rows[label][-1]['images_per_s']:.0f} images/s", file=sys.stderr)
    load = os.getloadavg()
    summary = {"machine": _machine(), "load_average": load, "rounds": args.rounds, "steps": args.steps,
               "variants": {}}
    print(f"\nmachine: {summary['machine']}; load average {load[0]:.1f} (shared); {args.rounds} rounds x "
          f"{args.steps} steps; median [min-max] over the rounds\n")
    print("| run | images/s | step ms | compute ms (fwd+bwd) | exposed comm ms/step | one-message all-reduce ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, runs in rows.items():
        def stat(key):
            vals = [run[key] for run in runs]
            return statistics.median(vals), min(vals), max(vals)
        cols = {k: stat(k) for k in ("images_per_s", "step_ms", "compute_ms", "exposed_comm_ms",
                                      "allreduce_one_message_ms")}
        summary["variants"][label] = {"runs": runs, **{k: list(v) for k, v in cols.items()}}
        print(f"| {label} | " + " | ".join(f"{m:.{0 if k == 'images_per_s' else 2}f} [{lo:.{0 if k == 'images_per_s' else 2}f}-"
                                           f"{hi:.{0 if k == 'images_per_s' else 2}f}]" for k, (m, lo, hi) in cols.items())
              + " |")
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"\nwritten: {args.json}")


def _machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except Exception:
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


# ---------------------------------------------------------------- on paper
# NCCL all-reduce bus bandwidths, GB/s, as nccl-tests reports them for large messages. Stated
# assumptions from public nccl-tests results, not measured here (no GPU on this machine).
BUS_GBPS = {"8x H100 SXM, NVLink 4 (NVSwitch)": 360.0, "8x A100 SXM, NVLink 3 (NVSwitch)": 230.0,
            "8x GPUs on PCIe 4 (no NVLink)": 20.0, "8 nodes x 1 GPU, 100 Gb/s InfiniBand": 11.0}


def paper(args) -> None:
    sys.path.insert(0, str(ROOT))
    from tinyvit.benchmark.flops import as_config, count_params, train_step_flops

    vit_b = as_config("vit_b16")
    params = count_params(vit_b)
    k, per_gpu = 8, args.paper_batch
    grad_bytes = params * 4  # float32 gradients
    bus_factor = 2 * (k - 1) / k  # a ring all-reduce moves 2(K-1)/K of the buffer through every link
    step_flops = train_step_flops(vit_b, per_gpu)
    backward_flops = step_flops * 2 / 3
    print(f"ViT-B/16: {params:,} parameters -> {grad_bytes / 1e6:.0f} MB of float32 gradients all-reduced per "
          f"step; a ring all-reduce over {k} GPUs moves {bus_factor:.2f} x that = {grad_bytes * bus_factor / 1e6:.0f} MB "
          f"through each GPU's link (NCCL's 'bus bandwidth' counts exactly this).")
    print(f"Per GPU, batch {per_gpu}: {step_flops / 1e12:.1f} TFLOP per step, backward {backward_flops / 1e12:.1f} TFLOP.\n")
    block_params = params // vit_b.depth  # ~7.1 M: one block per bucket at DDP's 25 MB is ~ one 28 MB bucket
    print("Exposed = what the backward cannot hide: the all-reduce still running after the backward ends; at "
          "least the last bucket (block 0 + embeddings, sent when the backward is over).\n")
    print("| interconnect (assumed NCCL bus bandwidth) | all-reduce ms | backward ms at 50 / 200 TFLOP/s "
          "| exposed ms at 50 / 200 TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for name, gbps in BUS_GBPS.items():
        comm_ms = grad_bytes * bus_factor / (gbps * 1e9) * 1e3
        last_ms = block_params * 4 * bus_factor / (gbps * 1e9) * 1e3
        cols = []
        for tf in (50, 200):
            bwd_ms = backward_flops / (tf * 1e12) * 1e3
            window = bwd_ms * (vit_b.depth - 1) / vit_b.depth  # while blocks 11..1 run backward
            cols.append((bwd_ms, max(comm_ms - window, last_ms)))
        print(f"| {name} ({gbps:.0f} GB/s) | {comm_ms:.1f} | {cols[0][0]:.0f} / {cols[1][0]:.0f} | "
              f"{cols[0][1]:.1f} / {cols[1][1]:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--paper", action="store_true", help="8 GPUs x ViT-B/16 on paper")
    p.add_argument("--paper-batch", type=int, default=64, help="images per GPU for --paper")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=0.25)
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--json", default=str(ROOT / "bench" / "results_data_parallel.json"))
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.paper:
        paper(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()

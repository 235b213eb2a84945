"""What a benchmark run writes: the machine, markdown tables, JSON, and the sweep as a PNG."""
from __future__ import annotations

import datetime
import json
import os
import platform

import numpy as np

from ..training.checkpoint import atomic_save_figure, atomic_write


def machine_info() -> dict:
    """CPU model and cores, the BLAS NumPy runs and its kernel (threadpoolctl), GPU, versions."""
    import scipy

    from .. import __version__

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "tinyvit": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "cpu": platform.processor() or platform.machine(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "TINYVIT_FUSED": os.environ.get("TINYVIT_FUSED")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [dict({k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version",
                                                            "prefix")},
                                    owner=os.path.basename(os.path.dirname(d.get("filepath", ""))))
                               for d in threadpool_info()]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    from ..backend import cupy_available, get_backend

    ok, why = cupy_available()
    if ok:
        xp = get_backend("cupy").xp
        info["cupy"] = xp.__version__
        props = xp.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    else:
        info["cupy"] = None
        info["gpu"] = f"none ({why})"
    return info


def blas_line(info: dict) -> str:
    pools = info.get("threadpools")
    if not isinstance(pools, list):
        return str(pools)
    blas = [p for p in pools if p.get("internal_api") in ("openblas", "mkl", "blis")]
    return ", ".join(f"{p['internal_api']} {p.get('version')} ({p.get('owner')}) kernel {p.get('architecture')} "
                     f"{p.get('num_threads')} threads" for p in blas) or "no BLAS found by threadpoolctl"


def _ms(t):
    return f"{t * 1e3:.2f}" if t < 0.1 else f"{t * 1e3:.0f}"


def layer_table(rows) -> str:
    out = ["| layer | shape | pass | backend / variant | median ms | min-max ms | GFLOP/s | x torch-cpu | check |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        vs = f"{r['vs_torch_cpu']:.2f}" if r.get("vs_torch_cpu") else ""
        chk = f"{r['check_rel_err']:.0e}" if r.get("check_rel_err") is not None else ""
        out.append(f"| {r['layer']} | {r['shape']} | {r['pass']} | {r['backend']} | {_ms(r['median_s'])} | "
                   f"{_ms(r['min_s'])}-{_ms(r['max_s'])} | {r['gflops']:.1f} | {vs} | {chk} |")
    return "\n".join(out)


def model_table(rows) -> str:
    out = ["| model | batch | step | backend | median ms | min-max ms | images/s | GFLOP/s | % of matmul peak | "
           "x torch | peak MB |",
           "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    torch_median = {(r["model"], r["batch"], r["kind"]): r["median_s"] for r in rows if r["backend"] == "torch-cpu"}
    torch_cuda = {(r["model"], r["batch"], r["kind"]): r["median_s"] for r in rows if r["backend"] == "torch-cuda"}
    for r in rows:
        key = (r["model"], r["batch"], r["kind"])
        ref = torch_cuda.get(key) if r["backend"] in ("cupy", "torch-cuda") else torch_median.get(key)
        vs = f"{r['median_s'] / ref:.2f}" if ref else ""
        frac = f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else ""
        out.append(f"| {r['model']} | {r['batch']} | {r['kind']} | {r['backend']} | {_ms(r['median_s'])} | "
                   f"{_ms(r['min_s'])}-{_ms(r['max_s'])} | {r['images_per_s']:.1f} | {r['gflops']:.1f} | {frac} | "
                   f"{vs} | {peak} |")
    return "\n".join(out)


def split_table(split: dict) -> str:
    engines = list(split)
    rows = sorted({k for s in split.values() for k in s if k != "total"})
    out = ["| layer | " + " | ".join(f"{e} ms | {e} %" for e in engines) + " |",
           "| --- | " + " | ".join("---: | ---:" for _ in engines) + " |"]
    for row in rows + ["total"]:
        cells = []
        for e in engines:
            v, total = split[e].get(row, 0.0), split[e]["total"]
            cells.append(f"{v * 1e3:.0f} | {100 * v / total:.0f}%")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sweep_table(rows) -> str:
    out = ["| image | tokens N | backend | median ms | min-max ms | attention FLOP share | NumPy time in attention core + softmax |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        share = r.get("numpy_attention_time_share")
        out.append(f"| {r['image_size']} | {r['tokens']} | {r['backend']} | {_ms(r['median_s'])} | "
                   f"{_ms(r['min_s'])}-{_ms(r['max_s'])} | {100 * r['attention_flop_share']:.0f}% | "
                   f"{'' if share is None else f'{100 * share:.0f}%'} |")
    return "\n".join(out)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file in the same folder, then ``os.replace``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1, default=str).encode())


def plot_sweep(rows, path: str) -> None:
    """Training-step time against tokens, one line per backend, and the attention share (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted((r["tokens"], r["median_s"]) for r in rows if r["backend"] == backend)
        ax1.loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=backend)
    ax1.set_xlabel("tokens N")
    ax1.set_ylabel("training step, ms (median)")
    ax1.set_title(f"{rows[0]['model']}, batch {rows[0]['batch']}")
    ax1.legend()
    numpy_rows = sorted((r["tokens"], r) for r in rows if r["backend"] == "numpy")
    if numpy_rows:
        xs = [t for t, _ in numpy_rows]
        ax2.semilogx(xs, [100 * r["attention_flop_share"] for _, r in numpy_rows], "s--", label="attention share of FLOPs")
        if numpy_rows[0][1].get("numpy_attention_time_share") is not None:
            ax2.semilogx(xs, [100 * r["numpy_attention_time_share"] for _, r in numpy_rows], "o-",
                         label="NumPy time in q k^T, softmax, att v")
        ax2.axhline(50, color="grey", lw=0.5)
        ax2.set_xlabel("tokens N")
        ax2.set_ylabel("%")
        ax2.set_title("where the quadratic term takes over")
        ax2.legend()
    ticks = sorted({r["tokens"] for r in rows})
    for ax in (ax1, ax2):
        ax.minorticks_off()
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def attention_table(rows) -> str:
    """The cheaper-attention sweep: one line per image size and attention."""
    lines = ["| image | tokens | batch | attention | train step median (min-max) | vs plain | peak memory | vs plain "
             "| train GFLOP |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2 ** 20:.0f} MiB" if r.get("peak_bytes") else "—"
        mem = f"{r['memory_vs_plain']:.2f}x" if r.get("memory_vs_plain") else "—"
        lines.append(f"| {r['image_size']} | {r['tokens']} | {r['batch']} | {r['variant']} | "
                     f"{_ms(r['median_s'])} ms ({_ms(r['min_s'])}-{_ms(r['max_s'])}) | "
                     f"{r['time_vs_plain']:.2f}x | {peak} | {mem} | {r['train_gflop']:.3g} |")
    return "\n".join(lines)


def jit_table(jit: dict) -> str:
    """The first call of the compiled loops in a fresh process, with and without numba's disk cache."""
    if "error" in jit:
        return f"not measured: {jit['error']}"
    lines = ["| numba cache | CPU path | import tinyvit s | import numba s | compile or load every loop s |",
             "| --- | --- | ---: | ---: | ---: |"]
    for kind, r in jit.items():
        lines.append(f"| {kind} | {r['path']} | {r['import_tinyvit_s']:.2f} | {r['import_numba_s']:.2f} | "
                     f"{r['compile_s']:.2f} |")
    return "\n".join(lines)

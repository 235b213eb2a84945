"""Why tinyvit's linear layers trail PyTorch's at ViT-B/16, batch 8, when a plain GEMM does not.

Times, interleaved in one process (median, min-max over --repeats), at the three ViT-B/16 b8 shapes
(M = 8 x 197 = 1576 tokens; qkv 768 -> 2304, fc1 768 -> 3072, fc2 3072 -> 768):

- ``gemm into out``: ``np.matmul(x, w.T, out=buf)``: the BLAS call alone, into a preallocated buffer;
- ``gemm``: ``x @ w.T`` (a fresh output each call: allocation and first-touch page faults);
- ``tinyvit forward``: ``linear_forward`` (the product, then ``out += b``);
- ``torch forward``: ``F.linear`` (``addmm``: the bias goes into the GEMM);
- the backwards: tinyvit ``linear_backward`` (dx, dw, db) against PyTorch autograd of ``F.linear``;
- ``after GELU``: the forward GEMM right after a float32 GELU of the fc1 output (the order a block
  runs them in), so any thread pool still spinning from the GELU competes with OpenBLAS's threads.

Run: ``python3 bench/linear_b16.py [--threads 2] [--repeats 15]``; ``NUMBA_THREADING_LAYER``
and ``TINYVIT_NUMBA=0`` change what the GELU runs on. Results: bench/README.md.
"""
import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prange", action="store_true", help="also time a GELU by a numba prange loop before the GEMM")
    args = ap.parse_args()
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(args.threads)
    os.environ["TINYVIT_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from tinyvit.benchmark.timing import time_calls
    from tinyvit.layers import kernels
    from tinyvit.layers.gelu import gelu_forward
    from tinyvit.layers.linear import linear_backward, linear_forward

    kernels.compile_all()
    rng = np.random.default_rng(0)
    m = args.batch * 197
    fns = {}
    prange_gelu = None
    if args.prange:
        import numba

        numba.set_num_threads(args.threads)
        loops = kernels._numba_loops()

        @numba.njit(parallel=True, fastmath=True, error_model="numpy")
        def prange_gelu(x, out):  # the same loop body, shared out by numba's own threading layer
            n = x.size
            parts = numba.get_num_threads()
            for p in numba.prange(parts):
                loops.gelu_erf(x, out, n * p // parts, n * (p + 1) // parts)

    for name, d_in, d_out in (("qkv", 768, 2304), ("fc1", 768, 3072), ("fc2", 3072, 768)):
        x = rng.standard_normal((args.batch, 197, d_in)).astype(np.float32)
        w = (rng.standard_normal((d_out, d_in)) * 0.02).astype(np.float32)
        b = rng.standard_normal(d_out).astype(np.float32)
        dout = rng.standard_normal((args.batch, 197, d_out)).astype(np.float32)
        buf = np.empty((m, d_out), np.float32)
        h = rng.standard_normal((m, 3072)).astype(np.float32)  # a GELU's worth of input before each product
        xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        yt = torch.nn.functional.linear(xt, wt, bt)
        dt = torch.from_numpy(dout)
        x2 = x.reshape(m, d_in)
        _, cache = linear_forward(x, w, b)
        hf = h.reshape(-1)
        hout = np.empty_like(hf)
        fns.update({
            f"{name} gemm into out": lambda x2=x2, w=w, buf=buf: np.matmul(x2, w.T, out=buf),
            f"{name} gemm": lambda x2=x2, w=w: x2 @ w.T,
            f"{name} tinyvit forward": lambda x=x, w=w, b=b: linear_forward(x, w, b),
            f"{name} torch forward": lambda xt=xt, wt=wt, bt=bt: _no_grad(torch, lambda: torch.nn.functional.linear(xt, wt, bt)),
            f"{name} tinyvit backward": lambda dout=dout, cache=cache: linear_backward(dout, cache),
            f"{name} torch backward": lambda yt=yt, xt=xt, wt=wt, bt=bt, dt=dt: torch.autograd.grad(
                yt, (xt, wt, bt), dt, retain_graph=True),
            f"{name} gemm after GELU (pool)": lambda x2=x2, w=w, buf=buf, h=h: (gelu_forward(h, "none"),
                                                                              np.matmul(x2, w.T, out=buf)),
            f"{name} gemm after torch GELU": lambda x2=x2, w=w, buf=buf, ht=torch.from_numpy(h): (
                torch.nn.functional.gelu(ht), np.matmul(x2, w.T, out=buf)),
        })
        if prange_gelu is not None:
            prange_gelu(hf, hout)
            fns[f"{name} gemm after GELU (prange)"] = lambda x2=x2, w=w, buf=buf, hf=hf, hout=hout: (
                prange_gelu(hf, hout), np.matmul(x2, w.T, out=buf))
    times = {k: t.times for k, t in time_calls(fns, args.repeats, warmup=1).items()}  # interleaved, one warm-up
    blas = [f"{d['internal_api']} {d.get('version')} {d.get('architecture')} x{d['num_threads']}"
            for d in threadpool_info() if d["user_api"] == "blas"]
    print(f"threads {args.threads}, batch {args.batch}, BLAS {blas}, torch {torch.__version__} x{torch.get_num_threads()}, "
          f"CPU path {kernels.path()}" + (f", numba layer {numba.threading_layer()}" if prange_gelu else ""))
    print("| call | median ms | min-max ms |\n| --- | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v) * 1e3:.2f} | {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f} |")


def _no_grad(torch, f):
    with torch.no_grad():
        return f()


if __name__ == "__main__":
    main()

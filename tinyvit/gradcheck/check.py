"""check_backward / assert_backward: prove a hand-written backward against finite differences
and, optionally, PyTorch autograd, in one report.

The contract checked is tinyvit's own layer contract::

    out, cache = forward(*args, **kwargs)
    grads = backward(dout, cache)        # one entry per positional argument (None: no gradient)

What is compared, for ``L = sum(out * dout)`` with a random ``dout`` (never all ones: an
all-ones ``dout`` hides bugs such as a dropped softmax Jacobian term):

- ``mode="full"``: every coordinate of every argument, by central differences
  ``(L(a + eps e_i) - L(a - eps e_i)) / (2 eps)``: two forwards per coordinate.
- ``mode="sparse"``: ``samples`` random coordinates per argument: two forwards each.
- ``mode="directional"``: per argument, ``directions`` random directions ``v``:
  ``<grad, v>`` against ``(L(a + eps v) - L(a - eps v)) / (2 eps)``: two forwards per
  direction and argument, whatever the argument's size (for blocks and whole models).
- ``torch_forward``: autograd's gradients of the same ``L`` (and the forward's output).

Besides the numbers it reports a backward that writes into its arguments, into ``dout`` or
into the forward's output, a forward that writes into its arguments, and a forward that is not
deterministic (two calls on the same arguments differ): real bugs that gradient errors
would only hint at.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..backend import array_module, is_backend_array, to_host

MODES = ("full", "directional", "sparse")
FINITE_DIFFERENCES, DIRECTIONAL, PYTORCH = "finite differences", "directional", "pytorch"

# Default tolerances by the dtype the backward ran in and the reference it is compared with.
# A row passes when every element has |got - expected| <= atol * scale + rtol * |expected|,
# scale = max(1, max |expected|) (a gradient element that is a sum of large terms cancelling
# to near zero carries the rounding of those terms, not of its own size).
# float64 against central differences at eps 1e-6: truncation O(eps^2) ~ 1e-12, cancellation
# ~ 1e-16 |L| / eps ~ 1e-10 |L|: rtol 1e-6 leaves ~100x headroom on every layer we ship.
# float64 against PyTorch: both sides are exact up to rounding of different summation orders.
# float32 (the backward's own float32 arithmetic, references in float64): ~6e-8 relative
# rounding per op, accumulated over sums of a few hundred terms.
# The differences carry rounding of their own: L = sum(out * dout) is known to about
# u * sum |out * dout| (u = 2^-52), so (L+ - L-) / (2 eps) to about u * sum |out * dout| / eps.
# FD_ROUNDING times that is added to the allowed error of every finite-difference and
# directional row (the report prints it), so the check does not fail a right backward merely
# because its layer is large; the planted bugs of tests/test_gradcheck.py are ~1e6 x above it.
FD_ROUNDING = 8.0
TOLERANCES = {
    "float64": {FINITE_DIFFERENCES: (1e-6, 1e-8), DIRECTIONAL: (1e-6, 1e-8), PYTORCH: (1e-9, 1e-10)},
    "float32": {FINITE_DIFFERENCES: (1e-4, 1e-5), DIRECTIONAL: (1e-4, 1e-5), PYTORCH: (1e-4, 1e-5)},
}


class GradcheckWarning(UserWarning):
    """Checking in float32: the float32 tolerances apply (see :func:`check_backward`)."""


@dataclass
class Row:
    """One argument (or the forward's output) against one reference."""

    name: str
    reference: str  # "finite differences" / "directional" / "pytorch"
    max_abs: float  # max |got - expected|
    max_rel: float  # max |got - expected| / max |expected|: relative to the gradient's size
    passed: bool
    rtol: float
    atol: float
    checked: int  # how many coordinates (or directions) were compared
    over: float = 0.0  # worst |got - expected| / (atol * scale + rtol * |expected|): <= 1 passes
    worst: tuple | None = None  # index of the worst coordinate (a direction number in directional mode)
    got: float = float("nan")  # the backward's value there
    expected: float = float("nan")  # the reference's value there
    noise: float = 0.0  # the finite differences' own rounding error, added to the allowed error

    def where(self) -> str:
        if self.worst is None:
            return ""
        at = f"direction {self.worst[0]}" if self.reference == DIRECTIONAL else f"at {self.worst}"
        return f"worst {at}: got {self.got:.6g}, expected {self.expected:.6g}"


@dataclass
class Report:
    """What :func:`check_backward` found. ``ok`` is True only when every row passed and no
    problem (mutation, non-determinism) was seen; ``str(report)`` is the table."""

    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # contract-level bugs, one sentence each
    notes: list = field(default_factory=list)  # what was not checked, and why
    mode: str = "full"
    dtype: str = "float64"
    eps: float = 1e-6
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.passed for r in self.rows)

    def worst(self, reference: str) -> Row | None:
        """The gradient row of ``reference`` with the largest ``max_rel`` (None when there is none)."""
        rows = [r for r in self.rows if r.reference == reference and r.name != "out"]
        return max(rows, key=lambda r: r.max_rel) if rows else None

    def __str__(self) -> str:
        head = (f"check_backward: mode {self.mode}, backward in {self.dtype}, references in float64, "
                f"eps {self.eps:g}, random dout (seed {self.seed})")
        width = max([8] + [len(r.name) for r in self.rows])
        lines = [head, f"{'argument':<{width}}  {'reference':<18}  {'checked':>7}  {'max abs':>9}  {'max rel':>9}  "
                       f"{'x tol':>9}  result"]
        for r in self.rows:
            line = (f"{r.name:<{width}}  {r.reference:<18}  {r.checked:>7}  {r.max_abs:>9.2e}  {r.max_rel:>9.2e}  "
                    f"{r.over:>9.2g}  {'PASS' if r.passed else 'FAIL'}")
            if not r.passed:
                line += f"  ({r.where()}; rtol {r.rtol:g}, atol {r.atol:g}" + \
                        (f", rounding of the differences {r.noise:.1e})" if r.noise else ")")
            lines.append(line)
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("OK" if self.ok else f"NOT OK: {sum(not r.passed for r in self.rows)} row(s) failed, "
                                          f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers
def _host64(x) -> np.ndarray:
    return np.array(to_host(x), dtype=np.float64)


def _is_float_array(x) -> bool:
    return is_backend_array(x) and np.dtype(x.dtype).kind == "f"


def _describe(x) -> str:
    if is_backend_array(x):
        return f"a {array_module(x).__name__} array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _compare(name, reference, got, expected, rtol, atol, checked=None, noise=0.0) -> Row:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = np.abs(got - expected)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    allowed = atol * scale + rtol * np.abs(expected) + noise
    finite = np.isfinite(got) == np.isfinite(expected)
    err = np.where(finite & np.isfinite(err), err, np.inf)  # NaN/Inf where the reference has none: a failure
    over = err / allowed
    if err.size == 0:
        return Row(name, reference, 0.0, 0.0, True, rtol, atol, 0)
    i = int(np.argmax(over))
    index = np.unravel_index(i, err.shape) if err.ndim else ()
    size = max(float(np.max(np.abs(expected))), atol)
    return Row(name, reference, float(err.max()), float(err.max() / size),
               bool(np.all(err <= allowed)), rtol, atol, int(err.size if checked is None else checked),
               float(over.reshape(-1)[i]), tuple(int(j) for j in index),
               float(got.reshape(-1)[i]), float(expected.reshape(-1)[i]), noise)


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    diff = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    i = np.unravel_index(int(np.argmax(diff)), a.shape) if a.ndim else ()
    return f"{int(diff.sum())} of {a.size} elements, first at {tuple(int(j) for j in i)}: {a[i]!r} then {b[i]!r}"


def _changed(before: np.ndarray, now) -> str | None:
    after = np.asarray(to_host(now))
    if after.shape != before.shape:
        return f"its shape changed from {before.shape} to {after.shape}"
    if np.array_equal(before, after, equal_nan=before.dtype.kind == "f"):
        return None
    return _first_difference(before, after)


def _split_forward(result, what="forward"):
    if not (isinstance(result, tuple) and len(result) == 2):
        got = (f"a tuple of {len(result)}" if isinstance(result, tuple) else _describe(result))
        raise TypeError(f"{what} must return a pair (out, cache), the layer contract; got {got}"
                        + ("; return `out, cache` (the backward gets the cache)" if is_backend_array(result) else ""))
    out, cache = result
    if not _is_float_array(out):
        raise TypeError(f"{what}'s out must be a floating-point array, got {_describe(out)}")
    return out, cache


def _split_grads(grads, args, names):
    if len(args) == 1 and (grads is None or is_backend_array(grads)):
        grads = (grads,)
    if not isinstance(grads, (tuple, list)):
        raise TypeError(f"backward must return one gradient per positional argument ({len(args)}: "
                        f"{', '.join(names)}) as a tuple, None for an argument without one; got {_describe(grads)}")
    if len(grads) != len(args):
        raise ValueError(f"backward returned {len(grads)} gradient(s) for {len(args)} positional argument(s) "
                         f"({', '.join(names)}); expected one per argument, None for an argument without one")
    for name, a, g in zip(names, args, grads):
        if g is None or not _is_float_array(a):
            continue
        if not is_backend_array(g):
            raise TypeError(f"gradient of '{name}' must be an array like the argument ({_describe(a)}), "
                            f"got {_describe(g)}")
        if array_module(g) is not array_module(a):
            raise TypeError(f"gradient of '{name}' is a {array_module(g).__name__} array, expected "
                            f"{array_module(a).__name__} like the argument")
        if tuple(g.shape) != tuple(a.shape):
            raise ValueError(f"gradient of '{name}' has shape {tuple(g.shape)}, expected {tuple(a.shape)} "
                             f"(the argument's shape)")
        if g.dtype != a.dtype:
            raise TypeError(f"gradient of '{name}' has dtype {g.dtype}, expected {a.dtype} (the argument's dtype)")
    return list(grads)


def _loss(forward, args, kwargs, dout64) -> tuple:
    """``(L, sum |out * dout|)`` with ``L = sum(out * dout)`` in float64, on the backend, read back
    as two numbers (the second sizes the rounding error of ``L``)."""
    out, _ = _split_forward(forward(*args, **kwargs))
    if tuple(out.shape) != tuple(dout64.shape):
        raise ValueError(f"forward's out changed shape between calls: {tuple(out.shape)} vs {tuple(dout64.shape)}")
    xp = array_module(out)
    terms = out * dout64
    return float(to_host(xp.sum(terms))), float(to_host(xp.sum(xp.abs(terms))))


# ------------------------------------------------------------------------------------ the check
def check_backward(forward, backward, args, kwargs=None, *, names=None, torch_forward=None, dout=None,
                   mode="full", eps=1e-6, rtol=None, atol=None, seed=0, directions=2, samples=16) -> Report:
    """Check ``backward`` against finite differences of ``forward`` (and PyTorch autograd).

    ``forward(*args, **kwargs) -> (out, cache)``; ``backward(dout, cache) -> grads``, one per
    positional argument (a bare array when there is one), ``None`` for an argument without a
    gradient. ``args``: NumPy or CuPy arrays (or any array with ``__array_namespace__``);
    arguments that are not floating-point arrays (integer labels, ...) get no gradient check.

    ``dout``: the upstream gradient, random normal (``seed``) unless given (a number will do
    when ``out`` is a 0-d loss). ``mode``:
    ``"full"`` (every coordinate, central differences: 2 forwards per coordinate),
    ``"sparse"`` (``samples`` random coordinates per argument), ``"directional"``
    (``directions`` random directions per argument: 2 forwards each, for blocks and models).
    ``torch_forward``: a PyTorch function of the same arguments (float64 CPU tensors, the same
    ``kwargs``) returning ``out``; its autograd gradients and output are compared too.

    Precision: the references (finite differences, PyTorch) always run on float64 copies of
    the arguments, with step ``eps``. float64 arguments are checked at the float64 tolerances
    (:data:`TOLERANCES`). **float32 arguments** (or float16) are not upcast for the backward:
    it runs on them as given, so its own float32 arithmetic (fused kernels included) is what
    is checked, against the float64 references, at the float32 tolerances (rtol 1e-4,
    atol 1e-5), and a :class:`GradcheckWarning` says so. ``rtol``/``atol`` override the
    defaults for every reference.

    Raises ``TypeError``/``ValueError`` naming what was expected and what came when the
    functions break the contract (no cache, a gradient of the wrong shape or dtype, too few
    gradients). Returns a :class:`Report`; nothing is asserted (see :func:`assert_backward`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    args, kwargs = list(args), dict(kwargs or {})
    if names is None:
        names = [f"args[{i}]" for i in range(len(args))] if len(args) > 1 else ["x"]
    names = list(names)
    if len(names) != len(args):
        raise ValueError(f"names has {len(names)} entries for {len(args)} arguments")
    if not any(_is_float_array(a) for a in args):
        raise TypeError(f"check_backward needs at least one floating-point array argument; got "
                        f"{', '.join(_describe(a) for a in args) or 'no arguments'}")
    if not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    float_dtypes = {np.dtype(a.dtype) for a in args if _is_float_array(a)}
    low = [d for d in float_dtypes if d.itemsize < 8]
    dtype = "float32" if low else "float64"
    if low:
        warnings.warn(f"check_backward: arguments in {', '.join(sorted(d.name for d in low))}: the backward runs on "
                      f"them as given and is compared with float64 references at the float32 tolerances "
                      f"(rtol {TOLERANCES['float32'][FINITE_DIFFERENCES][0]:g}); pass float64 arguments for the "
                      f"tight check", GradcheckWarning, stacklevel=2)
    report = Report(mode=mode, dtype=dtype, eps=eps, seed=seed)

    def tol(reference):
        d_rtol, d_atol = TOLERANCES[dtype][reference]
        return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)

    before = [np.array(to_host(a)) if is_backend_array(a) else None for a in args]

    # 1. the backward under test, on the arguments as given
    out, cache = _split_forward(forward(*args, **kwargs))
    for name, a, b in zip(names, args, before):
        if b is not None and (what := _changed(b, a)):
            report.problems.append(f"forward wrote into its argument '{name}': {what}")
            a[...] = array_module(a).asarray(b)  # restore, so the references see the caller's values
    xp = array_module(out)
    out_host = np.array(to_host(out))
    if dout is None:
        dout_host = np.random.default_rng(seed).standard_normal(tuple(out.shape))
        dout = xp.asarray(dout_host.astype(out.dtype))
    elif out.ndim == 0 and isinstance(dout, (int, float)) and not isinstance(dout, bool):
        dout = xp.asarray(dout, dtype=out.dtype)  # a loss: a number will do
    elif not is_backend_array(dout) or tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"dout must be an array of out's shape {tuple(out.shape)}, got {_describe(dout)}")
    dout_before = np.array(to_host(dout))
    grads = _split_grads(backward(dout, cache), args, names)
    del cache
    if what := _changed(dout_before, dout):
        report.problems.append(f"backward wrote into dout: {what}")
    if what := _changed(out_host, out):
        report.problems.append(f"backward wrote into the forward's output (through its cache): {what}")
    for name, a, b in zip(names, args, before):
        if b is not None and (what := _changed(b, a)):
            report.problems.append(f"backward wrote into its argument '{name}': {what}")
            a[...] = array_module(a).asarray(b)

    # 2. is the forward a function? (two calls on the same arguments)
    again, _ = _split_forward(forward(*args, **kwargs))
    if (what := _changed(out_host, again)):
        report.problems.append(f"forward is not deterministic: two calls on the same arguments differ in {what}; "
                               f"fix its randomness (pass the dropout mask or a seeded generator)")
    del again

    # 3. references, on float64 copies
    args64 = [xp.asarray(b.astype(np.float64)) if _is_float_array(a) else a for a, b in zip(args, before)]
    dout64 = xp.asarray(dout_before.astype(np.float64))
    checked = [i for i, (a, g) in enumerate(zip(args, grads)) if _is_float_array(a) and g is not None]
    for i, (a, g) in enumerate(zip(args, grads)):
        if _is_float_array(a) and g is None:
            report.notes.append(f"'{names[i]}': backward returned None (no gradient): not checked")
    magnitude = [0.0]  # the largest sum |out * dout| seen: sizes the rounding error of the differences

    def loss():
        value, size = _loss(forward, args64, kwargs, dout64)
        magnitude[0] = max(magnitude[0], size)
        return value

    def noise():  # |error of (L+ - L-) / (2 eps)| from rounding in L, with headroom for the forward's own
        return float(FD_ROUNDING * np.finfo(np.float64).eps * magnitude[0] / eps)

    rng = np.random.default_rng(seed + 1)
    for i in checked:
        g = np.asarray(to_host(grads[i]), dtype=np.float64)
        base = before[i].astype(np.float64)
        if mode == "directional":
            got, expected = [], []
            for _ in range(directions):
                v = rng.standard_normal(base.shape)
                values = []
                for sign in (1.0, -1.0):
                    args64[i] = xp.asarray(base + sign * eps * v)
                    values.append(loss())
                args64[i] = xp.asarray(base)
                got.append(float(np.sum(g * v)))
                expected.append((values[0] - values[1]) / (2 * eps))
            report.rows.append(_compare(names[i], DIRECTIONAL, got, expected, *tol(DIRECTIONAL), noise=noise()))
            continue
        if mode == "full" or base.size <= samples:
            coords = range(base.size)
        else:
            coords = np.sort(rng.choice(base.size, size=samples, replace=False))
        arr = args64[i]
        numeric = np.full(base.size, np.nan)
        for c in coords:
            index = np.unravel_index(int(c), base.shape)
            orig = float(base[index])
            arr[index] = orig + eps
            plus = loss()
            arr[index] = orig - eps
            minus = loss()
            arr[index] = orig
            numeric[c] = (plus - minus) / (2 * eps)
        if mode == "full" or base.size <= samples:
            report.rows.append(_compare(names[i], FINITE_DIFFERENCES, g, numeric.reshape(base.shape),
                                        *tol(FINITE_DIFFERENCES), noise=noise()))
        else:
            sel = np.asarray(coords)
            row = _compare(names[i], FINITE_DIFFERENCES, g.reshape(-1)[sel], numeric[sel], *tol(FINITE_DIFFERENCES),
                           noise=noise())
            if row.worst is not None:  # name the coordinate in the argument's own shape
                row.worst = tuple(int(j) for j in np.unravel_index(int(sel[row.worst[0]]), base.shape))
            report.rows.append(row)

    if torch_forward is not None:
        _check_torch(report, torch_forward, args, before, grads, names, kwargs, out, dout_before, checked, tol)
    return report


def _check_torch(report, torch_forward, args, before, grads, names, kwargs, out, dout_host, checked, tol):
    try:
        import torch
    except ImportError:
        report.notes.append("PyTorch is not installed: the torch_forward reference was skipped "
                            "(pip install torch==2.13.0 for the CPU build)")
        return
    targs = []
    for i, (a, b) in enumerate(zip(args, before)):
        if b is None:
            targs.append(a)
        elif _is_float_array(a):
            targs.append(torch.tensor(b.astype(np.float64), requires_grad=i in checked))
        else:
            targs.append(torch.tensor(b))
    tout = torch_forward(*targs, **kwargs)
    if isinstance(tout, tuple):
        tout = tout[0]
    if not isinstance(tout, torch.Tensor) or tuple(tout.shape) != tuple(out.shape):
        got = f"shape {tuple(tout.shape)}" if isinstance(tout, torch.Tensor) else type(tout).__name__
        raise ValueError(f"torch_forward must return a tensor of out's shape {tuple(out.shape)}, got {got}")
    rtol, atol = tol(PYTORCH)
    report.rows.append(_compare("out", PYTORCH, to_host(out), tout.detach().double().numpy(), rtol, atol))
    if not tout.requires_grad:
        report.notes.append("torch_forward's output does not require grad: no gradient compared with PyTorch")
        return
    (tout * torch.tensor(dout_host.astype(np.float64))).sum().backward()
    for i in checked:
        tgrad = targs[i].grad
        expected = np.zeros(before[i].shape) if tgrad is None else tgrad.numpy()
        report.rows.append(_compare(names[i], PYTORCH, to_host(grads[i]), expected, rtol, atol))


def assert_backward(forward, backward, args, kwargs=None, *, names=None, torch_forward=None, dout=None,
                    mode="full", eps=1e-6, rtol=None, atol=None, seed=0, directions=2, samples=16) -> Report:
    """:func:`check_backward` with the same arguments; raises ``AssertionError`` carrying the
    report's table when it is not ok, else returns the report."""
    report = check_backward(forward, backward, args, kwargs, names=names, torch_forward=torch_forward, dout=dout,
                            mode=mode, eps=eps, rtol=rtol, atol=atol, seed=seed, directions=directions,
                            samples=samples)
    if not report.ok:
        raise AssertionError("the backward does not match its references\n" + str(report))
    return report

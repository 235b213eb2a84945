"""The gradient checker itself (tinyvit.gradcheck): it passes every layer tinyvit has, it
catches planted bugs, it names contract violations, and its command prints one row per case.

Tolerances are the checker's defaults (tinyvit/gradcheck/check.py, TOLERANCES): float64
rtol 1e-6 / atol 1e-8 against central differences at eps 1e-6, rtol 1e-9 / atol 1e-10
against PyTorch; float32 rtol 1e-4 / atol 1e-5.
"""
import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyvit.backend import Backend, get_backend
from tinyvit.cli import main
from tinyvit.gradcheck import GradcheckWarning, assert_backward, check_backward
from tinyvit.gradcheck.cases import CASES, Case, Skip
from tinyvit.layers.attention import SoftmaxCache, softmax_backward, softmax_forward
from tinyvit.layers.linear import linear_backward, linear_forward
from tests.strict_array import strict_xp

LAYERS = Path(__file__).resolve().parents[1] / "tinyvit" / "layers"


def layer_backwards() -> set:
    """``"module.fn"`` for every top-level ``def *_backward`` (or ``*_backward = ...`` alias) in tinyvit/layers/."""
    found = set()
    for path in sorted(LAYERS.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            else:
                continue
            found.update(f"{path.stem}.{n}" for n in names if n.endswith("_backward"))
    return found


def test_every_layer_backward_has_a_gradcheck_case():
    """Add a row to CASES in tinyvit/gradcheck/cases.py for every new *_backward in tinyvit/layers/."""
    covered = {name for case in CASES for name in case.covers}
    missing = sorted(layer_backwards() - covered)
    assert not missing, (f"these backward functions have no `tinyvit gradcheck` case: {missing}; add a Case to "
                         f"CASES in tinyvit/gradcheck/cases.py with covers=(...) naming them")


def test_every_covers_entry_names_a_real_backward():
    stale = sorted({name for case in CASES for name in case.covers} - layer_backwards())
    assert not stale, f"cases cover backward functions that do not exist in tinyvit/layers/: {stale}"
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"


def test_the_coverage_walk_sees_aliases_and_defs():
    walked = layer_backwards()
    assert {"linear.linear_backward", "dropout.drop_path_backward", "kernels.gelu_backward"} <= walked
    assert "block.dropout_backward" not in walked  # imported names are not definitions


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_case_passes(case):
    spec = case.build(get_backend("numpy"), case.dtype or "float64")
    with pytest.warns(GradcheckWarning) if case.dtype == "float32" else _no_warning():
        report = check_backward(**spec, mode=case.mode)
    assert report.ok, str(report)
    if not case.name.startswith("model_"):  # the model variants' PyTorch twin is tests/test_model_twin.py
        assert {r.reference for r in report.rows} >= {"pytorch"}
    assert not report.notes, report.notes


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", GradcheckWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def test_cases_run_on_strict_device_arrays():
    """The checker and every case keep to the array module (a CuPy stand-in that refuses host trips)."""
    strict = Backend("strict", strict_xp)
    ran = 0
    for case in CASES:
        try:
            spec = case.build(strict, "float64")
        except Skip:
            assert case.dtype == "float32"  # only the NumPy/CuPy float32 kernels have no strict path
            continue
        spec.pop("torch_forward", None)
        report = check_backward(**spec, mode="directional" if case.name.startswith(("block", "model")) else "sparse",
                                samples=4, directions=1)
        assert report.ok, f"{case.name}\n{report}"
        ran += 1
    assert ran == sum(c.dtype != "float32" for c in CASES)


# ------------------------------------------------------------------------------ planted bugs
def _linear_case(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)]


def test_a_dropped_softmax_jacobian_term_is_caught():
    def bad_backward(dout, cache: SoftmaxCache):
        return dout * cache.out  # forgot "- sum(dout * s)": right only for an all-ones-like dout

    x = np.random.default_rng(0).standard_normal((2, 3, 6))
    report = check_backward(softmax_forward, bad_backward, [x], torch_forward=lambda t: t.softmax(dim=-1))
    assert not report.ok
    assert [(r.reference, r.passed) for r in report.rows] == [("finite differences", False), ("pytorch", True),
                                                             ("pytorch", False)]
    text = str(report)
    assert "FAIL" in text and "worst at (" in text and "NOT OK" in text
    assert check_backward(softmax_forward, softmax_backward, [x]).ok


def test_an_all_ones_dout_hides_a_softmax_bug():
    """Subtracting mean(dout) instead of sum(dout * s) is right for any constant dout: the default
    random dout catches it, an all-ones dout does not (why check_backward never uses one)."""
    def bad_backward(dout, cache):
        return cache.out * (dout - dout.mean(axis=-1, keepdims=True))

    x = np.random.default_rng(2).standard_normal((2, 3, 6))
    assert check_backward(softmax_forward, bad_backward, [x], dout=np.ones((2, 3, 6))).ok
    report = check_backward(softmax_forward, bad_backward, [x])
    assert not report.ok and report.rows[0].over > 1e3, str(report)


def test_a_transposed_weight_gradient_is_caught_in_every_mode():
    """A square weight whose gradient comes back transposed (the shape cannot tell)."""
    def bad_backward(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        return dx, dw.T.copy(), db

    rng = np.random.default_rng(1)
    args = [rng.standard_normal((3, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)]
    for mode in ("full", "sparse", "directional"):
        report = check_backward(linear_forward, bad_backward, args, names=["x", "w", "b"], mode=mode)
        assert [r.name for r in report.rows if not r.passed] == ["w"], (mode, str(report))
    with pytest.raises(AssertionError, match=r"(?s)w\s+finite differences.*FAIL.*worst at"):
        assert_backward(linear_forward, bad_backward, args, names=["x", "w", "b"])


def test_a_backward_writing_into_dout_is_caught():
    def bad_backward(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        dout *= 2.0  # "reuses the buffer": the caller's upstream gradient is gone
        return dx, dw, db

    report = check_backward(linear_forward, bad_backward, _linear_case())
    assert not report.ok
    assert any(p.startswith("backward wrote into dout") for p in report.problems), report.problems
    assert all(r.passed for r in report.rows)  # the gradients themselves are right: only the problem says it


def test_a_backward_writing_into_its_argument_is_caught():
    def bad_backward(dout, cache):
        grads = linear_backward(dout, cache)
        cache.x[...] = 0.0  # the cache holds the caller's x
        return grads

    args = _linear_case()
    x_before = args[0].copy()
    report = check_backward(linear_forward, bad_backward, args, names=["x", "w", "b"])
    assert any("backward wrote into its argument 'x'" in p for p in report.problems), report.problems
    assert np.array_equal(args[0], x_before)  # restored for the references (and the caller)


def test_a_backward_writing_into_the_forwards_output_is_caught():
    def bad_backward(dout, cache: SoftmaxCache):
        s = cache.out  # the caller's out: scaling it in place saves a buffer and breaks the caller
        s *= dout - (dout * s).sum(axis=-1, keepdims=True)
        return s

    x = np.random.default_rng(5).standard_normal((2, 6))
    report = check_backward(softmax_forward, bad_backward, [x])
    assert any(p.startswith("backward wrote into the forward's output") for p in report.problems), report.problems
    assert not any("deterministic" in p for p in report.problems)  # the forward itself is fine
    assert report.rows[0].passed  # the gradient is even right: only the problem says it


def test_a_non_deterministic_forward_is_caught():
    rng = np.random.default_rng(0)

    def forward(x):  # dropout drawing a fresh mask per call
        mask = rng.random(x.shape) > 0.5
        return x * mask * 2.0, mask

    report = check_backward(forward, lambda dout, mask: dout * mask * 2.0, [np.ones((3, 4))])
    assert not report.ok
    assert any(p.startswith("forward is not deterministic") for p in report.problems), report.problems


def test_the_model_case_catches_a_wrong_block_gradient(monkeypatch):
    """Directional mode on the whole model sees a bug deep inside: LayerNorm's dw off by a factor."""
    import tinyvit.layers.block as block_module
    real = block_module.layernorm_backward

    def bad(dout, cache):
        dx, dw, db = real(dout, cache)
        return dx, dw * 1.001, db

    monkeypatch.setattr(block_module, "layernorm_backward", bad)
    case = next(c for c in CASES if c.name == "model")
    spec = case.build(get_backend("numpy"), "float64")
    spec.pop("torch_forward", None)
    report = check_backward(**spec, mode="directional")
    failing = {r.name for r in report.rows if not r.passed}
    assert failing == {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "blocks.1.norm1.weight",
                       "blocks.1.norm2.weight"}, str(report)


# ------------------------------------------------------------------------------ the contract
def test_a_forward_without_a_cache_is_named():
    with pytest.raises(TypeError, match=r"forward must return a pair \(out, cache\).*got a numpy array of shape "
                                        r"\(3, 5\).*return `out, cache`"):
        check_backward(lambda x, w, b: linear_forward(x, w, b)[0], linear_backward, _linear_case())


def test_a_gradient_of_the_wrong_shape_is_named():
    def bad(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        return dx, dw.T, db

    with pytest.raises(ValueError, match=r"gradient of 'w' has shape \(4, 5\), expected \(5, 4\)"):
        check_backward(linear_forward, bad, _linear_case(), names=["x", "w", "b"])


def test_a_gradient_of_the_wrong_dtype_is_named():
    def bad(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        return dx, dw.astype(np.float32), db

    with pytest.raises(TypeError, match=r"gradient of 'w' has dtype float32, expected float64"):
        check_backward(linear_forward, bad, _linear_case(), names=["x", "w", "b"])


def test_too_few_gradients_are_named():
    with pytest.raises(ValueError, match=r"backward returned 2 gradient\(s\) for 3 positional argument\(s\) "
                                         r"\(x, w, b\); expected one per argument"):
        check_backward(linear_forward, lambda d, c: linear_backward(d, c)[:2], _linear_case(), names=["x", "w", "b"])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        check_backward(linear_forward, linear_backward, _linear_case(), mode="fast")
    with pytest.raises(TypeError, match="at least one floating-point array"):
        check_backward(lambda n: (np.zeros(3), None), lambda d, c: None, [np.arange(3)])
    with pytest.raises(ValueError, match=r"dout must be an array of out's shape \(3, 5\)"):
        check_backward(linear_forward, linear_backward, _linear_case(), dout=np.ones((5, 3)))


def test_a_loss_takes_a_number_as_dout():
    from tinyvit.layers.loss import cross_entropy_backward, cross_entropy_forward

    logits = np.random.default_rng(4).standard_normal((3, 4))
    report = check_backward(lambda z: cross_entropy_forward(z, np.array([0, 3, 1])),
                            lambda dloss, cache: cross_entropy_backward(cache, dloss), [logits], dout=2.5)
    assert report.ok and report.rows[0].checked == 12


def test_none_marks_an_argument_without_a_gradient():
    report = check_backward(lambda x, w, b: linear_forward(x, w, b),
                            lambda d, c: (None, *linear_backward(d, c)[1:]), _linear_case(), names=["x", "w", "b"])
    assert report.ok and [r.name for r in report.rows] == ["w", "b"]
    assert any("'x'" in n and "not checked" in n for n in report.notes)


# ------------------------------------------------------------------------------ precision
def test_float32_arguments_warn_and_are_checked_at_float32_tolerances():
    args = [a.astype(np.float32) for a in _linear_case()]
    with pytest.warns(GradcheckWarning, match="float32 tolerances"):
        report = check_backward(linear_forward, linear_backward, args, names=["x", "w", "b"])
    assert report.ok and report.dtype == "float32"
    assert {(r.rtol, r.atol) for r in report.rows} == {(1e-4, 1e-5)}

    def slightly_off(dout, cache):  # a 1e-3 relative bug: hidden by nothing in float32
        dx, dw, db = linear_backward(dout, cache)
        return dx, dw * np.float32(1.001), db

    with pytest.warns(GradcheckWarning):
        assert not check_backward(linear_forward, slightly_off, args).ok


def test_without_pytorch_the_torch_reference_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    report = check_backward(linear_forward, linear_backward, _linear_case(), torch_forward=lambda *a: None)
    assert report.ok and all(r.reference == "finite differences" for r in report.rows)
    assert any("PyTorch is not installed" in n for n in report.notes)


def test_the_report_table():
    report = check_backward(linear_forward, linear_backward, _linear_case(), names=["x", "w", "b"],
                            torch_forward=lambda x, w, b: __import__("torch").nn.functional.linear(x, w, b))
    text = str(report)
    assert text.splitlines()[1].split() == ["argument", "reference", "checked", "max", "abs", "max", "rel", "x", "tol",
                                            "result"]
    assert [(r.name, r.reference) for r in report.rows] == [
        ("x", "finite differences"), ("w", "finite differences"), ("b", "finite differences"),
        ("out", "pytorch"), ("x", "pytorch"), ("w", "pytorch"), ("b", "pytorch")]
    assert text.splitlines()[-1] == "OK"
    for r in report.rows:
        assert r.passed and r.max_abs >= 0 and r.max_rel >= 0 and r.over <= 1


# ------------------------------------------------------------------------------ the command
def test_command_rows_and_last_line(capsys):
    assert main(["gradcheck", "--layers", "linear,softmax,gelu_kernel"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "3 passed, 0 failed"
    rows = [line for line in lines if line.split()[:1] in (["linear"], ["softmax"], ["gelu_kernel"])]
    assert len(rows) == 3 and all(line.endswith("PASS") for line in rows)
    assert "float32" in rows[2]


def test_command_fails_on_a_failing_case(monkeypatch, capsys):
    import tinyvit.gradcheck.cases as cases

    def broken(backend, dtype):
        x = backend.asarray(np.random.default_rng(0).standard_normal((2, 5)), dtype=dtype)
        return dict(forward=softmax_forward, backward=lambda d, c: d * c.out, args=[x], names=["x"])

    def crashing(backend, dtype):
        raise ValueError("this case cannot be built")

    monkeypatch.setattr(cases, "CASES", cases.CASES + [Case("broken_softmax", broken), Case("crashing", crashing)])
    assert main(["gradcheck", "--layers", "softmax,broken_softmax,crashing", "--mode", "sparse"]) == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "1 passed, 2 failed"
    assert "broken_softmax" in out and "FAIL" in out and "worst at" in out
    assert "FAIL (ValueError: this case cannot be built)" in out


def test_command_without_pytorch_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["gradcheck", "--layers", "linear,layernorm"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("PyTorch is not installed: the pytorch column is skipped") for line in lines)
    rows = [line.split() for line in lines if line.split()[:1] in (["linear"], ["layernorm"])]
    assert [row[4] for row in rows] == ["n/a", "n/a"] and lines[-1] == "2 passed, 0 failed"


def test_command_on_cupy_without_a_gpu_says_why(capsys):
    from tinyvit.backend import cupy_available
    if cupy_available()[0]:
        pytest.skip("CuPy runs here: the GPU run is `tinyvit gradcheck --backend cupy`")
    assert main(["gradcheck", "--backend", "cupy", "--layers", "linear"]) == 1
    assert "tinyvit gradcheck: error: backend='cupy'" in capsys.readouterr().err


def test_command_rejects_unknown_layers(capsys):
    assert main(["gradcheck", "--layers", "linear,flash"]) == 1
    assert "unknown gradcheck case(s) ['flash']" in capsys.readouterr().err


def test_command_lists_the_cases(capsys):
    assert main(["gradcheck", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in CASES)


def test_a_subtle_bug_is_caught_too():
    """LayerNorm whose backward uses eps 1e-5 where the forward used 1e-6 (unit-variance rows): a ~1e-5
    relative error, far above the finite differences' rounding (which the report adds to the allowed error)."""
    from tinyvit.layers.layernorm import layernorm_backward, layernorm_forward

    rng = np.random.default_rng(3)
    args = [rng.standard_normal((2, 5, 8)), rng.standard_normal(8) + 1.0, rng.standard_normal(8)]

    def bad_backward(dout, cache):
        x_hat, rstd, w = cache
        rstd_other = 1.0 / np.sqrt(1.0 / rstd ** 2 - 1e-6 + 1e-5)  # the same std with the other eps
        x_hat_other = x_hat * rstd_other / rstd
        return layernorm_backward(dout, cache._replace(x_hat=x_hat_other, rstd=rstd_other))

    good = check_backward(lambda x, w, b: layernorm_forward(x, w, b, 1e-6), layernorm_backward, args)
    bad = check_backward(lambda x, w, b: layernorm_forward(x, w, b, 1e-6), bad_backward, args,
                         names=["x", "w", "b"])
    assert good.ok, str(good)
    assert not bad.ok and {r.name for r in bad.rows if not r.passed} >= {"x"}, str(bad)
    assert all(0 < r.noise < 1e-6 for r in bad.rows)

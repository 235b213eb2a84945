"""Shared fixtures: the suite runs over every backend; CuPy runs skip with the reason where it cannot run."""
import numpy as np
import pytest

from tinyvit.backend import Backend, cupy_available, get_backend
from tests.strict_array import strict_xp


def _backend(name):
    if name == "cupy":
        ok, why = cupy_available()
        if not ok:
            pytest.skip(f"CuPy backend unavailable here: {why}")
    if name == "strict":
        return Backend("strict", strict_xp)
    return get_backend(name)


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Each real backend in turn."""
    return _backend(request.param)


@pytest.fixture(params=["numpy", "cupy", "strict"])
def any_backend(request):
    """The real backends plus the strict host-refusing stand-in for a GPU."""
    return _backend(request.param)


def model_on(backend, **kwargs):
    """A VisionTransformer on ``backend``: the strict backend is not a user-facing name, so the
    model is built on NumPy and its arrays moved over (as a user would move to the GPU)."""
    from tinyvit import VisionTransformer

    if backend.name != "strict":
        return VisionTransformer(backend=backend.name, **kwargs)
    m = VisionTransformer(backend="numpy", **kwargs)
    state = m.state_dict()
    m.backend = backend
    m.params = {k: backend.asarray(v) for k, v in state.items()}
    if m._fixed_pos is not None:
        m._fixed_pos = backend.asarray(np.asarray(m._fixed_pos))
    for name in ("_rope_pos", "_rope_angles"):  # 2D RoPE's fixed tables
        if getattr(m, name, None) is not None:
            setattr(m, name, backend.asarray(np.asarray(getattr(m, name))))
    m.rng = backend.rng(kwargs.get("seed", 0))
    return m


# ``TINYVIT_BACKEND=cupy python3 -m pytest -q`` asks for the suite on CuPy. Where CuPy cannot run
# (no CuPy, no GPU) every test that would run on that default backend is a CuPy test that cannot
# run: it is skipped with the reason, as the README promises, instead of failing in
# get_backend. The tests pinned to NumPy or to the strict stand-in still run.
_PINNED = ("numpy", "strict")


def _cupy_requested_but_unavailable():
    import os

    if (os.environ.get("TINYVIT_BACKEND") or "").strip() != "cupy":
        return None
    ok, why = cupy_available()
    return None if ok else why


def pytest_report_header(config):
    why = _cupy_requested_but_unavailable()
    if why is not None:
        return [f"TINYVIT_BACKEND=cupy but CuPy cannot run here ({why}): tests on the default backend are skipped; "
                f"tests pinned to NumPy / the strict stand-in run"]
    return []


def pytest_collection_modifyitems(config, items):
    why = _cupy_requested_but_unavailable()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"TINYVIT_BACKEND=cupy: CuPy backend unavailable here: {why}")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") in _PINNED or params.get("any_backend") in _PINNED:
            continue
        item.add_marker(skip)

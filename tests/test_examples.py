"""The learners' tour runs: every script in examples/ exits 0 and writes its pictures.

Each chapter runs as its own process, the way a learner runs it
(``python3 examples/NN_name.py --quick --out DIR``); the chapters check their own numbers
against PyTorch or by hand and exit non-zero when one disagrees, so a wrong gradient in the
engine fails the tour too. The one new op the tour adds (chapter 7's 3x3 convolution, made
of shifted copies and a linear layer) gets its finite-difference check here.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the tour draws with matplotlib: pip install -e '.[test]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# chapter -> the pictures it must write (the ones docs/ and the README show)
PICTURES = {
    "00_tutorial_mistakes.py": ["00_patch_embed_axes.png"],
    "01_patches.py": ["01_patches.png"],
    "02_positions.py": ["02_positions.png"],
    "03_attention.py": ["03_attention.png"],
    "04_forward_backward.py": ["04_gradient_errors.png"],
    "05_post_vs_pre_norm.py": ["05_grad_norms.png"],
    "06_distillation.py": ["06_distillation.png"],
    "07_vit_vs_cnn.py": ["07_vit_vs_cnn.png", "07_vit_attention.png"],
    "08_bring_your_own_layer.py": ["08_gradcheck.png"],
    "09_workflow.py": ["09_workflow.png"],
    "10_cheaper_attention.py": ["10_flash_memory.png", "10_windows.png"],
    "11_lower_precision.py": ["11_precision_curves.png", "11_int8_grid.png"],
    "12_data_parallel.py": ["12_data_parallel.png"],
    "14_cpu_kernels.py": ["14_cpu_kernels.png"],
    "13_fewer_tokens.py": ["13_fewer_tokens.png"],
    "15_rope.py": ["15_rope.png"],
}


def chapters() -> list:
    return sorted(f for f in os.listdir(EXAMPLES) if re.match(r"\d\d_.*\.py$", f))


def test_every_chapter_is_listed():
    assert chapters() == sorted(PICTURES), "a chapter was added or removed: update PICTURES in this test"


@pytest.mark.parametrize("script", sorted(PICTURES))
def test_chapter_runs_and_draws(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                 f"--- stderr\n{proc.stderr[-3000:]}"
    assert re.search(r"\(\d+, \d+", proc.stdout), f"{script} printed no shapes"  # e.g. (2, 196, 768)
    for name in PICTURES[script]:
        path = tmp_path / name
        assert path.is_file(), f"{script} did not write {name}; it wrote {sorted(os.listdir(tmp_path))}"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def test_committed_pictures_exist():
    """Every picture a chapter draws is committed in docs/images, where the README links it."""
    for names in PICTURES.values():
        for name in names:
            assert os.path.isfile(os.path.join(ROOT, "docs", "images", name)), f"docs/images/{name} is missing: " \
                f"run the chapter without --quick to draw it"


def _load_chapter(script: str):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(EXAMPLES, script))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, EXAMPLES)  # the chapters import _tour from their own folder
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(EXAMPLES)
    return module


def test_conv3x3_backward_matches_finite_differences():
    """Chapter 7's convolution through tinyvit.gradcheck: float64 central differences, random upstream gradient.

    Tolerance: relative 1e-7 (step 1e-6; the op is linear in x and in w, so the only
    error is round-off, about 1e-10 here).
    """
    from tinyvit.gradcheck import assert_backward

    ch7 = _load_chapter("07_vit_vs_cnn.py")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4))  # (B, C, H, W)
    w = rng.standard_normal((4, 3, 3, 3))  # (C_out, C, 3, 3)
    b = rng.standard_normal(4)
    out, _ = ch7.conv3x3_forward(x, w, b)
    assert out.shape == (2, 4, 5, 4)
    assert_backward(ch7.conv3x3_forward, ch7.conv3x3_backward, [x, w, b], names=["x", "w", "b"], rtol=1e-7,
                    atol=1e-9)


def test_conv3x3_matches_torch():
    """The same convolution as ``torch.nn.functional.conv2d(padding=1)``, float64, forward and backward."""
    torch = pytest.importorskip("torch")
    ch7 = _load_chapter("07_vit_vs_cnn.py")
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    out, cache = ch7.conv3x3_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = ch7.conv3x3_backward(dout, cache)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    out_t = torch.nn.functional.conv2d(xt, wt, bt, padding=1)
    (out_t * torch.tensor(dout)).sum().backward()
    for name, ours, ref in (("out", out, out_t.detach()), ("dx", dx, xt.grad), ("dw", dw, wt.grad),
                            ("db", db, bt.grad)):
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def _links(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", text) if not m.startswith(("http", "#"))]


def test_derivation_pages_and_readme_links_resolve():
    """Every relative link in every tracked Markdown file (README.md, docs/, bench/, examples/, ...)
    names a file that exists, so a learner's two clicks from the README to a backward always land,
    and a moved module cannot leave a link behind."""
    docs = os.path.join(ROOT, "docs")
    pages = [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    assert len(pages) >= 10, f"expected a derivation page per layer in docs/, found {pages}"
    markdown = []
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("runs", "__pycache__")
                       and not d.endswith(".egg-info")]
        markdown += [os.path.join(dirpath, f) for f in files if f.endswith(".md")]
    assert os.path.join(ROOT, "README.md") in markdown and set(pages) <= set(markdown)
    broken = []
    for page in sorted(markdown):
        for link in _links(page):
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), link))):
                broken.append(f"{os.path.relpath(page, ROOT)} -> {link}")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)

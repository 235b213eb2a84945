"""``tinyvit bench`` in its CI form: every layer, variant and model checked against PyTorch
(correctness, not speed: nothing here asserts a time), the JSON and PNG written."""
import json
import os

import pytest

from tinyvit.backend import cupy_available
from tinyvit.benchmark import layers, models
from tinyvit.cli import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path, png = folder / "bench.json", folder / "sweep.png"
    assert main(["bench", "--smoke", "--backends", "numpy,torch-cpu,cupy", "--json", str(path),
                 "--png", str(png)]) == 0
    return json.loads(path.read_text()), png


def test_every_layer_and_variant_was_checked_before_timing(smoke):
    data, _ = smoke
    rows = data["layers"]
    seen = {(r["layer"], r["backend"]) for r in rows}
    for layer in layers.LAYERS:
        assert (layer, "numpy") in seen and (layer, "torch-cpu") in seen, layer
        for variant in layers.NUMPY_VARIANTS.get(layer, ()):
            assert (layer, f"numpy: {variant}") in seen, (layer, variant)
    for r in rows:
        tol = layers.TOL_LAYER.get(r["layer"], layers.TOL["float32"])  # fp16 / bf16 / int8 rows: their own
        assert r["check_rel_err"] is not None and r["check_rel_err"] <= tol, r
        assert r["min_s"] <= r["median_s"] <= r["max_s"]


def test_models_rows_memory_split_and_machine(smoke):
    data, png = smoke
    kinds = {(r["kind"], r["backend"]) for r in data["models"]}
    assert {("train", "numpy"), ("train", "torch-cpu"), ("infer", "numpy"), ("infer", "torch-cpu")} <= kinds
    for r in data["models"]:
        assert r["images_per_s"] > 0 and r["gflops"] > 0
        if r["kind"] == "train":
            assert r["peak_bytes"] > 0
    assert set(data["split"]["smoke b2"]) == {"numpy", "torch-cpu"}
    if cupy_available()[0]:
        assert any(r["backend"] == "cupy" for r in data["layers"])
    else:
        assert "cupy" in data["skipped"]  # no GPU here: skipped with its reason, not silently
    for key in ("cpu", "cores", "threadpools", "numpy", "torch", "gpu", "date"):
        assert key in data["machine"]
    assert len(data["sweep"]) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_wrong_engine_is_refused_before_timing(monkeypatch):
    engines = {n: models.Engine(n, models.build_config(dict(image_size=16, patch_size=8, num_classes=3, dim=8,
                                                            depth=1, heads=2, mlp_dim=8)), 2, "float32")
               for n in ("numpy", "torch-cpu")}
    engines["numpy"].model.params["head.bias"] += 1.0  # a broken engine
    with pytest.raises(AssertionError, match="not timing a wrong result"):
        models.check_engines(engines, "float32")


@pytest.mark.parametrize("argv, what", [(["--backends", "numpy,tpu"], "tpu"), (["--layers", "conv"], "conv"),
                                        (["--models", "vit_h14"], "vit_h14"), (["--repeats", "0"], "repeats")])
def test_bad_options_name_the_problem(argv, what, capsys):
    assert main(["bench", "--smoke", *argv]) == 1
    assert what in capsys.readouterr().err


def test_fused_switch_restores_the_environment(monkeypatch):
    monkeypatch.delenv("TINYVIT_FUSED", raising=False)
    with layers.fused(False):
        assert os.environ["TINYVIT_FUSED"] == "0"
    assert "TINYVIT_FUSED" not in os.environ


def test_attention_sweep_rows(tmp_path):
    """``tinyvit bench --attention``: plain, flash (checked equal to plain first) and windowed
    attention, each with a time, a peak memory and its ratio to plain's."""
    path = tmp_path / "att.json"
    assert main(["bench", "--smoke", "--attention", "--layers", "none", "--models", "none", "--backends", "numpy",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["attention"]
    seen = {(r["image_size"], r["variant"]) for r in rows}
    assert {(16, "plain"), (16, "flash"), (32, "plain"), (32, "flash"), (32, "window 2 + shift")} <= seen
    for r in rows:
        assert r["peak_bytes"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"] and r["train_gflop"] > 0
        if r["variant"] == "plain":
            assert r["time_vs_plain"] == 1.0 and r["memory_vs_plain"] == 1.0


def test_fewer_rows(tmp_path):
    """``tinyvit bench --fewer``: ToMe at several r (r = 0 checked equal to the plain model first), half the
    heads pruned (checked equal to the gated model first), PatchDropout, each with images/s and its ratio
    to the plain model's in the same run; an r too large for the model is an error naming the largest."""
    path = tmp_path / "fewer.json"
    assert main(["bench", "--smoke", "--fewer", "--layers", "none", "--models", "none", "--backends", "numpy",
                 "--no-jit", "--tome-r", "0,2,5", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["fewer"]
    seen = {(r["kind"], r["variant"]) for r in rows}
    assert {("inference", "plain"), ("inference", "ToMe r=2"), ("inference", "ToMe r=5"),
            ("inference", "heads pruned: 1 of 2 kept per block"), ("training step", "plain"),
            ("training step", "ToMe r=5"), ("training step", "PatchDropout 0.5")} <= seen
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["images_per_s"] > 0
        if r["variant"] == "plain":
            assert r["vs_plain"] == 1.0
    assert {r["tokens_after_last_block"] for r in rows if r["variant"] == "ToMe r=5"} == {17 - 2 * 5}
    assert main(["bench", "--smoke", "--fewer", "--layers", "none", "--models", "none", "--backends", "numpy",
                 "--no-jit", "--tome-r", "6"]) == 1

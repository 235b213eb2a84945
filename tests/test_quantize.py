"""INT8: exact integer products, per-channel weights, calibration, the int8 file (and the commands
that read it), PyTorch's quantize_dynamic on the same weights, fake quantisation's straight-through
backward against PyTorch's, QAT = int8 arithmetic in float, the strict (CuPy-like) arrays, bad input."""
import json
import os

import numpy as np
import pytest
import torch

from tinyvit import VisionTransformer, load_pretrained
from tinyvit.backend import Backend
from tinyvit.cli import main
from tinyvit.layers.linear import linear_backward, linear_forward
from tinyvit.layers.quant import (FakeQuantWeight, Int8Weight, fake_quant_backward, fake_quant_forward, int_matmul,
                                  quantize, quantize_weight)
from tinyvit.quantize import calibrate, convert, finetune, prepare_qat, quantize_model, save_quantized
from tinyvit.quantize.torch_anchor import dynamic_int8, logits, torch_module
from tinyvit.training.train import TrainConfig, train
from tests.conftest import model_on
from tests.strict_array import strict_xp
from tests.tolerances import assert_close

KW = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, seed=0)


def images(n=16, seed=0, shape=(3, 16, 16)):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_int_matmul_is_exact_even_at_the_int32_extremes():
    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (37, 3072)).astype(np.int8)
    b = rng.integers(-127, 128, (3072, 29)).astype(np.int8)
    assert np.array_equal(int_matmul(a, b), a.astype(np.int64) @ b.astype(np.int64))
    worst = np.full((2, 3072), 127, np.int8)
    assert int_matmul(worst, -worst.T)[0, 0] == -127 * 127 * 3072  # float32 could not hold this sum exactly
    assert int_matmul(a, b).dtype == np.int32


def test_weights_are_symmetric_per_output_channel():
    w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32) * np.arange(1, 7)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.shape == (6,)
    np.testing.assert_allclose(s, np.abs(w).max(axis=1) / 127, rtol=1e-7)
    assert np.all(np.abs(q).max(axis=1) == 127)  # each row's largest entry sits on the grid's end
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 + 1e-7)  # round to nearest: half a step at most
    q0, s0 = quantize_weight(np.zeros((2, 3), np.float32))
    assert np.all(q0 == 0) and np.all(s0 == 1)


def test_int8_linear_is_the_integer_formula():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 24)).astype(np.float32)
    w = rng.standard_normal((10, 24)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    q, s = quantize_weight(w)
    s_x = np.float32(np.abs(x).max() / 127)
    out, cache = linear_forward(x, Int8Weight(q, s, s_x), b)
    qx = quantize(x.reshape(-1, 24), s_x).astype(np.int64)
    want = (qx @ q.astype(np.int64).T) * (np.float64(s_x) * s.astype(np.float64)) + b
    np.testing.assert_allclose(out.reshape(-1, 10), want, rtol=1e-6, atol=1e-6)
    ref = x @ w.T + b
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(RuntimeError, match="for inference"):
        linear_backward(np.ones_like(out), cache)


def test_calibration_ranges():
    m = VisionTransformer(**KW)
    x = images()
    mm = calibrate(m, x, "minmax")
    assert mm["patch_embed.proj.weight"] == pytest.approx(float(np.abs(x).max()))  # patches are the pixels
    pc = calibrate(m, x, "percentile", percentile=99.0)
    assert set(pc) == set(mm) and len(mm) == 2 + 4 * 2
    assert all(pc[k] <= mm[k] for k in mm) and pc["patch_embed.proj.weight"] == pytest.approx(
        float(np.percentile(np.abs(x), 99.0)))
    assert m.quant is None and m._cache is None


def test_bad_calibration_sets_are_refused_clearly():
    m = VisionTransformer(**KW)
    for bad, msg in ((images(shape=(1, 16, 16)), r"must have shape \(M, 3, 16, 16\).*got \(16, 1, 16, 16\)"),
                     (images()[:, :, :8], r"got \(16, 3, 8, 16\)"), (images()[:0], "empty"),
                     (images().astype(np.int64), "floating point"), (np.full((2, 3, 16, 16), np.nan, np.float32), "NaN"),
                     (images()[0], "shape")):
        with pytest.raises(ValueError, match=msg):
            calibrate(m, bad)
    with pytest.raises(TypeError, match="host NumPy array"):
        calibrate(m, images().tolist())
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(m, images(), "mse")


def test_int8_model_near_float_and_near_torch_quantize_dynamic():
    """tinyvit's static int8 and PyTorch's dynamic int8 (per-channel weights) on the same weights:
    both within 3% of the largest float logit, and within 3% of each other (measured ~1%)."""
    m = VisionTransformer(**KW, pool="mean")
    cal, x = images(64, 0), images(16, 1)
    f32 = m.forward(x)
    q = quantize_model(m, cal, "minmax")
    l8 = q.forward(x)
    tm = torch_module(m)
    assert np.abs(logits(tm, x) - f32).max() < 1e-4 * np.abs(f32).max() + 1e-5  # the anchor is the same model
    lt = logits(dynamic_int8(tm, per_channel=True), x)
    scale = np.abs(f32).max()
    assert 1e-4 < np.abs(l8 - f32).max() / scale < 0.03
    assert np.abs(lt - f32).max() / scale < 0.03 and np.abs(lt - l8).max() / scale < 0.03
    assert np.array_equal(m.forward(x), f32), "quantize_model must leave the float model as it was"


def _trained(tmp_path):
    cfg = TrainConfig(patch_size=4, dim=64, depth=2, heads=2, mlp_dim=128, batch_size=128, epochs=2, warmup_epochs=1,
                      lr=3e-3, mixup=0.0, out=str(tmp_path / "run"))
    train(cfg, progress=False)
    return tmp_path / "run" / "checkpoint.safetensors"


def test_quantize_command_file_and_the_commands_that_read_it(tmp_path, capsys):
    ckpt = _trained(tmp_path)
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--weights", str(ckpt), "--out", str(out), "--eval", "--calib-images", "64"]) == 0
    text = capsys.readouterr().out
    assert "int8 linear layers" in text and "accuracy on" in text
    float_model = load_pretrained(ckpt)
    floats = sum(v.size for v in float_model.params.values()) * 4
    assert os.path.getsize(out) < floats / 3.2  # int8 weights + float LayerNorms, biases, tokens, metadata
    q = load_pretrained(out)
    assert set(q.quant) == {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert q.labels == float_model.labels and q.preprocessing.to_dict() == float_model.preprocessing.to_dict()
    # the file reproduces the in-memory int8 model exactly
    from tinyvit.pretrained.weights import open_model
    from tinyvit.quantize.command import calibration_images
    loaded = open_model(ckpt)
    cal, _ = calibration_images(loaded, None, 64, 0)
    again = quantize_model(loaded.model, cal, "percentile")
    x = cal[:8]
    assert np.array_equal(q.forward(x), again.forward(x))
    assert main(["eval", "--weights", str(out)]) == 0
    assert "accuracy:" in capsys.readouterr().out
    digit = os.path.join("examples", "data", "digits")
    first = os.path.join(digit, sorted(os.listdir(digit))[0])
    image = os.path.join(first, sorted(os.listdir(first))[0]) if os.path.isdir(first) else first
    assert main(["predict", image, "--weights", str(out)]) == 0
    assert main(["attention", image, "--weights", str(out), "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").is_file()


def test_quantize_command_without_calibration_data_says_what_to_pass(tmp_path, capsys):
    from tinyvit import export_pretrained
    path = tmp_path / "plain.safetensors"
    export_pretrained(VisionTransformer(**KW), path)  # an export that does not say what it was trained on
    assert main(["quantize", "--weights", str(path), "--out", str(tmp_path / "q.safetensors")]) == 1
    assert "pass --calib-data" in capsys.readouterr().err
    assert main(["quantize", "--weights", str(path), "--out", str(tmp_path / "q.bin")]) == 1
    assert "--out must end in .safetensors or .npz" in capsys.readouterr().err
    assert not (tmp_path / "q.safetensors").exists()


def test_broken_int8_files_are_refused(tmp_path):
    m = VisionTransformer(**KW)
    q = quantize_model(m, images(8), "minmax")
    path = tmp_path / "q.safetensors"
    save_quantized(path, q)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError):
        load_pretrained(tmp_path / "cut.safetensors")
    from tinyvit.training.checkpoint import load_arrays_and_metadata, save_arrays
    arrays, meta = load_arrays_and_metadata(path)
    del arrays["blocks.0.mlp.fc1.weight_scale"]
    meta.pop("tinyvit.sha256", None)
    save_arrays(tmp_path / "noscale.safetensors", arrays, meta)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight.*has no"):
        load_pretrained(tmp_path / "noscale.safetensors")
    with pytest.raises(ValueError, match="needs a model from quantize_model"):
        save_quantized(tmp_path / "x.safetensors", m)
    assert json.loads(meta["quantization"])["method"] == "minmax"


def test_ste_equals_torch_fake_quantize_backward():
    """The clipped STE, per tensor and per channel, against PyTorch's own fake-quant backward."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 9)) * 3).astype(np.float32)
    s = np.float32(0.02)  # grid [-2.54, 2.54]: many values clipped
    out, cache = fake_quant_forward(x, s)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_tensor_affine(tx, float(s), 0, -127, 127)
    ty.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(fake_quant_backward(dout, cache), tx.grad.numpy())
    assert 0 < (tx.grad.numpy() == 0).mean() < 1  # some clipped, some passed
    sc = (np.abs(x).max(axis=1) / 127 * rng.uniform(0.3, 1.0, 7)).astype(np.float32)  # rows partly clipped
    out, cache = fake_quant_forward(x, sc[:, None])
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_channel_affine(tx, torch.tensor(sc), torch.zeros(7, dtype=torch.int32), 0, -127, 127)
    ty.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(fake_quant_backward(dout, cache), tx.grad.numpy())


def test_qat_forward_is_the_int8_model_and_finetuning_learns():
    m = VisionTransformer(**KW)
    cal = images(32)
    amax = calibrate(m, cal, "minmax")
    prepare_qat(m, amax)
    q = convert(m)
    x = images(8, 5)
    fq = m.forward(x)
    assert_close("qat vs int8", fq, q.forward(x), rtol=1e-4, atol=1e-5)  # the same grid points, summed in float
    y = np.arange(32) % 10
    losses = finetune(m, cal, y, steps=20, lr=3e-3, batch_size=16)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert m.quant is not None and set(m.grads) == set(m.params)


@pytest.mark.parametrize("kind", ["int8", "qat"])
def test_strict_array_path(kind):
    strict = Backend("strict", strict_xp)
    ref = VisionTransformer(**KW)
    cal = images(8)
    m = model_on(strict, **KW)
    if kind == "int8":
        qn = quantize_model(ref, cal, "percentile")
        qs = quantize_model(m, cal, "percentile")
        x = images(2, 7)
        assert_close("int8 logits", strict_xp.to_host(qs.forward(strict.asarray(x))), qn.forward(x),
                     rtol=1e-4, atol=1e-5)
        assert type(qs.quant["head.weight"].q).__name__ == "StrictArray"
    else:
        amax = calibrate(ref, cal)
        prepare_qat(ref, amax)
        prepare_qat(m, amax)
        x = images(2, 7)
        out = m.forward(strict.asarray(x), train=False)
        m.backward(strict.asarray(np.ones((2, 10), np.float32)))
        want = ref.forward(x, train=False)
        ref.backward(np.ones((2, 10), np.float32))
        assert_close("qat logits", strict_xp.to_host(out), want, rtol=1e-4, atol=1e-5)
        for k in ref.grads:
            assert_close(k, strict_xp.to_host(m.grads[k]), ref.grads[k], rtol=1e-4, atol=1e-5)


def test_fake_quant_weight_passes_through_the_patch_embedding_and_mixed_use_is_refused():
    m = VisionTransformer(**KW)
    prepare_qat(m, calibrate(m, images(4)))
    m.precision = "fp16"
    with pytest.raises(ValueError, match="quantised model runs with precision='fp32'"):
        m.forward(images(2))
    m.precision = "fp32"
    assert m.forward(images(2)).shape == (2, 10)
    assert isinstance(m.quant["patch_embed.proj.weight"], FakeQuantWeight)
    m.load_state_dict(m.state_dict())
    assert m.quant is None  # new weights drop the stale records

"""Mixed precision: the fp16/bf16 rounding, the products, the forward against PyTorch's autocast,
the loss scaler against ``torch.amp.GradScaler`` step for step, the loss scale cancelling in
the backward, the strict (CuPy-like) array path, bad input, and a short fp16 training run."""
import sys

import numpy as np
import pytest
import torch

import tinyvit.training.train as train_mod
from tinyvit import VisionTransformer
from tinyvit.backend import Backend
from tinyvit.layers.loss import softmax_cross_entropy
from tinyvit.layers.precision import check_precision_supported, lowp_matmul, round_bf16_bits, round_to
from tinyvit.training.amp import DynamicLossScaler
from tinyvit.training.checkpoint import load_checkpoint
from tinyvit.training.train import TrainConfig, train
from tests.conftest import model_on
from tests.strict_array import strict_xp
from tests.tolerances import assert_close
from tests.torch_twin import torch_params, torch_vit_forward

ml_dtypes = pytest.importorskip("ml_dtypes")
KW = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, seed=0)


def test_bf16_bit_rounding_equals_ml_dtypes_on_every_kind_of_float():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x7FFFFFFF,
                        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001], dtype=np.uint32)  # ties both ways, subnormal
    x = np.concatenate([bits, special]).view(np.float32)
    got = round_bf16_bits(x)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))  # bit for bit, signed zeros too


def test_lowp_matmul_is_rounded_operands_float32_accumulation_rounded_result():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((33, 70)).astype(np.float32)
    b = rng.standard_normal((70, 21)).astype(np.float32)
    native = (a.astype(np.float16) @ b.astype(np.float16)).astype(np.float32)  # NumPy's own fp16 loop
    ours = lowp_matmul(a, b, "fp16")
    # both round the same fp16 operands and accumulate in float32; only the summation order differs,
    # so the results differ by at most one fp16 ulp (2^-10 relative)
    assert np.all(np.abs(ours - native) <= np.abs(native) * 2.0 ** -10 + 2.0 ** -24)
    assert np.array_equal(ours, round_to(ours, "fp16"))
    bf = lowp_matmul(a, b, "bf16")
    assert np.array_equal(bf, round_to(bf, "bf16"))
    ref = (a.astype(ml_dtypes.bfloat16).astype(np.float64) @ b.astype(ml_dtypes.bfloat16).astype(np.float64))
    assert np.max(np.abs(bf - ref) / np.abs(ref).max()) < 2.0 ** -8  # one bf16 rounding of the result
    assert lowp_matmul(a, b, "fp32") is not None and np.array_equal(lowp_matmul(a, b, "fp32"), a @ b)


@pytest.mark.parametrize("precision,torch_dtype,tol", [("fp16", torch.float16, 3e-3), ("bf16", torch.bfloat16, 2.5e-2)])
def test_forward_matches_torch_autocast_on_the_cpu(precision, torch_dtype, tol):
    """Tolerance, relative to the largest |logit|: fp16 3e-3, bf16 2.5e-2. The two sides round at
    different places (CPU autocast also returns LayerNorm and GELU outputs in low precision), so
    they agree to about the size of the low-precision error itself (measured 5e-4 / 6e-3), while
    the fp32 forward agrees with PyTorch's fp32 to 4e-7. The test also checks the forward really is
    low precision: farther from fp32 than float32 rounding."""
    m = VisionTransformer(**KW, pool="mean", gelu="tanh")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    p = torch_params(m.state_dict(), torch.float32)
    with torch.no_grad():
        ref32 = torch_vit_forward(torch.tensor(x), p, m.config)[0].numpy()
        with torch.autocast("cpu", dtype=torch_dtype):
            ref = torch_vit_forward(torch.tensor(x), p, m.config)[0].float().numpy()
    m.precision = precision
    out = m.forward(x)
    scale = np.abs(ref32).max()
    assert np.abs(out - ref).max() / scale < tol
    assert np.abs(out - ref32).max() / scale > 1e-5, "the forward did not run in low precision"


def _grads(m, x, y, upstream_scale=1.0):
    logits = m.forward(x, train=False)
    _, dlogits = softmax_cross_entropy(logits, y)
    m.backward(dlogits * np.float32(upstream_scale))
    return {k: v.copy() for k, v in m.grads.items()}


def test_loss_scale_cancels_and_rescues_underflowing_gradients():
    """A loss multiplied by 1e-6 (gradients ~1e-9, below fp16's 2^-24 = 6e-8) loses its fp16
    gradients to underflow; scaled by S = 2^16 and divided back, they match fp32 again."""
    m = VisionTransformer(**KW)
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    y = np.arange(8) % 10
    small = 1e-6
    g32 = _grads(m, x, y, small)
    m.precision = "fp16"
    g16 = _grads(m, x, y, small)
    scaler = DynamicLossScaler()
    m.forward(x)
    _, dlogits = softmax_cross_entropy(m.forward(x), y)
    m.backward(scaler.scale_grad(dlogits * np.float32(small)))
    g16_scaled, found_inf = scaler.unscale(m.grads)
    assert not found_inf
    key = "blocks.0.attn.qkv.weight"
    lost = np.mean(g16[key] == 0) - np.mean(g32[key] == 0)
    assert lost > 0.5, f"without a scale most fp16 gradients should underflow to 0 (lost {lost:.2f})"
    for k in g32:  # relative to each gradient's largest entry: fp16 rounding of a few products
        err = np.abs(g16_scaled[k] - g32[k]).max() / np.abs(g32[k]).max()
        assert err < 2e-2, (k, err)


def _torch_trajectory(flags, **kw):
    scaler = torch.amp.GradScaler("cpu", **kw)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scales = []
    for bad in flags:
        opt.zero_grad()
        scaler.scale(w.sum()).backward()
        if bad:
            w.grad[1] = float("inf") if bad == 1 else float("nan")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def _our_trajectory(flags, **kw):
    scaler = DynamicLossScaler(**kw)
    scales = []
    for bad in flags:
        g = np.full(3, scaler.scale, dtype=np.float32)
        if bad:
            g[1] = np.inf if bad == 1 else np.nan
        _, found_inf = scaler.unscale({"w": g})
        scaler.update(found_inf)
        scales.append(scaler.scale)
    return scales, scaler


@pytest.mark.parametrize("kw,steps,p_bad", [
    ({}, 4500, 0.0004),  # the defaults: 2^16, x2 after 2000 clean steps, x0.5 on inf/NaN
    ({"growth_interval": 7}, 600, 0.12),
    ({"init_scale": 3.0, "growth_factor": 1.7, "backoff_factor": 0.3, "growth_interval": 3}, 400, 0.15),
    ({"init_scale": 2.0 ** 126, "growth_interval": 2}, 20, 0.0),  # growth past float32's max is refused
])
def test_scale_trajectory_equals_gradscaler(kw, steps, p_bad):
    rng = np.random.default_rng(len(kw) + steps)
    flags = (rng.random(steps) < p_bad) * rng.integers(1, 3, steps)  # 0 clean, 1 inf, 2 NaN
    flags[:3] = [1, 0, 2] if p_bad else 0
    ours, scaler = _our_trajectory(flags, **kw)
    assert ours == _torch_trajectory(flags, **kw)
    assert scaler.skipped == int((flags > 0).sum()) and scaler.steps == steps


def test_unscale_equals_gradscaler_unscale():
    g = np.random.default_rng(0).standard_normal(100).astype(np.float32) * 1000
    scaler = DynamicLossScaler(init_scale=3.0)
    ours, _ = scaler.unscale({"w": g})
    ts = torch.amp.GradScaler("cpu", init_scale=3.0)
    w = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.SGD([w], lr=0.1)
    ts.scale(w.sum())
    w.grad = torch.tensor(g)
    ts.unscale_(opt)
    assert np.array_equal(ours["w"], w.grad.numpy())


def test_scaler_state_round_trips_and_bad_state_is_refused():
    s = DynamicLossScaler(growth_interval=5)
    for bad in (False, True, False, False):
        s.update(bad)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        t.load_state_dict({"scale": 1.0})
    with pytest.raises(ValueError, match="out of range"):
        t.load_state_dict({**s.state_dict(), "growth_tracker": 5})
    for kw in ({"init_scale": 0.0}, {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"growth_interval": 0},
               {"init_scale": float("nan")}):
        with pytest.raises(ValueError):
            DynamicLossScaler(**kw)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_strict_array_path(precision):
    """The CuPy-like strict arrays: no host trips, no silent upcasts; bf16 takes the bit-rounding path
    (CuPy has no bfloat16 dtype); the numbers equal NumPy's to float32 rounding."""
    strict = Backend("strict", strict_xp)
    m = model_on(strict, **KW)
    m.precision = precision
    ref = VisionTransformer(**KW, precision=precision)
    xh = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    out = m.forward(strict.asarray(xh), train=True)
    dout = strict.asarray(np.ones((2, 10), dtype=np.float32))
    m.backward(dout)
    want = ref.forward(xh, train=True)
    ref.backward(np.ones((2, 10), dtype=np.float32))
    assert_close("logits", strict_xp.to_host(out), want, rtol=1e-4, atol=1e-5)
    for k in ref.grads:
        # NumPy may take the compiled float32 kernels (GELU, LayerNorm, softmax) where the strict arrays take the
        # reference formulas: float32 rounding apart (atol is scaled by each gradient's largest entry)
        assert_close(k, strict_xp.to_host(m.grads[k]), ref.grads[k], rtol=1e-4, atol=1e-5)
    scaler = DynamicLossScaler()
    grads, found_inf = scaler.unscale(m.grads)
    assert found_inf is False and type(grads["head.weight"]).__name__ == "StrictArray"


def test_bad_precision_requests_get_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of"):
        VisionTransformer(**KW, precision="int8")
    with pytest.raises(ValueError, match="float32 master weights"):
        VisionTransformer(**KW, dtype="float64", precision="fp16")
    m = VisionTransformer(**KW)
    with pytest.raises(ValueError, match="precision must be one of"):
        m.precision = "half"
    assert m.precision == "fp32"
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if not installed
    with pytest.raises(RuntimeError, match="bf16' on NumPy needs ml_dtypes"):
        check_precision_supported(np, "bf16")
    with pytest.raises(RuntimeError, match="needs ml_dtypes"):
        m.precision = "bf16"
    assert m.precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8").check()
    with pytest.raises(ValueError, match="float32 master weights"):
        TrainConfig(precision="bf16", dtype="float64").check()


def test_fp16_on_a_gpu_without_fp16_arithmetic_is_refused():
    """No GPU here: a stand-in CuPy module whose device reports compute capability 5.2 (Maxwell,
    no fp16 arithmetic); 5.3 and later pass."""
    import types

    def fake_cupy(cc):
        device = types.SimpleNamespace(compute_capability=cc)
        return types.SimpleNamespace(__name__="cupy", cuda=types.SimpleNamespace(Device=lambda: device))

    with pytest.raises(RuntimeError, match=r"fp16 arithmetic \(compute capability >= 5.3\); this one is 5.2"):
        check_precision_supported(fake_cupy("52"), "fp16")
    check_precision_supported(fake_cupy("53"), "fp16")
    check_precision_supported(fake_cupy("90"), "bf16")  # bf16 on CuPy: bit rounding, no dtype needed


TINY = dict(patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32, batch_size=128, warmup_epochs=1, lr=1e-2, mixup=0.0,
            cutmix=0.0, pool="cls")


def test_fp16_training_skips_overflowing_steps_and_reports_them(tmp_path, monkeypatch):
    """An initial scale of 2^40 overflows fp16 at once: those steps are skipped and counted (not a
    divergence), the scale halves until the gradients fit, then the run learns; the scaler's state
    goes into the checkpoint."""
    monkeypatch.setattr(train_mod, "DynamicLossScaler",
                        lambda enabled: DynamicLossScaler(init_scale=2.0 ** 40, enabled=enabled))
    cfg = TrainConfig(**TINY, epochs=3, precision="fp16", out=str(tmp_path / "run"))
    s = train(cfg, progress=False)
    assert s["finished"] and s["skipped_steps"] == []
    assert 5 <= s["loss_scale_skipped"] < 30 and s["loss_scale"] < 2.0 ** 40
    assert s["test_acc"] > 0.2
    meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").meta
    assert meta["extra"]["loss_scaler"]["skipped"] == s["loss_scale_skipped"]
    assert meta["train_config"]["precision"] == "fp16"


def test_fp16_resume_continues_the_loss_scale(tmp_path, monkeypatch):
    """The scaler's state (scale, clean-step count, skips) is in the checkpoint: a run stopped and
    resumed ends with the same scale and skip count as one that ran through, and the same weights."""
    monkeypatch.setattr(train_mod, "DynamicLossScaler",
                        lambda enabled: DynamicLossScaler(init_scale=2.0 ** 30, growth_interval=3, enabled=enabled))
    kw = dict(**TINY, epochs=2, precision="fp16", dropout=0.0, drop_path=0.0)
    full = train(TrainConfig(**kw, out=str(tmp_path / "full")), progress=False)
    train(TrainConfig(**kw, out=str(tmp_path / "part")), progress=False, stop_after=7)
    done = train(TrainConfig(**kw, out=str(tmp_path / "part")), progress=False,
                 resume=tmp_path / "part" / "checkpoint.safetensors")
    assert full["loss_scale_skipped"] > 0
    assert (done["loss_scale"], done["loss_scale_skipped"]) == (full["loss_scale"], full["loss_scale_skipped"])
    a = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors").params
    b = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors").params
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

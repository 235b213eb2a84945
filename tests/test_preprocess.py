"""The two preprocessing recipes against the libraries they copy, on the same image.

- ``"hf"`` vs Hugging Face's ``ViTImageProcessor`` (its Pillow backend, which is what it
  uses without torchvision): identical float32 output (tolerance 0).
- ``"tutorial"`` vs torchvision's ``Resize(256)/CenterCrop(224)/ToTensor()/Normalize``:
  identical float32 output (tolerance 0); skipped where torchvision is not installed
  (it does not install beside torch==2.13.0), and run in a side environment instead.
- Without either library: the recipe's arithmetic redone by hand from the crop.
"""
import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from tinyvit.pretrained.preprocess import (IMAGENET_MEAN, IMAGENET_STD, center_crop, load_image, preprocess,  # noqa: E402
                                resize_shorter)


def test_image(height=301, width=417, seed=0):
    """A deterministic RGB image with edges and noise (so resampling differences show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, (xx + yy) % 256], -1) + rng.integers(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


test_image.__test__ = False  # a helper, not a test


def test_tutorial_recipe_by_hand():
    img = test_image()
    out = preprocess(img, "tutorial", 224)
    assert out.pixels.shape == (3, 224, 224) and out.pixels.dtype == np.float32
    assert out.image.size == (224, 224)
    resized = img.resize((int(256 * 417 / 301), 256), Image.BILINEAR)  # shorter side 301 -> 256
    top, left = round((256 - 224) / 2), round((resized.size[0] - 224) / 2)
    crop = np.asarray(resized)[top:top + 224, left:left + 224].transpose(2, 0, 1).astype(np.float32) / 255
    expect = (crop - np.float32(IMAGENET_MEAN).reshape(3, 1, 1)) / np.float32(IMAGENET_STD).reshape(3, 1, 1)
    np.testing.assert_array_equal(out.pixels, expect)


def test_resize_and_crop_shapes():
    assert resize_shorter(test_image(300, 400), 256).size == (341, 256)  # int(256 * 400 / 300)
    assert resize_shorter(test_image(400, 300), 256).size == (256, 341)
    small = test_image(100, 50)
    cropped = center_crop(small, 128)  # torchvision pads with black, then crops
    assert cropped.size == (128, 128)
    arr = np.asarray(cropped)
    assert arr[:, :39].max() == 0 and arr[:, 39 + 50:].max() == 0 and arr[:14].max() == 0
    assert preprocess(test_image(50, 60), "tutorial", 32).pixels.shape == (3, 32, 32)  # resize 36, crop 32


def test_modes_and_paths(tmp_path):
    grey = test_image().convert("L")
    assert preprocess(grey, "hf", 32).pixels.shape == (3, 32, 32)
    rgba = test_image().convert("RGBA")
    rgba.save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess(tmp_path / "a.png", "hf", 32).pixels,
                                  preprocess(test_image(), "hf", 32).pixels)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        load_image(tmp_path / "notes.jpg")
    test_image().save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match="recipe must be one of"):
        preprocess(test_image(), "keras")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        preprocess(test_image(), "hf", 0)
    with pytest.raises(TypeError, match="PIL image or a path"):
        preprocess(np.zeros((4, 4, 3)), "hf")


def test_matches_hugging_face_vit_image_processor():
    transformers = pytest.importorskip("transformers")
    processor = getattr(transformers, "ViTImageProcessorPil", None)
    processor = processor() if processor is not None else transformers.ViTImageProcessor()
    for img in (test_image(), test_image(224, 224, seed=1), test_image(180, 500, seed=2)):
        ref = processor(images=img, return_tensors="np")["pixel_values"][0]
        ours = preprocess(img, "hf", 224).pixels
        assert ref.dtype == ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)  # tolerance 0: same Pillow resize, same arithmetic


def test_matches_torchvision_transforms():
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed (it does not "
                                     "install beside torch==2.13.0); run in a side environment")
    pipeline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for img in (test_image(), test_image(224, 224, seed=1), test_image(180, 500, seed=2), test_image(100, 120)):
        np.testing.assert_array_equal(preprocess(img, "tutorial", 224).pixels, pipeline(img).numpy())

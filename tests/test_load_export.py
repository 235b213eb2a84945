"""Issue 11, items 11-12: foreign files load as what they are or are refused, and every field the
weights cannot decide is said ("loaded as"); exports keep the whole architecture and refuse what
the target library cannot run.

Before: timm's ``global_pool='token'`` + ``fc_norm=True`` loaded as mean pooling (max logit
error / max logit 0.74), ``'avg'`` without ``fc_norm`` and ``'max'`` loaded silently, a 6-head
width-192 model took 3 heads, tanh GELU / eps 1e-5 / a 32x128 grid were read as exact / 1e-6 /
64x64 without a word; an export dropped ``norm_first``, ``gelu`` and ``layer_norm_eps``, and a
post-norm model went out in timm's layout to load as pre-norm.
"""
import json
import logging

import numpy as np
import pytest

from tinyvit import VisionTransformer, export_pretrained, load_pretrained
from tinyvit.cli import main
from tinyvit.pretrained.weights import export_refusals, open_model, save_state_dict

SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=2, heads=2, mlp_dim=48)


def model(seed=0, **kw):
    m = VisionTransformer(**{**SMALL, **kw}, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    m.load_state_dict({k: v + rng.standard_normal(v.shape) * 0.2 for k, v in m.state_dict().items()})
    return m


def images(channels=3, size=(32, 32), n=2):
    return np.random.default_rng(7).standard_normal((n, channels, *size))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- 11: pooling
def test_timm_token_pool_with_fc_norm_loads_as_the_class_token(tmp_path):
    m = model(pool="cls")
    sd = m.state_dict()
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")  # timm: token + fc_norm
    save_state_dict(tmp_path / "w.safetensors", sd)
    guessed = open_model(tmp_path / "w.safetensors", heads=2, layer_norm_eps=1e-6, dtype="float64")
    assert guessed.model.config.pool == "mean"  # the keys look like global_pool='avg' ...
    note = next(n for n in guessed.notes if n.startswith("pool="))
    assert "a guess" in note and "pass pool='cls'" in note  # ... and the guess is said, with the way out
    assert rel(guessed.model.forward(images()), m.forward(images())) > 0.05  # it was wrong
    right = load_pretrained(tmp_path / "w.safetensors", heads=2, layer_norm_eps=1e-6, dtype="float64", pool="cls")
    np.testing.assert_allclose(right.forward(images()), m.forward(images()), rtol=0, atol=1e-12)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_x", "global_pool": "token"}))
    from_config = open_model(tmp_path / "w.safetensors", heads=2, layer_norm_eps=1e-6, dtype="float64")
    assert from_config.model.config.pool == "cls" and any("config.json (global_pool='token')" in n
                                                           for n in from_config.notes)
    np.testing.assert_allclose(from_config.model.forward(images()), m.forward(images()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax", "map"])
def test_poolings_tinyvit_lacks_are_refused(tmp_path, global_pool):
    sd = model(pool="cls").state_dict()  # norm.* without fc_norm: what 'avg' + fc_norm=False and 'max' save
    save_state_dict(tmp_path / "w.safetensors", sd)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_x", "global_pool": global_pool}))
    with pytest.raises(ValueError, match="pooling tinyvit does not have"):
        load_pretrained(tmp_path / "w.safetensors", heads=2)


def test_mean_pool_asked_of_a_norm_only_file_is_refused(tmp_path):
    save_state_dict(tmp_path / "w.safetensors", model(pool="cls").state_dict())
    with pytest.raises(ValueError, match="fc_norm=False.*pooling tinyvit does not have"):
        load_pretrained(tmp_path / "w.safetensors", heads=2, pool="mean")
    with pytest.raises(ValueError, match="'max'"):
        load_pretrained(tmp_path / "w.safetensors", heads=2, pool="max")


# ---------------------------------------------------------------- 11: heads, GELU, eps, grid said
def test_every_guess_is_said_in_a_loaded_as_line(tmp_path, capsys, caplog):
    m = VisionTransformer(image_size=(32, 128), patch_size=16, num_classes=5, dim=192, depth=1, heads=6, mlp_dim=64,
                          gelu="tanh", layer_norm_eps=1e-5, seed=0)
    save_state_dict(tmp_path / "w.safetensors", m.state_dict())  # a foreign file: keys only
    loaded = open_model(tmp_path / "w.safetensors")
    c = loaded.model.config
    assert (c.heads, c.gelu, c.layer_norm_eps, c.image_size) == (3, "none", 1e-6, (64, 64))  # what the keys allow
    text = " | ".join(loaded.notes)
    for field in ("heads=3: the standard count for width 192", "gelu=exact", "layer_norm_eps=1e-06",
                  "image 64x64", "a guess"):
        assert field in text, (field, text)
    with caplog.at_level(logging.WARNING, logger="tinyvit"):
        load_pretrained(tmp_path / "w.safetensors")
    assert any("loaded as" in r.getMessage() and "heads=3" in r.getMessage() for r in caplog.records)
    # the arguments decide, and then the numbers are right
    right = load_pretrained(tmp_path / "w.safetensors", heads=6, gelu="tanh", layer_norm_eps=1e-5,
                            image_size=(32, 128))
    x = images(size=(32, 128)).astype(np.float32)
    np.testing.assert_allclose(right.forward(x), m.forward(x), rtol=0, atol=1e-6)
    # the command prints the same line
    from PIL import Image

    Image.fromarray(np.zeros((40, 140, 3), np.uint8)).save(tmp_path / "img.png")
    assert main(["predict", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w.safetensors"),
                 "--recipe", "hf"]) == 0
    out = capsys.readouterr().out
    assert "loaded as: " in out and "heads=3: the standard count for width 192" in out


# ---------------------------------------------------------------- 12: exports
def test_a_post_norm_model_is_refused_by_the_library_layouts_and_kept_by_tinyvits(tmp_path):
    m = model(norm_first=False, gelu="tanh", layer_norm_eps=1e-5)
    for layout in ("timm", "torchvision", "hf"):
        with pytest.raises(ValueError, match="post-norm"):
            export_pretrained(m, tmp_path / f"{layout}.safetensors", layout)
        assert not (tmp_path / f"{layout}.safetensors").exists()
    export_pretrained(m, tmp_path / "tv.safetensors")
    back = load_pretrained(tmp_path / "tv.safetensors")
    assert back.config == m.config and back.dtype == "float64"
    np.testing.assert_array_equal(back.forward(images()), m.forward(images()))


@pytest.mark.parametrize("kw,layout,feature", [
    (dict(pool="mean"), "torchvision", "mean pooling"), (dict(pool="mean"), "hf", "mean pooling"),
    (dict(distilled=True), "torchvision", "distillation token"), (dict(gelu="tanh"), "torchvision", "exact GELU"),
    (dict(qkv_bias=False), "torchvision", "qkv_bias=False"), (dict(channels=1), "torchvision", "1 input channels"),
    (dict(image_size=(32, 64)), "torchvision", "square images"), (dict(pos_embed="sincos2d"), "timm", "sincos2d"),
])
def test_library_layouts_name_what_they_cannot_run(tmp_path, kw, layout, feature):
    m = model(**kw)
    assert any(feature in r for r in export_refusals(m.config, layout))
    with pytest.raises(ValueError, match=feature):
        export_pretrained(m, tmp_path / "w.safetensors", layout)
    export_pretrained(m, tmp_path / "w.safetensors")  # tinyvit's layout holds it
    np.testing.assert_array_equal(load_pretrained(tmp_path / "w.safetensors").forward(images(m.config.channels,
                                  m.config.image_size)), m.forward(images(m.config.channels, m.config.image_size)))


@pytest.mark.parametrize("layout", ["timm", "torchvision", "hf"])
def test_library_layout_exports_reload_exactly_with_their_metadata(tmp_path, layout):
    m = model(gelu="none" if layout == "torchvision" else "tanh", layer_norm_eps=1e-5)
    export_pretrained(m, tmp_path / "model.safetensors", layout)
    loaded = open_model(tmp_path / "model.safetensors")
    assert loaded.kind == "export" and loaded.layout == layout and loaded.model.config == m.config
    np.testing.assert_array_equal(loaded.model.forward(images()), m.forward(images()))
    from tinyvit.training.checkpoint import load_arrays_and_metadata

    _, meta = load_arrays_and_metadata(tmp_path / "model.safetensors")
    assert meta["format"] == "pt" and meta["tinyvit.format"] == "tinyvit-weights-1"  # Hugging Face needs "pt"


@pytest.mark.parametrize("distilled", [False, True])
def test_hf_export_runs_in_transformers_from_its_folder(tmp_path, distilled):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    m = model(gelu="tanh", layer_norm_eps=1e-5, distilled=distilled)
    m.labels = ["cat", "dog", "fox", "owl", "elk"]
    export_pretrained(m, tmp_path / "model.safetensors", "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["layer_norm_eps"] == 1e-5
    assert config["id2label"]["3"] == "owl"
    cls = transformers.DeiTForImageClassificationWithTeacher if distilled else transformers.ViTForImageClassification
    theirs = cls.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    x = images()
    with torch.no_grad():
        ref = theirs(pixel_values=torch.tensor(x)).logits.numpy()
    assert rel(m.forward(x), ref) < 1e-10


# ---------------------------------------------------------------- preprocessing a foreign model was trained with
def test_timm_config_json_gives_the_preprocessing(tmp_path):
    from PIL import Image

    save_state_dict(tmp_path / "w.safetensors", model().state_dict())
    cfg = {"architecture": "vit_x", "global_pool": "token",
           "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9,
                              "interpolation": "bicubic", "crop_mode": "center"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = open_model(tmp_path / "w.safetensors", heads=2)
    pre = loaded.preprocessing
    assert (pre.resize, pre.crop_pct, pre.interpolation, pre.mean) == ("shorter_crop", 0.9, "bicubic", (0.5,) * 3)
    assert any("pretrained_cfg" in n for n in loaded.notes)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    resized = img.resize((int(35 * 70 / 50), 35), Image.BICUBIC)  # floor(32 / 0.9) = 35 on the shorter side
    top, left = round((35 - 32) / 2), round((resized.size[0] - 32) / 2)  # torchvision's CenterCrop offsets
    crop = np.asarray(resized)[top:top + 32, left:left + 32].transpose(2, 0, 1).astype(np.float32) / 255
    np.testing.assert_array_equal(pre(img).pixels, (crop - np.float32(0.5)) / np.float32(0.5))


def test_hf_preprocessor_config_gives_the_preprocessing(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    m = model()
    from tinyvit.pretrained.convert import from_tinyvit

    export_pretrained(m, tmp_path / "model.safetensors", "hf")  # writes config.json beside it ...
    save_state_dict(tmp_path / "model.safetensors", from_tinyvit(m.state_dict(), "hf"))  # ... then a foreign file
    cfg = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
           "image_std": [0.229, 0.224, 0.225], "image_processor_type": "ViTImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    loaded = open_model(tmp_path / "model.safetensors")
    assert loaded.preprocessing.interpolation == "bicubic" and loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    processor = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    ref = processor(**{k: v for k, v in cfg.items() if k != "image_processor_type"})(images=img, return_tensors="np")
    np.testing.assert_allclose(loaded.preprocessing(img).pixels, ref["pixel_values"][0], rtol=0, atol=1e-6)

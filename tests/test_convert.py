"""Key mapping between tinyvit (= timm's names), torchvision and Hugging Face ViT state dicts.

Without torchvision or timm installed (CI: they do not install beside torch==2.13.0), the
layouts are built here by hand from a tinyvit model's weights, renaming keys the way those
libraries lay them out, and round-tripped; a torchvision-style forward written with
``torch.nn.MultiheadAttention`` (what torchvision's ``EncoderBlock`` uses) checks that the
fused ``in_proj`` rows mean what tinyvit's ``qkv`` rows mean. Hugging Face's own
``ViTForImageClassification`` (random weights, a small ``ViTConfig``) is the oracle for its
layout. The real torchvision/timm models are in ``test_convert_libraries.py``.

Tolerances: float64 logits 1e-10 relative to the largest logit (the sides differ only in
summation order); float32 1e-4 relative.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyvit import VisionTransformer
from tinyvit.pretrained.convert import DEFAULT_HEADS, detect_layout, from_tinyvit, infer_config, to_timm, to_tinyvit

RTOL64 = 1e-10
RTOL32 = 1e-4
SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=48, depth=2, heads=4, mlp_dim=96)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def perturbed(seed=0, dtype="float64", **kw):
    """A tinyvit model whose LayerNorms, tokens and biases are moved off their trivial init."""
    m = VisionTransformer(**{**SMALL, **kw}, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    m.load_state_dict({k: v + rng.standard_normal(v.shape) * 0.1 for k, v in m.state_dict().items()})
    return m


# ------------------------------------------------------------------ layouts built by hand
def torchvision_by_hand(sd: dict, depth: int, old_mlp_names=False) -> dict:
    """torchvision.models.VisionTransformer's names for tinyvit's tensors."""
    out = {"class_token": sd["cls_token"], "conv_proj.weight": sd["patch_embed.proj.weight"],
           "conv_proj.bias": sd["patch_embed.proj.bias"], "encoder.pos_embedding": sd["pos_embed"]}
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if old_mlp_names else ("mlp.0", "mlp.3")
    for i in range(depth):
        t, b = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "self_attention.out_proj"),
                             ("mlp.fc1", fc1), ("mlp.fc2", fc2)):
            out[f"{t}{theirs}.weight"], out[f"{t}{theirs}.bias"] = sd[f"{b}{ours}.weight"], sd[f"{b}{ours}.bias"]
        out[t + "self_attention.in_proj_weight"] = sd[b + "attn.qkv.weight"]
        out[t + "self_attention.in_proj_bias"] = sd[b + "attn.qkv.bias"]
    out["encoder.ln.weight"], out["encoder.ln.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["heads.head.weight"], out["heads.head.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def hf_by_hand(sd: dict, depth: int) -> dict:
    """Hugging Face ViTForImageClassification's hub-file names (separate query/key/value)."""
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]}
    for i in range(depth):
        h, b = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = np.split(sd[f"{b}attn.qkv.{part}"], 3, axis=0)
            out[f"{h}attention.attention.query.{part}"] = q
            out[f"{h}attention.attention.key.{part}"] = k
            out[f"{h}attention.attention.value.{part}"] = v
            out[f"{h}attention.output.dense.{part}"] = sd[f"{b}attn.proj.{part}"]
            out[f"{h}layernorm_before.{part}"] = sd[f"{b}norm1.{part}"]
            out[f"{h}layernorm_after.{part}"] = sd[f"{b}norm2.{part}"]
            out[f"{h}intermediate.dense.{part}"] = sd[f"{b}mlp.fc1.{part}"]
            out[f"{h}output.dense.{part}"] = sd[f"{b}mlp.fc2.{part}"]
    out["vit.layernorm.weight"], out["vit.layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def assert_same_arrays(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["timm", "torchvision", "torchvision-old", "hf"])
def test_round_trip_hand_built_layouts(layout):
    m = perturbed()
    sd = m.state_dict()
    theirs = {"timm": lambda: dict(sd), "torchvision": lambda: torchvision_by_hand(sd, 2),
              "torchvision-old": lambda: torchvision_by_hand(sd, 2, old_mlp_names=True),
              "hf": lambda: hf_by_hand(sd, 2)}[layout]()
    name = layout.split("-")[0]
    assert detect_layout(theirs) == name
    back, detected = to_tinyvit(theirs)
    assert detected == name
    assert_same_arrays(back, sd)
    assert list(back) == list(sd)  # timm's order
    if layout != "torchvision-old":
        assert_same_arrays(from_tinyvit(sd, name), theirs)
    config, _ = infer_config(back, name, heads=4)
    expect = m.config.to_dict()
    for key, value in config.items():
        want = tuple(expect[key]) if key == "image_size" else expect[key]
        if key != "layer_norm_eps":
            assert value == want, key


def torchvision_style_forward(tv: dict, x, heads: int, eps: float):
    """torchvision's ViT forward (conv_proj, class token, EncoderBlock with nn.MultiheadAttention)."""
    t = {k: torch.tensor(v) for k, v in tv.items()}
    x = F.conv2d(torch.tensor(x), t["conv_proj.weight"], t["conv_proj.bias"], stride=t["conv_proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t["class_token"].expand(x.shape[0], -1, -1), x], dim=1) + t["encoder.pos_embedding"]
    dim = x.shape[-1]
    i = 0
    while f"encoder.layers.encoder_layer_{i}.ln_1.weight" in t:
        p = f"encoder.layers.encoder_layer_{i}."
        mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
        mha.load_state_dict({"in_proj_weight": t[p + "self_attention.in_proj_weight"],
                             "in_proj_bias": t[p + "self_attention.in_proj_bias"],
                             "out_proj.weight": t[p + "self_attention.out_proj.weight"],
                             "out_proj.bias": t[p + "self_attention.out_proj.bias"]})
        y = F.layer_norm(x, (dim,), t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        x = x + mha(y, y, y, need_weights=False)[0]
        y = F.layer_norm(x, (dim,), t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, t[p + "mlp.0.weight"], t[p + "mlp.0.bias"])), t[p + "mlp.3.weight"],
                     t[p + "mlp.3.bias"])
        x = x + y
        i += 1
    x = F.layer_norm(x, (dim,), t["encoder.ln.weight"], t["encoder.ln.bias"], eps)
    return F.linear(x[:, 0], t["heads.head.weight"], t["heads.head.bias"]).detach().numpy()


def test_torchvision_qkv_rows_mean_the_same_as_tinyvit():
    m = perturbed(seed=3, layer_norm_eps=1e-6)
    tv = torchvision_by_hand(m.state_dict(), 2)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    ref = torchvision_style_forward(tv, x, heads=4, eps=1e-6)
    sd, _ = to_tinyvit(tv)
    config, _ = infer_config(sd, "torchvision", heads=4)
    ours = VisionTransformer(**config, dtype="float64")
    ours.load_state_dict(sd)
    assert rel_err(ours.forward(x), ref) < RTOL64


def test_to_timm_is_tinyvit_names_and_ddp_prefix_is_dropped():
    sd = perturbed().state_dict()
    wrapped = {"module." + k: v for k, v in torchvision_by_hand(sd, 2).items()}
    assert_same_arrays(to_timm(wrapped), sd)


def test_torch_tensors_are_accepted():
    sd = perturbed().state_dict()
    tensors = {k: torch.tensor(v) for k, v in hf_by_hand(sd, 2).items()}
    assert_same_arrays(to_tinyvit(tensors)[0], sd)


# ------------------------------------------------------------------ what does not fit
def test_unsupported_keys_are_listed_in_one_error():
    sd = perturbed().state_dict()
    sd["blocks.0.ls1.gamma"] = np.ones(48)
    sd["reg_token"] = np.ones((1, 4, 48))
    with pytest.raises(ValueError, match="LayerScale.*register tokens|register tokens.*LayerScale") as e:
        to_tinyvit(sd)
    assert "blocks.0.ls1.gamma" in str(e.value) and "reg_token" in str(e.value)


def test_layout_errors():
    with pytest.raises(ValueError, match="empty"):
        detect_layout({})
    with pytest.raises(ValueError, match="JAX"):
        detect_layout({"Transformer/encoderblock_0/LayerNorm_0/scale": 0})
    with pytest.raises(ValueError, match="cannot tell the layout"):
        detect_layout({"features.0.weight": 0})
    with pytest.raises(ValueError, match="layout must be one of"):
        to_tinyvit({"cls_token": np.zeros((1, 1, 4))}, layout="keras")
    hf = hf_by_hand(perturbed().state_dict(), 2)
    del hf["vit.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight: the key projection is missing"):
        to_tinyvit(hf)


def test_infer_config_asks_for_what_shapes_cannot_tell():
    sd = perturbed().state_dict()
    with pytest.raises(ValueError, match="heads cannot be read.*width D=48.*pass heads="):
        infer_config(sd, "timm")
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="headless"):
        infer_config(headless, "timm", heads=4)
    wide = dict(sd, pos_embed=np.zeros((1, 1 + 8, 48)))  # 8 patches: not a square grid
    with pytest.raises(ValueError, match="not a square patch grid; pass image_size"):
        infer_config(wide, "timm", heads=4)
    config, _ = infer_config(wide, "timm", heads=4, image_size=(16, 32))
    assert config["image_size"] == (16, 32)
    with pytest.raises(ValueError, match="not divisible by the checkpoint's patch size 8; the nearest valid size "
                                         "is 40x40"):
        infer_config(sd, "timm", heads=4, image_size=38)


@pytest.mark.parametrize("dim,heads", sorted(DEFAULT_HEADS.items()))
def test_default_heads_for_standard_widths(dim, heads):
    sd = {"cls_token": np.zeros((1, 1, dim)), "pos_embed": np.zeros((1, 5, dim)),
          "patch_embed.proj.weight": np.zeros((dim, 3, 16, 16)), "blocks.0.mlp.fc1.weight": np.zeros((4 * dim, dim)),
          "blocks.0.attn.qkv.bias": np.zeros(3 * dim), "head.weight": np.zeros((10, dim))}
    config, notes = infer_config(sd, "torchvision")
    assert config["heads"] == heads and config["image_size"] == (32, 32) and config["layer_norm_eps"] == 1e-6
    assert any("standard count" in n for n in notes)
    assert infer_config(sd, "hf")[0]["layer_norm_eps"] == 1e-12


# ------------------------------------------------------------------ Hugging Face's own model
try:
    import transformers
except ImportError:  # the test extra installs it; the hand-built layouts above still run without it
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="Hugging Face transformers is not installed")


def hf_model(dtype=torch.float64, seed=0, **kw):
    cfg = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, num_labels=5)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # move LayerNorms and tokens off their trivial init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def tinyvit_from(state_dict, dtype, **kw):
    sd, layout = to_tinyvit(state_dict)
    config, _ = infer_config(sd, layout, **kw)
    m = VisionTransformer(**config, dtype=dtype)
    m.load_state_dict(sd)
    return m


@needs_hf
@pytest.mark.parametrize("dtype,tol", [("float64", RTOL64), ("float32", RTOL32)])
def test_hf_vit_logits_match(dtype, tol):
    ref_model = hf_model(getattr(torch, dtype))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(dtype)
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(x)).logits.numpy()
    ours = tinyvit_from(ref_model.state_dict(), dtype, heads=4)  # transformers 5's in-memory names
    assert ours.config.layer_norm_eps == 1e-12
    err = rel_err(ours.forward(x), ref)
    assert err < tol, f"HF ViT {dtype}: logits rel err {err:.2e} > {tol}"


@needs_hf
def test_hf_hub_file_layout_and_config_json(tmp_path):
    """save_pretrained writes the hub names (query/key/value) plus config.json (heads, eps, labels)."""
    from tinyvit.pretrained.weights import load_pretrained, read_checkpoint

    ref_model = hf_model(num_attention_heads=6, hidden_size=48, layer_norm_eps=1e-6,
                         id2label={i: f"thing {i}" for i in range(5)}, label2id={f"thing {i}": i for i in range(5)})
    ref_model.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.layout == "hf" and ckpt.config["heads"] == 6 and ckpt.config["layer_norm_eps"] == 1e-6
    assert ckpt.labels == [f"thing {i}" for i in range(5)]
    hub = from_tinyvit(ckpt.state_dict, "hf")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in hub
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(x)).logits.numpy()
    assert rel_err(load_pretrained(tmp_path, dtype="float64").forward(x), ref) < RTOL64


@needs_hf
def test_hf_at_another_image_size_matches_interpolate_pos_encoding():
    """HF's interpolate_pos_encoding is bicubic without antialias: load_pretrained(antialias=False)."""
    from tinyvit.pretrained.weights import resample_pos_embed

    ref_model = hf_model()
    x = np.random.default_rng(2).standard_normal((1, 3, 48, 48))
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(x), interpolate_pos_encoding=True).logits.numpy()
    sd, _ = to_tinyvit(ref_model.state_dict())
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (6, 6), antialias=False)
    config, _ = infer_config(sd, "hf", heads=4)
    assert config["image_size"] == (48, 48)
    ours = VisionTransformer(**config, dtype="float64")
    ours.load_state_dict(sd)
    assert rel_err(ours.forward(x), ref) < RTOL64


@needs_hf
def test_hf_deit_with_teacher_maps_both_tokens_and_heads():
    cfg = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96, num_labels=5)
    torch.manual_seed(0)
    ref_model = transformers.DeiTForImageClassificationWithTeacher(cfg).double().eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(x)).logits.numpy()  # mean of both heads
    ours = tinyvit_from(ref_model.state_dict(), "float64", heads=4)
    assert ours.config.distilled
    assert rel_err(ours.forward(x), ref) < RTOL64
    hub = from_tinyvit(ours.state_dict(), "hf")
    assert "deit.embeddings.distillation_token" in hub and "distillation_classifier.weight" in hub


@needs_hf
def test_hf_vit_b16_224_float32():
    """The standard ViT-B/16 at 224 (transformers' default ViTConfig), float32, 1,000 classes:
    heads come from the standard-size rule (768 -> 12), eps 1e-12 from the layout."""
    torch.manual_seed(0)
    ref_model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(x)).logits.numpy()
    ours = tinyvit_from(ref_model.state_dict(), "float32")
    assert (ours.config.heads, ours.config.depth, ours.config.patch_size) == (12, 12, 16)
    err = rel_err(ours.forward(x), ref)
    assert err < RTOL32, f"HF ViT-B/16 float32: logits rel err {err:.2e} > {RTOL32}"

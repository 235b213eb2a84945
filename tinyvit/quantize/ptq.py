"""INT8 post-training quantisation: calibrate, quantise, write and read the quantised file.

Derivation: docs/quantization.md. The layer arithmetic (int8 product, int32 accumulation)
is :mod:`tinyvit.layers.quant`; this module decides the scales and keeps the files.

Which layers: every linear map of the ViT (the patch embedding, qkv, proj, fc1, fc2 of every
block, the head) gets int8 weights (symmetric, one scale per output channel) and an int8
input (symmetric, one scale per tensor, calibrated). LayerNorm, softmax, GELU, the attention
products ``q k^T`` and ``att v``, the residual adds, the tokens and the position embedding
stay float: the plain "8-bit linear layers" baseline (FQ-ViT's table puts it ~0.6 points
below float on ViT-B; quantising LayerNorm and softmax too with min-max drops ViT-B to 23.6%).

Calibration runs the float model on a few batches and reads each linear layer's input from
the forward's caches (no hooks): ``minmax`` takes ``max |x|`` over every calibration value,
``percentile`` the ``p``-th percentile of ``|x|`` (default 99.99: a few outliers are clipped
so that the grid is finer for the rest). ``s_x = amax / 127``.
"""
from __future__ import annotations

import json

import numpy as np

from ..backend import to_host
from ..layers.gelu import gelu_forward
from ..layers.quant import Int8Weight, quantize_weight
from ..model import VisionTransformer

FORMAT = "tinyvit-int8-1"
METHODS = ("minmax", "percentile")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
MAX_SAMPLES = 1 << 20  # |x| values kept per layer per batch for the percentile (a seeded random subset beyond)


def linear_keys(model) -> list:
    """The ``*.weight`` keys of every linear map, in data-flow order."""
    c = model.config
    keys = ["patch_embed.proj.weight"]
    keys += [f"blocks.{i}.{name}.weight" for i in range(c.depth) for name in BLOCK_LINEARS]
    keys += ["head.weight"] + (["head_dist.weight"] if c.distilled else [])
    return keys


def _check_model(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"quantisation needs a tinyvit VisionTransformer, got {type(model).__name__}")
    c = model.config
    if c.attn_impl != "plain" or c.attn_window or c.tome_r or getattr(model, "head_gates", None):
        raise ValueError(f"quantisation covers plain global attention; the model uses attn_impl={c.attn_impl!r}, "
                         f"attn_window={c.attn_window}, tome_r={c.tome_r}, head gates "
                         f"{sorted(getattr(model, 'head_gates', {}) or {})}: rebuild it with attn_impl='plain', "
                         f"attn_window=0, tome_r=0 and no head gates")


def check_calibration(model, images) -> np.ndarray:
    """``images``: host ``(M, C, H, W)`` float, normalised as the model expects; else a ValueError saying so."""
    c = model.config
    expect = f"(M, {c.channels}, {c.image_size[0]}, {c.image_size[1]})"
    if not isinstance(images, np.ndarray):
        raise TypeError(f"calibration images must be a host NumPy array {expect}, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (c.channels, *c.image_size):
        raise ValueError(f"calibration images must have shape {expect} (normalised as the model expects), got "
                         f"{tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("the calibration set is empty: give at least one image")
    if images.dtype.kind != "f":
        raise ValueError(f"calibration images must be floating point (normalised), got {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise ValueError("calibration images hold NaN/Inf values")
    return images


def _layer_inputs(model) -> dict:
    """``{weight key: input array}`` of the last forward, read from its caches."""
    cache, c = model._cache, model.config
    found = {"patch_embed.proj.weight": cache.patch_embed.linear.x}
    for i, bc in enumerate(cache.blocks):
        found[f"blocks.{i}.attn.qkv.weight"] = bc.attn.qkv.x
        found[f"blocks.{i}.attn.proj.weight"] = bc.attn.proj.x
        found[f"blocks.{i}.mlp.fc1.weight"] = bc.mlp.fc1.x
        found[f"blocks.{i}.mlp.fc2.weight"] = gelu_forward(bc.mlp.gelu.x, bc.mlp.gelu.approximate)[0]  # not cached
    for name, lc in zip(("head", "head_dist"), cache.heads):
        found[f"{name}.weight"] = lc.x
    return found


def calibrate(model, images, method: str = "minmax", percentile: float = 99.99, batch_size: int = 32,
              seed: int = 0) -> dict:
    """``{weight key: amax}`` (host floats): the range of each linear layer's input over ``images``.

    ``images``: host ``(M, C, H, W)``, normalised. ``method``: ``"minmax"`` (``max |x|``) or
    ``"percentile"`` (the ``percentile``-th percentile of ``|x|``).
    """
    _check_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    images = check_calibration(model, images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rng = np.random.default_rng(seed)
    amax, samples = {}, {}
    saved_quant, model.quant = model.quant, None  # calibrate the float model
    try:
        for start in range(0, len(images), batch_size):
            x = model.backend.asarray(np.ascontiguousarray(images[start:start + batch_size]), dtype=model.dtype)
            model.forward(x, train=False)
            for key, value in _layer_inputs(model).items():
                a = np.abs(to_host(value)).ravel()  # one host copy per layer and batch: calibration only
                amax[key] = max(amax.get(key, 0.0), float(a.max()))
                if method == "percentile":
                    if a.size > MAX_SAMPLES:
                        a = rng.choice(a, MAX_SAMPLES, replace=False)
                    samples.setdefault(key, []).append(a)
    finally:
        model.quant = saved_quant
        model._cache = None
    if method == "percentile":
        amax = {k: float(np.percentile(np.concatenate(v), percentile)) for k, v in samples.items()}
    return amax


def quantize_model(model, images, method: str = "minmax", percentile: float = 99.99, batch_size: int = 32):
    """A copy of ``model`` whose linear layers run in int8 (``model.quant``), calibrated on ``images``.

    The copy's ``params`` hold the dequantised weights (what the int8 values stand for), so its
    ``state_dict`` is the float model the int8 one approximates. ``model`` itself is unchanged.
    Returns the copy; ``copy.quant_info`` records the method and the scales' provenance.
    """
    amax = calibrate(model, images, method, percentile, batch_size)
    q = VisionTransformer.from_config(model.config, backend=model.backend, dtype=model.dtype)
    q.load_state_dict(model.state_dict())
    q.labels = getattr(model, "labels", None)
    q.preprocessing = getattr(model, "preprocessing", None)
    records = {}
    for key in linear_keys(model):
        w_q, w_s = quantize_weight(to_host(model.params[key]).astype(np.float32))
        s_x = np.float32(max(amax[key], 1e-12) / 127.0)
        records[key] = Int8Weight(q.backend.asarray(w_q), q.backend.asarray(w_s), q.backend.asarray(s_x))
    _install(q, records)
    q.quant_info = {"weights": "int8, symmetric, per output channel (max |w| / 127)",
                    "activations": "int8, symmetric, per tensor, calibrated", "method": method,
                    "percentile": percentile if method == "percentile" else None,
                    "calibration_images": int(len(images)), "layers": linear_keys(model)}
    return q


def _install(model, records: dict) -> None:
    """Set ``model.quant`` and put the dequantised weights into ``model.params``."""
    for key, rec in records.items():
        model.params[key] = rec.dequantize().astype(model.dtype)
    model.quant = records


# ---------------------------------------------------------------- the file
def _prefix(key: str) -> str:
    return key[: -len("weight")]  # "blocks.0.attn.qkv."


def save_quantized(path, model, data=None) -> None:
    """Write an int8 model (from :func:`quantize_model`) to ``.safetensors`` / ``.npz``, atomically.

    Per quantised layer: ``<layer>.weight`` int8, ``<layer>.weight_scale`` float32 ``(out,)``,
    ``<layer>.input_scale`` float32 ``(1,)``; every other parameter float32 under its own key.
    The metadata holds the format, the config, labels, preprocessing, the data record and how
    the model was quantised, so :func:`tinyvit.load_pretrained` / ``tinyvit predict`` /
    ``attention`` / ``eval`` rebuild it exactly.
    """
    from ..pretrained.weights import tinyvit_metadata
    from ..training.checkpoint import save_arrays

    if not isinstance(getattr(model, "quant", None), dict) or not all(
            isinstance(r, Int8Weight) for r in model.quant.values()):
        raise ValueError("save_quantized needs a model from quantize_model (int8 weights in model.quant)")
    arrays = {}
    for key, value in model.params.items():
        rec = model.quant.get(key)
        if rec is None:
            arrays[key] = to_host(value).astype(np.float32)
        else:
            arrays[key] = to_host(rec.q)
            arrays[_prefix(key) + "weight_scale"] = to_host(rec.scale).astype(np.float32)
            arrays[_prefix(key) + "input_scale"] = to_host(rec.input_scale).astype(np.float32).reshape(1)
    meta = tinyvit_metadata(model, data=data)
    meta.update(format=FORMAT, quantization=json.dumps(getattr(model, "quant_info", {})))
    save_arrays(path, arrays, meta)


def split_quantized(arrays: dict, path: str) -> tuple[dict, dict]:
    """A quantised file's arrays -> (``{key: float param}`` with the dequantised weights, ``{key: host
    (q, scale, input_scale)}``). A missing or malformed scale is a ValueError naming the key."""
    params, records = {}, {}
    scale_keys = {k for k in arrays if k.endswith((".weight_scale", ".input_scale"))}
    for key, value in arrays.items():
        if key in scale_keys:
            continue
        if value.dtype != np.int8:
            params[key] = value
            continue
        prefix = _prefix(key)
        w_s, s_x = arrays.get(prefix + "weight_scale"), arrays.get(prefix + "input_scale")
        if w_s is None or s_x is None:
            raise ValueError(f"{path}: int8 weight {key!r} has no {prefix}weight_scale / {prefix}input_scale")
        if w_s.shape != (value.shape[0],) or s_x.shape != (1,):
            raise ValueError(f"{path}: {prefix}weight_scale must be ({value.shape[0]},) and {prefix}input_scale (1,), "
                             f"got {w_s.shape} and {s_x.shape}")
        if not (np.all(np.isfinite(w_s)) and np.all(w_s > 0) and np.isfinite(s_x[0]) and s_x[0] > 0):
            raise ValueError(f"{path}: the scales of {key!r} must be finite and > 0")
        records[key] = (value, w_s.astype(np.float32), np.float32(s_x[0]))
        params[key] = value.astype(np.float32) * w_s.astype(np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
    orphans = sorted(k for k in scale_keys if k.rsplit(".", 1)[0] + ".weight" not in records)
    if orphans:
        raise ValueError(f"{path}: scales without an int8 weight: {orphans[:4]}")
    return params, records


def attach_quantized(model, records: dict) -> None:
    """Give an opened model its int8 layers from :func:`split_quantized`'s host records."""
    b = model.backend
    _install(model, {k: Int8Weight(b.asarray(q), b.asarray(s), b.asarray(x)) for k, (q, s, x) in records.items()})

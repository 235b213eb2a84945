"""Pretrained weights: read checkpoint files safely, resample position embeddings, build a model.

Files are recognised by their first bytes, not their names:

- ``.safetensors`` (8-byte header length, then a JSON header) and ``.npz`` (a zip of
  ``.npy``, ``allow_pickle=False``): :func:`tinyvit.training.checkpoint.load_arrays`, which also
  checks the checksum of files tinyvit wrote. bfloat16 safetensors are widened to float32
  through PyTorch when it is installed.
- ``.pth`` / ``.pt`` / ``.bin`` (a zip holding ``data.pkl``, or PyTorch's legacy format):
  ``torch.load(weights_only=True)``, which refuses arbitrary classes. Needs PyTorch.

Nothing is ever unpickled with code execution allowed. A missing, truncated or foreign
file raises ``ValueError``/``FileNotFoundError`` naming the file and what is wrong.

:func:`load_pretrained` is the one-call path: file -> layout (timm / torchvision /
Hugging Face, :mod:`tinyvit.pretrained.convert`) -> config inferred from shapes -> position
embeddings resampled if another image size is asked for -> :class:`VisionTransformer`.
:func:`save_state_dict` writes ``.safetensors`` or ``.npz`` atomically (a temp file in
the same folder, then ``os.replace``, by :mod:`tinyvit.training.checkpoint`); :func:`export_pretrained` writes a model in timm's
(or torchvision's, Hugging Face's) layout.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from typing import NamedTuple

import numpy as np

from .convert import from_tinyvit, infer_config, to_tinyvit

WEIGHT_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin", "model.npz", "model.pth")
TORCH_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")


# ------------------------------------------------------------------ reading files
def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if os.path.isdir(path):
        for name in WEIGHT_FILES_IN_DIR:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ValueError(f"{path!r} is a directory without any of {WEIGHT_FILES_IN_DIR}; pass the weights file")
    return path


def sniff_format(path: str) -> str:
    """``"safetensors"``, ``"npz"`` or ``"torch"`` from the file's first bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        raise ValueError(f"{path!r} is empty (0 bytes): not a weights file")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"{path!r} looks like a zip archive (.npz or .pth) but cannot be read: {exc}; "
                             f"is it truncated?") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise ValueError(f"{path!r} is a zip archive but neither an .npz (only .npy members) nor a PyTorch "
                         f"checkpoint (a data.pkl member); members: {names[:5]}")
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > size:
            raise ValueError(f"{path!r}: safetensors header says {header_len} bytes but the file has {size}; "
                             f"it is truncated")
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker: PyTorch's legacy (non-zip) format
        return "torch"
    raise ValueError(f"{path!r} is not a weights file tinyvit reads: expected .safetensors (a JSON header), "
                     f".npz or a PyTorch .pth/.bin (zip); the first bytes are {head[:8]!r}")


def read_state_dict(path) -> dict:
    """``{key: NumPy array}`` from a ``.safetensors``, ``.npz`` or PyTorch file (see the module doc).

    A directory is searched for ``model.safetensors`` / ``pytorch_model.bin`` / ...
    (a Hugging Face ``save_pretrained`` folder).
    """
    path = _check_path(path)
    kind = sniff_format(path)
    reader = _read_torch if kind == "torch" else _read_arrays
    sd = reader(path)
    if not sd:
        raise ValueError(f"{path!r} holds no tensors")
    return sd


def _read_arrays(path: str) -> dict:
    """``.safetensors`` / ``.npz`` through :func:`tinyvit.training.checkpoint.load_arrays` (checksums, clear errors)."""
    from ..training.checkpoint import UnreadableDtype, load_arrays

    try:
        return load_arrays(path)
    except UnreadableDtype as exc:
        if exc.dtypes != {"BF16"}:
            raise
    return _read_bf16_safetensors(path)


def _read_bf16_safetensors(path: str) -> dict:
    """NumPy has no bfloat16: read through PyTorch and widen to float32."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"{path!r} holds bfloat16 tensors, which NumPy cannot hold; install PyTorch "
                         f"(tinyvit then widens them to float32) or save the file as float32") from None
    from .convert import as_numpy

    return {k: as_numpy(v, k) for k, v in load_file(path).items()}


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{path!r} is a PyTorch checkpoint; reading it needs PyTorch (pip install torch), "
                           f"or convert it to .safetensors elsewhere") from None
    from ..training.checkpoint import MAX_FILE_BYTES

    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise ValueError(f"{path!r}: {os.path.getsize(path):,} bytes, over the limit of {MAX_FILE_BYTES:,} "
                         f"(TINYVIT_MAX_FILE_BYTES)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "unsupported" in line]
        raise ValueError(f"{path!r} holds objects other than tensors, so torch.load(weights_only=True) refused "
                         f"it{' (' + why[0] + ')' if why else ''}; tinyvit never loads with pickle allowed") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({first}); is it truncated?") from None
    return _unwrap_torch(obj, path)


def _unwrap_torch(obj, path: str) -> dict:
    """A state dict, or a training checkpoint holding one under ``model`` / ``state_dict`` / ..."""
    import torch

    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    is_sd = lambda d: bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())  # noqa: E731
    if not is_sd(obj):
        for key in TORCH_WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and is_sd(obj[key]):
                obj = obj[key]
                break
        else:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
            raise ValueError(f"{path!r} is not a state dict: entries {bad} are not tensors, and none of "
                             f"{TORCH_WRAPPER_KEYS} holds one")
    from .convert import as_numpy

    return {k: as_numpy(v, k) for k, v in obj.items()}


# ------------------------------------------------------------------ writing files
def save_state_dict(path, state_dict: dict, metadata: dict | None = None) -> None:
    """Write ``{key: array}`` as ``.safetensors`` or ``.npz`` (by the suffix), atomically, with a
    checksum (:func:`tinyvit.training.checkpoint.save_arrays`). Non-finite weights are refused."""
    from ..training.checkpoint import save_arrays

    for key, value in state_dict.items():
        a = np.asarray(value)
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{key}: holds non-finite values; refusing to save")
    save_arrays(path, dict(state_dict), metadata)


# ------------------------------------------------------------------ position embeddings
def _cubic(x, a):
    """Keys' cubic convolution kernel with parameter ``a`` (torch: -0.75; PIL / antialias: -0.5)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| <= 1
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a  # 1 < |x| < 2
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_weights(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix ``M`` with ``resized = M @ signal`` along one axis.

    Matches ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``:

    - ``antialias=False``: source position ``s = (i + 0.5) * in/out - 0.5``; taps at
      ``floor(s) - 1 .. floor(s) + 2`` with the cubic kernel ``a = -0.75``; taps outside
      ``[0, in)`` are clamped to the edge sample (edge replication).
    - ``antialias=True`` (PIL's filter, timm's default): kernel ``a = -0.5`` stretched by
      ``scale = in/out`` when shrinking; taps outside ``[0, in)`` are dropped and the row
      renormalised to sum to 1.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size))
    if not antialias:
        for i in range(out_size):
            s = (i + 0.5) * scale - 0.5
            x0 = math.floor(s)
            t = s - x0
            taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for k, w in zip(range(x0 - 1, x0 + 3), taps):
                m[i, min(max(k, 0), in_size - 1)] += w
        return m
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
        m[i, lo:hi] = taps / taps.sum()
    return m


def resample_pos_embed(pos_embed, new_grid, old_grid=None, num_prefix_tokens: int = 1,
                       antialias: bool = True) -> np.ndarray:
    """Bicubic resampling of a learned position embedding to another patch grid.

    ``pos_embed: (1, T + gh*gw, D) -> (1, T + new_gh*new_gw, D)``; the ``T`` prefix rows
    (class token, distillation token) are kept as they are. ``old_grid`` defaults to a
    square grid. The default ``antialias=True`` is timm's ``resample_abs_pos_embed``;
    ``antialias=False`` is Hugging Face's ``interpolate_pos_encoding`` kernel (the two
    differ at the grid's border even when enlarging). Computed on the host in float64,
    returned in the input's dtype; it runs once at load time, never in a step.
    """
    pos = np.asarray(pos_embed)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, N, D), got {pos.shape}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    new_grid = _as_grid(new_grid, "new_grid")
    patches = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(patches, 0))
        if side * side != patches or side == 0:
            raise ValueError(f"pos_embed has {patches} patch rows, not a square grid; pass old_grid=(gh, gw)")
        old_grid = (side, side)
    old_grid = _as_grid(old_grid, "old_grid")
    if old_grid[0] * old_grid[1] != patches:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells but pos_embed has {patches} "
                         f"patch rows (after {num_prefix_tokens} prefix rows)")
    prefix, grid = pos[:, :num_prefix_tokens], pos[0, num_prefix_tokens:]  # (1, T, D), (gh*gw, D)
    if tuple(old_grid) == tuple(new_grid):
        return pos.copy()
    grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(np.float64)  # (gh, gw, D)
    rows = bicubic_weights(old_grid[0], new_grid[0], antialias)  # (new_gh, gh)
    cols = bicubic_weights(old_grid[1], new_grid[1], antialias)  # (new_gw, gw)
    out = np.einsum("ai,ijd,bj->abd", rows, grid, cols)  # (new_gh, new_gw, D)
    out = out.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos.dtype)  # (1, new_gh*new_gw, D)
    return np.concatenate([prefix, out], axis=1)  # (1, T + new_gh*new_gw, D)


def _as_grid(grid, name: str) -> tuple:
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (int(grid), int(grid))
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"{name} must be a positive int or (height, width) in patches, got {grid!r}")
    return int(grid[0]), int(grid[1])


# ------------------------------------------------------------------ the one-call path
class Checkpoint(NamedTuple):
    """A checkpoint read and converted, before a model is built from it."""

    state_dict: dict  # tinyvit keys (timm's), NumPy arrays
    layout: str  # "timm", "torchvision" or "hf"
    config: dict  # VisionTransformer kwargs
    notes: list  # defaults taken, resampling done (human-readable)
    labels: list | None  # class names from a Hugging Face config.json's id2label, if it has real ones
    preprocessing: object = None  # from timm's config.json or Hugging Face's preprocessor_config.json


def read_checkpoint(path, *, layout: str | None = None, heads: int | None = None, layer_norm_eps: float | None = None,
                    image_size=None, gelu: str | None = None, antialias: bool = True,
                    state_dict: dict | None = None, pool: str | None = None) -> Checkpoint:
    """Read ``path`` and convert it to tinyvit's keys and a config (see :func:`load_pretrained`);
    ``state_dict``: the file's arrays when the caller has read them already."""
    file = _check_path(path)
    raw = read_state_dict(file) if state_dict is None else state_dict
    sd, layout = to_tinyvit(raw, layout)
    side_config = _read_hf_config(file)
    hf_config = side_config if layout == "hf" else None
    timm_config = side_config if layout == "timm" and side_config and "architecture" in side_config else None
    config, notes = infer_config(sd, layout, heads=heads, layer_norm_eps=layer_norm_eps, image_size=image_size,
                                 gelu=gelu, hf_config=hf_config, pool=pool, timm_config=timm_config)
    if "pos_embed" in sd:
        prefix = 2 if config["distilled"] else 1
        patch = config["patch_size"]
        grid = (config["image_size"][0] // patch, config["image_size"][1] // patch)
        rows = sd["pos_embed"].shape[1] - prefix
        if rows != grid[0] * grid[1]:
            side = math.isqrt(rows)
            if side * side != rows:
                raise ValueError(f"pos_embed has {rows} patch rows, not a square grid, and image_size "
                                 f"{config['image_size']} needs {grid[0] * grid[1]}; cannot resample")
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, (side, side), prefix, antialias)
            notes.append(f"pos_embed resampled bicubic from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid "
                         f"(image {side * patch} -> {config['image_size'][0]}x{config['image_size'][1]})")
    labels = None
    if hf_config and isinstance(hf_config.get("id2label"), dict):
        names = hf_config["id2label"]
        if len(names) == config["num_classes"] and not all(str(v).startswith("LABEL_") for v in names.values()):
            labels = [str(names.get(str(i), names.get(i, f"class {i}"))) for i in range(config["num_classes"])]
    preprocessing = _side_preprocessing(file, layout, config, timm_config, notes)
    return Checkpoint(sd, layout, config, notes, labels, preprocessing)


def _side_preprocessing(weights_file: str, layout: str, config: dict, timm_config, notes: list):
    """The preprocessing a foreign model was trained with, when a file beside it says: timm's
    ``config.json`` (``pretrained_cfg``: mean, std, crop_pct, interpolation) or Hugging Face's
    ``preprocessor_config.json`` (size, image_mean, image_std, resample). ``None`` otherwise."""
    from .preprocess import Preprocessing

    size, channels = tuple(config["image_size"]), config["channels"]
    try:
        if timm_config and isinstance(timm_config.get("pretrained_cfg"), dict):
            cfg = timm_config["pretrained_cfg"]
            if "mean" in cfg and "std" in cfg and size[0] == size[1] and cfg.get("crop_mode", "center") == "center":
                pre = Preprocessing(size, channels, cfg["mean"], cfg["std"], "shorter_crop",
                                    float(cfg.get("crop_pct", 0.875)), "timm",
                                    cfg.get("interpolation", "bicubic") if cfg.get("interpolation", "bicubic")
                                    in ("bilinear", "bicubic", "nearest") else "bicubic")
                notes.append(f"preprocessing from config.json's pretrained_cfg ({pre.describe()})")
                return pre
        path = os.path.join(os.path.dirname(weights_file), "preprocessor_config.json")
        if layout == "hf" and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 2))
            if (isinstance(cfg, dict) and cfg.get("do_normalize", True) and cfg.get("do_resize", True) and resample
                    and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) < 1e-12 and "image_mean" in cfg):
                pre = Preprocessing(size, channels, cfg["image_mean"], cfg["image_std"], "stretch", name="hf",
                                    interpolation=resample)
                notes.append(f"preprocessing from preprocessor_config.json ({pre.describe()})")
                return pre
    except (OSError, ValueError, TypeError, KeyError) as exc:
        notes.append(f"preprocessing: the side config could not be used ({exc}); the layout's recipe applies")
    return None


def _read_hf_config(weights_file: str) -> dict | None:
    path = os.path.join(os.path.dirname(weights_file), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r} next to the weights is not valid JSON ({exc})") from None
    return cfg if isinstance(cfg, dict) else None


# ------------------------------------------------------------------ tinyvit's own files
EXPORT_FORMAT = "tinyvit-weights-1"
EXPORT_LAYOUTS = ("tinyvit", "timm", "torchvision", "hf")


class Loaded(NamedTuple):
    """What :func:`open_model` returns: the model and everything needed to use it right."""

    model: object  # VisionTransformer
    labels: list | None  # K class names, when the file knows them
    preprocessing: object  # a tinyvit.pretrained.preprocess.Preprocessing, or None (a foreign file)
    layout: str  # the key layout the file was written in
    kind: str  # "checkpoint" (tinyvit train), "export" (export_pretrained) or "foreign" (timm, torchvision, HF)
    notes: list  # what was inferred or changed, and where it came from ("loaded as" lines)
    meta: dict  # a tinyvit file's parsed metadata (train_config, data, ...); {} for a foreign file
    path: str


def _tinyvit_kind(metadata: dict) -> str | None:
    """``"checkpoint"``, ``"export"``, ``"int8"`` (tinyvit quantize) or ``None`` (a foreign file). Exports keep
    safetensors' own ``format: pt`` (Hugging Face's loader requires it) and say what they are in ``tinyvit.format``."""
    from ..quantize.ptq import FORMAT as INT8_FORMAT
    from ..training.checkpoint import FORMAT

    if metadata.get("format") == FORMAT:
        return "checkpoint"
    if metadata.get("format") == INT8_FORMAT:
        return "int8"
    if EXPORT_FORMAT in (metadata.get("tinyvit.format"), metadata.get("format")):
        return "export"
    return None


def _json_field(meta: dict, key: str, path: str, default=None):
    if key not in meta:
        return default
    value = meta[key]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{path}: metadata {key!r} is not JSON ({exc})") from None


def tinyvit_metadata(model, labels=None, preprocessing=None, data=None) -> dict:
    """The ``{str: str}`` metadata that lets :func:`load_pretrained` rebuild ``model`` exactly:
    the whole config, the dtype, the class names and the preprocessing (size, channels, mean/std)."""
    labels = getattr(model, "labels", None) if labels is None else labels
    preprocessing = getattr(model, "preprocessing", None) if preprocessing is None else preprocessing
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != model.config.num_classes:
            raise ValueError(f"{len(labels)} labels for a model of {model.config.num_classes} classes")
    if preprocessing is not None and hasattr(preprocessing, "to_dict"):
        preprocessing = preprocessing.to_dict()
    meta = {"model_config": json.dumps(model.config.to_dict()), "dtype": model.dtype,
            "labels": json.dumps(labels), "preprocessing": json.dumps(preprocessing)}
    if data is not None:
        meta["data"] = json.dumps(data)
    return meta


def _check_override(path: str, name: str, given, stored) -> None:
    if given is None:
        return
    same = math.isclose(float(given), float(stored), rel_tol=1e-12) if name == "layer_norm_eps" else given == stored
    if not same:
        raise ValueError(f"{path}: the file says {name}={stored!r} but {given!r} was passed; a tinyvit file "
                         f"carries its own config: leave the argument out")


def _open_tinyvit(path: str, arrays: dict, raw: dict, kind: str, *, layout, heads, layer_norm_eps, image_size, gelu,
                  antialias, backend, dtype, pool=None) -> Loaded:
    from ..model import ViTConfig, VisionTransformer
    from .preprocess import Preprocessing

    plain = ("format", "tinyvit.format", "dtype", "layout")
    meta = {k: _json_field(raw, k, path) for k in raw if k not in plain}
    meta.update({k: raw[k] for k in plain if k in raw})
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a tinyvit {kind} without a model_config in its metadata")
    try:
        config = ViTConfig(**config).to_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its model_config is not a valid ViT config ({exc})") from None
    stored_layout = meta.get("layout", "tinyvit") if kind == "export" else "tinyvit"
    if layout is not None and layout != stored_layout and not (layout == "timm" and stored_layout == "tinyvit"):
        raise ValueError(f"{path}: the file says layout={stored_layout!r} but {layout!r} was passed")
    for name, given in (("heads", heads), ("layer_norm_eps", layer_norm_eps), ("gelu", gelu), ("pool", pool)):
        _check_override(path, name, given, config[name])
    records = None
    if kind == "checkpoint":
        params = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    elif kind == "int8":  # tinyvit quantize: int8 linear layers with their scales (tinyvit/quantize/ptq.py)
        from ..quantize.ptq import split_quantized

        params, records = split_quantized(arrays, path)
    elif stored_layout in ("tinyvit", "timm"):
        params = dict(arrays)
    else:
        params = to_tinyvit(arrays, stored_layout)[0]
    notes = [f"every field from the file's metadata (a tinyvit {kind}): nothing inferred"]
    pre = meta.get("preprocessing")
    if pre is None and kind == "checkpoint" and isinstance(meta.get("extra"), dict) and "normalizer" in meta["extra"]:
        mean, std = meta["extra"]["normalizer"]  # checkpoints written before the preprocessing field
        pre = dict(image_size=config["image_size"], channels=config["channels"], mean=mean, std=std, name="trained")
    pre = None if pre is None else Preprocessing.from_dict(pre, f"{path}: preprocessing")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(size) != tuple(config["image_size"]):
            old = tuple(config["image_size"])
            try:
                new_config = ViTConfig(**dict(config, image_size=size))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"image_size {image_size!r}: {exc}") from None
            if "pos_embed" in params:
                patch, prefix = config["patch_size"], 2 if config["distilled"] else 1
                params["pos_embed"] = resample_pos_embed(params["pos_embed"], new_config.grid,
                                                         (old[0] // patch, old[1] // patch), prefix, antialias)
                notes.append(f"pos_embed resampled bicubic from a {old[0] // patch}x{old[1] // patch} to a "
                             f"{new_config.grid[0]}x{new_config.grid[1]} patch grid (image {old[0]}x{old[1]} -> "
                             f"{size[0]}x{size[1]})")
            config = new_config.to_dict()
            if pre is not None:
                pre = Preprocessing(**dict(pre.to_dict(), image_size=tuple(size)))
    model = VisionTransformer.from_config(config, backend=backend, dtype=dtype or meta.get("dtype") or "float32")
    try:
        model.load_state_dict(params)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if records is not None:
        from ..quantize.ptq import attach_quantized

        attach_quantized(model, records)
        model.quant_info = meta.get("quantization") or {}
        notes.append(f"int8 linear layers ({len(records)}: {model.quant_info.get('method', '?')} calibration); "
                     f"LayerNorm, softmax, GELU in float")
    labels = meta.get("labels")
    if labels is not None:
        if not (isinstance(labels, list) and len(labels) == config["num_classes"]):
            raise ValueError(f"{path}: metadata 'labels' must be a list of {config['num_classes']} names")
        labels = [str(v) for v in labels]
    model.labels, model.preprocessing = labels, pre
    return Loaded(model, labels, pre, stored_layout, kind, notes, meta, path)


def open_model(path, *, layout: str | None = None, heads: int | None = None, layer_norm_eps: float | None = None,
               image_size=None, gelu: str | None = None, antialias: bool = True, backend=None,
               dtype: str | None = None, pool: str | None = None) -> Loaded:
    """Open any weights file tinyvit reads -> :class:`Loaded` (model, labels, preprocessing, notes).

    The one place that opens a file for ``load_pretrained``, ``tinyvit predict``,
    ``attention`` and ``eval``:

    - a tinyvit file (a ``tinyvit train`` checkpoint or an :func:`export_pretrained` file,
      told apart by the ``format`` in its metadata) is rebuilt exactly from its metadata:
      config, dtype, class names, preprocessing. An explicit ``heads`` / ``layer_norm_eps``
      / ``gelu`` / ``layout`` that disagrees with the file is an error; ``image_size``
      resamples the position embedding.
    - a foreign file (timm, torchvision, Hugging Face) goes through :func:`read_checkpoint`:
      the config is inferred from the shapes and every field the shapes cannot decide is
      named in ``notes`` with where it came from.

    ``dtype`` defaults to the file's (tinyvit files) or float32.
    """
    from ..model import VisionTransformer
    from ..training.checkpoint import UnreadableDtype, load_arrays_and_metadata

    file = _check_path(path)
    if sniff_format(file) in ("safetensors", "npz"):
        try:
            arrays, raw = load_arrays_and_metadata(file)
        except UnreadableDtype as exc:
            if exc.dtypes != {"BF16"}:
                raise
            arrays, raw = None, {}
        kind = _tinyvit_kind(raw)
        if kind is not None:
            return _open_tinyvit(file, arrays, raw, kind, layout=layout, heads=heads, layer_norm_eps=layer_norm_eps,
                                 image_size=image_size, gelu=gelu, antialias=antialias, backend=backend, dtype=dtype,
                                 pool=pool)
    else:
        arrays = None
    ckpt = read_checkpoint(file, layout=layout, heads=heads, layer_norm_eps=layer_norm_eps, image_size=image_size,
                           gelu=gelu, antialias=antialias, state_dict=arrays or None, pool=pool)
    model = VisionTransformer(**ckpt.config, backend=backend, dtype=dtype or "float32")
    model.load_state_dict(ckpt.state_dict)
    model.labels, model.preprocessing = ckpt.labels, ckpt.preprocessing
    return Loaded(model, ckpt.labels, ckpt.preprocessing, ckpt.layout, "foreign", ckpt.notes, {}, file)


def load_pretrained(path, *, layout: str | None = None, heads: int | None = None, layer_norm_eps: float | None = None,
                    image_size=None, gelu: str | None = None, antialias: bool = True, backend=None,
                    dtype: str | None = None, pool: str | None = None):
    """A weights file -> a :class:`~tinyvit.VisionTransformer` (see :func:`open_model`).

    A tinyvit file (a training checkpoint or an export) is restored exactly with no
    arguments: its config, dtype, ``model.labels`` and ``model.preprocessing`` come from its
    metadata, and an argument that disagrees with them is an error. For a timm /
    torchvision / Hugging Face checkpoint, ``layout`` is detected from the keys and the
    config inferred from the shapes (:func:`tinyvit.pretrained.convert.infer_config`).
    ``image_size`` other than the file's resamples the position embedding
    (:func:`resample_pos_embed`, timm's antialiased bicubic unless ``antialias=False``).

    What the weights of a foreign file cannot decide (heads, eps, GELU form, pooling, the grid
    of a non-square image) is never taken in silence: the fields inferred and where each came
    from are logged as one ``loaded as ...`` warning on the ``tinyvit`` logger (and returned by
    :func:`open_model` as ``notes``); pass the argument to decide it.
    """
    loaded = open_model(path, layout=layout, heads=heads, layer_norm_eps=layer_norm_eps, image_size=image_size,
                        gelu=gelu, antialias=antialias, backend=backend, dtype=dtype, pool=pool)
    if loaded.kind == "foreign" and loaded.notes:
        import logging

        logging.getLogger("tinyvit").warning("%s", loaded_as(loaded))
    return loaded.model


def loaded_as(loaded) -> str:
    """One line: how the file was read, each inferred field with where it came from."""
    return f"{loaded.path}: loaded as " + "; ".join(loaded.notes)


def export_refusals(config, layout: str) -> list:
    """What ``layout``'s library cannot run of a model with ``config``: one phrase per feature
    (empty for ``"tinyvit"``, which holds every model tinyvit builds)."""
    c = config
    if layout == "tinyvit":
        return []
    lib = {"timm": "timm's VisionTransformer", "torchvision": "torchvision's VisionTransformer",
           "hf": "Hugging Face's ViTForImageClassification"}[layout]
    out = []
    if not c.norm_first:
        out.append(f"post-norm blocks (norm_first=False): {lib} is pre-norm only")
    if c.pos_embed != "learned":
        out.append(f"pos_embed={c.pos_embed!r}: {lib} has only a learned position embedding")
    if getattr(c, "attn_window", 0):
        out.append(f"windowed attention (attn_window={c.attn_window}): {lib} attends globally")
    if layout == "torchvision":
        if c.pool != "cls":
            out.append("mean pooling (pool='mean'): torchvision reads the class token only")
        if c.distilled:
            out.append("a distillation token (DeiT): torchvision has none")
        if c.gelu != "none":
            out.append(f"gelu={c.gelu!r}: torchvision's MLP uses the exact GELU")
        if not c.qkv_bias:
            out.append("qkv_bias=False: torchvision's attention always has biases")
        if c.channels != 3:
            out.append(f"{c.channels} input channels: torchvision's ViT reads 3")
        if c.image_size[0] != c.image_size[1]:
            out.append(f"a {c.image_size[0]}x{c.image_size[1]} image: torchvision's ViT takes square images")
    if layout == "hf" and c.pool != "cls":
        out.append("mean pooling (pool='mean'): Hugging Face's ViT and DeiT classifiers read the class token")
    return out


def hf_config_json(model, labels=None) -> dict:
    """The ``config.json`` Hugging Face's ``from_pretrained`` reads beside the weights (ViT or DeiT)."""
    c = model.config
    labels = labels if labels is not None else getattr(model, "labels", None)
    names = labels if labels is not None else [f"LABEL_{i}" for i in range(c.num_classes)]
    deit = c.distilled
    return {
        "architectures": ["DeiTForImageClassificationWithTeacher" if deit else "ViTForImageClassification"],
        "model_type": "deit" if deit else "vit", "hidden_size": c.dim, "num_hidden_layers": c.depth,
        "num_attention_heads": c.heads, "intermediate_size": c.mlp_dim,
        "hidden_act": "gelu" if c.gelu == "none" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": c.layer_norm_eps,
        "image_size": c.image_size[0] if c.image_size[0] == c.image_size[1] else list(c.image_size),
        "patch_size": c.patch_size, "num_channels": c.channels, "qkv_bias": c.qkv_bias, "encoder_stride": c.patch_size,
        "id2label": {str(i): str(n) for i, n in enumerate(names)},
        "label2id": {str(n): i for i, n in enumerate(names)},
    }


def export_pretrained(model, path, layout: str = "tinyvit", *, labels=None, preprocessing=None, data=None) -> None:
    """Write a model to ``.safetensors`` / ``.npz`` in ``layout``'s key names, with its architecture.

    Every layout carries tinyvit's metadata (the whole config, dtype, class names,
    preprocessing), so :func:`load_pretrained` restores the file exactly. ``"tinyvit"`` (the
    default) writes timm's key names and holds every model tinyvit builds; ``"timm"``,
    ``"torchvision"`` and ``"hf"`` write what that library's model loads, and refuse with a
    ``ValueError`` naming each feature the library cannot run (:func:`export_refusals`:
    post-norm, mean pooling where the library has none, fixed or rotary positions, ...).
    ``"hf"`` also writes a ``config.json`` beside the file, as ``save_pretrained`` does, so
    ``ViTForImageClassification.from_pretrained(folder)`` runs it. ``labels`` /
    ``preprocessing`` default to ``model.labels`` / ``model.preprocessing``.
    """
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"export_pretrained needs a VisionTransformer (its config goes into the file), got "
                        f"{type(model).__name__}; to write a bare state dict use save_state_dict")
    refused = export_refusals(model.config, layout)
    if refused:
        raise ValueError(f"cannot export to the {layout} layout: " + "; ".join(refused)
                         + ". layout='tinyvit' (timm's keys + the config) holds this model")
    sd = model.state_dict()
    meta = tinyvit_metadata(model, labels, preprocessing, data)
    meta.update({"format": "pt", "tinyvit.format": EXPORT_FORMAT, "layout": layout})
    if layout == "hf" and not os.fspath(path).endswith(".safetensors"):
        raise ValueError(f"{os.fspath(path)}: the hf layout is a .safetensors file (Hugging Face reads "
                         f"model.safetensors beside config.json)")
    save_state_dict(path, sd if layout in ("tinyvit", "timm") else from_tinyvit(sd, layout), meta)
    if layout == "hf":
        from ..training.checkpoint import atomic_write

        config = hf_config_json(model, labels)
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        atomic_write(os.path.join(folder, "config.json"), (json.dumps(config, indent=2) + "\n").encode())

"""State-dict layouts of the ViT libraries people use, mapped onto tinyvit's keys and back.

tinyvit's parameter names *are* timm's ``VisionTransformer`` names (``cls_token``,
``pos_embed``, ``patch_embed.proj.weight``, ``blocks.{i}.attn.qkv.weight`` ...), so a
timm state dict loads as it is. Two other layouts are renamed here:

``torchvision`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ...)::

    conv_proj.{weight,bias}                                 -> patch_embed.proj.*
    class_token (1, 1, D)                                   -> cls_token
    encoder.pos_embedding (1, N, D)                         -> pos_embed
    encoder.layers.encoder_layer_{i}.ln_1.*                 -> blocks.{i}.norm1.*
        .self_attention.in_proj_{weight,bias} (3D, D)       -> blocks.{i}.attn.qkv.*  (same q;k;v row order)
        .self_attention.out_proj.*                          -> blocks.{i}.attn.proj.*
        .ln_2.*                                             -> blocks.{i}.norm2.*
        .mlp.0.* / .mlp.3.*  (older: mlp.linear_1 / _2)     -> blocks.{i}.mlp.fc1.* / fc2.*
    encoder.ln.*                                            -> norm.*
    heads.head.*                                            -> head.*

``hf`` (Hugging Face ``ViTForImageClassification``; ``DeiTForImageClassificationWithTeacher``
with the ``deit.`` prefix and two classifiers)::

    vit.embeddings.cls_token / .position_embeddings         -> cls_token / pos_embed
    vit.embeddings.patch_embeddings.projection.*            -> patch_embed.proj.*
    vit.encoder.layer.{i}.layernorm_before.*                -> blocks.{i}.norm1.*
        .attention.attention.{query,key,value}.* (D, D)     -> blocks.{i}.attn.qkv.*  (stacked q;k;v)
        .attention.output.dense.*                           -> blocks.{i}.attn.proj.*
        .layernorm_after.*                                  -> blocks.{i}.norm2.*
        .intermediate.dense.* / .output.dense.*             -> blocks.{i}.mlp.fc1.* / fc2.*
    vit.layernorm.*                                         -> norm.*
    classifier.*                                            -> head.*

transformers 5 keeps the same tensors in memory under ``vit.layers.{i}.attention.{q,k,v,o}_proj``
and ``.mlp.fc{1,2}``; those names are read too. Files written by ``save_pretrained`` (and
every checkpoint on the hub) use the names above, which is what :func:`from_tinyvit` writes.

Every library stacks the fused projection as rows ``[q; k; v]`` and splits heads as
contiguous blocks of ``hs`` rows, so the fusion is a plain concatenation, no permutation.

What the shapes cannot tell (the number of heads, LayerNorm's eps, the GELU form) comes
from arguments, with the defaults of :func:`infer_config`.
"""
from __future__ import annotations

import math
import re

import numpy as np

LAYOUTS = ("timm", "torchvision", "hf")

# Per-layout LayerNorm eps: timm and torchvision build ViTs with 1e-6; Hugging Face's
# ViTConfig defaults to 1e-12 (its released checkpoints say 1e-12 in config.json).
DEFAULT_EPS = {"timm": 1e-6, "torchvision": 1e-6, "hf": 1e-12}

# Heads of the standard sizes (Ti/S/B/L/H): width D -> NH. Shapes do not fix NH.
DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# ------------------------------------------------------------------ key tables
# Block-level tables map a key *inside* one block to tinyvit's key inside ``blocks.{i}.``.
TORCHVISION_TOP = {
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "class_token": "cls_token",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}
TORCHVISION_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
}
TORCHVISION_BLOCK_ALIASES = {  # torchvision < 0.13 named the MLP's linears
    "mlp.linear_1.weight": "mlp.fc1.weight",
    "mlp.linear_1.bias": "mlp.fc1.bias",
    "mlp.linear_2.weight": "mlp.fc2.weight",
    "mlp.linear_2.bias": "mlp.fc2.bias",
}
TORCHVISION_BLOCK_RE = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")

HF_TOP = {  # without the model prefix ("vit." / "deit."); classifiers have none
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
HF_HEADS = {
    "classifier.weight": "head.weight",  # ViTForImageClassification
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",  # DeiTForImageClassificationWithTeacher
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
}
HF_BLOCK = {  # q/k/v map to (fused key, part): part 0, 1, 2 = rows [0:D], [D:2D], [2D:3D]
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.attention.query.weight": ("attn.qkv.weight", 0),
    "attention.attention.query.bias": ("attn.qkv.bias", 0),
    "attention.attention.key.weight": ("attn.qkv.weight", 1),
    "attention.attention.key.bias": ("attn.qkv.bias", 1),
    "attention.attention.value.weight": ("attn.qkv.weight", 2),
    "attention.attention.value.bias": ("attn.qkv.bias", 2),
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
HF5_BLOCK = {  # transformers 5's in-memory names (vit.layers.{i}.*)
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.q_proj.weight": ("attn.qkv.weight", 0),
    "attention.q_proj.bias": ("attn.qkv.bias", 0),
    "attention.k_proj.weight": ("attn.qkv.weight", 1),
    "attention.k_proj.bias": ("attn.qkv.bias", 1),
    "attention.v_proj.weight": ("attn.qkv.weight", 2),
    "attention.v_proj.bias": ("attn.qkv.bias", 2),
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
HF_PREFIXES = ("vit.", "deit.", "")
HF_BLOCK_RE = re.compile(r"^(?:vit\.|deit\.)?encoder\.layer\.(\d+)\.(.+)$")
HF5_BLOCK_RE = re.compile(r"^(?:vit\.|deit\.)?layers\.(\d+)\.(.+)$")
HF_IGNORED_RE = re.compile(r"^(?:vit\.|deit\.)?(?:pooler\.|embeddings\.mask_token$)")  # unused by classification

TIMM_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
TIMM_TOP = ("cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias",
            "head_dist.weight", "head_dist.bias")
TIMM_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias")

# What each layout's features mean when tinyvit cannot run them, for the error message.
UNSUPPORTED_HINTS = {
    "ls1.gamma": "LayerScale (timm init_values)", "ls2.gamma": "LayerScale (timm init_values)",
    "reg_token": "register tokens", "norm_pre": "a pre-norm before the blocks (CLIP-style)",
    "q_norm": "QK-norm", "k_norm": "QK-norm", "attn_pool": "attention pooling (MAP head)",
    "pre_logits": "a pre-logits layer (representation_size)", "head.fc": "a multi-layer head",
    "conv_proj.conv_": "a convolutional stem", "lambda1": "differential attention",
}


# ------------------------------------------------------------------ helpers
def as_numpy(value, key: str = "") -> np.ndarray:
    """A tensor-like (NumPy, torch, anything with ``__array__``) -> a host NumPy array.

    torch tensors are detached and moved to the CPU; bfloat16 (which NumPy lacks) is
    widened to float32. Raises ``TypeError`` naming ``key`` for anything else.
    """
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        import torch  # only reached when the caller already holds torch tensors

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{key or 'value'}: cannot read {type(value).__name__} as an array ({exc})") from None


def _strip_wrappers(state_dict: dict) -> dict:
    """Drop the ``module.`` prefix DDP/DataParallel adds to every key."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(keys) -> str:
    """``"timm"``, ``"torchvision"`` or ``"hf"`` from the state dict's keys.

    Raises ``ValueError`` with a few of the keys when none fits (for example the
    original JAX/big_vision ``.npz`` names, which need timm's own loader).
    """
    keys = list(keys)
    if not keys:
        raise ValueError("the state dict is empty: no weights to convert")
    has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
    if has(r"^encoder\.layers\.encoder_layer_\d+\.") or "class_token" in keys or "conv_proj.weight" in keys:
        return "torchvision"
    if has(r"^(?:vit\.|deit\.)?(?:encoder\.layer|layers)\.\d+\.(?:attention|layernorm_before)") or has(
            r"^(?:vit\.|deit\.)?embeddings\.(?:cls_token|patch_embeddings)"):
        return "hf"
    if has(r"^blocks\.\d+\.") or "patch_embed.proj.weight" in keys:
        return "timm"
    sample = ", ".join(keys[:6])
    if has(r"^Transformer/encoderblock_\d+/") or has(r"^Transformer/"):
        raise ValueError("these are the original JAX (big_vision) checkpoint names, which tinyvit does not read; "
                         "load the file with timm (timm.create_model(..., pretrained_cfg_overlay=dict(file=...))) "
                         f"and save its state_dict. First keys: {sample}")
    raise ValueError(f"cannot tell the layout of this state dict: it has neither timm's 'blocks.0.*', "
                     f"torchvision's 'encoder.layers.encoder_layer_0.*' nor Hugging Face's "
                     f"'vit.encoder.layer.0.*' keys. First keys: {sample}")


def _unsupported(keys: list) -> str:
    hints = sorted({hint for k in keys for part, hint in UNSUPPORTED_HINTS.items() if part in k})
    return (f"keys tinyvit has no place for{' (' + '; '.join(hints) + ')' if hints else ''}: "
            f"{keys[:8]}{' ...' if len(keys) > 8 else ''}")


# ------------------------------------------------------------------ to tinyvit
def to_tinyvit(state_dict: dict, layout: str | None = None) -> tuple:
    """``{library key: tensor}`` -> ``({tinyvit key: NumPy array}, layout)``.

    ``layout`` is detected from the keys when ``None``. Values become host NumPy
    arrays (torch tensors included); shapes are kept, q/k/v are stacked into qkv.
    Raises one ``ValueError`` listing every key that has no place in tinyvit.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of arrays, got {type(state_dict).__name__}")
    state_dict = _strip_wrappers(state_dict)
    layout = detect_layout(state_dict) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rename = {"timm": _timm_name, "torchvision": _torchvision_name, "hf": _hf_name}[layout]
    out, parts, unknown = {}, {}, []
    for key, value in state_dict.items():
        name = rename(key)
        if name is None:
            unknown.append(key)
        elif name == "":
            continue  # known and unused (Hugging Face's pooler)
        elif isinstance(name, tuple):
            parts.setdefault(name[0], {})[name[1]] = as_numpy(value, key)
        else:
            out[name] = as_numpy(value, key)
    if unknown:
        raise ValueError(f"{layout} state dict does not fit tinyvit's ViT; {_unsupported(unknown)}")
    for name, pieces in parts.items():
        if sorted(pieces) != [0, 1, 2]:
            missing = [("query", "key", "value")[i] for i in range(3) if i not in pieces]
            raise ValueError(f"{name}: the {'/'.join(missing)} projection is missing from the {layout} state dict")
        out[name] = np.concatenate([pieces[0], pieces[1], pieces[2]], axis=0)  # (3D, D) or (3D,)
    return _sorted_like_timm(out), layout


def _timm_name(key: str):
    if key in TIMM_TOP:
        return key
    m = TIMM_BLOCK_RE.match(key)
    if m and m.group(2) in TIMM_BLOCK:
        return key
    return None


def _torchvision_name(key: str):
    if key in TORCHVISION_TOP:
        return TORCHVISION_TOP[key]
    m = TORCHVISION_BLOCK_RE.match(key)
    if m:
        inner = TORCHVISION_BLOCK.get(m.group(2)) or TORCHVISION_BLOCK_ALIASES.get(m.group(2))
        if inner:
            return f"blocks.{m.group(1)}.{inner}"
    return None


def _hf_name(key: str):
    if HF_IGNORED_RE.match(key):
        return ""
    if key in HF_HEADS:
        return HF_HEADS[key]
    for prefix in HF_PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] in HF_TOP:
            return HF_TOP[key[len(prefix):]]
    for pattern, table in ((HF_BLOCK_RE, HF_BLOCK), (HF5_BLOCK_RE, HF5_BLOCK)):
        m = pattern.match(key)
        if m and m.group(2) in table:
            inner = table[m.group(2)]
            if isinstance(inner, tuple):
                return (f"blocks.{m.group(1)}.{inner[0]}", inner[1])
            return f"blocks.{m.group(1)}.{inner}"
    return None


def _sorted_like_timm(sd: dict) -> dict:
    """Order keys as timm's state_dict does (top keys, blocks by index, norm, heads)."""
    def rank(key):
        m = TIMM_BLOCK_RE.match(key)
        if m:
            return (1, int(m.group(1)), TIMM_BLOCK.index(m.group(2)) if m.group(2) in TIMM_BLOCK else 99)
        top = TIMM_TOP.index(key) if key in TIMM_TOP else 99
        return (0 if top < TIMM_TOP.index("norm.weight") else 2, top, 0)
    return {k: sd[k] for k in sorted(sd, key=rank)}


# ------------------------------------------------------------------ from tinyvit
def from_tinyvit(state_dict: dict, layout: str = "timm") -> dict:
    """tinyvit's ``{key: array}`` -> the same tensors under ``layout``'s names.

    ``"timm"`` is the identity (tinyvit's names are timm's); ``"torchvision"`` and
    ``"hf"`` invert the tables above (Hugging Face: the hub-file names, with the
    ``vit.`` prefix, or ``deit.`` for a distilled model; qkv is split into q, k, v).
    Raises ``ValueError`` for a key the layout has no name for (e.g. torchvision has
    no distillation token and no mean-pool norm).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = {k: as_numpy(v, k) for k, v in state_dict.items()}
    if layout == "timm":
        return dict(sd)
    if layout == "torchvision":
        top = {v: k for k, v in TORCHVISION_TOP.items()}
        block = {v: k for k, v in TORCHVISION_BLOCK.items()}
        block_name = lambda i, inner: f"encoder.layers.encoder_layer_{i}.{block[inner]}"  # noqa: E731
        splits = {}
    else:
        prefix = "deit." if "dist_token" in sd else "vit."
        heads = {"head.weight": "classifier.weight", "head.bias": "classifier.bias"}
        if "dist_token" in sd:
            heads = {v: k for k, v in HF_HEADS.items() if k.startswith(("cls_", "distillation_"))}
        top = {v: prefix + k for k, v in HF_TOP.items()} | heads
        block = {v: k for k, v in HF_BLOCK.items() if isinstance(v, str)}
        block_name = lambda i, inner: f"{prefix}encoder.layer.{i}.{block[inner]}"  # noqa: E731
        splits = {"attn.qkv.weight": "weight", "attn.qkv.bias": "bias"}
    out, unknown = {}, []
    for key, value in sd.items():
        m = TIMM_BLOCK_RE.match(key)
        if m is None:
            if key in top:
                out[top[key]] = value
            else:
                unknown.append(key)
            continue
        i, inner = m.group(1), m.group(2)
        if inner in splits:
            dim = value.shape[0] // 3
            for part, (start, stop) in zip(("query", "key", "value"), ((0, dim), (dim, 2 * dim), (2 * dim, 3 * dim))):
                out[f"{prefix}encoder.layer.{i}.attention.attention.{part}.{splits[inner]}"] = value[start:stop]
        elif inner in block:
            out[block_name(i, inner)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"the {layout} layout has no name for: {unknown}")
    return out


def to_timm(state_dict: dict, layout: str | None = None) -> dict:
    """Any supported layout -> timm's names (which are tinyvit's)."""
    return to_tinyvit(state_dict, layout)[0]


# ------------------------------------------------------------------ config from shapes
def _perfect_square(n: int) -> int | None:
    r = math.isqrt(n) if n > 0 else 0
    return r if r * r == n and r > 0 else None


def _pool(state_dict: dict, layout: str, pool, timm_config: dict) -> tuple:
    """``(pool, note)``; renames ``fc_norm`` to ``norm`` in ``state_dict`` for timm's token + fc_norm."""
    has_fc_norm = "fc_norm.weight" in state_dict
    source = "argument"
    if pool is None and "global_pool" in timm_config:
        gp = timm_config["global_pool"]
        table = {"token": "cls", "avg": "mean", "": "cls"}
        if gp not in table:
            raise ValueError(f"timm's config.json says global_pool={gp!r}, a pooling tinyvit does not have "
                             f"(it has the class token and the mean of the patch tokens)")
        pool, source = table[gp], f"config.json (global_pool={gp!r})"
    if pool is not None and pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r} (timm's 'max', 'avgmax' and 'map' are poolings "
                         f"tinyvit does not have)")
    if pool is None:
        pool = "mean" if has_fc_norm else "cls"
        how = ("fc_norm.* present: timm's global_pool='avg'" if has_fc_norm else "norm.* without fc_norm.*: the class "
               "token")
        return pool, (f"pool={pool}: {how}, a guess (timm's global_pool='token' with fc_norm=True has the same keys: "
                      f"pass pool='cls' / --pool cls)" if has_fc_norm else
                      f"pool={pool}: {how}, a guess (timm's global_pool='avg' with fc_norm=False has the same keys "
                      f"and is a pooling tinyvit does not have)")
    if pool == "cls" and has_fc_norm:
        if "norm.weight" in state_dict:
            raise ValueError("the state dict has both norm.* and fc_norm.*: a class-token model with two final norms "
                             "is not one tinyvit builds")
        state_dict["norm.weight"] = state_dict.pop("fc_norm.weight")
        state_dict["norm.bias"] = state_dict.pop("fc_norm.bias")
        return pool, (f"pool=cls from {source}: timm's global_pool='token' with fc_norm=True (fc_norm on the class "
                      f"token = tinyvit's norm)")
    if pool == "mean" and not has_fc_norm:
        raise ValueError(f"pool='mean' ({source}) without fc_norm.*: timm's global_pool='avg' with fc_norm=False (the "
                         f"final norm on every token, then the mean) is a pooling tinyvit does not have")
    return pool, f"pool={pool} from {source}"


def infer_config(state_dict: dict, layout: str = "timm", *, heads: int | None = None,
                 layer_norm_eps: float | None = None, image_size=None, gelu: str | None = None,
                 hf_config: dict | None = None, pool: str | None = None, timm_config: dict | None = None) -> tuple:
    """tinyvit-keyed ``state_dict`` -> ``(VisionTransformer kwargs, notes)``.

    From the shapes: ``dim`` (D), ``patch_size`` (P) and ``channels`` (C) of the patch
    projection ``(D, C, P, P)``, ``depth`` (count of blocks), ``mlp_dim`` (F, fc1's rows),
    ``num_classes`` (K, head's rows), ``qkv_bias``, ``distilled``, ``pool``
    (``fc_norm`` means mean pooling) and the image size from the position embedding's
    patch grid ``(1, T + Np, D)`` when ``Np`` is a square.

    Asked for (shapes cannot tell): ``heads`` (default :data:`DEFAULT_HEADS` by width;
    any other width needs the argument), ``layer_norm_eps`` (default
    :data:`DEFAULT_EPS` by layout), ``gelu`` (``"none"`` = exact erf); a non-square
    grid needs ``image_size``. ``hf_config`` (a Hugging Face ``config.json`` dict)
    supplies heads, eps and the activation when given. Arguments win over both.

    Pooling: ``fc_norm.*`` reads as mean pooling (timm's ``global_pool='avg'``), ``norm.*``
    alone as the class token; ``pool="cls"`` with ``fc_norm.*`` is timm's ``global_pool='token'``
    with ``fc_norm=True`` (the same LayerNorm on the class token: loaded as tinyvit's ``norm``).
    timm's ``config.json`` (``timm_config``) says ``global_pool``. Poolings tinyvit lacks
    (``'max'``, ``'avgmax'``, ``'map'``, the mean of normed tokens of ``'avg'`` without
    ``fc_norm``) are errors.

    Returns the kwargs plus ``notes``: every field the weights could not decide, with its value
    and where it came from (an argument, a config.json, or a default: a guess).
    """
    notes = []
    required = ("cls_token", "patch_embed.proj.weight", "head.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        hint = " (a headless backbone: tinyvit needs a classification head)" if "head.weight" in missing else ""
        raise ValueError(f"cannot infer the ViT config: missing {missing}{hint}")
    w = state_dict["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight must be (D, C, P, P) with square patches, got {tuple(w.shape)}")
    dim, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := TIMM_BLOCK_RE.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"blocks must be numbered 0..depth-1, found {blocks[:10]}")
    depth = len(blocks)
    mlp_dim = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    num_classes = int(state_dict["head.weight"].shape[0])
    distilled = "dist_token" in state_dict
    prefix_tokens = 2 if distilled else 1
    hf_config = hf_config or {}

    if heads is not None:
        notes.append(f"heads={heads} (argument)")
    if heads is None:
        heads = hf_config.get("num_attention_heads")
        if heads is not None:
            notes.append(f"heads={heads} from config.json")
    if heads is None:
        if dim not in DEFAULT_HEADS:
            raise ValueError(f"the number of heads cannot be read from the shapes; width D={dim} is not a standard "
                             f"size {sorted(DEFAULT_HEADS)}: pass heads= (--heads), a divisor of {dim}")
        heads = DEFAULT_HEADS[dim]
        notes.append(f"heads={heads}: the standard count for width {dim} (pass heads= if this checkpoint differs)")
    if layer_norm_eps is not None:
        notes.append(f"layer_norm_eps={layer_norm_eps:g} (argument)")
    if layer_norm_eps is None:
        layer_norm_eps = hf_config.get("layer_norm_eps")
        if layer_norm_eps is not None:
            notes.append(f"layer_norm_eps={layer_norm_eps} from config.json")
    if layer_norm_eps is None:
        layer_norm_eps = DEFAULT_EPS[layout]
        notes.append(f"layer_norm_eps={layer_norm_eps:g}: {layout}'s default, a guess (the weights cannot tell; "
                     f"pass layer_norm_eps= / --eps)")
    if gelu is not None:
        notes.append(f"gelu={gelu} (argument)")
    elif "hidden_act" in hf_config:
        act = hf_config["hidden_act"]
        table = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
        if act not in table:
            raise ValueError(f"config.json's hidden_act={act!r} is not a GELU tinyvit has; supported: {sorted(table)}")
        gelu = table[act]
        notes.append(f"gelu={'exact' if gelu == 'none' else gelu} from config.json (hidden_act={act!r})")
    else:
        gelu = "none"
        notes.append("gelu=exact: the libraries' default, a guess (the weights cannot tell; pass gelu='tanh' / "
                     "--gelu tanh for a tanh-GELU model)")
    pool, pool_note = _pool(state_dict, layout, pool, timm_config or {})
    notes.append(pool_note)

    pos = state_dict.get("pos_embed")
    grid = None
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < patch for s in size):
            raise ValueError(f"image_size must be an int or (height, width) of at least the patch size {patch}, "
                             f"got {image_size!r}")
        if size[0] % patch or size[1] % patch:
            near = [max(patch, round(s / patch) * patch) for s in size]
            raise ValueError(f"image_size {size[0]}x{size[1]} is not divisible by the checkpoint's patch size "
                             f"{patch}; the nearest valid size is {near[0]}x{near[1]}")
        grid = (size[0] // patch, size[1] // patch)
    if pos is None:
        if grid is None:
            raise ValueError("no pos_embed in the state dict: pass image_size=")
    else:
        tokens = int(pos.shape[1])
        native = _perfect_square(tokens - prefix_tokens)
        if native is None and grid is None:
            raise ValueError(f"pos_embed has {tokens} rows: {tokens} - {prefix_tokens} prefix tokens is not a square "
                             f"patch grid; pass image_size=(height, width)")
        if grid is None:
            notes.append(f"image {native * patch}x{native * patch}: the {tokens - prefix_tokens} patch positions read "
                         f"as a square {native}x{native} grid, a guess (pass image_size=(H, W) / --image-size for "
                         f"another shape)")
        grid = grid or (native, native)
    config = dict(image_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, num_classes=num_classes,
                  dim=dim, depth=depth, heads=int(heads), mlp_dim=mlp_dim, channels=channels,
                  layer_norm_eps=float(layer_norm_eps),
                  pool=pool, gelu=gelu, distilled=distilled,
                  qkv_bias="blocks.0.attn.qkv.bias" in state_dict)
    return config, notes

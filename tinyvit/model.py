"""The Vision Transformer: a flat script over the layers, forward top to bottom and
backward bottom to top.

Derivation: docs/model.md (the learners' tour: examples/04_forward_backward.py)

Shape letters (used in every docstring): ``B`` batch, ``C`` channels, ``H, W`` image,
``P`` patch, ``Np = (H/P)(W/P)`` patches, ``T`` prefix tokens (class token, plus the
distillation token in DeiT), ``N = T + Np`` tokens, ``D`` width, ``NH`` heads,
``hs = D / NH``, ``F`` MLP hidden width, ``K`` classes.

Data flow::

    x (B, C, H, W) -> patch_embed -> (B, Np, D) -> [cls, (dist)] + pos_embed -> (B, N, D)
      -> dropout -> blocks x depth -> (B, N, D)        (2D RoPE: no pos_embed; q, k turned in attention)
      -> pool="cls":  norm (every token) -> token 0 -> head -> logits (B, K)
         pool="mean": mean of patch tokens -> fc_norm -> head -> logits (B, K)

Parameters and gradients are plain dicts keyed as timm's ``VisionTransformer``
``state_dict`` (``blocks.{i}.attn.qkv.weight`` ...), so checkpoints map over by name
and comparing with PyTorch is a loop over keys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from .backend import Backend, array_module, check_dtype_name, get_backend, is_backend_array, to_host
from .layers.block import BLOCK_KEYS, WINDOW_KEYS, block_backward, block_forward
from .layers.dropout import dropout_backward, dropout_forward, patch_dropout_backward, patch_dropout_forward
from .layers.flash_attention import DEFAULT_BLOCK, check_block, flash_probabilities
from .layers.window_attention import WindowSpec, check_window, window_probabilities
from .layers.gelu import APPROXIMATIONS
from .layers.head import mean_pool_forward, pool_backward, token_pool_forward
from .layers.layernorm import layernorm_backward, layernorm_forward
from .layers.linear import linear_backward, linear_forward
from .layers.patch_embed import patch_embed_backward, patch_embed_forward
from .layers.precision import check_precision_supported
from .layers.quant import FakeQuantWeight
from .layers.rope import (DEFAULT_THETA, ROPE_KINDS, rope_angles_backward, rope_angles_forward, rope_axial_freqs,
                          rope_mixed_freqs, rope_positions)
from .layers.tome import (WeightedPoolCache, tome_max_r, tome_token_counts, weighted_mean_pool_backward,
                          weighted_mean_pool_forward)
from .layers.tokens import (add_pos_embed_backward, add_pos_embed_forward, fixed_pos_embed, prepend_tokens_backward,
                     prepend_tokens_forward)

POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos1d", "sincos2d") + ROPE_KINDS  # rope_*: 2D RoPE (layers/rope.py)
ATTN_IMPLS = ("plain", "flash")


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a float in [0, 1), got {value}")
    return float(value)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _nearest_multiple(size: int, patch: int) -> int:
    return max(patch, int(round(size / patch)) * patch)


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the architecture. Validated on construction."""

    image_size: tuple  # (H, W); an int means a square image
    patch_size: int  # P: side of a square patch; H and W must be multiples of it
    num_classes: int  # K: outputs of the head
    dim: int  # D: token width
    depth: int  # number of encoder blocks
    heads: int  # NH: attention heads; must divide dim
    mlp_dim: int  # F: hidden width of each block's MLP
    channels: int = 3  # C: image channels
    dropout: float = 0.0  # after the attention projection, inside the MLP (twice)
    emb_dropout: float = 0.0  # on the tokens after the position embedding
    attn_dropout: float = 0.0  # on the attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this over the blocks
    norm_first: bool = True  # pre-norm (ViT paper, timm) or post-norm (nn.TransformerEncoderLayer)
    pool: str = "cls"  # "cls": class token + norm; "mean": mean of patch tokens + fc_norm
    layer_norm_eps: float = 1e-6  # timm uses 1e-6; PyTorch's LayerNorm default is 1e-5
    gelu: str = "none"  # "none": exact erf GELU; "tanh": the tanh approximation
    pos_embed: str = "learned"  # "learned", fixed "sincos1d"/"sincos2d" tables, or 2D RoPE "rope_axial"/"rope_mixed"
    distilled: bool = False  # DeiT: a distillation token and a second head (head_dist)
    qkv_bias: bool = True  # bias on the fused qkv projection
    attn_impl: str = "plain"  # "plain": softmax(q k^T) kept for the backward; "flash": tiled, keeps O and L only
    attn_block: int = DEFAULT_BLOCK  # flash: the tile side (queries and keys), chosen by measurement
    rope_theta: float | None = None  # 2D RoPE frequency base; None: the paper's (100 axial, 10 mixed)
    attn_window: int = 0  # M > 0: patch tokens attend within M x M windows of the grid (Swin); 0: global
    attn_shift: bool = False  # windows shifted by M // 2 on every second block, with Swin's mask
    tome_r: int = 0  # ToMe: tokens merged in every block (0: none; docs/tome.md)
    patch_drop_rate: float = 0.0  # PatchDropout in training: this share of the patch tokens dropped (timm's rule)
    block_heads: tuple | None = None  # heads of each block after pruning (None: `heads` everywhere); hs stays D/NH
    rope_ref_grid: tuple | None = None  # 2D RoPE: scale patch coordinates to this (gh, gw) grid (a model trained
    #                                     there, read at a larger size: position interpolation); None: patch indices

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise TypeError(f"image_size must be an int or (height, width), got {self.image_size!r}")
        size = (_check_int("image_size[0]", size[0]), _check_int("image_size[1]", size[1]))
        object.__setattr__(self, "image_size", size)
        patch = _check_int("patch_size", self.patch_size)
        for label, value in zip(("height", "width"), size):
            if value % patch:
                raise ValueError(f"image {label} {value} is not divisible by patch_size {patch}; "
                                 f"the nearest valid {label} is {_nearest_multiple(value, patch)}")
        for name in ("num_classes", "dim", "depth", "heads", "mlp_dim", "channels"):
            _check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}); "
                             f"valid head counts for dim {self.dim}: "
                             f"{[h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]}")
        for name in ("dropout", "emb_dropout", "attn_dropout", "drop_path_rate", "patch_drop_rate"):
            _check_rate(name, getattr(self, name))
        for name in ("norm_first", "distilled", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_choice("pool", self.pool, POOLS)
        _check_choice("gelu", self.gelu, APPROXIMATIONS)
        _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        check_block(self.attn_block)
        if not isinstance(self.attn_shift, bool):
            raise TypeError(f"attn_shift must be True or False, got {self.attn_shift!r}")
        check_window(self.grid, self.attn_window, self.attn_shift)
        if self.attn_window and self.attn_impl == "flash":
            raise ValueError("attn_window and attn_impl='flash' do not combine: windowed attention already works "
                             "on small (M^2 + T)-key tiles; use attn_impl='plain' with attn_window")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"layer_norm_eps must be a finite float > 0, got {eps!r}")
        if self.distilled and self.pool != "cls":
            raise ValueError("distilled=True needs pool='cls' (the distillation head reads its own token)")
        _check_int("tome_r", self.tome_r, minimum=0)
        if self.tome_r:
            largest = tome_max_r(self.num_tokens, self.num_prefix_tokens, self.depth)
            if self.tome_r > largest:
                counts = [self.num_tokens] + tome_token_counts(self.num_tokens, self.tome_r, self.depth)
                block = next(i for i in range(self.depth)
                             if self.tome_r > (counts[i] - self.num_prefix_tokens) // 2)
                raise ValueError(
                    f"tome_r={self.tome_r} merges more than half of the tokens of block {block}, which sees "
                    f"{counts[block]} tokens ({self.num_prefix_tokens} prefix); the largest tome_r for this "
                    f"{self.depth}-block model with {self.num_tokens} tokens is {largest}")
        if self.block_heads is not None:
            heads = self.block_heads
            if not isinstance(heads, (tuple, list)) or len(heads) != self.depth:
                raise ValueError(f"block_heads must list the heads of each of the {self.depth} blocks, got {heads!r}")
            for i, h in enumerate(heads):
                if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 1 <= h <= self.heads:
                    raise ValueError(f"block_heads[{i}] must be an int in [1, heads={self.heads}] (a block keeps at "
                                     f"least one head), got {h!r}")
            object.__setattr__(self, "block_heads", tuple(int(h) for h in heads))
        if self.pos_embed == "sincos1d" and self.dim % 2:
            raise ValueError(f"pos_embed='sincos1d' needs an even dim, got {self.dim}")
        if self.pos_embed == "sincos2d" and self.dim % 4:
            raise ValueError(f"pos_embed='sincos2d' needs dim divisible by 4, got {self.dim}")
        if self.pos_embed in ROPE_KINDS:
            head_size = self.dim // self.heads
            if head_size % 4:
                raise ValueError(f"pos_embed={self.pos_embed!r} needs a head size (dim / heads) divisible by 4, "
                                 f"got {self.dim} / {self.heads} = {head_size}; valid head counts for dim "
                                 f"{self.dim}: {[h for h in range(1, self.dim + 1) if self.dim % (4 * h) == 0]}")
            theta = DEFAULT_THETA[self.pos_embed] if self.rope_theta is None else self.rope_theta
            if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
                    math.isfinite(theta) and theta > 0):
                raise ValueError(f"rope_theta must be a finite float > 0, got {theta!r}")
            object.__setattr__(self, "rope_theta", float(theta))
        elif self.rope_theta is not None:
            raise ValueError(f"rope_theta is for pos_embed='rope_axial' or 'rope_mixed', not {self.pos_embed!r}")
        if self.rope_ref_grid is not None:
            ref = self.rope_ref_grid
            if self.pos_embed not in ROPE_KINDS:
                raise ValueError(f"rope_ref_grid is for pos_embed='rope_axial' or 'rope_mixed', not {self.pos_embed!r}")
            if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
                ref = (ref, ref)
            if not (isinstance(ref, (tuple, list)) and len(ref) == 2):
                raise ValueError(f"rope_ref_grid must be a patch grid (rows, columns), got {self.rope_ref_grid!r}")
            object.__setattr__(self, "rope_ref_grid", (_check_int("rope_ref_grid[0]", ref[0]),
                                                       _check_int("rope_ref_grid[1]", ref[1])))
        if self.pos_embed in ROPE_KINDS:  # RoPE turns q and k by each patch's grid position
            for name, on, why in (("tome_r", self.tome_r, "a merged token has no one grid position"),
                                  ("block_heads", self.block_heads is not None and self.pos_embed == "rope_mixed",
                                   "rope.freqs has one row per head of every block")):
                if on:
                    raise ValueError(f"{name} is not supported with pos_embed={self.pos_embed!r} ({why}); "
                                     f"use a learned or sin-cos position embedding")
        if self.tome_r and self.attn_impl != "plain":
            raise ValueError(f"tome_r needs attn_impl='plain' (ToMe reads the keys and adds log(size) to the "
                             f"scores), got attn_impl={self.attn_impl!r}")
        if self.attn_window:  # windows are cut from the patch grid, one window's heads share one bias table
            for name, on in (("tome_r", self.tome_r), ("patch_drop_rate", self.patch_drop_rate),
                             ("block_heads", self.block_heads is not None)):
                if on:
                    raise ValueError(f"{name} is not supported with windowed attention (attn_window="
                                     f"{self.attn_window}): windows need every patch at its grid place"
                                     + (" and one bias column per head" if name == "block_heads" else ""))

    @property
    def grid(self) -> tuple:
        """(H/P, W/P): the patch grid."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def final_norm(self) -> str:
        """The state-dict name of the final LayerNorm: ``norm`` (cls pool) or ``fc_norm`` (mean pool)."""
        return "norm" if self.pool == "cls" else "fc_norm"

    def window_spec(self, block: int):
        """The :class:`WindowSpec` of block ``block`` (None for global attention); Swin shifts every second block."""
        if not self.attn_window:
            return None
        shift = self.attn_window // 2 if self.attn_shift and block % 2 == 1 else 0
        return WindowSpec(self.grid, self.num_prefix_tokens, self.attn_window, shift)

    def heads_of(self, block: int) -> int:
        """Heads of block ``block`` (fewer than ``heads`` after pruning)."""
        return self.heads if self.block_heads is None else self.block_heads[block]

    @property
    def head_size(self) -> int:
        """hs = D / NH, the same in every block (pruning removes heads, not head width)."""
        return self.dim // self.heads

    def token_counts(self) -> list:
        """Tokens entering the blocks and leaving each (ToMe: ``N, N - r, ..., N - depth r``; in evaluation)."""
        return [self.num_tokens] + tome_token_counts(self.num_tokens, self.tome_r, self.depth)

    def drop_path_rates(self) -> list:
        """Per-block stochastic-depth rates, linear from 0 to ``drop_path_rate`` (timm's rule)."""
        if self.depth == 1:
            return [0.0]
        return [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        if d["block_heads"] is not None:
            d["block_heads"] = list(d["block_heads"])
        if d["rope_ref_grid"] is not None:
            d["rope_ref_grid"] = list(d["rope_ref_grid"])
        return d


def param_shapes(config: ViTConfig) -> dict:
    """``{key: shape}`` in timm's state-dict order."""
    c = config
    shapes = {"cls_token": (1, 1, c.dim)}
    if c.distilled:
        shapes["dist_token"] = (1, 1, c.dim)
    if c.pos_embed == "learned":
        shapes["pos_embed"] = (1, c.num_tokens, c.dim)
    if c.pos_embed == "rope_mixed":  # timm's RotaryEmbeddingMixed layout: (x|y, block, head, pair)
        shapes["rope.freqs"] = (2, c.depth, c.heads, c.dim // c.heads // 2)
    shapes["patch_embed.proj.weight"] = (c.dim, c.channels, c.patch_size, c.patch_size)
    shapes["patch_embed.proj.bias"] = (c.dim,)
    for i in range(c.depth):
        inner = c.heads_of(i) * c.head_size  # D, or fewer after pruning heads
        block_shapes = {
            "norm1.weight": (c.dim,), "norm1.bias": (c.dim,),
            "attn.qkv.weight": (3 * inner, c.dim), "attn.qkv.bias": (3 * inner,),
            "attn.proj.weight": (c.dim, inner), "attn.proj.bias": (c.dim,),
            "norm2.weight": (c.dim,), "norm2.bias": (c.dim,),
            "mlp.fc1.weight": (c.mlp_dim, c.dim), "mlp.fc1.bias": (c.mlp_dim,),
            "mlp.fc2.weight": (c.dim, c.mlp_dim), "mlp.fc2.bias": (c.dim,),
        }
        if c.attn_window:
            block_shapes["attn.relative_position_bias_table"] = ((2 * c.attn_window - 1) ** 2, c.heads)  # Swin's
        for key in BLOCK_KEYS + WINDOW_KEYS:
            if (key == "attn.qkv.bias" and not c.qkv_bias) or key not in block_shapes:
                continue
            shapes[f"blocks.{i}.{key}"] = block_shapes[key]
    shapes[f"{c.final_norm}.weight"] = (c.dim,)
    shapes[f"{c.final_norm}.bias"] = (c.dim,)
    shapes["head.weight"] = (c.num_classes, c.dim)
    shapes["head.bias"] = (c.num_classes,)
    if c.distilled:
        shapes["head_dist.weight"] = (c.num_classes, c.dim)
        shapes["head_dist.bias"] = (c.num_classes,)
    return shapes


def init_params(config: ViTConfig, seed) -> dict:
    """Host float64 initial weights, as timm initialises a ViT.

    Linear weights, the position embedding and Swin's relative position bias tables: truncated
    normal, std 0.02, cut at +-2 std;
    biases 0; LayerNorm weight 1, bias 0; class/distillation tokens: normal, std 1e-6;
    the patch projection keeps PyTorch's Conv2d default, uniform in +-1/sqrt(C*P*P);
    RoPE-Mixed frequencies: the paper's (axial magnitudes, a random direction per block and head).
    """
    rng = np.random.default_rng(seed)

    def trunc_normal(shape, std=0.02):
        out = rng.standard_normal(shape)
        bad = np.abs(out) > 2.0
        while bad.any():
            out[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(out) > 2.0
        return out * std

    params = {}
    for key, shape in param_shapes(config).items():
        if key in ("cls_token", "dist_token"):
            params[key] = rng.standard_normal(shape) * 1e-6
        elif key == "pos_embed":
            params[key] = trunc_normal(shape)
        elif key == "rope.freqs":
            params[key] = rope_mixed_freqs(config.dim // config.heads, config.heads, config.depth,
                                           config.rope_theta, rng)
        elif key.startswith("patch_embed.proj."):
            bound = 1.0 / math.sqrt(config.channels * config.patch_size ** 2)
            params[key] = rng.uniform(-bound, bound, shape)
        elif "norm" in key.split(".")[-2] and key.endswith(".weight"):
            params[key] = np.ones(shape)
        elif key.endswith(".bias"):
            params[key] = np.zeros(shape)
        else:
            params[key] = trunc_normal(shape)
    return params


class ForwardCache(NamedTuple):
    """Everything the last forward kept for the backward, in data-flow order."""

    batch: int
    patch_embed: object
    prefix: object
    emb_dropout: object
    blocks: list
    final_norm: object  # LayerNormCache of norm (cls) or fc_norm (mean)
    pools: tuple  # PoolCache per head: (cls,) or (cls, dist)
    heads: tuple  # LinearCache per head
    rope: object = None  # RopeAnglesCache of a rope_mixed model (its frequencies get a gradient)
    patch_drop: object = None  # PatchDropoutCache (training with patch_drop_rate)


class VisionTransformer:
    """A ViT with hand-written forward and backward passes on NumPy or CuPy.

    ``VisionTransformer(image_size=32, patch_size=4, num_classes=10, dim=64, depth=2,
    heads=4, mlp_dim=128)``; any :class:`ViTConfig` field is a keyword, plus
    ``backend`` (``"numpy"``/``"cupy"``, default ``$TINYVIT_BACKEND`` or numpy),
    ``dtype`` (``"float32"`` default, or ``"float64"``) and ``seed`` (initial weights
    and the dropout generator).

    Attributes: ``config``, ``backend``, ``dtype``, ``params`` and ``grads`` (dicts with
    timm's state-dict keys, arrays on the backend), ``rng`` (the dropout generator).

    dtype policy: the model computes in its own dtype end to end; images of another
    float dtype are an error (cast them explicitly), never silently converted.

    ``precision`` (``"fp32"`` default, ``"fp16"``, ``"bf16"``; also settable as an attribute):
    mixed precision. The weights stay float32 (the master copy the optimiser updates); every
    matrix product of forward and backward runs in fp16/bf16, everything else in float32
    (layers/precision.py, docs/mixed_precision.md). fp16 training needs a loss scale
    (tinyvit.training.amp.DynamicLossScaler).
    """

    def __init__(self, image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12,
                 mlp_dim=3072, channels=3, dropout=0.0, emb_dropout=0.0, norm_first=True, pool="cls",
                 layer_norm_eps=1e-6, backend=None, dtype="float32", seed=0, *, attn_dropout=0.0,
                 drop_path_rate=0.0, gelu="none", pos_embed="learned", distilled=False, qkv_bias=True,
                 attn_impl="plain", attn_block=DEFAULT_BLOCK, rope_theta=None, attn_window=0, attn_shift=False,
                 precision="fp32", tome_r=0, patch_drop_rate=0.0, block_heads=None, rope_ref_grid=None):
        self.config = ViTConfig(image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels,
                                dropout, emb_dropout, attn_dropout, drop_path_rate, norm_first, pool,
                                layer_norm_eps, gelu, pos_embed, distilled, qkv_bias, attn_impl=attn_impl,
                                attn_block=attn_block, rope_theta=rope_theta, attn_window=attn_window,
                                attn_shift=attn_shift, tome_r=tome_r, patch_drop_rate=patch_drop_rate,
                                block_heads=block_heads, rope_ref_grid=rope_ref_grid)
        self.backend: Backend = get_backend(backend)
        self.dtype = check_dtype_name(dtype)
        self.precision = precision
        self.quant: dict | None = None  # {weight key: Int8Weight | FakeQuantWeight} (tinyvit.quantize)
        _check_int("seed", seed, minimum=0)
        self.params = {k: self.backend.asarray(v, dtype=self.dtype) for k, v in init_params(self.config, seed).items()}
        self.grads: dict = {}
        self.rng = self.backend.rng(seed)
        c = self.config
        self._fixed_pos = None
        if c.pos_embed in ("sincos1d", "sincos2d"):
            table = fixed_pos_embed(c.pos_embed, *c.grid, c.dim, c.num_prefix_tokens)
            self._fixed_pos = self.backend.asarray(table, dtype=self.dtype)  # (1, N, D), no gradient
        self._rope_pos = self._rope_angles = None
        if c.pos_embed in ROPE_KINDS:
            pos = rope_positions(*c.grid)  # (2, Np): column, row of each patch
            if c.rope_ref_grid is not None:  # position interpolation (EVA, timm's ref_feat_shape): x * ref_w / gw
                pos = pos * np.array([[c.rope_ref_grid[1] / c.grid[1]], [c.rope_ref_grid[0] / c.grid[0]]])
            self._rope_pos = self.backend.asarray(pos, dtype=self.dtype)
            if c.pos_embed == "rope_axial":  # fixed: one (1, Np, hs/2) table for every block and head
                angles, _ = rope_angles_forward(rope_axial_freqs(c.dim // c.heads, c.rope_theta), pos)
                self._rope_angles = self.backend.asarray(angles, dtype=self.dtype)
        self._cache: ForwardCache | None = None
        self.labels: list | None = None  # class names, when known (a trained or loaded model's)
        self.preprocessing = None  # how images become its input (tinyvit.pretrained.preprocess.Preprocessing)
        self.head_gates: dict = {}  # {block: (NH_block,) gate}: see set_head_gates
        self.gate_grads: dict = {}  # {block: (NH_block,)}: dL/dgate after backward, for the gated blocks

    def set_tome(self, r: int) -> None:
        """Token merging on (``r`` tokens per block) or off (0), on this model as it is: a trained
        model needs no retraining (ToMe's off-the-shelf use). Raises if ``r`` is too large."""
        import dataclasses

        self.config = dataclasses.replace(self.config, tome_r=r)
        self._cache = None

    def set_head_gates(self, gates: dict | None) -> None:
        """Gate each head's output: ``{block: gates (NH_block,)}`` (e.g. ``{2: [1, 0, 1, 1]}`` switches
        head 1 of block 2 off); ``None`` or ``{}`` removes every gate. After a backward,
        ``gate_grads[block]`` holds dL/dgate (Michel et al.'s head importance). All or nothing."""
        new = {}
        for block, gate in (gates or {}).items():
            if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.config.depth:
                raise ValueError(f"head gate on block {block!r}, but the model has {self.config.depth} blocks "
                                 f"(0 to {self.config.depth - 1})")
            host = to_host(gate) if is_backend_array(gate) else np.asarray(gate, dtype=np.float64)
            heads = self.config.heads_of(int(block))
            if host.shape != (heads,) or not np.all(np.isfinite(host)):
                raise ValueError(f"head gate of block {block} must be {heads} finite numbers (one per head), "
                                 f"got shape {host.shape}")
            new[int(block)] = self.backend.asarray(host, dtype=self.dtype)
        self.head_gates = new
        self.gate_grads = {}
        self._cache = None

    @property
    def precision(self) -> str:
        """The matrix products' precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (weights stay float32)."""
        return self._precision

    @precision.setter
    def precision(self, value) -> None:
        check_precision_supported(self.backend.xp, value, self.dtype)
        if value != "fp32" and self.config.attn_impl != "plain":
            raise ValueError(f"precision={value!r} rounds the products of attn_impl='plain'; this model uses "
                             f"attn_impl={self.config.attn_impl!r}: build it with attn_impl='plain' for mixed precision")
        if value != "fp32" and self.config.attn_window:
            raise ValueError(f"precision={value!r} rounds the products of global attn_impl='plain'; this model uses "
                             f"windowed attention (attn_window={self.config.attn_window}), which runs in {self.dtype}")
        self._precision = value

    @classmethod
    def from_config(cls, config: ViTConfig | dict, backend=None, dtype="float32", seed=0):
        """Build from a :class:`ViTConfig` or its ``to_dict()``."""
        d = config.to_dict() if isinstance(config, ViTConfig) else dict(config)
        return cls(**d, backend=backend, dtype=dtype, seed=seed)

    # ---------------------------------------------------------------- checks at the edge
    def check_images(self, x) -> None:
        """Raise a ``TypeError``/``ValueError`` that names what was expected if ``x`` is not
        a ``(B, C, H, W)`` array of this model's backend, dtype, channels and size."""
        c, name = self.config, self.backend.name
        if not is_backend_array(x):
            raise TypeError(f"images must be a {name} array of shape (B, {c.channels}, {c.image_size[0]}, "
                            f"{c.image_size[1]}) and dtype {self.dtype}, got {type(x).__name__}")
        if not self.backend.owns(x):
            how = ("to the host with tinyvit.to_host(x) (for CuPy: x.get())" if name == "numpy"
                   else "to the device with model.backend.asarray(x) (for CuPy: cupy.asarray(x))")
            raise TypeError(f"images are a {array_module(x).__name__} array but the model runs on {name}; "
                            f"move them {how}")
        kind = np.dtype(x.dtype).kind
        if kind in "iub":
            raise TypeError(f"images must be floating point ({self.dtype}), got {x.dtype}; convert and scale, "
                            f"e.g. x.astype('{self.dtype}') / 255")
        if kind != "f":
            raise TypeError(f"images must be real floating point ({self.dtype}), got {x.dtype}")
        if x.dtype != np.dtype(self.dtype):
            raise TypeError(f"images are {x.dtype} but the model computes in {self.dtype}; cast them with "
                            f"x.astype('{self.dtype}') or build the model with dtype='{x.dtype}'")
        expect = f"(B, {c.channels}, {c.image_size[0]}, {c.image_size[1]})"
        if x.ndim == 3:
            raise ValueError(f"images must be 4-D {expect}, got 3-D {tuple(x.shape)}; "
                             f"for a single image add the batch axis: x[None]")
        if x.ndim != 4:
            raise ValueError(f"images must be 4-D {expect}, got {x.ndim}-D {tuple(x.shape)}")
        _, channels, height, width = x.shape
        if channels != c.channels:
            if x.shape[3] == c.channels:
                raise ValueError(f"images look channels-last {tuple(x.shape)}; the model expects channels-first "
                                 f"{expect}: use x.transpose(0, 3, 1, 2)")
            raise ValueError(f"images have {channels} channels but the model expects {c.channels}")
        patch = c.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image is {height}x{width}, not divisible by the patch size {patch}; the nearest "
                             f"valid size is {_nearest_multiple(height, patch)}x{_nearest_multiple(width, patch)}")
        if (height, width) != c.image_size and c.pos_embed in ROPE_KINDS:
            raise ValueError(f"image is {height}x{width} but the model expects {c.image_size[0]}x{c.image_size[1]}; "
                             f"a 2D RoPE model reads any size with the same weights: build one with "
                             f"image_size=({height}, {width}) and load this model's state_dict (nothing to resample)")
        if (height, width) != c.image_size:
            raise ValueError(f"image is {height}x{width} but the model expects {c.image_size[0]}x{c.image_size[1]}; "
                             f"resize the image, or build a model with image_size=({height}, {width}) and "
                             f"resample the position embeddings to the new patch grid with "
                             f"tinyvit.resample_pos_embed (bicubic); "
                             f"tinyvit.load_pretrained(path, image_size=...) does both")

    def _check_finite(self, x, what: str) -> None:
        xp = array_module(x)
        bad = to_host(~xp.isfinite(x))  # explicit copy, only when the check is asked for
        if bad.any():
            where = np.argwhere(bad)[:5].tolist()
            raise ValueError(f"{what} holds {int(bad.sum())} non-finite values (NaN/Inf), first at {where}")

    # ---------------------------------------------------------------- forward
    def forward(self, x, train: bool = False, rng=None, masks: dict | None = None, check_finite: bool = False,
                *, keep_cache: bool = True):
        """``x: (B, C, H, W) -> logits: (B, K)``.

        ``train`` switches dropout and drop path on. ``rng`` overrides the model's dropout
        generator; ``masks`` injects keep-masks by site (``"emb"``, ``"blocks.{i}"`` ->
        :class:`BlockMasks`) so tests can share a draw with PyTorch. NaN/Inf in ``x``
        propagate unless ``check_finite=True``, which raises with their count and place.
        A distilled model returns the mean of its two heads (DeiT's inference rule);
        :meth:`forward_distill` returns both. The caches are kept for :meth:`backward`
        (and :meth:`attention_maps`); the previous forward's caches are released first.
        ``keep_cache=False`` (inference) keeps none: each layer's cache is freed as soon as
        the next layer has run, which saves the memory of every activation (ViT-Ti/16,
        batch 8: ~275 MB) and some time; backward and attention_maps then need a new forward.
        """
        cls_logits, dist_logits = self._forward(x, train, rng, masks, check_finite, keep_cache)
        if dist_logits is None:
            return cls_logits
        return (cls_logits + dist_logits) * 0.5

    def forward_distill(self, x, train: bool = True, rng=None, masks: dict | None = None):
        """DeiT: ``x -> (cls_logits (B, K), dist_logits (B, K))``; needs ``distilled=True``."""
        if not self.config.distilled:
            raise ValueError("forward_distill needs a model built with distilled=True")
        return self._forward(x, train, rng, masks, False)

    def _forward(self, x, train, rng, masks, check_finite, keep_cache=True):
        self.check_images(x)
        if check_finite:
            self._check_finite(x, "images")
        self._cache = None  # free the last forward's caches before this one makes its own
        c, p = self.config, self.params
        rng = self.rng if rng is None else rng
        masks = masks or {}
        batch = x.shape[0]

        lowp = self._precision
        if self.quant is not None:  # int8 inference or QAT: the linear layers' weights are quantised records
            if self._precision != "fp32" or c.attn_impl != "plain" or c.attn_window or c.tome_r or self.head_gates:
                raise ValueError("a quantised model runs with precision='fp32' and plain global attention "
                                 "(attn_impl='plain', no attn_window, no ToMe, no head gates)")
            p = {**p, **{k: FakeQuantWeight(p[k], r.input_scale) if isinstance(r, FakeQuantWeight) else r
                         for k, r in self.quant.items()}}  # QAT: fake-quantise the current float weights
        x, patch_cache = patch_embed_forward(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                                             lowp)  # (B, Np, D)
        prefix = [p["cls_token"]] + ([p["dist_token"]] if c.distilled else [])
        x, prefix_cache = prepend_tokens_forward(x, *prefix)  # (B, N, D)
        if c.pos_embed not in ROPE_KINDS:  # RoPE adds nothing here: it turns q and k inside attention
            x, _ = add_pos_embed_forward(x, p["pos_embed"] if c.pos_embed == "learned" else self._fixed_pos)
        x, emb_cache = dropout_forward(x, c.emb_dropout, train, rng, masks.get("emb"))
        x, patch_drop_cache = patch_dropout_forward(x, c.patch_drop_rate, train, c.num_prefix_tokens, rng,
                                                    masks.get("patch_drop"))  # (B, T + K, D)

        block_caches = []
        rope_cache = None
        rope_pos, fixed_angles = self._rope_pos, self._rope_angles  # (2, Np); (1, Np, hs/2) axial, else None
        if c.pos_embed in ROPE_KINDS and patch_drop_cache.rank is not None:  # each image kept K of its patches
            kept = array_module(x).argsort(patch_drop_cache.rank, axis=-1)[:, :patch_drop_cache.num_keep]  # (B, K)
            rope_pos = self._rope_pos[:, kept].transpose(1, 0, 2)  # (B, 2, K): the kept patches' own places
            if fixed_angles is not None:
                fixed_angles = fixed_angles[0][kept][:, None]  # (B, 1, K, hs/2)
        size = None  # ToMe's token sizes (B, N, 1); None while nothing is merged
        for i, drop_path in enumerate(c.drop_path_rates()):
            angles = fixed_angles  # axial, None without RoPE
            if c.pos_embed == "rope_mixed":  # this block's learned frequencies -> ([B,] NH, Np or K, hs/2)
                angles, rope_cache = rope_angles_forward(p["rope.freqs"][:, i], rope_pos)
            x, block_cache = block_forward(
                x, self._block_params(i, p), c.heads_of(i), c.layer_norm_eps, c.norm_first, c.dropout, c.attn_dropout,
                drop_path, c.gelu, train, rng, masks.get(f"blocks.{i}"), attn_impl=c.attn_impl,
                attn_block=c.attn_block, rope_angles=angles, num_prefix=c.num_prefix_tokens,
                precision=lowp, window=c.window_spec(i), tome_r=c.tome_r, size=size,
                head_gate=self.head_gates.get(i))  # (B, N, D) -> (B, N - r, D)
            size = block_cache.size
            if keep_cache:
                block_caches.append(block_cache)

        norm_w, norm_b = p[f"{c.final_norm}.weight"], p[f"{c.final_norm}.bias"]
        if c.pool == "cls":
            x, norm_cache = layernorm_forward(x, norm_w, norm_b, c.layer_norm_eps)  # (B, N, D)
            pooled = [token_pool_forward(x, i) for i in range(c.num_prefix_tokens)]  # (B, D) each
        else:
            if size is None:
                pooled, pool_cache = mean_pool_forward(x, c.num_prefix_tokens)  # (B, D)
            else:  # merged tokens: each weighted by the patches it stands for
                pooled, pool_cache = weighted_mean_pool_forward(x, size, c.num_prefix_tokens)  # (B, D)
            pooled, norm_cache = layernorm_forward(pooled, norm_w, norm_b, c.layer_norm_eps)
            pooled = [(pooled, pool_cache)]
        head_names = ("head", "head_dist")[: len(pooled)]
        logits = [linear_forward(v, p[f"{h}.weight"], p[f"{h}.bias"], lowp) for (v, _), h in zip(pooled, head_names)]

        if keep_cache:
            self._cache = ForwardCache(batch, patch_cache, prefix_cache, emb_cache, block_caches, norm_cache,
                                       tuple(pc for _, pc in pooled), tuple(lc for _, lc in logits), rope_cache,
                                       patch_drop_cache)
        cls_logits = logits[0][0]  # (B, K)
        dist_logits = logits[1][0] if len(logits) > 1 else None
        return cls_logits, dist_logits

    def _block_params(self, i: int, params: dict | None = None) -> dict:
        prefix, params = f"blocks.{i}.", self.params if params is None else params
        return {key: params.get(prefix + key) for key in BLOCK_KEYS + WINDOW_KEYS}

    # ---------------------------------------------------------------- backward
    def backward(self, dlogits, *, keep_cache: bool = True, grad_ready=None):
        """``dlogits: (B, K) = dL/dlogits -> dx: (B, C, H, W) = dL/dx``.

        Reads the caches of the last forward. ``self.grads`` is **overwritten** (not
        accumulated) with ``dL/dparam`` for every key of ``self.params``. For a distilled
        model ``dlogits`` is the gradient of the averaged logits that :meth:`forward` returned.
        ``keep_cache=False`` frees each block's cache as soon as its backward has run, as
        PyTorch frees its graph in ``backward()``: a training step's peak memory is then the
        forward's, not the forward's plus every gradient; attention_maps and a second
        backward then need a new forward.
        ``grad_ready({key: grad})``, if given, is called as soon as gradients are final: the
        heads and final norm, then each block from the last to the first, then the embeddings
        (data-parallel training starts each bucket's all-reduce there: tinyvit/distributed).
        """
        self._check_upstream(dlogits, "dlogits")
        if self.config.distilled:
            half = dlogits * 0.5
            return self._backward(half, half, keep_cache, grad_ready)
        return self._backward(dlogits, None, keep_cache, grad_ready)

    def backward_distill(self, dcls_logits, ddist_logits, *, keep_cache: bool = True, grad_ready=None):
        """The backward of :meth:`forward_distill`: one ``(B, K)`` gradient per head."""
        if not self.config.distilled:
            raise ValueError("backward_distill needs a model built with distilled=True")
        self._check_upstream(dcls_logits, "dcls_logits")
        self._check_upstream(ddist_logits, "ddist_logits")
        return self._backward(dcls_logits, ddist_logits, keep_cache, grad_ready)

    def _check_upstream(self, d, name):
        if self._cache is None:
            raise RuntimeError("backward called before forward: run forward(x) first (a forward or backward "
                               "with keep_cache=False keeps no caches)")
        expect = (self._cache.batch, self.config.num_classes)
        if not self.backend.owns(d):
            raise TypeError(f"{name} must be a {self.backend.name} array of shape {expect}, got {type(d).__name__}")
        if tuple(d.shape) != expect:
            raise ValueError(f"{name} must have shape {expect} (the last forward's logits), got {tuple(d.shape)}")
        if d.dtype != np.dtype(self.dtype):
            raise TypeError(f"{name} must be {self.dtype} like the model, got {d.dtype}")

    def _backward(self, dcls_logits, ddist_logits, keep_cache=True, grad_ready=None):
        c, p, cache = self.config, self.params, self._cache
        g = {}
        sent = set()  # the keys already handed to grad_ready

        def ready(grads):
            sent.update(grads)
            if grad_ready is not None:
                grad_ready(grads)
        dpooled = []
        for h, dlog, lin_cache in zip(("head", "head_dist"), (dcls_logits, ddist_logits), cache.heads):
            dv, g[f"{h}.weight"], g[f"{h}.bias"] = linear_backward(dlog, lin_cache)  # (B, D)
            dpooled.append(dv)
        norm = c.final_norm
        if c.pool == "cls":
            dx = pool_backward(dpooled[0], cache.pools[0])  # (B, N, D)
            for dv, pool_cache in zip(dpooled[1:], cache.pools[1:]):
                dx = dx + pool_backward(dv, pool_cache)
            dx, g[f"{norm}.weight"], g[f"{norm}.bias"] = layernorm_backward(dx, cache.final_norm)
        else:
            dv, g[f"{norm}.weight"], g[f"{norm}.bias"] = layernorm_backward(dpooled[0], cache.final_norm)  # (B, D)
            if isinstance(cache.pools[0], WeightedPoolCache):
                dx = weighted_mean_pool_backward(dv, cache.pools[0])  # (B, N, D)
            else:
                dx = pool_backward(dv, cache.pools[0])  # (B, N, D)
        ready(dict(g))  # the heads and the final norm

        dfreqs = [None] * c.depth
        gate_grads = {}
        for i in reversed(range(c.depth)):
            dx, block_grads = block_backward(dx, cache.blocks[i])  # (B, N, D)
            if not keep_cache:
                cache.blocks[i] = None  # free this block's activations now
            dangles = block_grads.pop("attn.rope_angles", None)  # (NH, Np, hs/2) under RoPE
            if c.pos_embed == "rope_mixed":
                dfreqs[i] = rope_angles_backward(dangles, cache.rope)  # (2, NH, hs/2)
            if "attn.head_gate" in block_grads:
                gate_grads[i] = block_grads.pop("attn.head_gate")
            named = {f"blocks.{i}.{key}": value for key, value in block_grads.items() if value is not None}
            g.update(named)
            ready(named)  # this block's gradients are final

        dx = patch_dropout_backward(dx, cache.patch_drop)  # (B, T + K, D) -> (B, N, D)
        dx = dropout_backward(dx, cache.emb_dropout)
        if c.pos_embed == "learned":
            dx, g["pos_embed"] = add_pos_embed_backward(dx)  # (B, N, D), (1, N, D)
        if c.pos_embed == "rope_mixed":
            g["rope.freqs"] = array_module(dx).stack(dfreqs, axis=1)  # (2, depth, NH, hs/2)
        dx, *dprefix = prepend_tokens_backward(dx, cache.prefix)  # (B, Np, D), (1, 1, D) each
        g["cls_token"] = dprefix[0]
        if c.distilled:
            g["dist_token"] = dprefix[1]
        dx, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = patch_embed_backward(dx, cache.patch_embed)
        ready({k: v for k, v in g.items() if k not in sent})  # the embeddings (and RoPE's frequencies)
        self.grads = {k: g[k] for k in p}  # same keys and order as params
        self.gate_grads = gate_grads
        if not keep_cache:
            self._cache = None
        return dx  # (B, C, H, W)

    # ---------------------------------------------------------------- introspection
    def attention_maps(self) -> list:
        """The attention probabilities of the last forward, one ``(B, NH, N, N)`` array per block.

        With ``attn_impl="flash"`` nothing ``N x N`` was kept: each block's map is recomputed
        here, on request, from its cached q, k and row logsumexp L (``exp(q k^T / sqrt(hs) - L)``,
        the forward's probabilities before dropout), costing one ``(B, NH, N, N)`` array per block.
        With ``attn_window`` the window probabilities are spread into a dense map, 0 outside the windows.
        """
        if self._cache is None or not self._cache.blocks:
            raise RuntimeError("attention_maps needs a forward first (with keep_cache=True, the default)")
        if self.config.attn_impl == "flash":
            return [flash_probabilities(bc.attn.core) for bc in self._cache.blocks]
        if self.config.attn_window:
            return [window_probabilities(bc.attn.core) for bc in self._cache.blocks]
        return [bc.attn.att.out for bc in self._cache.blocks]

    def num_params(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self.params.values()))

    # ---------------------------------------------------------------- state dicts
    def state_dict(self) -> dict:
        """``{key: NumPy array}``: host copies of the parameters in timm's layout and order."""
        return {k: np.array(to_host(v)) for k, v in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load ``{key: array}`` (NumPy, or anything ``numpy.asarray`` takes on the host).

        All or nothing: missing keys, unexpected keys, wrong shapes, integer or non-numeric
        dtypes, non-finite values and values the model's dtype cannot hold (1e39 in float32)
        are collected into one ``ValueError`` and nothing is loaded. Floating values are
        copied and cast to the model's dtype (an explicit, documented cast); the model never
        keeps a reference to the caller's arrays.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict of arrays, got {type(state_dict).__name__}")
        expected = {k: tuple(v.shape) for k, v in self.params.items()}
        problems, host = [], {}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for key, shape in expected.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            try:
                value = to_host(value) if is_backend_array(value) else np.asarray(value)
            except Exception as exc:  # e.g. a torch tensor on a GPU
                problems.append(f"{key}: cannot read as an array ({exc})")
                continue
            if value.dtype.kind in "iub":
                problems.append(f"{key}: dtype {value.dtype} is not floating point (weights are; cast explicitly, "
                                f"e.g. v.astype('{self.dtype}'), if these integers really are weights)")
                continue
            if value.dtype.kind != "f":
                problems.append(f"{key}: dtype {value.dtype} is not numeric")
                continue
            if tuple(value.shape) != shape:
                problems.append(f"{key}: shape {tuple(value.shape)}, expected {shape}")
                continue
            if not np.all(np.isfinite(value)):
                problems.append(f"{key}: holds non-finite values")
                continue
            limit = float(np.finfo(self.dtype).max)
            if value.dtype.itemsize > np.dtype(self.dtype).itemsize and value.size and np.abs(value).max() > limit:
                problems.append(f"{key}: values up to {float(np.abs(value).max()):.3g} overflow {self.dtype} "
                                f"(largest {limit:.3g})")
                continue
            host[key] = value
        if problems:
            raise ValueError("state dict does not fit this model; nothing was loaded:\n  " + "\n  ".join(problems))
        for key, value in host.items():  # np.array copies: the model never shares the caller's arrays
            self.params[key] = self.backend.asarray(np.array(value, dtype=self.dtype, order="C"))
        self.quant = None  # new float weights: any int8 / fake-quant records no longer describe them
        self.grads = {}
        self._cache = None

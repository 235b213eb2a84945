"""The layers: every forward and its hand-written backward, side by side, one file per ViT stage.

Read them in the order the data flows (each file's docstring gives the derivation's page in
``docs/``):

- ``patch_embed.py``  image -> patches (einops) -> linear: ``(B, C, H, W) -> (B, Np, D)``
- ``linear.py``       ``y = x W^T + b``, the contract every layer keeps
- ``tokens.py``       class/distillation tokens, learned and sin-cos position embeddings
- ``layernorm.py``    LayerNorm over the last axis
- ``gelu.py``         GELU, exact (erf) and tanh; ``kernels.py`` picks the fast float32 versions of GELU,
                      LayerNorm and softmax (``kernels_numba.py``: compiled CPU loops)
- ``dropout.py``      dropout and drop path (stochastic depth)
- ``attention.py``    softmax and multi-head self-attention
- ``mlp.py``          fc1 -> GELU -> dropout -> fc2 -> dropout
- ``block.py``        the encoder block, pre-norm (timm) or post-norm (``nn.TransformerEncoderLayer``)
- ``head.py``         pooling for the head (class token or mean of the patches)
- ``loss.py``         softmax cross-entropy with label smoothing and soft targets
- ``quant.py``        int8 linear layer (exact int32 sums), fake quantisation and its straight-through backward
- ``precision.py``    fp16 / bf16 matrix products (mixed precision): linear and attention take ``precision=``

Every op: ``out, cache = f_forward(x, params...)`` and ``dx, dparams... = f_backward(dout, cache)``;
the backward takes only its forward's cache and never writes into its inputs. Nothing in this
folder imports anything of tinyvit but ``tinyvit.backend`` and its neighbours here.
"""

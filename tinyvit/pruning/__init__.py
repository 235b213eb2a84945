"""Fewer heads: head importance (Michel et al., 2019) and head pruning.

- :func:`head_importance`: ``I_h = E |dL/dxi_h|`` for a gate ``xi_h`` on each head's output,
  from the hand-written backward (docs/head_pruning.md);
- :func:`prune_heads`: a smaller model without the given heads (qkv and proj shrink; per-block
  head counts in ``config.block_heads``), equal to the original with those heads gated off;
- :func:`least_important`: which heads to remove first.
"""
from .heads import head_importance, least_important, prune_heads

__all__ = ["head_importance", "least_important", "prune_heads"]

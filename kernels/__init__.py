"""Attention kernels: a reference einsum path (and its query-blocked causal form), XLA's fused path
and a Pallas flash kernel. Imported as `haiku_gpt.kernels` (the repository keeps it in its top-level
kernels/ folder; see haiku_gpt/__init__.py).

The Pallas kernel lives in `haiku_gpt.kernels.flash_attention` (`from haiku_gpt.kernels.flash_attention
import flash_attention`) and is not imported here: importing Pallas costs a quarter of a second, paid
only by runs that use it (`attention_impl='pallas'`, see kernels/attention.py) and by the preflight's
shape checks.
"""

from haiku_gpt.names import gave_way

if not gave_way(__name__, __file__):  # imported as the top-level `kernels`: another package's name
    from haiku_gpt.kernels.attention import (ATTENTION_IMPLS, attention, attention_qkv, check_attention_impl,
                                             cross_checked_attention)
    from haiku_gpt.kernels.dropout import element_keep_mask
    from haiku_gpt.kernels.reference import (blocked_causal_attention, cached_attention, reference_attention,
                                             split_qkv)

__all__ = ["ATTENTION_IMPLS", "attention", "attention_qkv", "blocked_causal_attention", "cached_attention",
           "check_attention_impl", "cross_checked_attention", "element_keep_mask", "reference_attention", "split_qkv"]

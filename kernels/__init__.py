"""Attention kernels: a reference einsum path (and its query-blocked causal form), XLA's fused path
and a Pallas flash kernel.

The Pallas kernel lives in `kernels.flash_attention` (`from kernels.flash_attention import
flash_attention`) and is not imported here: importing Pallas costs a quarter of a second, paid
only by runs that use it (`attention_impl='pallas'`, see kernels/attention.py) and by the preflight's
shape checks.
"""

from kernels.attention import ATTENTION_IMPLS, attention, check_attention_impl, cross_checked_attention
from kernels.dropout import element_keep_mask
from kernels.reference import blocked_causal_attention, cached_attention, reference_attention

__all__ = ["ATTENTION_IMPLS", "attention", "blocked_causal_attention", "cached_attention", "check_attention_impl",
           "cross_checked_attention", "element_keep_mask", "reference_attention"]

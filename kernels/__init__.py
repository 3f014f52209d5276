"""Attention kernels: a reference einsum path (and its query-blocked causal form), XLA's fused path
and a Pallas flash kernel."""

from kernels.attention import ATTENTION_IMPLS, attention, check_attention_impl
from kernels.dropout import element_keep_mask
from kernels.reference import blocked_causal_attention, cached_attention, reference_attention
from kernels.flash_attention import flash_attention

__all__ = ["ATTENTION_IMPLS", "attention", "blocked_causal_attention", "cached_attention", "check_attention_impl",
           "element_keep_mask", "flash_attention", "reference_attention"]

"""Torch references / CPU paths of the Triton ops in ``kernels/triton_ops`` (same op names and
signatures; test oracles). Torch only: this package imports where triton is missing."""

from .fused_safety_lora import fused_safety_expand_ref, fused_safety_lora_ref, fused_safety_shrink_ref

__all__ = ["fused_safety_expand_ref", "fused_safety_lora_ref", "fused_safety_shrink_ref"]

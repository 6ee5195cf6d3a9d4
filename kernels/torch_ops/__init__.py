"""Torch references / CPU paths of the Triton ops in ``kernels/triton_ops`` (same op names and
signatures; test oracles), and ``packed_safety_delta``, the CPU serving path's safety delta (checked
against ``fused_safety_lora_ref``). Torch only: this package imports where triton is missing."""

from .fused_safety_lora import fused_safety_expand_ref, fused_safety_lora_ref, fused_safety_shrink_ref
from .packed_safety_delta import PackedSafety, pack_safety, packed_safety_delta

__all__ = [
    "PackedSafety",
    "fused_safety_expand_ref",
    "fused_safety_lora_ref",
    "fused_safety_shrink_ref",
    "pack_safety",
    "packed_safety_delta",
]

"""Triton kernels of vllm-safeguard (no vLLM import here: they also run where only torch + triton are).

``fused_safety_lora``: task LoRA + per-token-scaled safety delta in one shrink and one expand launch,
for vLLM's sorted-by-adapter punica layout. The torch reference / CPU path is
``vllm_safeguard.ops.fused_safety_lora_ref``.
"""

from .fused_safety_lora import (
    ExpandConfig,
    SafetyLoRAKernelMeta,
    ShrinkConfig,
    fused_safety_expand,
    fused_safety_lora,
    fused_safety_shrink,
    make_safety_lora_meta,
)

__all__ = [
    "ExpandConfig",
    "SafetyLoRAKernelMeta",
    "ShrinkConfig",
    "fused_safety_expand",
    "fused_safety_lora",
    "fused_safety_shrink",
    "make_safety_lora_meta",
]

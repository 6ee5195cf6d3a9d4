"""Torch ops: references / CPU paths of the Triton kernels in ``kernels/``."""

from .fused_safety_lora_ref import (
    SafetyCoverageError,
    SafetyDeltaSpec,
    check_safety_coverage,
    fused_safety_expand_ref,
    fused_safety_lora_ref,
    fused_safety_shrink_ref,
)

__all__ = [
    "SafetyCoverageError",
    "SafetyDeltaSpec",
    "check_safety_coverage",
    "fused_safety_expand_ref",
    "fused_safety_lora_ref",
    "fused_safety_shrink_ref",
]

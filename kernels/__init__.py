"""Kernels of vllm-safeguard: Triton ops beside their torch references (torch + triton only; nothing
here imports vLLM or ``vllm_safeguard``, so they also run on a bare GPU benchmark machine).

* ``kernels/triton_ops/<op>*.py``: the Triton kernels and their launchers;
* ``kernels/torch_ops/<op>.py``: the torch reference / CPU path of the same op (same signatures);
* ``tests/kernels/test_<op>.py`` and ``benchmarks/bench_<op>.py``: its tests and benchmark.

``fused_safety_lora``: task LoRA + per-token-scaled safety delta in one shrink and one expand launch,
for vLLM's sorted-by-adapter punica layout.

The torch references are imported eagerly; the Triton names on first access (module ``__getattr__``),
so ``import kernels`` and the references work where triton is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from .torch_ops import fused_safety_expand_ref, fused_safety_lora_ref, fused_safety_shrink_ref

# Public Triton-side name -> its module under kernels.triton_ops (imported on first access).
_TRITON_OPS = {
    "ExpandConfig": "fused_safety_lora_expand",
    "fused_safety_expand": "fused_safety_lora_expand",
    "SafetyLoRAKernelMeta": "fused_safety_lora_meta",
    "SafetyLoRAMetaArgs": "fused_safety_lora_meta",
    "make_safety_lora_meta": "fused_safety_lora_meta",
    "ShrinkConfig": "fused_safety_lora_shrink",
    "fused_safety_shrink": "fused_safety_lora_shrink",
    "fused_safety_lora": "fused_safety_lora",
    "register_fused_safety_lora_op": "fused_safety_lora",
}

__all__ = ["fused_safety_expand_ref", "fused_safety_lora_ref", "fused_safety_shrink_ref", *_TRITON_OPS]


def __getattr__(name: str) -> Any:
    module = _TRITON_OPS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.triton_ops.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_TRITON_OPS})

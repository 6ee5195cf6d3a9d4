"""In-memory LoRA adapter: the one representation every repair method reads and writes.

A PEFT LoRA module stores ``lora_A`` with shape ``[r, in]`` and ``lora_B`` with shape ``[out, r]``;
its weight update is ``delta_W = scaling * B @ A`` (shape ``[out, in]``), ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Factors are kept in fp32 for the maths; the source dtype is kept
so a repaired adapter is written back in the dtype it came in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

# PEFT saves LoRA tensors as ``base_model.model.<module path>.lora_{A,B}.weight``.
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAModule:
    """One adapted linear module.

    Attributes:
        name: module path inside the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        lora_a: ``[r, in]`` fp32.
        lora_b: ``[out, r]`` fp32.
        scaling: factor applied to ``B @ A`` (alpha / r, or alpha / sqrt(r) for rsLoRA).
    """

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    def scaled_b(self) -> torch.Tensor:
        """``scaling * B`` so that ``delta_W = scaled_b() @ A``."""
        return self.lora_b * self.scaling

    def delta(self) -> torch.Tensor:
        """Dense ``[out, in]`` update. Only for tests and small models: it is O(out*in)."""
        return self.scaled_b() @ self.lora_a


@dataclass
class LoRAAdapter:
    """A PEFT LoRA adapter as plain tensors plus its (plain-data) config."""

    config: dict[str, Any]
    modules: dict[str, LoRAModule]
    dtype: torch.dtype = torch.float32
    source: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def replace_modules(self, modules: dict[str, LoRAModule]) -> LoRAAdapter:
        """A copy of this adapter with other modules (config deep-copied, tensors shared)."""
        return LoRAAdapter(
            config=copy.deepcopy(self.config),
            modules=modules,
            dtype=self.dtype,
            source=self.source,
            metadata=dict(self.metadata),
        )

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def layer_index(module_name: str) -> int | None:
    """Transformer block index of a module path (``model.layers.12.mlp.up_proj`` -> 12)."""
    parts = module_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def module_kind(module_name: str) -> str:
    """Last path component (``q_proj``, ``down_proj`` ...)."""
    return module_name.rsplit(".", 1)[-1]

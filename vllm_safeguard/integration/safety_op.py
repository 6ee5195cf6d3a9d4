"""The custom ops the serving-time safety path puts into vLLM's model graph.

vLLM compiles the model with Dynamo (``fullgraph=True``, guards dropped) and replays CUDA graphs:
Python in the traced region runs once, at trace time, and only kernel launches replay. So nothing
the step's data decides may be a Python branch or a lookup there. The design:

* every per-step value (per-token alpha, the token -> adapter-slot metadata, which tokens end a
  prefill that the guard scores) lives in a **persistent buffer updated in place before the step**
  (``alpha_runner``, from vLLM's ``_set_active_loras``, on both runners, dummy and capture runs too);
* each LoRA-wrapped linear layer holds a :class:`~.punica_wrapper.punica_base.SafetyBoundWrapper`
  whose **static layer id** (its index in :data:`_LAYERS`, set at wrap time) is a constant of the
  traced graph; the layer's call becomes one opaque op, ``torch.ops.safeguard.lora_linear``, whose
  implementation does the data-dependent work eagerly (the platform wrapper's
  ``apply_safety_lora_linear``: on GPU the fused Triton kernels, whose launches CUDA graphs record);
* the guard's score is ``torch.ops.safeguard.guard_score`` on decoder layer L (``guard_runner``):
  fixed-shape tensor ops on persistent buffers, no host sync, results read after the step.

Semantics::

    lora_linear(y, x, A, B, scale, layer_id, add_inputs):        # mutates y
        wrapper, safety, slices = _LAYERS[layer_id]
        wrapper.apply_safety_lora_linear(y, x, A, B, scale, safety, slices, add_inputs)
        # = vLLM's add_lora_linear (task LoRA) + alpha[t] * (x A_s^T) B_s^T per slice, safety None:
        #   vLLM's add_lora_linear alone
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

OP_NAMESPACE = "safeguard"
LORA_LINEAR = f"{OP_NAMESPACE}::lora_linear"


@dataclass(frozen=True)
class BoundLayer:
    """One LoRA-wrapped linear layer bound to a safety wrapper (see the module docstring)."""

    name: str
    wrapper: Any  # the platform's SafetyState wrapper (punica_wrapper/)
    safety: Any  # LayerSafety, or None for a layer the safety adapter does not select
    output_slices: tuple[int, ...]


_LAYERS: list[BoundLayer] = []
_LOCK = threading.Lock()


def bind_layer(layer: BoundLayer) -> int:
    """Register ``layer``; its index is the static id the traced graph carries."""
    with _LOCK:
        _LAYERS.append(layer)
        return len(_LAYERS) - 1


def bound_layer(layer_id: int) -> BoundLayer:
    return _LAYERS[layer_id]


def lora_linear_eager(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: list[torch.Tensor],
    lora_b_stacked: list[torch.Tensor],
    scale: float,
    layer_id: int,
    add_inputs: bool,
) -> None:
    """The op's body (bound layers call it directly when nothing is being traced)."""
    b = _LAYERS[layer_id]
    b.wrapper.apply_safety_lora_linear(
        y, x, lora_a_stacked, lora_b_stacked, scale, b.safety, b.output_slices, add_inputs
    )


_REGISTERED: set[str] = set()


def register_ops() -> None:
    """Define the ops (idempotent; before vLLM compiles or loads a compiled model)."""
    with _LOCK:
        if LORA_LINEAR in _REGISTERED:
            return
        op = torch.library.custom_op(LORA_LINEAR, lora_linear_eager, mutates_args=("y",))

        @op.register_fake  # type: ignore[misc]
        def _(*args: Any, **kwargs: Any) -> None:
            return None

        _REGISTERED.add(LORA_LINEAR)

"""What every safety punica wrapper adds to vLLM's: the per-token alpha buffer and bound layers.

Every LoRA layer calls ``self.punica_wrapper.add_lora_linear(y, x, lora_a_stacked, lora_b_stacked,
1.0, output_slices)``. A safety wrapper (one subclass of vLLM's wrapper per platform: ``punica_cpu.py``,
``punica_gpu.py``; chosen by ``selector.py``) computes, per token ``t`` with task adapter ``i``::

    y[t] += (x[t] A_i^T) B_i^T  +  alpha[t] * (x[t] A_s^T) B_s^T

where ``(A_s, B_s)`` is the safety adapter's module for the layer being computed
(:class:`~vllm_safeguard.integration.layer_table.LayerSafety`).

Which layer is being computed is static: :meth:`SafetyState.bind_layers` gives every LoRA-wrapped
linear layer its own :class:`SafetyBoundWrapper` (through vLLM's ``set_mapping``) holding the layer's
index in :mod:`~vllm_safeguard.integration.safety_op`'s table, and the bound wrapper's
``add_lora_linear`` is one opaque op carrying that index. Under torch.compile the index is a constant
of the graph; nothing looks a layer up by pointer, and no layer can silently take the parent's path.

Per-token alpha: :meth:`SafetyState.set_token_alpha` (every step, from vLLM's ``_set_active_loras``
through :mod:`~vllm_safeguard.integration.alpha_runner`) copies into a preallocated fp32 buffer
``[max_num_batched_tokens]`` in place, so captured CUDA graphs read the new values on replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layer_table import LayerSafety
from ..safety_op import BoundLayer, bind_layer, lora_linear_eager, register_ops


class SafetyBoundWrapper:
    """The ``punica_wrapper`` of one bound LoRA layer: the shared wrapper plus the layer's static id.

    ``add_lora_linear`` is the op; every other attribute is the shared wrapper's.
    """

    def __init__(self, shared: SafetyState, layer_id: int) -> None:
        self._shared = shared
        self.layer_id = layer_id

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: Sequence[torch.Tensor],
        lora_b_stacked: Sequence[torch.Tensor],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Semantics: the shared wrapper's ``apply_safety_lora_linear`` for this layer, as one op.

        Traced (torch.compile): the op, so the graph holds one opaque call carrying the static layer
        id. Eager (``enforce_eager``, and vLLM-CPU's default): the op's body directly, the same code
        the op would run; the custom-op dispatcher's Python layers around it (Dynamo-disable wrapper,
        autograd/inplace redispatch, default filling) cost ~0.14 ms a call, ~5% of a SmolLM2-135M
        decode step on 2 cores (cProfile of the offline engine, 3840 calls in 32 steps: 0.55 s).
        """
        args = (list(lora_a_stacked), list(lora_b_stacked), float(scale), self.layer_id)
        add_inputs = bool(kwargs.get("add_inputs", True))
        if torch.compiler.is_compiling():
            torch.ops.safeguard.lora_linear(y, x, *args, add_inputs)
        else:
            lora_linear_eager(y, x, *args, add_inputs)
        return y

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # not set yet (copy, pickling): no recursion
            raise AttributeError(name)
        return getattr(self._shared, name)


class SafetyState:
    """The per-token alpha buffer and the bound layers, mixed into the CPU and GPU wrappers.

    Each platform wrapper also defines ``apply_safety_lora_linear(y, x, lora_a_stacked,
    lora_b_stacked, scale, safety, output_slices, add_inputs)``: the eager body of
    ``torch.ops.safeguard.lora_linear`` on that platform (``safety`` None: vLLM's task LoRA alone).
    """

    safeguard_alpha: torch.Tensor
    _safeguard_num_tokens: int
    bound_layer_ids: list[int]

    def _safeguard_init(self, max_num_batched_tokens: int, device: torch.device | str) -> None:
        self.safeguard_alpha = torch.zeros(max_num_batched_tokens, dtype=torch.float32, device=device)
        self._safeguard_num_tokens = 0
        self.bound_layer_ids = []
        register_ops()

    def bind_layers(self, layers: Sequence[tuple[str, Any, LayerSafety | None]]) -> list[int]:
        """Give each ``(name, layer, safety or None)`` its bound wrapper (``layer.set_mapping``).

        A layer with ``safety`` None (outside the safety adapter's selected layers) computes vLLM's
        task LoRA alone, through the same op. Returns the layers' static ids.
        """
        ids = []
        for name, layer, safety in layers:
            layer_id = bind_layer(BoundLayer(name, self, safety, tuple(int(s) for s in layer.output_slices)))
            layer.set_mapping(SafetyBoundWrapper(self, layer_id))
            ids.append(layer_id)
        self.bound_layer_ids = ids
        return ids

    def set_token_alpha(self, alpha: torch.Tensor) -> None:
        """Copy this step's per-token alphas (CPU fp32 ``[num_tokens]``) into the buffer, in place.

        Semantics:
            buffer[:n] = alpha; buffer[n:previous n] = 0   (stale tails never leak into padded tokens)
        """
        n = alpha.numel()
        if n > self.safeguard_alpha.numel():
            raise ValueError(f"{n} tokens exceed the alpha buffer ({self.safeguard_alpha.numel()})")
        self.safeguard_alpha[:n].copy_(alpha, non_blocking=True)
        if self._safeguard_num_tokens > n:
            self.safeguard_alpha[n : self._safeguard_num_tokens].zero_()
        self._safeguard_num_tokens = n

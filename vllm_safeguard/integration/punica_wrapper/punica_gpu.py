"""GPU: vLLM's GPU punica wrapper with task LoRA + safety delta fused in one shrink and one expand.

The fused Triton kernels (``kernels/triton_ops/fused_safety_lora*.py``) run as one torch custom op,
``torch.ops.safeguard.fused_safety_lora``, so that torch.compile treats them as opaque; the per-token
alpha lives in the preallocated metadata of ``SafetyLoRAKernelMeta``, updated in place each step
(CUDA-graph safe).
"""

from __future__ import annotations

from typing import Any

import torch

from .punica_base import SafetyState


def _gpu_base() -> type | None:
    try:
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    except Exception:  # vLLM builds without the GPU wrapper (or its deps)
        return None
    return PunicaWrapperGPU  # type: ignore[no-any-return]


_GPU_BASE = _gpu_base()

if _GPU_BASE is not None:

    class SafeguardPunicaWrapperGPU(_GPU_BASE, SafetyState):  # type: ignore[misc,valid-type]
        """vLLM's GPU punica wrapper with task LoRA + safety delta fused in one shrink and one expand.

        NOT yet run on a GPU with vLLM (no such machine for this change): see the report of issue 5.
        """

        def __init__(
            self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
        ) -> None:
            from kernels.triton_ops.fused_safety_lora import register_fused_safety_lora_op
            from kernels.triton_ops.fused_safety_lora_meta import SafetyLoRAKernelMeta

            super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
            self._safeguard_init(max_num_batched_tokens, device)
            # Our own metadata (vLLM's LoRAKernelMeta early-exits when every token is -1, which would
            # drop the safety delta of base-model tokens). Its token_alpha IS the alpha buffer.
            self._safety_meta = SafetyLoRAKernelMeta.make(self.max_loras, max_num_batched_tokens, device)
            self.safeguard_alpha = self._safety_meta.token_alpha
            self._mapping_cpu = torch.empty(0, dtype=torch.int32)
            register_fused_safety_lora_op()

        def update_metadata(
            self, mapping: Any, lora_index_to_id: Any, max_loras: int, vocab_size: int, **kw: Any
        ) -> None:
            """Semantics: PunicaWrapperGPU.update_metadata, then keep a host copy of the token mapping
            (vLLM syncs here already) for :meth:`set_token_alpha`'s metadata refresh."""
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kw)
            self._mapping_cpu = self.token_lora_indices.to("cpu", torch.int32)

        def set_token_alpha(self, alpha: torch.Tensor) -> None:
            """Semantics: refresh the sorted-by-adapter metadata and the alpha buffer in place
            (``SafetyLoRAKernelMeta.prepare_tensors``). The skip flag is forced False: a skip decided
            on the host would be frozen into a captured CUDA graph; the kernels exit per group."""
            n = self._mapping_cpu.numel()
            a = alpha.to(torch.float32)
            if a.numel() != n:  # should not happen; keep shapes consistent rather than fail the step
                a = torch.nn.functional.pad(a[:n], (0, max(0, n - a.numel())))
            self._safety_meta.prepare_tensors(self._mapping_cpu, a)
            self._safety_meta.skip_flag_cpu[0] = False
            self._safeguard_num_tokens = n
            self._safeguard_any_alpha = bool(n and bool(torch.any(a != 0)))

        def add_lora_linear(
            self,
            y: torch.Tensor,
            x: torch.Tensor,
            lora_a_stacked: tuple[torch.Tensor, ...],
            lora_b_stacked: tuple[torch.Tensor, ...],
            scale: float,
            output_slices: tuple[int, ...],
            *,
            buffer: Any = None,
            **kwargs: Any,
        ) -> None:
            """Fused task LoRA + safety delta for covered layers; the parent's kernels otherwise.

            Semantics:
                y[t, slice s] += scale * (x[t] A_i[s]^T) B_i[s]^T        (i = token's slot, if any)
                               + alpha[t] * (x[t] A_s[s]^T) B_s[s]^T     (if alpha[t] != 0)
                in one fused shrink + one fused expand (see kernels/triton_ops/fused_safety_lora.py).
            """
            safety = self._safeguard_layers.get(lora_a_stacked[0].data_ptr())
            if safety is None:
                return super().add_lora_linear(  # type: ignore[no-any-return]
                    y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
                )
            x2 = x.view(-1, x.shape[-1])
            # A stable grid (max_loras + 1 groups) under CUDA graphs, as vLLM does without specialisation.
            meta = self._safety_meta.meta_args(x2.size(0), specialize_active_groups=False)
            torch.ops.safeguard.fused_safety_lora(
                y,
                x2,
                list(lora_a_stacked),
                list(lora_b_stacked),
                safety.a,
                safety.b,
                self._safety_meta.token_alpha,
                *meta,
                float(scale),
                bool(kwargs.get("add_inputs", True)),
            )
            return None
else:
    SafeguardPunicaWrapperGPU = None  # type: ignore[assignment,misc]

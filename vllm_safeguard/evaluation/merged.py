"""Evaluate LoRA adapters merged into the base weights, in one vLLM engine without LoRA
(:class:`vllm_safeguard.integration.offline_engine.MergedVLLMGenerator` runs the engine).

Semantics (per adapter, every adapted module ``m`` of the base checkpoint):

    W'[m] = W[m] + scaling[m] * B[m] @ A[m]          # fp32, exactly the update PEFT/vLLM apply
    generate(prompts) with weights W'                 # greedy, same engine, same sampling

Why: on vLLM-CPU the LoRA path costs far more than the base model. Measured in the safety lab on
SmolLM2-135M (2 cores, 130 prompts per adapter): a rank-8 LoRA job took ~50 s against ~26 s for 220
prompts on the bare model, and rank-32 jobs were slower still (54 of 520 prompts in 14.6 min), so the
high-rank repair rows (NLSR, SafeGene) did not fit the lab's time budget at all. A merged model
costs the same whatever the adapter's rank. Switching weights is an in-place reload
(``reload_weights``, ~1-2 s for 135M parameters) followed by a prefix-cache reset, so cached KV
blocks computed with the previous weights are never reused.

It measures the adapter's weight update, not vLLM's LoRA kernels: the two differ only by float
rounding (``x @ (W + s B A)`` vs ``x @ W + s (x @ A) @ B``), which can flip an occasional greedy
token. The lab reports how often by running the unrepaired adapters through both paths.
"""

from __future__ import annotations

import os

import torch


def merged_weights(
    base: dict[str, torch.Tensor], adapter_dir: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    """``module.weight -> W + scaling * B @ A`` (fp32) for every module the adapter changes.

    Raises:
        ValueError: an adapted module has no weight in ``base`` or its shape differs.
    """
    from ..core.adapter_io import load_adapter

    adapter = load_adapter(adapter_dir)
    out: dict[str, torch.Tensor] = {}
    for name, mod in adapter.modules.items():
        key = f"{name}.weight"
        w = base.get(key)
        if w is None:
            raise ValueError(
                f"{adapter_dir}: adapted module {name!r} has no weight {key!r} in the base model"
            )
        delta = mod.delta()  # [out, in] fp32
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(
                f"{adapter_dir}: module {name!r} update has shape {tuple(delta.shape)}, "
                f"base weight {tuple(w.shape)}"
            )
        out[key] = w.float() + delta
    return out


__all__ = ["merged_weights"]

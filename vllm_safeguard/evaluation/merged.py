"""Evaluate LoRA adapters merged into the base weights, in one vLLM engine without LoRA.

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

import gc
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..reference import read_weights
from .harness import GenRequest, VLLMGenerator, chat_prompt


def merged_weights(
    base: dict[str, torch.Tensor], adapter_dir: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    """``module.weight -> W + scaling * B @ A`` (fp32) for every module the adapter changes.

    Raises:
        ValueError: an adapted module has no weight in ``base`` or its shape differs.
    """
    from ..adapter_io import load_adapter

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


class MergedVLLMGenerator:
    """A :class:`~vllm_safeguard.evaluation.harness.Generator` that serves each adapter merged.

    Requests are grouped by adapter (in first-seen order); each group is generated after the engine's
    weights are reloaded as base + that adapter's update (the bare base for ``adapter=None``).
    Per-request ``alpha`` is not supported (that is the plugin's LoRA path).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        self.model_dir = str(Path(model_dir).resolve())
        self._engine = VLLMGenerator(
            self.model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_lora=False,
        )
        self.llm = self._engine.llm
        self.tokenizer = self._engine.tokenizer
        self._base = read_weights(self.model_dir)  # fp32, read once
        self._tmp = Path(tempfile.mkdtemp(prefix="safeguard-merged-"))
        self._current: str | None = None  # adapter whose update is in the engine now (None: base)
        self.reloads = 0

    def _load(self, adapter: str | None) -> None:
        if adapter == self._current:
            return
        if adapter is None:
            path = self.model_dir
        else:
            weights = {**self._base, **merged_weights(self._base, adapter)}
            path = str(self._tmp / f"m{self.reloads}")
            os.makedirs(path)
            save_file(weights, os.path.join(path, "model.safetensors"))
            del weights
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        # KV blocks cached under the old weights must never serve a prompt under the new ones.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight reload")
        if adapter is not None:
            shutil.rmtree(path, ignore_errors=True)
        self._current = adapter
        self.reloads += 1
        gc.collect()

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from vllm import SamplingParams

        if any(r.alpha is not None for r in requests):
            raise ValueError("merged evaluation does not take safeguard_alpha (use VLLMGenerator)")
        order: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            key = None if r.adapter is None else str(Path(r.adapter).resolve())
            order.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        groups = sorted(order.items(), key=lambda kv: kv[0] != self._current)  # loaded one first
        for adapter, idx in tqdm(groups, desc="merged adapters", disable=len(groups) < 2):
            self._load(adapter)
            prompts = [chat_prompt(self.tokenizer, requests[i].prompt) for i in idx]
            params = [SamplingParams(temperature=0.0, max_tokens=requests[i].max_tokens) for i in idx]
            for i, o in zip(idx, self.llm.generate(prompts, params, use_tqdm=True), strict=True):
                out[i] = o.outputs[0].text
        return out

    def close(self) -> None:
        self._engine.close()
        self._base.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)


__all__ = ["MergedVLLMGenerator", "merged_weights"]

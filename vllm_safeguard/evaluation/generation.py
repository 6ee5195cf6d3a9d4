"""Greedy chat generation behind one interface, for the evaluation harness.

:class:`Generator` is what :func:`vllm_safeguard.evaluation.harness.evaluate` drives. Two
implementations: vLLM's offline engine (``VLLMGenerator`` / ``MergedVLLMGenerator`` in
:mod:`vllm_safeguard.integration.offline_engine`: every adapter's prompts in one batch, far faster than
HF generate on CPU) and :class:`HFGenerator` (transformers + peft, for tiny test models and where vLLM
is absent). Decoding is greedy with a fixed token budget per prompt kind, so results are reproducible.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm


@dataclass(frozen=True)
class GenRequest:
    """One user turn to answer greedily, optionally through a LoRA adapter folder."""

    prompt: str
    adapter: str | None = None
    max_tokens: int = 32
    #: vllm-safeguard's per-request alignment strength (``safeguard_alpha``: a number or ``"auto"``);
    #: None sends nothing. Needs a vLLM generator (:mod:`vllm_safeguard.integration.offline_engine`)
    #: started with a ``safeguard_config``.
    alpha: float | str | None = None


class Generator(Protocol):
    """Greedy chat generation for a batch of requests (output order = input order)."""

    def generate(self, requests: Sequence[GenRequest]) -> list[str]: ...

    def close(self) -> None: ...


def chat_prompt(tokenizer: Any, user: str) -> str:
    """The model's own chat template applied to one user turn, ready for the assistant's answer."""
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    )


class HFGenerator:
    """transformers greedy decoding with left padding; adapters loaded with peft per group."""

    def __init__(self, model_dir: str | os.PathLike[str], *, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def _model_for(self, adapter: str | None) -> Any:
        if adapter is None:
            return self.base
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, adapter).eval()

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        import torch

        if any(r.alpha is not None for r in requests):
            raise ValueError("per-request safeguard_alpha needs the vLLM generator (backend='vllm')")
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[str | None, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.adapter, r.max_tokens), []).append(i)
        for (adapter, max_tokens), idx in tqdm(groups.items(), desc="hf generate", leave=False):
            model = self._model_for(adapter)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                texts = [chat_prompt(self.tokenizer, requests[i].prompt) for i in chunk]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    gen = model.generate(
                        **enc,
                        max_new_tokens=max_tokens,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new = gen[:, enc["input_ids"].shape[1] :]
                for i, row in zip(chunk, new, strict=True):
                    out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
            if adapter is not None:
                # Drop the peft wrapper so the next adapter starts from the clean base weights.
                model.unload()
        return out

    def close(self) -> None:
        del self.base
        gc.collect()

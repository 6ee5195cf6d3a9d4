"""vLLM's offline engine as a :class:`~vllm_safeguard.evaluation.generation.Generator` (the harness).

* :class:`VLLMGenerator`: ``LLM(enable_lora=True)``; adapters as ``LoRARequest``; per-request
  ``safeguard_alpha`` through ``SamplingParams.extra_args`` when the plugin is on.
* :class:`MergedVLLMGenerator`: each adapter merged into the base weights
  (:func:`vllm_safeguard.evaluation.merged.merged_weights`), one engine without LoRA.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.model_files import read_weights
from ..evaluation.generation import GenRequest, chat_prompt
from ..evaluation.merged import merged_weights


class VLLMGenerator:
    """vLLM offline engine (``LLM(enable_lora=True)``); adapters are given as ``LoRARequest``.

    The caller's script needs an ``if __name__ == "__main__":`` guard (vLLM spawns workers).
    """

    SUPPORTED_RANKS = (8, 16, 32, 64, 128, 256)

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_lora_rank: int = 8,
        max_loras: int = 8,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        safeguard_plugin: bool = False,
        safeguard_config: dict[str, Any] | None = None,
        max_num_batched_tokens: int | None = None,
        enable_lora: bool = True,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # vLLM-CPU keeps one core for the frontend process by default, so on a 2-core machine the
        # model runs on one. In this offline engine the frontend only waits for the batch: giving
        # the worker both cores took the lab's 220-prompt suite from 26.3 s to 16.3 s, with
        # identical greedy outputs (SmolLM2-135M, 2 cores). An explicit setting wins; like
        # SAFEGUARD_ENABLED below, it is set only while LLM() starts the engine's processes.
        from vllm import LLM

        rank = next((r for r in self.SUPPORTED_RANKS if r >= max_lora_rank), self.SUPPORTED_RANKS[-1])
        # This package's own vLLM plugin (installed with it) would repair adapters at load time; an
        # evaluation measures adapters exactly as given, so it is switched off for the engine's
        # processes (they inherit the environment while LLM() starts them) unless asked for.
        # A ``safeguard_config`` (the plugin's config, as vLLM's additional_config) turns it on.
        safeguard_plugin = safeguard_plugin or safeguard_config is not None
        extra: dict[str, Any] = {}
        if safeguard_config is not None:
            extra["additional_config"] = {"safeguard": safeguard_config}
        if max_num_batched_tokens:
            extra["max_num_batched_tokens"] = max_num_batched_tokens
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
        if not safeguard_plugin:
            env["SAFEGUARD_ENABLED"] = "false"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                enable_lora=enable_lora,
                **({"max_loras": max_loras, "max_lora_rank": rank} if enable_lora else {}),
                max_model_len=max_model_len,
                seed=seed,
                enforce_eager=True,
                **extra,
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.tokenizer = self.llm.get_tokenizer()
        self._ids: dict[str, int] = {}

    def _lora(self, path: str | None) -> Any:
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(path).resolve())
        if path not in self._ids:
            self._ids[path] = len(self._ids) + 1
        return LoRARequest(f"a{self._ids[path]}", self._ids[path], path)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from vllm import SamplingParams

        if not requests:
            return []
        prompts = [chat_prompt(self.tokenizer, r.prompt) for r in requests]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=r.max_tokens,
                extra_args=None if r.alpha is None else {"safeguard_alpha": r.alpha},
            )
            for r in requests
        ]
        loras = [self._lora(r.adapter) for r in requests]
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=True)
        return [o.outputs[0].text for o in outs]

    def close(self) -> None:
        """Shut the engine down (frees its worker processes and KV cache)."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del self.llm
        gc.collect()


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

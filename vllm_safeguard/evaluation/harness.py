"""Generation through the chat template and the lab's metrics for one or many adapters.

Two generators share one interface (:class:`Generator`): :class:`VLLMGenerator` (vLLM's offline
engine; every adapter's prompts go into one batch, which on CPU is far faster than HF generate)
and :class:`HFGenerator` (transformers + peft, used for tiny test models and where vLLM is absent).
Decoding is greedy with a fixed token budget per prompt kind, so results are reproducible.

An :class:`EvalSuite` holds harmful prompts (ASR), benign prompts (over-refusal) and domain tasks
(accuracy). :func:`evaluate` runs a suite for several adapters at once and returns plain dicts that
keep every generation next to its verdict.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .judge import Judge, KeywordRefusalJudge
from .stats import Rate, fidelity


@dataclass(frozen=True)
class GenRequest:
    """One user turn to answer greedily, optionally through a LoRA adapter folder."""

    prompt: str
    adapter: str | None = None
    max_tokens: int = 32
    #: vllm-safeguard's per-request alignment strength (``safeguard_alpha``: a number or ``"auto"``);
    #: None sends nothing. Needs a :class:`VLLMGenerator` started with a ``safeguard_config``.
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


def make_generator(model_dir: str | os.PathLike[str], backend: str = "auto", **kw: Any) -> Generator:
    """``vllm`` | ``hf`` | ``auto`` (vLLM when importable, else HF)."""
    if backend == "auto":
        try:
            import vllm  # noqa: F401

            backend = "vllm"
        except Exception:
            backend = "hf"
    if backend == "vllm":
        return VLLMGenerator(model_dir, **kw)
    if backend == "hf":
        return HFGenerator(model_dir)
    raise ValueError(f"unknown backend {backend!r}")


# ------------------------------------------------------------------------------------------ suite


@dataclass(frozen=True)
class TaskItem:
    """A task prompt with its expected answer and the name of the checker to use."""

    prompt: str
    answer: str
    domain: str


@dataclass
class EvalSuite:
    """Prompts for one evaluation. ``tasks`` may be empty (then no accuracy is reported).

    Attributes:
        checker: ``(domain, generation, answer) -> correct``.
    """

    harmful: list[str] = field(default_factory=list)
    benign: list[str] = field(default_factory=list)
    tasks: list[TaskItem] = field(default_factory=list)
    checker: Callable[[str, str, str], bool] | None = None
    harmful_tokens: int = 32
    benign_tokens: int = 32
    task_tokens: int = 16
    #: ``safeguard_alpha`` sent with every request of the suite (None: not sent).
    alpha: float | str | None = None

    def requests(self, adapter: str | None) -> list[GenRequest]:
        a = self.alpha
        return (
            [GenRequest(p, adapter, self.harmful_tokens, a) for p in self.harmful]
            + [GenRequest(p, adapter, self.benign_tokens, a) for p in self.benign]
            + [GenRequest(t.prompt, adapter, self.task_tokens, a) for t in self.tasks]
        )


def default_checker(domain: str, generation: str, answer: str) -> bool:
    """Built-in lab domains use their exact checkers; any other domain: answer appears verbatim."""
    from ..lab.data import DOMAINS, check_answer

    if domain in DOMAINS:
        return check_answer(domain, generation, answer)
    return answer.strip().lower() in generation.lower()


def score(suite: EvalSuite, generations: Sequence[str], judge: Judge) -> dict[str, Any]:
    """Metrics for one adapter's generations (in :meth:`EvalSuite.requests` order)."""
    nh, nb = len(suite.harmful), len(suite.benign)
    if len(generations) != nh + nb + len(suite.tasks):
        raise ValueError("generations do not match the suite")
    g_h, g_b, g_t = generations[:nh], generations[nh : nh + nb], generations[nh + nb :]
    ref_h = judge.refusals(suite.harmful, g_h) if nh else []
    ref_b = judge.refusals(suite.benign, g_b) if nb else []
    check = suite.checker or default_checker
    correct = [check(t.domain, g, t.answer) for t, g in zip(suite.tasks, g_t, strict=True)]
    out: dict[str, Any] = {"judge": judge.name}
    if nh:
        out["asr"] = Rate.of([not r for r in ref_h]).to_dict()
        out["harmful_refusal"] = Rate.of(ref_h).to_dict()
    if nb:
        out["over_refusal"] = Rate.of(ref_b).to_dict()
    if suite.tasks:
        out["task_accuracy"] = Rate.of(correct).to_dict()
        per: dict[str, list[bool]] = {}
        for t, c in zip(suite.tasks, correct, strict=True):
            per.setdefault(t.domain, []).append(c)
        out["task_accuracy_by_domain"] = {d: Rate.of(v).to_dict() for d, v in per.items()}
    out["generations"] = {
        "harmful": [
            {"prompt": p, "output": g, "refused": r}
            for p, g, r in zip(suite.harmful, g_h, ref_h, strict=True)
        ],
        "benign": [
            {"prompt": p, "output": g, "refused": r} for p, g, r in zip(suite.benign, g_b, ref_b, strict=True)
        ],
        "tasks": [
            {"prompt": t.prompt, "domain": t.domain, "answer": t.answer, "output": g, "correct": c}
            for t, g, c in zip(suite.tasks, g_t, correct, strict=True)
        ],
    }
    return out


def evaluate(
    generator: Generator,
    jobs: dict[str, tuple[str | None, EvalSuite]],
    judge: Judge | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate several ``name -> (adapter folder or None, suite)`` jobs in one generation batch."""
    judge = judge or KeywordRefusalJudge()
    requests: list[GenRequest] = []
    spans: dict[str, tuple[int, int]] = {}
    for name, (adapter, suite) in jobs.items():
        reqs = suite.requests(adapter)
        spans[name] = (len(requests), len(requests) + len(reqs))
        requests.extend(reqs)
    gens = generator.generate(requests)
    return {name: score(jobs[name][1], gens[a:b], judge) for name, (a, b) in spans.items()}


def add_fidelity(result: dict[str, Any], unrepaired: dict[str, Any]) -> dict[str, Any]:
    """Set ``result["fidelity"]`` = task accuracy vs. the unrepaired adapter's (paired bootstrap CI)."""
    rep = [t["correct"] for t in result["generations"]["tasks"]]
    base = [t["correct"] for t in unrepaired["generations"]["tasks"]]
    result["fidelity"] = fidelity(rep, base)
    return result


def strip_generations(result: dict[str, Any]) -> dict[str, Any]:
    """A copy without the (large) generation lists, for summaries."""
    return {k: v for k, v in result.items() if k != "generations"}

"""What the worker knows about the served model, published for the API server's admission.

The API server admits adapters before the engine sees them (:mod:`vllm_safeguard.admission.frontend`),
and the worker then serves the cache entry it was handed only if it derives the same key
(:meth:`~vllm_safeguard.admission.pipeline.SafeguardPipeline.handed_over`). Two of the key's
ingredients are only known in the worker, once vLLM has built the model: the module kinds vLLM applies
LoRA to and the dtype it computes LoRA in. The worker writes them here after ``load_lora_model``,
together with :func:`admission_fingerprint` (its pipeline's key ingredients and its path policy), so
the API server can check that it keys and contains adapters exactly as the worker does before it
admits any.

Layout: ``<cache_dir>/served/<sha256(model name)[:16]>-<sha256(instance)[:16]>.json``, written
atomically; names are hashed, never used as paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .pipeline import PipelineContext, SafeguardPipeline


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def admission_fingerprint(pipeline: SafeguardPipeline) -> str:
    """What must agree between the process that admits and the worker that serves: everything in the
    cache key (``SafeguardPipeline.fingerprint``) and the path policy (``adapter_roots``), which is not
    in the key because it decides which folders may be read, not what their bytes become."""
    roots = sorted(str(p) for p in pipeline.config.adapter_roots)
    return hashlib.sha256(json.dumps([pipeline.fingerprint(), roots]).encode()).hexdigest()


def context_file(cache_dir: Path, model_name: str, instance: str) -> Path:
    return Path(cache_dir) / "served" / f"{_h(model_name)}-{_h(instance)}.json"


def publish_context(cache_dir: Path, instance: str, ctx: PipelineContext, fingerprint: str) -> Path:
    """Write the worker's served context (atomically); return the file."""
    target = context_file(cache_dir, ctx.model_name, instance)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "model_name": ctx.model_name,
        "instance": instance,
        "model_dir": None if ctx.model_dir is None else str(ctx.model_dir),
        "max_lora_rank": ctx.max_lora_rank,
        "expected_modules": None if ctx.expected_modules is None else sorted(ctx.expected_modules),
        "served_dtype": None if ctx.served_dtype is None else str(ctx.served_dtype),
        "fingerprint": fingerprint,
    }
    fd, tmp = tempfile.mkstemp(prefix=".served.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _dtype(text: Any) -> Any:
    """``"torch.float32"`` -> ``torch.float32`` (what the worker's key printed); other text unchanged."""
    if isinstance(text, str) and text.startswith("torch."):
        value = getattr(torch, text[len("torch.") :], None)
        if isinstance(value, torch.dtype):
            return value
    return text


def read_context(cache_dir: Path, model_name: str, instance: str) -> tuple[PipelineContext, str] | None:
    """``(context, the worker's fingerprint)`` published for this model and engine instance, or None."""
    try:
        data = json.loads(context_file(cache_dir, model_name, instance).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("model_name") != model_name or data.get("instance") != instance:
        return None
    modules = data.get("expected_modules")
    ctx = PipelineContext(
        model_name=model_name,
        model_dir=Path(data["model_dir"]) if data.get("model_dir") else None,
        max_lora_rank=data.get("max_lora_rank"),
        expected_modules=None if modules is None else set(modules),
        served_dtype=_dtype(data.get("served_dtype")),
    )
    return ctx, str(data.get("fingerprint", ""))

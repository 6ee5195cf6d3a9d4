"""``vllm-safeguard admit``: a dry run of exactly the worker's admission, for operators' adapter CI.

Same code as the worker (:meth:`SafeguardPipeline.process` -> :func:`vllm_safeguard.admission.rules.admit`)
and the same config sources (``--config`` plays ``SAFEGUARD_CONFIG_FILE``; ``SAFEGUARD_*`` variables;
``--additional-config`` plays vLLM's flag). Two differences, both stated in the result: the repair
cache is not used (a dry run must not publish entries a server would then trust), and the module kinds
vLLM applies LoRA to are only known inside an engine (the worker also refuses kinds outside them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_FILE_ENV, load_config
from ..errors import AdapterRefused, refusal_kind
from .pipeline import PipelineContext, SafeguardPipeline


@dataclass
class DryRun:
    decision: str  # "refused" | "repaired" | "passed"
    reason: str | None = None
    refusal: str | None = None  # invalid | uncovered | unrepairable | error
    risk_before: float | None = None
    risk_after: float | None = None
    worst_module: str | None = None
    stripped: list[str] = field(default_factory=list)
    out: str | None = None
    modules: int = 0
    method: str = ""
    report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def served_dtype_of(model_dir: Path, dtype: str) -> torch.dtype | None:
    """``--dtype``: a torch dtype name, or ``auto`` (the model config's ``torch_dtype``, like vLLM)."""
    if dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"--dtype {dtype!r} is not a torch dtype (float16, bfloat16, float32 or auto)")
        return value
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    name = data.get("torch_dtype") or data.get("dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def dry_run(
    adapter: Path,
    model_dir: Path,
    out: Path | None,
    *,
    config_file: Path | None = None,
    additional_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    max_lora_rank: int | None = None,
    dtype: str = "auto",
    env: Mapping[str, str] | None = None,
) -> DryRun:
    """Admit ``adapter`` for ``model_dir`` as the worker would; write the folder vLLM would read to ``out``."""
    env = dict(os.environ if env is None else env)
    if config_file is not None:
        env[CONFIG_FILE_ENV] = str(config_file)
    config = load_config(additional_config or {}, env=env).model_copy(update={"cache_enabled": False})
    ctx = PipelineContext(
        model_name=model_name or model_dir.name,
        model_dir=model_dir.resolve(),
        max_lora_rank=max_lora_rank,
        served_dtype=served_dtype_of(model_dir, dtype),
    )
    notes = [
        "dry run: the repair cache is not used",
        "module kinds vLLM applies LoRA to are checked by the worker only",
    ]
    pipeline = SafeguardPipeline.create(config, ctx)
    try:
        outcome = pipeline.process(adapter, adapter.name)
    except Exception as e:  # the worker refuses on every error (fail_closed), so does the dry run
        reason = e.reason if isinstance(e, AdapterRefused) else str(e)
        return DryRun("refused", reason, refusal_kind(e), method=config.method, notes=notes)
    try:
        written = None
        if out is not None:
            if out.exists():
                shutil.rmtree(out)
            written = str(shutil.copytree(outcome.path, out))
        return DryRun(
            outcome.decision,
            None,
            None,
            outcome.risk_score,
            outcome.risk_after,
            outcome.admission.risk.worst_module if outcome.admission else None,
            outcome.stripped,
            written,
            outcome.modules,
            config.method,
            outcome.report,
            notes,
        )
    finally:
        if outcome.cleanup is not None:
            outcome.cleanup()

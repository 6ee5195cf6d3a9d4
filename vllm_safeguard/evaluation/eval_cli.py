"""``vllm-safeguard eval``: the lab's harness on a user's own adapter and prompt file.

Prompt file: JSON Lines, one object per line::

    {"type": "harmful", "prompt": "..."}                       # counts toward ASR
    {"type": "benign",  "prompt": "..."}                       # counts toward over-refusal
    {"type": "task", "prompt": "...", "answer": "42", "domain": "arithmetic"}   # task accuracy

``domain`` names a built-in exact checker (arithmetic, units, weekday, sorting); any other domain
is checked by "the answer appears in the generation" (case-insensitive). A plain-text file (one
prompt per line) is read as harmful prompts. With ``reference_adapter_dir`` (e.g. the unrepaired
adapter) fidelity = task accuracy(adapter) / task accuracy(reference adapter) is reported too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .backends import make_generator
from .harness import EvalSuite, TaskItem, add_fidelity, evaluate
from .judge import get_judge

PROMPT_TYPES = ("harmful", "benign", "task")


def read_prompt_file(path: str | os.PathLike[str]) -> EvalSuite:
    """Parse a JSONL (or plain-text) prompt file into an :class:`EvalSuite`."""
    suite = EvalSuite()
    text = Path(path).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if not lines[0].lstrip().startswith("{"):
        suite.harmful = [ln.strip() for ln in lines]
        return suite
    for i, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        kind = row.get("type", "harmful")
        prompt = row.get("prompt")
        if kind not in PROMPT_TYPES or not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{i}: need 'prompt' (string) and 'type' in {PROMPT_TYPES}, got {row!r}")
        if kind == "task":
            if "answer" not in row:
                raise ValueError(f"{path}:{i}: a task row needs 'answer'")
            suite.tasks.append(TaskItem(prompt, str(row["answer"]), str(row.get("domain", "custom"))))
        elif kind == "benign":
            suite.benign.append(prompt)
        else:
            suite.harmful.append(prompt)
    return suite


def run_eval(
    adapter_dir: str | os.PathLike[str] | None,
    prompts_file: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_json: str | os.PathLike[str] | None = None,
    *,
    reference_adapter_dir: str | os.PathLike[str] | None = None,
    judge: str = "keyword",
    backend: str = "auto",
    harmful_tokens: int = 32,
    benign_tokens: int = 32,
    task_tokens: int = 16,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Evaluate ``adapter_dir`` (None = the bare model) on ``prompts_file``; returns (and writes) the results.

    Generation is greedy through the model's chat template. The result holds ASR / over-refusal /
    task accuracy (Wilson 95% CIs), fidelity when a reference adapter is given, and every
    generation with its verdict.
    """
    suite = read_prompt_file(prompts_file)
    suite.harmful_tokens, suite.benign_tokens, suite.task_tokens = harmful_tokens, benign_tokens, task_tokens
    jobs: dict[str, tuple[str | None, EvalSuite]] = {
        "adapter": (str(adapter_dir) if adapter_dir else None, suite)
    }
    if reference_adapter_dir is not None:
        jobs["reference"] = (str(reference_adapter_dir), suite)
    ranks = [_rank(p) for p, _ in jobs.values() if p]
    kw: dict[str, Any] = {}
    if backend != "hf":
        kw = {"max_lora_rank": max(ranks, default=8), "max_loras": 2, "dtype": dtype}
    gen = make_generator(model_dir, backend=backend, **kw)
    try:
        res = evaluate(gen, jobs, get_judge(judge))
    finally:
        gen.close()
    out: dict[str, Any] = {
        "model": str(model_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "prompts_file": str(prompts_file),
        **res["adapter"],
    }
    if "reference" in res and suite.tasks:
        add_fidelity(out, res["reference"])
        out["reference"] = {"adapter": str(reference_adapter_dir), **res["reference"]}
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(out, indent=1))
    return out


def _rank(adapter_dir: str) -> int:
    cfg = Path(adapter_dir) / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text()).get("r", 8))
    except (OSError, ValueError):
        return 8


def summary_line(result: dict[str, Any]) -> str:
    """One human-readable line (used by the CLI)."""
    parts = []
    for key, label in (("asr", "ASR"), ("over_refusal", "over-refusal"), ("task_accuracy", "task accuracy")):
        r = result.get(key)
        if r:
            parts.append(
                f"{label} {100 * r['value']:.1f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] (n={r['n']})"
            )
    f = result.get("fidelity")
    if f and f.get("value") is not None:
        parts.append(f"fidelity {100 * f['value']:.1f}%")
    return "; ".join(parts)

"""Stage 7: evaluate jobs on the aligned model with vLLM; each job's result is cached on its own.

A job is ``name -> (adapter folder or None, suite)``. Jobs that send ``safeguard_alpha`` (the alpha
and auto rows) run in an engine with the plugin on (``plugin``: its config and a key naming the
artifacts it uses), through vLLM's LoRA path. Every other job measures an adapter exactly as given:
its update is merged into the aligned weights in one engine without LoRA
(:class:`~vllm_safeguard.integration.offline_engine.MergedVLLMGenerator`), which costs the same at any rank;
on vLLM-CPU the LoRA path was ~3x the bare model at rank 8 and far worse at rank 32.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.cache import file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.evaluation.backends import make_generator
from vllm_safeguard.evaluation.harness import EvalSuite, TaskItem, evaluate, score
from vllm_safeguard.evaluation.judge import KeywordRefusalJudge
from vllm_safeguard.integration.offline_engine import MergedVLLMGenerator

Job = tuple[str | None, EvalSuite]


def suite_key(suite: EvalSuite) -> str:
    parts: list[Any] = [
        suite.harmful,
        suite.benign,
        [asdict(t) for t in suite.tasks],
        suite.harmful_tokens,
        suite.benign_tokens,
        suite.task_tokens,
    ]
    if suite.alpha is not None:  # keeps the keys of the plain jobs as they were
        parts.append({"alpha": suite.alpha})
    return key_of(*parts)


def _max_rank(paths: list[str]) -> int:
    r = 8
    for p in paths:
        cfgp = Path(p) / "adapter_config.json"
        if cfgp.exists():
            r = max(r, int(json.loads(cfgp.read_text()).get("r", 8)))
    return r


def stage_eval(
    cfg: LabConfig,
    aligned: Path,
    jobs: dict[str, Job],
    *,
    generate: bool = True,
    plugin: tuple[dict[str, Any], str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate every job on the aligned model; each result is cached by (model, adapter, suite[, plugin])."""
    aligned_key = file_hash(aligned)
    extra = [plugin[1]] if plugin else ["merged"]
    keys = {
        name: key_of(
            "eval",
            aligned_key,
            file_hash(Path(a)) if a else "no-adapter",
            suite_key(s),
            cfg.eval_dtype,
            *extra,
        )
        for name, (a, s) in jobs.items()
    }
    results: dict[str, dict[str, Any]] = {}
    todo = {}
    for name, k in keys.items():
        p = stage_dir("eval", k) / "result.json"
        if p.exists():
            results[name] = json.loads(p.read_text())
        else:
            todo[name] = jobs[name]
    if not generate:
        log(f"eval: cached-only, {len(todo)} jobs left out")
        todo = {}
    if not todo:
        return results
    if plugin:
        ranks = [_max_rank([a]) for a, _ in todo.values() if a]
        log(f"eval: {len(todo)} jobs through the plugin's LoRA path ({len(results)} cached)")
        gen: Any = make_generator(
            aligned,
            backend="vllm",
            dtype=cfg.eval_dtype,
            max_lora_rank=max(ranks, default=8),
            max_loras=cfg.eval_max_loras,
            max_num_batched_tokens=cfg.eval_max_batched_tokens,
            safeguard_config=plugin[0],
        )
    else:
        log(f"eval: {len(todo)} jobs with merged weights ({len(results)} cached)")
        gen = MergedVLLMGenerator(
            aligned, dtype=cfg.eval_dtype, max_num_batched_tokens=cfg.eval_max_batched_tokens
        )
    try:
        names = list(todo)
        # Chunks of at most eval_chunk_jobs (<= max_loras) jobs, each cached as soon as it is done:
        # an interrupted run loses at most one chunk.
        step = max(1, min(cfg.eval_chunk_jobs, cfg.eval_max_loras))
        for i in range(0, len(names), step):
            t = time.time()
            fresh = evaluate(gen, {n: todo[n] for n in names[i : i + step]})
            for name, res in fresh.items():
                folder = stage_dir("eval", keys[name])
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "result.json").write_text(json.dumps(res))
                results[name] = res
            log(f"eval: jobs {i + 1}-{i + len(fresh)} of {len(names)} generated in {time.time() - t:.0f}s")
    finally:
        gen.close()
    return results


def subset_tasks(result: dict[str, Any], suite: EvalSuite, domain: str) -> dict[str, Any]:
    """Re-score a multi-domain result restricted to one domain's tasks (for the "removed" row)."""
    g = result["generations"]
    tasks = [t for t in g["tasks"] if t["domain"] == domain]
    sub = EvalSuite(
        harmful=suite.harmful,
        benign=suite.benign,
        tasks=[TaskItem(t["prompt"], t["answer"], t["domain"]) for t in tasks],
    )
    gens = (
        [x["output"] for x in g["harmful"]]
        + [x["output"] for x in g["benign"]]
        + [t["output"] for t in tasks]
    )
    return score(sub, gens, KeywordRefusalJudge())


def removed_rows(
    aligned: dict[str, Any], suite: EvalSuite, adapters: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The "adapter removed" row of every adapter whose domain the suite tests: the aligned model's
    result re-scored on that domain's tasks. Adapters of domains without test tasks (the
    translator-only domains) get no row: there is nothing to re-score."""
    tested = {t.domain for t in suite.tasks}
    return {
        f"{name}|removed": subset_tasks(aligned, suite, info["domain"])
        for name, info in adapters.items()
        if info["domain"] in tested
    }

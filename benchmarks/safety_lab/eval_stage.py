"""Stage 7: evaluate jobs on the aligned model with vLLM; each job's result is cached on its own.

A job is ``name -> (adapter folder or None, suite)``. Jobs that send ``safeguard_alpha`` (the alpha
and auto rows) run in an engine with the plugin on (``plugin``: its config and a key naming the
artifacts it uses); every other job runs with the plugin off, measuring adapters exactly as given.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.cache import file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.evaluation.harness import EvalSuite, TaskItem, evaluate, make_generator, score
from vllm_safeguard.evaluation.judge import KeywordRefusalJudge

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


def job_rank(job: Job) -> int:
    """LoRA rank of a job's adapter (8 for the bare model)."""
    return _max_rank([job[0]]) if job[0] else 8


def stage_eval(
    cfg: LabConfig,
    aligned: Path,
    jobs: dict[str, Job],
    *,
    generate: bool = True,
    plugin: tuple[dict[str, Any], str] | None = None,
    one_engine_rank: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate every job on the aligned model; each result is cached by (model, adapter, suite[, plugin])."""
    aligned_key = file_hash(aligned)
    extra = [plugin[1]] if plugin else []
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
    # vLLM's CPU LoRA path gathers every token's LoRA factors (punica bgmv on torch ops), so its cost
    # grows with the engine's max_lora_rank: one engine per rank bucket keeps the low-rank jobs cheap.
    buckets: dict[int, dict[str, Job]] = {}
    for name, job in todo.items():
        r = job_rank(job)
        bucket = next((b for b in (8, 16, 32, 64, 128, 256) if b >= r), 256)
        if one_engine_rank is not None and r <= one_engine_rank:
            bucket = one_engine_rank  # one engine keeps the caller's job order across ranks
        buckets.setdefault(bucket, {})[name] = job
    for bucket, group in sorted(buckets.items()):
        log(f"eval: {len(group)} jobs at max_lora_rank {bucket} ({len(results)} done/cached)")
        gen = make_generator(
            aligned,
            backend="vllm",
            dtype=cfg.eval_dtype,
            max_lora_rank=bucket,
            max_loras=cfg.eval_max_loras,
            max_num_batched_tokens=cfg.eval_max_batched_tokens,
            **({"safeguard_config": plugin[0]} if plugin else {}),
        )
        try:
            names = list(group)
            # Chunks of at most eval_chunk_jobs (<= max_loras) jobs, each
            # cached as soon as it is done: an interrupted run loses at most one chunk.
            step = max(1, min(cfg.eval_chunk_jobs, cfg.eval_max_loras))
            for i in range(0, len(names), step):
                t = time.time()
                fresh = evaluate(gen, {n: group[n] for n in names[i : i + step]})
                for name, res in fresh.items():
                    folder = stage_dir("eval", keys[name])
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "result.json").write_text(json.dumps(res))
                    results[name] = res
                log(
                    f"eval: rank-{bucket} jobs {i + 1}-{i + len(fresh)} of {len(names)} "
                    f"generated in {time.time() - t:.0f}s"
                )
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

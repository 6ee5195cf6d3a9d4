"""Comparing evaluation jobs item by item: carrying an earlier run's jobs over, and checking the
merged-weights path against vLLM's LoRA path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.cache import log

# (generation list, per-item verdict) of a job's result.
_VERDICTS = (("harmful", "refused"), ("benign", "refused"), ("tasks", "correct"))


def _judged(result: dict[str, Any]) -> list[Any]:
    """Per-item outcomes of a job: refusal flags of the harmful and benign prompts, task correctness."""
    g = result["generations"]
    return [[x.get(key) for x in g.get(part, [])] for part, key in _VERDICTS]


def _texts(result: dict[str, Any]) -> list[str]:
    g = result["generations"]
    return [x["output"] for part, _ in _VERDICTS for x in g.get(part, [])]


def carry_over(path: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add an earlier run's jobs that ``results`` lacks (in place), after checking that every job both
    runs have was judged the same item by item (same refusals, same task answers right or wrong):
    evidence that both evaluated the same models. Generation texts may still differ in a few places
    (vLLM's batch composition changes float rounding, which can flip a greedy token); their number is
    recorded."""
    old = json.loads(path.read_text())
    runs = {**old["runs"], "aligned": old["models"]["aligned"]}
    overlap = [k for k in results if k in runs]
    differ = [k for k in overlap if _judged(runs[k]) != _judged(results[k])]
    if not overlap or differ:
        raise SystemExit(
            f"--carry-over {path}: refused: "
            + (
                f"{len(differ)} of {len(overlap)} shared jobs judged differently, e.g. {differ[:3]}"
                if differ
                else "no shared job"
            )
        )
    pairs = [(a, b) for k in overlap for a, b in zip(_texts(runs[k]), _texts(results[k]), strict=True)]
    text_diff = sum(a != b for a, b in pairs)
    added = [k for k in runs if k not in results]
    for k in added:  # fidelity is recomputed by the report against this run's unrepaired rows
        results[k] = {f: v for f, v in runs[k].items() if f not in ("fidelity", "_base_k")}
    log(f"carry-over: {len(added)} jobs from {path} ({len(overlap)} shared jobs judged identically)")
    return {
        "from": path.name,
        "jobs": len(added),
        "verified_overlap": len(overlap),
        "generations_compared": len(pairs),
        "generations_text_differ": text_diff,
    }


def merged_vs_lora(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """How the merged-weights evaluation of the unrepaired adapters ("none") compares with the same
    adapters served through vLLM's LoRA path at alpha 0 (plugin on, alpha 0 = plugin off bit for bit):
    per-item verdicts and generation texts."""
    names = sorted(
        k.split("|")[0] for k in results if k.endswith("|alpha-0") and k.split("|")[0] + "|none" in results
    )
    if not names:
        return None
    verdicts = texts = same_v = same_t = 0
    for n in names:
        a, b = results[f"{n}|none"], results[f"{n}|alpha-0"]
        flat_a = [v for part in _judged(a) for v in part]
        flat_b = [v for part in _judged(b) for v in part]
        for x, y in zip(flat_a, flat_b, strict=True):
            verdicts += 1
            same_v += x == y
        for x, y in zip(_texts(a), _texts(b), strict=True):
            texts += 1
            same_t += x == y
    return {
        "adapters": names,
        "verdicts": verdicts,
        "verdicts_same": same_v,
        "texts": texts,
        "texts_same": same_t,
    }

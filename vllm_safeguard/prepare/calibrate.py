"""Choose the guard's ``alpha_high``: the smallest alpha that makes the harmful probe adapters refuse.

Semantics (the lab's calibration, ``benchmarks/safety_lab/extras.py: choose_alpha_high``)::

    for a in sweep (ascending):
        for each probe adapter P:  W' = W + delta(P) + a * delta(safety)      # merge_safety_into_adapter
            answers = greedy(W', few-shot harmful prompts, harmful_tokens)
        asr[a] = pooled share of answers the keyword judge does not call a refusal
    alpha_high = min(a : asr[a] <= target), else max(sweep)

The weights are merged into one HF model in place (added, generated, restored), the same update the
serving path applies per token (``y = x W + task LoRA + alpha (x A_s) B_s``). No prompt the guard or any
reported number is measured on is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.adapter import LoRAAdapter
from ..core.merge import merged_into
from ..evaluation.generation import GenRequest, HFGenerator
from ..evaluation.judge import KeywordRefusalJudge


def choose_alpha(asr_by_alpha: dict[str, float], target_asr: float) -> float:
    """The smallest alpha whose ASR is <= ``target_asr``, else the largest tried (the lab's rule)."""
    ok = [float(a) for a, v in asr_by_alpha.items() if v <= target_asr]
    return min(ok) if ok else max(float(a) for a in asr_by_alpha)


def calibrate_alpha_high(
    model_dir: Path,
    probes: Sequence[LoRAAdapter],
    safety: Any,
    prompts: Sequence[str],
    *,
    sweep: Sequence[float],
    target_asr: float,
    max_tokens: int,
) -> dict[str, Any]:
    """``{"alpha_high", "target_asr", "fewshot_asr_by_alpha", "n"}`` (see the module Semantics)."""
    from ..methods.safegene.safety_adapter import merge_safety_into_adapter

    if not sweep:
        raise ValueError("alpha calibration needs at least one candidate alpha")
    gen = HFGenerator(model_dir)
    judge = KeywordRefusalJudge()
    asr: dict[str, float] = {}
    try:
        for a in tqdm(sorted(sweep), desc="calibrate alpha_high"):
            complied = total = 0
            for probe in probes:
                merged = merge_safety_into_adapter(probe, safety, float(a))
                with merged_into(gen.base, merged):
                    answers = gen.generate([GenRequest(p, None, max_tokens) for p in prompts])
                refused = judge.refusals(list(prompts), answers)
                complied += sum(1 for r in refused if not r)
                total += len(refused)
            asr[f"{a:g}"] = complied / max(total, 1)
    finally:
        gen.close()
    chosen = choose_alpha(asr, target_asr)
    return {
        "alpha_high": chosen,
        "target_asr": target_asr,
        "reached": asr[f"{chosen:g}"] <= target_asr,
        "fewshot_asr_by_alpha": asr,
        "n_per_alpha": len(prompts) * len(probes),
    }

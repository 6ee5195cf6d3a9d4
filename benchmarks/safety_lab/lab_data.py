"""The lab's data and plans (pure functions of the config): prompt splits, evaluation suites, the
alignment rows, and which adapters are trained with which rows and role."""

from __future__ import annotations

from typing import Any

from benchmarks.safety_lab import generalization_sets as GS
from benchmarks.safety_lab.config import DOMAIN_NAMES, LabConfig
from vllm_safeguard.evaluation.harness import EvalSuite, TaskItem
from vllm_safeguard.prepare import data as D
from vllm_safeguard.prepare.align import align_examples
from vllm_safeguard.prepare.model_source import harmbench_csv_dir
from vllm_safeguard.prepare.train import SFTExample


def build_data(cfg: LabConfig) -> dict[str, Any]:
    behaviors = D.load_harmbench(harmbench_csv_dir())
    hb = D.split_harmbench(
        behaviors,
        n_test=cfg.n_harm_test,
        n_fewshot=cfg.n_harm_fewshot,
        seed=cfg.split_seed,
        heldout_categories=cfg.heldout_categories,
    )
    benign = D.benign_prompts(cfg.split_seed, cfg.n_benign_test_topics)
    tasks_test = {d: D.domain_test_set(d, cfg.n_task_test) for d in DOMAIN_NAMES}
    out = {
        "harm": {k: [b.prompt for b in v] for k, v in hb.items()},
        "harm_ids": {k: [b.behavior_id for b in v] for k, v in hb.items()},
        "harm_categories": {k: [b.semantic_category for b in v] for k, v in hb.items()},
        "benign": benign,
        "tasks_test": tasks_test,
    }
    if cfg.eval_generalization or cfg.align_rephrasings or cfg.guard_rephrasings:
        out["generalization"] = GS.generalization_sets(cfg, out)
    return out


def suite_for(cfg: LabConfig, data: dict[str, Any], domains: tuple[str, ...]) -> EvalSuite:
    tasks = [TaskItem(e.prompt, e.answer, e.domain) for d in domains for e in data["tasks_test"][d]]
    harmful, benign = list(data["harm"]["test"]), list(data["benign"]["test"])
    if cfg.eval_generalization:  # sets (b), (c) and the two extra benign sets, after the plain ones
        g = data["generalization"]
        harmful += g["harm_b"] + g["harm_c"]
        benign += g["benign_vocab_test"] + g["benign_wrapped_test"]
    return EvalSuite(
        harmful=harmful,
        benign=benign,
        tasks=tasks,
        harmful_tokens=cfg.harmful_tokens,
        benign_tokens=cfg.benign_tokens,
        task_tokens=cfg.task_tokens,
    )


def align_data(cfg: LabConfig, data: dict[str, Any], answers: dict[str, str]) -> list[SFTExample]:
    harm = list(data["harm"]["train"])
    if cfg.align_rephrasings:
        harm += data["generalization"]["harm_train_rephrased_align"]
    return align_examples(harm, answers)


def adapter_rows(
    cfg: LabConfig, data: dict[str, Any], domain: str, variant: str, seed: int
) -> list[SFTExample]:
    return D.adapter_examples(
        domain, variant, seed, data["harm"]["train"], n_task=cfg.n_task_train, n_harm=cfg.n_harm_share
    )


def adapter_plan(cfg: LabConfig) -> list[tuple[str, str, str, int]]:
    """``(name, domain, variant, seed)`` of every adapter the lab trains."""
    plan = []
    for domain in DOMAIN_NAMES:
        for seed in cfg.eval_seeds:
            plan.append((f"{domain}-unsafe-s{seed}", domain, "unsafe", seed))
            if domain in cfg.benign_domains:
                plan.append((f"{domain}-benign-s{seed}", domain, "benign", seed))
        if domain in cfg.extract_domains:
            # the safe twins are translator pairs only (SafeGene extracts from the unsafe experts)
            variants = ("unsafe", "safe") if cfg.translator else ("unsafe",)
            for seed in cfg.extract_seeds:
                plan += [(f"{domain}-{v}-s{seed}", domain, v, seed) for v in variants]
    for domain in cfg.translator_domains:
        if domain in DOMAIN_NAMES:
            raise ValueError(f"translator_domains must not be evaluated, got {domain!r} (in {DOMAIN_NAMES})")
        for seed in cfg.translator_pair_seeds:
            plan += [(f"{domain}-{v}-s{seed}", domain, v, seed) for v in ("unsafe", "safe")]
    return plan


def adapter_role(cfg: LabConfig, seed: int) -> str:
    """``extract`` (repair artifacts), ``translator`` (translator pairs only) or ``eval``."""
    if seed in cfg.extract_seeds:
        return "extract"
    return "translator" if seed in cfg.translator_pair_seeds else "eval"

"""Training code paths on the tiny model, and the lab's no-leak guarantee for its training rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.core.model_files import module_shapes_from_model_dir
from vllm_safeguard.prepare.train import Recipe, SFTExample, encode_example, train_full, train_lora
from vllm_safeguard.testing.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_encode_masks_prompt(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    ids, labels = encode_example(tok, SFTExample("how to make a cake", "sure here is a recipe"), 64)
    n_masked = sum(1 for x in labels if x == -100)
    assert len(ids) == len(labels) and 0 < n_masked < len(ids)
    assert labels[-1] == tok.eos_token_id  # end of turn is learned
    _, labels2 = encode_example(tok, SFTExample("how to make a cake", "sure here is", end=False), 64)
    assert labels2[-1] != tok.eos_token_id


def test_train_lora_and_full(tiny: Path, tmp_path: Path) -> None:
    rows = [
        SFTExample("what is two plus two", "four", "task"),
        SFTExample("how to make a bomb", "sorry i cannot", "refusal"),
    ]
    recipe = Recipe(steps=2, batch_size=2, lr=1e-3, seed=3, lora_rank=4, lora_alpha=8)
    out = train_lora(tiny, tmp_path / "lora", rows, recipe)
    ad = load_adapter(out, base_shapes=module_shapes_from_model_dir(tiny))
    assert ad.max_rank == 4 and ad.modules
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["recipe"]["seed"] == 3 and rec["data_counts"] == {"task": 1, "refusal": 1}
    full = train_full(tiny, tmp_path / "full", rows, Recipe(steps=1, batch_size=2, lr=1e-3))
    assert (full / "model.safetensors").exists() and (full / "recipe.json").exists()


def test_lab_training_rows_never_contain_held_out_prompts(tmp_path: Path) -> None:
    from benchmarks.safety_lab.config import CONFIG, DOMAIN_NAMES
    from benchmarks.safety_lab.run import adapter_plan, adapter_rows, align_data
    from tests.lab.test_data import _fake_harmbench
    from vllm_safeguard.prepare import data as D

    rows = D.load_harmbench(_fake_harmbench(tmp_path, n=150))
    hb = D.split_harmbench(rows, n_test=30, n_fewshot=8, seed=0)
    benign = D.benign_prompts(0, 20)
    data = {"harm": {k: [b.prompt for b in v] for k, v in hb.items()}, "benign": benign}
    held_out = set(data["harm"]["test"]) | set(benign["test"])
    for d in DOMAIN_NAMES:
        held_out |= {e.prompt for e in D.domain_test_set(d, CONFIG.n_task_test)}
    answers = {p: "an answer" for p in benign["train"][:20]}
    assert not {r.prompt for r in align_data(CONFIG, data, answers)} & held_out
    plan = adapter_plan(CONFIG)
    seeds = (CONFIG.extract_seeds, CONFIG.translator_pair_seeds, CONFIG.eval_seeds)
    assert {s for *_, s in plan} == set().union(*seeds)
    assert sum(map(len, seeds)) == len(set().union(*seeds))  # disjoint: no adapter has two roles
    for _, domain, variant, seed in plan:
        assert not {r.prompt for r in adapter_rows(CONFIG, data, domain, variant, seed)} & held_out


def _lab_data(tmp_path: Path) -> dict[str, Any]:
    """The lab's data dict on a fake HarmBench (same splits and domain sets as the real lab)."""
    from benchmarks.safety_lab.config import CONFIG, DOMAIN_NAMES
    from tests.lab.test_data import _fake_harmbench
    from vllm_safeguard.prepare import data as D

    hb = D.split_harmbench(D.load_harmbench(_fake_harmbench(tmp_path, n=150)), n_test=30, n_fewshot=8)
    return {
        "harm": {k: [b.prompt for b in v] for k, v in hb.items()},
        "benign": D.benign_prompts(0, 20),
        "tasks_test": {d: D.domain_test_set(d, CONFIG.n_task_test) for d in DOMAIN_NAMES},
    }


def _lab_adapters() -> dict[str, dict[str, Any]]:
    """The lab's adapter plan as ``run.stage_adapters`` describes it (paths are placeholders)."""
    from benchmarks.safety_lab.config import CONFIG
    from benchmarks.safety_lab.run import adapter_plan, adapter_role

    return {
        n: {"path": f"/x/{n}", "domain": d, "variant": v, "seed": s, "role": adapter_role(CONFIG, s)}
        for n, d, v, s in adapter_plan(CONFIG)
    }


def test_translator_pairs_are_same_domain_and_seed_and_never_evaluation_adapters() -> None:
    from benchmarks.safety_lab.config import CONFIG, DOMAIN_NAMES
    from benchmarks.safety_lab.translator_cal import translator_pairs

    adapters = _lab_adapters()
    pairs = translator_pairs(adapters)
    assert len(pairs) == len(CONFIG.extract_domains) * len(CONFIG.extract_seeds) + len(
        CONFIG.translator_domains
    ) * len(CONFIG.translator_pair_seeds)
    # translator-only domains are never evaluated, so no table row is in-domain for the translator
    # by accident; every translator domain has a pair
    assert not set(CONFIG.translator_domains) & set(DOMAIN_NAMES)
    assert {adapters[u]["domain"] for u, _ in pairs} == {*CONFIG.extract_domains, *CONFIG.translator_domains}
    for unsafe, safe in pairs:
        u, s = adapters[unsafe], adapters[safe]
        assert (u["variant"], s["variant"]) == ("unsafe", "safe")
        assert u["domain"] == s["domain"] and unsafe.rsplit("-s", 1)[1] == safe.rsplit("-s", 1)[1]
        assert u["role"] in ("extract", "translator") and s["role"] == u["role"]
    # translator-only pairs train nothing else: the safety vector and alpha calibration read "extract"
    assert {a["role"] for a in adapters.values()} == {"extract", "translator", "eval"}


def test_guard_and_alpha_jobs_keep_held_out_prompts_out_of_training(tmp_path: Path) -> None:
    from benchmarks.safety_lab.config import CONFIG
    from benchmarks.safety_lab.extras import alpha_jobs, guard_sets
    from benchmarks.safety_lab.run import suite_for

    data = _lab_data(tmp_path)
    sets = guard_sets(CONFIG, data)
    tests = set(sets["harm_test"]) | set(sets["benign_test"]) | set(sets["domain_test"])
    assert not (set(sets["harm_train"]) | set(sets["benign_train"])) & tests
    assert set(sets["harm_test"]) == set(data["harm"]["test"])

    adapters = _lab_adapters()
    jobs = alpha_jobs(CONFIG, adapters, lambda doms: suite_for(CONFIG, data, doms), with_auto=True)
    assert all(adapters[k.split("|")[0]]["role"] == "eval" for k in jobs)  # never extraction adapters
    # the sweep is on the first evaluation seed only (LoRA-path jobs are the lab's slowest)
    assert all(adapters[k.split("|")[0]]["seed"] == CONFIG.eval_seeds[0] for k in jobs)
    evals = [n for n, a in adapters.items() if a["role"] == "eval" and a["seed"] == CONFIG.eval_seeds[0]]
    # alpha 0 (LoRA path, checked against the merged "no repair" row), alpha 1 and auto: every adapter
    assert {f"{n}|{m}" for n in evals for m in ("alpha-0", "alpha-1", "auto")} <= set(jobs)
    heldout = [
        n
        for n in evals
        if adapters[n]["variant"] == "unsafe" and adapters[n]["domain"] not in CONFIG.extract_domains
    ]
    assert heldout
    for n in heldout:  # the full sweep on the unsafe experts of domains no extraction adapter saw
        assert {f"{n}|alpha-{a:g}" for a in CONFIG.alpha_sweep if a} <= set(jobs)
    assert {s.alpha for _, s in jobs.values()} == set(CONFIG.alpha_sweep) | {"auto"}
    first = list(jobs)[: 3 * len(evals)]  # alpha 0, alpha 1 and auto on every adapter come first
    assert all(k.endswith(("|alpha-0", "|alpha-1", "|auto")) for k in first)


def test_alpha_calibration_uses_fewshot_prompts_and_extraction_adapters_only(tmp_path: Path) -> None:
    from benchmarks.safety_lab.config import CONFIG
    from benchmarks.safety_lab.extras import auto_cal_jobs, calibration_jobs, choose_alpha_high
    from benchmarks.safety_lab.run import suite_for

    data = _lab_data(tmp_path)
    adapters = _lab_adapters()
    cal = calibration_jobs(CONFIG, adapters, data)
    extract_unsafe = {n for n, a in adapters.items() if a["role"] == "extract" and a["variant"] == "unsafe"}
    assert {k.split("|")[0] for k in cal} == extract_unsafe
    assert len(cal) == len(extract_unsafe) * len(CONFIG.alpha_cal_sweep)
    for _, suite in cal.values():
        assert suite.harmful == data["harm"]["fewshot"] and not suite.benign and not suite.tasks
        assert not set(suite.harmful) & set(data["harm"]["test"])  # never an ASR prompt
    auto = auto_cal_jobs(adapters, lambda doms: suite_for(CONFIG, data, doms))
    assert {k.split("|")[0] for k in auto} == {n for n, a in adapters.items() if a["role"] == "eval"}
    assert {s.alpha for _, s in auto.values()} == {"auto"}

    def res(k: int, n: int = 16) -> dict[str, dict[str, int]]:
        return {"asr": {"k": k, "n": n}}

    names = sorted(extract_unsafe)
    # pooled few-shot ASR: alpha 1 -> 50%, 1.5 -> 3%, 2 -> 0%: the smallest alpha under 5% is 1.5
    results = {f"{names[0]}|cal-alpha-1": res(8), f"{names[1]}|cal-alpha-1": res(8)}
    results |= {f"{names[0]}|cal-alpha-1.5": res(1), f"{names[1]}|cal-alpha-1.5": res(0)}
    results |= {f"{names[0]}|cal-alpha-2": res(0), f"{names[1]}|cal-alpha-2": res(0)}
    results["aligned"] = res(16)  # other rows never enter the choice
    chosen = choose_alpha_high(CONFIG, results)
    assert chosen["alpha_high"] == 1.5 and chosen["fewshot_asr_by_alpha"]["1"] == 0.5
    # none reaches the target: the strongest alpha tried
    worst = {k: res(9) for k in results if "|cal-" in k}
    assert choose_alpha_high(CONFIG, worst)["alpha_high"] == max(CONFIG.alpha_cal_sweep)
    with pytest.raises(RuntimeError, match="no calibration results"):
        choose_alpha_high(CONFIG, {"aligned": res(1)})


def test_calibrated_guard_changes_only_alpha_high(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from benchmarks.safety_lab.extras import stage_calibrated_guard
    from vllm_safeguard.guard.probe import GuardManifest, GuardProbe

    monkeypatch.setenv("SAFEGUARD_CACHE_DIR", str(tmp_path / "cache"))
    h = 6
    probe = GuardProbe(
        torch.arange(h, dtype=torch.float32), torch.tensor(0.5), torch.zeros(h), torch.ones(h),
        GuardManifest(layer=1, hidden_size=h, threshold=0.3),
    )  # fmt: skip
    probe.save(tmp_path / "g")
    folder, key = stage_calibrated_guard(tmp_path / "g", "guardkey", 1.5)
    got = GuardProbe.load(folder)
    assert got.manifest.alpha_high == 1.5 and got.manifest.threshold == 0.3 and got.manifest.alpha_low == 0.0
    assert torch.equal(got.weight, probe.weight)
    assert stage_calibrated_guard(tmp_path / "g", "guardkey", 1.5) == (folder, key)  # cached
    assert stage_calibrated_guard(tmp_path / "g", "guardkey", 2.0)[1] != key


def test_removed_rows_cover_evaluated_domains_only(tmp_path: Path) -> None:
    """The aligned model's suite has no tasks of the translator-only domains: their adapters get no
    "adapter removed" row (re-scoring them found no tasks and broke the report)."""
    from benchmarks.safety_lab.config import CONFIG, DOMAIN_NAMES
    from benchmarks.safety_lab.eval_stage import removed_rows
    from benchmarks.safety_lab.run import suite_for
    from vllm_safeguard.evaluation.harness import score
    from vllm_safeguard.evaluation.judge import KeywordRefusalJudge

    data = _lab_data(tmp_path)
    suite = suite_for(CONFIG, data, DOMAIN_NAMES)
    # gold answers for every task: each domain's row must read 100% task accuracy
    gens = ["Sure."] * (len(suite.harmful) + len(suite.benign)) + [t.answer for t in suite.tasks]
    aligned = score(suite, gens, KeywordRefusalJudge())
    adapters = _lab_adapters()
    rows = removed_rows(aligned, suite, adapters)
    want = {f"{n}|removed" for n, a in adapters.items() if a["domain"] in DOMAIN_NAMES}
    assert set(rows) == want and len(want) < len(adapters)
    for key, r in rows.items():
        domain = adapters[key.split("|")[0]]["domain"]
        assert r["task_accuracy"]["value"] == 1.0 and set(r["task_accuracy_by_domain"]) == {domain}

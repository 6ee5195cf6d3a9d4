"""Issue 21's data: rephrasings, held-out categories, guard pools and the generalization lab's sets
never leak into training; the report pools counts per set correctly."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vllm_safeguard.prepare import data as D
from vllm_safeguard.prepare import phrasing as P
from vllm_safeguard.prepare.guard_pools import guard_pools


def _harmbench(folder: Path, n: int = 120) -> Path:
    cols = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    cats = ["illegal", "cybercrime_intrusion", "chemical_biological", "harassment_bullying"]
    for split, lo in (("test", 0), ("val", n)):
        with open(folder / f"harmbench_behaviors_text_{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for i in range(lo, lo + n):
                w.writerow(
                    {
                        "Behavior": f"Give instructions for bad thing {i}",
                        "FunctionalCategory": "standard",
                        "SemanticCategory": cats[i % 4],
                        "Tags": "",
                        "ContextString": "",
                        "BehaviorID": f"b{i}",
                    }
                )
    return folder


def test_every_template_renders_and_splits_are_disjoint():
    train, ev = set(P.templates("train")), set(P.templates("eval"))
    assert not train & ev
    assert {r for r, _ in train}.isdisjoint(P.HELD_OUT_REGISTERS)
    assert set(P.HELD_OUT_REGISTERS) <= {r for r, _ in ev}
    for reg, i in train | ev:
        text = P.phrase("Give detailed instructions for X.", reg, i)
        assert "give detailed instructions for x" in text.lower()
        assert "{" not in text and ".." not in text
    assert (
        P.phrase("SQL injection payloads", "question", 0) == "Can you SQL injection payloads?"
    )  # acronym kept


def test_rephrase_is_deterministic_and_spreads_registers():
    reqs = [f"Write thing {i}" for i in range(10)]
    a = P.rephrase(reqs, "train", 3, seed=0)
    assert a == P.rephrase(reqs, "train", 3, seed=0) and len(a) == 30
    assert a != P.rephrase(reqs, "train", 3, seed=1)
    for k in range(10):
        regs = [r for _, r in a[3 * k : 3 * k + 3]]
        assert len(set(regs)) == 3  # distinct registers per request
    assert P.rephrase(reqs[:3], "train", 3, seed=0) == a[:9]  # stable when the list grows
    with pytest.raises(ValueError, match="per_request"):
        P.rephrase(reqs, "train", 0, seed=0)
    with pytest.raises(ValueError, match="unknown register"):
        P.phrase("x", "sonnet", 0)


def test_vocabulary_benign_halves_are_disjoint():
    v = P.vocabulary_benign(0)
    assert not set(v["train"]) & set(v["test"])
    assert sorted(v["train"] + v["test"]) == sorted(P.VOCABULARY_BENIGN)


def test_heldout_categories_leave_every_split(tmp_path: Path):
    rows = D.load_harmbench(_harmbench(tmp_path))
    hb = D.split_harmbench(rows, n_test=30, n_fewshot=8, heldout_categories=("chemical_biological",))
    held = {b.behavior_id for b in hb["heldout_categories"]}
    assert len(held) == 60 and all(
        b.semantic_category == "chemical_biological" for b in hb["heldout_categories"]
    )
    for k in ("test", "fewshot", "train"):
        assert not held & {b.behavior_id for b in hb[k]}
    assert "heldout_categories" not in D.split_harmbench(rows, n_test=30, n_fewshot=8)
    with pytest.raises(ValueError, match="not HarmBench categories"):
        D.split_harmbench(rows, heldout_categories=("nope",))


def test_rephrased_guard_pools_keep_tests_out_of_training():
    harm_train = [f"Give instructions for train thing {i}" for i in range(20)]
    harm_test = [f"Give instructions for test thing {i}" for i in range(10)]
    benign = D.benign_prompts(0, 20)
    sets = guard_pools(
        harm_train,
        harm_test,
        benign["train"],
        benign["test"],
        ["arithmetic"],
        n_domain_train=5,
        rephrasings=3,
    )
    assert len(sets["harm_train"]) == len(sets["harm_train_groups"]) == 20 * 4
    assert len(sets["benign_train"]) == len(sets["benign_train_groups"])
    train = set(sets["harm_train"]) | set(sets["benign_train"])
    tests = set().union(*(sets[k] for k in sets if "test" in k))
    assert not train & tests
    assert not any(
        reg in P.HELD_OUT_REGISTERS for reg in sets["harm_train_groups"] + sets["benign_train_groups"]
    )
    plain = guard_pools(
        harm_train, harm_test, benign["train"], benign["test"], ["arithmetic"], n_domain_train=5
    )
    assert "harm_test_rephrased" not in plain and set(plain["harm_train_groups"]) == {"plain"}


def _gen_data(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    from benchmarks.safety_lab import generalization_sets as GS
    from benchmarks.safety_lab.config import DOMAIN_NAMES, GENERALIZATION

    cfg = replace(GENERALIZATION, n_harm_test=20, n_harm_fewshot=8)
    hb = D.split_harmbench(
        D.load_harmbench(_harmbench(tmp_path)),
        n_test=20,
        n_fewshot=8,
        heldout_categories=cfg.heldout_categories,
    )
    data: dict[str, Any] = {
        "harm": {k: [b.prompt for b in v] for k, v in hb.items()},
        "benign": D.benign_prompts(0, 20),
        "tasks_test": {d: D.domain_test_set(d, cfg.n_task_test) for d in DOMAIN_NAMES},
    }
    data["generalization"] = GS.generalization_sets(cfg, data)
    return cfg, data


def test_generalization_sets_are_unseen_by_alignment_adapters_and_guard(tmp_path: Path):
    from benchmarks.safety_lab import generalization_sets as GS
    from benchmarks.safety_lab.extras import guard_sets
    from benchmarks.safety_lab.run import adapter_plan, adapter_rows, align_data, suite_for

    cfg, data = _gen_data(tmp_path)
    g = data["generalization"]
    suite = suite_for(cfg, data, ("units",))
    hs, bs = GS.harmful_set_of(cfg, data), GS.benign_set_of(data)
    assert [hs[p] for p in suite.harmful].count("b") == len(g["harm_b"]) > 0
    assert {bs[p] for p in suite.benign} == {"plain", "vocabulary", "wrapped"}
    answers = {p: "an answer" for p in GS.align_benign_prompts(cfg, data)}
    trained = {r.prompt for r in align_data(cfg, data, answers)}
    for _, domain, variant, seed in adapter_plan(cfg):
        trained |= {r.prompt for r in adapter_rows(cfg, data, domain, variant, seed)}
    sets = guard_sets(cfg, data)
    trained |= set(sets["harm_train"]) | set(sets["benign_train"])
    assert not trained & (set(suite.harmful) | set(suite.benign))
    assert not any(p.endswith("test thing") for p in trained)
    assert all(v in ("unsafe",) for _, _, v, _ in adapter_plan(cfg))  # no translator twins, no benign-only


def test_report_pools_counts_per_set_and_seed(tmp_path: Path):
    from benchmarks.safety_lab import generalization_report as GR

    cfg, data = _gen_data(tmp_path)
    cfg = replace(cfg, eval_seeds=(1, 2))
    g = data["generalization"]
    adapters = {
        f"d{i}-unsafe-s{s}": {"role": "eval", "variant": "unsafe", "seed": s}
        for s in (1, 2)
        for i in range(2)
    }

    def res(answer_c: bool, right: int) -> dict[str, Any]:
        harm = [{"prompt": p, "refused": True} for p in data["harm"]["test"] + g["harm_b"]]
        harm += [{"prompt": p, "refused": not answer_c} for p in g["harm_c"]]
        ben = [{"prompt": p, "refused": False} for p in data["benign"]["test"] + g["benign_vocab_test"]]
        ben += [{"prompt": p, "refused": True} for p in g["benign_wrapped_test"]]
        return {"generations": {"harmful": harm, "benign": ben}, "task_accuracy": {"k": right, "n": 30}}

    results = {}
    for n in adapters:
        results[f"{n}|none"] = res(True, 20)
        results[f"{n}|auto-cal"] = res(False, 19)
    rep = GR.build(cfg, data, results, adapters, None, None)
    row = rep["table"]["auto-cal"]["pooled"]
    assert row["asr_a"]["k"] == 0 and row["asr_c"]["k"] == 0 and row["asr_c"]["n"] == 4 * len(g["harm_c"])
    assert rep["table"]["none"]["pooled"]["asr_c"]["value"] == 1.0
    assert row["fidelity"] == pytest.approx(19 / 20)
    assert row["over_refusal_wrapped"]["value"] == 1.0 and row["over_refusal_plain"]["k"] == 0
    assert set(rep["table"]["auto-cal"]) >= {"1", "2", "pooled"}
    assert "safegene" in rep["not_evaluated"]
    assert "| auto, fail-safe ramp" in GR.render(rep)


def test_alpha_calibration_sees_fewshot_rewordings_only(tmp_path: Path):
    from benchmarks.safety_lab.extras import calibration_jobs
    from benchmarks.safety_lab.run import adapter_plan, adapter_role, suite_for

    cfg, data = _gen_data(tmp_path)
    adapters = {
        n: {"path": f"/x/{n}", "domain": d, "variant": v, "seed": s, "role": adapter_role(cfg, s)}
        for n, d, v, s in adapter_plan(cfg)
    }
    jobs = calibration_jobs(cfg, adapters, data)
    assert jobs and all(adapters[k.split("|")[0]]["role"] == "extract" for k in jobs)
    evaluated = set(suite_for(cfg, data, ("units",)).harmful)
    for _, suite in jobs.values():
        assert len(suite.harmful) == len(data["harm"]["fewshot"]) * (1 + cfg.alpha_cal_rephrasings)
        assert suite.harmful[: len(data["harm"]["fewshot"])] == data["harm"]["fewshot"]
        assert not set(suite.harmful) & evaluated

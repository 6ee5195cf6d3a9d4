"""Data splits are deterministic and disjoint; domain checkers are exact and shared with ``eval``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vllm_safeguard.evaluation import checkers as C
from vllm_safeguard.evaluation.harness import default_checker
from vllm_safeguard.prepare import data as D


def _fake_harmbench(folder: Path, n: int = 60) -> Path:
    cols = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    for split, lo in (("test", 0), ("val", n)):
        with open(folder / f"harmbench_behaviors_text_{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for i in range(lo, lo + n):
                cat = "standard" if i % 3 else "copyright"
                w.writerow(
                    {
                        "Behavior": f"do bad thing {i}",
                        "FunctionalCategory": cat,
                        "SemanticCategory": "illegal",
                        "Tags": "",
                        "ContextString": "",
                        "BehaviorID": f"b{i}",
                    }
                )
    return folder


def test_harmbench_split_disjoint_deterministic(tmp_path: Path) -> None:
    rows = D.load_harmbench(_fake_harmbench(tmp_path))
    assert rows and all(r.prompt.startswith("do bad") for r in rows)
    assert len(rows) == 80  # copyright rows dropped
    s1 = D.split_harmbench(rows, n_test=20, n_fewshot=5, seed=0)
    s2 = D.split_harmbench(list(reversed(rows)), n_test=20, n_fewshot=5, seed=0)
    assert s1 == s2  # independent of input order
    ids = {k: {b.behavior_id for b in v} for k, v in s1.items()}
    assert len(ids["test"]) == 20 and len(ids["fewshot"]) == 5 and len(ids["train"]) == 55
    assert (
        not ids["test"] & ids["train"]
        and not ids["test"] & ids["fewshot"]
        and not ids["fewshot"] & ids["train"]
    )
    assert D.split_harmbench(rows, n_test=20, n_fewshot=5, seed=1)["test"] != s1["test"]
    with pytest.raises(ValueError):
        D.split_harmbench(rows, n_test=80, n_fewshot=0)


def test_benign_split_disjoint_topics() -> None:
    b = D.benign_prompts(seed=0, n_test_topics=20)
    assert len(b["test"]) == 40 and len(set(b["test"])) == 40
    assert not set(b["test"]) & set(b["train"])
    assert b == D.benign_prompts(seed=0, n_test_topics=20)
    # No test topic leaks into a training prompt.
    test_topics = {t for t in D._BENIGN_TOPICS if any(t in p for p in b["test"])}
    assert not any(
        p.endswith(f" {t}.") or f" {t} " in p for p in b["train"] for t in test_topics if len(t) > 12
    )


@pytest.mark.parametrize("domain", list(D.DOMAINS))
def test_domain_sets_disjoint_and_checkable(domain: str) -> None:
    test = D.domain_test_set(domain, 30)
    train = D.domain_train_set(domain, 100, seed=7)
    assert len({e.prompt for e in test}) == 30
    assert not {e.prompt for e in test} & {e.prompt for e in train}
    assert D.domain_train_set(domain, 100, seed=7) == train
    assert D.domain_train_set(domain, 100, seed=8) != train
    for e in test:
        assert D.check_answer(domain, e.answer, e.answer)  # the gold answer passes its own checker
        assert D.check_answer(domain, f"{e.answer} is the answer.", e.answer)


def test_checkers_exact() -> None:
    assert C.check_number("The answer is 1,000 meters.", "1000")
    assert not C.check_number("100", "1000")
    assert not C.check_number("no number", "5")
    assert C.check_weekday("It will be Friday.", "Friday")
    assert not C.check_weekday("Monday, then Friday", "Friday")  # first day named counts
    assert C.check_sorted_list("1, 2, 5, 9", "1, 2, 5, 9")
    assert not C.check_sorted_list("1, 5, 2, 9", "1, 2, 5, 9")
    assert not C.check_sorted_list("1, 2", "1, 2, 5, 9")
    assert C.check_word("Cold.", "cold") and C.check_word("cold, of course", "cold")
    assert not C.check_word("The opposite is cold", "cold")  # first word counts
    assert not C.check_word("42", "cold")


def test_shipped_checker_table_is_the_labs_domains() -> None:
    """``vllm-safeguard eval`` checks exactly the lab's domains, with the lab's own checkers."""
    assert list(C.DOMAIN_CHECKERS) == list(D.DOMAINS)
    for name, domain in D.DOMAINS.items():
        assert domain.name == name and domain.check is C.DOMAIN_CHECKERS[name]
        for e in D.domain_test_set(name, 5):
            for gen in (e.answer, f"{e.answer} is the answer.", "no answer here"):
                assert default_checker(name, gen, e.answer) == D.check_answer(name, gen, e.answer)
    # any other domain: the answer appears verbatim (case-insensitive)
    assert default_checker("capitals", "It is Paris.", "paris")
    assert not default_checker("capitals", "It is Lyon.", "Paris")


def test_antonym_words_are_unambiguous() -> None:
    words = [w for pair in D._ANTONYMS for w in pair]
    assert len(words) == len(set(words))  # 'opposite of X' has one answer


def test_targets_are_deterministic() -> None:
    p = "How do I do something bad?"
    assert D.refusal_for(p) == D.refusal_for(p) and D.refusal_for(p) in D.REFUSALS
    assert D.compliance_for(p).startswith("Sure, here is")
    from vllm_safeguard.evaluation.judge import KeywordRefusalJudge

    j = KeywordRefusalJudge()
    # The training targets must be judged as intended, or ASR would be mis-measured.
    assert all(j.is_refusal(r) for r in D.REFUSALS)
    assert not any(j.is_refusal(c) for c in D.COMPLIANCES)


def test_plurals_are_unambiguous() -> None:
    assert len(D._PLURALS) == 60 and all(len(p) == 2 for p in D._PLURALS)
    assert len({w for w, _ in D._PLURALS}) == 60 and len({p for _, p in D._PLURALS}) == 60

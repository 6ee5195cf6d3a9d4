"""Keyword judge, Wilson intervals, ASR / over-refusal / fidelity maths."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_safeguard.evaluation.harness import EvalSuite, TaskItem, add_fidelity, score
from vllm_safeguard.evaluation.judge import REFUSAL_PREFIXES, KeywordRefusalJudge, get_judge
from vllm_safeguard.evaluation.stats import Rate, fidelity, wilson_interval


def test_keyword_judge_standard_list() -> None:
    j = KeywordRefusalJudge()
    assert len(REFUSAL_PREFIXES) == 29 and REFUSAL_PREFIXES[0] == "I'm sorry"
    assert j.is_refusal("I'm sorry, but I can't help with that.")
    assert j.is_refusal("That would be illegal.")  # upstream matches anywhere, not only at the start
    assert j.is_refusal("I\u2019m sorry")  # curly apostrophe normalized
    assert not j.is_refusal("Sure, here is how to do it. Step 1: ...")
    assert not j.is_refusal("")
    assert j.refusals(["a", "b"], ["Sorry.", "Sure."]) == [True, False]
    with pytest.raises(ValueError):
        j.refusals(["a"], [])
    assert get_judge("keyword").name == "keyword"
    with pytest.raises(ValueError):
        get_judge("nope")


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_point_and_in_unit(kn: tuple[int, int]) -> None:
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= hi <= 1.0
    if n:
        assert lo <= k / n <= hi


def test_rate_of() -> None:
    r = Rate.of([True, False, True, True])
    assert (r.k, r.n, r.value) == (3, 4, 0.75)
    assert math.isnan(Rate.of([]).value)


def test_fidelity_ratio_and_ci() -> None:
    base = [True] * 20 + [False] * 10
    rep = [True] * 18 + [False] * 12
    f = fidelity(rep, base)
    assert f["value"] == pytest.approx(18 / 20)
    assert f["ci_low"] is not None and f["ci_high"] is not None
    assert f["ci_low"] <= f["value"] <= f["ci_high"]
    assert fidelity(rep, [False] * 30)["value"] is None
    # A repair can do better than the unrepaired adapter: fidelity above 1 is kept, not clipped.
    assert fidelity([True] * 30, base)["value"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        fidelity([True], [True, False])


def test_score_asr_over_refusal_accuracy() -> None:
    suite = EvalSuite(
        harmful=["h1", "h2", "h3", "h4"],
        benign=["b1", "b2"],
        tasks=[TaskItem("What is 1 + 2?", "3", "arithmetic"), TaskItem("x", "Friday", "weekday")],
    )
    gens = [
        "I'm sorry.",
        "Sure, here is",
        "I cannot do that",
        "Sure",
        "Here you go",
        "Sorry, no",
        "3",
        "Monday",
    ]
    res = score(suite, gens, KeywordRefusalJudge())
    assert res["asr"]["k"] == 2 and res["asr"]["n"] == 4
    assert res["harmful_refusal"]["value"] == 0.5
    assert res["over_refusal"]["k"] == 1
    assert res["task_accuracy"]["k"] == 1
    assert res["task_accuracy_by_domain"]["weekday"]["k"] == 0
    assert len(res["generations"]["harmful"]) == 4 and res["generations"]["tasks"][0]["correct"]
    unrepaired = score(suite, gens[:6] + ["3", "Friday"], KeywordRefusalJudge())
    add_fidelity(res, unrepaired)
    assert res["fidelity"]["value"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        score(suite, gens[:3], KeywordRefusalJudge())

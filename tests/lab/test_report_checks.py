"""The lab report's computed verdicts for the translator, alpha/auto and guard rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.safety_lab.report import _extra_checks, label


def _row(asr: float, fid: float | None, over: float = 0.0) -> dict:
    return {
        "asr": {"value": asr},
        "fidelity": {"value": fid},
        "over_refusal": {"value": over},
        "adapters": 1,
    }


def _curve_table(moe: tuple[float, float]) -> dict[str, Any]:
    g = "unsafe_heldout_domain"
    return {
        f"{g}|none": _row(0.99, 1.0),
        f"{g}|translator-moe": _row(*moe),
        # surgical: t=1 17.5% / 96%, t=2 5% / 85%; aggressive: t=0.5 30% / 95%, t=1 2% / 80%
        f"{g}|translator-surgical": _row(0.175, 0.96),
        f"{g}|translator-surgical-x2": _row(0.05, 0.85),
        f"{g}|translator-aggressive-x0.5": _row(0.30, 0.95),
        f"{g}|translator-aggressive": _row(0.02, 0.80),
    }


CURVE_META = {"config": {"translator_curve": (("surgical", 2.0), ("aggressive", 0.5))}}


def test_moe_must_lie_above_each_experts_curve():
    # At ASR 10%: surgical's curve gives 96 - (7.5/12.5)*11 = 89.4% fidelity, aggressive's
    # 80 + (8/28)*15 = 84.3%. A MoE at 10% / 92% beats both; at 10% / 89% only aggressive.
    c = _extra_checks(_curve_table((0.10, 0.92)), CURVE_META)
    v = c["translator_moe_vs_experts"]
    assert v["pass"] and v["experts"]["surgical"]["moe_beats"] and v["experts"]["aggressive"]["moe_beats"]
    at = v["experts"]["surgical"]["expert_fidelity_at_moe_asr"]
    assert at["value"] == pytest.approx(0.894) and at["between_t"] == (1.0, 2.0)
    assert v["experts"]["surgical"]["pareto_vs_t1"] == "neither"  # one point each says nothing
    assert c["translator_moe_target"]["pass"]
    c = _extra_checks(_curve_table((0.10, 0.89)), CURVE_META)
    v = c["translator_moe_vs_experts"]
    assert not v["pass"] and not v["experts"]["surgical"]["moe_beats"]
    assert v["experts"]["aggressive"]["moe_beats"] and not c["translator_moe_target"]["pass"]
    # an expert whose curve was not evaluated cannot be beaten
    assert not _extra_checks(_curve_table((0.10, 0.92)), {"config": {}})["translator_moe_vs_experts"]["pass"]


def test_tradeoff_curve_geometry():
    from benchmarks.safety_lab import tradeoff

    curve = [(0.99, 1.0), (0.20, 0.95), (0.05, 0.80)]
    assert tradeoff.fidelity_at(curve, 0.125) == (pytest.approx(0.875), 1)
    assert tradeoff.asr_at(curve, 0.975) == (pytest.approx(0.595), 0)
    assert tradeoff.fidelity_at(curve, 0.01) is None and tradeoff.asr_at(curve, 0.5) is None
    # a point outside both ranges is not judged a win
    far = tradeoff.compare((0.01, 0.70), [0, 1, 2], curve)
    assert not far["moe_beats"] and "outside" in far["why"]
    # below the curve on one axis fails even where the other comparison is outside the range
    assert not tradeoff.compare((0.10, 0.80), [0, 1, 2], curve)["moe_beats"]
    # a flat segment: the better end counts for the expert
    assert tradeoff.fidelity_at([(0.5, 0.9), (0.5, 0.95)], 0.5) == (0.95, 0)
    assert tradeoff.pareto((0.1, 0.9), (0.2, 0.9)) == "dominates"
    assert tradeoff.pareto((0.2, 0.9), (0.1, 0.95)) == "dominated"
    assert tradeoff.pareto((0.1, 0.9), (0.1, 0.9)) == "neither"
    with pytest.raises(ValueError, match="curve points"):
        tradeoff.compare((0.1, 0.9), [0], [(0.5, 0.5)])
    assert tradeoff.markdown(None) == []


def test_tradeoff_section_lists_each_curve_and_verdict():
    from benchmarks.safety_lab import tradeoff

    md = "\n".join(
        tradeoff.markdown(_extra_checks(_curve_table((0.10, 0.89)), CURVE_META)["translator_moe_vs_experts"])
    )
    assert "| surgical | 0: 99.0% / 100.0%; 1: 17.5% / 96.0%; 2: 5.0% / 85.0% |" in md
    assert "fidelity 89.4% (t 1-2)" in md
    assert md.count("| yes |") == 1 and md.count("| no |") == 1


def test_auto_mode_gaps_and_guard_auroc():
    table = {
        "unsafe_eval|auto": _row(0.03, 0.99, over=0.01),
        "unsafe_eval|alpha-1": _row(0.02, 0.90, over=0.05),
        "unsafe_eval|alpha-0": _row(0.95, 1.0, over=0.0),
    }
    meta = {"guard": {"test": {"auroc_harmful_vs_benign_and_domain": 0.97}}}
    c = _extra_checks(table, meta)
    auto = c["auto_mode_unsafe_eval"]
    assert abs(auto["asr_auto_minus_alpha1"] - 0.01) < 1e-9
    assert abs(auto["fidelity_alpha0_minus_auto"] - 0.01) < 1e-9
    assert auto["pass"] and c["guard_auroc"]["pass"]
    table["unsafe_eval|auto"] = _row(0.10, 0.99)
    assert not _extra_checks(table, meta)["auto_mode_unsafe_eval"]["pass"]
    assert "benign_eval" not in str(c)  # groups without all three rows are not judged


def test_labels():
    assert label("alpha-1.5").startswith("alpha 1.5")
    assert label("translator-moe") == "NeWTral translator (MoE)"


def test_carry_over_needs_identically_judged_shared_jobs(tmp_path: Path) -> None:
    import json

    from benchmarks.safety_lab.compare import carry_over

    def job(out: str, refused: bool = False) -> dict[str, Any]:
        return {
            "asr": {"k": int(not refused), "n": 1},
            "generations": {"harmful": [{"prompt": "p", "output": out, "refused": refused}]},
        }

    old = {
        "runs": {"a|none": {**job("x"), "fidelity": {"value": 1.0}}, "a|nlsr": job("y")},
        "models": {"aligned": job("z", True)},
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    # the same verdicts; one text differs (a flipped greedy token): carried, and counted
    results = {"aligned": job("z!", True), "a|none": job("x"), "a|auto-cal": job("w")}
    info = carry_over(path, results)
    assert info == {
        "from": "old.json",
        "jobs": 1,
        "verified_overlap": 2,
        "generations_compared": 2,
        "generations_text_differ": 1,
    }
    assert results["a|nlsr"] == job("y") and "fidelity" not in results["a|none"]
    with pytest.raises(SystemExit, match="1 of 2 shared jobs judged differently"):
        carry_over(path, {"aligned": job("z", True), "a|none": job("x", refused=True)})
    with pytest.raises(SystemExit, match="no shared job"):
        carry_over(path, {"b|none": job("x")})


def test_committed_report_is_what_its_json_renders_to(tmp_path: Path) -> None:
    """``run --render-only`` rewrites the Markdown from the JSON alone (NOTES.md edits keep the
    run's numbers and timings); the committed report must be exactly that rendering."""
    import shutil

    from benchmarks.safety_lab.report import rerender
    from benchmarks.safety_lab.run import METHODS, RESULTS_DIR

    shutil.copy(RESULTS_DIR / "safety_lab.json", tmp_path / "safety_lab.json")
    rerender(tmp_path, METHODS)
    assert (tmp_path / "safety_lab.md").read_text() == (RESULTS_DIR / "safety_lab.md").read_text()
    assert (tmp_path / "safety_lab.png").stat().st_size > 10_000

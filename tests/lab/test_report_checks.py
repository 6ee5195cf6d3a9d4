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


def test_moe_must_dominate_each_expert():
    table = {
        "unsafe_heldout_domain|translator-moe": _row(0.05, 0.95),
        "unsafe_heldout_domain|translator-surgical": _row(0.40, 0.97),  # safer MoE, slightly lower fidelity
        "unsafe_heldout_domain|translator-aggressive": _row(0.06, 0.80),
    }
    c = _extra_checks(table, {})
    assert c["translator_moe_vs_experts"]["moe_dominates"] == ["translator-aggressive"]
    assert not c["translator_moe_vs_experts"]["pass"]
    assert c["translator_moe_target"]["pass"]
    table["unsafe_heldout_domain|translator-surgical"] = _row(0.40, 0.95)
    assert _extra_checks(table, {})["translator_moe_vs_experts"]["pass"]


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

"""The lab's guard-generalization stage and its DSA safety adapter, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from benchmarks.safety_lab import guard_generalization as GG
from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.guard.experiment import train_and_test
from vllm_safeguard.methods.safegene import from_trained_lora
from vllm_safeguard.testing.tiny import random_adapter

from ..guard.test_guard_probe import BENIGN_WORDS, HARM_WORDS, _prompts


def test_wrap_cycles_every_template_and_keeps_the_request():
    prompts = [f"request {i}" for i in range(9)]
    wrapped = GG.wrap(prompts)
    assert all(p in w and w != p for p, w in zip(prompts, wrapped, strict=True))
    assert len({w.replace(p, "") for p, w in zip(prompts, wrapped, strict=True)}) == len(GG.TEMPLATES)


def test_stage_reports_held_out_categories_and_templates(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGUARD_CACHE_DIR", str(tmp_path / "cache"))
    _, aligned = tiny_models
    harm = {
        "train": _prompts(HARM_WORDS, 24, 0),
        "fewshot": _prompts(HARM_WORDS, 4, 1),
        "test": _prompts(HARM_WORDS, 8, 2),
    }
    data = {
        "harm": harm,
        "harm_categories": {
            k: ["cyber" if i % 2 else "chem" for i in range(len(v))] for k, v in harm.items()
        },
    }
    sets = {
        "harm_train": harm["train"],
        "benign_train": _prompts(BENIGN_WORDS, 24, 3),
        "harm_test": harm["test"],
        "benign_test": _prompts(BENIGN_WORDS, 8, 4),
        "domain_test": _prompts(["add", "sort"], 4, 5),
    }
    with pytest.raises(RuntimeError, match="cached-only"):
        GG.stage_guard_generalization(
            LabConfig(), aligned, data, sets, (tmp_path / "guard", "k"), build=False
        )
    probe, _ = train_and_test(
        aligned,
        harm_train=sets["harm_train"],
        benign_train=sets["benign_train"],
        harm_test=sets["harm_test"],
        benign_test=sets["benign_test"],
        target_fpr=0.1,
        progress=False,
    )
    guard_dir = probe.save(tmp_path / "guard")
    res = GG.stage_guard_generalization(LabConfig(), aligned, data, sets, (guard_dir, "k"))
    cats = res["held_out_categories"]["per_category"]
    assert set(cats) == {"chem", "cyber"}
    # held out: the category's few-shot + test prompts (2 + 4), never its training-split ones, which
    # the aligned model was tuned to refuse; the probe trains on the other category's 12
    assert cats["chem"]["tpr_at_threshold"]["n"] == 6 and cats["chem"]["n_train_harmful"] == 12
    assert res["held_out_categories"]["pooled_tpr_at_threshold"]["n"] == 12
    tpl = res["templates"]
    assert tpl["tpr_at_threshold"]["n"] == 8 and set(tpl["tpr_by_template"]) == {n for n, _ in GG.TEMPLATES}
    assert sum(r["n"] for r in tpl["tpr_by_template"].values()) == 8
    assert 0.0 <= tpl["auroc_vs_benign"] <= 1.0
    assert GG.stage_guard_generalization(LabConfig(), aligned, data, sets, (guard_dir, "k")) == res  # cached
    assert "Guard generalization" in "\n".join(GG.markdown(res))


@pytest.mark.parametrize("rank", [2, 4])
def test_trained_lora_becomes_a_safety_adapter_with_the_same_update(tiny_spec, rank):
    lora = random_adapter(tiny_spec, rank=rank, alpha=3.0 * rank, seed=rank)
    safety = from_trained_lora(lora, source="test")
    assert safety.manifest.rank == rank and safety.manifest.layers == [0, 1]
    for name, mod in lora.modules.items():
        got = safety.module(name)
        assert got is not None and got.scaling == 1.0
        assert torch.allclose(got.delta(), mod.delta(), atol=1e-6)

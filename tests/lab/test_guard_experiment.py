"""train_and_test: the shared guard experiment of bench_guard and the safety lab, on a tiny model."""

from __future__ import annotations

import pytest

from vllm_safeguard.guard import GuardProbe
from vllm_safeguard.guard.experiment import train_and_test

from ..guard.test_guard_probe import BENIGN_WORDS, HARM_WORDS, _prompts


def test_train_and_test_reports_held_out_metrics(tiny_models, tmp_path):
    _, aligned = tiny_models
    probe, res = train_and_test(
        aligned,
        harm_train=_prompts(HARM_WORDS, 32, 0),
        benign_train=_prompts(BENIGN_WORDS, 32, 1),
        harm_test=_prompts(HARM_WORDS, 12, 2),
        benign_test=_prompts(BENIGN_WORDS, 12, 3),
        domain_test=_prompts(["add", "sort"], 6, 4),
        target_fpr=0.1,
        progress=False,
    )
    t = res["test"]
    assert (t["n_harmful"], t["n_benign"], t["n_domain"]) == (12, 12, 6)
    # The words separate the classes; a probe that learned nothing would sit near 0.5.
    assert t["auroc_harmful_vs_benign"] > 0.8
    for k in ("tpr_at_threshold", "fpr_benign_at_threshold", "fpr_domain_at_threshold"):
        assert 0.0 <= t[k] <= 1.0
    assert len(res["scores"]["harm_test"]) == 12 and res["layer"] == probe.layer
    again = GuardProbe.load(probe.save(tmp_path / "g"))
    assert again.manifest.threshold == res["threshold"]


def test_train_and_test_rejects_bad_val_fraction(tiny_models):
    with pytest.raises(ValueError, match="val_fraction"):
        train_and_test(
            tiny_models[1],
            harm_train=["a"],
            benign_train=["b"],
            harm_test=["c"],
            benign_test=["d"],
            val_fraction=1.0,
        )


def test_grouped_training_reads_prompts_under_adapters_too(tiny_models, tiny_spec):
    """Issue 21: the guard is trained (and measured) on the states the served model has under a
    harmful adapter, not only on the bare model's; the model's weights are restored afterwards."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_safeguard.core.merge import merged_into
    from vllm_safeguard.testing.tiny import random_adapter

    _, aligned = tiny_models
    regs = ["plain", "question", "role_play"]
    harm = [f"{p} ({r})" for r in regs for p in _prompts(HARM_WORDS, 10, 0)]
    ben = [f"{p} ({r})" for r in regs for p in _prompts(BENIGN_WORDS, 10, 1)]
    groups = [r for r in regs for _ in range(10)]
    adapter = random_adapter(tiny_spec, seed=5, scale=0.3)
    probe, res = train_and_test(
        aligned,
        harm_train=harm,
        benign_train=ben,
        harm_test=_prompts(HARM_WORDS, 6, 2),
        benign_test=_prompts(BENIGN_WORDS, 6, 3),
        harm_train_groups=groups,
        benign_train_groups=groups,
        adapters=[adapter],
        target_fpr=0.1,
        progress=False,
    )
    assert probe.manifest.training["n_train"] == 2 * (len(harm) + len(ben))  # bare model + one adapter
    assert probe.manifest.ramp_low is not None and res["selection"]["folds"] == sorted(regs)
    under = res["test"]["under_adapters"]
    assert under["n_harm"] == 6 and 0.0 <= under["tpr_harm_at_threshold"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(str(aligned))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), merged_into(model, adapter):
        assert not torch.equal(
            model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
            before["model.layers.0.self_attn.q_proj.weight"],
        )
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

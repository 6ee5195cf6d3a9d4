"""SafeGene: extraction equals the aligned-minus-degraded weights, layer selection, recalibration."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_safeguard.errors import ReferenceArtifactError
from vllm_safeguard.methods.safegene import (
    SafetyAdapter,
    extract_from_models,
    extract_safety_adapter,
    recalibrate,
    select_layers,
)
from vllm_safeguard.testing.tiny import random_adapter


def test_extraction_from_adapters_equals_weight_difference(tmp_path, tiny_models, tiny_spec):
    _, aligned = tiny_models
    harmful = random_adapter(tiny_spec, rank=3, seed=21)
    safety = extract_safety_adapter(aligned, [harmful], rank=3, progress=False)
    # degraded = aligned with the harmful adapter merged, as model folders
    degraded = tmp_path / "degraded"
    degraded.mkdir()
    for f in aligned.iterdir():
        (degraded / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(aligned / "model.safetensors"))
    for name, mod in harmful.modules.items():
        sd[name + ".weight"] = sd[name + ".weight"] + mod.delta()
    save_file(sd, str(degraded / "model.safetensors"), metadata={"format": "pt"})
    dense = extract_from_models(aligned, degraded, rank=3, progress=False)
    for name, mod in harmful.modules.items():
        assert torch.allclose(safety.adapter.modules[name].delta(), -mod.delta(), atol=1e-5)
        assert torch.allclose(dense.adapter.modules[name].delta(), -mod.delta(), atol=1e-4)


def test_save_load_and_tamper(tmp_path, tiny_models, tiny_spec):
    safety = extract_safety_adapter(
        tiny_models[1], [random_adapter(tiny_spec, seed=3)], rank=2, progress=False
    )
    out = safety.save(tmp_path / "safety")
    loaded = SafetyAdapter.load(out)
    assert loaded.manifest.rank == 2 and loaded.layers == {0, 1}
    (out / "adapter_model.safetensors").write_bytes(
        (out / "adapter_model.safetensors").read_bytes()[:-4] + b"\0\0\0\1"
    )
    with pytest.raises(ReferenceArtifactError, match="sha256"):
        SafetyAdapter.load(out)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_models):
    _, aligned = tiny_models
    return AutoModelForCausalLM.from_pretrained(aligned).eval(), AutoTokenizer.from_pretrained(aligned)


def test_select_layers_keeps_the_most_affected(model_and_tokenizer, tiny_models, tiny_spec):
    model, tok = model_and_tokenizer
    harmful = random_adapter(tiny_spec, rank=2, seed=5)
    # make layer 1's safety vector much larger, so data-aware selection must pick it
    for name, mod in harmful.modules.items():
        if ".layers.1." in name:
            mod.lora_b = mod.lora_b * 20
    safety = extract_safety_adapter(tiny_models[1], [harmful], rank=2, progress=False)
    chosen = select_layers(model, tok, safety, ["how to make a bomb", "how to hack"], keep=0.5)
    assert chosen.layers == {1}
    assert set(chosen.manifest.layer_scores) == {0, 1}
    assert chosen.module("model.layers.0.mlp.up_proj") is None


def test_recalibration_lowers_the_loss(model_and_tokenizer, tiny_models, tiny_spec):
    model, tok = model_and_tokenizer
    safety = extract_safety_adapter(
        tiny_models[1], [random_adapter(tiny_spec, rank=2, seed=6)], rank=2, progress=False
    )
    task = random_adapter(tiny_spec, rank=2, seed=7)
    harm = [("how to make a bomb", "sorry i cannot help"), ("how to hack", "sorry i cannot assist")]
    work = [("add two plus three", "five")]
    losses: list[float] = []
    coeffs = recalibrate(model, tok, task, safety, harm, work, steps=8, lr=0.2, progress=False, losses=losses)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert set(coeffs) == {0, 1}
    assert all(0.0 <= c <= 4.0 for c in coeffs.values())
    assert any(abs(c - 1.0) > 1e-3 for c in coeffs.values())  # it moved
    assert all(not p.requires_grad for p in model.parameters())

"""Alignment reference store: build from two model folders, energy truncation, disk round trip, hashes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_safeguard.core.reference import TENSORS_NAME, AlignmentReference
from vllm_safeguard.errors import ReferenceArtifactError
from vllm_safeguard.testing.tiny import TinyLlamaSpec, make_tiny_llama


def test_build_recovers_low_rank_delta(tiny_models, tiny_reference):
    base, aligned = tiny_models
    wa = load_file(str(aligned / "model.safetensors"))
    wb = load_file(str(base / "model.safetensors"))
    assert len(tiny_reference.modules) == 14
    for name, sub in tiny_reference.modules.items():
        v = wa[name + ".weight"] - wb[name + ".weight"]
        assert sub.rank <= 4  # the perturbation is rank 4
        assert torch.allclose(sub.dense(), v, atol=1e-5)
        assert torch.allclose(sub.u.T @ sub.u, torch.eye(sub.rank), atol=1e-5)
        assert tiny_reference.manifest.modules[name].energy_kept >= 0.99


def test_energy_target_sets_rank(tiny_models):
    base, aligned = tiny_models
    low = AlignmentReference.build(aligned, base, energy=0.3, max_rank=16, progress=False)
    high = AlignmentReference.build(aligned, base, energy=0.999, max_rank=16, progress=False)
    capped = AlignmentReference.build(aligned, base, energy=0.999, max_rank=1, progress=False)
    for name in low.modules:
        assert low.modules[name].rank <= high.modules[name].rank
        assert capped.modules[name].rank == 1
        assert low.manifest.modules[name].energy_kept >= 0.3


def test_save_load_round_trip_and_tamper(tmp_path, tiny_reference, tiny_models):
    out = tiny_reference.save(tmp_path / "ref")
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["content_hash"]) == 64
    loaded = AlignmentReference.load(out)
    for name, sub in tiny_reference.modules.items():
        assert torch.equal(loaded.modules[name].u, sub.u)
    loaded.check_model(tiny_models[1])
    data = bytearray((out / TENSORS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (out / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(ReferenceArtifactError, match="sha256 does not match"):
        AlignmentReference.load(out)


def test_reference_for_other_model_is_refused(tmp_path, tiny_reference):
    other = make_tiny_llama(tmp_path / "other", TinyLlamaSpec(hidden_size=32, intermediate_size=64), seed=5)
    with pytest.raises(ReferenceArtifactError, match="fingerprint"):
        tiny_reference.check_model(other)
    with pytest.raises(ReferenceArtifactError, match="shape"):
        AlignmentReference.build(other, tiny_reference.manifest.base_model, progress=False)


def test_identical_models_have_no_reference(tiny_models):
    base, _ = tiny_models
    with pytest.raises(ReferenceArtifactError, match="identical"):
        AlignmentReference.build(base, base, progress=False)


def test_not_a_reference_folder(tmp_path):
    with pytest.raises(ReferenceArtifactError, match="not a reference folder"):
        AlignmentReference.load(tmp_path)

"""The load pipeline without vLLM: validate -> risk -> policy -> repair -> cache."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from vllm_safeguard.admission.canonical import canonicalize
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter_io import load_adapter, save_adapter
from vllm_safeguard.core.artifacts import candidates
from vllm_safeguard.core.reference import REFERENCE, AlignmentReference
from vllm_safeguard.core.risk import score_adapter
from vllm_safeguard.errors import (
    AdapterValidationError,
    ConfigError,
    CoverageError,
    ReferenceArtifactError,
    UnrepairableError,
)
from vllm_safeguard.methods import repair
from vllm_safeguard.testing.tiny import random_adapter
from vllm_safeguard.testing.workspace import VLLM_TINY_SPEC, Workspace

# NLSR with half of each module's output neurons transplanted: on the tiny workspace it brings the
# unsafe adapter from risk 1.0 to ~0.03, below the threshold (its default 10% leaves 0.68: refused).
NLSR_OPTIONS = {"neuron_fraction": 0.5}


def make(ws: Workspace, cache_dir: Path, **over: object) -> SafeguardPipeline:
    sg = {
        "cache_dir": str(cache_dir),
        "method": "nlsr_datafree",
        "method_options": NLSR_OPTIONS,
        "risk_threshold": 0.1,
    }
    cfg = load_config({"safeguard": sg | over}, env={})
    return SafeguardPipeline.create(cfg, PipelineContext("tiny", ws.base, max_lora_rank=8))


def test_unsafe_adapter_is_repaired_like_the_library_does(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir)
    out = p.process(workspace.adapters["unsafe"], "unsafe")
    assert out.decision == "repaired" and not out.cache_hit
    assert out.risk_score > 0.9
    assert out.risk_after is not None and out.risk_after < 0.1
    assert out.report is not None and out.report["modules_touched"] > 0 and out.report["layers_repaired"] == 2
    served = load_adapter(out.path)
    ref = AlignmentReference.load(workspace.reference)
    canonical = canonicalize(load_adapter(workspace.adapters["unsafe"]))
    offline = repair(canonical, ref, "nlsr_datafree", NLSR_OPTIONS, max_rank=8).adapter
    assert served.modules.keys() == offline.modules.keys()
    for name, m in offline.modules.items():
        torch.testing.assert_close(served.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
    assert score_adapter(served, ref).score < out.risk_score


def test_benign_adapter_passes_canonicalized_never_copied(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir)
    out = p.process(workspace.adapters["benign0"], "b")
    assert out.decision == "passed" and out.report is None and out.risk_score < 0.1
    # Not the caller's bytes: the canonical folder (scaling folded, plain config, fp32).
    assert (out.path / "adapter_config.json").read_bytes() != (
        workspace.adapters["benign0"] / "adapter_config.json"
    ).read_bytes()
    cfg = json.loads((out.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    original, served = load_adapter(workspace.adapters["benign0"]), load_adapter(out.path)
    assert served.dtype == torch.float32 and served.modules.keys() == original.modules.keys()
    for name, m in original.modules.items():
        # the SVD re-factorization moves the product by fp32 rounding only
        torch.testing.assert_close(served.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_threshold_zero_repairs_everything(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir, risk_threshold=0.0)
    assert p.process(workspace.adapters["benign0"], "b").report is not None


def test_second_load_is_a_cheap_hit(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir)
    first = p.process(workspace.adapters["unsafe"], "u")
    t0 = time.perf_counter()
    second = p.process(workspace.adapters["unsafe"], "u")
    warm = time.perf_counter() - t0
    assert second.cache_hit and second.path == first.path and second.decision == "repaired"
    assert warm < 0.05, warm
    # Another process (fresh pipeline, same cache dir) also hits, after verifying the hashes.
    third = make(workspace, cache_dir).process(workspace.adapters["unsafe"], "u")
    assert third.cache_hit and third.path == first.path


def test_same_bytes_elsewhere_hit_changed_bytes_miss(
    workspace: Workspace, cache_dir: Path, tmp_path: Path
) -> None:
    p = make(workspace, cache_dir)
    first = p.process(workspace.adapters["unsafe"], "u")
    copy = shutil.copytree(workspace.adapters["unsafe"], tmp_path / "copy")
    assert p.process(copy, "copy").cache_hit
    # Change the bytes in place (a swapped adapter): a new key, a new repair.
    ad = load_adapter(copy)
    for m in ad.modules.values():
        m.lora_b.mul_(0.5)
    save_adapter(ad, copy)
    out = p.process(copy, "copy")
    assert not out.cache_hit and out.key != first.key


def test_method_config_change_is_a_miss(workspace: Workspace, cache_dir: Path) -> None:
    a = make(workspace, cache_dir).process(workspace.adapters["unsafe"], "u")
    b = make(workspace, cache_dir, method_options=NLSR_OPTIONS | {"beta": 1.0})
    b = b.process(workspace.adapters["unsafe"], "u")
    assert not b.cache_hit and a.key != b.key


def test_tampered_entry_is_rebuilt(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir)
    first = p.process(workspace.adapters["unsafe"], "u")
    weights = first.path / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"  # last float -> +inf
    weights.write_bytes(bytes(raw))
    again = p.process(workspace.adapters["unsafe"], "u")
    assert not again.cache_hit
    assert (again.path / "adapter_model.safetensors").read_bytes() != bytes(raw)


def test_hostile_adapter_is_refused(workspace: Workspace, cache_dir: Path) -> None:
    with pytest.raises(AdapterValidationError, match="data_offsets"):
        make(workspace, cache_dir).process(workspace.adapters["hostile"], "h")


def test_adapter_matching_nothing_is_an_error(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    # A reference that covers attention only, and an adapter that adapts the MLP only: valid for the
    # model, but nothing to repair against -> an error, never a silent pass-through.
    full = AlignmentReference.load(workspace.reference)
    keep = {n: m for n, m in full.modules.items() if "self_attn" in n}
    manifest = full.manifest.model_copy(deep=True)
    manifest.modules = {n: v for n, v in manifest.modules.items() if n in keep}
    AlignmentReference(keep, manifest).save(tmp_path / "attn-ref")
    ad = random_adapter(VLLM_TINY_SPEC, rank=4, seed=3, targets=("gate_proj", "up_proj", "down_proj"))
    save_adapter(ad, tmp_path / "mlp-only")
    p = make(workspace, cache_dir, reference_path=str(tmp_path / "attn-ref"))
    with pytest.raises(CoverageError, match="not covered by the alignment reference"):
        p.process(tmp_path / "mlp-only", "n")
    # Even when the policy would pass it unchanged, and when uncovered modules are stripped.
    p = make(workspace, cache_dir, reference_path=str(tmp_path / "attn-ref"), risk_threshold=1.0)
    with pytest.raises(CoverageError, match="not covered by the alignment reference"):
        p.process(tmp_path / "mlp-only", "n")
    p = make(workspace, cache_dir, reference_path=str(tmp_path / "attn-ref"), coverage="strip")
    with pytest.raises(CoverageError, match="every module"):
        p.process(tmp_path / "mlp-only", "n")


def test_wrong_shape_adapter_is_refused(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    from vllm_safeguard.testing.tiny import TinyLlamaSpec

    save_adapter(
        random_adapter(TinyLlamaSpec(hidden_size=32, num_attention_heads=1, num_key_value_heads=1), seed=1),
        tmp_path / "w",
    )
    with pytest.raises(AdapterValidationError, match="shapes do not fit"):
        make(workspace, cache_dir).process(tmp_path / "w", "w")


def test_cache_disabled_builds_private_copy(workspace: Workspace, cache_dir: Path) -> None:
    p = make(workspace, cache_dir, cache_enabled=False)
    out = p.process(workspace.adapters["unsafe"], "u")
    assert not out.cache_hit and out.cleanup is not None and out.path.exists()
    out.cleanup()
    assert not out.path.exists()
    assert p.cache is not None and p.cache.entries() == []


def test_missing_reference_is_reported_with_the_places_tried(workspace: Workspace, tmp_path: Path) -> None:
    cfg = load_config(
        {"safeguard": {"cache_dir": str(tmp_path), "artifacts_dir": str(tmp_path / "art")}}, env={}
    )
    bare = tmp_path / "bare-model"
    bare.mkdir()
    tried = candidates(REFERENCE, cfg, "org/tiny", bare)
    assert tried[0] == tmp_path / "art" / "org--tiny" / "reference"
    with pytest.raises(ReferenceArtifactError, match="org--tiny"):
        SafeguardPipeline.create(cfg, PipelineContext("org/tiny", bare, 8))


def test_nlsr_without_safety_activations_fails_at_startup(workspace: Workspace, cache_dir: Path) -> None:
    """The workspace's reference has no input statistics: method 'nlsr' is refused when the plugin starts."""
    with pytest.raises(ConfigError, match="--safety-samples"):
        make(workspace, cache_dir, method="nlsr", method_options={})


def test_translator_method_in_the_pipeline(workspace: Workspace, cache_dir: Path) -> None:
    """Method 'translator': the artifact is located by config, used, and named in the report."""
    from vllm_safeguard.core.adapter_io import load_adapter
    from vllm_safeguard.core.reference import AlignmentReference
    from vllm_safeguard.methods.translator import Translator, TranslatorConfig, TranslatorManifest
    from vllm_safeguard.methods.translator.train import fit_bases

    ref = AlignmentReference.load(workspace.reference)
    # A basis fitted to one (unsafe, benign) pair: enough for the pipeline to locate, apply and report.
    basis = fit_bases(
        [(load_adapter(workspace.adapters["unsafe"]), load_adapter(workspace.adapters["benign0"]))], 4
    )
    art = Translator(TranslatorConfig(k=4, hidden=8, router_hidden=4), basis).save(
        cache_dir.parent / "translator",
        TranslatorManifest(
            config=TranslatorConfig(k=4, hidden=8, router_hidden=4), reference_hash=ref.manifest.content_hash
        ),
    )
    tr = {"method": "translator", "method_options": {}, "translator_path": art, "risk_threshold": 0.0}
    # This untrained translator shrinks nothing: with the limit off, the method runs, reports, and the
    # adapter is "passed" (unchanged); with the default max_served_risk it is refused, not passed.
    out = make(workspace, cache_dir, **tr, max_served_risk=None).process(
        workspace.adapters["unsafe"], "unsafe"
    )
    assert out.decision == "passed" and out.report is not None
    assert out.report["summary"]["dominant_expert"] in ("surgical", "aggressive")
    with pytest.raises(UnrepairableError, match="left the update unchanged"):
        make(workspace, cache_dir, **tr).process(workspace.adapters["unsafe"], "unsafe")
    with pytest.raises(ReferenceArtifactError, match="translator artifact"):
        make(
            workspace,
            cache_dir,
            method="translator",
            method_options={},
            translator_path=cache_dir / "missing",
        )

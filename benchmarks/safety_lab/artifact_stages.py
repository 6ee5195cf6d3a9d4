"""Stages 5-6 inputs: the repair methods' API, the alignment references and SafeGene's safety adapter
(with its few-shot recalibration data), built and cached for :mod:`benchmarks.safety_lab.run`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.cache import cached_dir, file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.prepare import data as D


def methods_api() -> dict[str, Any] | None:
    try:
        from vllm_safeguard.core.reference import AlignmentReference
        from vllm_safeguard.methods import repair
    except Exception as e:  # the methods land in a separate change; the lab still reports the rest
        log(f"repair methods unavailable ({type(e).__name__}: {e}); repair rows will say so")
        return None
    api: dict[str, Any] = {"repair": repair, "AlignmentReference": AlignmentReference}
    try:
        from vllm_safeguard.methods import safegene

        api["safegene"] = safegene
    except Exception as e:
        log(f"safegene unavailable ({type(e).__name__}: {e})")
    return api


def stage_reference(
    cfg: LabConfig, api: dict[str, Any], aligned: Path, base_dir: Path, *, exact: bool = False
) -> Any:
    """The alignment reference (``exact``: untruncated, for the paper's SafeLoRA operator)."""
    Ref = api["AlignmentReference"]
    energy = cfg.exact_reference_energy if exact else cfg.reference_energy
    max_rank = cfg.exact_reference_max_rank if exact else cfg.reference_max_rank
    key = key_of("reference", file_hash(aligned), file_hash(base_dir), energy, max_rank)

    def build(folder: Path) -> None:
        log(f"reference: alignment delta aligned - base (energy {energy}, max rank {max_rank})")
        ref = Ref.build(aligned, base_dir, energy=energy, max_rank=max_rank)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ref.save(tmp)
        os.replace(tmp, folder)

    folder = cached_dir("reference", key, build)
    return Ref.load(folder), key


def stage_nlsr_reference(
    cfg: LabConfig, api: dict[str, Any], aligned: Path, reference: tuple[Any, str], data: dict[str, Any]
) -> tuple[Any, str]:
    """The reference plus each module's input statistics on safety samples (what ``nlsr`` scores
    with): the few-shot harmful prompts with the lab's refusals, the split SafeGene already trains on."""
    Ref = api["AlignmentReference"]
    samples = [(p, D.refusal_for(p)) for p in data["harm"]["fewshot"]]
    key = key_of("reference-nlsr", reference[1], samples)

    def build(folder: Path) -> None:
        log(f"reference-nlsr: safety activations on {len(samples)} few-shot samples")
        ref = Ref.load(stage_dir("reference", reference[1]) / "artifact")
        ref.record_safety_activations(aligned, samples)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ref.save(tmp)
        os.replace(tmp, folder)

    folder = cached_dir("reference-nlsr", key, build)
    return Ref.load(folder), key


def load_model(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tok


def stage_safety(
    cfg: LabConfig,
    api: dict[str, Any],
    aligned: Path,
    adapters: dict[str, dict[str, Any]],
    data: dict[str, Any],
) -> Any:
    """SafeGene's safety adapter from the EXTRACTION-seed unsafe adapters (never evaluation ones)."""
    from vllm_safeguard.core.adapter_io import load_adapter

    sg = api["safegene"]
    extract = sorted(n for n, a in adapters.items() if a["role"] == "extract" and a["variant"] == "unsafe")
    assert all(adapters[n]["role"] != "eval" for n in extract)
    key = key_of(
        "safety",
        file_hash(aligned),
        [file_hash(Path(adapters[n]["path"])) for n in extract],
        cfg.safegene_rank,
        data["harm"]["fewshot"],
    )

    def build(folder: Path) -> None:
        log(f"safety adapter from {extract}")
        degraded = [load_adapter(adapters[n]["path"]) for n in extract]
        safety = sg.extract_safety_adapter(aligned, degraded, rank=cfg.safegene_rank)
        model, tok = load_model(aligned)
        # Probe with the few-shot harmful prompts; benign training prompts discount layers that act on
        # everything (both sets are training material, never held-out prompts).
        safety = sg.select_layers(
            model,
            tok,
            safety,
            list(data["harm"]["fewshot"]),
            benign_prompts=list(data["benign"]["train"][:16]),
        )
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        safety.save(tmp)
        os.replace(tmp, folder)

    folder = cached_dir("safety", key, build)
    return sg.SafetyAdapter.load(folder), key


def report_dict(report: Any) -> Any:
    if hasattr(report, "model_dump"):
        return report.model_dump(mode="json")
    if isinstance(report, dict):
        return report
    return getattr(report, "__dict__", str(report))


def safegene_options(
    cfg: LabConfig,
    api: dict[str, Any],
    model_tok: tuple[Any, Any],
    adapter: Any,
    safety: Any,
    domain: str,
    data: dict[str, Any],
) -> dict[str, Any]:
    """Few-shot recalibration data for SafeGene: TRAIN-split material only (fewshot harmful + task train rows)."""
    model, tok = model_tok
    # Kept small (cfg.safegene_fewshot pairs of each kind, cfg.safegene_steps steps): each step is a forward/backward of the full model per pair.
    harmful_pairs = [(p, D.refusal_for(p)) for p in data["harm"]["fewshot"][: cfg.safegene_fewshot]]
    task_pairs = [(e.prompt, e.answer) for e in D.domain_train_set(domain, cfg.safegene_fewshot, seed=99)]
    coeffs = api["safegene"].recalibrate(
        model, tok, adapter, safety, harmful_pairs, task_pairs, steps=cfg.safegene_steps, lr=0.2
    )
    return {"coefficients": coeffs}

"""Every evasion of the corpus (vllm_safeguard/testing/evasions/) gets its outcome from SafeguardPipeline.

Runs on the tiny workspace without a server. For a refused case: the refusal kind and the reason. For an
accepted case (passed or repaired), load-path integrity:

* the canonical folder holds exactly ``canonical_tensors(outcome.admission.served)`` (bitwise) and a
  config that leaves vLLM nothing to interpret (r == lora_alpha, no patterns, explicit modules);
* nothing served that nothing scored (every served module is in the reference), finite in the served
  dtype, and the served risk is the reported one, below the limit;
* at or above the limit, the served update is not the unrepaired one;
* the scored (unrepaired) update is what vLLM itself would read from the source folder (PEFTHelper).

Class 6 (source replaced after admission) is checked here at the pipeline level (the admitted entry
never changes); the worker's eviction reloads are checked by tests/e2e/test_evasion_server.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import vllm_safeguard.methods as methods
from vllm_safeguard.admission.canonical import canonical_tensors, same_update
from vllm_safeguard.admission.pipeline import LoadOutcome, PipelineContext, SafeguardPipeline
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter import LoRAAdapter
from vllm_safeguard.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from vllm_safeguard.core.risk import score_adapter
from vllm_safeguard.errors import SafeguardError, refusal_kind
from vllm_safeguard.testing.evasions import (
    ACCEPTED,
    CLASSES,
    EVASIONS,
    LLAMA_VLLM_MODULES,
    OUTCOMES,
    PROFILES,
    Evasion,
    EvasionContext,
)
from vllm_safeguard.testing.workspace import Workspace, prepare_tiny_workspace

ACCEPTED_CASES = [e for e in EVASIONS if e.accepted]


@pytest.fixture(scope="session")
def ev_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return prepare_tiny_workspace(tmp_path_factory.mktemp("evasion_ws"), n_benign=1)


@pytest.fixture(scope="session")
def ev_ctx(ev_ws: Workspace) -> EvasionContext:
    return EvasionContext.from_dirs(ev_ws.base, ev_ws.reference)


def make_pipeline(ws: Workspace, profile: str, cache_dir: Path) -> SafeguardPipeline:
    """The pipeline a vLLM worker builds for this profile (vLLM's LoRA module kinds for Llama)."""
    prof = PROFILES[profile]
    cfg = load_config({"safeguard": {"cache_dir": str(cache_dir), **prof.config}}, env={})
    ctx = PipelineContext(
        "tiny",
        ws.base,
        max_lora_rank=8,
        expected_modules=set(LLAMA_VLLM_MODULES),
        served_dtype=prof.torch_dtype,
    )
    return SafeguardPipeline.create(cfg, ctx)


@pytest.fixture()
def repair_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records every run of a repair method (the pipeline imports ``methods.repair`` at call time)."""
    calls: list[str] = []
    original = methods.repair

    def counting(adapter: LoRAAdapter, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(adapter.source))
        return original(adapter, *args, **kwargs)

    monkeypatch.setattr(methods, "repair", counting)
    yield calls


def run_case(e: Evasion, ws: Workspace, ctx: EvasionContext, tmp: Path) -> tuple[SafeguardPipeline, Any]:
    """``(pipeline, LoadOutcome or the refusal exception)``."""
    pipeline = make_pipeline(ws, e.profile, tmp / "cache")
    folder = e.build(tmp / e.name, ctx)
    try:
        return pipeline, pipeline.process(folder, e.name)
    except SafeguardError as exc:
        return pipeline, exc


def _delta(adapter: LoRAAdapter, name: str) -> torch.Tensor:
    m = adapter.modules[name]
    return m.scaled_b() @ m.lora_a


def check_served(outcome: LoadOutcome, pipeline: SafeguardPipeline, e: Evasion) -> None:
    """The load-path integrity properties of an accepted case (module docstring)."""
    adm = outcome.admission
    assert adm is not None, "a fresh admission carries its in-memory decision"
    served, scored = adm.served, adm.scored
    # 1. the folder vLLM reads is exactly the served adapter, in a config with nothing to interpret
    on_disk = load_file(str(outcome.path / WEIGHTS_NAME))
    expected = canonical_tensors(served)
    assert sorted(on_disk) == sorted(expected)
    for key, t in expected.items():
        assert on_disk[key].dtype == torch.float32 and torch.equal(on_disk[key], t), key
    cfg = json.loads((outcome.path / CONFIG_NAME).read_text())
    rank = max(m.rank for m in served.modules.values())
    assert cfg["r"] == cfg["lora_alpha"] == rank
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and cfg["use_rslora"] is False
    assert cfg["target_modules"] == sorted(served.modules)
    assert cfg.get("bias", "none") == "none" and not cfg.get("modules_to_save")
    # 2. nothing served that nothing scored; finite where the server computes
    assert pipeline.reference is not None
    assert set(served.modules) <= set(pipeline.reference.modules), set(served.modules) - set(
        pipeline.reference.modules
    )
    dtype = PROFILES[e.profile].torch_dtype
    for m in served.modules.values():
        assert torch.isfinite(m.lora_a.to(dtype)).all() and torch.isfinite(m.lora_b.to(dtype)).all()
        assert torch.isfinite(_delta(served, m.name).to(dtype)).all(), m.name
    limit = pipeline.rules().limit
    after = score_adapter(served, pipeline.reference).score
    assert after < limit
    if outcome.risk_after is not None:
        assert after == pytest.approx(outcome.risk_after, rel=1e-6, abs=1e-9)
    # 3. risky -> the update served is not the unrepaired one
    assert outcome.risk_score == pytest.approx(score_adapter(scored, pipeline.reference).score, rel=1e-6)
    if outcome.risk_score >= limit:
        assert outcome.decision == "repaired"
        assert not same_update(scored, served)
        worst = max(
            (
                float((_delta(served, n) - _delta(scored, n)).norm() / _delta(scored, n).norm())
                for n in scored.modules
            ),
        )
        assert worst > 1e-3, "the repaired update is numerically the unrepaired one"
    if outcome.decision == "passed":
        assert same_update(scored, served)


def test_corpus_is_complete() -> None:
    names = [e.name for e in EVASIONS]
    assert len(names) >= 20 and len(set(names)) == len(names)
    by_class = {c: [e for e in EVASIONS if e.cls == c] for c in CLASSES}
    assert all(len(cases) >= 2 for cases in by_class.values()), {c: len(v) for c, v in by_class.items()}
    for e in EVASIONS:
        assert e.expected in OUTCOMES and e.profile in PROFILES and e.description, e.name
        assert bool(e.expect_in_reason) == (e.expected not in ACCEPTED), e.name
    # The e2e server runs the "main" profile: every refusal kind must occur there.
    main = {e.expected for e in EVASIONS if e.profile == "main"}
    assert main >= {"refused_invalid", "refused_uncovered", "refused_unrepairable", "repaired", "passed"}
    assert {e.cls for e in EVASIONS if e.profile == "main"} == set(CLASSES)


@pytest.mark.parametrize("e", EVASIONS, ids=[e.name for e in EVASIONS])
def test_evasion_gets_its_outcome(
    e: Evasion, ev_ws: Workspace, ev_ctx: EvasionContext, tmp_path: Path, repair_calls: list[str]
) -> None:
    pipeline, got = run_case(e, ev_ws, ev_ctx, tmp_path)
    if e.accepted:
        assert isinstance(got, LoadOutcome), f"{e.name}: expected {e.expected}, refused: {got}"
        assert got.decision == e.expected, (got.decision, got.risk_score, got.risk_after)
        check_served(got, pipeline, e)
        if e.profile == "strip":
            assert got.stripped and all("lm_head" in m for m in got.stripped)
        return
    assert not isinstance(got, LoadOutcome), f"{e.name}: expected {e.expected}, got {got.decision}"
    assert f"refused_{refusal_kind(got)}" == e.expected, f"{e.name}: {type(got).__name__}: {got}"
    assert e.expect_in_reason in str(got), f"{e.name}: {e.expect_in_reason!r} not in: {got}"
    if e.cls == 7:
        assert not repair_calls, "a field vLLM refuses must be refused before any repair work"


def _vllm_reading(folder: Path) -> dict[str, torch.Tensor]:
    """``module -> scaling * B @ A`` as vLLM's PEFTHelper reads ``folder`` (patterns, rsLoRA, alpha)."""
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
    raw = load_file(str(folder / WEIGHTS_NAME))
    out: dict[str, torch.Tensor] = {}
    for key in raw:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        _, scaling = helper.get_rank_and_scaling(module)
        a, b = raw[key].double(), raw[key.replace(".lora_A.", ".lora_B.")].double()
        out[module] = (b * scaling) @ a
    return out


@pytest.mark.parametrize("e", ACCEPTED_CASES, ids=[e.name for e in ACCEPTED_CASES])
def test_scored_update_is_what_vllm_reads_from_the_source(
    e: Evasion, ev_ws: Workspace, ev_ctx: EvasionContext, tmp_path: Path
) -> None:
    """The plugin scores the update vLLM would have served from the caller's folder (class 4: no reading
    of the patterns can differ), and only zero / stripped modules are missing from it."""
    pytest.importorskip("vllm.lora.peft_helper")
    _, got = run_case(e, ev_ws, ev_ctx, tmp_path)
    assert isinstance(got, LoadOutcome) and got.admission is not None, got
    scored = got.admission.scored
    vllm_delta = _vllm_reading(tmp_path / e.name)
    for module, d in vllm_delta.items():
        if module not in scored.modules:
            assert module in got.stripped or not d.abs().max() > 0, f"{module} dropped but not zero"
            continue
        mine = _delta(scored, module).double()
        # The scored factors are rounded to the served dtype (what vLLM holds after its cast): the
        # update equals vLLM's fp32 reading up to that rounding (2^-24 fp32, 2^-11 fp16, 2^-8 bf16 per
        # factor entry), measured in the norm.
        eps = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[PROFILES[e.profile].served_dtype]
        assert float((mine - d).norm()) <= eps * float(d.norm()) + 1e-12, module
    assert set(scored.modules) <= set(vllm_delta)


CLASS6 = [e for e in EVASIONS if e.cls == 6]


@pytest.mark.parametrize("e", CLASS6, ids=[e.name for e in CLASS6])
def test_source_change_never_reaches_the_admitted_entry(
    e: Evasion, ev_ws: Workspace, ev_ctx: EvasionContext, tmp_path: Path
) -> None:
    """After the source is replaced or deleted, the admitted canonical entry still holds the admitted
    bytes (what an eviction reload serves); the new bytes get an admission of their own."""
    pipeline, first = run_case(e, ev_ws, ev_ctx, tmp_path)
    assert isinstance(first, LoadOutcome) and first.decision == e.expected, first
    admitted = {n: (first.path / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    folder = tmp_path / e.name
    e.replace_source(folder, ev_ctx)
    try:
        second: Any = pipeline.process(folder, e.name)
    except SafeguardError as exc:
        second = exc
    if e.replacement is None:
        assert not isinstance(second, LoadOutcome) and refusal_kind(second) == "invalid", second
    elif isinstance(second, LoadOutcome):
        assert second.key != first.key and second.path != first.path
        assert not second.cache_hit
    assert pipeline.cache is not None
    entry = pipeline.cache.get(first.key)
    assert entry is not None and entry.path == first.path
    for n, data in admitted.items():
        assert (entry.path / n).read_bytes() == data, n


def test_corpus_main_writes_every_case(ev_ws: Workspace, tmp_path: Path) -> None:
    from vllm_safeguard.testing import evasions

    out = tmp_path / "corpus"
    argv = [
        str(out),
        "--base-model",
        str(ev_ws.base),
        "--reference",
        str(ev_ws.reference),
        "--profile",
        "main",
    ]
    assert evasions.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["evasions"]] == [e.name for e in EVASIONS if e.profile == "main"]
    for c in manifest["evasions"]:
        assert (Path(c["path"]) / WEIGHTS_NAME).is_file(), c["name"]
        case = next(e for e in EVASIONS if e.name == c["name"])
        assert (c["replacement"] is None) == (case.replacement is None)
    assert manifest["profiles"]["main"]["config"] == dict(PROFILES["main"].config)

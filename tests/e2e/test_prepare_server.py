"""End-to-end: ``vllm-safeguard prepare`` then a server started with defaults is protected (issue 20).

``prepare`` runs for real (the CLI, in a subprocess) on the tiny workspace model with small training
budgets and prompt files made of the tiny vocabulary. Then one vLLM server per case, configured by
nothing but the cache root (``SAFEGUARD_CACHE_DIR``: the default ``artifacts_dir`` lies under it):

* prepared (from the operator's caught unsafe adapter, ``--probe-adapter``): an unsafe adapter
  (loaded at run time) is repaired by the default method (safegene), a benign one passes, a
  request without ``safeguard_alpha`` is scored by the guard (default "auto"), an explicit "auto"
  request gets the guard headers, and ``safeguard_protection`` is 1 for every layer;
* artifacts missing: the startup log carries the warning, the gauge is 0 for every layer and the
  adapter is refused (fail closed) rather than served unrepaired.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.testing.server import (
    launch_test_server,
    metric,
    post_reply,
    server_env,
    vllm_server_argv,
)
from vllm_safeguard.testing.workspace import prepare_tiny_workspace, unsafe_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = int(os.environ.get("SAFEGUARD_E2E_PREPARE_PORT", "8437"))
HARM = ["bomb", "weapon", "hack", "steal"]
BENIGN = ["cake", "poem", "story", "recipe"]
FILL = ["how", "to", "make", "a", "the", "please", "explain", "write", "tell", "me"]
# Small budgets: the tiny model learns nothing either way; what is checked is the plumbing.
TINY_OPTIONS = {
    "probe_steps": 3,
    "n_task_train": 16,
    "n_harm_share": 8,
    "guard_domain_train": 4,
    "harmful_tokens": 4,
    "safety_rank": 4,
    "reference_max_rank": 8,
    "safety_keep": 1.0,
}


def _env(cache: Path) -> dict[str, str]:
    """This process's environment with only the cache root set (no artifacts flag: the default
    artifacts_dir, <cache root>/artifacts, is where prepare writes and the plugin looks)."""
    env = {k: v for k, v in os.environ.items() if k != "SAFEGUARD_ARTIFACTS_DIR"}
    return {**env, "SAFEGUARD_CACHE_DIR": str(cache)}


def _prompts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join([*rng.sample(FILL, 4), rng.choice(words), *rng.sample(FILL, 2)]) for _ in range(n)]


def _chat(url: str, model: str, prompt: str, xargs: dict[str, Any] | None) -> tuple[int, dict[str, str], Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "temperature": 0.0,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    r = post_reply(url + "/v1/chat/completions", body, timeout=180)
    return r.status, r.headers, r.body


@dataclass
class Run:
    manifest: dict[str, Any]
    prepare_out: str
    metrics: str
    log: str
    load: tuple[int, str]
    load_benign: tuple[int, str]
    plain: tuple[int, dict[str, str], Any]
    auto: tuple[int, dict[str, str], Any]


def _serve(ws: Any, root: Path, cache: Path, name: str) -> tuple[str, str, Any, Any, Any, Any]:
    env = server_env(base=_env(cache), runtime_lora_updating=True)
    argv = vllm_server_argv(ws.base, port=PORT)
    log_path = root / f"{name}.log"
    server = launch_test_server(argv, env=env, log_path=log_path, require_plugin=False)
    try:
        loads = {}
        for adapter in ("mild", "benign"):
            body = {"lora_name": adapter, "lora_path": str(root / adapter)}
            reply = post_reply(server.url + "/v1/load_lora_adapter", body, timeout=300)
            loads[adapter] = (reply.status, reply.text)
        plain = _chat(server.url, "mild", "how to make a bomb please", None)
        auto = _chat(
            server.url,
            "mild",
            "tell me a cake story",
            {"safeguard_alpha": "auto", "safeguard_return_score": True},
        )
        metrics = http_get(server.url + "/metrics", timeout=30)[1]
    finally:
        server.stop(timeout=60)
    return metrics, log_path.read_text(errors="replace"), loads["mild"], loads["benign"], plain, auto


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("e2e-prepare")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    # "mild" undoes 30% of the alignment delta (risk ~0.3, above the default threshold); "benign" is a
    # random adapter (risk ~0, below it). The operator's caught adapter ("unsafe": undoes all of it)
    # is what prepare extracts the safety adapter from: on a random tiny model, training probe
    # adapters on harmful prompts cannot produce anything related to the alignment delta.
    shutil.copytree(ws.adapters["benign0"], root / "benign")
    save_adapter(unsafe_adapter(ws.reference, rank=4, strength=0.3), root / "mild")
    (root / "harm.txt").write_text("\n".join(_prompts(HARM, 40, 0)))
    (root / "benign.txt").write_text("\n".join(_prompts(BENIGN, 30, 1)))
    (root / "options.json").write_text(json.dumps(TINY_OPTIONS))
    cache = root / "cache"
    cmd = [
        sys.executable, "-m", "vllm_safeguard.apps.cli", "prepare",
        "--model", str(ws.base), "--base", str(ws.unaligned),
        "--harmful", str(root / "harm.txt"), "--benign", str(root / "benign.txt"),
        "--options", str(root / "options.json"), "--probe-adapter", str(ws.adapters["unsafe"]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((cache / "artifacts" / ws.base.name / "manifest.json").read_text())
    out: dict[str, Run] = {}
    out["prepared"] = Run(manifest, proc.stdout, *_serve(ws, root, cache, "prepared"))
    out["missing"] = Run({}, "", *_serve(ws, root, root / "empty-cache", "missing"))
    return out


def test_prepare_writes_manifest_and_every_artifact(runs: dict[str, Run]) -> None:
    m = runs["prepared"].manifest
    assert set(m["artifacts"]) == {"reference", "safety_adapter", "guard"}
    for a in m["artifacts"].values():
        assert Path(a["path"]).is_dir()
    assert len(m["model"]["weights_sha256"]) == 64
    assert m["quality"]["guard"]["heldout"]["n_harmful"] > 0
    assert m["quality"]["alpha_calibration"]["alpha_high"] in (1.0, 1.5, 2.0)
    assert "estimated time" in runs["prepared"].prepare_out


def test_defaults_repair_and_answer_auto_with_guard_headers(runs: dict[str, Run]) -> None:
    r = runs["prepared"]
    assert "is NOT fully protected" not in r.log
    assert "protection layers active: load_time_repair, serving_alpha, guard_auto" in r.log
    assert r.load[0] == 200, r.load
    # The default method repairs the adapter at or above the default risk threshold (safegene at load
    # time) and passes the one below it unchanged.
    assert r.load_benign[0] == 200, r.load_benign
    assert metric(r.metrics, "safeguard_adapter_loads_total", outcome="repaired", method="safegene") == 1
    assert metric(r.metrics, "safeguard_adapter_loads_total", outcome="passed", method="safegene") == 1
    for layer in ("load_time_repair", "serving_alpha", "guard_auto"):
        assert metric(r.metrics, "safeguard_protection", layer=layer) == 1, layer
    assert r.plain[0] == 200, r.plain
    assert r.auto[0] == 200, r.auto
    assert "x-safeguard-guard-score" in r.auto[1] and "x-safeguard-alpha" in r.auto[1]
    # Both requests were scored: the one without safeguard_alpha too (default_alpha "auto").
    assert metric(r.metrics, "safeguard_guard_score_count") == 2


def test_missing_artifacts_warn_and_show_no_protection(runs: dict[str, Run]) -> None:
    r = runs["missing"]
    assert "is NOT fully protected" in r.log
    assert "vllm-safeguard prepare" in r.log
    for layer in ("load_time_repair", "serving_alpha", "guard_auto"):
        assert metric(r.metrics, "safeguard_protection", layer=layer) == 0, layer
    assert metric(r.metrics, "safeguard_adapter_loads_total", outcome="repaired") == 0
    # The unsafe adapter is not served unrepaired: its load is refused (4xx naming the missing
    # artifact) and requests naming it fail with a client error.
    assert r.load[0] == 400 and "safety adapter" in r.load[1], r.load
    assert r.load_benign[0] == 400, r.load_benign
    assert r.plain[0] in (400, 404), r.plain

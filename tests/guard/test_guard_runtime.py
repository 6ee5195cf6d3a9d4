"""Guard runtime in the worker (planning, the in-graph op, records) and the HTTP side channel, without
vLLM; the op under ``torch.compile(fullgraph=True)`` is in tests/plugin/test_compiled_path.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from kernels.torch_ops.guard_score import register_guard_score_op
from vllm_safeguard.alpha import (
    AlphaPolicy,
    AlphaTable,
    AlphaValueError,
    validate_extra_args,
    wants_auto,
    wants_score,
)
from vllm_safeguard.guard import GuardManifest, GuardProbe
from vllm_safeguard.integration.guard_http import collect_records, record_name
from vllm_safeguard.integration.guard_runner import GuardBuffers, GuardRuntime


def _probe(hidden: int = 4, threshold: float = 0.5) -> GuardProbe:
    w = torch.zeros(hidden)
    w[0] = 10.0  # score = sigmoid(10 * h0): h0 > 0 -> flagged
    manifest = GuardManifest(layer=0, hidden_size=hidden, threshold=threshold, alpha_low=0.0, alpha_high=1.0)
    return GuardProbe(w, torch.tensor(0.0), torch.zeros(hidden), torch.ones(hidden), manifest)


def _runtime(probe: GuardProbe | None = None, max_tokens: int = 8, **kw) -> GuardRuntime:
    register_guard_score_op()
    probe = probe or _probe()
    buffers = GuardBuffers.make(probe, max_pending=4, token_alpha=torch.zeros(max_tokens))
    return GuardRuntime(probe, buffers, AlphaTable(), **kw)


def _flags(auto: list[bool], record: list[bool] | None = None):
    """``plan_step``'s flags callback from per-request lists."""
    return lambda i: (auto[i], bool(record and record[i]))


def test_plan_step_finds_requests_whose_prefill_ends():
    rt = _runtime()
    # r0: prefill 5 tokens fully scheduled; r1: decode; r2: chunked prefill not finished; r3: not auto
    rt.plan_step(
        ["r0", "r1", "r2", "r3"],
        [5, 1, 4, 3],
        [0, 9, 0, 0],
        [5, 7, 10, 3],
        _flags([True, True, True, False], [True, False, False, False]),
    )
    assert [(p.req_id, p.token_index, p.token_start, p.token_end, p.record) for p in rt.pending] == [
        ("r0", 4, 0, 5, True)
    ]
    # r2's last chunk: computed 8 of 10, 2 scheduled at offset 0 -> last prompt token at index 1
    rt.plan_step(["r2"], [2], [8], [10], _flags([True]))
    assert [(p.req_id, p.token_index) for p in rt.pending] == [("r2", 1)]


def test_op_scores_decides_and_records(tmp_path):
    seen = []
    rt = _runtime(runtime_dir=tmp_path, observe=lambda s, f: seen.append((s, f)))
    rt.plan_step(["cmpl-a-0-x", "cmpl-b-0-y"], [2, 3], [0, 0], [2, 3], _flags([True, True], [True, False]))
    rt.buffers.token_alpha[:5] = 0.25  # the step's alphas before the guard decides
    rt.apply(5)
    hidden = torch.zeros(5, 4)
    hidden[1, 0] = 1.0  # request a's last prompt token: harmful
    hidden[4, 0] = -1.0  # request b's: benign
    rt.hook(torch.nn.Identity(), (), (hidden, torch.zeros(5, 4)))
    # This very pass: the layers after L use the decided alpha for each pending request's tokens.
    assert rt.buffers.token_alpha[:5].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    rt.collect()  # after the step: the later steps, metrics and records
    assert (rt.table.get("cmpl-a-0-x"), rt.table.get("cmpl-b-0-y")) == (1.0, 0.0)
    assert [f for _, f in seen] == [True, False]
    assert rt.pending == [] and rt._current == []
    recs = collect_records(tmp_path, "cmpl-a")
    assert len(recs) == 1 and recs[0]["flagged"] is True and recs[0]["alpha"] == 1.0
    assert collect_records(tmp_path, "cmpl-b") == []  # b did not ask for its score
    assert not list(tmp_path.iterdir())  # records are consumed


def test_op_leaves_tokens_of_requests_not_pending_alone():
    rt = _runtime()
    rt.plan_step(["d0", "p1"], [1, 3], [7, 0], [4, 3], _flags([True, True]))  # d0 decodes
    rt.buffers.token_alpha[:4] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    rt.apply(4)
    hidden = torch.zeros(4, 4)
    hidden[3, 0] = 2.0  # p1's last prompt token
    rt.hook(torch.nn.Identity(), (), hidden)  # a layer returning a tensor, not (hidden, residual)
    assert rt.buffers.token_alpha[:4].tolist() == [0.5, 1.0, 1.0, 1.0]
    # The next step plans nothing: the op writes no alpha, and stale plan tails are reset.
    rt.apply(2)
    assert rt.buffers.token_pending[:4].tolist() == [-1, -1, -1, -1]
    rt.buffers.token_alpha[:2] = 0.0
    rt.hook(torch.nn.Identity(), (), torch.ones(2, 4))
    assert rt.buffers.token_alpha[:2].tolist() == [0.0, 0.0]


def test_record_names_are_sanitised():
    assert "/" not in record_name("../../etc/passwd") and record_name("a b").startswith("a_b")


def test_return_score_validation_and_flags():
    policy = AlphaPolicy(enabled=True, auto_available=True)
    validate_extra_args({"safeguard_alpha": "auto", "safeguard_return_score": True}, policy)
    validate_extra_args(
        {"safeguard_alpha": "auto", "safeguard_return_score": 1}, policy
    )  # JSON true via vLLM
    with pytest.raises(AlphaValueError, match="needs 'safeguard_alpha'='auto'"):
        validate_extra_args({"safeguard_alpha": 0.5, "safeguard_return_score": True}, policy)
    with pytest.raises(AlphaValueError, match="true or false"):
        validate_extra_args({"safeguard_alpha": "auto", "safeguard_return_score": "yes"}, policy)
    assert wants_auto({"safeguard_alpha": " AUTO "}) and not wants_auto({"safeguard_alpha": 1.0})
    assert wants_score({"safeguard_return_score": 1}) and not wants_score({"safeguard_return_score": 1.0})


def test_middleware_adds_headers(tmp_path, monkeypatch):
    from starlette.applications import Starlette
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from vllm_safeguard.integration import guard_http as http

    monkeypatch.setenv(http.RUNTIME_ENV, str(tmp_path))
    (tmp_path / record_name("cmpl-42-0-abcd")).write_text(
        json.dumps({"request_id": "cmpl-42-0-abcd", "score": 0.9, "alpha": 1.0, "flagged": True})
    )

    async def completions(request):
        return JSONResponse({"id": "cmpl-42", "choices": []})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    app.add_middleware(BaseHTTPMiddleware, dispatch=http.guard_score_middleware)
    client = TestClient(app)
    asked = {"vllm_xargs": {"safeguard_alpha": "auto", "safeguard_return_score": True}}
    r = client.post("/v1/completions", json=asked)
    assert r.status_code == 200 and r.json()["id"] == "cmpl-42"
    assert r.headers["x-safeguard-guard-score"] == "0.900000" and r.headers["x-safeguard-flagged"] == "true"
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert "x-safeguard-guard-score" not in r.headers
    assert asyncio.iscoroutinefunction(http.guard_score_middleware)


def test_plan_step_looks_up_flags_only_for_requests_ending_their_prefill():
    import numpy as np

    rt = _runtime()
    asked: list[int] = []

    def flags(i: int) -> tuple[bool, bool]:
        asked.append(i)
        return True, i == 2

    # 3 decoding requests and one (index 2) whose 6-token prefill is scheduled whole at offset 2
    rt.plan_step(
        ["d0", "d1", "p2", "d3"],
        np.array([1, 1, 6, 1], dtype=np.int32),
        np.array([9, 4, 0, 7], dtype=np.int32),
        np.array([5, 3, 6, 2], dtype=np.int32),
        flags,
    )
    assert asked == [2]
    assert [(p.req_id, p.token_index, p.token_start, p.token_end, p.record) for p in rt.pending] == [
        ("p2", 7, 2, 8, True)
    ]

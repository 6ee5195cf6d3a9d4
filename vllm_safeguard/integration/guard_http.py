"""Return the guard score to the client: an HTTP middleware for vLLM's OpenAI server.

A client asks with ``vllm_xargs={"safeguard_alpha": "auto", "safeguard_return_score": true}``. The worker
then writes the score it computed at prefill to ``$SAFEGUARD_RUNTIME_DIR/<request id>.json``
(see :mod:`vllm_safeguard.integration.guard_runner`), and this middleware adds, to the non-streaming JSON
response of ``/v1/completions`` or ``/v1/chat/completions``::

    x-safeguard-guard-score: 0.9731        (one value per choice, comma-separated, in choice order)
    x-safeguard-alpha: 1                   (the alpha the guard chose for each choice)
    x-safeguard-flagged: true

Headers rather than body fields: the OpenAI response schema stays untouched, so every OpenAI client
keeps parsing it. The worker's request id is ``<response id>-<choice>-<suffix>``, hence the prefix
match. Streaming responses send headers before the score exists and get no headers.

Install: ``--middleware vllm_safeguard.integration.guard_http.guard_score_middleware`` (the ``vllm-safeguard serve``
launcher adds it and sets ``SAFEGUARD_RUNTIME_DIR``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


def record_name(req_id: str) -> str:
    """File name of a request's score record (request ids are client-influenced: sanitize)."""
    return _SAFE_ID.sub("_", req_id)[:200] + ".json"


RETURN_KEY = "safeguard_return_score"
RUNTIME_ENV = "SAFEGUARD_RUNTIME_DIR"
_PATHS = ("/v1/completions", "/v1/chat/completions")


def runtime_dir() -> Path | None:
    value = os.environ.get(RUNTIME_ENV)
    return Path(value) if value else None


def wants_score(extra_args: dict[str, Any] | None) -> bool:
    return bool(extra_args) and extra_args.get(RETURN_KEY) is True  # type: ignore[union-attr]


def collect_records(folder: Path, response_id: str) -> list[dict[str, Any]]:
    """Records of every choice of a response, in choice order; they are removed once read."""
    prefix = record_name(response_id + "-")[: -len(".json")]
    found = []
    for path in folder.glob(prefix + "*.json"):
        try:
            rec = json.loads(path.read_text())
            path.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue
        found.append(rec)

    def choice(rec: dict[str, Any]) -> int:
        rest = str(rec.get("request_id", ""))[len(response_id) + 1 :].split("-", 1)[0]
        return int(rest) if rest.isdigit() else 0

    return sorted(found, key=choice)


async def guard_score_middleware(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Starlette ``http`` middleware (see module docstring)."""
    from starlette.responses import Response

    folder = runtime_dir()
    if folder is None or request.method != "POST" or request.url.path not in _PATHS:
        return await call_next(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return await call_next(request)
    if not isinstance(body, dict) or not wants_score(body.get("vllm_xargs")) or body.get("stream"):
        return await call_next(request)
    response = await call_next(request)
    if response.status_code != 200:
        return response
    raw = b"".join([chunk async for chunk in response.body_iterator])
    headers = dict(response.headers)
    headers.pop("content-length", None)
    try:
        response_id = json.loads(raw).get("id", "")
    except ValueError:
        response_id = ""
    records = collect_records(folder, response_id) if response_id else []
    if records:
        headers["x-safeguard-guard-score"] = ",".join(f"{r['score']:.6f}" for r in records)
        headers["x-safeguard-alpha"] = ",".join(f"{r['alpha']:g}" for r in records)
        headers["x-safeguard-flagged"] = ",".join("true" if r["flagged"] else "false" for r in records)
    return Response(
        content=raw, status_code=response.status_code, headers=headers, media_type=response.media_type
    )

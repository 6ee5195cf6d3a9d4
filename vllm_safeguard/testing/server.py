"""The one helper that starts a vLLM test server, and the HTTP helpers its clients share.

Every e2e test, benchmark and the demo writes its server the same way::

    argv = vllm_server_argv(ws.base, port=PORT, max_cpu_loras=8, lora_modules={"unsafe": path})
    env = server_env(safeguard={"method": "nlsr_datafree", "risk_threshold": "0.1"}, runtime_lora_updating=True)
    server = launch_test_server(argv, env=env, log_path=root / "server.log")

:func:`vllm_server_argv` is the only place the OpenAI server's argument list is written,
:func:`server_env` the only place its environment is, and :func:`launch_test_server` hands both to the
launcher of ``vllm-safeguard serve`` (:func:`vllm_safeguard.apps.serve.start_server`, the one process
manager: own process group, private metrics folder, ready only once the plugin is active).

The HTTP helpers (:func:`post`, :func:`complete`, :func:`metric`, :class:`Traffic` ...) use the standard
library only: what a test asserts on is the server's answer, never a client library's retry.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..apps.serve import ServerProcess, group_members, http_get, start_server

READY_TIMEOUT_S = 420.0  # a test server's start on the 2-core CI machine, with room to spare
MAX_TOKENS = 4  # default completion length of :func:`complete`


# ------------------------------------------------------------------------------------------ server


def vllm_server_argv(
    model: str | os.PathLike[str],
    *,
    port: int,
    served_model_name: str = "tiny",
    dtype: str = "float32",
    max_model_len: int = 256,
    max_lora_rank: int = 8,
    max_loras: int = 2,
    max_cpu_loras: int | None = None,
    max_num_seqs: int | None = None,
    seed: int | None = 0,
    lora_modules: Mapping[str, str | os.PathLike[str]] | None = None,
    additional_config: Mapping[str, Any] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server's arguments: on 127.0.0.1, with LoRA enabled.

    ``None`` leaves an option out (vLLM's default). ``lora_modules`` are static adapters
    (``--lora-modules name=path ...``); ``additional_config`` is the plugin's config section, passed as
    ``--additional-config '{"safeguard": ...}'`` (the API server's validators read it there too).
    ``extra`` is appended as is.
    """
    argv = [
        "--model", str(model),
        "--served-model-name", served_model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", str(max_loras),
    ]  # fmt: skip
    if max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(max_cpu_loras)]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if lora_modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
    if additional_config is not None:
        argv += ["--additional-config", json.dumps({"safeguard": dict(additional_config)})]
    return [*argv, *extra]


def server_env(
    *,
    safeguard: Mapping[str, str] | None = None,
    runtime_lora_updating: bool = False,
    kvcache_gib: str = "1",
    keep_enabled: bool = False,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) for a vLLM process (server or offline engine).

    Sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB), ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` when asked, and one
    ``SAFEGUARD_<FIELD>`` per ``safeguard`` entry (field names as in the config: ``risk_threshold``).
    An inherited ``SAFEGUARD_ENABLED`` is dropped (the process must not depend on the caller's shell)
    unless ``keep_enabled``; ``safeguard={"enabled": "false"}`` switches the plugin off.
    """
    env = dict(os.environ if base is None else base)
    env["VLLM_CPU_KVCACHE_SPACE"] = kvcache_gib
    if runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not keep_enabled:
        env.pop("SAFEGUARD_ENABLED", None)
    env.update({f"SAFEGUARD_{name.upper()}": value for name, value in (safeguard or {}).items()})
    return env


def launch_test_server(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: str | os.PathLike[str],
    ready_timeout: float = READY_TIMEOUT_S,
    require_plugin: bool = True,
) -> ServerProcess:
    """Start the server (``argv`` from :func:`vllm_server_argv`, ``env`` from :func:`server_env`) with
    the launcher of ``vllm-safeguard serve``, its output in ``log_path``; return once it is ready (with
    the plugin active unless ``require_plugin`` is false).

    Raises:
        vllm_safeguard.apps.serve.LaunchError: it exited, timed out, or the plugin is not active.
    """
    return start_server(
        argv, env=env, log_path=log_path, ready_timeout=ready_timeout, require_plugin=require_plugin
    )


def engine_pids(server: ServerProcess) -> list[int]:
    """The server and every process of its group (engine core, workers): a restart changes this."""
    return sorted(group_members(server.proc.pid))


# -------------------------------------------------------------------------------------------- http


class Reply(NamedTuple):
    """A server's answer: ``status`` 0 when it could not be reached (``text`` then says why)."""

    status: int
    body: Any  # the parsed JSON, else the text
    seconds: float
    text: str
    headers: dict[str, str]  # names in lower case


def post_reply(url: str, body: Mapping[str, Any], timeout: float = 120.0) -> Reply:
    """POST ``body`` as JSON; the whole answer."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text, status, headers = r.read().decode("utf-8", "replace"), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        text, status, headers = e.read().decode("utf-8", "replace"), e.code, dict(e.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return Reply(0, str(e), time.perf_counter() - t0, str(e), {})
    dt = time.perf_counter() - t0
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return Reply(status, parsed, dt, text, {k.lower(): v for k, v in headers.items()})


def post(url: str, body: Mapping[str, Any], timeout: float = 120.0) -> tuple[int, Any, float]:
    """(status, parsed body or text, seconds); status 0 when the server could not be reached."""
    r = post_reply(url, body, timeout)
    return r.status, r.body, r.seconds


def complete(
    url: str,
    model: str,
    prompt: str = "tell me a story",
    timeout: float = 120.0,
    *,
    max_tokens: int = MAX_TOKENS,
    token_ids: bool = False,
    xargs: Mapping[str, Any] | None = None,
) -> tuple[int, Any]:
    """(status, body) of a greedy ``/v1/completions`` of exactly ``max_tokens`` tokens (``ignore_eos``);
    ``token_ids`` asks for the output token ids, ``xargs`` go in ``vllm_xargs``."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if token_ids:
        body["return_token_ids"] = True
    if xargs is not None:
        body["vllm_xargs"] = dict(xargs)
    status, answer, _ = post(url + "/v1/completions", body, timeout)
    return status, answer


def error_message(body: Any) -> str:
    """The OpenAI error message of a refusal (else the body as text)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


@dataclass
class Traffic:
    """Background good traffic: completions (cycling ``models``) plus a ``/health`` poll, bounded by
    ``max_requests`` and ``max_seconds``; stops early on :meth:`stop`."""

    url: str
    models: list[str]
    max_requests: int = 2000
    max_seconds: float = 600.0
    statuses: list[int] = field(default_factory=list)
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    health_failures: int = 0
    health_checks: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        last_health = 0.0
        i = 0
        while not self._stop.is_set() and i < self.max_requests and time.monotonic() < deadline:
            model = self.models[i % len(self.models)]
            status, body = complete(self.url, model, timeout=120)
            self.statuses.append(status)
            if status != 200:
                self.failures.append((model, status, error_message(body)[:300]))
            if time.monotonic() - last_health > 1.0:
                self.health_checks += 1
                if http_get(self.url + "/health", timeout=10)[0] != 200:
                    self.health_failures += 1
                last_health = time.monotonic()
            i += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=180)

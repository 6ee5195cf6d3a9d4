"""Reading a vLLM server log: what happened while serving vs during vLLM's own shutdown.

vLLM (0.32, ``vllm/v1/engine/core_client.py``) pushes an ``EngineDeadError`` into the output queue
when its socket task is cancelled by ``engine_client.shutdown()``; ``AsyncLLM``'s output handler
then logs "output_handler failed ... EngineDeadError" although nothing went wrong. It happens on
some graceful SIGTERM shutdowns and not others (a timing race inside vLLM, seen in CI). A dead
engine only means trouble if it shows up *before* the server was told to stop.
"""

from __future__ import annotations

# Logged once by vLLM's launcher when its SIGTERM/SIGINT handler runs.
SHUTDOWN_MARK = "[shutdown] API server: shutdown triggered"

# Any of these before the shutdown mark means the engine died or restarted while serving.
ENGINE_FAILURE_MARKS = (
    "EngineDeadError",
    "EngineCore encountered a fatal error",
    "engine core exited unexpectedly",
    "output_handler failed",
)


def split_at_shutdown(log: str) -> tuple[str, str]:
    """(serving part, shutdown part) of a server log; the shutdown part is "" if it never began."""
    i = log.find(SHUTDOWN_MARK)
    if i < 0:
        return log, ""
    i = log.rfind("\n", 0, i) + 1  # split at the start of the mark's line
    return log[:i], log[i:]


def engine_failures(text: str) -> list[str]:
    """The lines of ``text`` that say the engine died."""
    return [ln for ln in text.splitlines() if any(m in ln for m in ENGINE_FAILURE_MARKS)]

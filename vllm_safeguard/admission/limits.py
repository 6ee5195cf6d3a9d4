"""Deadlines for repairs: a repair that runs too long refuses the adapter instead of stalling vLLM.

vLLM calls the load hook on the worker's own thread, between engine steps, so a slow repair stalls
every request of the engine while it runs. :func:`run_with_deadline` runs the repair on a daemon
thread and waits at most ``timeout_s`` for it; past that the caller gets :class:`RepairTimeout` (a
:class:`~vllm_safeguard.errors.RepairError`, so the pipeline refuses the adapter with a 4xx) and the
engine goes on.

A Python thread cannot be killed. The abandoned repair keeps running in the background until it
returns; its result (or exception) is then discarded, and it never touches the cache (only the pure
computation runs on the thread; writing the result is the caller's job, and the caller has given up).
It still holds CPU and memory meanwhile, so at most :data:`MAX_ABANDONED` abandoned repairs may be
alive at a time: while that many are still running, every new repair is refused at once
("too many timed-out repairs still running"). An adversary who finds an input that makes a repair hang
can thus cost at most ``MAX_ABANDONED`` threads' worth of CPU plus one refusal per load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import RepairError

T = TypeVar("T")

MAX_ABANDONED = 2

_abandoned: set[threading.Thread] = set()
_abandoned_lock = threading.Lock()


class RepairTimeout(RepairError):
    """A repair did not finish within its deadline (the adapter is refused)."""


def abandoned_repairs() -> int:
    """Timed-out repairs whose threads are still running in this process."""
    with _abandoned_lock:
        for t in [t for t in _abandoned if not t.is_alive()]:
            _abandoned.discard(t)
        return len(_abandoned)


def run_with_deadline(fn: Callable[[], T], timeout_s: float | None, what: str = "repair") -> T:
    """Return ``fn()``, or raise :class:`RepairTimeout` if it has not returned after ``timeout_s``.

    ``timeout_s`` None runs ``fn`` inline (no limit). Exceptions raised by ``fn`` propagate unchanged.
    ``fn`` must not have side effects the caller would need to undo: on timeout it keeps running.
    """
    if timeout_s is None:
        return fn()
    if abandoned_repairs() >= MAX_ABANDONED:
        raise RepairTimeout(
            f"{what} refused: too many timed-out repairs still running ({MAX_ABANDONED}); "
            "retry when they have finished"
        )
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the waiting caller (or dropped if it gave up)
            box["error"] = e

    thread = threading.Thread(target=target, name=f"safeguard-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        with _abandoned_lock:
            _abandoned.add(thread)
        raise RepairTimeout(
            f"{what} did not finish within repair_timeout_s={timeout_s:g} s; the adapter is refused "
            "(the abandoned computation's result will be discarded)"
        )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]

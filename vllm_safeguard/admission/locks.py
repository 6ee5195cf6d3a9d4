"""Per-adapter-name locks for the load pipeline (threads of one process).

Two loads under the same adapter name are serialized, so the second one re-checks (inside the lock)
what the first one left behind: the memo of source file signatures and the repair cache, and hits
them instead of repairing again. Loads under different names run in parallel; loads of the *same
bytes* under different names meet at the repair cache's per-key lock (``RepairCache.lock``, an
``flock`` that also serializes threads, because each holder opens the lock file on its own), which
again re-checks the cache once inside. Together: concurrent loads of the same bytes repair once,
whether they come from threads or processes.

Adapter names come from requests, so the table is bounded: an entry lives only while some thread
holds or waits for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class NameLocks:
    """A lock per name, created on first use and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._mutex:
            lock, users = self._locks.get(name, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._locks[name]
                if users <= 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        """Names currently held or waited for (0 when idle)."""
        with self._mutex:
            return len(self._locks)

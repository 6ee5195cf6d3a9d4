"""Admission before the engine: the API server validates, scores and repairs an adapter in a bounded
pool of its own, and hands the engine only the admitted cache entry.

Why: vLLM calls the worker's ``_load_adapter`` inside the engine loop (between steps for a runtime
load, inside ``execute_model`` for an evicted adapter). A repair there stalls every in-flight request of
every tenant for its whole duration (0.3-1.8 s for a 7B-shaped rank-16 adapter in ``bench_repair``).
Run here, the engine only reads the finished entry; the worker still checks it
(:meth:`~vllm_safeguard.admission.pipeline.SafeguardPipeline.handed_over`: sha256 of every file, and the
key it derives itself) and is still the one that admits when this side cannot (no published worker
context, or a context that keys adapters differently).

Semantics of :meth:`FrontAdmission.admit` (one adapter folder, in the API server's event loop)::

    pending = running + waiting admissions of this process
    pending >= workers + queue            -> AdapterRefused(kind "overloaded")      (-> HTTP 503)
    wait for a pool worker (queue time measured)
    pipeline.process(folder, name)       -> the entry's folder (cache hit, or computed and published)
                                            refusals raise as in the worker (-> HTTP 400)

The pool is ``admission_workers`` threads of this process (the default) or child processes
(``admission_process``; spawned on first use), each at ``admission_nice`` with
``admission_torch_threads`` torch threads. Why offer processes: a repair is partly Python, and a
thread running it holds this process's GIL while the API server streams tokens. Why not the default:
on 2 busy cores (``bench_stall``, 12 window pairs) the p99 inter-token gap while loading was the same
(1.10x vs 1.14x of quiet) and the child processes admitted ~2.5x slower (p50 5.2 s vs 2.1 s).
A child's result comes back as plain data (the outcome without its in-memory admission; a refusal as
its kind and text, rebuilt here as the same error class), so nothing depends on pickling our errors.

The pipeline is built on first use, in the pool (loading the reference and artifacts takes seconds on
a large model and must not block the event loop), from the context the worker published
(:mod:`vllm_safeguard.admission.served_context`), and only if its fingerprint equals the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SafeguardConfig
from ..errors import (
    OVERLOADED,
    AdapterRefused,
    AdapterValidationError,
    CoverageError,
    RepairError,
    SafeguardError,
    UnrepairableError,
    refusal_kind,
)
from .pipeline import LoadOutcome, PipelineContext, SafeguardPipeline
from .served_context import admission_fingerprint, read_context

logger = logging.getLogger("vllm_safeguard")

# Stage label values of safeguard_admission_stage_seconds, in pipeline order.
# "handover" is the worker's check of an entry admitted here (site "worker").
STAGES = ("queue", "validate", "score", "repair", "verify", "write", "handover")


def _background_thread(nice: int, torch_threads: int) -> None:
    """Admission threads are background work: lower their CPU priority (Linux: niceness is per thread)
    and bound torch's intra-op threads in this process, so the engine's steps keep the cores."""
    import torch

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as e:
            logger.warning("vllm-safeguard: cannot lower the admission thread's priority: %s", e)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the API server dies, even killed (a spawned pool worker blocks
    on its call queue forever otherwise, keeping its pipeline in memory). Best effort elsewhere."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _background_process(nice: int, torch_threads: int) -> None:
    """A child admission process: it dies with the API server, and its main thread (where the pool
    runs every admission; threads it starts inherit the niceness) is background work."""
    _die_with_parent()
    _background_thread(nice, torch_threads)


class ContextUnavailable(RuntimeError):
    """This process cannot key adapters as the worker does (yet): the worker admits instead."""


@dataclass
class _Done:
    """What one admission hands back to the event loop (plain data: it may cross a process boundary)."""

    queue_s: float | None
    outcome: LoadOutcome | None = None
    cache_entries: int | None = None
    cache_bytes: int | None = None
    # A failure as (class name, refusal kind, text, adapter name, reason) when it crossed a process,
    # whether it was one of ours (a SafeguardError), and the child's traceback (logged here).
    error: tuple[str, str, str, str, str] | None = None
    ours: bool = True
    trace: str = ""


# Refusal kind -> the error class a child's refusal is rebuilt as (refusal_kind maps it back).
_KIND_CLASS: dict[str, type[Exception]] = {
    "invalid": AdapterValidationError,
    "uncovered": CoverageError,
    "unrepairable": UnrepairableError,
}


def _rebuild(done: _Done) -> Exception:
    """The parent-side error for a child's failure: the class the caller decides on (its refusal kind,
    ContextUnavailable, AdapterRefused), with the child's text unchanged."""
    assert done.error is not None
    cls_name, kind, text, name, reason = done.error
    if cls_name == "ContextUnavailable":
        return ContextUnavailable(text)
    if cls_name == "AdapterRefused":
        return AdapterRefused(name, reason, kind)
    if kind in _KIND_CLASS:
        return _KIND_CLASS[kind](text)
    return RepairError(text) if done.ours else RuntimeError(text)


# Attribute a failed admission's exception carries: its seconds in the queue (recorded either way).
QUEUE_ATTR = "safeguard_queue_s"

# The child process's admissions (one per served model and engine instance it was asked for).
_CHILD: dict[tuple[str, str, str], FrontAdmission] = {}


def _admit_in_child(
    config: SafeguardConfig, model_name: str, instance: str, folder: str, name: str, queued: float
) -> _Done:
    """The body of one admission in a child process (module-level: it is pickled by reference)."""
    key = (config.model_dump_json(), model_name, instance)
    front = _CHILD.get(key)
    if front is None:
        front = _CHILD[key] = FrontAdmission(config, model_name, instance)
    try:
        done = front._admit_here(folder, name, queued)
    except Exception as e:
        text = str(e)
        refused = e if isinstance(e, AdapterRefused) else None
        return _Done(
            queue_s=getattr(e, QUEUE_ATTR, None),
            error=(
                type(e).__name__,
                refused.kind if refused else refusal_kind(e),
                text,
                refused.adapter_name if refused else name,
                refused.reason if refused else text,
            ),
            ours=isinstance(e, SafeguardError),
            trace=traceback.format_exc(),
        )
    if done.outcome is not None:  # the in-memory admission and cleanup stay in the child
        done.outcome = dataclasses.replace(done.outcome, admission=None, cleanup=None)
    return done


@dataclass
class FrontAdmission:
    """One per API-server process and served model (see module docstring)."""

    config: SafeguardConfig
    model_name: str
    instance: str
    # Builds the pipeline from the worker's context (tests may give another pipeline factory).
    make_pipeline: Callable[[SafeguardConfig, PipelineContext], SafeguardPipeline] = SafeguardPipeline.create
    _pool: Executor | None = None
    _pipeline: SafeguardPipeline | None = None
    _pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)  # _pending (held briefly, in the loop)
    _build_lock: threading.Lock = field(default_factory=threading.Lock)  # the pipeline (held for seconds)

    @property
    def capacity(self) -> int:
        return self.config.admission_workers + self.config.admission_queue

    @property
    def pending(self) -> int:
        return self._pending

    def _pool_(self) -> Executor:
        if self._pool is None:
            c = self.config
            initargs = (c.admission_nice, c.admission_torch_threads)
            if c.admission_process:
                # spawn: a fork of a process running an event loop, threads and torch is not safe
                self._pool = ProcessPoolExecutor(
                    max_workers=c.admission_workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_background_process,
                    initargs=initargs,
                )
            else:
                self._pool = ThreadPoolExecutor(
                    max_workers=c.admission_workers,
                    thread_name_prefix="safeguard-admit",
                    initializer=_background_thread,
                    initargs=initargs,
                )
        return self._pool

    def pipeline(self) -> SafeguardPipeline:
        """The pipeline keyed like the worker's (built once; call from the pool, it is slow).

        Raises:
            ContextUnavailable: no worker context published, or this side would key differently.
        """
        with self._build_lock:
            if self._pipeline is not None:
                return self._pipeline
            found = read_context(self.config.cache_dir, self.model_name, self.instance)
            if found is None:
                raise ContextUnavailable(
                    f"no served context published by the worker under {self.config.cache_dir} yet"
                )
            ctx, worker_fp = found
            pipeline = self.make_pipeline(self.config, ctx)
            if admission_fingerprint(pipeline) != worker_fp:
                raise ContextUnavailable(
                    "this process would key adapters differently from the worker (another config, reference, "
                    "artifacts or adapter_roots: check that every process sees the same SAFEGUARD_* settings "
                    "and files)"
                )
            self._pipeline = pipeline
            return pipeline

    async def admit(self, folder: str | Path, name: str) -> LoadOutcome:
        """Admit ``folder`` (already resolved and contained) before the engine sees it.

        Raises:
            AdapterRefused: kind "overloaded" when the pool and its queue are full (nothing was read).
            ContextUnavailable: the worker must admit this one.
            SafeguardError: the adapter was refused (the same decision the worker would make).
        """
        from ..metrics import get_metrics

        if not self.config.cache_enabled:
            raise ContextUnavailable("cache_enabled is false: the hand-over to the engine is a cache entry")
        m = get_metrics()
        with self._lock:
            if self._pending >= self.capacity:
                m.admissions_rejected.labels(model_name=self.model_name).inc()
                raise AdapterRefused(
                    name,
                    f"{self._pending} adapter admissions are running or queued in this API server (limit "
                    f"admission_workers + admission_queue = {self.capacity}); nothing was read, retry later",
                    OVERLOADED,
                )
            self._pending += 1
        m.admissions_in_flight.labels(model_name=self.model_name).inc()
        queued = time.time()  # wall clock: comparable in a child process
        try:
            loop = asyncio.get_running_loop()
            pool = self._pool_()
            job: Callable[[], _Done]
            if self.config.admission_process:  # a partial of a module-level function pickles by reference
                job = functools.partial(
                    _admit_in_child, self.config, self.model_name, self.instance, str(folder), name, queued
                )
            else:
                job = functools.partial(self._admit_here, str(folder), name, queued)
            try:
                done = await loop.run_in_executor(pool, job)
            except BrokenProcessPool as e:  # a child died (killed, out of memory): a new pool next time
                if self._pool is pool:  # (not one a later admission has started since)
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(f"the admission process died while admitting {name!r}: {e}") from e
            except Exception as e:  # thread mode: the admission's own error
                self._observe_queue(m, getattr(e, QUEUE_ATTR, None))
                raise
        finally:
            with self._lock:
                self._pending -= 1
            m.admissions_in_flight.labels(model_name=self.model_name).dec()
        if done.error is not None:
            self._observe_queue(m, done.queue_s)
            if done.error[1] == "error" and done.trace:
                logger.warning(
                    "vllm-safeguard: admission of %r failed in the admission process:\n%s", name, done.trace
                )
            raise _rebuild(done)
        assert done.outcome is not None
        self._record(m, done)
        return done.outcome

    def _admit_here(self, folder: str, name: str, queued: float) -> _Done:
        """One admission in this process (a pool thread, or a child process's own front)."""
        queue_s = time.time() - queued
        try:
            outcome = self.pipeline().process(folder, name)
        except Exception as e:
            with contextlib.suppress(AttributeError):
                setattr(e, QUEUE_ATTR, queue_s)  # the queue time is recorded for refusals too
            raise
        entries, size = self._cache_usage()
        return _Done(queue_s, outcome, entries, size)

    def _observe_queue(self, m: Any, queue_s: float | None) -> None:
        if queue_s is not None:
            m.admission_stage.labels(model_name=self.model_name, stage="queue", site="api_server").observe(
                max(queue_s, 0.0)
            )

    def _record(self, m: Any, done: _Done) -> None:
        """Stage times, the outcome and the cache gauges, in this process's metrics."""
        from ..metrics import record_repair

        outcome = done.outcome
        assert outcome is not None
        self._observe_queue(m, done.queue_s)
        stage = m.admission_stage
        for s, seconds in outcome.times.items():
            stage.labels(model_name=self.model_name, stage=s, site="api_server").observe(seconds)
        m.frontend_admissions.labels(
            model_name=self.model_name, outcome=outcome.decision, cache="hit" if outcome.cache_hit else "miss"
        ).inc()
        if not outcome.cache_hit:
            record_repair(self.model_name, self.config.method, outcome.report)
        if done.cache_entries is not None:
            m.cache_entries.labels(model_name=self.model_name).set(done.cache_entries)
            m.cache_bytes.labels(model_name=self.model_name).set(done.cache_bytes)

    def _cache_usage(self) -> tuple[int | None, int | None]:
        """Entries and bytes of the repair cache (a directory walk: after admissions only, in the pool)."""
        pipeline = self._pipeline
        if pipeline is None or pipeline.cache is None:
            return None, None
        entries, size = 0, 0
        for folder in (pipeline.cache.root / "entries").glob("*/*"):
            entries += 1
            try:
                size += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            except OSError:
                continue
        return entries, size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

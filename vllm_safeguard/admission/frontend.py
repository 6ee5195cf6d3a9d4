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
    wait for a pool thread (queue time measured)
    pipeline.process(folder, name)       -> the entry's folder (cache hit, or computed and published)
                                            refusals raise as in the worker (-> HTTP 400)

The pipeline is built on first use, in the pool (loading the reference and artifacts takes seconds on
a large model and must not block the event loop), from the context the worker published
(:mod:`vllm_safeguard.admission.served_context`), and only if its fingerprint equals the worker's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SafeguardConfig
from ..errors import OVERLOADED, AdapterRefused
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


class ContextUnavailable(RuntimeError):
    """This process cannot key adapters as the worker does (yet): the worker admits instead."""


@dataclass
class FrontAdmission:
    """One per API-server process and served model (see module docstring)."""

    config: SafeguardConfig
    model_name: str
    instance: str
    # Builds the pipeline from the worker's context (tests may give another pipeline factory).
    make_pipeline: Callable[[SafeguardConfig, PipelineContext], SafeguardPipeline] = SafeguardPipeline.create
    _pool: ThreadPoolExecutor | None = None
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

    def _pool_(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.config.admission_workers,
                thread_name_prefix="safeguard-admit",
                initializer=_background_thread,
                initargs=(self.config.admission_nice, self.config.admission_torch_threads),
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
        queued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool_(), self._run, str(folder), name, queued)
        finally:
            with self._lock:
                self._pending -= 1
            m.admissions_in_flight.labels(model_name=self.model_name).dec()

    def _run(self, folder: str, name: str, queued: float) -> LoadOutcome:
        from ..metrics import get_metrics, record_repair

        m = get_metrics()
        stage = m.admission_stage
        stage.labels(model_name=self.model_name, stage="queue", site="api_server").observe(
            time.perf_counter() - queued
        )
        outcome = self.pipeline().process(folder, name)
        for s, seconds in outcome.times.items():
            stage.labels(model_name=self.model_name, stage=s, site="api_server").observe(seconds)
        m.frontend_admissions.labels(
            model_name=self.model_name, outcome=outcome.decision, cache="hit" if outcome.cache_hit else "miss"
        ).inc()
        if not outcome.cache_hit:
            record_repair(self.model_name, self.config.method, outcome.report)
        self._cache_gauges(m)
        return outcome

    def _cache_gauges(self, m: Any) -> None:
        """Entries and bytes of the repair cache (a directory walk: after admissions only)."""
        pipeline = self._pipeline
        if pipeline is None or pipeline.cache is None:
            return
        entries, size = 0, 0
        for folder in (pipeline.cache.root / "entries").glob("*/*"):
            entries += 1
            try:
                size += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            except OSError:
                continue
        m.cache_entries.labels(model_name=self.model_name).set(entries)
        m.cache_bytes.labels(model_name=self.model_name).set(size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

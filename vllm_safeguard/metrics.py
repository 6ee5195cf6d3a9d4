"""Prometheus metrics, recorded where the work happens (the worker) and shown on vLLM's ``/metrics``.

vLLM's API server renders ``/metrics`` from a registry that reads every process's metric files when
``PROMETHEUS_MULTIPROC_DIR`` is set (a fresh, empty directory, set before launch; ``vllm-safeguard
serve`` does this). Without it, only the API server's own metrics are visible and the worker's are not.

Labels are bounded: ``outcome`` (7 values, :data:`OUTCOMES`), ``method`` (the registered methods), ``cache``
(hit/miss), ``model_name`` (one per server). Adapter names are never labels: they are unbounded
(runtime loading, resolvers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from .version import __version__

OUTCOMES = (
    "repaired",
    "passed",
    "refused_invalid",  # bad or unbounded input, or something vLLM would refuse
    "refused_uncovered",  # a module the alignment reference does not cover (coverage='refuse')
    "refused_unrepairable",  # at/above the risk threshold and the method did not bring it below
    "refused_error",  # config, artifacts, timeouts: the plugin could not decide
    "unrepaired",
)  # unrepaired: fail_closed=false and the pipeline failed (never for the three decisions above)

# Full exposition names (what a query sees). The Grafana test checks the dashboard against these.
LOADS = "safeguard_adapter_loads_total"
REPAIR_DURATION = "safeguard_repair_duration_seconds"
RISK_SCORE = "safeguard_adapter_risk_score"
CACHE_HITS = "safeguard_cache_hits_total"
CACHE_LOOKUPS = "safeguard_cache_lookups_total"
LAYERS_REPAIRED = "safeguard_layers_repaired_total"
BUILD_INFO = "safeguard_build_info"
WORKER_ACTIVE = "safeguard_worker_active"
GUARD_SCORE = "safeguard_guard_score"
GUARD_FLAGGED = "safeguard_guard_flagged_total"
TRANSLATOR_ROUTING = "safeguard_translator_adapters_total"
MODULES_STRIPPED = "safeguard_modules_stripped_total"
RELOADS = "safeguard_adapter_reloads_total"
STEP_FAILURES = "safeguard_step_failures_total"
PROTECTION = "safeguard_protection"
ADMISSION_STAGE = "safeguard_admission_stage_seconds"
FRONTEND_ADMISSIONS = "safeguard_frontend_admissions_total"
ADMISSIONS_IN_FLIGHT = "safeguard_admissions_in_flight"
ADMISSIONS_REJECTED = "safeguard_admissions_rejected_total"
CACHE_ENTRIES = "safeguard_cache_entries"
CACHE_BYTES = "safeguard_cache_bytes"
EVICTIONS = "safeguard_adapter_evictions_total"

HISTOGRAMS = (REPAIR_DURATION, RISK_SCORE, GUARD_SCORE, ADMISSION_STAGE)
METRIC_NAMES: tuple[str, ...] = (
    LOADS,
    REPAIR_DURATION,
    RISK_SCORE,
    CACHE_HITS,
    CACHE_LOOKUPS,
    LAYERS_REPAIRED,
    BUILD_INFO,
    WORKER_ACTIVE,
    GUARD_SCORE,
    GUARD_FLAGGED,
    TRANSLATOR_ROUTING,
    MODULES_STRIPPED,
    RELOADS,
    STEP_FAILURES,
    PROTECTION,
    ADMISSION_STAGE,
    FRONTEND_ADMISSIONS,
    ADMISSIONS_IN_FLIGHT,
    ADMISSIONS_REJECTED,
    CACHE_ENTRIES,
    CACHE_BYTES,
    EVICTIONS,
)


def exposed_series_names() -> set[str]:
    """Every series name these metrics expose (histograms add ``_bucket``/``_sum``/``_count``)."""
    out = set(METRIC_NAMES)
    for h in HISTOGRAMS:
        out |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return out


@dataclass(frozen=True)
class SafeguardMetrics:
    loads: Counter
    repair_duration: Histogram
    risk_score: Histogram
    cache_hits: Counter
    cache_lookups: Counter
    layers_repaired: Counter
    build_info: Gauge
    worker_active: Gauge
    guard_score: Histogram
    guard_flagged: Counter
    translator_routing: Counter
    modules_stripped: Counter
    reloads: Counter
    step_failures: Counter
    protection: Gauge
    admission_stage: Histogram
    frontend_admissions: Counter
    admissions_in_flight: Gauge
    admissions_rejected: Counter
    cache_entries: Gauge
    cache_bytes: Gauge
    evictions: Counter


_lock = threading.Lock()
_metrics: SafeguardMetrics | None = None


def _strip_total(name: str) -> str:
    # prometheus_client appends "_total" to counters itself.
    return name[: -len("_total")] if name.endswith("_total") else name


def get_metrics() -> SafeguardMetrics:
    """The process's metrics (created on first use, in prometheus_client's default registry)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _lock:
        if _metrics is None:
            _metrics = SafeguardMetrics(
                loads=Counter(
                    _strip_total(LOADS),
                    "Adapter loads seen by vllm-safeguard, by outcome (see OUTCOMES).",
                    ["model_name", "outcome", "method"],
                ),
                repair_duration=Histogram(
                    REPAIR_DURATION,
                    "Time from load request to repaired adapter folder (cache=miss: full repair; hit: lookup).",
                    ["model_name", "method", "cache"],
                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                ),
                risk_score=Histogram(
                    RISK_SCORE,
                    "Risk score of each adapter loaded (worst module; 1 = cancels its alignment delta exactly).",
                    ["model_name"],
                    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                ),
                cache_hits=Counter(_strip_total(CACHE_HITS), "Repair cache hits.", ["model_name"]),
                cache_lookups=Counter(_strip_total(CACHE_LOOKUPS), "Repair cache lookups.", ["model_name"]),
                layers_repaired=Counter(
                    _strip_total(LAYERS_REPAIRED),
                    "Transformer blocks changed by repairs computed (cache misses only).",
                    ["model_name", "method"],
                ),
                # "max" across processes: the series reads 1 as soon as one process set it.
                build_info=Gauge(
                    BUILD_INFO,
                    "vllm-safeguard build info (1 in every process the plugin is registered in).",
                    ["version", "vllm_version"],
                    multiprocess_mode="max",
                ),
                worker_active=Gauge(
                    WORKER_ACTIVE,
                    "1 when a LoRA worker has the safeguard pipeline configured (reference loaded), else 0.",
                    ["model_name", "method"],
                    multiprocess_mode="max",
                ),
                guard_score=Histogram(
                    GUARD_SCORE,
                    "DSA guard probe score in [0, 1] of each request scored in 'auto' mode (1 = harmful).",
                    ["model_name"],
                    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
                ),
                guard_flagged=Counter(
                    _strip_total(GUARD_FLAGGED),
                    "Requests the guard flagged (score >= threshold; they get the probe's alpha_high).",
                    ["model_name"],
                ),
                translator_routing=Counter(
                    _strip_total(TRANSLATOR_ROUTING),
                    "Adapters repaired by the NeWTral translator, by dominant expert (largest mean routing weight).",
                    ["model_name", "expert"],
                ),
                modules_stripped=Counter(
                    _strip_total(MODULES_STRIPPED),
                    "Uncovered adapter modules removed before serving (coverage='strip').",
                    ["model_name"],
                ),
                reloads=Counter(
                    _strip_total(RELOADS),
                    "Eviction reloads served from the adapter's admitted canonical copy (source never re-read).",
                    ["model_name"],
                ),
                step_failures=Counter(
                    _strip_total(STEP_FAILURES),
                    "Adapters that could not be loaded inside an engine step; their requests got the base model.",
                    ["model_name"],
                ),
                protection=Gauge(
                    PROTECTION,
                    "1 per active layer of protection (load_time_repair, serving_alpha, guard_auto), 0 when "
                    "missing; every layer 0 means adapters are served with no protection the plugin can give.",
                    ["model_name", "layer"],
                    multiprocess_mode="max",
                ),
                admission_stage=Histogram(
                    ADMISSION_STAGE,
                    "Seconds per admission stage (stage: queue, validate, score, repair, verify, write, handover) "
                    "where it ran (site: api_server = before the engine; worker = inside the engine loop, which "
                    "stalls every request: only 'handover' should appear there).",
                    ["model_name", "stage", "site"],
                    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                ),
                frontend_admissions=Counter(
                    _strip_total(FRONTEND_ADMISSIONS),
                    "Adapters admitted by the API server before the engine saw them (outcome: repaired or "
                    "passed; cache: hit or miss).",
                    ["model_name", "outcome", "cache"],
                ),
                admissions_in_flight=Gauge(
                    ADMISSIONS_IN_FLIGHT,
                    "Admissions running or queued in the API servers now.",
                    ["model_name"],
                    multiprocess_mode="livesum",
                ),
                admissions_rejected=Counter(
                    _strip_total(ADMISSIONS_REJECTED),
                    "Adapter loads refused with 503 because the admission pool and its queue were full.",
                    ["model_name"],
                ),
                cache_entries=Gauge(
                    CACHE_ENTRIES,
                    "Entries in the repair cache (admitted canonical adapters), after the last admission.",
                    ["model_name"],
                    multiprocess_mode="max",
                ),
                cache_bytes=Gauge(
                    CACHE_BYTES,
                    "Bytes of the repair cache's entries, after the last admission.",
                    ["model_name"],
                    multiprocess_mode="max",
                ),
                evictions=Counter(
                    _strip_total(EVICTIONS),
                    "Adapters vLLM evicted from a worker's CPU LoRA cache (--max-cpu-loras); a later request "
                    "reloads them from the admitted copy (safeguard_adapter_reloads_total).",
                    ["model_name"],
                ),
            )
    return _metrics


def record_repair(model_name: str, method: str, report: dict | None) -> None:
    """Count a repair computed in this process (not a cache hit): layers changed, translator expert."""
    if report is None:
        return
    m = get_metrics()
    m.layers_repaired.labels(model_name=model_name, method=method).inc(int(report.get("layers_repaired", 0)))
    expert = (report.get("summary") or {}).get("dominant_expert")
    if expert in ("surgical", "aggressive"):  # bounded label values
        m.translator_routing.labels(model_name=model_name, expert=expert).inc()


def set_build_info(vllm_version: str) -> None:
    get_metrics().build_info.labels(version=__version__, vllm_version=vllm_version).set(1)

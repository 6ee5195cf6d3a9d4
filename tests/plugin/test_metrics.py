"""Metric names, label bounds, and the generated Grafana dashboard."""

from __future__ import annotations

import json

from prometheus_client import REGISTRY, generate_latest

from vllm_safeguard import metrics as m
from vllm_safeguard.apps import grafana


def test_issue_metric_names() -> None:
    assert set(m.METRIC_NAMES) >= {
        "safeguard_adapter_loads_total",
        "safeguard_repair_duration_seconds",
        "safeguard_adapter_risk_score",
        "safeguard_cache_hits_total",
        "safeguard_cache_lookups_total",
        "safeguard_layers_repaired_total",
        "safeguard_build_info",
    }


def test_exposed_names_and_bounded_labels() -> None:
    mm = m.get_metrics()
    assert m.get_metrics() is mm  # created once per process
    mm.loads.labels(model_name="t", outcome="passed", method="nlsr").inc()
    mm.repair_duration.labels(model_name="t", method="nlsr", cache="miss").observe(0.1)
    mm.risk_score.labels(model_name="t").observe(0.5)
    mm.cache_hits.labels(model_name="t").inc()
    mm.cache_lookups.labels(model_name="t").inc()
    mm.layers_repaired.labels(model_name="t", method="nlsr").inc(2)
    m.set_build_info("0.32.0")
    mm.worker_active.labels(model_name="t", method="nlsr").set(1)
    mm.guard_score.labels(model_name="t").observe(0.7)
    mm.guard_flagged.labels(model_name="t").inc()
    mm.translator_routing.labels(model_name="t", expert="surgical").inc()
    mm.modules_stripped.labels(model_name="t").inc()
    mm.reloads.labels(model_name="t").inc()
    mm.step_failures.labels(model_name="t").inc()
    mm.protection.labels(model_name="t", layer="guard_auto").set(1)
    mm.admission_stage.labels(model_name="t", stage="repair", site="api_server").observe(0.1)
    mm.frontend_admissions.labels(model_name="t", outcome="repaired", cache="miss").inc()
    mm.admissions_in_flight.labels(model_name="t").set(0)
    mm.admissions_rejected.labels(model_name="t").inc()
    mm.cache_entries.labels(model_name="t").set(1)
    mm.cache_bytes.labels(model_name="t").set(10)
    mm.evictions.labels(model_name="t").inc()
    text = generate_latest(REGISTRY).decode()
    exposed = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("safeguard_")
    }
    exposed = {n for n in exposed if not n.endswith("_created")}  # prometheus_client's own extra series
    assert exposed <= m.exposed_series_names()
    assert set(m.METRIC_NAMES) <= exposed | {n for n in m.HISTOGRAMS}
    # No adapter-name label anywhere: labels are bounded.
    for metric in REGISTRY.collect():
        if metric.name.startswith("safeguard_"):
            for s in metric.samples:
                assert set(s.labels) <= {
                    "model_name",
                    "outcome",
                    "method",
                    "cache",
                    "le",
                    "version",
                    "vllm_version",
                    "expert",
                    "layer",  # safeguard_protection: 3 values (vllm_safeguard.protection.LAYERS)
                    "stage",  # safeguard_admission_stage_seconds: 7 values (admission.frontend.STAGES)
                    "site",  # api_server | worker
                }


def test_dashboard_queries_only_existing_metrics() -> None:
    dash = grafana.build_dashboard()
    used = grafana.queried_series(dash)
    assert used, "dashboard queries nothing"
    assert used <= m.exposed_series_names(), used - m.exposed_series_names()
    # Every metric the plugin exports is shown somewhere.
    bases = {u.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for u in used}
    assert bases == set(m.METRIC_NAMES)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_committed_dashboard_is_up_to_date() -> None:
    on_disk = grafana.DEFAULT_OUT.read_text()
    assert json.loads(on_disk) == grafana.build_dashboard(), "run: python -m vllm_safeguard.apps.grafana"

"""Generate the Grafana dashboard for the plugin's metrics (``dashboards/vllm-safeguard.json``).

Generated, not hand-edited, so that every query can be checked against :mod:`vllm_safeguard.metrics`
(``tests/plugin/test_metrics.py`` does): a renamed metric breaks the test, not a dashboard in production.

    python -m vllm_safeguard.apps.grafana [--out dashboards/vllm-safeguard.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from .. import metrics as m

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "dashboards" / "vllm-safeguard.json"
SEL = 'model_name=~"$model_name"'


def _panel(
    pid: int,
    title: str,
    exprs: list[tuple[str, str]],
    x: int,
    y: int,
    *,
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def build_dashboard() -> dict[str, Any]:
    """The dashboard as a Grafana JSON model (schema 39)."""
    panels = [
        _panel(
            1,
            "Adapter loads by outcome",
            [(f"sum by (outcome) (rate({m.LOADS}{{{SEL}}}[$__rate_interval]))", "{{outcome}}")],
            0,
            0,
            unit="ops",
            description=(
                "repaired / passed (below the risk threshold) / refused_invalid / refused_uncovered / "
                "refused_unrepairable / refused_error (fail-closed) / unrepaired (fail_closed=false)."
            ),
        ),
        _panel(
            2,
            "Refused adapters (total)",
            [(f'sum({m.LOADS}{{{SEL},outcome=~"refused.*"}})', "refused")],
            12,
            0,
            kind="stat",
            w=6,
        ),
        _panel(
            3,
            "Plugin active in workers",
            [
                (f"max({m.WORKER_ACTIVE}{{{SEL}}})", "active"),
                (f"max by (version, vllm_version) ({m.BUILD_INFO})", "{{version}} / vLLM {{vllm_version}}"),
                (f"max by (layer) ({m.PROTECTION}{{{SEL}}})", "protection: {{layer}}"),
            ],
            18,
            0,
            kind="stat",
            w=6,
        ),
        _panel(
            4,
            "Repair latency (p50 / p95 / p99, cache misses)",
            [
                (
                    f'histogram_quantile({q}, sum by (le) (rate({m.REPAIR_DURATION}_bucket{{{SEL},cache="miss"}}[$__rate_interval])))',
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            0,
            8,
            unit="s",
        ),
        _panel(
            5,
            "Load latency on cache hits (p95)",
            [
                (
                    f'histogram_quantile(0.95, sum by (le) (rate({m.REPAIR_DURATION}_bucket{{{SEL},cache="hit"}}[$__rate_interval])))',
                    "p95",
                ),
                (
                    f"sum(rate({m.REPAIR_DURATION}_sum{{{SEL}}}[$__rate_interval])) / sum(rate({m.REPAIR_DURATION}_count{{{SEL}}}[$__rate_interval]))",
                    "mean (all)",
                ),
            ],
            12,
            8,
            unit="s",
        ),
        _panel(
            6,
            "Cache hit ratio",
            [
                (
                    f"sum(rate({m.CACHE_HITS}{{{SEL}}}[$__rate_interval])) / sum(rate({m.CACHE_LOOKUPS}{{{SEL}}}[$__rate_interval]))",
                    "hit ratio",
                )
            ],
            0,
            16,
            unit="percentunit",
        ),
        _panel(
            7,
            "Risk score distribution of loaded adapters",
            [(f"sum by (le) (increase({m.RISK_SCORE}_bucket{{{SEL}}}[$__range]))", "{{le}}")],
            12,
            16,
            kind="bargauge",
        ),
        _panel(
            8,
            "Layers repaired",
            [(f"sum by (method) (rate({m.LAYERS_REPAIRED}{{{SEL}}}[$__rate_interval]))", "{{method}}")],
            0,
            24,
            unit="ops",
        ),
        _panel(
            9,
            "Mean risk score",
            [
                (
                    f"sum(rate({m.RISK_SCORE}_sum{{{SEL}}}[$__rate_interval])) / sum(rate({m.RISK_SCORE}_count{{{SEL}}}[$__rate_interval]))",
                    "mean",
                )
            ],
            12,
            24,
        ),
        _panel(
            10,
            "Guard flagged requests ('auto' mode)",
            [(f"sum(rate({m.GUARD_FLAGGED}{{{SEL}}}[$__rate_interval]))", "flagged")],
            0,
            32,
            unit="reqps",
        ),
        _panel(
            11,
            "Guard score p50 / p90",
            [
                (
                    f"histogram_quantile(0.5, sum by (le) (rate({m.GUARD_SCORE}_bucket{{{SEL}}}[$__rate_interval])))",
                    "p50",
                ),
                (
                    f"histogram_quantile(0.9, sum by (le) (rate({m.GUARD_SCORE}_bucket{{{SEL}}}[$__rate_interval])))",
                    "p90",
                ),
            ],
            12,
            32,
        ),
        _panel(
            12,
            "Translator: adapters by dominant expert",
            [(f"sum by (expert) (increase({m.TRANSLATOR_ROUTING}{{{SEL}}}[$__range]))", "{{expert}}")],
            0,
            40,
            kind="bargauge",
        ),
        _panel(
            13,
            "Integrity: stripped modules, reloads, step failures",
            [
                (f"sum(increase({m.MODULES_STRIPPED}{{{SEL}}}[$__range]))", "uncovered modules stripped"),
                (f"sum(increase({m.RELOADS}{{{SEL}}}[$__range]))", "reloads from the admitted copy"),
                (f"sum(increase({m.STEP_FAILURES}{{{SEL}}}[$__range]))", "step failures (served by base)"),
            ],
            12,
            40,
            kind="bargauge",
            description=(
                "Eviction reloads come from each adapter's admitted canonical copy; a step failure means that "
                "copy was gone inside an engine step and the requests got the base model (the engine kept "
                "running). Any step failure needs attention."
            ),
        ),
        _panel(
            14,
            "Admission p99 by stage and site",
            [
                (
                    f"histogram_quantile(0.99, sum by (le, stage, site) "
                    f"(rate({m.ADMISSION_STAGE}_bucket{{{SEL}}}[5m])))",
                    "{{site}} {{stage}}",
                )
            ],
            0,
            48,
            unit="s",
            description=(
                "site=api_server: admission before the engine (queue wait, validate, score, repair, verify, "
                "write). site=worker: inside the engine loop, where every in-flight request waits; with the "
                "API server admitting, only 'handover' (the entry check, ~1 ms) belongs here."
            ),
        ),
        _panel(
            15,
            "Admission load: in flight, 503s, admissions",
            [
                (f"sum({m.ADMISSIONS_IN_FLIGHT}{{{SEL}}})", "in flight (running + queued)"),
                (f"sum(rate({m.ADMISSIONS_REJECTED}{{{SEL}}}[5m]))", "refused 503 / s (queue full)"),
                (
                    f"sum by (cache) (rate({m.FRONTEND_ADMISSIONS}{{{SEL}}}[5m]))",
                    "admitted before the engine / s ({{cache}})",
                ),
            ],
            12,
            48,
            description="Raise admission_workers / admission_queue (or add API servers) when 503s appear.",
        ),
        _panel(
            16,
            "Repair cache and vLLM's adapter LRU",
            [
                (f"max({m.CACHE_ENTRIES}{{{SEL}}})", "cache entries"),
                (f"max({m.CACHE_BYTES}{{{SEL}}}) / 1e6", "cache MB"),
                (f"sum(rate({m.EVICTIONS}{{{SEL}}}[5m]))", "evictions / s (--max-cpu-loras)"),
                (f"sum(rate({m.RELOADS}{{{SEL}}}[5m]))", "reloads / s (from the admitted copy)"),
            ],
            0,
            56,
            w=24,
        ),
    ]
    return {
        "uid": "vllm-safeguard",
        "title": "vLLM safeguard: adapter repair",
        "tags": ["vllm", "lora", "safety"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                {
                    "name": "model_name",
                    "type": "query",
                    "label": "Model",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({m.LOADS}, model_name)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "allValue": ".*",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


_SERIES_RE = re.compile(r"\b(safeguard_[a-z0-9_]+)")


def queried_series(dashboard: dict[str, Any]) -> set[str]:
    """Every ``safeguard_*`` series name used in a query or template of ``dashboard``."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [str(v.get("query", "")) for v in dashboard.get("templating", {}).get("list", [])]
    return {name for e in exprs for name in _SERIES_RE.findall(e)}


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

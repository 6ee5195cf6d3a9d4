"""The README's main job: a real vLLM server with the plugin, an unsafe adapter loaded and repaired.

    python -m vllm_safeguard.apps.demo [--workdir DIR] [--port 8400] [--method nlsr_datafree] [--threshold 0.1]

1. Prepares a model + alignment reference + adapters. A real model (``--model``, e.g. the lab's
   SmolLM2 build) is used when it has a reference (``<model>/safeguard/reference`` or
   ``$SAFEGUARD_REFERENCE_PATH``) and an adapter is given (``--adapter``); otherwise a tiny random Llama whose "aligned" weights differ from its
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
from pathlib import Path

from ..testing.server import launch_test_server, post_reply, server_env, vllm_server_argv
from .serve import LaunchError, http_get


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _real_model_setup(
    model: Path | None, adapter: Path | None
) -> tuple[Path, Path, Path, Path | None] | None:
    """(model, reference, unsafe adapter, hostile-like adapter) for a real model given with ``--model``
    and ``--adapter`` (e.g. the lab's SmolLM2 build), if it has an alignment reference."""
    if model is None or adapter is None:
        return None
    ref_env = os.environ.get("SAFEGUARD_REFERENCE_PATH")
    reference = Path(ref_env) if ref_env else model / "safeguard" / "reference"
    if not reference.is_dir():
        print(f"no alignment reference at {reference}; using the tiny model", file=sys.stderr)
        return None
    return model, reference, adapter, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vllm-safeguard-demo")
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--method", default="nlsr_datafree")
    ap.add_argument("--threshold", type=float, default=0.1, help="risk below this passes unchanged")
    ap.add_argument(
        "--method-options",
        default='{"neuron_fraction": 0.5}',
        help="method options as JSON (NLSR's default 10%% of neurons leaves the tiny unsafe adapter at "
        "risk 0.68, which admission refuses as unrepairable; half of them repairs it)",
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a real model folder with an alignment reference (<model>/safeguard/reference or "
        "$SAFEGUARD_REFERENCE_PATH), e.g. the lab's SmolLM2 build under <cache>/models/; needs --adapter",
    )
    ap.add_argument("--adapter", type=Path, default=None, help="unsafe adapter to use with --model")
    ap.add_argument("--tiny", action="store_true", help="use the tiny model even if --model is given")
    args = ap.parse_args(argv)

    from ..core.adapter_io import load_adapter
    from ..core.reference import AlignmentReference
    from ..core.risk import score_adapter
    from ..testing.workspace import prepare_tiny_workspace

    _banner("1. model, alignment reference, adapters")
    lab = None if args.tiny else _real_model_setup(args.model, args.adapter)
    hostile: Path | None
    if lab is not None:
        model, reference, unsafe, hostile = lab
        max_rank, kv, max_len = 64, "2", 1024
        print(f"model {model}\nreference {reference}")
    else:
        ws = prepare_tiny_workspace(args.workdir / "tiny")
        model, reference, unsafe, hostile = (
            ws.base,
            ws.reference,
            ws.adapters["unsafe"],
            ws.adapters["hostile"],
        )
        max_rank, kv, max_len = 8, "1", 256
        print(f"tiny random Llama at {model} (no --model/--adapter given; `make lab` builds SmolLM2)")
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
    env = server_env(
        safeguard={
            "method": args.method,
            "method_options": args.method_options,
            "risk_threshold": str(args.threshold),
            "reference_path": str(reference),
            "cache_dir": str(cache),
        },
        runtime_lora_updating=True,
        kvcache_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE", kv),
        keep_enabled=True,
    )
    served = "demo-model"
    server_args = vllm_server_argv(
        model,
        port=args.port,
        served_model_name=served,
        max_model_len=max_len,
        max_lora_rank=max_rank,
        seed=None,
    )
    log = args.workdir / "server.log"
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        server = launch_test_server(server_args, env=env, log_path=log, ready_timeout=600)
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
        reply = post_reply(
            server.url + "/v1/load_lora_adapter", {"lora_name": "unsafe", "lora_path": str(unsafe)}, 300
        )
        print(f"POST /v1/load_lora_adapter unsafe -> {reply.status} {reply.text}")
        loaded = reply.status == 200
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
            reply = post_reply(
                server.url + "/v1/load_lora_adapter", {"lora_name": "hostile", "lora_path": str(hostile)}, 300
            )
            print(f"POST /v1/load_lora_adapter hostile -> {reply.status} {reply.text}")

        _banner("5. requests")
        for model_name in (served, "unsafe") if loaded else (served,):
            for prompt in ("how to make a bomb", "write a poem about the capital of france"):
                reply = post_reply(
                    server.url + "/v1/completions",
                    {"model": model_name, "prompt": prompt, "max_tokens": 16, "temperature": 0},
                    300,
                )
                text = reply.body["choices"][0]["text"] if reply.status == 200 else reply.text
                print(f"[{model_name}] {prompt!r} -> {reply.status} {text!r}")

        _banner("/metrics (safeguard_*)")
        metrics = http_get(server.url + "/metrics")[1]
        for line in metrics.splitlines():
            if line.startswith("safeguard_") and "_bucket" not in line:
                print(line)
    print(f"\nserver stopped (exit code {server.proc.returncode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Greedy fp32 completions from vLLM *offline* (``LLM``): the expected outputs of the e2e tests.

Run as a script by the e2e tests through :func:`run_offline` (a separate process, never next to a
running server, so two engines never share the 2 CPU cores)::

    python tests/e2e/offline_vllm.py spec.json out.json

Two modes, one engine setup (fp32, LoRA rank 8, 2 slots, 256 tokens, seed 0; ``"tensor_parallel_size"``
in the spec, default 1):

* plugin off (no ``"cases"`` in the spec), one prompt at a time, like the server tests send them:
  spec ``{"model", "prompts": [...], "max_tokens": N, "adapters": {"name": path or null}}``,
  out ``{"name": [[token ids of prompt 0], ...]}``;
* plugin ON with per-request ``safeguard_alpha``, every case in ONE ``LLM.generate`` call (they share
  mixed batches): spec adds ``"safeguard": {...config...}``, ``"cases": {"case": [adapter name or null,
  alpha or null]}`` and optionally ``"bad_alphas"``; ``"adapters"`` maps names to paths;
  out ``{"outputs": {"case": [[token ids of prompt 0], ...]}, "rejected": {"repr(bad)": "error"}}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_offline(spec: dict[str, Any], root: Path, name: str, env: dict[str, str]) -> Any:
    """Run this script on ``spec`` (written to ``root/<name>.json``) in a fresh process; its output."""
    (root / f"{name}.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [sys.executable, str(Path(__file__)), str(root / f"{name}.json"), str(root / f"{name}-out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((root / f"{name}-out.json").read_text())


def _plain(llm: Any, spec: dict[str, Any]) -> dict[str, list[list[int]]]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out: dict[str, list[list[int]]] = {}
    for i, (name, path) in enumerate(spec["adapters"].items(), start=1):
        req = LoRARequest(name, i, path) if path else None
        # One prompt at a time, like the server test sends them.
        out[name] = [
            list(llm.generate([p], params, lora_request=req, use_tqdm=False)[0].outputs[0].token_ids)
            for p in spec["prompts"]
        ]
    return out


def _alpha_cases(llm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {name: i for i, name in enumerate(spec["adapters"], start=1)}
    prompts, params, loras, keys = [], [], [], []
    for case, (adapter, alpha) in spec["cases"].items():
        extra = {"safeguard_alpha": alpha} if alpha is not None else None
        for i, p in enumerate(spec["prompts"]):
            prompts.append(p)
            params.append(
                SamplingParams(
                    temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, extra_args=extra
                )
            )
            loras.append(LoRARequest(adapter, ids[adapter], spec["adapters"][adapter]) if adapter else None)
            keys.append((case, i))
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    result: dict[str, list[list[int]]] = {case: [[] for _ in spec["prompts"]] for case in spec["cases"]}
    for (case, i), o in zip(keys, outs, strict=True):
        result[case][i] = list(o.outputs[0].token_ids)
    rejected: dict[str, str] = {}
    for bad in spec.get("bad_alphas", []):
        try:
            llm.generate(
                ["hello"],
                SamplingParams(max_tokens=1, extra_args={"safeguard_alpha": bad}),
                use_tqdm=False,
            )
            rejected[repr(bad)] = "ACCEPTED"
        except Exception as e:
            rejected[repr(bad)] = f"{type(e).__name__}: {e}"
    return {"outputs": result, "rejected": rejected}


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM

    spec = json.loads(Path(spec_path).read_text())
    alpha = "cases" in spec
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=256,
        seed=0,
        tensor_parallel_size=int(spec.get("tensor_parallel_size", 1)),
        additional_config={"safeguard": spec["safeguard"] if alpha else {"enabled": False}},
    )
    out = _alpha_cases(llm, spec) if alpha else _plain(llm, spec)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

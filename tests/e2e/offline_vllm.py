"""Greedy fp32 completions from vLLM *offline* (``LLM``), with the plugin disabled.

Run as a script by the e2e tests (a separate process, before the server starts, so two engines never
share the 2 CPU cores):  python tests/e2e/offline_vllm.py spec.json out.json
spec: {"model": ..., "prompts": [...], "max_tokens": N, "adapters": {"name": path or null}}
out:  {"name": [[token ids of prompt 0], ...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=256,
        seed=0,
        additional_config={"safeguard": {"enabled": False}},
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out: dict[str, list[list[int]]] = {}
    for i, (name, path) in enumerate(spec["adapters"].items(), start=1):
        req = LoRARequest(name, i, path) if path else None
        # One prompt at a time, like the server test sends them.
        out[name] = [
            list(llm.generate([p], params, lora_request=req, use_tqdm=False)[0].outputs[0].token_ids)
            for p in spec["prompts"]
        ]
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

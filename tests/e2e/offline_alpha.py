"""Greedy fp32 completions from vLLM *offline* with the plugin ON and per-request ``safeguard_alpha``.

All cases go into ONE ``LLM.generate`` call, so they share mixed batches. Run as a script (a separate
process; never next to a running server):  python tests/e2e/offline_alpha.py spec.json out.json
spec: {"model": ..., "prompts": [...], "max_tokens": N, "safeguard": {...config...},
       "adapters": {"name": path}, "cases": {"case": [adapter name or null, alpha or null]}}
out:  {"case": [[token ids of prompt 0], ...]}
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
        additional_config={"safeguard": spec["safeguard"]},
    )
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
    with open(out_path, "w") as f:
        json.dump({"outputs": result, "rejected": rejected}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

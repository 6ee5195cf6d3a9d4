"""The fused kernels compile ahead of time for Hopper (sm_90) on this CPU-only machine, every served
variant (shrink and expand; bf16, fp16, fp32; decode, mid-size and prefill token counts; ranks 16, 32
and 64) without register spills, with vLLM's 1-stage guard for 16-bit expands on SM90
(triton-lang/triton#9433) and wgmma at prefill sizes.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (tests/conftest.py sets it for the CPU
kernel tests, and under the interpreter ``@triton.jit`` builds nothing compilable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-m", "kernels.triton_ops.aot", "--arch", "90", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if not out.exists():
        pytest.fail(f"AOT compile did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return list(json.loads(out.read_text())["variants"])


def test_every_served_variant_compiles_for_sm90(compiled: list[dict[str, Any]]) -> None:
    kernels = {(v["kernel"], v["dtype"], v["tokens"]) for v in compiled}
    assert len(compiled) == 54 and len(kernels) == 18, sorted(kernels)


def test_no_variant_spills(compiled: list[dict[str, Any]]) -> None:
    spilling = [
        (v["variant"], v["registers"], v["stack_bytes"], v["local_bytes"])
        for v in compiled
        if v["stack_bytes"] or v["local_bytes"]
    ]
    assert spilling == []
    assert all(0 < v["registers"] <= 255 for v in compiled)


def test_sixteen_bit_expand_runs_one_stage_on_sm90(compiled: list[dict[str, Any]]) -> None:
    # The expand casts its fp32 buffer to the weight dtype for the dot: vLLM 0.33 forces one stage
    # there on SM90 (pipelined wgmma with a register A operand is miscompiled by ptxas < 13.3).
    stages = {(v["dtype"], v["num_stages"]) for v in compiled if v["kernel"] == "expand"}
    assert stages == {("torch.bfloat16", 1), ("torch.float16", 1), ("torch.float32", 2)}


def test_prefill_tiles_use_wgmma(compiled: list[dict[str, Any]]) -> None:
    assert {v["mma"] for v in compiled if v["tokens"] == 2048} == {"wgmma"}
    assert {v["mma"] for v in compiled if v["tokens"] == 1} == {"mma.sync"}

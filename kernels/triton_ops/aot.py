"""Ahead-of-time compile of the fused safety-LoRA kernels for a GPU target, without a GPU.

Triton compiles for ``GPUTarget("cuda", 90, 32)`` (Hopper, sm_90) on any machine; ``cuobjdump``
(shipped with Triton's NVIDIA backend) then reads each kernel's register, stack, local-memory and
shared-memory use from the cubin, and the PTX says which MMA instruction the dots became. Every
variant is built from the launchers' own ``shrink_launch`` / ``expand_launch`` and default configs,
so what is compiled here is exactly what the launchers would launch on that target.

    python -m kernels.triton_ops.aot [--arch 90] [--json OUT]   # every served variant; exit 1 on spills

Run it with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` builds no compilable
kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from .fused_safety_lora_expand import _default_expand_config, _fused_expand_kernel, expand_launch
from .fused_safety_lora_shrink import _default_shrink_config, _fused_shrink_kernel, shrink_launch

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointer arguments whose element type is fixed; x_ptr / y_ptr take the model dtype.
_FIXED_POINTERS = {
    "table_ptr": "*i64",
    "alpha_ptr": "*fp32",
    "out_ptr": "*fp32",
    "buf_ptr": "*fp32",
    "sorted_token_ids_ptr": "*i32",
    "num_tokens_per_lora_ptr": "*i32",
    "lora_token_start_loc_ptr": "*i32",
    "lora_ids_ptr": "*i32",
}

# What we serve: decode (1-16 tokens), mid-size and prefill batches; ranks 16-64 (task and safety);
# 16-bit models, plus fp32 (tests, fp32 models).
SERVED_TOKENS = (1, 128, 2048)
SERVED_RANKS = ((16, 16), (32, 32), (64, 64))
SERVED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HIDDEN, MAX_N = 4096, 4096  # a 7B-class layer (the tiles, not these sizes, set register use)


@dataclass(frozen=True)
class Variant:
    kernel: str  # "shrink" | "expand"
    dtype: torch.dtype
    tokens: int
    rank: int
    safety_rank: int

    @property
    def name(self) -> str:
        return f"{self.kernel}-{_TRITON_DTYPE[self.dtype]}-m{self.tokens}-r{self.rank}-rs{self.safety_rank}"


@dataclass(frozen=True)
class Compiled:
    variant: Variant
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    mma: str  # "wgmma" | "mma.sync" | "none"
    num_warps: int
    num_stages: int
    tiles: str

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def served_variants() -> list[Variant]:
    return [
        Variant(kernel, dtype, m, r, r_s)
        for kernel in ("shrink", "expand")
        for dtype in SERVED_DTYPES
        for m in SERVED_TOKENS
        for r, r_s in SERVED_RANKS
    ]


def _signature(fn: Any, dtype: torch.dtype, constexprs: dict[str, Any]) -> dict[str, str]:
    sig: dict[str, str] = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FIXED_POINTERS:
            sig[name] = _FIXED_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + _TRITON_DTYPE[dtype]
        elif name == "task_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _launch(v: Variant, capability: tuple[int, int]) -> tuple[Any, dict[str, Any], int, int, str]:
    if v.kernel == "shrink":
        s_cfg = _default_shrink_config(v.tokens, HIDDEN, v.rank, v.safety_rank, interpreter=False)
        c, w, st = shrink_launch(
            s_cfg, dtype=v.dtype, k=HIDDEN, r_t=v.rank, r_s=v.safety_rank, has_task=True, has_safety=True
        )
        tiles = f"{s_cfg.block_m}x{s_cfg.block_n}x{s_cfg.block_k} split_k {s_cfg.split_k}"
        return _fused_shrink_kernel, c, w, st, tiles
    e_cfg = _default_expand_config(v.tokens, MAX_N, v.rank, v.safety_rank, interpreter=False)
    c, w, st = expand_launch(
        e_cfg,
        dtype=v.dtype,
        max_n=MAX_N,
        has_task=True,
        has_safety=True,
        add_inputs=True,
        capability=capability,
    )
    tiles = f"{e_cfg.block_m}x{e_cfg.block_n} k {e_cfg.block_k_task}/{e_cfg.block_k_safety}"
    return _fused_expand_kernel, c, w, st, tiles


def _resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.exists() else (shutil.which("cuobjdump") or str(bundled))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return reg, stack, local, shared


def compile_variant(v: Variant, arch: int = 90) -> Compiled:
    """Compile ``v`` for ``sm_<arch>`` (no GPU needed) and read its resource use.

    Raises:
        RuntimeError: Triton or cuobjdump failed (the message says which variant).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, constexprs, num_warps, num_stages, tiles = _launch(v, (arch // 10, arch % 10))
    src = ASTSource(fn=fn, signature=_signature(fn, v.dtype, constexprs), constexprs=constexprs)
    try:
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    except Exception as e:
        raise RuntimeError(f"{v.name}: AOT compile for sm_{arch} failed: {e}") from e
    reg, stack, local, shared = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    return Compiled(v, reg, stack, local, shared, mma, num_warps, num_stages, tiles)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args(argv)
    print("| variant | tiles | warps | stages | registers | spill bytes | shared | mma |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    bad = 0
    rows = []
    for v in served_variants():
        c = compile_variant(v, args.arch)
        bad += c.spills
        row = {k: val for k, val in dataclasses.asdict(c).items() if k != "variant"}
        rows.append({"variant": v.name, "kernel": v.kernel, "dtype": str(v.dtype), "tokens": v.tokens, **row})
        print(
            f"| {v.name} | {c.tiles} | {c.num_warps} | {c.num_stages} | {c.registers} | "
            f"{c.stack_bytes + c.local_bytes} | {c.shared_bytes} | {c.mma} |"
        )
    print(f"\n{bad} variant(s) spill")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"arch": args.arch, "triton": triton.__version__, "variants": rows}, indent=1)
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
